//! Every cgroup under the scope, what it attested to, and since when.
//!
//! A cgroup is bound only after all its processes were attested (see
//! `identity::attest`); until then, and whenever attestation fails or
//! conflicts, it is not bound and the kernel judges it as an unknown
//! workload. An expired binding stays expired for the life of the cgroup:
//! re-attestation does not bring it back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cgroup;
use crate::identity::{Attestation, CgroupFacts, EntrySet, SpiffeId, attest_cgroup, k8s::Pods};

/// How a cgroup stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

    fn expires(&self) -> Option<SystemTime> {
        match self {
            Binding::Attested { expires, .. } | Binding::Operator { expires, .. } => *expires,
            _ => None,
        }
    }
}

/// One cgroup under the scope.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Path relative to the cgroup v2 root, starting with `/`.
    pub path: String,
    #[serde(skip)]
    pub dir: PathBuf,
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub binding: Binding,
    pub pids: Vec<u32>,
    /// When the binding last changed.
    pub since: SystemTime,
}

/// The workload table.
pub struct Workloads {
    root: PathBuf,
    by_cgroup: BTreeMap<u64, Workload>,
}

impl Workloads {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            by_cgroup: BTreeMap::new(),
        }
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
            if let Ok(read) = std::fs::read_dir(&out[i]) {
                for e in read.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        out.push(e.path());
                    }
                }
            }
            i += 1;
        }
        out
    }

    /// Forgets cgroups whose directory is gone (or was made anew).
    pub fn prune(&mut self) -> bool {
        let before = self.by_cgroup.len();
        self.by_cgroup
            .retain(|cg, w| cgroup::cgroup_id(&w.dir).is_ok_and(|now| now == *cg));
        before != self.by_cgroup.len()
    }

    /// Attests the cgroup at `dir` anew. Returns whether its binding
    /// changed. A directory that is gone is forgotten.
    pub fn attest(&mut self, dir: &Path, entries: &EntrySet, pods: &Pods, now: SystemTime) -> bool {
        let Ok(cgroup_id) = cgroup::cgroup_id(dir) else {
            let before = self.by_cgroup.len();
            self.by_cgroup.retain(|_, w| w.dir != dir);
            return before != self.by_cgroup.len();
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
        let mut changed = false;
        for w in self.by_cgroup.values_mut() {
            if w.binding.expires().is_some_and(|t| t <= now) {
                let id = w.binding.bound_id().expect("bound").clone();
                tracing::warn!(cgroup = %w.path, identity = %id, "binding expired; the cgroup is denied from now on");
                w.binding = Binding::Expired { id };
                w.since = now;
                changed = true;
            }
        }
        changed
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
        match self.by_cgroup.get_mut(&cgroup_id) {
            Some(w) => {
                w.pids = pids;
                if w.binding == binding {
                    return false;
                }
                let changed = w.binding.bound_id() != binding.bound_id();
                log_change(&path, &binding);
                w.binding = binding;
                w.since = now;
                changed
            }
            None => {
                log_change(&path, &binding);
                let changed = binding.bound_id().is_some();
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
