//! The running agent's state and the operations that change it: start,
//! reload, revoke. Every operation checks its input fully before it
//! touches the kernel, and the kernel switches policy atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use crate::bpf::{self, Enforcer};
use crate::cgroup;
use crate::config::Config;
use crate::identity::SpiffeId;
use crate::policy::{self, CompiledPolicy, PolicySet};

use super::DaemonError;
use super::revocations::Revocations;

/// What one application of policy and bindings put in the kernel.
pub struct Applied {
    /// Slot and SPIFFE ID of every identity that holds a slot: those with a
    /// bound cgroup, and the revoked ones.
    pub identities: Vec<(u32, SpiffeId)>,
    /// Bound cgroup ids and their slots.
    pub bound: BTreeMap<u64, u32>,
    /// The policy generation now active.
    pub generation: u32,
    /// The compiled policy now active.
    pub compiled: CompiledPolicy,
}

/// The running agent.
pub struct State {
    pub config: Config,
    pub scope_dir: PathBuf,
    pub enforcer: Enforcer,
    pub policy: PolicySet,
    pub revocations: Revocations,
    pub applied: Applied,
    pub started: Instant,
    pub reloads: u64,
    pub reload_errors: u64,
}

impl State {
    /// Checks the policy, the revocation file and the privileges, then puts
    /// the programs in place (or adopts them) and applies everything.
    pub fn start(config: Config) -> Result<Self, DaemonError> {
        let policy = policy::load(&config.policy, &config.trust_domains)?;
        let revocations = Revocations::load(&config.state_dir)?;
        crate::privileges::check().map_err(DaemonError::Privileges)?;

        let scope_dir = cgroup::cgroup2_root()?.join(&config.scope);
        cgroup::ensure_dir(&scope_dir)?;
        let mut enforcer = bpf::install(&config.pin_dir, &scope_dir)?;
        tracing::info!(
            scope = %scope_dir.display(),
            pin_dir = %config.pin_dir.display(),
            adopted = ?enforcer.attachment.adopted,
            attached = ?enforcer.attachment.attached,
            "programs in place"
        );
        let applied = apply(&mut enforcer, &config, &scope_dir, &policy, &revocations)?;
        tracing::info!(
            generation = applied.generation,
            identities = applied.identities.len(),
            workloads = applied.bound.len(),
            revoked = revocations.ids().len(),
            mode = ?policy.mode,
            "policy active"
        );
        Ok(Self {
            config,
            scope_dir,
            enforcer,
            policy,
            revocations,
            applied,
            started: Instant::now(),
            reloads: 0,
            reload_errors: 0,
        })
    }

    /// Re-reads the policy path; on any error the running policy stays
    /// exactly as it was and the error is returned as it should be shown.
    pub fn reload(&mut self) -> Result<Reloaded, String> {
        let result = policy::load(&self.config.policy, &self.config.trust_domains)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                let previous = self.applied.generation;
                let applied = apply(
                    &mut self.enforcer,
                    &self.config,
                    &self.scope_dir,
                    &new,
                    &self.revocations,
                )
                .map_err(|e| e.to_string())?;
                let diff = policy::diff(&self.policy, &new);
                self.policy = new;
                self.applied = applied;
                Ok(Reloaded {
                    previous,
                    generation: self.applied.generation,
                    diff,
                })
            });
        match &result {
            Ok(r) => {
                self.reloads += 1;
                tracing::info!(generation = r.generation, diff = %r.diff, "policy reloaded");
            }
            Err(e) => {
                self.reload_errors += 1;
                tracing::error!(error = %e, "policy reload refused; the running policy stays");
            }
        }
        result
    }

    /// Revokes or restores an identity: the file first, then one map
    /// update that denies (or releases) every cgroup bound to it.
    pub fn set_revoked(&mut self, id: &SpiffeId, revoked: bool) -> Result<bool, DaemonError> {
        let changed = self.revocations.set(id, revoked)?;
        let applied = apply(
            &mut self.enforcer,
            &self.config,
            &self.scope_dir,
            &self.policy,
            &self.revocations,
        )?;
        self.applied = applied;
        tracing::warn!(identity = %id, revoked, changed, "revocation changed");
        Ok(changed)
    }

    /// The slot an identity holds now, if any.
    pub fn slot_of(&self, id: &SpiffeId) -> Option<u32> {
        self.applied
            .identities
            .iter()
            .find(|(_, i)| i == id)
            .map(|(s, _)| *s)
    }
}

/// What a successful reload did.
pub struct Reloaded {
    pub previous: u32,
    pub generation: u32,
    pub diff: policy::PolicyDiff,
}

/// Compiles the policy for every identity that needs a slot, switches the
/// kernel to it, marks revoked slots, then brings the bindings in line and
/// frees slots nobody holds. In this order a cgroup never points at a slot
/// without policy, and a freed slot number is never under a binding.
fn apply(
    enforcer: &mut Enforcer,
    config: &Config,
    scope_dir: &std::path::Path,
    policy: &PolicySet,
    revocations: &Revocations,
) -> Result<Applied, DaemonError> {
    let mut wanted: Vec<(u64, SpiffeId)> = Vec::new();
    for (rel, id) in config.bindings() {
        // A statically bound cgroup is the operator's declaration: make it
        // if it is missing, so workloads can be started in it.
        let dir = scope_dir.join(&rel);
        cgroup::ensure_dir(&dir)?;
        wanted.push((cgroup::cgroup_id(&dir)?, id));
    }
    let mut ids: BTreeSet<SpiffeId> = wanted.iter().map(|(_, id)| id.clone()).collect();
    ids.extend(revocations.ids().iter().cloned());
    let slots = enforcer.slots.assign(&ids)?;
    let compiled = policy::compile(policy, &slots);
    let generation = enforcer.maps.apply(&compiled)?;
    for (slot, id) in &slots {
        enforcer.maps.set_revoked(*slot, revocations.contains(id))?;
    }

    let slot_of: BTreeMap<&SpiffeId, u32> = slots.iter().map(|(s, id)| (id, *s)).collect();
    let bound: BTreeMap<u64, u32> = wanted.iter().map(|(cg, id)| (*cg, slot_of[id])).collect();
    for (cg, slot) in &bound {
        enforcer.maps.bind(*cg, *slot)?;
    }
    for cg in enforcer.maps.bindings()?.keys() {
        if !bound.contains_key(cg) {
            enforcer.maps.unbind(*cg)?;
        }
    }
    enforcer
        .slots
        .retain(&slots.iter().map(|(s, _)| *s).collect())?;
    Ok(Applied {
        identities: slots,
        bound,
        generation,
        compiled,
    })
}
