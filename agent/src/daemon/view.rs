//! The identities the kernel enforces now, published to the parts of the
//! agent that prove identity to workloads (the Workload API), so a
//! workload is issued credentials for exactly the identity its connects
//! are judged by.

use std::collections::{BTreeSet, HashMap};

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
    pub by_cgroup: HashMap<u64, SpiffeId>,
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
pub struct ViewPublisher(watch::Sender<IdentityView>);

impl ViewPublisher {
    pub fn new(state: &State) -> (Self, watch::Receiver<IdentityView>) {
        let (tx, rx) = watch::channel(IdentityView::of(state));
        (Self(tx), rx)
    }

    /// Call after anything that may have changed bindings or revocations.
    pub fn publish(&self, state: &State) {
        let view = IdentityView::of(state);
        self.0.send_if_modified(|old| {
            if *old == view {
                false
            } else {
                *old = view;
                true
            }
        });
    }
}
