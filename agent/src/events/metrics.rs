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

/// Counters the events reader keeps. Clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct EventMetrics {
    decisions: Family<DecisionLabels, Counter>,
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
