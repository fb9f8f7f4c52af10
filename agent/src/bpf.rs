//! Kernel side: loading, pinning, attaching and adopting the programs, and
//! writing the maps.

mod bpffs;
mod identity_index;
mod loader;
mod maps;
mod pins;
pub mod ring;
mod syscall;
mod upgrade;

pub use loader::{Attachment, Enforcer, ExecNotices, install, uninstall};
pub use maps::{BindingMaps, GenerationMaps, SlotTable, Written};
pub use pins::Pins;

/// Errors from the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "{what}: permission denied; idgate needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load and attach its programs"
    )]
    Privileges { what: String },
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("link {path}: {message}")]
    Link {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: {message}")]
    Unusable { name: &'static str, message: String },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("no free identity slot: all {0} are in use")]
    SlotsFull(u32),
}
