//! The BPF filesystem that holds idgate's pins.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::BpfError;

/// Where bpffs is mounted when it is missing.
const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `pin_dir` lies on a bpffs, mounting one at `/sys/fs/bpf` when
/// the pin directory is under it and nothing is mounted there yet.
pub fn ensure(pin_dir: &Path) -> Result<(), BpfError> {
    let mount_point = Path::new(BPFFS);
    if pin_dir.starts_with(mount_point) && !is_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point).map_err(|source| BpfError::Io {
            path: mount_point.to_owned(),
            source,
        })?;
        mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| match e {
            nix::Error::EPERM => BpfError::Privileges {
                what: format!("mounting bpffs at {BPFFS}"),
            },
            source => BpfError::BpffsMount {
                path: BPFFS,
                source,
            },
        })?;
        tracing::info!(path = BPFFS, "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| BpfError::Io {
        path: pin_dir.to_owned(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(BpfError::NotBpffs(pin_dir.to_owned()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// The name and path of everything pinned in `pin_dir` (names that are not
/// UTF-8 are none of idgate's).
pub fn pins(pin_dir: &Path) -> Result<Vec<(String, PathBuf)>, BpfError> {
    let read = std::fs::read_dir(pin_dir).map_err(|source| BpfError::Io {
        path: pin_dir.to_owned(),
        source,
    })?;
    Ok(read
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect())
}

/// Removes the pin at `path`.
pub fn unpin(path: &Path) -> Result<(), BpfError> {
    std::fs::remove_file(path).map_err(|source| BpfError::Io {
        path: path.to_owned(),
        source,
    })
}
