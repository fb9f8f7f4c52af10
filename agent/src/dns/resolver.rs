//! One query, from the workload's bytes to the answer it gets: who asks
//! (from the slot the kernel wrote), whether its policy names what it
//! asks for, the upstream's answer, and the learned addresses in the
//! kernel before the answer leaves.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::learned::Learned;
use super::message::{self, FilterOptions, Query};
use super::metrics::DnsMetrics;
use super::upstream::Upstream;
use super::view::{Asker, DnsView};

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
    /// does.
    pub pattern: Option<String>,
    /// Addresses learned, with the TTL handed to the workload.
    pub learned: Vec<(IpAddr, u32)>,
    /// Addresses removed from the answer, and why.
    pub dropped: Vec<(IpAddr, &'static str)>,
    /// What went wrong, for SERVFAIL.
    pub detail: Option<String>,
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
            learned: Vec::new(),
            dropped: Vec::new(),
            detail: None,
        };
        let (mut reply, outcome) = self.decide(&query, &view, &asker, &mut record).await;
        record.outcome = outcome;
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
        let Some(matched) = matched else {
            if !audit {
                return (message::not_found(query), Outcome::NotInPolicy);
            }
            return match self.upstream.exchange(query, record.over_tcp).await {
                Ok(bytes) => (bytes, Outcome::AuditAllowed),
                Err(e) => {
                    record.detail = Some(e.to_string());
                    (message::servfail(query), Outcome::UpstreamFailed)
                }
            };
        };
        let class = matched.class;
        record.pattern = Some(matched.pattern.to_owned());
        let upstream = match self.upstream.exchange(query, record.over_tcp).await {
            Ok(bytes) => bytes,
            Err(e) => {
                record.detail = Some(e.to_string());
                return (message::servfail(query), Outcome::UpstreamFailed);
            }
        };
        let answered = Instant::now();
        let filtered = match message::filter_answer(query, &upstream, self.filter) {
            Ok(f) => f,
            Err(e) => {
                record.detail = Some(e.to_string());
                return (message::servfail(query), Outcome::UpstreamFailed);
            }
        };
        record.dropped = filtered
            .dropped
            .iter()
            .map(|(a, why)| (*a, why.as_str()))
            .collect();
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
        self.metrics.learned(answered.elapsed());
        record.learned = filtered.learned;
        (filtered.bytes, Outcome::Answered)
    }
}
