//! The BPF filesystem that holds idgate's pins.
//!
//! bpffs is not always mounted at boot, and mount(2) never refuses to
//! mount a file system over another: two processes that both find
//! `/sys/fs/bpf` empty and both mount one stack two mounts, and the second
//! hides whatever the first one's user pinned. So idgate processes take
//! turns at that step ([`MOUNT_LOCK`]), look again once it is theirs, and
//! use a mount that another process made meanwhile. A stack made by a
//! program that does not take the lock cannot be prevented, only seen:
//! [`ensure`] reads the mount table afterwards and reports it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::BpfError;

/// Where bpffs is mounted when it is missing.
const BPFFS: &str = "/sys/fs/bpf";

/// The file idgate processes lock (flock(2), exclusive) while they look
/// for bpffs at [`BPFFS`] and mount it. It lies outside bpffs on purpose:
/// a lock file on the file system being mounted would be hidden by the
/// mount. `/run/idgate` is the agent's runtime directory (writable in the
/// systemd unit); only processes that see the same `/run` take turns.
pub const MOUNT_LOCK: &str = "/run/idgate/bpffs.lock";

/// How long a process waits for another one's turn at the mount step,
/// which holds the lock for a statfs and a mount: a holder that takes
/// longer is stuck.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Makes sure `pin_dir` lies on a bpffs, mounting one at `/sys/fs/bpf` when
/// the pin directory is under it and nothing is mounted there yet; then
/// reports (without failing) bpffs mounts stacked at `/sys/fs/bpf`.
pub fn ensure(pin_dir: &Path) -> Result<(), BpfError> {
    let mount_point = Path::new(BPFFS);
    if pin_dir.starts_with(mount_point) {
        if !is_bpffs(mount_point) {
            mount_once(mount_point, Path::new(MOUNT_LOCK))?;
        }
        report_stack(mount_point);
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| BpfError::Io {
        path: pin_dir.to_owned(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(BpfError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    Ok(())
}

/// Mounts bpffs at `mount_point` unless another process has done it while
/// this one waited for `lock`; holds the lock across the look and the
/// mount only.
fn mount_once(mount_point: &Path, lock: &Path) -> Result<(), BpfError> {
    let _turn = MountLock::take(lock)?;
    if is_bpffs(mount_point) {
        tracing::info!(path = %mount_point.display(), "bpffs was mounted by another process meanwhile; using it");
        return Ok(());
    }
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
    .map_err(|source| match source {
        nix::Error::EPERM => BpfError::Privileges {
            what: format!("mounting bpffs at {}", mount_point.display()),
        },
        source => BpfError::Mount {
            path: mount_point.to_owned(),
            source,
        },
    })?;
    tracing::info!(path = %mount_point.display(), "mounted bpffs");
    Ok(())
}

/// An exclusive flock(2) on the lock file, released when dropped (or when
/// the process dies, so a killed holder never leaves it taken).
struct MountLock {
    _held: Flock<File>,
}

impl MountLock {
    fn take(path: &Path) -> Result<Self, BpfError> {
        let io = |source| BpfError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| BpfError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io)?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => return Ok(Self { _held: held }),
                Err((back, nix::Error::EWOULDBLOCK | nix::Error::EINTR)) => {
                    if Instant::now() >= deadline {
                        return Err(BpfError::MountLockBusy {
                            path: path.to_owned(),
                            waited: LOCK_WAIT,
                        });
                    }
                    file = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, errno)) => return Err(io(errno.into())),
            }
        }
    }
}

/// Reads the mount table again and says loudly when more than one bpffs
/// is mounted at `mount_point`: the pins of all but the top one are
/// hidden. The agent goes on (its pins are on the top one, where every
/// other process looks too).
fn report_stack(mount_point: &Path) {
    match stacked_bpffs(mount_point) {
        Ok(n) if n > 1 => tracing::error!(
            path = %mount_point.display(),
            count = n,
            "{n} bpf file systems are mounted on top of each other at {}: only the top one is seen, and the pins in the {} below it (other tools', or an earlier idgate's: their programs stay attached) are hidden from idgate and from everyone else until the mounts above them are unmounted; idgate pins on the top one. Some program mounted bpffs without checking for one first: see `findmnt {}`",
            mount_point.display(),
            n - 1,
            mount_point.display(),
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/self/mountinfo to look for stacked bpffs mounts")
        }
    }
}

/// How many distinct bpf file systems are mounted at `mount_point` in this
/// process's mount namespace. A bind mount of the same file system onto
/// itself (systemd's sandboxing makes them) hides nothing and counts once.
fn stacked_bpffs(mount_point: &Path) -> Result<usize, procfs::ProcError> {
    let mounts = procfs::process::Process::myself()?.mountinfo()?;
    let mut devices: Vec<String> = mounts
        .into_iter()
        .filter(|m| m.fs_type == "bpf" && m.mount_point == mount_point)
        .map(|m| m.majmin)
        .collect();
    devices.sort();
    devices.dedup();
    Ok(devices.len())
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Whether `path`, or where it would be made (its nearest existing
/// ancestor), is on a bpffs. Never mounts anything.
pub fn holds_pins(path: &Path) -> bool {
    path.ancestors().find(|p| p.exists()).is_some_and(is_bpffs)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_lock_is_taken_in_turns_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("idgate-bpffs-lock-{}", std::process::id()));
        let path = dir.join("sub/bpffs.lock");
        let first = MountLock::take(&path).expect("first turn");
        // A second open file description waits for the first (flock locks
        // belong to the open file, so this holds within one process too).
        let waiting = {
            let path = path.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let _second = MountLock::take(&path).expect("second turn");
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(first);
        let waited = waiting.join().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_is_a_bpffs_where_none_is_mounted() {
        let dir = std::env::temp_dir();
        assert!(!holds_pins(&dir.join("no/such/pins")));
        assert_eq!(stacked_bpffs(&dir.join("no-bpffs-here")).unwrap(), 0);
    }
}
