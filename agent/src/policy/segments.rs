//! A policy file as parts parsed apart: its head (what comes before the
//! first `[[identity]]` table) and each `[[identity]]` table with what
//! follows it. A part whose text and place are those of a part of the
//! file's earlier parse is not parsed again, so a change to one block of
//! a file of thousands parses that block.
//!
//! Parsing apart is used only where it must mean what parsing the whole
//! file means; anything else (a part that does not parse cleanly, a part
//! after the head that sets more than identity blocks, a head that may
//! name `identity` itself) makes the caller parse the whole file, which
//! reports every problem as before. A split inside a multi-line string
//! leaves the part before it unterminated, so it never parses cleanly.

use std::ops::Range;
use std::path::Path;

use super::diagnostic::Source;
use super::parse::{FileContents, parse};
use crate::hashing::{FastMap, TextDigest, text_digest};

/// One part of a file, as parsed.
#[derive(Clone)]
pub struct Part {
    /// Lines of the file before it.
    lines_before: u32,
    digest: TextDigest,
    contents: FileContents,
}

/// Parses `text` (of `file`) in parts, taking from `earlier` (the parts
/// of its last parse) each part with the same text in the same place.
/// `None` when the whole file must be parsed instead.
pub fn parse_parts(file: &Path, text: &str, earlier: &[Part]) -> Option<(FileContents, Vec<Part>)> {
    let split = split(text);
    let earlier: FastMap<(u32, TextDigest), &Part> = earlier
        .iter()
        .map(|p| ((p.lines_before, p.digest), p))
        .collect();
    let mut whole = FileContents::default();
    let mut parts = Vec::with_capacity(split.len());
    for (i, (lines_before, range)) in split.iter().enumerate() {
        let piece = &text[range.clone()];
        let head = i == 0;
        // Only the head may set anything but identity blocks, and it must
        // not touch `identity` when blocks follow (an inline array, a
        // dotted key: the whole file would refuse them).
        if head && split.len() > 1 && piece.contains("identity") {
            return None;
        }
        let digest = text_digest(piece.as_bytes());
        let contents = match earlier.get(&(*lines_before, digest)) {
            Some(part) => part.contents.clone(),
            None => {
                let mut problems = Vec::new();
                let source = Source::part(file, piece.to_owned(), *lines_before);
                let contents = parse(&source, &mut problems);
                if !problems.is_empty() {
                    return None;
                }
                contents
            }
        };
        if !head && (contents.mode.is_some() || contents.unknown.is_some()) {
            return None;
        }
        if head {
            whole.mode = contents.mode.clone();
            whole.unknown = contents.unknown.clone();
        }
        whole.identities.extend(contents.identities.iter().cloned());
        parts.push(Part {
            lines_before: *lines_before,
            digest,
            contents,
        });
    }
    Some((whole, parts))
}

/// The head and each part that starts with a line opening an
/// `[[identity]]` table: the lines before each, and its bytes.
fn split(text: &str) -> Vec<(u32, Range<usize>)> {
    let mut starts = vec![(0u32, 0usize)];
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if n > 0 && opens_identity(line) {
            starts.push((n as u32, offset));
        }
        offset += line.len();
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, &(lines, start))| {
            let end = starts.get(i + 1).map_or(text.len(), |&(_, s)| s);
            (lines, start..end)
        })
        .collect()
}

/// Whether a line is an `[[identity]]` table header (spaces allowed as
/// TOML allows them, and a comment after).
fn opens_identity(line: &str) -> bool {
    let Some(rest) = line.trim_start().strip_prefix("[[") else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix("identity") else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix("]]") else {
        return false;
    };
    let rest = rest.trim_start();
    rest.is_empty() || rest.starts_with('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "[[identity]]\nid = \"spiffe://example.org/a\"\n[[identity.egress]]\nname = \"r\"\nto = [\"10.0.0.0/8\"]\naction = \"allow\"\n";

    fn whole(text: &str) -> FileContents {
        let mut problems = Vec::new();
        let c = parse(
            &Source::new(Path::new("p.toml"), text.into()),
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        c
    }

    fn same(a: &FileContents, b: &FileContents) -> bool {
        a.mode == b.mode
            && a.unknown == b.unknown
            && a.identities.len() == b.identities.len()
            && a.identities
                .iter()
                .zip(&b.identities)
                .all(|(x, y)| x.same_as(y))
    }

    #[test]
    fn parts_come_to_what_the_whole_file_does() {
        let text = format!(
            "mode = \"audit\"\n[unknown]\ndefault = \"allow\"\n\n{}  [[ identity ]] # b\nid = \"spiffe://example.org/b\"\n{}",
            BLOCK,
            BLOCK.replace("spiffe://example.org/a", "spiffe://example.org/c")
        );
        let (parts, kept) = parse_parts(Path::new("p.toml"), &text, &[]).unwrap();
        assert_eq!(kept.len(), 4);
        assert!(same(&parts, &whole(&text)));
        // Again with the earlier parts: the same blocks, not parsed again.
        let (again, _) = parse_parts(Path::new("p.toml"), &text, &kept).unwrap();
        for (a, b) in again.identities.iter().zip(&parts.identities) {
            assert_eq!(a.serial, b.serial);
        }
        // One block changed: only it is a new parse.
        let changed = text.replace("spiffe://example.org/b", "spiffe://example.org/bb");
        let (after, _) = parse_parts(Path::new("p.toml"), &changed, &kept).unwrap();
        assert!(same(&after, &whole(&changed)));
        let serials: Vec<bool> = after
            .identities
            .iter()
            .zip(&parts.identities)
            .map(|(a, b)| a.serial == b.serial)
            .collect();
        assert_eq!(serials, [true, false, true]);
    }

    #[test]
    fn the_whole_file_is_parsed_where_parts_could_mean_something_else() {
        let cases = [
            // A header inside a multi-line string.
            format!("# head\n{BLOCK}description = \"\"\"\n[[identity]]\n\"\"\"\n"),
            // `[unknown]` after a block.
            format!("# head\n{BLOCK}[unknown]\ndefault = \"allow\"\n"),
            // The head names `identity` itself.
            format!("identity = []\n{BLOCK}"),
            // A part that does not parse.
            format!("# head\n{BLOCK}[[identity]]\nid = 3\n"),
        ];
        for text in cases {
            assert!(
                parse_parts(Path::new("p.toml"), &text, &[]).is_none(),
                "{text}"
            );
        }
    }

    #[test]
    fn credential_rules_are_parts_of_their_identity_block() {
        let text = format!(
            "# head\n{BLOCK}[[identity.credential]]\nname = \"api\"\nhost = \"api.example.com\"\nheader = \"x-key\"\nsecret_file = \"/k\"\n{}",
            BLOCK.replace("example.org/a", "example.org/b")
        );
        let (parts, kept) = parse_parts(Path::new("p.toml"), &text, &[]).unwrap();
        assert_eq!(kept.len(), 3);
        assert!(same(&parts, &whole(&text)));
        assert_eq!(parts.identities[0].policy.credentials[0].at.line, 8);
        assert!(parts.identities[1].policy.credentials.is_empty());
    }

    #[test]
    fn locations_count_the_lines_before_a_part() {
        let text = format!("# head\n\n{BLOCK}{BLOCK}");
        let (parts, _) = parse_parts(Path::new("p.toml"), &text, &[]).unwrap();
        let lines: Vec<u32> = parts.identities.iter().map(|b| b.at.line).collect();
        assert_eq!(lines, [4, 10]);
        assert!(same(&parts, &whole(&text)));
    }
}
