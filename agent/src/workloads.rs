//! Every cgroup under the scope, what it attested to, and since when.
//!
//! A cgroup is bound only after all its processes were attested (see
//! `identity::attest`); until then, and whenever attestation fails or
//! conflicts, it is not bound and the kernel judges it as an unknown
//! workload. An expired binding stays expired for the life of the cgroup:
//! re-attestation does not bring it back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::identity::{Attestation, CgroupFacts, EntrySet, SpiffeId, attest_cgroup, k8s::Pods};

/// How a cgroup stands (and, on the control socket, the `state` of a row
/// of `idgate workloads`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Binding {
    /// Attested to an identity by registration entries.
    Attested {
        id: SpiffeId,
        selectors: Vec<String>,
        expires: Option<SystemTime>,
    },
    /// Bound by an operator with `idgate run`.
    Operator {
        id: SpiffeId,
        expires: Option<SystemTime>,
    },
    /// No entry matches.
    Unknown,
    /// Processes disagree: no identity.
    Conflict { candidates: Vec<String> },
    /// The binding's TTL ran out; the cgroup stays denied.
    Expired { id: SpiffeId },
    /// The kernel's facts could not be read: no identity.
    Unreadable { error: String },
}

impl Binding {
    /// The identity the kernel should bind, if any.
    pub fn bound_id(&self) -> Option<&SpiffeId> {
        match self {
            Binding::Attested { id, .. } | Binding::Operator { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The state's name, as `idgate workloads` shows it.
    pub fn state_name(&self) -> &'static str {
        match self {
            Binding::Attested { .. } => "attested",
            Binding::Operator { .. } => "operator",
            Binding::Unknown => "unknown",
            Binding::Conflict { .. } => "conflict",
            Binding::Expired { .. } => "expired",
            Binding::Unreadable { .. } => "unreadable",
        }
    }

    fn expires(&self) -> Option<SystemTime> {
        match self {
            Binding::Attested { expires, .. } | Binding::Operator { expires, .. } => *expires,
            _ => None,
        }
    }
}

/// One cgroup under the scope.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Path relative to the cgroup v2 root, starting with `/`.
    pub path: String,
    pub dir: PathBuf,
    pub cgroup_id: u64,
    pub binding: Binding,
    pub pids: Vec<u32>,
    /// When the binding last changed.
    pub since: SystemTime,
}

/// The workload table.
pub struct Workloads {
    root: PathBuf,
    by_cgroup: BTreeMap<u64, Workload>,
    /// The cgroup id of each directory in `by_cgroup`.
    by_dir: HashMap<PathBuf, u64>,
    /// Cgroups whose bound identity may have changed (bound, unbound,
    /// rebound or gone) since [`Workloads::take_changed`] last ran.
    changed: BTreeSet<u64>,
    /// Counts such changes.
    version: u64,
    /// How many cgroups are in each state, by [`Binding::state_name`].
    states: BTreeMap<&'static str, usize>,
}

impl Workloads {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            by_cgroup: BTreeMap::new(),
            by_dir: HashMap::new(),
            changed: BTreeSet::new(),
            version: 0,
            states: BTreeMap::new(),
        }
    }

    /// How many cgroups are in each state (by [`Binding::state_name`]);
    /// a state no cgroup is in may be missing.
    pub fn states(&self) -> &BTreeMap<&'static str, usize> {
        &self.states
    }

    /// Counts a cgroup out of one state (if any) and into another (if any).
    fn recount(&mut self, from: Option<&'static str>, to: Option<&'static str>) {
        if let Some(n) = from.and_then(|s| self.states.get_mut(s)) {
            *n -= 1;
        }
        if let Some(s) = to {
            *self.states.entry(s).or_default() += 1;
        }
    }

    /// Grows with every change of a cgroup's bound identity: equal
    /// versions mean equal [`Workloads::bound`] lists.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn mark_changed(&mut self, cgroup_id: u64) {
        self.changed.insert(cgroup_id);
        self.version += 1;
    }

    /// The identity a cgroup in the table is bound to, if any.
    pub fn bound_id(&self, cgroup_id: u64) -> Option<&SpiffeId> {
        self.by_cgroup.get(&cgroup_id)?.binding.bound_id()
    }

    /// When the binding of `cgroup_id` ends, if it has an end.
    pub fn bound_until(&self, cgroup_id: u64) -> Option<SystemTime> {
        self.by_cgroup.get(&cgroup_id)?.binding.expires()
    }

    /// Takes the cgroups whose bound identity may have changed.
    pub fn take_changed(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.changed)
    }

    /// Puts back cgroups taken by [`Workloads::take_changed`] whose change
    /// did not reach the kernel.
    pub fn return_changed(&mut self, cgroups: BTreeSet<u64>) {
        self.changed.extend(cgroups);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Workload> {
        self.by_cgroup.values()
    }

    /// The directory of a cgroup in the table.
    pub fn dir_of(&self, cgroup_id: u64) -> Option<&Path> {
        self.by_cgroup.get(&cgroup_id).map(|w| w.dir.as_path())
    }

    /// Bound cgroups and their identities.
    pub fn bound(&self) -> impl Iterator<Item = (u64, &SpiffeId)> {
        self.by_cgroup
            .iter()
            .filter_map(|(cg, w)| w.binding.bound_id().map(|id| (*cg, id)))
    }

    /// Every cgroup directory under (and including) `scope`.
    pub fn scan(scope: &Path) -> Vec<PathBuf> {
        let mut out = vec![scope.to_owned()];
        let mut i = 0;
        while i < out.len() {
            let below = Self::children(&out[i]);
            out.extend(below);
            i += 1;
        }
        out
    }

    /// The cgroup directories right below `dir` (none if it is gone).
    pub fn children(dir: &Path) -> Vec<PathBuf> {
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        read.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// Forgets cgroups whose directory is gone (or was made anew).
    pub fn prune(&mut self) {
        let gone: Vec<u64> = self
            .by_cgroup
            .iter()
            .filter(|(cg, w)| !cgroup::cgroup_id(&w.dir).is_ok_and(|now| now == **cg))
            .map(|(cg, _)| *cg)
            .collect();
        for cg in gone {
            self.forget(cg);
        }
    }

    fn forget(&mut self, cgroup_id: u64) {
        if let Some(w) = self.by_cgroup.remove(&cgroup_id) {
            self.recount(Some(w.binding.state_name()), None);
            if self.by_dir.get(&w.dir) == Some(&cgroup_id) {
                self.by_dir.remove(&w.dir);
            }
            self.mark_changed(cgroup_id);
        }
    }

    /// Attests the cgroup at `dir` anew. Returns whether its binding
    /// changed. A directory that is gone is forgotten.
    pub fn attest(&mut self, dir: &Path, entries: &EntrySet, pods: &Pods, now: SystemTime) -> bool {
        let Ok(cgroup_id) = cgroup::cgroup_id(dir) else {
            let Some(gone) = self.by_dir.get(dir).copied() else {
                return false;
            };
            self.forget(gone);
            return true;
        };
        let facts = CgroupFacts::read(&self.root, dir);
        let pids = facts.as_ref().map(|f| f.pids.clone()).unwrap_or_default();
        let previous = self.by_cgroup.get(&cgroup_id).map(|w| w.binding.clone());
        let binding = match previous {
            // Neither attestation nor time brings these back or moves them.
            Some(b @ (Binding::Operator { .. } | Binding::Expired { .. })) => b,
            _ => attested(facts, entries, pods, previous.as_ref(), now),
        };
        self.set(cgroup_id, dir, binding, pids, now)
    }

    /// Binds a cgroup by an operator's word (`idgate run`).
    pub fn bind_operator(&mut self, dir: &Path, id: SpiffeId, ttl: Option<Duration>) -> bool {
        let Ok(cgroup_id) = cgroup::cgroup_id(dir) else {
            return false;
        };
        let now = SystemTime::now();
        let binding = Binding::Operator {
            id,
            expires: ttl.map(|t| now + t),
        };
        self.set(cgroup_id, dir, binding, Vec::new(), now)
    }

    /// Expires every binding whose TTL has run out. Returns whether any did.
    pub fn expire(&mut self, now: SystemTime) -> bool {
        let mut expired = Vec::new();
        for w in self.by_cgroup.values_mut() {
            if w.binding.expires().is_some_and(|t| t <= now) {
                let id = w.binding.bound_id().expect("bound").clone();
                tracing::warn!(cgroup = %w.path, identity = %id, "binding expired; the cgroup is denied from now on");
                let was = w.binding.state_name();
                w.binding = Binding::Expired { id };
                w.since = now;
                expired.push((w.cgroup_id, was, w.binding.state_name()));
            }
        }
        for &(cg, was, is) in &expired {
            self.mark_changed(cg);
            self.recount(Some(was), Some(is));
        }
        !expired.is_empty()
    }

    /// Operator-bound cgroups with no process left: `idgate run` is over.
    pub fn finished_runs(&self) -> Vec<PathBuf> {
        self.by_cgroup
            .values()
            .filter(|w| {
                matches!(
                    w.binding,
                    Binding::Operator { .. } | Binding::Expired { .. }
                )
            })
            .filter(|w| {
                w.dir
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(RUN_PREFIX))
            })
            .filter(|w| !populated(&w.dir))
            .map(|w| w.dir.clone())
            .collect()
    }

    fn set(
        &mut self,
        cgroup_id: u64,
        dir: &Path,
        binding: Binding,
        pids: Vec<u32>,
        now: SystemTime,
    ) -> bool {
        let path = format!("/{}", dir.strip_prefix(&self.root).unwrap_or(dir).display());
        if let Some(w) = self.by_cgroup.get_mut(&cgroup_id) {
            w.pids = pids;
            if w.binding == binding {
                return false;
            }
            log_change(&path, &binding);
            let was = w.binding.state_name();
            let changed = w.binding.bound_id() != binding.bound_id();
            let now_in = binding.state_name();
            w.binding = binding;
            w.since = now;
            self.recount(Some(was), Some(now_in));
            if changed {
                self.mark_changed(cgroup_id);
            }
            return changed;
        }
        log_change(&path, &binding);
        let changed = binding.bound_id().is_some();
        if changed {
            self.mark_changed(cgroup_id);
        }
        // A directory made anew has a new id: the old one is gone.
        if let Some(old) = self.by_dir.get(dir).copied() {
            self.forget(old);
        }
        self.by_dir.insert(dir.to_owned(), cgroup_id);
        self.recount(None, Some(binding.state_name()));
        self.by_cgroup.insert(
            cgroup_id,
            Workload {
                path,
                dir: dir.to_owned(),
                cgroup_id,
                binding,
                pids,
                since: now,
            },
        );
        changed
    }
}

/// Name prefix of the cgroups `idgate run` makes.
pub const RUN_PREFIX: &str = "idgate-run-";

/// Whether a cgroup (or one below it) has processes, from `cgroup.events`.
/// Unreadable counts as populated: nothing is removed on a guess.
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| !t.lines().any(|l| l == "populated 0"))
        .unwrap_or(true)
}

/// The binding attestation gives, keeping the first binding time (and so
/// the TTL's start) while the identity stays the same.
fn attested(
    facts: Result<CgroupFacts, crate::identity::FactsError>,
    entries: &EntrySet,
    pods: &Pods,
    previous: Option<&Binding>,
    now: SystemTime,
) -> Binding {
    let facts = match facts {
        Ok(f) => f,
        Err(e) => {
            return Binding::Unreadable {
                error: e.to_string(),
            };
        }
    };
    let processes = match facts.read_processes() {
        Ok(p) => p,
        Err(e) => {
            return Binding::Unreadable {
                error: e.to_string(),
            };
        }
    };
    match attest_cgroup(entries, &facts, &processes, pods) {
        Attestation::Identity {
            id,
            entries: matched,
            selectors,
        } => {
            let expires = match previous {
                Some(Binding::Attested {
                    id: old, expires, ..
                }) if *old == id => *expires,
                _ => matched
                    .iter()
                    .filter_map(|i| entries[*i].ttl)
                    .min()
                    .map(|ttl| now + ttl),
            };
            Binding::Attested {
                id,
                selectors: selectors.iter().map(ToString::to_string).collect(),
                expires,
            }
        }
        Attestation::Unknown => Binding::Unknown,
        Attestation::Conflict { candidates, .. } => Binding::Conflict {
            candidates: candidates.iter().map(|c| c.id.to_string()).collect(),
        },
    }
}

fn log_change(path: &str, binding: &Binding) {
    match binding {
        Binding::Attested { id, .. } | Binding::Operator { id, .. } => {
            tracing::info!(cgroup = %path, identity = %id, "bound")
        }
        Binding::Conflict { candidates } => {
            tracing::warn!(cgroup = %path, ?candidates, "attestation conflict: no identity")
        }
        Binding::Unreadable { error } => {
            tracing::warn!(cgroup = %path, %error, "cannot attest: no identity")
        }
        Binding::Unknown | Binding::Expired { .. } => {
            tracing::debug!(cgroup = %path, ?binding, "not bound")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::{Duration, SystemTime};

    use crate::identity::{EntrySet, k8s::Pods};

    #[test]
    fn state_names_are_the_ones_idgate_workloads_shows() {
        let id: crate::identity::SpiffeId = "spiffe://example.org/a".parse().unwrap();
        for b in [
            Binding::Attested {
                id: id.clone(),
                selectors: Vec::new(),
                expires: None,
            },
            Binding::Operator {
                id: id.clone(),
                expires: None,
            },
            Binding::Unknown,
            Binding::Conflict {
                candidates: Vec::new(),
            },
            Binding::Expired { id },
            Binding::Unreadable {
                error: String::new(),
            },
        ] {
            assert_eq!(serde_json::to_value(&b).unwrap()["state"], b.state_name());
        }
    }

    /// Directories stand in for cgroups: a cgroup id is the directory's
    /// inode number.
    struct Dirs(PathBuf);

    impl Dirs {
        fn new() -> Self {
            let root =
                std::env::temp_dir().join(format!("idgate-workloads-{}", std::process::id()));
            std::fs::create_dir_all(&root).unwrap();
            Self(root)
        }

        fn make(&self, name: &str) -> (PathBuf, u64) {
            let dir = self.0.join(name);
            std::fs::create_dir(&dir).unwrap();
            let id = cgroup::cgroup_id(&dir).unwrap();
            (dir, id)
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn every_change_of_a_bound_identity_is_handed_to_the_next_sync() {
        let dirs = Dirs::new();
        let mut table = Workloads::new(dirs.0.clone());
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let now = SystemTime::now();
        let (a, a_id) = dirs.make("a");
        let (b, b_id) = dirs.make("b");
        assert!(table.bind_operator(&a, id.clone(), None));
        assert!(table.bind_operator(&b, id.clone(), Some(Duration::from_secs(5))));
        assert_eq!(table.take_changed(), BTreeSet::from([a_id, b_id]));
        assert!(table.take_changed().is_empty());
        assert_eq!(table.states()["operator"], 2);
        assert_eq!(table.bound_id(a_id), Some(&id));

        // The TTL runs out: b is unbound, and counted as expired.
        let version = table.version();
        assert!(table.expire(now + Duration::from_secs(10)));
        assert_eq!(table.take_changed(), BTreeSet::from([b_id]));
        assert_eq!(table.bound_id(b_id), None);
        assert_eq!(table.states()["expired"], 1);
        assert_eq!(table.states()["operator"], 1);
        assert!(table.version() > version);

        // a's directory is removed: attesting it forgets the cgroup.
        std::fs::remove_dir(&a).unwrap();
        assert!(table.attest(&a, &EntrySet::new(Vec::new()), &Pods::default(), now));
        assert_eq!(table.take_changed(), BTreeSet::from([a_id]));
        assert_eq!(table.dir_of(a_id), None);
        assert_eq!(table.states()["operator"], 0);

        // Given back after a failed sync, the changes come out again.
        table.return_changed(BTreeSet::from([a_id]));
        assert_eq!(table.take_changed(), BTreeSet::from([a_id]));

        // Another directory moved to b's path is another cgroup (made
        // while b was there, so its inode is another): pruning forgets b.
        let (other, other_id) = dirs.make("other");
        std::fs::remove_dir(&b).unwrap();
        std::fs::rename(&other, &b).unwrap();
        assert_eq!(cgroup::cgroup_id(&b).unwrap(), other_id);
        table.prune();
        assert_eq!(table.take_changed(), BTreeSet::from([b_id]));
        assert_eq!(table.iter().count(), 0);
        assert_eq!(table.states().values().sum::<usize>(), 0);
    }
}
