//! The running agent's state and the operations that change it: start,
//! attestation, reload, revocation, `run`. Every operation checks its
//! input in full before it touches the kernel, and policy switches in the
//! kernel atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use idgate_common::MAX_SLOTS;

use crate::bpf::{self, Enforcer};
use crate::cgroup;
use crate::config::Config;
use crate::identity::{self, EntrySet, SpiffeId, k8s::Pods};
use crate::policy::{self, CompiledPolicy, PolicySet};

use super::DaemonError;
use super::discovery::Found;
use super::kubelet::{KubeletState, Outcome};
use super::revocations::Revocations;
use super::workloads::{RUN_PREFIX, Workloads};

/// What the kernel holds now.
pub struct Applied {
    /// Slot and SPIFFE ID of every identity that holds a slot: those with a
    /// bound cgroup, the revoked ones, and those the entries can give.
    pub identities: Vec<(u32, SpiffeId)>,
    /// The same, by identity.
    pub slots: HashMap<SpiffeId, u32>,
    /// Bound cgroup ids and their slots (the identities map, mirrored).
    pub bound: BTreeMap<u64, u32>,
    /// The policy generation now active.
    pub generation: u32,
    /// Policies this agent has applied so far: tells one content of a
    /// generation from the next.
    pub applies: u64,
    /// The compiled policy now active.
    pub compiled: CompiledPolicy,
}

/// The running agent.
pub struct State {
    pub config: Config,
    pub root: PathBuf,
    pub scope_dir: PathBuf,
    pub enforcer: Enforcer,
    pub policy: PolicySet,
    pub entries: EntrySet,
    /// The kubelet's pods (empty off Kubernetes, and while the kubelet
    /// cannot be reached).
    pub pods: Pods,
    /// The kubelet's list as fetched, when `[kubernetes]` is configured.
    pub kubelet: Option<KubeletState>,
    pub workloads: Workloads,
    pub revocations: Revocations,
    pub applied: Applied,
    pub started: Instant,
    pub reloads: u64,
    pub reload_errors: u64,
    /// Pins found removed by hand, and put back.
    pub pins_restored: u64,
    /// Attestation work done so far.
    pub attestation: AttestationStats,
    /// Cgroups attested to an identity that the kernel map could not take
    /// (full): denied, and reported here.
    pub bind_failures: BTreeMap<u64, String>,
    /// Whether the next [`State::sync`] must go over every cgroup: at
    /// start, and after a sync that failed part way.
    sync_all: bool,
    /// The pass over the scope under way (periodic, or asked for by an
    /// event): cgroup directories still to attest (those below them are
    /// found as each is read).
    resync_queue: VecDeque<PathBuf>,
    runs: u64,
}

impl State {
    /// Checks the policy, the entries, the revocation file and the
    /// privileges, then puts the programs in place (or adopts them),
    /// attests every cgroup of the scope (with the kubelet's first pod
    /// list, on Kubernetes) and applies everything.
    pub fn start(
        config: Config,
        kubelet: Option<(KubeletState, Outcome)>,
    ) -> Result<Self, DaemonError> {
        let policy = policy::load(&config.policy, &config.trust_domains)?;
        let entries = load_entries(&config)?;
        let revocations = Revocations::load(&config.state_dir)?;
        crate::privileges::check().map_err(DaemonError::Privileges)?;

        let root = cgroup::cgroup2_root()?;
        let scope_dir = root.join(&config.scope);
        cgroup::ensure_dir(&scope_dir)?;
        // Cgroups the configuration declares are made, so workloads can be
        // started in them.
        for w in &config.workloads {
            cgroup::ensure_dir(&scope_dir.join(&w.cgroup))?;
        }
        let level = config.scope.components().count() as u32;
        let enforcer = bpf::install(&config.pin_dir, &scope_dir, level, config.max_workloads)?;
        tracing::info!(
            scope = %scope_dir.display(),
            pin_dir = %config.pin_dir.display(),
            adopted = ?enforcer.attachment.adopted,
            replaced = ?enforcer.attachment.replaced,
            attached = ?enforcer.attachment.attached,
            "programs in place"
        );
        let bound = enforcer.maps.bindings()?;
        let (kubelet, pods) = match kubelet {
            Some((mut k, first)) => {
                let pods = k.record(first);
                (Some(k), pods)
            }
            None => (None, Pods::default()),
        };
        let mut state = Self {
            workloads: Workloads::new(root.clone()),
            config,
            root,
            scope_dir,
            enforcer,
            policy,
            entries,
            pods,
            kubelet,
            revocations,
            applied: Applied {
                identities: Vec::new(),
                slots: HashMap::new(),
                bound,
                generation: 0,
                applies: 0,
                compiled: CompiledPolicy::default(),
            },
            started: Instant::now(),
            reloads: 0,
            reload_errors: 0,
            pins_restored: 0,
            attestation: AttestationStats::default(),
            bind_failures: BTreeMap::new(),
            sync_all: true,
            resync_queue: VecDeque::new(),
            runs: 0,
        };
        state.attest_all();
        state.sync(true)?;
        release_free_memory();
        tracing::info!(
            generation = state.applied.generation,
            identities = state.applied.identities.len(),
            workloads = state.applied.bound.len(),
            revoked = state.revocations.ids().len(),
            mode = ?state.policy.mode,
            "policy active"
        );
        Ok(state)
    }

    /// Attests the cgroups found and brings the kernel in line. The scope
    /// itself means all of them: that starts a pass over the scope, made
    /// by [`State::resync_step`].
    pub fn attest(&mut self, found: &BTreeSet<Found>) -> Result<(), DaemonError> {
        let mut dirs = BTreeSet::new();
        let mut unlisted = Vec::new();
        let mut whole_scope = false;
        for f in found {
            match f {
                Found::Dir(dir) if *dir == self.scope_dir => whole_scope = true,
                Found::Dir(dir) => {
                    dirs.insert(dir.clone());
                }
                Found::Cgroup(id) => match self.workloads.dir_of(*id) {
                    Some(dir) => {
                        dirs.insert(dir.to_owned());
                    }
                    None => unlisted.push(*id),
                },
            }
        }
        self.attest_dirs(&dirs);
        // A cgroup made and exec'd into before its inotify event was
        // handled is usually listed now, by that event in the same batch;
        // if not, a pass over the scope finds it.
        if whole_scope
            || unlisted
                .iter()
                .any(|id| self.workloads.dir_of(*id).is_none())
        {
            self.start_pass();
        }
        self.remove_finished_runs();
        self.sync(false)
    }

    /// Starts the periodic pass: puts back pins removed by hand, expires
    /// bindings, forgets removed cgroups, and queues the whole scope for
    /// [`State::resync_step`].
    pub fn resync(&mut self) -> Result<(), DaemonError> {
        let restored = self.enforcer.pins.restore()?;
        if !restored.is_empty() {
            tracing::error!(
                ?restored,
                "pins were removed by hand; put back (use `idgate uninstall` to remove idgate)"
            );
            self.pins_restored += restored.len() as u64;
        }
        self.workloads.expire(SystemTime::now());
        self.start_pass();
        self.sync(false)
    }

    /// Forgets removed cgroups and queues the whole scope for
    /// [`State::resync_step`] (from the start, if a pass was under way).
    fn start_pass(&mut self) {
        self.workloads.prune();
        self.resync_queue = VecDeque::from([self.scope_dir.clone()]);
    }

    /// Whether a pass over the scope has cgroups left to attest.
    pub fn resyncing(&self) -> bool {
        !self.resync_queue.is_empty()
    }

    /// Attests the next few cgroups of the pass over the scope and brings the
    /// kernel in line. A pass over a large scope takes many steps, so the
    /// daemon handles events in between and a new workload does not wait
    /// for the whole scope.
    pub fn resync_step(&mut self) -> Result<(), DaemonError> {
        let mut dirs = BTreeSet::new();
        while dirs.len() < RESYNC_STEP
            && let Some(dir) = self.resync_queue.pop_front()
        {
            self.resync_queue.extend(Workloads::children(&dir));
            dirs.insert(dir);
        }
        self.attest_dirs(&dirs);
        self.remove_finished_runs();
        self.sync(false)
    }

    /// Takes a kubelet fetch's outcome (a failure empties the pod list)
    /// and re-attests everything with it.
    pub fn kubelet_fetched(&mut self, outcome: Outcome) -> Result<(), DaemonError> {
        let Some(kubelet) = &mut self.kubelet else {
            return Ok(());
        };
        self.pods = kubelet.record(outcome);
        self.attest_all();
        self.remove_finished_runs();
        self.sync(false)
    }

    /// Expires bindings whose TTL ran out.
    pub fn expire(&mut self) -> Result<(), DaemonError> {
        if self.workloads.expire(SystemTime::now()) {
            self.sync(false)?;
        }
        Ok(())
    }

    fn attest_all(&mut self) {
        self.workloads.prune();
        let dirs: BTreeSet<PathBuf> = Workloads::scan(&self.scope_dir).into_iter().collect();
        self.attest_dirs(&dirs);
    }

    /// One attestation pass over `dirs`, counted and timed.
    fn attest_dirs(&mut self, dirs: &BTreeSet<PathBuf>) {
        let started = Instant::now();
        let now = SystemTime::now();
        for dir in dirs {
            self.workloads.attest(dir, &self.entries, &self.pods, now);
        }
        self.attestation.passes += 1;
        self.attestation.cgroups += dirs.len() as u64;
        self.attestation.last_pass = started.elapsed();
        if let Some(kubelet) = &mut self.kubelet {
            kubelet.ask_for_unlisted(&self.workloads, &self.pods);
        }
    }

    /// Re-reads the policy and the entries; on any error the running policy
    /// and bindings stay exactly as they were and the error is returned as
    /// it should be shown.
    pub fn reload(&mut self) -> Result<Reloaded, String> {
        let result = self.try_reload();
        release_free_memory();
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

    fn try_reload(&mut self) -> Result<Reloaded, String> {
        let td = &self.config.trust_domains;
        let new = policy::load(&self.config.policy, td).map_err(|e| e.to_string())?;
        let entries = load_entries(&self.config).map_err(|e| e.to_string())?;
        let previous = self.applied.generation;
        let diff = policy::diff(&self.policy, &new);
        let old_policy = std::mem::replace(&mut self.policy, new);
        let old_entries = std::mem::replace(&mut self.entries, entries);
        self.attest_all();
        if let Err(e) = self.sync(true) {
            // The kernel still holds the old generation: keep the old
            // policy in memory to match it.
            self.policy = old_policy;
            self.entries = old_entries;
            return Err(e.to_string());
        }
        Ok(Reloaded {
            previous,
            generation: self.applied.generation,
            diff,
        })
    }

    /// Revokes or restores an identity: the file first, then one map
    /// update that denies (or releases) every cgroup bound to it.
    pub fn set_revoked(&mut self, id: &SpiffeId, revoked: bool) -> Result<bool, DaemonError> {
        let changed = self.revocations.set(id, revoked)?;
        self.sync(false)?;
        if let Some(slot) = self.slot_of(id) {
            self.enforcer.maps.set_revoked(slot, revoked)?;
        }
        tracing::warn!(identity = %id, revoked, changed, "revocation changed");
        Ok(changed)
    }

    /// `idgate run`: makes a cgroup under the scope, binds it to `id`, and
    /// moves `pid` (the caller's child, waiting to exec) into it. Returns
    /// the cgroup's path relative to the cgroup v2 root.
    pub fn run(
        &mut self,
        id: SpiffeId,
        ttl: Option<Duration>,
        pid: u32,
    ) -> Result<String, DaemonError> {
        self.runs += 1;
        let dir = self
            .scope_dir
            .join(format!("{RUN_PREFIX}{pid}-{}", self.runs));
        cgroup::ensure_dir(&dir)?;
        self.workloads.bind_operator(&dir, id.clone(), ttl);
        let moved = self
            .sync(false)
            .and_then(|()| cgroup::move_process(&dir, pid).map_err(DaemonError::from));
        if let Err(e) = moved {
            let _ = std::fs::remove_dir(&dir);
            self.workloads.prune();
            let _ = self.sync(false);
            return Err(e);
        }
        tracing::info!(cgroup = %dir.display(), identity = %id, pid, ?ttl, "run: bound and started");
        Ok(format!(
            "/{}",
            dir.strip_prefix(&self.root).unwrap_or(&dir).display()
        ))
    }

    /// Removes the cgroups of `idgate run` whose command has exited. The
    /// table is pruned only when one was removed: pruning looks at every
    /// cgroup's directory, too slow to do after each event on a big scope.
    fn remove_finished_runs(&mut self) {
        let finished = self.workloads.finished_runs();
        if finished.is_empty() {
            return;
        }
        for dir in finished {
            match std::fs::remove_dir(&dir) {
                Ok(()) => tracing::info!(cgroup = %dir.display(), "run finished; cgroup removed"),
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a finished run's cgroup")
                }
            }
        }
        self.workloads.prune();
    }

    /// The slot an identity holds now, if any.
    pub fn slot_of(&self, id: &SpiffeId) -> Option<u32> {
        self.applied.slots.get(id).copied()
    }

    /// Brings the kernel in line with the workload table: the cgroups whose
    /// bound identity changed since the last sync and those the map could
    /// not take yet, or every cgroup with `recompile` and after a sync that
    /// failed part way. With `recompile`, or when an identity without a
    /// slot is now needed, the policy is compiled for every identity that
    /// needs a slot and switched to; then revoked slots are marked,
    /// bindings written and removed, and slots nobody needs freed. In this
    /// order a cgroup never points at a slot without policy, and a freed
    /// slot number is never under a binding.
    fn sync(&mut self, recompile: bool) -> Result<(), DaemonError> {
        let changed = self.workloads.take_changed();
        let result = self.sync_cgroups(recompile, &changed);
        if result.is_err() {
            self.sync_all = true;
            self.workloads.return_changed(changed);
        }
        result
    }

    fn sync_cgroups(
        &mut self,
        recompile: bool,
        changed: &BTreeSet<u64>,
    ) -> Result<(), DaemonError> {
        let mut cgroups: BTreeSet<u64> = if recompile || self.sync_all {
            let mut every: BTreeSet<u64> = self.workloads.bound().map(|(cg, _)| cg).collect();
            every.extend(self.applied.bound.keys());
            every
        } else {
            changed.clone()
        };
        // A cgroup the map could not take is tried again each time.
        cgroups.extend(self.bind_failures.keys());
        // Slots stay with their identity, so only a new identity needs a
        // new generation (and only the cgroups above need their binding).
        let slotless = |id: &SpiffeId| !self.applied.slots.contains_key(id);
        let new_identity = self.revocations.ids().iter().any(slotless)
            || cgroups
                .iter()
                .filter_map(|cg| self.workloads.bound_id(*cg))
                .any(slotless);
        if recompile || new_identity {
            let mut ids: BTreeSet<SpiffeId> =
                self.workloads.bound().map(|(_, id)| id.clone()).collect();
            ids.extend(self.revocations.ids().iter().cloned());
            // Every identity an entry can give gets its slot (and policy)
            // now, when they all fit: then the first cgroup attested to
            // one is bound at once, without a new generation.
            let mut attestable = ids.clone();
            attestable.extend(self.entries.iter().map(|e| e.id.clone()));
            if attestable.len() < MAX_SLOTS as usize {
                ids = attestable;
            }
            let slots = self.enforcer.slots.assign(&ids)?;
            let compiled = policy::compile(&self.policy, &slots);
            self.applied.generation = self.enforcer.maps.apply(&compiled)?;
            self.applied.applies += 1;
            for (slot, id) in &slots {
                self.enforcer
                    .maps
                    .set_revoked(*slot, self.revocations.contains(id))?;
            }
            self.applied.slots = slots.iter().map(|(s, id)| (id.clone(), *s)).collect();
            self.applied.identities = slots;
            self.applied.compiled = compiled;
        }
        for cg in cgroups {
            let Some(id) = self.workloads.bound_id(cg) else {
                self.bind_failures.remove(&cg);
                if self.applied.bound.contains_key(&cg) {
                    self.enforcer.maps.unbind(cg)?;
                    self.applied.bound.remove(&cg);
                }
                continue;
            };
            let slot = self.applied.slots[id];
            if self.applied.bound.get(&cg) == Some(&slot) {
                continue;
            }
            // A cgroup the map cannot take stays unbound (denied) and is
            // reported; no other binding is evicted for it.
            match self.enforcer.maps.bind(cg, slot) {
                Ok(()) => {
                    self.applied.bound.insert(cg, slot);
                    self.bind_failures.remove(&cg);
                }
                Err(e) => {
                    if !self.bind_failures.contains_key(&cg) {
                        tracing::error!(cgroup_id = cg, identity = %id, error = %e, "cannot bind: the workload is denied");
                    }
                    self.bind_failures.insert(cg, e.to_string());
                }
            }
        }
        if recompile {
            let keep: BTreeSet<u32> = self.applied.identities.iter().map(|(s, _)| *s).collect();
            self.enforcer.slots.retain(&keep)?;
        }
        self.sync_all = false;
        Ok(())
    }
}

/// Cgroups attested in one step of a pass over the scope (measured with
/// 10,000 cgroups: about 9 ms a step, 0.4 s for the whole pass).
const RESYNC_STEP: usize = 256;

/// The entries files' entries and those the configuration's
/// `[[workload]]` tables stand for.
fn load_entries(config: &Config) -> Result<EntrySet, identity::EntriesError> {
    let mut entries = identity::load_entries(&config.entries, &config.trust_domains)?;
    entries.extend(config.workload_entries.iter().cloned());
    Ok(EntrySet::new(entries))
}

/// Attestation passes, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttestationStats {
    pub passes: u64,
    /// Cgroups attested, over all passes.
    pub cgroups: u64,
    /// How long the last pass took.
    pub last_pass: Duration,
}

/// What a successful reload did.
pub struct Reloaded {
    pub previous: u32,
    pub generation: u32,
    pub diff: policy::PolicyDiff,
}

/// Gives the heap's free pages back to the system after a start or a
/// reload. Reading a policy's files, and a reload's two policies and
/// compiled forms at once, make a peak that the allocator would otherwise
/// keep for the life of the process (measured: an agent with 20,000 rules
/// stayed at four times its start size after reloads).
#[cfg(target_env = "gnu")]
fn release_free_memory() {
    // SAFETY: glibc's malloc_trim only returns free memory to the system;
    // it is safe to call at any time, from any thread.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
fn release_free_memory() {}
