//! Sees cgroups and processes come and go under the scope, so each is
//! attested as it appears: inotify on every cgroup directory of the scope
//! for new and removed cgroups, writes to `cgroup.procs` (a process moved
//! in) and changes of `cgroup.events` (processes all gone); and the exec
//! tracepoint's notices for a process that became another program. Each
//! sends the cgroup to attest; a lost inotify event (queue overflow) sends
//! the scope, which means "attest everything".
//!
//! A cgroup no event has reached yet is simply not bound: the kernel
//! denies it as an unknown workload. The daemon's periodic resync covers
//! what is lost on the way (a full notice ring buffer).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc::UnboundedSender;

use crate::bpf::ExecNotices;
use crate::workloads::Workloads;

/// A cgroup to attest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Found {
    Dir(PathBuf),
    /// By id, from an exec notice.
    Cgroup(u64),
}

/// Reads exec notices until the receiver is dropped or the ring buffer
/// cannot be watched.
pub async fn exec_notices(notices: ExecNotices, tx: UnboundedSender<Found>) -> std::io::Result<()> {
    use idgate_common::ExecNotice;
    // SAFETY: the descriptor is the ring buffer's, owned by `notices`,
    // which the `AsyncFd` owns from now on and never replaces.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(notices, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = &mut guard.get_inner_mut().ring;
        while let Some(item) = ring.next() {
            let Ok(notice) = crate::bpf::ring::read::<ExecNotice>(&item) else {
                continue;
            };
            if tx.send(Found::Cgroup(notice.cgroup_id)).is_err() {
                return Ok(());
            }
        }
        guard.clear_ready();
    }
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ONLYDIR);

/// Watches `scope` until the receiver is dropped or inotify fails.
pub async fn watch(scope: PathBuf, tx: UnboundedSender<Found>) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut watches = inotify.watches();
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    add_tree(&mut watches, &mut dirs, &scope);
    let mut events = inotify.into_event_stream([0u8; 16 * 1024])?;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!("inotify queue overflowed: attesting the whole scope");
            if tx.send(Found::Dir(scope.clone())).is_err() {
                return Ok(());
            }
            continue;
        }
        if event.mask.contains(EventMask::IGNORED) {
            dirs.remove(&event.wd);
            continue;
        }
        let Some(dir) = dirs.get(&event.wd).cloned() else {
            continue;
        };
        let name = event.name.as_deref().unwrap_or(OsStr::new(""));
        let target = if event.mask.contains(EventMask::ISDIR) {
            let child = dir.join(name);
            if event.mask.contains(EventMask::CREATE) {
                // Cgroups made inside it before the watch was added are
                // found by walking it now.
                for sub in add_tree(&mut watches, &mut dirs, &child) {
                    if tx.send(Found::Dir(sub)).is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
            child
        } else if name == "cgroup.procs" || name == "cgroup.events" {
            dir
        } else {
            continue;
        };
        if tx.send(Found::Dir(target)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Watches `top` and every cgroup below it; returns them all.
fn add_tree(
    watches: &mut Watches,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    top: &Path,
) -> Vec<PathBuf> {
    let all = Workloads::scan(top);
    for dir in &all {
        match watches.add(dir, MASK) {
            Ok(wd) => {
                dirs.insert(wd, dir.clone());
            }
            // Removed again already: its deletion event follows.
            Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch cgroup"),
        }
    }
    all
}
