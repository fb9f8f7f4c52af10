//! Attestation of one cgroup: which SPIFFE ID, if any, it gets.
//!
//! # The rule
//!
//! Enforcement is per cgroup, so every process in a cgroup acts under the
//! cgroup's identity. A cgroup therefore gets an identity only when each of
//! its processes would get that same identity on its own. Precisely:
//!
//! 1. *Subjects.* Each process in the cgroup is one subject: the cgroup's
//!    facts, that process's facts, and the pod and container facts of the
//!    cgroup (when its path is a Kubernetes one and the kubelet lists the
//!    pod). An empty cgroup is a single subject with no process, so only
//!    `cgroup:`, `systemd:` and `k8s:` selectors can match it; no `unix:`
//!    selector ever does.
//! 2. *Matching.* An entry matches a subject when all of its selectors do
//!    (an entry has at least one). A fact that is missing (no readable
//!    executable, a pod the kubelet does not list) matches nothing.
//! 3. *Each subject's answer* is the set of distinct SPIFFE IDs of the
//!    entries it matches: none, one, or several.
//! 4. *The cgroup's answer*, failing closed:
//!    - no subject matches any entry: [`Attestation::Unknown`];
//!    - every subject matches, and all of them give one and the same ID:
//!      [`Attestation::Identity`] (several entries giving that ID may
//!      match; that is no conflict);
//!    - anything else: [`Attestation::Conflict`], which gets no identity.
//!      That is: a subject matching entries with different IDs, subjects
//!      giving different IDs, or some subjects giving an ID while others
//!      give none (a process that attests to nothing must not borrow the
//!      identity of its neighbours).
//!
//! A conflict is enforced like an unknown workload; it is kept apart so
//! that an operator can see which entries and processes disagree.

use std::collections::{BTreeMap, BTreeSet};

use super::entry_set::EntrySet;
use super::facts::{CgroupFacts, ProcessFacts};
use super::k8s::Pods;
use super::selector::{Selector, Subject};
use super::spiffe_id::SpiffeId;

/// What a cgroup attests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attestation {
    /// All of the cgroup's subjects give this one ID.
    Identity {
        id: SpiffeId,
        /// Indices of the matching entries, ascending.
        entries: Vec<usize>,
        /// The selectors of those entries, each once, in entry order.
        selectors: Vec<Selector>,
    },
    /// No entry matches: an unknown workload.
    Unknown,
    /// Subjects disagree, or one subject matches several IDs: no identity.
    Conflict {
        /// Each ID some subject matched, in ID order.
        candidates: Vec<Candidate>,
        /// Processes that match no entry, in the order given.
        unmatched_pids: Vec<u32>,
    },
}

/// One ID a conflicting cgroup could have had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: SpiffeId,
    /// Indices of the entries giving it that matched some subject, ascending.
    pub entries: Vec<usize>,
    /// The processes that matched it, ascending (none when the cgroup is
    /// empty).
    pub pids: Vec<u32>,
}

/// Attests a cgroup from its facts, the facts of its processes and the
/// kubelet's pods (empty off Kubernetes), by the rule at the top of this
/// module.
pub fn attest_cgroup(
    entries: &EntrySet,
    cgroup: &CgroupFacts,
    processes: &[ProcessFacts],
    pods: &Pods,
) -> Attestation {
    let pod_cgroup = cgroup.pod.as_ref();
    let pod = pod_cgroup.and_then(|p| pods.get(&p.pod_uid));
    let container = pod
        .zip(pod_cgroup.and_then(|p| p.container_id.as_deref()))
        .and_then(|(pod, id)| pod.container(id));
    let subject = |process| Subject {
        cgroup,
        process,
        pod,
        container,
    };
    let subjects: Vec<Subject<'_>> = if processes.is_empty() {
        vec![subject(None)]
    } else {
        processes.iter().map(|p| subject(Some(p))).collect()
    };

    // Per ID: the entries giving it that matched, and the processes.
    let mut matched: BTreeMap<&SpiffeId, (BTreeSet<usize>, BTreeSet<u32>)> = BTreeMap::new();
    let mut unmatched_pids = Vec::new();
    let indexed = entries.candidates(&cgroup.path);
    for subject in &subjects {
        let pid = subject.process.map(|p| p.pid);
        let mut any = false;
        for &index in &indexed {
            let entry = &entries[index];
            if entry.selectors.iter().all(|s| s.matches(subject)) {
                any = true;
                let (by_entries, by_pids) = matched.entry(&entry.id).or_default();
                by_entries.insert(index);
                by_pids.extend(pid);
            }
        }
        if !any && let Some(pid) = pid {
            unmatched_pids.push(pid);
        }
    }

    let mut candidates: Vec<Candidate> = matched
        .into_iter()
        .map(|(id, (by_entries, by_pids))| Candidate {
            id: id.clone(),
            entries: by_entries.into_iter().collect(),
            pids: by_pids.into_iter().collect(),
        })
        .collect();
    // One subject matching two IDs leaves two candidates too.
    match candidates.len() {
        0 => return Attestation::Unknown,
        1 if unmatched_pids.is_empty() => {}
        _ => {
            return Attestation::Conflict {
                candidates,
                unmatched_pids,
            };
        }
    }
    let Candidate {
        id,
        entries: indices,
        ..
    } = candidates.remove(0);
    let mut selectors: Vec<Selector> = Vec::new();
    for s in indices.iter().flat_map(|&i| &entries[i].selectors) {
        if !selectors.contains(s) {
            selectors.push(s.clone());
        }
    }
    Attestation::Identity {
        id,
        entries: indices,
        selectors,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::identity::entry::parse_entries;

    const POD_UID: &str = "8a0c5b7e-4e2f-4a8b-9d51-3c6e2f7a1b09";
    const SERVER: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    const ENTRIES: &str = r#"
[[entry]]   # 0
id = "spiffe://example.org/research"
selectors = ["cgroup:path:/system.slice/agent-*.service", "unix:uid:1001"]

[[entry]]   # 1: the same ID another way
id = "spiffe://example.org/research"
selectors = ["systemd:unit:agent-research.service", "unix:path:/usr/bin/python3.12"]

[[entry]]   # 2
id = "spiffe://example.org/ops"
selectors = ["unix:uid:0", "cgroup:path:/system.slice/*.service"]

[[entry]]   # 3: cgroup selectors only, so empty cgroups can match
id = "spiffe://example.org/batch"
selectors = ["cgroup:path:/batch.slice/*"]

[[entry]]   # 4
id = "spiffe://example.org/ns/payments/sa/checkout"
selectors = ["k8s:ns:payments", "k8s:sa:checkout", "k8s:container-name:server"]
"#;

    fn entries() -> EntrySet {
        EntrySet::new(parse_entries(Path::new("entries.toml"), ENTRIES).unwrap())
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn process(pid: u32, uid: u32, exe: &str, cgroup: &CgroupFacts) -> ProcessFacts {
        ProcessFacts {
            pid,
            uid,
            euid: uid,
            gid: uid,
            egid: uid,
            user: None,
            group: None,
            exe: Some(exe.into()),
            exe_sha256: Some([7; 32]),
            cgroup: cgroup.path.clone(),
        }
    }

    fn service() -> CgroupFacts {
        CgroupFacts::new("/system.slice/agent-research.service".into(), vec![])
    }

    fn attest(cgroup: &CgroupFacts, processes: &[ProcessFacts]) -> Attestation {
        attest_cgroup(&entries(), cgroup, processes, &Pods::default())
    }

    #[test]
    fn all_processes_agreeing_give_the_identity() {
        let cgroup = service();
        let processes = [
            process(10, 1001, "/usr/bin/python3.12", &cgroup),
            process(11, 1001, "/usr/bin/curl", &cgroup),
        ];
        let Attestation::Identity {
            id: got,
            entries,
            selectors,
        } = attest(&cgroup, &processes)
        else {
            panic!("{:?}", attest(&cgroup, &processes));
        };
        assert_eq!(got, id("spiffe://example.org/research"));
        // Process 10 matches entries 0 and 1 (one ID), process 11 only 0.
        assert_eq!(entries, [0, 1]);
        let selectors: Vec<String> = selectors.iter().map(ToString::to_string).collect();
        assert_eq!(
            selectors,
            [
                "cgroup:path:/system.slice/agent-*.service",
                "unix:uid:1001",
                "systemd:unit:agent-research.service",
                "unix:path:/usr/bin/python3.12",
            ]
        );
    }

    #[test]
    fn processes_giving_different_ids_conflict() {
        let cgroup = service();
        let processes = [
            process(10, 1001, "/usr/bin/curl", &cgroup),
            process(20, 0, "/usr/bin/curl", &cgroup),
        ];
        assert_eq!(
            attest(&cgroup, &processes),
            Attestation::Conflict {
                candidates: vec![
                    Candidate {
                        id: id("spiffe://example.org/ops"),
                        entries: vec![2],
                        pids: vec![20],
                    },
                    Candidate {
                        id: id("spiffe://example.org/research"),
                        entries: vec![0],
                        pids: vec![10],
                    },
                ],
                unmatched_pids: vec![],
            }
        );
    }

    #[test]
    fn a_process_matching_no_entry_denies_the_others_their_identity() {
        let cgroup = service();
        let processes = [
            process(10, 1001, "/usr/bin/python3.12", &cgroup),
            process(30, 65534, "/usr/bin/nc", &cgroup),
        ];
        let Attestation::Conflict {
            candidates,
            unmatched_pids,
        } = attest(&cgroup, &processes)
        else {
            panic!("expected a conflict");
        };
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].id, id("spiffe://example.org/research"));
        assert_eq!(candidates[0].entries, [0, 1]);
        assert_eq!(unmatched_pids, [30]);
    }

    #[test]
    fn one_process_matching_two_ids_conflicts() {
        let text = r#"
[[entry]]
id = "spiffe://example.org/a"
selectors = ["unix:uid:1001"]
[[entry]]
id = "spiffe://example.org/b"
selectors = ["systemd:unit:agent-research.service"]
"#;
        let entries = EntrySet::new(parse_entries(Path::new("e.toml"), text).unwrap());
        let cgroup = service();
        let processes = [process(10, 1001, "/usr/bin/curl", &cgroup)];
        let got = attest_cgroup(&entries, &cgroup, &processes, &Pods::default());
        let Attestation::Conflict {
            candidates,
            unmatched_pids,
        } = got
        else {
            panic!("{got:?}");
        };
        let ids: Vec<&str> = candidates.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/a", "spiffe://example.org/b"]);
        assert!(candidates.iter().all(|c| c.pids == [10]));
        assert!(unmatched_pids.is_empty());
    }

    #[test]
    fn nothing_matching_is_unknown() {
        let cgroup = CgroupFacts::new("/user.slice/user-1000.slice/session-3.scope".into(), vec![]);
        let processes = [process(40, 1001, "/usr/bin/python3.12", &cgroup)];
        assert_eq!(attest(&cgroup, &processes), Attestation::Unknown);
        assert_eq!(attest(&cgroup, &[]), Attestation::Unknown);
    }

    #[test]
    fn an_empty_cgroup_attests_only_through_cgroup_selectors() {
        // Entries 0-2 need a unix: fact; an empty service cgroup has none.
        assert_eq!(attest(&service(), &[]), Attestation::Unknown);
        let batch = CgroupFacts::new("/batch.slice/nightly.scope".into(), vec![]);
        let Attestation::Identity {
            id: got, entries, ..
        } = attest(&batch, &[])
        else {
            panic!("expected an identity");
        };
        assert_eq!(got, id("spiffe://example.org/batch"));
        assert_eq!(entries, [3]);
    }

    #[test]
    fn kubernetes_workloads_attest_through_the_kubelet_pods() {
        let pods =
            Pods::from_kubelet_json(include_bytes!("k8s/testdata/kubelet-pods.json")).unwrap();
        let container = |id: &str| {
            CgroupFacts::new(
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
                    POD_UID.replace('-', "_")
                ),
                vec![],
            )
        };
        let server = container(SERVER);
        let processes = [process(50, 1000, "/app/checkout", &server)];
        let got = attest_cgroup(&entries(), &server, &processes, &pods);
        assert!(
            matches!(&got, Attestation::Identity { id: i, .. }
                if *i == id("spiffe://example.org/ns/payments/sa/checkout")),
            "{got:?}"
        );
        // The sidecar is in the same pod, but it is not the server container.
        let sidecar = container("6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b");
        let got = attest_cgroup(&entries(), &sidecar, &processes, &pods);
        assert_eq!(got, Attestation::Unknown);
        // A pod the kubelet does not (or no longer) list is unknown.
        assert_eq!(
            attest_cgroup(&entries(), &server, &processes, &Pods::default()),
            Attestation::Unknown
        );
    }
}
