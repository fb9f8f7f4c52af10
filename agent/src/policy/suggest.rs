//! `idgate policy suggest`: from decision records, a policy of allow rules
//! that would have allowed exactly the connects the records show were let
//! through only by audit mode, or denied by a default. Records in, TOML
//! out; `suggest/input.rs` reads them from audit log files.
//!
//! A connect to an address is written as a name when the record says so
//! (`dst_name`: a name rule's learned address), or when a lookup of that
//! name by the same identity answered the address shortly before (the
//! DNS path's records: `answered` in audit mode, `learned` otherwise):
//! see [`Suggester::resolve`]. See docs/policy.md, "Suggesting a policy".

mod input;
mod render;

use std::collections::{BTreeMap, BTreeSet};
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

/// A connect to an address not known to be a name's yet: over which
/// transport, where to, which port.
type AddressConnect = (Transport, IpAddr, u16);

/// How long past a lookup's TTL a connect to an address it answered is
/// still taken as made through its name: the default `[dns] grace`, for
/// which a name rule keeps a learned address open past its TTL.
pub const TTL_MARGIN: Duration = Duration::from_secs(5);

/// One address one lookup answered: when, until when a connect to it
/// is taken as made through the name (TTL plus [`TTL_MARGIN`]), and the
/// name asked. Ordered by time first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Lookup {
    time: SystemTime,
    until: SystemTime,
    name: NamePattern,
}

/// An identity's connects as the policy writes them, with what the
/// comments say of the names that stand for addresses.
#[derive(Debug, Default)]
struct Book {
    connects: BTreeMap<Connect, Seen>,
    /// Per name chosen from lookups (with transport and port): the
    /// addresses it stands for, each with the other names whose lookups
    /// answered it too (at the time of a connect the name was chosen for).
    via: BTreeMap<(Transport, NamePattern, u16), BTreeMap<IpAddr, BTreeSet<NamePattern>>>,
}

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
    /// Per SPIFFE ID, every connect seen whose record named its name.
    identities: BTreeMap<String, BTreeMap<Connect, Seen>>,
    /// Per SPIFFE ID, every connect to an address without a name, by
    /// time (how many at each): [`Suggester::resolve`] names those a
    /// lookup answered.
    addressed: BTreeMap<String, BTreeMap<AddressConnect, BTreeMap<SystemTime, u64>>>,
    /// Per SPIFFE ID and address (IPv4-mapped ones as IPv4), the lookups
    /// that answered it.
    lookups: BTreeMap<String, BTreeMap<IpAddr, BTreeSet<Lookup>>>,
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
        if e.hook == "dns" {
            self.lookup(e, time);
        }
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
        let addr = if e.v4_mapped {
            unmapped(e.dst_addr)
        } else {
            e.dst_addr
        };
        // Names only for identities: `[unknown]` refuses them.
        let name = e
            .dst_name
            .as_deref()
            .filter(|_| who.is_ok())
            .and_then(|n| n.parse::<NamePattern>().ok())
            .filter(|n| !n.is_wildcard());
        if let (Ok(id), None) = (&who, &name) {
            *self
                .addressed
                .entry(id.clone())
                .or_default()
                .entry((transport, addr, e.dst_port))
                .or_default()
                .entry(time)
                .or_default() += 1;
            return Ok(());
        }
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

    /// Takes a DNS-path record: an identity's lookup that was answered
    /// (audit mode: `answered`, the addresses a name rule would learn;
    /// else `learned`) is kept per address it gave.
    fn lookup(&mut self, e: &Event, time: SystemTime) {
        let (Some(id), Some(dns), Verdict::Allow) = (&e.identity, &e.dns, e.verdict) else {
            return;
        };
        let Some(name) = e
            .dst_name
            .as_deref()
            .and_then(|n| n.parse::<NamePattern>().ok())
            .filter(|n| !n.is_wildcard())
        else {
            return;
        };
        let learned = dns.learned.iter().filter_map(|l| {
            // `ADDR ttl=SECONDS`
            let (addr, ttl) = l.split_once(" ttl=")?;
            Some((addr.parse::<IpAddr>().ok()?, ttl.parse::<u32>().ok()?))
        });
        let answered = dns
            .answered
            .iter()
            .filter(|a| a.would_drop.is_none())
            .map(|a| (a.addr, a.ttl));
        for (addr, ttl) in learned.chain(answered) {
            let until = time + Duration::from_secs(ttl.into()) + TTL_MARGIN;
            self.lookups
                .entry(id.clone())
                .or_default()
                .entry(unmapped(addr))
                .or_default()
                .insert(Lookup {
                    time,
                    until,
                    name: name.clone(),
                });
        }
    }

    /// Every identity's connects as the policy writes them. A connect to
    /// an address is written as a name when a lookup of the name by the
    /// same identity answered the address at or before the connect, and
    /// the answer's TTL plus [`TTL_MARGIN`] had not run out; of several
    /// such lookups, the last one's name (on a tie in time, the first
    /// name in order). Else it stays the address.
    fn resolve(&self) -> BTreeMap<String, Book> {
        let mut out: BTreeMap<String, Book> = BTreeMap::new();
        for (id, connects) in &self.identities {
            out.entry(id.clone()).or_default().connects = connects.clone();
        }
        let none = BTreeMap::new();
        for (id, connects) in &self.addressed {
            let book = out.entry(id.clone()).or_default();
            let lookups = self.lookups.get(id).unwrap_or(&none);
            for (&(transport, addr, port), times) in connects {
                let answers = lookups.get(&addr);
                // The longest a lookup of this address covers: older
                // lookups cannot cover a connect.
                let span = answers
                    .into_iter()
                    .flatten()
                    .map(|l| l.until.duration_since(l.time).unwrap_or_default())
                    .max()
                    .unwrap_or_default();
                for (&time, &count) in times {
                    let covering: Vec<&Lookup> = answers
                        .into_iter()
                        .flatten()
                        .rev()
                        .skip_while(|l| l.time > time)
                        .take_while(|l| l.time + span >= time)
                        .filter(|l| time <= l.until)
                        .collect();
                    // The last lookup; of those at its time, the first
                    // name (the set is ordered by time, then name).
                    let chosen = covering.first().map(|last| {
                        covering
                            .iter()
                            .filter(|l| l.time == last.time)
                            .map(|l| &l.name)
                            .min()
                            .expect("the last lookup is one")
                    });
                    let dest = match chosen {
                        Some(name) => {
                            let others = book
                                .via
                                .entry((transport, name.clone(), port))
                                .or_default()
                                .entry(addr)
                                .or_default();
                            others.extend(
                                covering
                                    .iter()
                                    .map(|l| &l.name)
                                    .filter(|n| *n != name)
                                    .cloned(),
                            );
                            Dest::Name(name.clone())
                        }
                        None => Dest::Net(IpNet::from(addr)),
                    };
                    let seen = Seen {
                        count,
                        first: time,
                        last: time,
                    };
                    book.connects
                        .entry((transport, dest, port))
                        .and_modify(|s| s.add(seen))
                        .or_insert(seen);
                }
            }
        }
        out
    }

    /// The suggested policy, as TOML with comments.
    pub fn render(&self) -> String {
        render::policy(self, &self.resolve())
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address; any other as it is.
fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        a => a,
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
