//! Decision events: the kernel's decision records, read from the pinned
//! ring buffer, named (identity, rule, executable) and written as JSON lines
//! to the audit log and, when asked, to standard output. The schema is in
//! `docs/events.md`.
//!
//! The audit log is opened before anything is put in the kernel, so a path
//! that cannot be written stops the agent at start. A write that fails later
//! (a full disk) is logged and counted; enforcement does not depend on it.

mod audit_log;
mod feed;
mod kernel;
mod lost;
mod metrics;
mod names;
mod reader;
mod record;
mod sinks;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use audit_log::{AuditLog, files as audit_log_files};
pub use feed::{EventFeed, Line, RECENT as RECENT_EVENTS};
pub use kernel::EventMaps;
pub use lost::{LostRecord, LostSource};
pub use metrics::EventMetrics;
pub use names::Names;
pub use reader::Feeds;
pub use record::{AnsweredAddress, DnsDetail, Event, HttpDetail, SCHEMA_VERSION};
pub use sinks::Sinks;

/// What the kernel did with a connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// A verdict that is neither `allow` nor `deny`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("verdict {0:?} is not allow or deny")]
pub struct UnknownVerdict(pub String);

impl std::str::FromStr for Verdict {
    type Err = UnknownVerdict;

    fn from_str(s: &str) -> Result<Self, UnknownVerdict> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(UnknownVerdict(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors in `[events]`, and errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("audit log {path}: {source}")]
    AuditLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("watching the events ring buffer: {0}")]
    Watch(std::io::Error),
    #[error("`events.allow_sample_rate` must be between 0 and 1, got {0}")]
    SampleRate(f64),
    #[error("`events.audit_log_max_bytes` must be above 0")]
    AuditLogMaxBytes,
}

/// `[events]` in the agent configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// The JSON-lines audit log. Relative to the configuration file's
    /// directory. Default: none (no file).
    pub audit_log: Option<PathBuf>,
    /// The audit log is rotated before it would grow past this many bytes.
    /// Default 100 MiB.
    pub audit_log_max_bytes: u64,
    /// Rotated files kept (`audit.log.1` is the newest). Default 5.
    pub audit_log_keep: u32,
    /// Also write every event to standard output. Default false.
    pub stdout: bool,
    /// Fraction of allowed connects that are recorded: 0 none, 1 every one.
    /// Denied and audit-allowed connects are always recorded. Default 0.
    pub allow_sample_rate: f64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            audit_log: None,
            audit_log_max_bytes: 100 * 1024 * 1024,
            audit_log_keep: 5,
            stdout: false,
            allow_sample_rate: 0.0,
        }
    }
}

impl EventsConfig {
    /// Takes a relative audit log path relative to `base`.
    pub fn resolve(&mut self, base: &Path) {
        if let Some(p) = &mut self.audit_log
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }

    /// Checks the values serde cannot.
    pub fn check(&self) -> Result<(), EventsError> {
        if !(0.0..=1.0).contains(&self.allow_sample_rate) {
            return Err(EventsError::SampleRate(self.allow_sample_rate));
        }
        if self.audit_log_max_bytes == 0 {
            return Err(EventsError::AuditLogMaxBytes);
        }
        Ok(())
    }
}

/// Opens where events go. Call before anything is put in the kernel: an
/// audit log that cannot be written is an error here.
pub fn open_sinks(config: &EventsConfig) -> Result<Sinks, EventsError> {
    let audit_log = config
        .audit_log
        .as_ref()
        .map(|path| {
            AuditLog::open(path, config.audit_log_max_bytes, config.audit_log_keep).map_err(
                |source| EventsError::AuditLog {
                    path: path.clone(),
                    source,
                },
            )
        })
        .transpose()?;
    Ok(Sinks::new(audit_log, config.stdout))
}

/// Opens the pinned event maps, writes the sampling rate, and starts the
/// task that reads the ring buffer (the backlog first) for as long as the
/// runtime runs.
pub fn start(
    pin_dir: &Path,
    config: &EventsConfig,
    sinks: Sinks,
    names: Arc<Names>,
    metrics: EventMetrics,
    feeds: Feeds,
) -> Result<(), EventsError> {
    let mut maps = EventMaps::open(pin_dir)?;
    maps.set_allow_sample_rate(config.allow_sample_rate)?;
    reader::spawn(maps, sinks, names, metrics, feeds)
}
