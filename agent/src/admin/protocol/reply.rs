//! The result of each command's reply. The agent builds them; the CLI reads
//! the result of the command it sent as its type here, so a missing or
//! renamed field is an error that names it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{Identity, Protocol, Target};
use crate::bpf::Attachment;
use crate::events::{Event, Verdict};
use crate::grants::{Grant, GrantAction};
use crate::identity::SpiffeId;
use crate::policy::{Mode, PolicyDiff};
use crate::workloads::Binding;

/// `status`: what the agent enforces now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's release.
    pub version: String,
    pub uptime_seconds: u64,
    pub scope: PathBuf,
    pub pin_dir: PathBuf,
    pub programs: Programs,
    /// The active policy generation: grows with every switch, across
    /// restarts; stays the same when nothing was switched.
    pub generation: u64,
    /// Whether a new generation is being compiled and written.
    pub reloading: bool,
    pub mode: Mode,
    /// Identities that hold a slot.
    pub identities: usize,
    /// Rules of the running policy (the default is not counted).
    pub rules: usize,
    /// Cgroups bound in the kernel.
    pub workloads: usize,
    pub revoked: Vec<SpiffeId>,
    /// Operators' grants running (`idgate grants` lists them).
    #[serde(default)]
    pub grants: usize,
    pub reloads: u64,
    pub reload_errors: u64,
    /// Pins found removed by hand, and put back.
    pub pins_restored: u64,
    /// Cgroups attested to an identity that the kernel map could not take.
    pub bind_failures: usize,
    pub max_workloads: u32,
    /// The kubelet's pod list, when `[kubernetes]` is configured.
    pub kubernetes: Option<KubeletStatus>,
    /// The DNS path, when `[dns]` is on.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
    /// Bound workloads whose identity has credential rules and that run
    /// a process as uid 0: a warning each.
    #[serde(default)]
    pub root_workloads: Vec<RootWorkload>,
}

/// A bound workload whose identity has credential rules, running
/// processes as uid 0 (real or effective): they own root's files, the
/// secret files and the egress CA's key among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootWorkload {
    /// The cgroup, from the cgroup v2 root (`/scope/web`).
    pub cgroup: String,
    pub identity: SpiffeId,
    /// Its processes that run as uid 0.
    pub pids: Vec<u32>,
}

/// The programs and what the agent did with each at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Programs {
    /// Already attached and pinned, and kept.
    pub adopted: Vec<String>,
    /// Pinned links that held another agent's program, now this agent's.
    pub replaced: Vec<String>,
    /// Attached by this agent.
    pub attached: Vec<String>,
    /// Stale links (for another scope) detached.
    pub detached: Vec<String>,
    /// Programs this kernel would not take, and why.
    pub unavailable: Vec<(String, String)>,
}

impl From<&Attachment> for Programs {
    fn from(a: &Attachment) -> Self {
        let names = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect();
        Self {
            adopted: names(&a.adopted),
            replaced: names(&a.replaced),
            attached: names(&a.attached),
            detached: a.detached.clone(),
            unavailable: a
                .unavailable
                .iter()
                .map(|(n, why)| ((*n).to_owned(), why.clone()))
                .collect(),
        }
    }
}

/// The kubelet's pod list, as last fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeletStatus {
    /// The kubelet's URL.
    pub kubelet: String,
    pub state: KubeletHealth,
    /// Pods in the list now (none while it cannot be fetched).
    pub pods: usize,
    /// RFC 3339.
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_error_at: Option<String>,
    pub fetches: u64,
    pub failures: u64,
}

/// Whether the kubelet's pod list is fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KubeletHealth {
    /// The last fetch succeeded.
    Ok,
    /// The last fetch failed: `k8s:` selectors match nothing.
    Error,
    /// No fetch has finished yet.
    Pending,
}

impl fmt::Display for KubeletHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Pending => "pending",
        })
    }
}

/// `policy_reload`: the policy switched to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReloaded {
    pub previous_generation: u64,
    pub generation: u64,
    pub diff: PolicyDiff,
}

/// `policy_show`: the running policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyShown {
    pub generation: u64,
    pub policy_path: PathBuf,
    /// What it allows, as `idgate policy check` prints it.
    pub summary: String,
}

/// `explain`: which rule decides a connect, as the kernel would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explained {
    pub identity: Identity,
    pub to: Target,
    pub protocol: Protocol,
    /// What the kernel does with the connect.
    pub verdict: Verdict,
    /// Denied because the identity is revoked, whatever the rule says.
    pub revoked: bool,
    /// The policy denies, but the identity is in audit mode: let through
    /// and reported.
    pub audit_allowed: bool,
    /// A credential rule decides: the connect goes to the credential
    /// broker, which adds the credential (`rule` names it).
    #[serde(default)]
    pub brokered: bool,
    /// The deciding rule (`default` when none matched).
    pub rule: String,
    /// The SPIFFE ID or pattern whose block holds the rule (empty for the
    /// default of the unknown workload).
    pub rule_owner: String,
    /// Whether a cgroup is bound to the identity now.
    pub bound: bool,
    pub generation: u64,
    /// For a name: the pattern of the identity's policy that covers it
    /// (`None`: no rule names it, and its lookups are answered NXDOMAIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// For a name: the running grants by name of the identity that cover
    /// it (its lookups are answered, and each grant opens the answers'
    /// addresses on its own ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<u32>,
    /// The addresses the identity's own lookups learned that this
    /// question is about (a name's, or the address asked): each with what
    /// the kernel does with the connect to it now, and until when.
    #[serde(default)]
    pub learned: Vec<LearnedOpen>,
}

/// An address a lookup opened, in `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedOpen {
    pub addr: std::net::IpAddr,
    /// The name looked up.
    pub name: Option<String>,
    pub verdict: Verdict,
    pub rule: String,
    /// Seconds until the kernel closes it (TTL plus grace).
    pub expires_in_seconds: u64,
}

/// The DNS path, in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Addresses learned, over all identities (entries of the kernel's
    /// table).
    pub learned_addresses: usize,
    /// Entries the kernel's table holds at most.
    pub capacity: u32,
    /// Addresses one identity may have learned at once.
    pub per_identity_limit: u32,
    /// Network namespaces with the resolver's listeners, the agent's own
    /// included.
    pub namespaces: usize,
    /// Where queries are forwarded.
    pub upstreams: Vec<SocketAddr>,
    /// Per identity with learned addresses.
    pub identities: Vec<DnsIdentity>,
}

/// One identity's learned names and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsIdentity {
    /// `None` for a slot no identity holds now (its entries expire).
    pub identity: Option<SpiffeId>,
    pub addresses: u32,
    /// The names looked up, sorted.
    pub names: Vec<String>,
}

/// `restart`: the agent is about to execute itself again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarting {
    /// The process, which stays the same.
    pub pid: u32,
}

/// `revoke` and `unrevoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub identity: SpiffeId,
    pub revoked: bool,
    /// False when the identity already stood so.
    pub changed: bool,
    /// The identity's slot, when it holds one.
    pub slot: Option<u32>,
}

/// `workloads`: every cgroup under the scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadsList {
    pub scope: PathBuf,
    pub workloads: Vec<WorkloadRow>,
    /// One line on the kubelet's pod list.
    pub kubernetes: String,
}

/// One cgroup under the scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRow {
    /// Path relative to the cgroup v2 root, starting with `/`.
    pub path: String,
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub binding: Binding,
    pub pids: Vec<u32>,
    /// When the binding last changed.
    pub since: SystemTime,
    /// False for a cgroup attested to an identity that the kernel map
    /// could not take (full): it is denied.
    pub enforced: bool,
}

/// `run`: the command's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub identity: SpiffeId,
    /// Path relative to the cgroup v2 root.
    pub cgroup: String,
    pub slot: Option<u32>,
    /// The trust bundle (the system's roots and the egress CA) that the
    /// command's TLS clients are pointed at, when the credential broker
    /// runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_bundle: Option<String>,
}

/// `events`: the reply before the event lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsOpened {
    pub follow: bool,
}

/// A line after the `events` reply: a decision event (as in the audit
/// log), or how many events this reader fell behind by and missed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventLine {
    Missed { missed: u64 },
    Event(Box<Event>),
}

impl FromStr for EventLine {
    type Err = serde_json::Error;

    /// An event line; the error is the event's, which names the field
    /// that is missing or wrong.
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Missed {
            missed: u64,
        }
        match serde_json::from_str::<Missed>(line) {
            Ok(Missed { missed }) => Ok(Self::Missed { missed }),
            Err(_) => serde_json::from_str(line).map(Self::Event),
        }
    }
}

/// A grant as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantShown {
    #[serde(flatten)]
    pub grant: Grant,
    /// When it ends, on the wall clock.
    pub expires_at: SystemTime,
    pub seconds_left: u64,
    /// The identity's slot: only with one is the grant in the kernel (it
    /// is written when the identity gets one).
    pub slot: Option<u32>,
    /// For a grant by name: how many addresses its identity's lookups
    /// were answered that it opens now.
    #[serde(default)]
    pub learned_addresses: usize,
}

impl From<crate::grants::Running> for GrantShown {
    fn from(r: crate::grants::Running) -> Self {
        Self {
            grant: r.grant,
            expires_at: r.expires_at,
            seconds_left: r.left.as_secs(),
            slot: r.slot,
            learned_addresses: r.learned,
        }
    }
}

/// `grant`, `grant_revoke` and `grant_extend`: what was done, to which
/// grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantChanged {
    pub action: GrantAction,
    pub grant: GrantShown,
}

/// `grants`: the running grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantsList {
    pub grants: Vec<GrantShown>,
}

/// Any command's result, as the agent sends it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Box<Status>),
    PolicyReloaded(PolicyReloaded),
    PolicyShown(PolicyShown),
    Explained(Explained),
    Revocation(Revocation),
    Workloads(WorkloadsList),
    Started(Started),
    EventsOpened(EventsOpened),
    Restarting(Restarting),
    GrantChanged(GrantChanged),
    GrantsList(GrantsList),
}

macro_rules! answers {
    ($($variant:ident($ty:ty) $(=> $wrap:path)?),* $(,)?) => {$(
        impl From<$ty> for Answer {
            fn from(result: $ty) -> Self {
                Answer::$variant($($wrap)?(result))
            }
        }
    )*};
}

answers!(
    Status(Status) => Box::new,
    PolicyReloaded(PolicyReloaded),
    PolicyShown(PolicyShown),
    Explained(Explained),
    Revocation(Revocation),
    Workloads(WorkloadsList),
    Started(Started),
    EventsOpened(EventsOpened),
    Restarting(Restarting),
    GrantChanged(GrantChanged),
    GrantsList(GrantsList),
);

#[cfg(test)]
mod tests {
    use std::fmt::Debug;
    use std::time::Duration;

    use serde::de::DeserializeOwned;

    use super::*;

    /// Serialises `value` as the agent does and reads it back as the CLI
    /// does.
    fn round_trip<T>(value: T)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug + Clone,
        Answer: From<T>,
    {
        let line = serde_json::to_string(&Answer::from(value.clone())).unwrap();
        assert_eq!(serde_json::from_str::<T>(&line).unwrap(), value, "{line}");
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn every_reply_round_trips() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        round_trip(Status {
            version: "0.1.0".into(),
            uptime_seconds: 5,
            scope: "/sys/fs/cgroup/idgate".into(),
            pin_dir: "/sys/fs/bpf/idgate".into(),
            programs: Programs {
                adopted: vec!["idgate_connect4".into()],
                unavailable: vec![("idgate_exec".into(), "EPERM".into())],
                ..Programs::default()
            },
            generation: 7,
            reloading: false,
            mode: Mode::Audit,
            identities: 2,
            rules: 3,
            workloads: 4,
            revoked: vec![id("spiffe://example.org/web")],
            grants: 2,
            reloads: 1,
            reload_errors: 0,
            pins_restored: 0,
            bind_failures: 0,
            max_workloads: 65536,
            kubernetes: Some(KubeletStatus {
                kubelet: "https://127.0.0.1:10250".into(),
                state: KubeletHealth::Error,
                pods: 0,
                last_success: None,
                last_error: Some("connect: refused".into()),
                last_error_at: Some("2026-12-06T20:00:00Z".into()),
                fetches: 3,
                failures: 1,
            }),
            dns: Some(DnsStatus::default()),
            root_workloads: vec![RootWorkload {
                cgroup: "/idgate/web".into(),
                identity: id("spiffe://example.org/web"),
                pids: vec![42],
            }],
        });
        // An agent from before the uid 0 warning: none.
        let mut older = serde_json::to_value(Status::default()).unwrap();
        older.as_object_mut().unwrap().remove("root_workloads");
        let older: Status = serde_json::from_value(older).unwrap();
        assert!(older.root_workloads.is_empty());
        round_trip(PolicyReloaded {
            previous_generation: 1,
            generation: 2,
            diff: PolicyDiff {
                rules_added: vec!["spiffe://example.org/web: db".into()],
                ..PolicyDiff::default()
            },
        });
        round_trip(PolicyShown {
            generation: 2,
            policy_path: "/etc/idgate/policy".into(),
            summary: "mode enforce\n".into(),
        });
        round_trip(Explained {
            identity: Identity::Unknown,
            to: "[::1]:53".parse().unwrap(),
            protocol: Protocol::Udp,
            verdict: Verdict::Deny,
            revoked: false,
            audit_allowed: false,
            brokered: false,
            rule: "default".into(),
            rule_owner: String::new(),
            bound: false,
            generation: 2,
            pattern: None,
            grants: vec![3],
            learned: Vec::new(),
        });
        round_trip(Revocation {
            identity: id("spiffe://example.org/web"),
            revoked: true,
            changed: true,
            slot: Some(2),
        });
        let row = |binding| WorkloadRow {
            path: "/idgate/web".into(),
            cgroup_id: 42,
            binding,
            pids: vec![1, 2],
            since: time,
            enforced: true,
        };
        round_trip(WorkloadsList {
            scope: "/sys/fs/cgroup/idgate".into(),
            workloads: vec![
                row(Binding::Attested {
                    id: id("spiffe://example.org/web"),
                    selectors: vec!["unix:uid:0".into()],
                    expires: Some(time),
                }),
                row(Binding::Operator {
                    id: id("spiffe://example.org/op"),
                    expires: None,
                }),
                row(Binding::Unknown),
                row(Binding::Conflict {
                    candidates: vec!["spiffe://example.org/a".into()],
                }),
                row(Binding::Expired {
                    id: id("spiffe://example.org/web"),
                }),
                row(Binding::Unreadable {
                    error: "gone".into(),
                }),
            ],
            kubernetes: "no kubelet configured".into(),
        });
        round_trip(Started {
            identity: id("spiffe://example.org/op"),
            cgroup: "/idgate/run-1-1".into(),
            slot: None,
            egress_bundle: Some("/var/lib/idgate/egress/bundle.pem".into()),
        });
        round_trip(EventsOpened { follow: true });
    }

    #[test]
    fn a_renamed_or_missing_field_is_an_error_that_names_it() {
        let e = serde_json::from_str::<Revocation>(
            r#"{"id":"spiffe://example.org/web","revoked":true,"changed":true,"slot":null}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing field `identity`"), "{e}");
        let e = serde_json::from_str::<Explained>(
            r#"{"identity":"unknown","to":"10.0.0.1:1","protocol":"tcp","verdict":"maybe"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `maybe`"), "{e}");
    }

    #[test]
    fn event_lines_are_events_or_missed_counts() {
        let missed = serde_json::to_string(&EventLine::Missed { missed: 3 }).unwrap();
        assert_eq!(missed, r#"{"missed":3}"#);
        assert_eq!(
            missed.parse::<EventLine>().unwrap(),
            EventLine::Missed { missed: 3 }
        );
        let event = Event {
            version: crate::events::SCHEMA_VERSION,
            time: "2026-12-06T20:00:00.000000001Z".into(),
            ktime_ns: 1,
            verdict: Verdict::Deny,
            reason: "rule".into(),
            identity: Some("spiffe://example.org/web".into()),
            slot: 2,
            generation: 1,
            rule_id: 3,
            rule: Some("no-db".into()),
            hook: "connect4".into(),
            protocol: "tcp".into(),
            dst_addr: "127.0.0.1".parse().unwrap(),
            dst_port: 5432,
            v4_mapped: false,
            pid: 10,
            tid: 10,
            uid: 0,
            gid: 0,
            comm: "psql".into(),
            exe: None,
            exe_unknown: None,
            cgroup_id: 42,
            dst_name: None,
            dns: None,
            http: None,
        };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(
            line.parse::<EventLine>().unwrap(),
            EventLine::Event(Box::new(event))
        );
        let e = line
            .replace("\"dst_port\"", "\"port\"")
            .parse::<EventLine>()
            .unwrap_err();
        assert!(e.to_string().contains("missing field `dst_port`"), "{e}");
    }
}
