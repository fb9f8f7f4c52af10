//! What the owner publishes after every change, for the requests that
//! only read: `idgate status`, `policy show` and `explain` are answered
//! from the latest snapshot without waiting for the owner.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::state::State;
use crate::admin::KubeletStatus;
use crate::bpf::Attachment;
use crate::identity::SpiffeId;
use crate::policy::PolicySet;

/// The agent as it stood after the owner's last change.
#[derive(Debug)]
pub struct Snapshot {
    pub started: Instant,
    pub scope_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub policy_path: PathBuf,
    pub programs: Attachment,
    /// The active generation's number (grows with every switch).
    pub generation: u64,
    /// The running policy.
    pub policy: Arc<PolicySet>,
    /// Slots held, by identity.
    pub slots: Arc<HashMap<SpiffeId, u32>>,
    /// Rules of the active generation (the default not counted).
    pub rules: usize,
    pub workloads: usize,
    pub revoked: BTreeSet<SpiffeId>,
    pub reloads: u64,
    pub reload_errors: u64,
    pub pins_restored: u64,
    pub bind_failures: usize,
    pub max_workloads: u32,
    /// The kubelet's list as last fetched, with `[kubernetes]`.
    pub kubernetes: Option<KubeletStatus>,
    /// Whether a new generation is being compiled and written.
    pub writing_generation: bool,
}

impl Snapshot {
    /// `state` as it stands; `writing` says whether a reload or a new
    /// generation is under way off the owner.
    pub fn of(state: &State, writing: bool) -> Self {
        Self {
            started: state.started,
            scope_dir: state.scope_dir.clone(),
            pin_dir: state.config.pin_dir.clone(),
            policy_path: state.config.policy.clone(),
            programs: state.enforcer.attachment.clone(),
            generation: state.applied.generation,
            policy: state.policy.clone(),
            slots: state.applied.slots.clone(),
            // Rule 0 is the default, not a rule.
            rules: state.applied.compiled.rules.len().saturating_sub(1),
            workloads: state.applied.bound.len(),
            revoked: state.revocations.ids().clone(),
            reloads: state.reloads,
            reload_errors: state.reload_errors,
            pins_restored: state.pins_restored,
            bind_failures: state.bind_failures.len(),
            max_workloads: state.config.max_workloads,
            kubernetes: state.kubelet.as_ref().map(|k| k.status(&state.pods)),
            writing_generation: writing,
        }
    }
}
