//! The identities the kernel enforces now, published to the parts of the
//! agent that prove identity to workloads (the Workload API), so a
//! workload is issued credentials for exactly the identity its connects
//! are judged by.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::state::State;
use crate::identity::SpiffeId;

/// A snapshot of the bindings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityView {
    /// The policy generation this snapshot was taken at.
    pub generation: u32,
    /// Bound cgroup id -> its identity. A revoked identity's cgroups are
    /// left out: nothing may be issued for them.
    pub by_cgroup: BTreeMap<u64, SpiffeId>,
    /// Revoked identities.
    pub revoked: BTreeSet<SpiffeId>,
}

impl IdentityView {
    /// The identity of a bound cgroup, unless revoked.
    pub fn identity_of(&self, cgroup_id: u64) -> Option<&SpiffeId> {
        self.by_cgroup.get(&cgroup_id)
    }

    fn of(state: &State) -> Self {
        let revoked = state.revocations.ids().clone();
        let by_cgroup = state
            .workloads
            .bound()
            .filter(|(_, id)| !revoked.contains(*id))
            .map(|(cg, id)| (cg, id.clone()))
            .collect();
        Self {
            generation: state.applied.generation,
            by_cgroup,
            revoked,
        }
    }
}

/// Publishes a new view when the state's differs from the last one.
pub struct ViewPublisher {
    tx: watch::Sender<IdentityView>,
    /// The workload table's version the last view was taken at.
    seen: AtomicU64,
}

impl ViewPublisher {
    pub fn new(state: &State) -> (Self, watch::Receiver<IdentityView>) {
        let (tx, rx) = watch::channel(IdentityView::of(state));
        let seen = AtomicU64::new(state.workloads.version());
        (Self { tx, seen }, rx)
    }

    /// Call after anything that may have changed bindings or revocations.
    /// Takes a new view only when the bindings, the generation or the
    /// revocations changed: the daemon calls this after every event, and
    /// a view is a copy of every binding.
    pub fn publish(&self, state: &State) {
        let version = state.workloads.version();
        let bindings_seen = self.seen.swap(version, Ordering::Relaxed) == version;
        let rest_seen = {
            let current = self.tx.borrow();
            current.generation == state.applied.generation
                && current.revoked == *state.revocations.ids()
        };
        if bindings_seen && rest_seen {
            return;
        }
        let view = IdentityView::of(state);
        self.tx.send_if_modified(|old| {
            if *old == view {
                false
            } else {
                *old = view;
                true
            }
        });
    }
}
