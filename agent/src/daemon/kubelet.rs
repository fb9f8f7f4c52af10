//! The kubelet's pod list, kept fresh: a task fetches it on the refresh
//! interval and whenever attestation meets a pod cgroup the list does not
//! name, and hands each outcome to the daemon's loop, which re-attests.
//!
//! Fails closed: a failed fetch empties the list, so `k8s:` selectors
//! match nothing and pod cgroups bound through them are denied until a
//! fetch succeeds again. A list that cannot be fetched is never guessed
//! from an older one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::admin::{KubeletHealth, KubeletStatus};
use crate::identity::k8s::{Kubelet, KubeletError, Pods, parse_cgroup_path};

use crate::workloads::Workloads;

/// Fetches a new pod's cgroup asks for come at most this often (SPIRE's
/// attestor retries at a similar pace).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How many fetches one unlisted pod (or container) may ask for. A
/// sandbox (pause) container is never listed, so asking must stop.
pub const MAX_ASKS: u32 = 5;

/// One fetch's outcome.
pub type Outcome = Result<Pods, KubeletError>;

/// Fetches the pod list on `kubelet`'s refresh interval and when
/// `wanted`, at most once per [`MIN_INTERVAL`], until the receiver goes.
pub async fn run(kubelet: Kubelet, wanted: Arc<Notify>, tx: UnboundedSender<Outcome>) {
    let refresh = kubelet.config().refresh;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(last + refresh) => {}
            _ = wanted.notified() => {
                tokio::time::sleep_until(last + MIN_INTERVAL).await;
            }
        }
        let outcome = kubelet.fetch().await;
        last = Instant::now();
        if tx.send(outcome).is_err() {
            return;
        }
    }
}

/// Where the kubelet's list stands, for `idgate status` and the metrics.
pub struct KubeletState {
    pub url: String,
    pub last_success: Option<SystemTime>,
    /// The last failure and when it was; kept after a later success.
    pub last_error: Option<(SystemTime, String)>,
    /// Whether the last fetch failed.
    pub failing: bool,
    pub fetches: u64,
    pub failures: u64,
    wanted: Arc<Notify>,
    /// Unlisted (pod UID, container id) seen in the scope, and how many
    /// fetches each has asked for.
    asked: BTreeMap<(String, Option<String>), u32>,
}

impl KubeletState {
    pub fn new(kubelet: &Kubelet, wanted: Arc<Notify>) -> Self {
        Self {
            url: kubelet.url(),
            last_success: None,
            last_error: None,
            failing: false,
            fetches: 0,
            failures: 0,
            wanted,
            asked: BTreeMap::new(),
        }
    }

    /// Takes a fetch's outcome: the pods to attest with (none after a
    /// failure).
    pub fn record(&mut self, outcome: Outcome) -> Pods {
        self.fetches += 1;
        let now = SystemTime::now();
        match outcome {
            Ok(pods) => {
                if self.failing || self.last_success.is_none() {
                    tracing::info!(url = %self.url, pods = pods.len(), "kubelet pod list fetched");
                }
                self.failing = false;
                self.last_success = Some(now);
                pods
            }
            Err(e) => {
                self.failures += 1;
                if !self.failing {
                    tracing::error!(error = %e, "kubelet pod list unavailable: pod cgroups attested by k8s: selectors are denied until it is back");
                } else {
                    tracing::debug!(error = %e, "kubelet pod list still unavailable");
                }
                self.failing = true;
                self.last_error = Some((now, e.to_string()));
                Pods::default()
            }
        }
    }

    /// Asks for a fetch when the scope has a pod cgroup whose pod, or
    /// container, `pods` does not list (each at most [`MAX_ASKS`] times).
    pub fn ask_for_unlisted(&mut self, workloads: &Workloads, pods: &Pods) {
        let mut unlisted = BTreeSet::new();
        for w in workloads.iter() {
            let Some(cg) = parse_cgroup_path(&w.path) else {
                continue;
            };
            let listed = pods.get(&cg.pod_uid).is_some_and(|pod| {
                cg.container_id
                    .as_deref()
                    .is_none_or(|id| pod.container(id).is_some())
            });
            if !listed {
                unlisted.insert((cg.pod_uid, cg.container_id));
            }
        }
        self.asked.retain(|key, _| unlisted.contains(key));
        let mut ask = false;
        for key in unlisted {
            let n = self.asked.entry(key).or_default();
            if *n < MAX_ASKS {
                *n += 1;
                ask = true;
            }
        }
        if ask {
            self.wanted.notify_one();
        }
    }

    /// `idgate status`'s `kubernetes` object.
    pub fn status(&self, pods: &Pods) -> KubeletStatus {
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        KubeletStatus {
            kubelet: self.url.clone(),
            state: match (self.failing, self.last_success) {
                (true, _) => KubeletHealth::Error,
                (false, Some(_)) => KubeletHealth::Ok,
                (false, None) => KubeletHealth::Pending,
            },
            pods: pods.len(),
            last_success: self.last_success.map(time),
            last_error: self.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: self.last_error.as_ref().map(|(t, _)| time(*t)),
            fetches: self.fetches,
            failures: self.failures,
        }
    }

    /// One line for `idgate workloads`.
    pub fn summary(&self, pods: &Pods) -> String {
        match (&self.last_error, self.failing) {
            (Some((_, e)), true) => {
                format!("kubelet pod list unavailable ({e}): k8s selectors match nothing")
            }
            _ if self.last_success.is_none() => {
                "kubelet pod list not fetched yet: k8s selectors match nothing".into()
            }
            _ => format!("kubelet {}: {} pods", self.url, pods.len()),
        }
    }
}
