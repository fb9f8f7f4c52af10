//! The identities the kernel enforces now, as the daemon publishes them to
//! the parts of the agent that prove identity to workloads (the Workload
//! API), so a workload is issued credentials for exactly the identity its
//! connects are judged by.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::revocations::Revocations;
use crate::workloads::Workloads;

/// A snapshot of the bindings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityView {
    /// The policy generation this snapshot was taken at.
    pub generation: u64,
    /// Bound cgroup id -> its identity. A revoked identity's cgroups are
    /// left out: nothing may be issued for them. Shared by the views of
    /// generations between which no binding changed.
    pub by_cgroup: Arc<BTreeMap<u64, SpiffeId>>,
    /// Revoked identities.
    pub revoked: BTreeSet<SpiffeId>,
}

impl IdentityView {
    /// The view of `workloads` and `revocations` at `generation`, of the
    /// cgroups whose binding the kernel holds (`in_kernel`): one attested
    /// but not bound yet (waiting for its identity's generation, or a full
    /// map) is denied every connect, and is issued nothing either.
    pub fn new(
        workloads: &Workloads,
        revocations: &Revocations,
        in_kernel: &BTreeMap<u64, u32>,
        generation: u64,
    ) -> Self {
        let revoked = revocations.ids().clone();
        let by_cgroup = workloads
            .bound()
            .filter(|(cg, id)| in_kernel.contains_key(cg) && !revoked.contains(*id))
            .map(|(cg, id)| (cg, id.clone()))
            .collect();
        Self {
            generation,
            by_cgroup: Arc::new(by_cgroup),
            revoked,
        }
    }

    /// The same bindings and revocations, at `generation`.
    pub fn at_generation(&self, generation: u64) -> Self {
        Self {
            generation,
            ..self.clone()
        }
    }

    /// The identity of a bound cgroup, unless revoked.
    pub fn identity_of(&self, cgroup_id: u64) -> Option<&SpiffeId> {
        self.by_cgroup.get(&cgroup_id)
    }
}
