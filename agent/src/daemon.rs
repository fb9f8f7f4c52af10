//! `idgate agent`: checks everything first, then puts the programs in place
//! (or adopts them), writes policy and bindings, and serves the control
//! socket until SIGTERM or SIGINT; SIGHUP reloads the policy. Stopping
//! leaves every pin: enforcement goes on without the agent.

mod control;
mod discovery;
mod kubelet;
mod revocations;
mod state;
mod telemetry;
mod view;
mod workloads;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Authoriser};
use crate::config::Config;
use state::State;
use telemetry::Telemetry;
use view::ViewPublisher;

pub use view::IdentityView;

/// Everything that follows the state: told after every change.
struct Observers {
    telemetry: Telemetry,
    view: ViewPublisher,
}

impl Observers {
    fn publish(&self, state: &State) {
        self.telemetry.publish(state);
        self.view.publish(state);
    }
}

pub use revocations::RevocationError;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Revocations(#[from] RevocationError),
    #[error(transparent)]
    Entries(#[from] crate::identity::EntriesError),
    #[error("{0}")]
    Privileges(String),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Svid(#[from] crate::svid::SvidError),
    #[error(transparent)]
    WorkloadApi(#[from] crate::workload_api::WorkloadApiError),
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
    #[error("watching the scope for new workloads: {0}")]
    Discovery(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent with the configuration at `config_path`.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    tracing::info!(
        config = %config_path.display(),
        scope = %config.scope.display(),
        pin_dir = %config.pin_dir.display(),
        policy = %config.policy.display(),
        entries = %config.entries.display(),
        workload_tables = config.workloads.len(),
        "configuration read"
    );
    // Every setting, as read and defaulted; long with many `[[workload]]`
    // tables.
    tracing::debug!(?config, "effective configuration");
    let auth = Authoriser {
        uids: config.operator_uids.clone(),
        gids: config.operator_gids.clone(),
    };
    let socket = config.control_socket.clone();
    let telemetry = telemetry::prepare(&config)?;
    // SPIFFE credentials: CA files checked (or made) and listeners bound
    // before anything is put in the kernel.
    let credentials =
        crate::svid::Credentials::load(&config.svid, &config.trust_domains, &config.state_dir)?;
    let workload_socket = config.svid.socket().to_owned();
    let workload_api_served = config.svid.workload_api;
    let workload_api = match workload_api_served {
        true => Some(crate::workload_api::bind(&workload_socket)?),
        false => None,
    };
    let bundle_endpoint = match &config.svid.bundle_endpoint {
        Some(e) => Some(crate::federation::bind(
            e,
            &config.trust_domains,
            &credentials,
        )?),
        None => None,
    };
    // The kubelet's pod list, fetched once before the first attestation
    // (bounded by its timeout); the loop below takes the later fetches.
    let (kubelet_tx, mut kubelet_rx) = tokio::sync::mpsc::unbounded_channel();
    let kubelet = match &config.kubernetes {
        Some(k) => {
            let client = crate::identity::k8s::Kubelet::new(k.clone()).map_err(|message| {
                crate::config::ConfigError::Invalid {
                    path: config_path.to_owned(),
                    message,
                }
            })?;
            let wanted = Arc::new(tokio::sync::Notify::new());
            let state = kubelet::KubeletState::new(&client, wanted.clone());
            let first = client.fetch().await;
            tokio::spawn(kubelet::run(client, wanted, kubelet_tx));
            Some((state, first))
        }
        None => None,
    };
    let state = Arc::new(Mutex::new(State::start(config, kubelet)?));
    let (observers, identities) = {
        let state = state.lock().expect("state lock");
        let (view, identities) = ViewPublisher::new(&state);
        let observers = Observers {
            telemetry: telemetry.start(&state)?,
            view,
        };
        (Arc::new(observers), identities)
    };
    let cgroup_root = state.lock().expect("state lock").root.clone();
    if let Some(listener) = workload_api {
        crate::workload_api::spawn(listener, credentials.clone(), identities, cgroup_root)?;
    }
    if let Some(endpoint) = bundle_endpoint {
        endpoint.spawn(credentials.clone())?;
    }
    crate::federation::run(&credentials);
    tokio::spawn(credentials.clone().run_rotation());

    let handler_state = state.clone();
    let handler_observers = observers.clone();
    let server = admin::serve(&socket, auth, move |peer, request| {
        let mut state = handler_state.lock().expect("state lock");
        let reply = control::handle(&mut state, &handler_observers.telemetry.feed, peer, request);
        handler_observers.publish(&state);
        reply
    });
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;

    // Discovery: inotify on the scope, then one pass over everything for
    // whatever appeared between the first attestation and the watch.
    let scope_dir = state.lock().expect("state lock").scope_dir.clone();
    let resync_every = Duration::from_secs(state.lock().expect("state lock").config.resync_seconds);
    let (found_tx, mut found) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(discovery::watch(scope_dir.clone(), found_tx.clone()));
    let exec_notices = state
        .lock()
        .expect("state lock")
        .enforcer
        .exec_notices
        .take();
    if let Some(notices) = exec_notices {
        let tx = found_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = discovery::exec_notices(notices, tx).await {
                tracing::error!(error = %e, "exec notices stopped: attestation after exec waits for the periodic resync");
            }
        });
    }
    let _ = found_tx.send(discovery::Found::Dir(scope_dir));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_resync = Instant::now();

    tracing::info!(socket = %socket.display(), "ready");
    tokio::pin!(server);
    tokio::pin!(watcher);
    let result = loop {
        let resyncing = state.lock().expect("state lock").resyncing();
        tokio::select! {
            r = &mut server => break r.map_err(DaemonError::from),
            Some(dir) = found.recv() => {
                let mut dirs = BTreeSet::from([dir]);
                while let Ok(more) = found.try_recv() {
                    dirs.insert(more);
                }
                let mut state = state.lock().expect("state lock");
                if let Err(e) = state.attest(&dirs) {
                    tracing::error!(error = %e, "attestation pass failed; unbound workloads stay denied");
                }
                observers.publish(&state);
            }
            Some(outcome) = kubelet_rx.recv() => {
                let mut state = state.lock().expect("state lock");
                if let Err(e) = state.kubelet_fetched(outcome) {
                    tracing::error!(error = %e, "attestation after a kubelet fetch failed; unbound workloads stay denied");
                }
                observers.publish(&state);
            }
            _ = tick.tick() => {
                let mut state = state.lock().expect("state lock");
                let pass = if last_resync.elapsed() >= resync_every && !state.resyncing() {
                    last_resync = Instant::now();
                    state.resync()
                } else {
                    state.expire()
                };
                if let Err(e) = pass {
                    tracing::error!(error = %e, "resync failed; unbound workloads stay denied");
                }
                observers.publish(&state);
            }
            // A pass over the scope goes on a step at a time, between events.
            () = tokio::task::yield_now(), if resyncing => {
                let mut state = state.lock().expect("state lock");
                if let Err(e) = state.resync_step() {
                    tracing::error!(error = %e, "resync failed; unbound workloads stay denied");
                }
                observers.publish(&state);
            }
            r = &mut watcher => {
                let e = match r {
                    Ok(Ok(())) => std::io::Error::other("the watch ended"),
                    Ok(Err(e)) => e,
                    Err(e) => std::io::Error::other(e),
                };
                break Err(DaemonError::Discovery(e));
            }
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policy");
                // The outcome is logged by `reload`.
                let mut state = state.lock().expect("state lock");
                let _ = state.reload();
                observers.publish(&state);
            }
        }
    };
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the control socket");
    }
    if workload_api_served && let Err(e) = std::fs::remove_file(&workload_socket) {
        tracing::warn!(socket = %workload_socket.display(), error = %e, "cannot remove the Workload API socket");
    }
    tracing::info!("stopped; programs stay attached and pinned");
    result
}
