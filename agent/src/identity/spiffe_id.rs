//! SPIFFE IDs, parsed strictly per the SPIFFE ID specification.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// The spec's limit on a whole SPIFFE ID, in bytes.
const MAX_ID_LEN: usize = 2048;
/// The spec's limit on a trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID starts with \"spiffe://\" (lowercase)")]
    Scheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error(
        "trust domain character {0:?} is not allowed (only a-z, 0-9, '.', '-', '_'; lowercase)"
    )]
    TrustDomainChar(char),
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "path segment {0:?} is not allowed (no empty, \".\" or \"..\" segments, no trailing '/')"
    )]
    Segment(String),
    #[error(
        "path character {0:?} is not allowed (only a-z, A-Z, 0-9, '.', '-', '_'; no query or fragment)"
    )]
    PathChar(char),
    #[error("a SPIFFE ID is at most {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A valid SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Shared: an identity is cloned into every table that names it.
    id: std::sync::Arc<str>,
    /// Where the path starts in `id`.
    path_at: usize,
}

impl SpiffeId {
    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if let Some(c) = td
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::TrustDomainChar(c));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(SpiffeIdError::Segment(segment.to_owned()));
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
                {
                    return Err(SpiffeIdError::PathChar(c));
                }
            }
        }
        Ok(Self {
            id: s.into(),
            path_at: SCHEME.len() + td_len,
        })
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("identity {s:?}: {e}")))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/web",
            "spiffe://a-b_c.9/ns/Prod/sa/x.y-z_1",
        ] {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id: SpiffeId = "spiffe://example.org/a/b".parse().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn invalid_ids() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
        let cases: [(&str, SpiffeIdError); 14] = [
            ("http://example.org/x", Scheme),
            ("SPIFFE://example.org/x", Scheme),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe:///x", EmptyTrustDomain),
            ("spiffe://Example.org/x", TrustDomainChar('E')),
            ("spiffe://user@example.org", TrustDomainChar('@')),
            ("spiffe://example.org:8080/x", TrustDomainChar(':')),
            ("spiffe://example.org/", Segment(String::new())),
            ("spiffe://example.org/a//b", Segment(String::new())),
            ("spiffe://example.org/a/./b", Segment(".".into())),
            ("spiffe://example.org/a/..", Segment("..".into())),
            ("spiffe://example.org/a?x=1", PathChar('?')),
            ("spiffe://example.org/a#f", PathChar('#')),
            ("spiffe://example.org/a%20b", PathChar('%')),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<SpiffeId>(), Err(want), "{s}");
        }
        assert_eq!(long_td.parse::<SpiffeId>(), Err(TrustDomainTooLong));
        assert_eq!(long_id.parse::<SpiffeId>(), Err(TooLong));
    }
}
