//! Kernel side: loading, pinning, attaching and adopting the programs, and
//! writing the maps.

mod bpffs;
mod grant_map;
mod identity_index;
mod loader;
mod maps;
mod pins;
pub mod ring;
mod syscall;
mod upgrade;

pub use grant_map::{GrantEntryKey, GrantMap};
pub use loader::{Attachment, Enforcer, ExecNotices, Uninstalled, install, uninstall};
pub use maps::{BindingMaps, GenerationMaps, RetiredSets, SlotTable, Written, key_was_missing};
pub use pins::Pins;

/// Errors from the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "{what}: permission denied; idgate needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load and attach its programs"
    )]
    Privileges { what: String },
    #[error(
        "bpffs: {path} is not on a bpffs; mount one (mount -t bpf bpf /sys/fs/bpf) or set `pin_dir` under it"
    )]
    NotBpffs { path: std::path::PathBuf },
    #[error("bpffs: cannot mount bpffs at {path}: {source}")]
    Mount {
        path: std::path::PathBuf,
        source: nix::Error,
    },
    #[error(
        "bpffs: another process has held {path} for over {waited:?} (the lock idgate processes take to look for bpffs and mount it): find it with `fuser -v {path}`"
    )]
    MountLockBusy {
        path: std::path::PathBuf,
        waited: std::time::Duration,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
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
    #[error("link {path}: {what}: {source}")]
    Link {
        path: std::path::PathBuf,
        what: &'static str,
        source: LinkProblem,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: {source}")]
    Unusable {
        name: &'static str,
        source: MapProblem,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("no free identity slot: all {0} are in use")]
    SlotsFull(u32),
}

/// Why a map cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum MapProblem {
    #[error("not an array")]
    NotArray,
    #[error("{entries} entries of {value_size} bytes, not {want} of 8")]
    Shape {
        entries: u32,
        value_size: u32,
        want: usize,
    },
    #[error("mmap: {0}")]
    Mmap(#[source] nix::Error),
}

/// What went wrong with a link or a pin.
#[derive(Debug, thiserror::Error)]
pub enum LinkProblem {
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
    #[error("its program {0} is gone")]
    ProgramGone(u32),
}
