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
}

impl Default for GrantsConfig {
    fn default() -> Self {
        Self {
            max_duration: Duration::from_secs(24 * 3600),
            max_live: 1024,
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
        Ok(())
    }
}
