//! `status`'s warning about workloads that hold credential rules and run
//! processes as uid 0: such a process owns root's files, the secret files
//! the broker reads among them, so the broker cannot keep the secret from
//! it. Found by walking `/proc` when asked, off the runtime's workers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tokio::sync::watch;

use crate::admin::RootWorkload;
use crate::identity::SpiffeId;
use crate::identity_view::IdentityView;

/// What the control socket reads to find them: the bindings the owner
/// publishes, and the cgroup v2 mount.
#[derive(Clone)]
pub struct Bindings {
    pub identities: watch::Receiver<IdentityView>,
    pub root: PathBuf,
}

impl Bindings {
    /// The bound workloads of an identity in `with_credentials` that run
    /// a process as uid 0 (see [`find`]). Walks `/proc`: call off the
    /// runtime's workers.
    pub fn root_workloads(&self, with_credentials: &BTreeSet<SpiffeId>) -> Vec<RootWorkload> {
        let bound = self.identities.borrow().by_cgroup.clone();
        find(&self.root, &bound, with_credentials)
    }
}

/// The bound cgroups (`bound`: cgroup id to identity) whose identity is
/// in `with_credentials` and that hold a process with uid 0 among its
/// real, effective, saved or filesystem uids (any of them gives it root's
/// files, or lets it take them back). `root` is the cgroup v2 mount.
/// Processes that end meanwhile are passed over.
pub fn find(
    root: &Path,
    bound: &BTreeMap<u64, SpiffeId>,
    with_credentials: &BTreeSet<SpiffeId>,
) -> Vec<RootWorkload> {
    if with_credentials.is_empty() {
        return Vec::new();
    }
    let processes = match procfs::process::all_processes() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "status: /proc cannot be read; no uid 0 warning");
            return Vec::new();
        }
    };
    // Each cgroup's id, once per cgroup seen.
    let mut ids: HashMap<String, Option<u64>> = HashMap::new();
    let mut found: BTreeMap<String, RootWorkload> = BTreeMap::new();
    for process in processes.flatten() {
        let Ok(status) = process.status() else {
            continue;
        };
        let uids = [status.ruid, status.euid, status.suid, status.fuid];
        if !uids.contains(&0) {
            continue;
        }
        let Ok(groups) = process.cgroups() else {
            continue;
        };
        let Some(cgroup) = groups.0.into_iter().find(|g| g.hierarchy == 0) else {
            continue;
        };
        let id = *ids.entry(cgroup.pathname.clone()).or_insert_with(|| {
            let dir = root.join(cgroup.pathname.trim_start_matches('/'));
            crate::cgroup::cgroup_id(&dir).ok()
        });
        let Some(identity) = id.and_then(|id| bound.get(&id)) else {
            continue;
        };
        if !with_credentials.contains(identity) {
            continue;
        }
        found
            .entry(cgroup.pathname.clone())
            .or_insert_with(|| RootWorkload {
                cgroup: cgroup.pathname,
                identity: identity.clone(),
                pids: Vec::new(),
            })
            .pids
            .push(process.pid() as u32);
    }
    found.into_values().collect()
}
