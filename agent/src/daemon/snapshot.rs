//! What the owner publishes after every change, for the requests that
//! only read: `idgate status`, `policy show` and `explain` are answered
//! from the latest snapshot without waiting for the owner. Also the
//! owner's view of its workload table for `idgate workloads`, which is
//! too large to publish after every change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::state::State;
use crate::admin::{Status, WorkloadRow, WorkloadsList};
use crate::grants::Slots;
use crate::policy::PolicySet;

/// The agent as it stood after the owner's last change.
#[derive(Debug)]
pub struct Snapshot {
    pub started: Instant,
    /// `status`'s answer as of this snapshot, but for its uptime, which is
    /// filled in when asked.
    pub status: Status,
    pub policy_path: PathBuf,
    /// The running policy.
    pub policy: Arc<PolicySet>,
    /// Slots held, by identity.
    pub slots: Arc<Slots>,
}

impl Snapshot {
    /// `state` as it stands; `writing` says whether a reload or a new
    /// generation is under way off the owner.
    pub fn of(state: &State, writing: bool) -> Self {
        let status = Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: 0,
            scope: state.scope_dir.clone(),
            pin_dir: state.config.pin_dir.clone(),
            programs: (&state.enforcer.attachment).into(),
            generation: state.applied.generation,
            reloading: writing,
            mode: state.policy.mode,
            identities: state.applied.slots.len(),
            // Rule 0 is the default, not a rule.
            rules: state.applied.compiled.rules.len().saturating_sub(1),
            workloads: state.applied.bound.len(),
            revoked: state.revocations.ids().iter().cloned().collect(),
            grants: state.grants.live(),
            reloads: state.reloads,
            reload_errors: state.reload_errors,
            pins_restored: state.pins_restored,
            bind_failures: state.bind_failures.len(),
            max_workloads: state.config.max_workloads,
            kubernetes: state.kubelet.as_ref().map(|k| k.status(&state.pods)),
            // Filled in when asked, from the DNS path itself.
            dns: None,
            // Filled in when asked, from /proc.
            root_workloads: Vec::new(),
        };
        Self {
            started: state.started,
            status,
            policy_path: state.config.policy.clone(),
            policy: state.policy.clone(),
            slots: state.applied.slots.clone(),
        }
    }
}

/// `idgate workloads`, built by the owner from its table.
pub fn workloads(state: &State) -> WorkloadsList {
    WorkloadsList {
        scope: state.scope_dir.clone(),
        workloads: state
            .workloads
            .iter()
            .map(|w| WorkloadRow {
                path: w.path.clone(),
                cgroup_id: w.cgroup_id,
                binding: w.binding.clone(),
                pids: w.pids.clone(),
                since: w.since,
                // Attested but not taken by the kernel (map full, or
                // waiting for its identity's generation): denied.
                enforced: w.binding.bound_id().is_none()
                    || state.applied.bound.contains_key(&w.cgroup_id),
            })
            .collect(),
        kubernetes: match &state.kubelet {
            Some(k) => k.summary(&state.pods),
            None => "no kubelet configured: k8s selectors match nothing".into(),
        },
    }
}
