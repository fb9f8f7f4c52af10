//! The daemon's side of events and metrics: the audit log and metrics
//! listener are opened before anything is put in the kernel; once the
//! programs are in place the events reader and the metrics server start;
//! after every change the agent applies, the names events are given and
//! the state's metrics are brought up to date.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use idgate_common::{MAX_GRANT_ENTRIES, MAX_SET_DESTS, MAX_SET_PORT_BLOCKS, MAX_SLOTS, maps};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::DaemonError;
use super::state::State;
use crate::config::Config;
use crate::events::{self, EventFeed, EventMetrics, Names, Sinks};
use crate::policy::RuleSet;

/// What is opened before the kernel is touched.
pub struct Prepared {
    sinks: Sinks,
    listener: Option<std::net::TcpListener>,
}

/// Opens the audit log and binds the metrics listener: a path that cannot
/// be written, or an address in use, stops the agent here.
pub fn prepare(config: &Config) -> Result<Prepared, DaemonError> {
    Ok(Prepared {
        sinks: events::open_sinks(&config.events)?,
        listener: config.metrics.bind()?,
    })
}

impl Prepared {
    /// Starts the events reader and the metrics server for the agent in
    /// `state`, whose programs and maps are in place.
    pub fn start(self, state: &State, feeds: events::Feeds) -> Result<Telemetry, DaemonError> {
        let mut registry = Registry::with_prefix("idgate");
        let event_metrics = EventMetrics::new(&mut registry);
        let telemetry = Telemetry {
            dns: crate::dns::DnsMetrics::new(&mut registry),
            feed: self.sinks.feed(),
            names: Arc::new(Names::default()),
            metrics: StateMetrics::new(&mut registry),
        };
        telemetry.publish(state);
        events::start(
            &state.config.pin_dir,
            &state.config.events,
            self.sinks,
            telemetry.names.clone(),
            event_metrics,
            feeds,
        )?;
        if let Some(listener) = self.listener {
            crate::metrics::serve(listener, Arc::new(registry))?;
        }
        Ok(telemetry)
    }
}

/// The running events reader's names, and the policy metrics.
pub struct Telemetry {
    /// Decision events for `idgate events`.
    pub feed: EventFeed,
    /// The DNS path's metrics, for `DnsPath::start`.
    pub dns: crate::dns::DnsMetrics,
    names: Arc<Names>,
    metrics: StateMetrics,
}

impl Telemetry {
    /// The gauge of requests queued for the owner, which the senders and
    /// the owner keep.
    pub fn owner_queue(&self) -> Gauge {
        self.metrics.owner_queue.clone()
    }

    /// Call after anything that may have changed what is applied.
    pub fn publish(&self, state: &State) {
        let applied = &state.applied;
        self.names.publish(
            applied.buffer(),
            applied.generation,
            &applied.identities,
            &applied.compiled.rules,
        );
        self.metrics.observe(state);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Policy, map and workload figures, read from the daemon's state.
struct StateMetrics {
    generation: Gauge,
    /// Requests waiting for the daemon's owner (counted by the senders).
    owner_queue: Gauge,
    reloads: Counter,
    reload_errors: Counter,
    identities: Gauge,
    revoked: Gauge,
    grants: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    workloads: Family<StateLabels, Gauge>,
    /// Every workload state reported so far: one that empties shows 0.
    workload_states: Mutex<BTreeSet<&'static str>>,
    /// The entries of the fullest destination and port tries of the
    /// generation (by its number) they were counted for.
    fullest: Mutex<Option<(u64, usize, usize)>>,
    attested_cgroups: Counter,
    attestation_passes: Counter,
    attestation_seconds: Histogram,
    kubelet_fetches: Counter,
    kubelet_fetch_errors: Counter,
    kubelet_pods: Gauge,
    kubelet_up: Gauge,
}

impl StateMetrics {
    fn new(registry: &mut Registry) -> Self {
        let me = Self {
            generation: Gauge::default(),
            owner_queue: Gauge::default(),
            reloads: Counter::default(),
            reload_errors: Counter::default(),
            identities: Gauge::default(),
            revoked: Gauge::default(),
            grants: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            workloads: Family::default(),
            workload_states: Mutex::default(),
            fullest: Mutex::default(),
            attested_cgroups: Counter::default(),
            attestation_passes: Counter::default(),
            attestation_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            kubelet_fetches: Counter::default(),
            kubelet_fetch_errors: Counter::default(),
            kubelet_pods: Gauge::default(),
            kubelet_up: Gauge::default(),
        };
        registry.register(
            "policy_generation",
            "The active policy generation's number (grows with every switch, across agent restarts)",
            me.generation.clone(),
        );
        registry.register(
            "owner_queue_depth",
            "Requests (control socket, signals) queued for the agent's state owner",
            me.owner_queue.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads applied",
            me.reloads.clone(),
        );
        registry.register(
            "policy_reload_errors",
            "Policy reloads refused (the running policy stayed)",
            me.reload_errors.clone(),
        );
        registry.register(
            "identities",
            "Identities holding a slot (bound, revoked, or named by an entry)",
            me.identities.clone(),
        );
        registry.register(
            "revoked_identities",
            "Identities revoked",
            me.revoked.clone(),
        );
        registry.register(
            "grants",
            "Operators' grants running (idgate grant)",
            me.grants.clone(),
        );
        registry.register(
            "map_entries",
            "Entries the active policy and bindings use, by map (for IDG_SLOT_DESTS and IDG_SLOT_PORTS: the fullest rule set's trie)",
            me.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Entries one policy generation may use, by map (for IDG_SLOT_DESTS and IDG_SLOT_PORTS: one rule set's trie)",
            me.map_capacity.clone(),
        );
        registry.register(
            "workloads",
            "Cgroups under the scope, by state (attested, operator, unknown, conflict, expired, unreadable)",
            me.workloads.clone(),
        );
        registry.register(
            "attested_cgroups",
            "Cgroups attested (each cgroup of each pass)",
            me.attested_cgroups.clone(),
        );
        registry.register(
            "attestation_passes",
            "Attestation passes (an event's cgroups, or the whole scope)",
            me.attestation_passes.clone(),
        );
        registry.register(
            "attestation_pass_seconds",
            "How long attestation passes take",
            me.attestation_seconds.clone(),
        );
        registry.register(
            "kubelet_fetches",
            "Fetches of the kubelet's pod list (with [kubernetes])",
            me.kubelet_fetches.clone(),
        );
        registry.register(
            "kubelet_fetch_errors",
            "Fetches of the kubelet's pod list that failed (the list was emptied)",
            me.kubelet_fetch_errors.clone(),
        );
        registry.register(
            "kubelet_pods",
            "Pods in the kubelet's list as last fetched (0 after a failure)",
            me.kubelet_pods.clone(),
        );
        registry.register(
            "kubelet_up",
            "1 when the last fetch of the kubelet's pod list succeeded",
            me.kubelet_up.clone(),
        );
        me
    }

    fn observe(&self, state: &State) {
        let applied = &state.applied;
        let compiled = &applied.compiled;
        let stats = state.attestation;
        // Called after every pass, so a new pass count means one new pass.
        if stats.passes > self.attestation_passes.get() {
            self.attestation_seconds
                .observe(stats.last_pass.as_secs_f64());
        }
        self.attestation_passes
            .inc_by(stats.passes.saturating_sub(self.attestation_passes.get()));
        self.attested_cgroups
            .inc_by(stats.cgroups.saturating_sub(self.attested_cgroups.get()));
        self.generation
            .set(i64::try_from(applied.generation).unwrap_or(i64::MAX));
        self.reloads
            .inc_by(state.reloads.saturating_sub(self.reloads.get()));
        self.reload_errors
            .inc_by(state.reload_errors.saturating_sub(self.reload_errors.get()));
        if let Some(k) = &state.kubelet {
            self.kubelet_fetches
                .inc_by(k.fetches.saturating_sub(self.kubelet_fetches.get()));
            self.kubelet_fetch_errors
                .inc_by(k.failures.saturating_sub(self.kubelet_fetch_errors.get()));
            self.kubelet_pods.set(state.pods.len() as i64);
            self.kubelet_up
                .set(i64::from(!k.failing && k.last_success.is_some()));
        }
        self.identities.set(applied.identities.len() as i64);
        self.revoked.set(state.revocations.ids().len() as i64);
        self.grants.set(state.grants.live() as i64);
        // The inner tries are one pair per rule set: what nears a limit is
        // the fullest of them (counted once per generation).
        let (fullest_dests, fullest_ports) = {
            let mut fullest = self.fullest.lock().expect("fullest lock");
            match *fullest {
                Some((generation, dests, ports)) if generation == applied.generation => {
                    (dests, ports)
                }
                _ => {
                    let most = |len: fn(&RuleSet) -> usize| {
                        compiled.rule_sets.iter().map(|s| len(s)).max().unwrap_or(0)
                    };
                    let counted = (most(RuleSet::dest_trie_len), most(|s| s.ports.len()));
                    *fullest = Some((applied.generation, counted.0, counted.1));
                    counted
                }
            }
        };
        let fill = [
            (
                maps::IDENTITIES,
                applied.bound.len(),
                state.config.max_workloads,
            ),
            // Slot 0 is the unknown workload's, never handed out.
            (maps::SLOT_IDS, applied.identities.len(), MAX_SLOTS - 1),
            (maps::SLOT_POLICY, compiled.slots.len(), MAX_SLOTS),
            (maps::SLOT_DESTS, fullest_dests, MAX_SET_DESTS),
            (maps::SLOT_PORTS, fullest_ports, MAX_SET_PORT_BLOCKS),
            (maps::GRANTS, state.grants.entries(), MAX_GRANT_ENTRIES),
        ];
        for (map, entries, capacity) in fill {
            let labels = MapLabels { map };
            self.map_entries.get_or_create(&labels).set(entries as i64);
            self.map_capacity
                .get_or_create(&labels)
                .set(i64::from(capacity));
        }
        let by_state = state.workloads.states();
        let mut seen = self.workload_states.lock().expect("states lock");
        seen.extend(by_state.keys());
        for state in seen.iter() {
            let count = by_state.get(state).copied().unwrap_or(0);
            self.workloads
                .get_or_create(&StateLabels { state })
                .set(count as i64);
        }
    }
}
