//! Egress policy: the files operators write, their checks, and their
//! compilation to the entries of the kernel's policy maps.

mod compile;
mod diff;
mod model;
mod ports;
mod summary;

pub use compile::{CompiledPolicy, DestEntry, PortEntry, RuleInfo, compile, evaluate};
pub use diff::{PolicyDiff, diff};
pub use model::{Action, Mode, PolicySet, Protocol, load};
pub use summary::{describe_rule, summary};

/// Errors reading or checking policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}
