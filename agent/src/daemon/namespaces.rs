//! Keeps the DNS path's listeners in every network namespace that holds
//! processes of the scope: a namespace appears with its first workload
//! and is left when its last one goes.
//!
//! A look at the scope reads one process of every cgroup (about 16 ms of
//! CPU per 1,000 cgroups here), so it is made when something in the scope
//! changed (the owner's discovery: a cgroup made, processes moved, an
//! exec), at most every [`GAP`], and else every [`BACKSTOP`] for a
//! process that entered a namespace of its own without any of those.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::dns::{DnsPath, Handover};

/// The least time between two looks at the scope.
const GAP: Duration = Duration::from_millis(200);
/// The most time between two looks at the scope.
const BACKSTOP: Duration = Duration::from_secs(10);

/// Asks the watch to look at the scope again (soon; asks coalesce).
#[derive(Clone, Default)]
pub struct Rescan(Arc<Notify>);

impl Rescan {
    pub fn ask(&self) {
        self.0.notify_one();
    }
}

/// Runs for as long as the agent does, or until asked for the DNS path's
/// sockets (for a restart): then hands them over and ends.
pub async fn watch(
    mut dns: DnsPath,
    scope: PathBuf,
    rescan: Rescan,
    mut hand_over: mpsc::Receiver<oneshot::Sender<Handover>>,
) {
    let Ok(own) = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()) else {
        tracing::error!(
            "cannot read the agent's own network namespace: DNS listeners stay in it alone"
        );
        return;
    };
    // The first look is at once; each later one waits to be asked (or
    // for the backstop), and keeps the gap after the one before.
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        if let Some(last) = last {
            let asked = async {
                tokio::select! {
                    _ = rescan.0.notified() => {}
                    _ = tokio::time::sleep_until(last + BACKSTOP) => {}
                }
                tokio::time::sleep_until(last + GAP).await;
            };
            tokio::select! {
                () = asked => {}
                Some(reply) = hand_over.recv() => {
                    let _ = reply.send(dns.hand_over().await);
                    return;
                }
            }
        }
        last = Some(tokio::time::Instant::now());
        let scope = scope.clone();
        let synced = tokio::task::spawn_blocking(move || {
            let wanted = namespaces(&scope, own);
            dns.sync_namespaces(own, wanted);
            dns
        })
        .await;
        match synced {
            Ok(d) => dns = d,
            Err(_) => {
                tracing::error!("the DNS namespace watch stopped");
                return;
            }
        }
    }
}

/// The network namespaces of the scope's processes other than `own`, by
/// inode, each with an open handle: one process of each cgroup is looked
/// at (the processes of a cgroup share one namespace in every runtime
/// that makes one per container or pod).
fn namespaces(scope: &Path, own: u64) -> HashMap<u64, OwnedFd> {
    let mut found = HashMap::new();
    let mut dirs = vec![scope.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs"))
            && let Some(pid) = procs.lines().next()
        {
            let ns = format!("/proc/{pid}/ns/net");
            if let Ok(meta) = std::fs::metadata(&ns)
                && meta.ino() != own
                && !found.contains_key(&meta.ino())
                && let Ok(file) = std::fs::File::open(&ns)
            {
                found.insert(meta.ino(), OwnedFd::from(file));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}
