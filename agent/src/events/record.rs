//! Decoding a kernel decision record and naming what it refers to: the
//! identity of its slot, its rule, the wall-clock time and the executable.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, UNIX_EPOCH};

use idgate_common::{
    DecisionRecord, RECORD_LAYOUT, UNKNOWN_SLOT, hook, reason, record_flags, verdict,
};
use nix::time::ClockId;
use serde::{Deserialize, Serialize};

use super::Verdict;
use super::names::{SlotName, Snapshot};
use crate::bpf::ring::SizeError;
use crate::clock::{boot_ns, clock_ns};
use crate::dns::{DnsRecord, NameBook};
use crate::egress::{BrokerRecord, Outcome as BrokerOutcome};

/// `version` of the JSON events this agent writes (`docs/events.md`).
pub const SCHEMA_VERSION: u32 = 1;

/// Why a ring-buffer item is not a record this agent can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("record layout {0}, this agent reads layout {RECORD_LAYOUT}")]
    Layout(u32),
    #[error("unknown {what} code {code}")]
    Code { what: &'static str, code: u32 },
}

/// Reads one ring-buffer item as a [`DecisionRecord`].
pub fn decode(bytes: &[u8]) -> Result<DecisionRecord, DecodeError> {
    let record: DecisionRecord = crate::bpf::ring::read(bytes)?;
    if record.layout != RECORD_LAYOUT {
        return Err(DecodeError::Layout(record.layout));
    }
    let code = |what, code| DecodeError::Code { what, code };
    hook::name(record.hook).ok_or(code("hook", record.hook))?;
    reason::name(record.reason).ok_or(code("reason", record.reason))?;
    if record.verdict != verdict::ALLOW && record.verdict != verdict::DENY {
        return Err(code("verdict", record.verdict));
    }
    Ok(record)
}

/// One decision with names: a line of the audit log. Field by field in
/// `docs/events.md`. `idgate events` reads it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub version: u32,
    /// RFC 3339, UTC, nanoseconds.
    pub time: String,
    /// The kernel's `CLOCK_MONOTONIC` at the decision.
    pub ktime_ns: u64,
    pub verdict: Verdict,
    pub reason: Cow<'static, str>,
    /// The SPIFFE ID, or `None` for the unknown workload and for a slot
    /// this agent cannot name.
    pub identity: Option<String>,
    pub slot: u32,
    pub generation: u32,
    pub rule_id: u32,
    /// The rule's name (`default` for a default decision), when known;
    /// `None` for a revoked or policy-less slot.
    pub rule: Option<String>,
    pub hook: Cow<'static, str>,
    /// `tcp`, `udp`, `mptcp`, or the IP protocol number.
    pub protocol: String,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub v4_mapped: bool,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// The executable, when the thread still runs under the same name.
    pub exe: Option<String>,
    /// Why `exe` is `None`.
    pub exe_unknown: Option<ExeUnknown>,
    pub cgroup_id: u64,
    /// The name whose lookup opened `dst_addr` (a rule for a name
    /// decided), or the name a DNS query asked for (`hook` `dns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    /// For a decision of the DNS path (`hook` `dns`): what was asked and
    /// what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDetail>,
    /// For a decision of the credential broker (`hook` `broker`): the
    /// request and what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpDetail>,
}

/// What a credential broker record adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpDetail {
    /// The TLS server name the workload asked for; none for plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// None for a connection refused or passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The path, without its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The status the workload got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Body bytes from the workload (a passthrough: every byte).
    pub bytes_up: u64,
    /// Body bytes to the workload (a passthrough: every byte).
    pub bytes_down: u64,
    /// From the request's head to the end of its response.
    pub duration_us: u64,
    /// Why it was refused or failed, as the workload was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What a DNS-path decision record adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsDetail {
    /// The record type asked for (`A`, `AAAA`, ...).
    pub qtype: String,
    /// Addresses learned, as `ADDR ttl=SECONDS`.
    #[serde(default)]
    pub learned: Vec<String>,
    /// Addresses removed from the answer, as `ADDR (why)`.
    #[serde(default)]
    pub dropped: Vec<String>,
    /// For a name no rule covers, forwarded in audit mode: the addresses
    /// the answer gave the workload (nothing was learned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answered: Vec<AnsweredAddress>,
    /// What went wrong, when the answer was SERVFAIL; for
    /// `audit_allowed`, why the answer's addresses could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The grants by name (`grant:ID`) the answer's addresses were
    /// opened for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
}

/// An address an answer forwarded in audit mode gave the name asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnsweredAddress {
    pub addr: IpAddr,
    /// The answer's TTL for it, in seconds.
    pub ttl: u32,
    /// Why a name rule's answer would drop it on this agent
    /// (`private_answers = "deny"`: `private`, `loopback`, ...); left
    /// out when a name rule would learn it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_drop: Option<String>,
}

/// Why a decision's executable is not named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExeUnknown {
    /// The thread had ended (or its process was a zombie) when the agent
    /// read the record.
    Exited,
    /// The thread runs under another name now: it renamed itself or ran
    /// another program, or its id was reused.
    Renamed,
    /// `/proc/PID/exe` cannot be read of a live process: a kernel thread.
    Unreadable,
}

impl ExeUnknown {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exited => "exited",
            Self::Renamed => "renamed",
            Self::Unreadable => "unreadable",
        }
    }
}

/// Turns records into events.
pub struct Enricher {
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME`, in nanoseconds.
    boot_to_wall_ns: i128,
    /// Executables looked up in this batch, by pid, tid and thread name.
    exes: HashMap<(u32, u32, [u8; 16]), Result<String, ExeUnknown>>,
}

impl Enricher {
    pub fn new() -> Self {
        let mut me = Self {
            boot_to_wall_ns: 0,
            exes: HashMap::new(),
        };
        me.begin_batch();
        me
    }

    /// Call before each batch of records: takes the offset between boot
    /// time and wall-clock time again (the clock may have been set), and
    /// forgets the executables looked up (processes come and go).
    pub fn begin_batch(&mut self) {
        self.boot_to_wall_ns =
            i128::from(clock_ns(ClockId::CLOCK_REALTIME)) - i128::from(boot_ns());
        self.exes.clear();
    }

    /// The event of a record from [`decode`]. `names` is indexed by
    /// generation; `book` names learned addresses.
    pub fn event(&mut self, r: &DecisionRecord, names: &Snapshot, book: &NameBook) -> Event {
        let table = names[(r.generation & 1) as usize].as_deref();
        let identity = match table.map(|t| t.slot(r.slot)) {
            Some(SlotName::Identity(id)) => Some(id.to_string()),
            _ => None,
        };
        let rule = match r.reason {
            // An operator's grant: its id is the rule id.
            reason::GRANT => Some(format!("grant:{}", r.rule_id)),
            // A revoked or policy-less slot is denied before any rule is
            // read.
            reason::REVOKED | reason::NO_POLICY => None,
            _ => table
                .and_then(|t| t.rule(r.rule_id))
                .map(|rule| rule.name.to_string()),
        };
        let (pid, tid) = ((r.pid_tgid >> 32) as u32, r.pid_tgid as u32);
        let comm = comm(&r.comm);
        let exe = self
            .exes
            .entry((pid, tid, r.comm))
            .or_insert_with(|| exe_of(pid, tid, &comm))
            .clone();
        let exe_unknown = exe.as_ref().err().copied();
        let wall_ns = i128::from(r.boot_ns) + self.boot_to_wall_ns;
        let time = UNIX_EPOCH + Duration::from_nanos(u64::try_from(wall_ns).unwrap_or(0));
        Event {
            version: SCHEMA_VERSION,
            time: humantime::format_rfc3339_nanos(time).to_string(),
            ktime_ns: r.ktime_ns,
            verdict: if r.verdict == verdict::ALLOW {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            reason: reason::name(r.reason).expect("checked by decode").into(),
            identity,
            slot: r.slot,
            generation: r.generation,
            rule_id: r.rule_id,
            rule,
            hook: hook::name(r.hook).expect("checked by decode").into(),
            protocol: protocol(r.protocol),
            dst_addr: address(r),
            dst_port: r.port as u16,
            v4_mapped: r.flags & record_flags::V4_MAPPED != 0,
            pid,
            tid,
            uid: r.uid_gid as u32,
            gid: (r.uid_gid >> 32) as u32,
            comm,
            exe: exe.ok(),
            exe_unknown,
            cgroup_id: r.cgroup_id,
            dst_name: (r.flags & record_flags::LEARNED != 0)
                .then(|| book.get(r.name_id))
                .flatten()
                .map(|n| n.to_string()),
            dns: None,
            http: None,
        }
    }

    /// The event of a decision of the DNS path.
    /// Its kernel fields are zero: a query over UDP carries no
    /// credentials, and the kernel made no decision (`generation` 0).
    pub fn dns_event(&self, r: &DnsRecord) -> Event {
        Event {
            version: SCHEMA_VERSION,
            time: humantime::format_rfc3339_nanos(r.time).to_string(),
            ktime_ns: r.ktime_ns,
            verdict: if r.outcome.allowed() {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            reason: r.outcome.as_str().into(),
            identity: r.identity.clone(),
            slot: r.slot,
            generation: 0,
            rule_id: 0,
            rule: r.pattern.clone(),
            hook: "dns".into(),
            protocol: if r.over_tcp { "tcp" } else { "udp" }.into(),
            dst_addr: r.server.ip(),
            dst_port: r.server.port(),
            v4_mapped: false,
            pid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            comm: String::new(),
            exe: None,
            exe_unknown: None,
            cgroup_id: 0,
            dst_name: Some(r.name.clone()),
            dns: Some(DnsDetail {
                qtype: r.qtype.clone(),
                learned: r
                    .learned
                    .iter()
                    .map(|(a, ttl)| format!("{a} ttl={ttl}"))
                    .collect(),
                dropped: r
                    .dropped
                    .iter()
                    .map(|(a, why)| format!("{a} ({why})"))
                    .collect(),
                answered: r
                    .answered
                    .iter()
                    .map(|a| AnsweredAddress {
                        addr: a.addr,
                        ttl: a.ttl,
                        would_drop: a.would_drop.map(|why| why.as_str().to_owned()),
                    })
                    .collect(),
                detail: r.detail.clone(),
                grants: r.grants.iter().map(|g| format!("grant:{g}")).collect(),
            }),
            http: None,
        }
    }

    /// The event of a request (or connection) of the credential broker.
    /// The upstream's address is the broker's to choose, not in the
    /// record: `dst_addr` is the unspecified address, `dst_name` the
    /// host. Its kernel fields are zero.
    pub fn broker_event(&self, r: &BrokerRecord) -> Event {
        let (verdict, reason, detail) = match &r.outcome {
            BrokerOutcome::Forwarded => (Verdict::Allow, "forwarded", None),
            BrokerOutcome::Passthrough => (Verdict::Allow, "passthrough", None),
            BrokerOutcome::Refused(why) => (Verdict::Deny, "refused", Some(why.clone())),
            BrokerOutcome::Failed(why) => (Verdict::Allow, "failed", Some(why.clone())),
        };
        Event {
            version: SCHEMA_VERSION,
            time: humantime::format_rfc3339_nanos(r.at).to_string(),
            ktime_ns: 0,
            verdict,
            reason: reason.into(),
            identity: r.identity.as_ref().map(ToString::to_string),
            slot: r.slot.unwrap_or(UNKNOWN_SLOT),
            generation: 0,
            rule_id: 0,
            rule: r.credential.as_deref().map(str::to_owned),
            hook: "broker".into(),
            protocol: "tcp".into(),
            dst_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst_port: if r.sni.is_some() { 443 } else { 80 },
            v4_mapped: false,
            pid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            comm: String::new(),
            exe: None,
            exe_unknown: None,
            cgroup_id: 0,
            dst_name: r.host.clone().or_else(|| r.sni.clone()),
            dns: None,
            http: Some(HttpDetail {
                sni: r.sni.clone(),
                method: r.method.clone(),
                path: r.path.clone(),
                status: r.status,
                bytes_up: r.bytes_up,
                bytes_down: r.bytes_down,
                duration_us: u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX),
                detail,
            }),
        }
    }
}

fn address(r: &DecisionRecord) -> IpAddr {
    match r.hook {
        hook::CONNECT4 | hook::SENDMSG4 => {
            IpAddr::V4(Ipv4Addr::new(r.addr[0], r.addr[1], r.addr[2], r.addr[3]))
        }
        _ => IpAddr::V6(Ipv6Addr::from(r.addr)),
    }
}

fn protocol(number: u32) -> String {
    match number {
        6 => "tcp".into(),
        17 => "udp".into(),
        262 => "mptcp".into(),
        n => n.to_string(),
    }
}

/// The kernel's NUL-padded thread name.
fn comm(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

/// The kernel's task flag for a process on its way out (`PF_EXITING`,
/// include/linux/sched.h), as `/proc/PID/stat` shows it.
const PF_EXITING: u32 = 0x4;

/// The executable of process `pid`, if its thread `tid` still exists under
/// the name the record has: a process that exited, or a pid reused by
/// another program, gives why it is not named rather than a wrong answer.
fn exe_of(pid: u32, tid: u32, comm: &str) -> Result<String, ExeUnknown> {
    let now = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map_err(|_| ExeUnknown::Exited)?;
    if now.strip_suffix('\n').unwrap_or(&now) != comm {
        return Err(ExeUnknown::Renamed);
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|_| {
        // A process that is exiting (its memory, and with it the
        // executable, already let go) or has exited but is not yet reaped
        // keeps its threads' names, not its executable.
        match procfs::process::Process::new(pid as i32).and_then(|p| p.stat()) {
            Ok(stat) if !matches!(stat.state, 'Z' | 'X') && stat.flags & PF_EXITING == 0 => {
                ExeUnknown::Unreadable
            }
            _ => ExeUnknown::Exited,
        }
    })?;
    Ok(exe.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use idgate_common::UNKNOWN_SLOT;

    use super::*;
    use crate::events::names::Names;
    use crate::policy::{RuleInfo, RuleTable};

    fn bytes(r: &DecisionRecord) -> Vec<u8> {
        // SAFETY: a plain `repr(C)` record without padding.
        unsafe { std::slice::from_raw_parts((r as *const DecisionRecord).cast(), size_of_val(r)) }
            .to_vec()
    }

    /// A deny by rule 1 of slot 3, made by this very thread.
    fn sample() -> DecisionRecord {
        let mut comm = [0u8; 16];
        let me = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let me = me.trim_end().as_bytes();
        comm[..me.len()].copy_from_slice(me);
        let tid = nix::unistd::gettid().as_raw() as u64;
        DecisionRecord {
            ktime_ns: 5,
            boot_ns: crate::clock::boot_ns(),
            cgroup_id: 77,
            pid_tgid: (u64::from(std::process::id()) << 32) | tid,
            uid_gid: (1002 << 32) | 1001,
            slot: 3,
            generation: 1,
            hook: hook::CONNECT6,
            protocol: 6,
            verdict: verdict::DENY,
            reason: reason::RULE,
            rule_id: 1,
            flags: record_flags::V4_MAPPED,
            port: 443,
            layout: RECORD_LAYOUT,
            addr: "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets(),
            comm,
            name_id: 0,
            _pad: 0,
        }
    }

    fn names() -> Names {
        let names = Names::default();
        let rules = RuleTable::from(vec![
            RuleInfo {
                owner: "".into(),
                name: "default".into(),
            },
            RuleInfo {
                owner: "spiffe://example.org/web".into(),
                name: "no-metadata".into(),
            },
        ]);
        names.publish(
            1,
            1,
            &[(3, "spiffe://example.org/web".parse().unwrap())],
            &rules,
        );
        names
    }

    #[test]
    fn decodes_and_names_a_record() {
        let r = sample();
        let decoded = decode(&bytes(&r)).unwrap();
        assert_eq!(decoded, r);
        let e = Enricher::new().event(&decoded, &names().snapshot(), &NameBook::default());
        assert_eq!(e.version, SCHEMA_VERSION);
        assert_eq!(e.identity.as_deref(), Some("spiffe://example.org/web"));
        assert_eq!(e.rule.as_deref(), Some("no-metadata"));
        assert_eq!(
            (e.verdict, &*e.reason, &*e.hook),
            (Verdict::Deny, "rule", "connect6")
        );
        assert_eq!(e.protocol, "tcp");
        assert_eq!(e.dst_addr.to_string(), "::ffff:10.1.2.3");
        assert!(e.v4_mapped);
        assert_eq!((e.dst_port, e.uid, e.gid), (443, 1001, 1002));
        assert_eq!(e.pid, std::process::id());
        assert_eq!(
            e.exe,
            Some(std::env::current_exe().unwrap().display().to_string())
        );
        assert_eq!(e.exe_unknown, None);
        // The wall-clock time is now, give or take.
        let t = humantime::parse_rfc3339(&e.time).unwrap();
        let skew = t.elapsed().unwrap_or_default();
        assert!(
            skew < Duration::from_secs(5),
            "{} is off by {skew:?}",
            e.time
        );
    }

    #[test]
    fn another_generation_or_a_gone_thread_is_not_named() {
        let mut r = sample();
        r.generation = 0;
        r.comm = *b"someone-else\0\0\0\0";
        r.hook = hook::SENDMSG4;
        r.addr = [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let e = Enricher::new().event(&r, &names().snapshot(), &NameBook::default());
        assert_eq!((e.identity, e.rule, e.exe), (None, None, None));
        assert_eq!(e.exe_unknown, Some(ExeUnknown::Renamed));
        // No such thread: it has ended.
        r.pid_tgid = (u64::from(std::process::id()) << 32) | u64::from(u32::MAX - 1);
        let e = Enricher::new().event(&r, &names().snapshot(), &NameBook::default());
        assert_eq!((e.exe, e.exe_unknown), (None, Some(ExeUnknown::Exited)));
        assert_eq!(e.dst_addr.to_string(), "192.0.2.1");
        assert_eq!(e.comm, "someone-else");

        r.slot = UNKNOWN_SLOT;
        let none: Snapshot = [None, Some(Arc::default())];
        assert_eq!(
            Enricher::new()
                .event(&r, &none, &NameBook::default())
                .identity,
            None
        );
    }

    #[test]
    fn a_revoked_decision_names_no_rule() {
        let mut r = sample();
        r.reason = reason::REVOKED;
        r.rule_id = 0;
        let e = Enricher::new().event(&r, &names().snapshot(), &NameBook::default());
        assert_eq!((&*e.reason, e.rule), ("revoked", None));
        assert_eq!(e.identity.as_deref(), Some("spiffe://example.org/web"));
    }

    #[test]
    fn a_grant_decision_names_the_grant() {
        let mut r = sample();
        r.verdict = verdict::ALLOW;
        r.reason = reason::GRANT;
        r.rule_id = 17;
        let e = Enricher::new().event(&r, &names().snapshot(), &NameBook::default());
        assert_eq!((&*e.reason, e.rule.as_deref()), ("grant", Some("grant:17")));
        assert_eq!(e.verdict, Verdict::Allow);
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        let r = sample();
        assert!(matches!(
            decode(&bytes(&r)[..50]),
            Err(DecodeError::Size(SizeError { got: 50, .. }))
        ));
        let mut other = r;
        other.layout = RECORD_LAYOUT + 1;
        assert_eq!(
            decode(&bytes(&other)),
            Err(DecodeError::Layout(RECORD_LAYOUT + 1))
        );
        let mut other = r;
        other.reason = 99;
        assert!(matches!(
            decode(&bytes(&other)),
            Err(DecodeError::Code { what: "reason", .. })
        ));
        let mut other = r;
        other.verdict = 7;
        assert!(matches!(
            decode(&bytes(&other)),
            Err(DecodeError::Code {
                what: "verdict",
                ..
            })
        ));
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol(17), "udp");
        assert_eq!(protocol(262), "mptcp");
        assert_eq!(protocol(132), "132");
    }
}
