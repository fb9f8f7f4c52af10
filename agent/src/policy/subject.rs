//! Whom an identity block applies to: one SPIFFE ID, or every ID under a
//! path (`spiffe://example.org/agents/*`).

use std::fmt;
use std::str::FromStr;

use crate::identity::SpiffeId;

/// The `id` of an identity block.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Every ID whose path lies under this ID's path (not the ID itself):
    /// `spiffe://td/a/*` matches `spiffe://td/a/b` and `spiffe://td/a/b/c`.
    Pattern(SpiffeId),
}

/// How specific a block is, for the identities it applies to: a pattern
/// by the number of segments before its `/*`, and an exact ID above every
/// pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Specificity {
    Pattern(usize),
    Exact,
}

impl Subject {
    pub fn trust_domain(&self) -> &str {
        match self {
            Self::Exact(id) | Self::Pattern(id) => id.trust_domain(),
        }
    }

    pub fn specificity(&self) -> Specificity {
        match self {
            Self::Exact(_) => Specificity::Exact,
            Self::Pattern(base) => Specificity::Pattern(base.path().matches('/').count()),
        }
    }
}

/// The bases of every pattern that matches `id` (the ID itself and each
/// of its ancestors, cut at each `/` of its path), shortest first:
/// `spiffe://td/a/b` is matched by `spiffe://td/*` and `spiffe://td/a/*`.
pub fn pattern_bases(id: &SpiffeId) -> impl Iterator<Item = &str> {
    let whole = id.as_str();
    let path_at = whole.len() - id.path().len();
    id.path()
        .match_indices('/')
        .map(move |(i, _)| &whole[..path_at + i])
}

/// Why an `id` is neither a SPIFFE ID nor a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error(
        "`*` may only end a pattern, as the whole last segment (like spiffe://example.org/agents/*)"
    )]
    Wildcard,
    #[error(transparent)]
    Id(#[from] crate::identity::SpiffeIdError),
}

impl FromStr for Subject {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_suffix("/*") {
            Some(base) if !base.contains('*') && base.contains("://") => {
                Ok(Self::Pattern(base.parse()?))
            }
            _ if s.contains('*') => Err(SubjectError::Wildcard),
            _ => Ok(Self::Exact(s.parse()?)),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Pattern(base) => write!(f, "{base}/*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ids_and_patterns() {
        let exact: Subject = "spiffe://example.org/web".parse().unwrap();
        assert_eq!(exact, Subject::Exact(id("spiffe://example.org/web")));
        assert_eq!(exact.specificity(), Specificity::Exact);
        let p: Subject = "spiffe://example.org/ai-agent/*".parse().unwrap();
        assert_eq!(p, Subject::Pattern(id("spiffe://example.org/ai-agent")));
        assert_eq!(p.to_string(), "spiffe://example.org/ai-agent/*");
        assert_eq!(p.specificity(), Specificity::Pattern(1));
        let all: Subject = "spiffe://example.org/*".parse().unwrap();
        assert_eq!(all.specificity(), Specificity::Pattern(0));
        assert!(all.specificity() < p.specificity());
        assert!(p.specificity() < exact.specificity());
        assert_eq!(all.trust_domain(), "example.org");
    }

    #[test]
    fn rejects_misplaced_wildcards_and_bad_ids() {
        for s in [
            "spiffe://example.org/a*",
            "spiffe://example.org/*/b",
            "spiffe://example.org/a/**",
            "spiffe://*",
        ] {
            assert_eq!(s.parse::<Subject>(), Err(SubjectError::Wildcard), "{s}");
        }
        for s in ["spiffe://Example.org/a/*", "spiffe://example.org//*", "web"] {
            assert!(
                matches!(s.parse::<Subject>(), Err(SubjectError::Id(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn pattern_bases_are_the_strict_ancestors() {
        let deep = id("spiffe://td/a/b/c");
        let bases: Vec<&str> = pattern_bases(&deep).collect();
        assert_eq!(bases, ["spiffe://td", "spiffe://td/a", "spiffe://td/a/b"]);
        assert_eq!(pattern_bases(&id("spiffe://td")).count(), 0);
    }
}
