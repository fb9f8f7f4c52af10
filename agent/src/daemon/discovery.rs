//! Sees cgroups and processes come and go under the scope, so each is
//! attested as it appears: inotify on every cgroup directory of the scope
//! for new and removed cgroups, writes to `cgroup.procs` (a process moved
//! in) and changes of `cgroup.events` (processes all gone). Each event
//! sends the cgroup directory to attest; a lost event (queue overflow)
//! sends the scope, which means "attest everything".
//!
//! A cgroup no event has reached yet is simply not bound: the kernel
//! denies it as an unknown workload. The periodic resync in the daemon
//! covers what inotify does not show (an `exec` inside a cgroup).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc::UnboundedSender;

use super::workloads::Workloads;

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ONLYDIR);

/// Watches `scope` until the receiver is dropped or inotify fails.
pub async fn watch(scope: PathBuf, tx: UnboundedSender<PathBuf>) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut watches = inotify.watches();
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    add_tree(&mut watches, &mut dirs, &scope);
    let mut events = inotify.into_event_stream([0u8; 16 * 1024])?;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!("inotify queue overflowed: attesting the whole scope");
            if tx.send(scope.clone()).is_err() {
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
                    if tx.send(sub).is_err() {
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
        if tx.send(target).is_err() {
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
