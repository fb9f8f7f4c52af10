//! `idgate policy suggest`: from decision records, a policy of allow rules
//! that would have allowed exactly the connects the records show were let
//! through only by audit mode, or denied by a default. Records in, TOML
//! out; `suggest/input.rs` reads them from audit log files.
//! See docs/policy.md, "Suggesting a policy".

mod input;
mod render;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::names::NamePattern;
use crate::events::{Event, LostRecord, Verdict};
use crate::identity::SpiffeId;

pub use input::{SuggestError, parse_since, read_audit_log};

/// Which records to take, and how far to merge addresses.
#[derive(Debug, Clone)]
pub struct SuggestOptions {
    /// Only this identity's records.
    pub identity: Option<SpiffeId>,
    /// Only records of this time or later.
    pub since: Option<SystemTime>,
    /// Addresses are merged into IPv4 prefixes no shorter than this; 32
    /// (the default) merges nothing.
    pub prefix_v4: u8,
    /// The same for IPv6; 128 merges nothing.
    pub prefix_v6: u8,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        Self {
            identity: None,
            since: None,
            prefix_v4: 32,
            prefix_v6: 128,
        }
    }
}

/// A transport a rule can name (`tcp` covers MPTCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn word(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A destination as a rule's `to` writes it: addresses first, then names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Net(IpNet),
    Name(NamePattern),
}

/// How many connects, and when the first and the last were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    count: u64,
    first: SystemTime,
    last: SystemTime,
}

impl Seen {
    fn at(time: SystemTime) -> Self {
        Self {
            count: 1,
            first: time,
            last: time,
        }
    }

    fn add(&mut self, other: Seen) {
        self.count += other.count;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

fn merge_into(into: &mut Option<Seen>, seen: Seen) {
    match into {
        Some(s) => s.add(seen),
        None => *into = Some(seen),
    }
}

/// One connect seen: over which transport, where to, which port.
type Connect = (Transport, Dest, u16);

/// Why a record was not taken, when that says something about the output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Unusable {
    /// A protocol no rule names (the IP protocol number).
    Protocol(String),
    /// Port 0, which no rule takes.
    PortZero,
}

/// Collects decision records; [`Suggester::render`] writes the policy.
#[derive(Debug, Default)]
pub struct Suggester {
    options: SuggestOptions,
    /// Per SPIFFE ID, every connect seen.
    identities: BTreeMap<String, BTreeMap<Connect, Seen>>,
    /// Connects of workloads no rule can be written for, by who they
    /// were: unknown workloads, and slots the agent could not name.
    unnamed: BTreeMap<String, BTreeMap<Connect, Seen>>,
    /// Records of taken reasons that no rule can express.
    unusable: BTreeMap<(String, Unusable), u64>,
    /// Every decision record in the window, taken or not.
    window: Option<Seen>,
    /// Decision records the source says were lost in the window.
    missed: u64,
}

/// Whether a decision is one an allow rule would have changed: let
/// through only by audit mode, or denied because no rule covered it.
/// Denials by a `deny` rule, revocations and the DNS path's own
/// decisions are not.
fn wanted(e: &Event) -> bool {
    e.hook != "dns"
        && matches!(
            (e.verdict, &*e.reason),
            (Verdict::Allow, "audit_allowed") | (Verdict::Deny, "default" | "unknown_workload")
        )
}

/// A record's `time` that is not RFC 3339.
#[derive(Debug, thiserror::Error)]
#[error("`time` {time:?} is not an RFC 3339 time: {source}")]
pub struct BadTime {
    time: String,
    source: humantime::TimestampError,
}

fn parse_time(time: &str) -> Result<SystemTime, BadTime> {
    humantime::parse_rfc3339_weak(time).map_err(|source| BadTime {
        time: time.to_owned(),
        source,
    })
}

impl Suggester {
    pub fn new(options: SuggestOptions) -> Self {
        Self {
            options,
            ..Self::default()
        }
    }

    /// Counts decision records the source lost: the suggestion cannot be
    /// complete, and says so.
    pub fn missed(&mut self, records: u64) {
        self.missed += records;
    }

    /// How many records were lost, as given to [`Suggester::missed`].
    pub fn missed_records(&self) -> u64 {
        self.missed
    }

    /// Takes a record of records lost (`kind` `lost` in the audit log):
    /// counted when it is in the window.
    pub fn lost(&mut self, r: &LostRecord) -> Result<(), BadTime> {
        let time = parse_time(&r.time)?;
        if self.options.since.is_none_or(|since| time >= since) {
            self.missed(r.records);
        }
        Ok(())
    }

    /// Takes one decision record. Records of other identities, before
    /// `since`, or of decisions an allow rule would not change are
    /// counted in the window or left out.
    pub fn add(&mut self, e: &Event) -> Result<(), BadTime> {
        let time = parse_time(&e.time)?;
        if self.options.since.is_some_and(|since| time < since) {
            return Ok(());
        }
        if let Some(id) = &self.options.identity
            && e.identity.as_deref() != Some(id.as_str())
        {
            return Ok(());
        }
        merge_into(&mut self.window, Seen::at(time));
        if !wanted(e) {
            return Ok(());
        }
        let who = match (&e.identity, e.slot) {
            (Some(id), _) => Ok(id.clone()),
            (None, 0) => Err("unknown workloads (no identity)".to_owned()),
            (None, slot) => Err(format!(
                "slot {slot} (the agent could not name its identity)"
            )),
        };
        let label = who.as_ref().unwrap_or_else(|w| w);
        let transport = match e.protocol.as_str() {
            "tcp" | "mptcp" => Transport::Tcp,
            "udp" => Transport::Udp,
            other => {
                let key = (label.clone(), Unusable::Protocol(other.to_owned()));
                *self.unusable.entry(key).or_default() += 1;
                return Ok(());
            }
        };
        if e.dst_port == 0 {
            *self
                .unusable
                .entry((label.clone(), Unusable::PortZero))
                .or_default() += 1;
            return Ok(());
        }
        // An IPv6 socket's connect to `::ffff:a.b.c.d` is judged by the
        // IPv4 rules.
        let addr = match e.dst_addr {
            IpAddr::V6(v6) if e.v4_mapped => v6.to_ipv4_mapped().map_or(e.dst_addr, IpAddr::V4),
            a => a,
        };
        // Names only for identities: `[unknown]` refuses them.
        let name = e
            .dst_name
            .as_deref()
            .filter(|_| who.is_ok())
            .and_then(|n| n.parse::<NamePattern>().ok())
            .filter(|n| !n.is_wildcard());
        let dest = name.map_or(Dest::Net(IpNet::from(addr)), Dest::Name);
        let book = match who {
            Ok(id) => self.identities.entry(id).or_default(),
            Err(who) => self.unnamed.entry(who).or_default(),
        };
        book.entry((transport, dest, e.dst_port))
            .and_modify(|s| s.add(Seen::at(time)))
            .or_insert(Seen::at(time));
        Ok(())
    }

    /// The suggested policy, as TOML with comments.
    pub fn render(&self) -> String {
        render::policy(self)
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// A time in comments: RFC 3339 to the second.
fn when(t: SystemTime) -> humantime::Rfc3339Timestamp {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests;
