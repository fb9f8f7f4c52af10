//! One query, from the workload's bytes to the answer it gets: who asks
//! (from the slot the kernel wrote), whether its policy or a grant by
//! name covers what it asks for, the upstream's answer, and the learned
//! addresses in the kernel before the answer leaves.
//!
//! A grant's addresses go to the grants' owner (the daemon's owner
//! holds them) as a [`GrantAddresses`] request; the answer waits for its
//! reply, which comes once they are in the kernel.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::rr::RecordType;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::{boot_ns, monotonic_ns};

use super::learned::Learned;
use super::message::{self, Answered, FilterOptions, Query};
use super::metrics::DnsMetrics;
use super::upstream::Upstream;
use super::view::{Asker, DnsView, GrantedName};

/// What became of a query, for the decision record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded, and the answer's addresses learned.
    Answered,
    /// In audit mode: a name no rule covers, forwarded and recorded.
    AuditAllowed,
    /// Refused: no rule of the identity covers the name.
    NotInPolicy,
    /// Refused: the asking cgroup has no identity.
    UnknownWorkload,
    /// Refused: the identity is revoked.
    Revoked,
    /// SERVFAIL: the upstreams gave no usable answer.
    UpstreamFailed,
    /// SERVFAIL: the addresses could not be put in the kernel.
    NotLearned,
}

/// A request to the grants' owner: open `addresses` (each with the end
/// of its TTL on the boot-time clock), the answer to `slot`'s lookup of
/// `name`, for those of `grants` that still run for the identity holding
/// `slot`. The reply comes once they are in the kernel: the grants they
/// were opened for, or why they were not.
#[derive(Debug)]
pub struct GrantAddresses {
    pub slot: u32,
    pub grants: Vec<u32>,
    pub name: String,
    pub addresses: Vec<(IpAddr, u64)>,
    pub reply: oneshot::Sender<Result<Vec<u32>, String>>,
}

/// How long an answer waits for the grants' owner to take and apply its
/// addresses before the workload gets SERVFAIL (about a client's own
/// timeout: the owner answers within a map update unless it is stuck).
const GRANT_WAIT: Duration = Duration::from_secs(4);

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::AuditAllowed => "audit_allowed",
            Self::NotInPolicy => "name_not_in_policy",
            Self::UnknownWorkload => "unknown_workload",
            Self::Revoked => "revoked",
            Self::UpstreamFailed => "upstream_failed",
            Self::NotLearned => "not_learned",
        }
    }

    /// Whether the workload got what it asked for.
    pub fn allowed(self) -> bool {
        matches!(self, Self::Answered | Self::AuditAllowed)
    }
}

/// A decision of the DNS path, for the audit log and metrics.
#[derive(Debug, Clone)]
pub struct DnsRecord {
    pub slot: u32,
    /// Where the kernel sent the query: the slot's resolver address.
    pub server: std::net::SocketAddr,
    pub identity: Option<String>,
    pub name: String,
    pub qtype: String,
    pub over_tcp: bool,
    pub outcome: Outcome,
    /// The name pattern of the policy that covers the query, when one
    /// does; else `grant:ID` of the grant by name that does.
    pub pattern: Option<String>,
    /// The grants by name the answer's addresses were opened for.
    pub grants: Vec<u32>,
    /// Addresses learned, with the TTL handed to the workload.
    pub learned: Vec<(IpAddr, u32)>,
    /// Addresses removed from the answer, and why.
    pub dropped: Vec<(IpAddr, &'static str)>,
    /// For a name forwarded as it is (audit mode): the addresses the
    /// answer gave it, which the workload got and nothing learned.
    pub answered: Vec<Answered>,
    /// What went wrong, for SERVFAIL; for `AuditAllowed`, why the
    /// answer's addresses could not be read.
    pub detail: Option<String>,
    /// When the answer was decided (wall clock), and the monotonic clock
    /// then: before the workload has it, so before any connect it makes
    /// to what it says.
    pub time: SystemTime,
    pub ktime_ns: u64,
}

/// The resolver: shared by every listener.
pub struct Resolver {
    pub view: watch::Receiver<Arc<DnsView>>,
    pub upstream: Upstream,
    pub learned: Arc<Mutex<Learned>>,
    pub filter: FilterOptions,
    pub grace: Duration,
    pub records: mpsc::Sender<DnsRecord>,
    pub metrics: DnsMetrics,
    /// To the grants' owner.
    pub grants: mpsc::Sender<GrantAddresses>,
}

impl Resolver {
    /// The answer to `bytes` asked by `slot`, or `None` when the query is
    /// not worth one (not a DNS query).
    pub async fn answer(
        &self,
        slot: u32,
        server: std::net::SocketAddr,
        bytes: &[u8],
        over_tcp: bool,
    ) -> Option<Vec<u8>> {
        let query = match message::parse_query(bytes) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(slot, error = %e, "malformed query");
                return e.answerable_id().map(message::formerr);
            }
        };
        let view = self.view.borrow().clone();
        let asker = view.asker(slot);
        let mut record = DnsRecord {
            slot,
            server,
            identity: asker.identity().map(|id| id.to_string()),
            name: query.name().to_owned(),
            qtype: query.qtype().to_string(),
            over_tcp,
            outcome: Outcome::Answered,
            pattern: None,
            grants: Vec::new(),
            learned: Vec::new(),
            dropped: Vec::new(),
            answered: Vec::new(),
            detail: None,
            time: SystemTime::now(),
            ktime_ns: monotonic_ns(),
        };
        let (mut reply, outcome) = self.decide(&query, &view, &asker, &mut record).await;
        record.outcome = outcome;
        (record.time, record.ktime_ns) = (SystemTime::now(), monotonic_ns());
        if !over_tcp && reply.len() > message::udp_limit(&query) {
            reply = message::truncated(&query);
        }
        if self.records.try_send(record).is_err() {
            self.metrics.record_dropped();
            tracing::debug!("DNS decision record dropped: the events queue is full");
        }
        Some(reply)
    }

    async fn decide(
        &self,
        query: &Query,
        view: &DnsView,
        asker: &Asker<'_>,
        record: &mut DnsRecord,
    ) -> (Vec<u8>, Outcome) {
        let (slot, names, audit) = match asker {
            Asker::Unknown => return (message::not_found(query), Outcome::UnknownWorkload),
            Asker::Revoked(_) => return (message::refused(query), Outcome::Revoked),
            Asker::Identity {
                slot, names, audit, ..
            } => (*slot, names, *audit),
        };
        let matched = names.and_then(|n| n.class_of(query.name()));
        let now_boot = boot_ns();
        let granted = view.grants_for(slot, query.name(), now_boot);
        let Some(matched) = matched else {
            if !granted.is_empty() {
                record.pattern = Some(format!("grant:{}", granted[0].id));
                return self.granted(query, slot, &granted, now_boot, record).await;
            }
            if !audit {
                return (message::not_found(query), Outcome::NotInPolicy);
            }
            return match self.upstream.exchange(query, record.over_tcp).await {
                Ok(bytes) => {
                    // The workload gets the upstream's bytes; the record
                    // gets the addresses they give, for `policy suggest`.
                    let private = self.filter.private_answers;
                    match message::answered_addresses(query, &bytes, private) {
                        Ok(answered) => record.answered = answered,
                        Err(e) => record.detail = Some(e.to_string()),
                    }
                    (bytes, Outcome::AuditAllowed)
                }
                Err(e) => {
                    record.detail = Some(e.to_string());
                    (message::servfail(query), Outcome::UpstreamFailed)
                }
            };
        };
        let class = matched.class;
        record.pattern = Some(matched.pattern.to_owned());
        if query.qtype() == RecordType::AAAA && view.brokered(slot, &class) {
            return (message::no_data(query), Outcome::Answered);
        }
        let (filtered, answered) = match self.forward(query, self.filter, record).await {
            Ok(answer) => answer,
            Err(failed) => return failed,
        };
        let learned = {
            let mut table = self.learned.lock().expect("not poisoned");
            table.learn(
                view,
                (slot, class),
                query.name(),
                &filtered.learned,
                self.grace,
            )
        };
        if let Err(e) = learned {
            record.detail = Some(e.to_string());
            return (message::servfail(query), Outcome::NotLearned);
        }
        // A grant by name over the same name opens its own ports to the
        // addresses too (where the name rule's do not decide).
        self.deliver(query, slot, &granted, (filtered, answered), record)
            .await
    }

    /// A name no rule covers but grants by name do: forwarded and
    /// filtered as a rule's name, its TTLs capped to the longest of the
    /// grants' time left, and its addresses opened by the grants before
    /// the answer goes.
    async fn granted(
        &self,
        query: &Query,
        slot: u32,
        granted: &[&GrantedName],
        now_boot: u64,
        record: &mut DnsRecord,
    ) -> (Vec<u8>, Outcome) {
        let left = granted
            .iter()
            .map(|g| g.expiry_boot_ns.saturating_sub(now_boot))
            .max()
            .unwrap_or(0);
        let filter = FilterOptions {
            max_ttl: self
                .filter
                .max_ttl
                .min(Duration::from_secs(left / 1_000_000_000)),
            ..self.filter
        };
        match self.forward(query, filter, record).await {
            Ok(answer) => self.deliver(query, slot, granted, answer, record).await,
            Err(failed) => failed,
        }
    }

    /// The answer to give, once `granted` (if any) have opened its
    /// addresses: SERVFAIL when they could not be.
    async fn deliver(
        &self,
        query: &Query,
        slot: u32,
        granted: &[&GrantedName],
        (filtered, answered): (message::Filtered, Instant),
        record: &mut DnsRecord,
    ) -> (Vec<u8>, Outcome) {
        if !granted.is_empty()
            && let Err(e) = self
                .open_granted(slot, granted, query.name(), &filtered.learned, record)
                .await
        {
            record.detail = Some(e);
            return (message::servfail(query), Outcome::NotLearned);
        }
        self.metrics.learned(answered.elapsed());
        record.learned = filtered.learned;
        (filtered.bytes, Outcome::Answered)
    }

    /// The upstream's answer to `query`, filtered with `filter` (what it
    /// dropped recorded), and when it came; or the SERVFAIL to give when
    /// there is no usable answer.
    async fn forward(
        &self,
        query: &Query,
        filter: FilterOptions,
        record: &mut DnsRecord,
    ) -> Result<(message::Filtered, Instant), (Vec<u8>, Outcome)> {
        let mut failed = |e: String| {
            record.detail = Some(e);
            (message::servfail(query), Outcome::UpstreamFailed)
        };
        let upstream = match self.upstream.exchange(query, record.over_tcp).await {
            Ok(bytes) => bytes,
            Err(e) => return Err(failed(e.to_string())),
        };
        let answered = Instant::now();
        let filtered = match message::filter_answer(query, &upstream, filter) {
            Ok(f) => f,
            Err(e) => return Err(failed(e.to_string())),
        };
        record.dropped = filtered
            .dropped
            .iter()
            .map(|(a, why)| (*a, why.as_str()))
            .collect();
        Ok((filtered, answered))
    }

    /// Has the grants' owner open `addrs` (with the TTL handed to the
    /// workload) for `granted`, and waits until they are in the kernel.
    async fn open_granted(
        &self,
        slot: u32,
        granted: &[&GrantedName],
        name: &str,
        addrs: &[(IpAddr, u32)],
        record: &mut DnsRecord,
    ) -> Result<(), String> {
        if addrs.is_empty() {
            return Ok(());
        }
        let now_boot = boot_ns();
        let addresses = addrs
            .iter()
            .map(|(a, ttl)| {
                let open = Duration::from_secs((*ttl).into()) + self.grace;
                (*a, now_boot.saturating_add(open.as_nanos() as u64))
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let request = GrantAddresses {
            slot,
            grants: granted.iter().map(|g| g.id).collect(),
            name: name.to_owned(),
            addresses,
            reply,
        };
        let asked = async {
            self.grants
                .send(request)
                .await
                .map_err(|_| "the agent's state owner is gone".to_owned())?;
            answer
                .await
                .map_err(|_| "the agent's state owner gave no answer".to_owned())?
        };
        let opened = tokio::time::timeout(GRANT_WAIT, asked)
            .await
            .map_err(|_| {
                format!("the grants' addresses were not in the kernel within {GRANT_WAIT:?}")
            })??;
        record.grants = opened;
        Ok(())
    }
}
