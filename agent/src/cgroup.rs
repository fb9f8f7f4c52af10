//! The cgroup v2 hierarchy: where it is mounted and how its directories map
//! to the ids the kernel programs see.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors finding or reading cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[from] procfs::ProcError),
    #[error(
        "no cgroup v2 hierarchy is mounted: idgate needs cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup)"
    )]
    NoCgroup2,
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The mount point of the cgroup v2 hierarchy, from the kernel's mount
/// table (never assumed: hybrid hosts mount it at `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let mounts = procfs::process::Process::myself()?.mountinfo()?;
    mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .ok_or(CgroupError::NoCgroup2)
}

/// The id that `bpf_get_current_cgroup_id`/`bpf_sk_cgroup_id` return for a
/// cgroup v2 directory: its kernfs inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Creates a cgroup directory (and its parents) if it is missing.
pub fn ensure_dir(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir).map_err(|source| CgroupError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Moves a process (all its threads) into a cgroup.
pub fn move_process(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Io {
        path: procs,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_and_its_root_id() {
        let Ok(root) = cgroup2_root() else {
            crate::testing::cannot_run("this kernel has no cgroup v2 mount");
            return;
        };
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
        // The root cgroup's id is 1 on every kernel with cgroup ids.
        assert_eq!(cgroup_id(&root).unwrap(), 1);
    }
}
