//! Egress policy: the files operators write, their checks, and their
//! compilation to the entries of the kernel's policy maps.

mod compile;
mod model;
mod ports;

pub use compile::{CompiledPolicy, DestEntry, PortEntry, RuleInfo, compile, evaluate};
pub use model::{Action, Mode, PolicySet, Protocol, load};

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
