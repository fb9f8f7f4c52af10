//! Problems found in policy files, each with the place it was found.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::line_index::LineIndex;

/// A place in a policy file: line and column, both from 1; the column
/// counts characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: Arc<Path>,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Whether a problem refuses the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The policy is refused.
    Error,
    /// Reported, but the policy is good: a check passes and a reload
    /// applies it.
    Warning,
}

/// One problem. Without a line and column it concerns the whole file
/// (one that cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: Arc<Path>,
    /// Line and column.
    pub position: Option<(u32, u32)>,
    pub message: String,
}

impl Diagnostic {
    /// An error at `location`.
    pub fn at(location: &Location, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            file: location.file.clone(),
            position: Some((location.line, location.column)),
            message: message.into(),
        }
    }

    /// A warning at `location`.
    pub fn warning_at(location: &Location, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::at(location, message)
        }
    }

    /// An error about the whole file.
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            file: file.into(),
            position: None,
            message: message.into(),
        }
    }
}

/// `FILE:LINE:COL: error: MESSAGE` (or `warning:`).
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {severity}: {}", self.message)
    }
}

/// The text of one policy file, and where its lines start.
pub struct Source {
    pub file: Arc<Path>,
    pub text: String,
    lines: LineIndex,
    /// Lines of the file before the text (when the text is a part of it).
    lines_before: u32,
}

impl Source {
    pub fn new(file: &Path, text: String) -> Self {
        Self::part(file, text, 0)
    }

    /// A part of a file's text that starts after `lines_before` lines.
    pub fn part(file: &Path, text: String, lines_before: u32) -> Self {
        Self {
            file: file.into(),
            lines: LineIndex::new(&text),
            text,
            lines_before,
        }
    }

    /// The location of a byte offset into the text.
    pub fn locate(&self, offset: usize) -> Location {
        let (line, column) = self.lines.position(&self.text, offset);
        Location {
            file: self.file.clone(),
            line: line as u32 + self.lines_before,
            column: column as u32,
        }
    }

    /// A problem at the start of `span`.
    pub fn error(&self, span: &Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&self.locate(span.start), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_line_and_column() {
        let s = Source::new(Path::new("p.toml"), "ab\n\né = 1\n".into());
        assert_eq!(
            s.error(&(4..5), "bad").to_string(),
            "p.toml:3:1: error: bad"
        );
        assert_eq!(
            Diagnostic::whole_file(Path::new("q.toml"), "cannot read").to_string(),
            "q.toml: error: cannot read"
        );
        assert_eq!(
            Diagnostic::warning_at(&s.locate(4), "odd").to_string(),
            "p.toml:3:1: warning: odd"
        );
    }
}
