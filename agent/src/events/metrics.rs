//! Metrics of the decision events.

use std::borrow::Cow;

use idgate_common::UNKNOWN_SLOT;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::record::Event;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// The SPIFFE ID, `unknown` for the unknown workload, `unresolved` for
    /// a slot the agent could not name.
    identity: String,
    verdict: &'static str,
    reason: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabels {
    identity: String,
    /// The credential rule's name (empty when none was chosen).
    credential: String,
    /// `forwarded`, `passthrough`, `refused` or `failed`.
    outcome: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    /// `up` (from the workload) or `down` (to it).
    direction: &'static str,
}

/// Counters the events reader keeps. Clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct EventMetrics {
    decisions: Family<DecisionLabels, Counter>,
    broker_requests: Family<BrokerLabels, Counter>,
    broker_bytes: Family<DirectionLabels, Counter>,
    ring_drops: Counter,
    undecodable: Counter,
    audit_log_lost: Counter,
}

impl EventMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let me = Self::default();
        registry.register(
            "decision_events",
            "Decision records read from the kernel, by identity, verdict and reason (allow decisions only as sampled by events.allow_sample_rate)",
            me.decisions.clone(),
        );
        registry.register(
            "broker_requests",
            "Requests through the credential broker, and connections it refused or passed through, by identity, credential rule and outcome",
            me.broker_requests.clone(),
        );
        registry.register(
            "broker_body_bytes",
            "Body bytes through the credential broker, by direction",
            me.broker_bytes.clone(),
        );
        registry.register(
            "event_ring_drops",
            "Decision records the kernel could not write because the ring buffer was full",
            me.ring_drops.clone(),
        );
        registry.register(
            "event_undecodable",
            "Ring buffer items that were not a decision record this agent reads",
            me.undecodable.clone(),
        );
        registry.register(
            "audit_log_lost_records",
            "Decision records that could not be written to the audit log",
            me.audit_log_lost.clone(),
        );
        me
    }

    pub fn decision(&self, event: &Event) {
        let identity = match &event.identity {
            Some(id) => id.clone(),
            None if event.slot == UNKNOWN_SLOT => "unknown".into(),
            None => "unresolved".into(),
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                identity,
                verdict: event.verdict.as_str(),
                reason: event.reason.clone(),
            })
            .inc();
        if let Some(http) = &event.http {
            self.broker_requests
                .get_or_create(&BrokerLabels {
                    identity: event.identity.clone().unwrap_or_default(),
                    credential: event.rule.clone().unwrap_or_default(),
                    outcome: event.reason.clone(),
                })
                .inc();
            for (direction, bytes) in [("up", http.bytes_up), ("down", http.bytes_down)] {
                self.broker_bytes
                    .get_or_create(&DirectionLabels { direction })
                    .inc_by(bytes);
            }
        }
    }

    /// Sets the drop count to the kernel's total, which only grows.
    pub fn ring_drops_total(&self, total: u64) {
        self.ring_drops
            .inc_by(total.saturating_sub(self.ring_drops.get()));
    }

    pub fn undecodable(&self) {
        self.undecodable.inc();
    }

    pub fn audit_log_lost(&self, records: u64) {
        self.audit_log_lost.inc_by(records);
    }
}
