//! Metrics of the DNS path, registered with the daemon's others.

use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What the DNS path measures. Clones share the metrics.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    learn_seconds: Histogram,
}

impl DnsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        // 1 µs to 33 ms: a map update takes microseconds; the learned
        // table's lock held by the sweep makes the slow ones.
        let me = Self {
            learn_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 16)),
        };
        registry.register(
            "dns_learn_seconds",
            "Time from the upstream's answer to its addresses being in the kernel (answer filtered, learned table locked, map updates returned), for each answer learned; the workload is answered after it",
            me.learn_seconds.clone(),
        );
        me
    }

    /// One answer's addresses are in the kernel, `took` after the
    /// upstream's answer came.
    pub fn learned(&self, took: Duration) {
        self.learn_seconds.observe(took.as_secs_f64());
    }
}
