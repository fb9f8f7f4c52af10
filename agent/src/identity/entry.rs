//! Registration entries: a SPIFFE ID and the selectors a workload must all
//! match to get it, read from TOML:
//!
//! ```toml
//! [[entry]]
//! id = "spiffe://example.org/agent/research"
//! selectors = ["unix:uid:1001", "cgroup:path:/system.slice/agent-*.service"]
//! ttl = "1h"   # optional: "90s", "30m", "1h 30m", "2d" ...
//! ```

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::selector::{Selector, SelectorError};
use super::spiffe_id::{SpiffeId, SpiffeIdError};
use crate::line_index::LineIndex;

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: SpiffeId,
    /// Never empty: all of them must match.
    pub selectors: Vec<Selector>,
    pub ttl: Option<Duration>,
    /// Where the entry was written.
    pub origin: Origin,
}

/// A place in an entries file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
}

impl Origin {
    /// The place of `offset` in `text`, the contents of `file`, whose
    /// lines `lines` indexes.
    pub fn at(file: &Path, lines: &LineIndex, text: &str, offset: usize) -> Origin {
        let (line, column) = lines.position(text, offset);
        Origin {
            file: file.to_owned(),
            line,
            column,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One thing wrong in an entries file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {problem}")]
pub struct EntryError {
    pub origin: Origin,
    pub problem: EntryProblem,
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("{0}")]
    Toml(String),
    #[error("the entry has no id")]
    MissingId,
    #[error("id {id:?}: {source}")]
    Id { id: String, source: SpiffeIdError },
    #[error("the entry has no selectors: it needs at least one, or it would match every workload")]
    NoSelectors,
    #[error(transparent)]
    Selector(#[from] SelectorError),
    #[error("ttl {0:?}: expected a duration above zero such as 90s, 30m, 1h or 1h 30m")]
    Ttl(String),
    #[error("id {id}: trust domain {domain:?} is not one this agent is configured for")]
    TrustDomain { id: String, domain: String },
}

/// Why the registration entries could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EntriesError {
    #[error("cannot read entries {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(EntryErrors),
}

/// Reads the entries file, or every `*.toml` file of an entries
/// directory, reporting every problem of every file at once. With
/// `trust_domains` set, every entry's ID must be in one of them.
pub fn load_entries(path: &Path, trust_domains: &[String]) -> Result<Vec<Entry>, EntriesError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| EntriesError::Read { path, source }
    };
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for file in crate::files::toml_files(path).map_err(read_err(path))? {
        let text = std::fs::read_to_string(&file).map_err(read_err(&file))?;
        match parse_entries(&file, &text) {
            Ok(parsed) => {
                for entry in parsed {
                    let domain = entry.id.trust_domain();
                    if !trust_domains.is_empty() && !trust_domains.iter().any(|t| t == domain) {
                        errors.push(EntryError {
                            problem: EntryProblem::TrustDomain {
                                id: entry.id.to_string(),
                                domain: domain.to_owned(),
                            },
                            origin: entry.origin.clone(),
                        });
                    } else {
                        entries.push(entry);
                    }
                }
            }
            Err(EntryErrors(e)) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(EntriesError::Invalid(EntryErrors(errors)))
    }
}

/// Everything wrong in an entries file, one error a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryErrors(pub Vec<EntryError>);

impl fmt::Display for EntryErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for EntryErrors {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entry: Vec<Spanned<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    id: Option<Spanned<String>>,
    selectors: Option<Spanned<Vec<Spanned<String>>>>,
    ttl: Option<Spanned<String>>,
}

/// Parses the entries in `text`, read from `file` (named in errors). A
/// file that is not valid TOML, or not of this shape, gives one error;
/// otherwise every bad entry is reported, each bad value where it stands.
pub fn parse_entries(file: &Path, text: &str) -> Result<Vec<Entry>, EntryErrors> {
    let lines = LineIndex::new(text);
    let error = |span: Range<usize>, problem| EntryError {
        origin: Origin::at(file, &lines, text, span.start),
        problem,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let problem = EntryProblem::Toml(e.message().to_owned());
        EntryErrors(vec![error(e.span().unwrap_or(0..0), problem)])
    })?;
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for raw_entry in raw.entry {
        let span = raw_entry.span();
        let raw_entry = raw_entry.into_inner();
        let before = errors.len();

        let id = match raw_entry.id {
            None => {
                errors.push(error(span.clone(), EntryProblem::MissingId));
                None
            }
            Some(id) => match id.get_ref().parse::<SpiffeId>() {
                Ok(parsed) => Some(parsed),
                Err(source) => {
                    let problem = EntryProblem::Id {
                        id: id.get_ref().clone(),
                        source,
                    };
                    errors.push(error(id.span(), problem));
                    None
                }
            },
        };

        let mut selectors = Vec::new();
        match raw_entry.selectors {
            None => errors.push(error(span.clone(), EntryProblem::NoSelectors)),
            Some(list) if list.get_ref().is_empty() => {
                errors.push(error(list.span(), EntryProblem::NoSelectors));
            }
            Some(list) => {
                for s in list.into_inner() {
                    match s.get_ref().parse::<Selector>() {
                        Ok(selector) => selectors.push(selector),
                        Err(e) => errors.push(error(s.span(), e.into())),
                    }
                }
            }
        }

        let ttl = raw_entry.ttl.and_then(|ttl| {
            let parsed = parse_ttl(ttl.get_ref());
            if parsed.is_none() {
                errors.push(error(ttl.span(), EntryProblem::Ttl(ttl.get_ref().clone())));
            }
            parsed
        });

        if let Some(id) = id
            && errors.len() == before
        {
            entries.push(Entry {
                id,
                selectors,
                ttl,
                origin: Origin::at(file, &lines, text, span.start),
            });
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(EntryErrors(errors))
    }
}

/// A duration such as `90s`, `30m`, `1h` or `1h 30m`; above zero.
fn parse_ttl(s: &str) -> Option<Duration> {
    humantime::parse_duration(s).ok().filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::selector::SelectorProblem;

    fn parse(text: &str) -> Result<Vec<Entry>, EntryErrors> {
        parse_entries(Path::new("/etc/idgate/entries.toml"), text)
    }

    /// (line, problem) of every error.
    fn errors(text: &str) -> Vec<(usize, EntryProblem)> {
        parse(text)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| (e.origin.line, e.problem))
            .collect()
    }

    #[test]
    fn parses_entries() {
        let entries = parse(
            r#"
# research agents
[[entry]]
id = "spiffe://example.org/agent/research"
selectors = ["unix:uid:1001", "cgroup:path:/system.slice/agent-*.service"]
ttl = "1h30m"

[[entry]]
id = "spiffe://example.org/ns/payments/sa/checkout"
selectors = [
  "k8s:ns:payments",
  "k8s:sa:checkout",
]
"#,
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0].id.as_str(),
            "spiffe://example.org/agent/research"
        );
        assert_eq!(
            entries[0].selectors,
            [
                "unix:uid:1001".parse().unwrap(),
                "cgroup:path:/system.slice/agent-*.service".parse().unwrap()
            ]
        );
        assert_eq!(entries[0].ttl, Some(Duration::from_secs(5400)));
        assert_eq!(entries[0].origin.line, 3);
        assert_eq!(entries[1].ttl, None);
        assert_eq!(entries[1].origin.line, 8);
        assert_eq!(
            entries[1].origin.file,
            Path::new("/etc/idgate/entries.toml")
        );
        assert_eq!(parse("").unwrap(), []);
    }

    #[test]
    fn reports_every_bad_entry_with_its_line() {
        let text = r#"[[entry]]
id = "spiffe://example.org/ok"
selectors = ["unix:uid:1001"]

[[entry]]
id = "spiffe://Example.org/upper"
selectors = [
  "unix:uid:1001",
  "unix:uid:alice",
  "unix:sha256:abc",
]
ttl = "soon"

[[entry]]
selectors = ["cgroup:path:/a/[b", "nope:x:y"]

[[entry]]
id = "spiffe://example.org/empty"
selectors = []
"#;
        let found = errors(text);
        let lines: Vec<usize> = found.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [6, 9, 10, 12, 14, 15, 15, 19], "{found:#?}");
        assert!(matches!(
            &found[0].1,
            EntryProblem::Id { id, source: SpiffeIdError::TrustDomainChar('E') }
                if id == "spiffe://Example.org/upper"
        ));
        let selector_problem = |i: usize| match &found[i].1 {
            EntryProblem::Selector(e) => e.problem.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(selector_problem(1), SelectorProblem::BadId("alice".into()));
        assert_eq!(selector_problem(2), SelectorProblem::Sha256Length(3));
        assert_eq!(found[3].1, EntryProblem::Ttl("soon".into()));
        assert_eq!(found[4].1, EntryProblem::MissingId);
        assert!(matches!(selector_problem(5), SelectorProblem::Glob(_)));
        assert_eq!(
            selector_problem(6),
            SelectorProblem::UnknownKind("nope:x".into())
        );
        assert_eq!(found[7].1, EntryProblem::NoSelectors);

        let message = parse(text).unwrap_err().to_string();
        let first = message.lines().next().unwrap();
        assert!(
            first.starts_with("/etc/idgate/entries.toml:6:6: id \"spiffe://Example.org/upper\""),
            "{message}"
        );
        assert!(
            message.contains(
                "/etc/idgate/entries.toml:9:3: selector \"unix:uid:alice\": \"alice\" is not a numeric id"
            ),
            "{message}"
        );
        assert_eq!(message.lines().count(), 8);
    }

    #[test]
    fn an_entry_without_selectors_is_rejected() {
        let found = errors("[[entry]]\nid = \"spiffe://example.org/all\"\n");
        assert_eq!(found, [(1, EntryProblem::NoSelectors)]);
    }

    #[test]
    fn bad_toml_and_unknown_keys_give_one_error_with_its_line() {
        let found =
            errors("[[entry]]\nid = \"spiffe://example.org/x\"\nselectors = [\"unix:uid:1\"\n");
        assert_eq!(found.len(), 1);
        assert!(
            matches!(found[0], (3 | 4, EntryProblem::Toml(_))),
            "{found:?}"
        );

        let found =
            errors("[[entry]]\nid = \"spiffe://example.org/x\"\nselector = [\"unix:uid:1\"]\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 3, "{found:?}");
        assert!(
            matches!(&found[0].1, EntryProblem::Toml(m) if m.contains("selector")),
            "{found:?}"
        );

        let found = errors("[[entries]]\nid = \"spiffe://example.org/x\"\n");
        assert_eq!(found[0].0, 1, "{found:?}");
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("2d"), Some(Duration::from_secs(172_800)));
        for bad in ["", "0s", "1", "h", "1x", "-1h"] {
            assert_eq!(parse_ttl(bad), None, "{bad:?}");
        }
    }
}
