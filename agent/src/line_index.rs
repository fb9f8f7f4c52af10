//! Lines and columns of byte offsets into an operator's file, for error
//! messages and for the origin kept with each entry: the line starts are
//! found once per file, so placing each of many tables costs a binary
//! search, not a scan of the text before it.

/// Where each line of a text starts.
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    /// The line and column of `offset` in `text` (the text this index was
    /// made of), both from 1; the column counts characters. An offset past
    /// the end is the end.
    pub fn position(&self, text: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(text.len());
        let line = self.starts.partition_point(|&start| start <= offset) - 1;
        let column = text[self.starts[line]..offset].chars().count() + 1;
        (line + 1, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_character_columns() {
        let text = "ab\n\né = 1\n";
        let index = LineIndex::new(text);
        let at = |o| index.position(text, o);
        assert_eq!(at(0), (1, 1));
        assert_eq!(at(2), (1, 3));
        assert_eq!(at(3), (2, 1));
        assert_eq!(at(4), (3, 1));
        // `é` is two bytes and one column.
        assert_eq!(at(7), (3, 3));
        assert_eq!(at(100), (4, 1));
    }
}
