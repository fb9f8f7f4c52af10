//! `[grants]`: the bounds on operators' grants.

use std::time::Duration;

use idgate_common::MAX_GRANT_ENTRIES;
use serde::Deserialize;

/// A `[grants]` value out of bounds.
#[derive(Debug, thiserror::Error)]
pub enum GrantsConfigError {
    #[error("[grants] max_duration must be more than zero")]
    MaxDuration,
    #[error("[grants] max_live must be between 1 and {MAX_GRANT_ENTRIES}, got {0}")]
    MaxLive(u32),
    #[error("[[grants.granters]] number {0} names no uid and no gid")]
    GranterNobody(usize),
    #[error(
        "[[grants.granters]] number {index}: max_duration must be more than zero and at most [grants] max_duration ({})",
        humantime::format_duration(*.most)
    )]
    GranterDuration { index: usize, most: Duration },
}

/// `[[grants.granters]]`: callers of the control socket who may grant, and
/// do nothing else, each grant at most `max_duration` long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Granter {
    /// Callers with one of these uids.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Callers with one of these as their group or a supplementary one.
    #[serde(default)]
    pub gids: Vec<u32>,
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub max_duration: Duration,
}

/// `[grants]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantsConfig {
    /// The longest a grant (or an extension, from the time it is made)
    /// may run. Default 24h.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub max_duration: Duration,
    /// Grants that may run at once, all identities together. Default
    /// 1024.
    pub max_live: u32,
    /// Who may grant besides operators, and for how long at most.
    pub granters: Vec<Granter>,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        Self {
            max_duration: Duration::from_secs(24 * 3600),
            max_live: 1024,
            granters: Vec::new(),
        }
    }
}

impl GrantsConfig {
    pub fn check(&self) -> Result<(), GrantsConfigError> {
        if self.max_duration.is_zero() {
            return Err(GrantsConfigError::MaxDuration);
        }
        if !(1..=MAX_GRANT_ENTRIES).contains(&self.max_live) {
            return Err(GrantsConfigError::MaxLive(self.max_live));
        }
        for (i, g) in self.granters.iter().enumerate() {
            let index = i + 1;
            if g.uids.is_empty() && g.gids.is_empty() {
                return Err(GrantsConfigError::GranterNobody(index));
            }
            if g.max_duration.is_zero() || g.max_duration > self.max_duration {
                return Err(GrantsConfigError::GranterDuration {
                    index,
                    most: self.max_duration,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<GrantsConfig, String> {
        let c: GrantsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn granters_name_someone_and_stay_within_the_longest_grant() {
        let c =
            check("max_duration = \"2h\"\n[[granters]]\nuids = [1001]\nmax_duration = \"15m\"\n")
                .unwrap();
        assert_eq!(c.granters[0].max_duration, Duration::from_secs(900));
        let e = check("[[granters]]\nmax_duration = \"15m\"\n").unwrap_err();
        assert!(e.contains("number 1 names no uid and no gid"), "{e}");
        let e = check("max_duration = \"1h\"\n[[granters]]\ngids = [7]\nmax_duration = \"2h\"\n")
            .unwrap_err();
        assert!(
            e.contains("number 1: max_duration") && e.contains("(1h)"),
            "{e}"
        );
        let e =
            check("[[granters]]\nuids = [1]\nmax_duration = \"1h\"\nroot = true\n").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }
}
