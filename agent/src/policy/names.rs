//! DNS names in rules: the pattern type (`api.example.com`,
//! `*.example.com`), its syntax, its class id, and the index that finds
//! the class of a looked-up name.
//!
//! A name class is, for one identity's set of patterns, the most specific
//! pattern that covers a name: the exact pattern equal to it, else the
//! wildcard with the longest domain. Its id is a hash of the pattern's
//! canonical text, so it is the same across reloads and restarts.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use idgate_common::NAME_CLASS_BYTES;
use sha2::{Digest, Sha256};

/// The id of a name class: the key of its port tables in the kernel.
pub type ClassId = [u8; NAME_CLASS_BYTES];

/// Hashed before the pattern's text, so a class id is never the hash of
/// anything else idgate hashes.
const CLASS_DOMAIN: &[u8] = b"idgate name class v1\0";

/// RFC 1035: the longest label, in bytes.
const MAX_LABEL: usize = 63;
/// RFC 1035: the longest name, in text without the final dot.
const MAX_NAME: usize = 253;

/// A name of a rule's `to`, in canonical form: lowercase ASCII, no final
/// dot. Either one name, or `*.` and a domain: every name one or more
/// labels below the domain (not the domain itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamePattern {
    text: String,
}

/// Why a string is not a name pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("it is empty")]
    Empty,
    #[error(
        "it is not ASCII; write its ASCII (punycode) form {ascii:?}, which is what DNS carries"
    )]
    NotAscii { ascii: String },
    #[error("it is not a valid internationalised name")]
    BadUnicode,
    #[error("it is {len} characters long; a name has at most {MAX_NAME}")]
    TooLong { len: usize },
    #[error("it has an empty label (two dots in a row, or a dot at the start)")]
    EmptyLabel,
    #[error("label {label:?} is {len} characters long; a label has at most {MAX_LABEL}")]
    LabelTooLong { label: String, len: usize },
    #[error("label {label:?} has {ch:?}; labels are letters, digits, `-` and `_`")]
    BadCharacter { label: String, ch: char },
    #[error("label {label:?} starts or ends with `-`")]
    Hyphen { label: String },
    #[error("`*` may only be the whole first label, followed by a domain (like *.example.com)")]
    Wildcard,
}

impl NamePattern {
    /// The canonical text: `api.example.com` or `*.example.com`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it is `*.` and a domain.
    pub fn is_wildcard(&self) -> bool {
        self.text.starts_with("*.")
    }

    /// The name, or a wildcard's domain (`example.com` for
    /// `*.example.com`).
    fn domain(&self) -> &str {
        self.text.strip_prefix("*.").unwrap_or(&self.text)
    }

    /// The text of every pattern that covers all it covers: itself, then
    /// `*.T` for each domain T above its own, longest first. For
    /// `api.x.com`: `api.x.com`, `*.x.com`, `*.com`; for `*.eu.x.com`:
    /// itself, `*.x.com`, `*.com`.
    pub fn covering(&self) -> impl Iterator<Item = Cow<'_, str>> {
        let domain = self.domain();
        let above = domain
            .match_indices('.')
            .map(move |(dot, _)| Cow::Owned(format!("*.{}", &domain[dot + 1..])));
        std::iter::once(Cow::Borrowed(self.as_str())).chain(above)
    }

    /// Whether it covers `name` (lowercase, without a final dot, as the
    /// DNS path reads a query): the name itself, or for `*.T` a name one
    /// or more labels below `T`.
    pub fn covers(&self, name: &str) -> bool {
        match self.text.strip_prefix("*.") {
            Some(domain) => name
                .strip_suffix(domain)
                .is_some_and(|below| below.len() > 1 && below.ends_with('.')),
            None => self.text == name,
        }
    }

    /// The id of the class this pattern stands for.
    pub fn class_id(&self) -> ClassId {
        let digest = Sha256::new()
            .chain_update(CLASS_DOMAIN)
            .chain_update(self.text.as_bytes())
            .finalize();
        let mut id = [0; NAME_CLASS_BYTES];
        id.copy_from_slice(&digest[..NAME_CLASS_BYTES]);
        id
    }
}

/// Any case, and one final dot, are accepted; a non-ASCII name is refused
/// with its ASCII form to write instead.
impl FromStr for NamePattern {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if !s.is_ascii() {
            let (star, rest) = match s.strip_prefix("*.") {
                Some(rest) => ("*.", rest),
                None => ("", s),
            };
            let ascii = idna::domain_to_ascii(rest).map_err(|_| NameError::BadUnicode)?;
            return Err(NameError::NotAscii {
                ascii: format!("{star}{ascii}"),
            });
        }
        let text = s.to_ascii_lowercase();
        if text.len() > MAX_NAME {
            return Err(NameError::TooLong { len: text.len() });
        }
        let domain = match text.strip_prefix("*.") {
            Some(domain) => domain,
            None if text == "*" => return Err(NameError::Wildcard),
            None => &text,
        };
        for label in domain.split('.') {
            check_label(label)?;
        }
        Ok(Self { text })
    }
}

fn check_label(label: &str) -> Result<(), NameError> {
    let owned = || label.to_owned();
    if label.is_empty() {
        return Err(NameError::EmptyLabel);
    }
    if label.contains('*') {
        return Err(NameError::Wildcard);
    }
    if label.len() > MAX_LABEL {
        return Err(NameError::LabelTooLong {
            label: owned(),
            len: label.len(),
        });
    }
    if let Some(ch) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(NameError::BadCharacter { label: owned(), ch });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::Hyphen { label: owned() });
    }
    Ok(())
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The class a looked-up name falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameMatch<'a> {
    pub class: ClassId,
    /// The pattern of the class, canonical (for records).
    pub pattern: &'a str,
}

/// The name classes of one rule set: its identities' name patterns, by
/// name (exact) and by domain (wildcards).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameIndex {
    exact: HashMap<String, ClassId>,
    /// `*.T` by `T`.
    wildcards: HashMap<String, (ClassId, String)>,
}

impl NameIndex {
    /// The index of a set of patterns (repeats are one class).
    pub fn new<'p>(patterns: impl IntoIterator<Item = &'p NamePattern>) -> Self {
        let mut index = Self::default();
        for p in patterns {
            if p.is_wildcard() {
                let entry = (p.class_id(), p.text.clone());
                index.wildcards.insert(p.domain().to_owned(), entry);
            } else {
                index.exact.insert(p.text.clone(), p.class_id());
            }
        }
        index
    }

    /// The class of `name` (lowercase, without a final dot): the pattern
    /// equal to it, else the wildcard with the longest domain covering it;
    /// `None` when no pattern covers it. One hash lookup for the name and
    /// one for each of its suffixes.
    pub fn class_of<'a>(&'a self, name: &'a str) -> Option<NameMatch<'a>> {
        if let Some(&class) = self.exact.get(name) {
            return Some(NameMatch {
                class,
                pattern: name,
            });
        }
        name.match_indices('.').find_map(|(dot, _)| {
            let (class, pattern) = self.wildcards.get(&name[dot + 1..])?;
            Some(NameMatch {
                class: *class,
                pattern,
            })
        })
    }

    /// Whether it holds no class.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> NamePattern {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn case_and_a_final_dot_give_one_pattern_and_one_class() {
        let a = p("API.Example.COM.");
        assert_eq!(a.as_str(), "api.example.com");
        assert_eq!(a, p("api.example.com"));
        assert_eq!(a.class_id(), p("api.example.com").class_id());
        assert_eq!(p("*.Example.com.").as_str(), "*.example.com");
        assert_ne!(a.class_id(), p("*.example.com").class_id());
        assert_eq!(p("_dmarc.example.com").as_str(), "_dmarc.example.com");
        assert_eq!(p("*.com").as_str(), "*.com");
        assert_eq!(p("localhost").as_str(), "localhost");
    }

    #[test]
    fn refuses_what_is_not_a_name() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        assert_eq!(long_name.len(), 259);
        for (s, want) in [
            ("", NameError::Empty),
            (".", NameError::Empty),
            ("a..com", NameError::EmptyLabel),
            (".a.com", NameError::EmptyLabel),
            (
                &long_label,
                NameError::LabelTooLong {
                    label: "a".repeat(64),
                    len: 64,
                },
            ),
            (&long_name, NameError::TooLong { len: 259 }),
            (
                "a b.com",
                NameError::BadCharacter {
                    label: "a b".into(),
                    ch: ' ',
                },
            ),
            ("-a.com", NameError::Hyphen { label: "-a".into() }),
            ("*", NameError::Wildcard),
            ("*.", NameError::Wildcard),
            ("a.*.com", NameError::Wildcard),
            ("foo*.x", NameError::Wildcard),
            ("*.*.x", NameError::Wildcard),
            (
                "bücher.de",
                NameError::NotAscii {
                    ascii: "xn--bcher-kva.de".into(),
                },
            ),
            (
                "*.Bücher.de",
                NameError::NotAscii {
                    ascii: "*.xn--bcher-kva.de".into(),
                },
            ),
        ] {
            assert_eq!(s.parse::<NamePattern>(), Err(want), "{s:?}");
        }
        // 253 characters is the limit.
        let longest = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "a".repeat(61));
        assert_eq!(longest.len(), 253);
        p(&longest);
    }

    #[test]
    fn a_pattern_is_covered_by_itself_and_the_wildcards_above_it() {
        let covering =
            |s: &str| -> Vec<String> { p(s).covering().map(|c| c.into_owned()).collect() };
        assert_eq!(covering("api.x.com"), ["api.x.com", "*.x.com", "*.com"]);
        assert_eq!(covering("*.eu.x.com"), ["*.eu.x.com", "*.x.com", "*.com"]);
        assert_eq!(covering("*.com"), ["*.com"]);
        assert_eq!(covering("localhost"), ["localhost"]);
    }

    #[test]
    fn a_pattern_covers_its_name_or_the_names_below_its_domain() {
        assert!(p("api.x.com").covers("api.x.com"));
        assert!(!p("api.x.com").covers("a.api.x.com"));
        assert!(!p("api.x.com").covers("x.com"));
        let wild = p("*.x.com");
        assert!(wild.covers("a.x.com") && wild.covers("b.a.x.com"));
        assert!(!wild.covers("x.com"));
        assert!(!wild.covers("ax.com"));
        assert!(!wild.covers(".x.com"));
        assert!(!wild.covers("a.x.co"));
    }

    #[test]
    fn a_name_s_class_is_its_exact_pattern_else_the_longest_wildcard() {
        let patterns: Vec<NamePattern> = ["api.x.com", "*.x.com", "*.eu.x.com", "*.com"]
            .into_iter()
            .map(p)
            .collect();
        let index = NameIndex::new(&patterns);
        let class = |name: &str| index.class_of(name).map(|m| m.pattern.to_owned());
        assert_eq!(class("api.x.com").as_deref(), Some("api.x.com"));
        assert_eq!(class("www.x.com").as_deref(), Some("*.x.com"));
        assert_eq!(class("a.eu.x.com").as_deref(), Some("*.eu.x.com"));
        assert_eq!(class("eu.x.com").as_deref(), Some("*.x.com"));
        assert_eq!(class("x.com").as_deref(), Some("*.com"));
        assert_eq!(class("org"), None);
        assert_eq!(class("com"), None);
        assert_eq!(
            index.class_of("api.x.com").unwrap().class,
            p("API.x.com.").class_id()
        );
        assert_eq!(
            index.class_of("b.a.eu.x.com").unwrap().class,
            p("*.eu.x.com").class_id()
        );
        assert!(NameIndex::default().is_empty() && !index.is_empty());
    }
}
