//! Metrics of the DNS path, registered with the daemon's others.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::inspect::Figures;

/// An identity, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    /// The SPIFFE ID, or `unknown` for a slot no identity holds now.
    identity: String,
}

/// What the DNS path measures. Clones share the metrics. Query outcomes
/// are counted with every other decision (`idgate_decisions_total`, hook
/// `dns`).
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    learn_seconds: Histogram,
    learned: Gauge,
    capacity: Gauge,
    per_identity: Family<IdentityLabel, Gauge>,
    per_identity_limit: Gauge,
    records_dropped: Counter,
}

impl DnsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        // 1 µs to 33 ms: a map update takes microseconds; the learned
        // table's lock held by the sweep makes the slow ones.
        let me = Self {
            learn_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 16)),
            learned: Gauge::default(),
            capacity: Gauge::default(),
            per_identity: Family::default(),
            per_identity_limit: Gauge::default(),
            records_dropped: Counter::default(),
        };
        registry.register(
            "dns_learned_addresses",
            "Addresses learned from lookups, over all identities (entries of IDG_LEARNED)",
            me.learned.clone(),
        );
        registry.register(
            "dns_learned_capacity",
            "Entries IDG_LEARNED holds at most: past it, answers get SERVFAIL",
            me.capacity.clone(),
        );
        registry.register(
            "dns_identity_learned_addresses",
            "Addresses an identity's lookups learned, open now",
            me.per_identity.clone(),
        );
        registry.register(
            "dns_identity_learned_limit",
            "Addresses one identity may have learned at once ([dns] max_addresses_per_identity): past it, its answers get SERVFAIL",
            me.per_identity_limit.clone(),
        );
        registry.register(
            "dns_records_dropped",
            "DNS decision records dropped because the events reader was behind (the query was answered; its record is lost)",
            me.records_dropped.clone(),
        );
        registry.register(
            "dns_learn_seconds",
            "Time from the upstream's answer to its addresses being in the kernel (answer filtered, learned table locked, map updates returned), for each answer learned; the workload is answered after it",
            me.learn_seconds.clone(),
        );
        me
    }

    /// The learned table as it stands.
    pub fn table(&self, f: &Figures) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.learned.set(gauge(f.learned_addresses));
        self.capacity.set(idgate_common::MAX_LEARNED.into());
        self.per_identity_limit.set(f.per_identity_limit.into());
        self.per_identity.clear();
        for (identity, count, _) in f.slots.values() {
            let identity = identity
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), ToString::to_string);
            self.per_identity
                .get_or_create(&IdentityLabel { identity })
                .inc_by((*count).into());
        }
    }

    /// A decision record could not be queued for the events reader.
    pub fn record_dropped(&self) {
        self.records_dropped.inc();
    }

    /// One answer's addresses are in the kernel, `took` after the
    /// upstream's answer came.
    pub fn learned(&self, took: Duration) {
        self.learn_seconds.observe(took.as_secs_f64());
    }
}
