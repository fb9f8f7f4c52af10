//! The running agent's state and the operations that change it: start,
//! attestation, revocation, `run`, and new policy generations. The daemon's
//! owner task is the only holder; a new generation is compiled and written
//! off the owner ([`GenerationJob`]) and only switched to here. Every
//! operation checks its input in full before it touches the kernel, and
//! policy switches in the kernel atomically.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use idgate_common::MAX_SLOTS;

use crate::bpf::{self, BpfError, Enforcer, GenerationMaps, RetiredSets, Written};
use crate::cgroup;
use crate::config::Config;
use crate::grants::{GrantRecord, Grants, Slots};
use crate::hashing::FastSet;
use crate::identity::{self, EntrySet, SpiffeId, k8s::Pods};
use crate::policy::{self, CompiledPolicy, PolicySet};
use crate::revocations::Revocations;
use crate::workloads::{RUN_PREFIX, Workloads};

use super::DaemonError;
use super::discovery::Found;
use super::generation_number::GenerationNumber;
use super::kubelet::{KubeletState, Outcome};

/// What the kernel holds now.
pub struct Applied {
    /// Slot and SPIFFE ID of every identity that holds a slot: those with a
    /// bound cgroup, the revoked ones, and those the entries can give.
    pub identities: Arc<Vec<(u32, SpiffeId)>>,
    /// The same, by identity.
    pub slots: Arc<Slots>,
    /// Bound cgroup ids and their slots (the identities map, mirrored).
    pub bound: BTreeMap<u64, u32>,
    /// The whole generation value the kernel holds since the last switch
    /// ([`crate::bpf::GenerationMaps::switch`]); 0 before the first.
    pub stamp: u32,
    /// The generation as operators see it: grows with every switch, across
    /// restarts.
    pub generation: u64,
    /// The compiled policy now active.
    pub compiled: Arc<CompiledPolicy>,
}

impl Applied {
    /// The kernel's active buffer (0 or 1).
    pub fn buffer(&self) -> u32 {
        self.stamp & 1
    }
}

/// The running agent.
pub struct State {
    pub config: Arc<Config>,
    pub root: PathBuf,
    pub scope_dir: PathBuf,
    pub enforcer: Enforcer,
    /// The policy generations; `None` while lent to a [`GenerationJob`].
    generations: Option<Generations>,
    pub policy: Arc<PolicySet>,
    /// What reads the policy files: kept, so that a reload parses only
    /// the files that changed (used by one reload at a time).
    pub policy_reader: Arc<Mutex<policy::Reader>>,
    pub entries: Arc<EntrySet>,
    /// The kubelet's pods (empty off Kubernetes, and while the kubelet
    /// cannot be reached).
    pub pods: Pods,
    /// The kubelet's list as fetched, when `[kubernetes]` is configured.
    pub kubelet: Option<KubeletState>,
    pub workloads: Workloads,
    pub revocations: Revocations,
    /// Operators' grants; their kernel entries follow `applied.slots`.
    pub grants: Grants,
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
    /// Cgroups attested to an identity that holds no slot (or no policy in
    /// the active generation) yet: unbound, so denied, until the next
    /// generation gives it one.
    awaiting_slot: BTreeSet<u64>,
    /// `idgate run` cgroups whose command has not been moved in yet: not
    /// removed as finished.
    pending_runs: BTreeSet<PathBuf>,
    generation_number: GenerationNumber,
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
        grant_records: tokio::sync::mpsc::UnboundedSender<GrantRecord>,
    ) -> Result<Self, DaemonError> {
        let mut reader = policy::Reader::default();
        let policy = reader.load(&config.policy, &config.trust_domains)?;
        log_warnings(&policy);
        let entries = load_entries(&config)?;
        let revocations = Revocations::load(&config.state_dir)?;
        let grants = Grants::load(config.grants.clone(), &config.state_dir)?;
        let generation_number = GenerationNumber::load(&config.state_dir)?;
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
        let (enforcer, generations) =
            bpf::install(&config.pin_dir, &scope_dir, level, config.max_workloads)?;
        tracing::info!(
            scope = %scope_dir.display(),
            pin_dir = %config.pin_dir.display(),
            adopted = ?enforcer.attachment.adopted,
            replaced = ?enforcer.attachment.replaced,
            attached = ?enforcer.attachment.attached,
            "programs in place"
        );
        let bound = enforcer.bindings.bindings()?;
        let grants = Grants::open(grants, &config.pin_dir, grant_records)?;
        let (kubelet, pods) = match kubelet {
            Some((mut k, first)) => {
                let pods = k.record(first);
                (Some(k), pods)
            }
            None => (None, Pods::default()),
        };
        let mut state = Self {
            workloads: Workloads::new(root.clone()),
            config: Arc::new(config),
            root,
            scope_dir,
            enforcer,
            generations: Some(Generations {
                maps: generations,
                compiler: policy::Compiler::default(),
            }),
            policy: Arc::new(policy),
            policy_reader: Arc::new(Mutex::new(reader)),
            entries: Arc::new(entries),
            pods,
            kubelet,
            revocations,
            grants,
            applied: Applied {
                identities: Arc::default(),
                slots: Arc::default(),
                bound,
                stamp: 0,
                generation: generation_number.current(),
                compiled: Arc::default(),
            },
            started: Instant::now(),
            reloads: 0,
            reload_errors: 0,
            pins_restored: 0,
            attestation: AttestationStats::default(),
            bind_failures: BTreeMap::new(),
            sync_all: true,
            awaiting_slot: BTreeSet::new(),
            pending_runs: BTreeSet::new(),
            generation_number,
            resync_queue: VecDeque::new(),
            runs: 0,
        };
        state.attest_all();
        // No slot is known yet, so every slot's revocation mark is written
        // from the file.
        let job = state.generation_job(state.policy.clone(), None)?;
        drop(state.finish_generation(job.run(), None)?);
        state.prime_inactive()?;
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
        self.sync()
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
        self.sync()
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
        self.sync()
    }

    /// Takes a kubelet fetch's outcome (a failure empties the pod list)
    /// and starts a pass over the scope with it.
    pub fn kubelet_fetched(&mut self, outcome: Outcome) -> Result<(), DaemonError> {
        let Some(kubelet) = &mut self.kubelet else {
            return Ok(());
        };
        self.pods = kubelet.record(outcome);
        // Every cgroup again, in steps between requests.
        self.start_pass();
        Ok(())
    }

    /// Expires bindings whose TTL ran out, and grants (which the kernel
    /// has ended already) from the map and the file.
    pub fn expire(&mut self) -> Result<(), DaemonError> {
        self.grants.expire(&self.applied.slots);
        if self.workloads.expire(SystemTime::now()) {
            self.sync()?;
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

    /// Revokes or restores an identity: the file first, then one map
    /// update that denies (or releases) every cgroup bound to it. The mark
    /// goes on the slot the slot table holds for it, which may be one
    /// assigned for a generation still being written; an identity without
    /// a slot has no cgroup bound to it, and its mark is set when it gets
    /// one (see [`State::generation_job`]).
    pub fn set_revoked(&mut self, id: &SpiffeId, revoked: bool) -> Result<bool, DaemonError> {
        let changed = self.revocations.set(id, revoked)?;
        if let Some(slot) = self.enforcer.slots.slot_of(id)
            && let Err(e) = self.enforcer.bindings.set_revoked(slot, revoked)
        {
            // The file must not say what the kernel does not hold.
            if changed && let Err(undo) = self.revocations.set(id, !revoked) {
                tracing::error!(identity = %id, error = %undo, "cannot take back the revocation file's change after the kernel refused it; a restart applies the file");
            }
            return Err(e.into());
        }
        tracing::warn!(identity = %id, revoked, changed, "revocation changed");
        Ok(changed)
    }

    /// `idgate run`, first half: makes a cgroup under the scope and binds
    /// it to `id`. The command's process is moved in by
    /// [`State::settle_run`] once the kernel holds the binding (at once,
    /// unless `id` needs a new policy generation first).
    pub fn start_run(
        &mut self,
        id: SpiffeId,
        ttl: Option<Duration>,
        process: RunProcess,
    ) -> Result<Run, DaemonError> {
        let pid = process.pid;
        self.runs += 1;
        let dir = self
            .scope_dir
            .join(format!("{RUN_PREFIX}{pid}-{}", self.runs));
        cgroup::ensure_dir(&dir)?;
        let cgroup_id = match cgroup::cgroup_id(&dir) {
            Ok(cg) => cg,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e.into());
            }
        };
        self.workloads.bind_operator(&dir, id.clone(), ttl);
        self.pending_runs.insert(dir.clone());
        let run = Run {
            dir,
            cgroup_id,
            id,
            ttl,
            process,
        };
        if let Err(e) = self.sync() {
            self.abandon_run(&run);
            return Err(e);
        }
        Ok(run)
    }

    /// `idgate run`, second half: once the kernel holds the run's binding,
    /// moves its process in and returns the cgroup's path relative to the
    /// cgroup v2 root. `None` while the binding waits for a generation.
    pub fn settle_run(&mut self, run: &Run) -> Option<Result<String, DaemonError>> {
        if !self.applied.bound.contains_key(&run.cgroup_id) {
            if self.awaiting_slot.contains(&run.cgroup_id) {
                return None;
            }
            self.abandon_run(run);
            let why = self
                .bind_failures
                .get(&run.cgroup_id)
                .cloned()
                .unwrap_or_else(|| "the binding is not in the kernel".into());
            return Some(Err(DaemonError::RunNotBound(why)));
        }
        // The binding may have waited for a generation: the process must
        // still be the caller's child that the request named, not another
        // one that took its pid meanwhile.
        if !run.process.unchanged() {
            self.abandon_run(run);
            return Some(Err(DaemonError::RunNotBound(format!(
                "process {} is gone (or no longer the caller's child) while its binding was made",
                run.process.pid
            ))));
        }
        if let Err(e) = cgroup::move_process(&run.dir, run.process.pid) {
            self.abandon_run(run);
            return Some(Err(e.into()));
        }
        self.pending_runs.remove(&run.dir);
        tracing::info!(cgroup = %run.dir.display(), identity = %run.id, pid = run.process.pid, ttl = ?run.ttl, "run: bound and started");
        Some(Ok(format!(
            "/{}",
            run.dir
                .strip_prefix(&self.root)
                .unwrap_or(&run.dir)
                .display()
        )))
    }

    /// Removes a run's cgroup that its process never reached.
    pub fn abandon_run(&mut self, run: &Run) {
        self.pending_runs.remove(&run.dir);
        let _ = std::fs::remove_dir(&run.dir);
        self.workloads.prune();
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "sync after an abandoned run failed");
        }
    }

    /// Removes the cgroups of `idgate run` whose command has exited. The
    /// table is pruned only when one was removed: pruning looks at every
    /// cgroup's directory, too slow to do after each event on a big scope.
    fn remove_finished_runs(&mut self) {
        let finished: Vec<PathBuf> = self
            .workloads
            .finished_runs()
            .into_iter()
            .filter(|dir| !self.pending_runs.contains(dir))
            .collect();
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

    /// Whether a bound cgroup's identity waits for a slot and the
    /// generation maps are here to write one.
    pub fn wants_generation(&self) -> bool {
        !self.awaiting_slot.is_empty() && self.generations.is_some()
    }

    /// Prepares a new generation of `policy` for every identity that needs
    /// a slot (with `entries`, those of a reload; else the running ones),
    /// and lends it the generation maps. Slots are assigned here, and the
    /// revocation mark of every slot new to its identity written, so no
    /// binding ever points at a slot whose mark is stale.
    pub fn generation_job(
        &mut self,
        policy: Arc<PolicySet>,
        entries: Option<&EntrySet>,
    ) -> Result<GenerationJob, DaemonError> {
        let Some(maps) = self.generations.take() else {
            return Err(DaemonError::GenerationBusy);
        };
        let entries = entries.unwrap_or(&*self.entries);
        if self.needs_the_applied_slots(entries) {
            // What assigning them again would give: each holds its slot.
            return Ok(GenerationJob {
                policy,
                slots: self.applied.identities.clone(),
                maps,
                dns_direct: self.dns_direct(),
            });
        }
        let mut ids: BTreeSet<SpiffeId> = self.slot_holders().cloned().collect();
        // Every identity an entry can give gets its slot (and policy)
        // now, when they all fit: then the first cgroup attested to one is
        // bound at once, without a new generation.
        let mut attestable = ids.clone();
        attestable.extend(entries.iter().map(|e| e.id.clone()));
        if attestable.len() < MAX_SLOTS as usize {
            ids = attestable;
        }
        match self.assign_slots(&ids) {
            Ok(slots) => Ok(GenerationJob {
                policy,
                slots: Arc::new(slots),
                maps,
                dns_direct: self.dns_direct(),
            }),
            Err(e) => {
                self.generations = Some(maps);
                Err(e)
            }
        }
    }

    /// The identities that hold a slot whether or not all fit: those with
    /// a bound cgroup, and the revoked ones.
    fn slot_holders(&self) -> impl Iterator<Item = &SpiffeId> {
        (self.workloads.bound().map(|(_, id)| id)).chain(self.revocations.ids())
    }

    /// The identities of `[dns] direct`.
    fn dns_direct(&self) -> Vec<SpiffeId> {
        // Checked when the configuration was loaded.
        self.config
            .dns
            .direct_ids(&self.config.trust_domains)
            .unwrap_or_default()
    }

    /// Whether the identities that need a slot (those with a bound cgroup,
    /// the revoked ones, and, while they all fit, those `entries` can
    /// give) are exactly those of the applied generation: then each holds
    /// its slot already, and nothing is assigned (a reload that changed
    /// rules only, at 10,000 identities, saves sorting them all twice).
    fn needs_the_applied_slots(&self, entries: &EntrySet) -> bool {
        let slots = &self.applied.slots;
        let mut seen: FastSet<u32> = FastSet::default();
        let wanted = self.slot_holders().chain(entries.iter().map(|e| &e.id));
        for id in wanted {
            match slots.get(id) {
                Some(slot) => {
                    seen.insert(*slot);
                }
                None => return false,
            }
        }
        seen.len() == self.applied.identities.len() && seen.len() < MAX_SLOTS as usize
    }

    fn assign_slots(
        &mut self,
        ids: &BTreeSet<SpiffeId>,
    ) -> Result<Vec<(u32, SpiffeId)>, DaemonError> {
        let slots = self.enforcer.slots.assign(ids)?;
        for (slot, id) in &slots {
            if self.slot_of(id) != Some(*slot) {
                self.enforcer
                    .bindings
                    .set_revoked(*slot, self.revocations.contains(id))?;
            }
        }
        Ok(slots)
    }

    /// Brings the inactive generation to the active one's policy when
    /// what it holds is not known (see [`GenerationMaps::prime`]).
    fn prime_inactive(&mut self) -> Result<(), DaemonError> {
        let Some(generations) = self.generations.as_mut() else {
            return Ok(());
        };
        Ok(generations.maps.prime(&self.applied.compiled)?)
    }

    /// Takes back the generation maps from a finished job and, if it
    /// wrote its generation, switches the kernel to it. With `entries`
    /// (a reload's), they replace the running entries, and if they differ
    /// every cgroup is attested again (in steps, see
    /// [`State::resync_step`]). Cgroups bound to an identity the new
    /// generation has no slot for are unbound until one that has.
    ///
    /// Returns what the switch retired (the old policy, its compiled form,
    /// entries), to be dropped off the owner: freeing a large policy takes
    /// tens of milliseconds.
    pub fn finish_generation(
        &mut self,
        done: GenerationDone,
        entries: Option<EntrySet>,
    ) -> Result<Retired, DaemonError> {
        self.generations = Some(done.maps);
        let (compiled, written) = done.written?;
        let maps = &mut self.generations.as_mut().expect("just put back").maps;
        let (stamp, sets) = maps.switch(written)?;
        self.applied.stamp = stamp;
        self.applied.generation = self.generation_number.advance();
        // The same slots (a reload of rules only) keep their map.
        let (old_slots, old_identities) = if Arc::ptr_eq(&done.slots, &self.applied.identities) {
            (None, None)
        } else {
            let slots: Slots = done.slots.iter().map(|(s, id)| (id.clone(), *s)).collect();
            (
                Some(std::mem::replace(&mut self.applied.slots, Arc::new(slots))),
                Some(std::mem::replace(&mut self.applied.identities, done.slots)),
            )
        };
        let mut retired = Retired {
            _slots: old_slots,
            _identities: old_identities,
            _compiled: std::mem::replace(&mut self.applied.compiled, Arc::new(compiled)),
            _policy: std::mem::replace(&mut self.policy, done.policy),
            _sets: sets,
            entries: None,
        };
        // Grants follow their identities' slots before any cgroup is bound
        // to a slot new to its identity (by the sync below).
        if let Err(e) = self.grants.follow(&self.applied.slots) {
            tracing::error!(error = %e, "grants after a generation switch failed; retried every second");
        }
        if let Some(entries) = entries
            && !entries.same_entries(&self.entries)
        {
            retired.entries = Some(std::mem::replace(&mut self.entries, Arc::new(entries)));
            self.start_pass();
        }
        // A cgroup bound while the job ran may be bound to an identity it
        // did not cover: its slot has no policy now (denied), and it waits
        // for the next generation.
        let uncovered: Vec<u64> = self
            .applied
            .bound
            .keys()
            .copied()
            .filter(|cg| {
                self.workloads
                    .bound_id(*cg)
                    .is_none_or(|id| !self.applied.slots.contains_key(id))
            })
            .collect();
        self.awaiting_slot.extend(uncovered);
        // The switch is made: what follows cannot undo it, so its faults
        // are logged and retried (a failed sync goes over every cgroup
        // next time; slots are freed at the next switch), not reported as
        // a refused generation.
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "bindings after a generation switch failed; retried with the next event");
            return Ok(retired);
        }
        let keep: BTreeSet<u32> = self
            .applied
            .identities
            .iter()
            .map(|(s, _)| *s)
            .chain(self.applied.bound.values().copied())
            .collect();
        if let Err(e) = self.enforcer.slots.retain(&keep) {
            tracing::error!(error = %e, "cannot free the slots no identity needs any more; they stay held");
        }
        Ok(retired)
    }

    /// Brings the kernel in line with the workload table: the cgroups whose
    /// bound identity changed since the last sync, those the map could not
    /// take yet and those waiting for a slot, or every cgroup after a sync
    /// that failed part way. A cgroup whose identity holds no slot in the
    /// active generation is unbound (denied) and waits for the next one;
    /// nothing here compiles a policy.
    fn sync(&mut self) -> Result<(), DaemonError> {
        let changed = self.workloads.take_changed();
        let awaiting = self.awaiting_slot.clone();
        let result = self.sync_cgroups(&changed);
        if result.is_err() {
            self.sync_all = true;
            self.workloads.return_changed(changed);
            // Those not reached yet still wait (those reached are looked
            // at again, harmlessly).
            self.awaiting_slot.extend(awaiting);
        }
        result
    }

    fn sync_cgroups(&mut self, changed: &BTreeSet<u64>) -> Result<(), DaemonError> {
        let mut cgroups: BTreeSet<u64> = if self.sync_all {
            let mut every: BTreeSet<u64> = self.workloads.bound().map(|(cg, _)| cg).collect();
            every.extend(self.applied.bound.keys());
            every
        } else {
            changed.clone()
        };
        // A cgroup the map could not take is tried again each time, and
        // so is one that waits for a slot.
        cgroups.extend(self.bind_failures.keys());
        cgroups.append(&mut self.awaiting_slot);
        for cg in cgroups {
            let slot = self
                .workloads
                .bound_id(cg)
                .map(|id| (id, self.applied.slots.get(id).copied()));
            let slot = match slot {
                Some((_, Some(slot))) => slot,
                unbound => {
                    if unbound.is_some() {
                        self.awaiting_slot.insert(cg);
                    }
                    self.bind_failures.remove(&cg);
                    if self.applied.bound.contains_key(&cg) {
                        self.enforcer.bindings.unbind(cg)?;
                        self.applied.bound.remove(&cg);
                    }
                    continue;
                }
            };
            if self.applied.bound.get(&cg) == Some(&slot) {
                continue;
            }
            // A cgroup the map cannot take stays unbound (denied) and is
            // reported; no other binding is evicted for it.
            // A binding with an end (`idgate run --ttl`, an entry's `ttl`)
            // is ended by the kernel itself, agent or not.
            let end = self.workloads.bound_until(cg).map(crate::clock::boot_ns_at);
            match self.enforcer.bindings.bind(cg, slot, end) {
                Ok(()) => {
                    self.applied.bound.insert(cg, slot);
                    self.bind_failures.remove(&cg);
                }
                Err(e) => {
                    if !self.bind_failures.contains_key(&cg) {
                        let id = self.workloads.bound_id(cg).map(ToString::to_string);
                        tracing::error!(cgroup_id = cg, identity = ?id, error = %e, "cannot bind: the workload is denied");
                    }
                    self.bind_failures.insert(cg, e.to_string());
                }
            }
        }
        self.sync_all = false;
        Ok(())
    }
}

/// An `idgate run` under way: its cgroup is made and bound in the table.
#[derive(Debug)]
pub struct Run {
    dir: PathBuf,
    cgroup_id: u64,
    pub id: SpiffeId,
    ttl: Option<Duration>,
    process: RunProcess,
}

/// The process an `idgate run` moves, as the kernel described it when
/// the request came: a pid alone could name another process by the time
/// the binding is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunProcess {
    pub pid: u32,
    /// Its parent (the caller).
    pub parent: i32,
    /// When it started, in clock ticks after boot.
    start_time: u64,
}

impl RunProcess {
    /// Reads the process `pid` from procfs.
    pub fn of(pid: u32) -> Result<Self, procfs::ProcError> {
        let stat = procfs::process::Process::new(pid as i32)?.stat()?;
        Ok(Self {
            pid,
            parent: stat.ppid,
            start_time: stat.starttime,
        })
    }

    /// Whether the same process still runs under the same parent.
    fn unchanged(&self) -> bool {
        Self::of(self.pid).is_ok_and(|now| now == *self)
    }
}

/// Logs what `policy check` warns of in a policy that is applied anyway.
pub fn log_warnings(policy: &PolicySet) {
    for w in &policy.warnings {
        tracing::warn!(warning = %w, "policy");
    }
}

/// The policy generations in the kernel, and the compiler that keeps
/// what their entries were compiled from: lent together to a
/// [`GenerationJob`].
pub struct Generations {
    maps: GenerationMaps,
    compiler: policy::Compiler,
}

/// A new policy generation to compile and write off the daemon's owner,
/// with the generation maps lent to it.
pub struct GenerationJob {
    policy: Arc<PolicySet>,
    /// The applied generation's own when no slot changes.
    slots: Arc<Vec<(u32, SpiffeId)>>,
    maps: Generations,
    /// Identities whose DNS the kernel leaves alone (`[dns] direct`).
    dns_direct: Vec<SpiffeId>,
}

impl GenerationJob {
    /// Compiles the policy for the slots and writes it into the inactive
    /// generation, which no program reads: seconds for a large policy, so
    /// run it on a thread of its own.
    pub fn run(mut self) -> GenerationDone {
        let started = Instant::now();
        let mut compiled = self.maps.compiler.compile(&self.policy, &self.slots);
        let direct: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, id)| self.dns_direct.contains(id))
            .map(|(slot, _)| *slot)
            .collect();
        compiled.add_flag(&direct, idgate_common::slot_policy::DNS_DIRECT);
        let compiled_at = Instant::now();
        let written = self.maps.maps.write(&compiled).map(|w| (compiled, w));
        GenerationDone {
            policy: self.policy,
            slots: self.slots,
            maps: self.maps,
            written,
            compile: compiled_at - started,
            write: compiled_at.elapsed(),
        }
    }
}

/// What a switch of generation retired: dropped, and the heap trimmed, on
/// a thread of its own once nothing published refers to it.
/// (Its fields are held only to be dropped.)
pub struct Retired {
    _slots: Option<Arc<Slots>>,
    _identities: Option<Arc<Vec<(u32, SpiffeId)>>>,
    _compiled: Arc<CompiledPolicy>,
    _policy: Arc<PolicySet>,
    _sets: RetiredSets,
    entries: Option<Arc<EntrySet>>,
}

impl Retired {
    /// Whether the switch replaced the entries (and so started a pass
    /// over the scope).
    pub fn new_entries(&self) -> bool {
        self.entries.is_some()
    }

    /// Drops it all off the caller's thread, then gives the freed pages
    /// back to the system.
    pub fn reclaim(self) {
        let spawned = std::thread::Builder::new()
            .name("idgate-reclaim".into())
            .spawn(move || {
                drop(self);
                release_free_memory();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to free a retired policy; it is freed by the caller");
        }
    }
}

/// A finished [`GenerationJob`], for [`State::finish_generation`].
pub struct GenerationDone {
    policy: Arc<PolicySet>,
    slots: Arc<Vec<(u32, SpiffeId)>>,
    maps: Generations,
    written: Result<(CompiledPolicy, Written), BpfError>,
    pub compile: Duration,
    pub write: Duration,
}

/// Cgroups attested in one step of a pass over the scope (measured with
/// 10,000 cgroups: about 9 ms a step, 0.4 s for the whole pass).
const RESYNC_STEP: usize = 256;

/// The entries files' entries and those the configuration's
/// `[[workload]]` tables stand for.
pub fn load_entries(config: &Config) -> Result<EntrySet, identity::EntriesError> {
    let entries = identity::load_entries(&config.entries, &config.trust_domains)?;
    Ok(with_workloads(entries, config))
}

/// The entries files' `entries` and then the configuration's.
fn with_workloads(mut entries: Vec<identity::Entry>, config: &Config) -> EntrySet {
    entries.extend(config.workload_entries.iter().cloned());
    EntrySet::new(entries)
}

/// [`load_entries`], or `None` when they are those of `running` (then
/// nothing is built: with thousands of entries, building the set and its
/// index costs more than the rest of a small reload).
pub fn load_changed_entries(
    config: &Config,
    running: &EntrySet,
) -> Result<Option<EntrySet>, identity::EntriesError> {
    let entries = identity::load_entries(&config.entries, &config.trust_domains)?;
    // The running set ends with the same configuration's workloads.
    if running.starts_with(&entries, config.workload_entries.len()) {
        return Ok(None);
    }
    Ok(Some(with_workloads(entries, config)))
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
#[derive(Debug)]
pub struct Reloaded {
    pub previous: u64,
    pub generation: u64,
    pub diff: policy::PolicyDiff,
    pub took: ReloadTimes,
}

/// Where a reload's time went, for its log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReloadTimes {
    /// Reading and checking the files.
    pub read: Duration,
    /// Compiling the generation, and writing it into the kernel's maps.
    pub compile: Duration,
    pub write: Duration,
    /// From the start of the reading to the switch.
    pub total: Duration,
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
