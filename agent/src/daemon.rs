//! `idgate agent`: checks everything first, then puts the programs in place
//! (or adopts them), writes policy and bindings, and serves the control
//! socket until SIGTERM or SIGINT; SIGHUP reloads the policy. Stopping
//! leaves every pin: enforcement goes on without the agent.
//!
//! The agent's state has one owner ([`owner`]), on a thread of its own;
//! the control socket, signals, discovery and the kubelet send it typed
//! commands and events, and the Workload API, telemetry and read-only
//! requests read what it publishes.

mod control;
mod discovery;
mod generation_number;
mod handle;
mod kubelet;
mod namespaces;
mod owner;
mod restart;
mod root_workloads;
mod snapshot;
mod state;
mod telemetry;
mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{self, Authoriser};
use crate::config::Config;
use handle::Handle;
use owner::{Command, Owner};
use snapshot::Snapshot;
use state::State;
use telemetry::Telemetry;
use view::ViewPublisher;

pub use generation_number::GenerationNumberError;
pub use owner::ReloadError;

/// Everything that follows the state: told after every change.
pub struct Observers {
    telemetry: Telemetry,
    view: ViewPublisher,
}

impl Observers {
    fn publish(&mut self, state: &State) {
        self.telemetry.publish(state);
        self.view.publish(state);
    }
}

pub use crate::revocations::RevocationError;

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
    GenerationNumber(#[from] GenerationNumberError),
    #[error(transparent)]
    Entries(#[from] crate::identity::EntriesError),
    #[error(transparent)]
    Privileges(#[from] crate::privileges::PrivilegesError),
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
    Dns(#[from] crate::dns::DnsPathError),
    #[error("the credential broker: {0}")]
    Egress(#[from] crate::egress::EgressError),
    #[error("the credential broker's CA: {0}")]
    EgressCa(#[from] crate::egress::EgressCaError),
    #[error("the credential broker's kernel settings: {0}")]
    EgressMaps(#[from] crate::dns::KernelError),
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
    #[error(transparent)]
    Grants(#[from] crate::grants::GrantError),
    #[error(transparent)]
    Oidc(#[from] crate::oidc::OidcError),
    #[error("watching the scope for new workloads: {0}")]
    Discovery(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("starting the state owner: {0}")]
    Runtime(std::io::Error),
    #[error("start-up stopped before it finished")]
    StartLost,
    #[error("a policy generation is being written; try again when it is done")]
    GenerationBusy,
    #[error(
        "the thread writing a policy generation stopped before it finished: no policy can change any more, so the agent stops (enforcement goes on; restart it)"
    )]
    GenerationLost,
    #[error("the state owner stopped")]
    OwnerGone,
    #[error("the run's cgroup could not be bound: {0}")]
    RunNotBound(String),
    #[error("the agent cannot execute itself again to restart: {0}")]
    Restart(std::io::Error),
}

/// Runs the agent with the configuration at `config_path`, taking over
/// the DNS listeners a previous agent of this process handed over.
pub async fn run(config_path: &Path, handover: crate::dns::Handover) -> Result<(), DaemonError> {
    let agent = start(config_path, handover).await?;
    let result = agent.serve().await;
    tracing::info!("stopped; programs stay attached and pinned");
    result
}

/// How often the egress CA is looked at for rotation (it is also at each
/// certificate it issues).
const EGRESS_CA_LOOK: Duration = Duration::from_secs(3600);

/// Runs the credential broker beside the DNS path when `[egress]` is on
/// (the configuration's check makes sure the DNS path runs then), its CA
/// constrained to the credential hosts of `policy`; else tells the kernel
/// it is off, so a connect of a credential rule is denied
/// (`egress_not_ready`).
fn start_broker(
    dns: Option<&mut crate::dns::DnsPath>,
    ca: Option<crate::egress::EgressCa>,
    (config, policy): (&crate::config::Config, &crate::policy::PolicySet),
    view: watch::Receiver<Arc<crate::dns::DnsView>>,
    credentials: &Arc<crate::svid::Credentials>,
    records: mpsc::Sender<crate::egress::BrokerRecord>,
) -> Result<Option<Arc<crate::egress::Broker>>, DaemonError> {
    let mut maps = crate::dns::EgressMaps::open(&config.pin_dir)?;
    let (Some(dns), Some(ca)) = (dns, ca) else {
        maps.set(idgate_common::EgressSettings::default())?;
        return Ok(None);
    };
    ca.constrain(&policy.credential_hosts())?;
    let directory =
        crate::egress::AgentDirectory::new(view, dns.host_lookup(), credentials.clone());
    let broker = crate::egress::Broker::new(&config.egress, ca, Arc::new(directory), records)?;
    let rotating = broker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EGRESS_CA_LOOK);
        loop {
            tick.tick().await;
            let broker = rotating.clone();
            let rotated = tokio::task::spawn_blocking(move || {
                broker.ca().rotate(std::time::SystemTime::now())
            })
            .await;
            match rotated {
                Ok(Ok(true)) => {
                    tracing::info!("egress CA rotated: a new CA is in the trust bundle")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "egress CA rotation failed; the current CA stays")
                }
                Err(_) => return,
            }
        }
    });
    dns.start_egress(crate::dns::EgressListening {
        broker: broker.clone(),
        maps,
        tls_port: config.egress.tls_port,
        http_port: config.egress.http_port,
    })?;
    tracing::info!(
        tls_port = config.egress.tls_port,
        http_port = config.egress.http_port,
        "credential broker listening"
    );
    Ok(Some(broker))
}

/// Keeps the egress CA constrained to the credential hosts of the running
/// policy: looks again whenever the owner publishes another policy (a
/// constraint that could not be written is tried again at the CA's next
/// rotation look).
async fn constrain_egress_ca(
    broker: Arc<crate::egress::Broker>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut seen = snapshots.borrow_and_update().policy.clone();
    while snapshots.changed().await.is_ok() {
        let policy = snapshots.borrow_and_update().policy.clone();
        if Arc::ptr_eq(&policy, &seen) {
            continue;
        }
        seen = policy.clone();
        let broker = broker.clone();
        let constrained =
            tokio::task::spawn_blocking(move || broker.ca().constrain(&policy.credential_hosts()))
                .await;
        match constrained {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "egress CA: the new credential hosts could not be put in its name constraints; tried again within the hour")
            }
            Err(_) => return,
        }
    }
}

/// An agent whose programs, policy and bindings are in place, whose
/// owner runs, and which serves the Workload API; next: the control
/// socket and the signals.
struct Started {
    handle: Handle,
    feed: crate::events::EventFeed,
    /// The DNS path, for `status` and `explain`, when it runs.
    dns: Option<crate::dns::DnsReader>,
    /// The bindings, for `status`'s uid 0 warning.
    bindings: root_workloads::Bindings,
    /// `idgate restart` asks the serve loop here; the receiver is told
    /// when the reply is out.
    restart: mpsc::Sender<oneshot::Receiver<()>>,
    restart_asked: mpsc::Receiver<oneshot::Receiver<()>>,
    /// Asks the DNS path for its sockets, before a restart.
    hand_over: mpsc::Sender<oneshot::Sender<crate::dns::Handover>>,
    auth: Authoriser,
    socket: PathBuf,
    workload_socket: Option<PathBuf>,
    owner_done: oneshot::Receiver<Result<(), DaemonError>>,
    watcher: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Checks the configuration, opens every file and listener, puts the
/// programs in place and the policy in force, and starts the owner and the
/// tasks that feed it.
async fn start(config_path: &Path, handover: crate::dns::Handover) -> Result<Started, DaemonError> {
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
        granters: config.grants.granters.clone(),
    };
    let socket = config.control_socket.clone();
    let telemetry = telemetry::prepare(&config)?;
    // SPIFFE credentials: CA files checked (or made) and listeners bound
    // before anything is put in the kernel.
    let credentials =
        crate::svid::Credentials::load(&config.svid, &config.trust_domains, &config.state_dir)?;
    // The egress CA and the workloads' trust bundle, checked (or made)
    // before anything is put in the kernel too.
    let egress_ca = match config.egress.enabled {
        true => Some(crate::egress::EgressCa::open(
            &crate::egress::state_subdir(&config.state_dir),
            &config.egress,
            std::time::SystemTime::now(),
        )?),
        false => None,
    };
    let workload_socket = config.svid.socket().to_owned();
    let workload_api = match config.svid.workload_api {
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
    let oidc = match &config.svid.oidc {
        Some(o) => Some(crate::oidc::bind(o, &config.trust_domains, &credentials)?),
        None => None,
    };
    // The kubelet's pod list, fetched once before the first attestation
    // (bounded by its timeout); the owner takes the later fetches.
    let (kubelet_tx, kubelet_rx) = mpsc::unbounded_channel();
    let kubelet = match &config.kubernetes {
        Some(k) => {
            let client = crate::identity::k8s::Kubelet::new(k.clone()).map_err(|e| {
                crate::config::ConfigError::Invalid {
                    path: config_path.to_owned(),
                    source: e.into(),
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
    // Seconds with a large policy: off the runtime's workers.
    let (grant_records_tx, grant_records) = mpsc::unbounded_channel();
    let mut state =
        tokio::task::spawn_blocking(move || State::start(config, kubelet, grant_records_tx))
            .await
            .map_err(|_| DaemonError::StartLost)??;
    let (view, identities, dns_view) = ViewPublisher::new(&state);
    let book = Arc::new(crate::dns::NameBook::default());
    let (records_tx, records) = mpsc::channel(DNS_RECORDS);
    let (broker_records_tx, broker_records) = mpsc::channel(DNS_RECORDS);
    let (grant_addresses_tx, grant_addresses) = mpsc::channel(handle::QUEUE);
    let telemetry = telemetry.start(
        &state,
        crate::events::Feeds {
            book: book.clone(),
            dns: records,
            grants: grant_records,
            broker: broker_records,
        },
    )?;
    let dns = crate::dns::DnsPath::start(
        &state.config.dns,
        &state.config.pin_dir,
        dns_view.clone(),
        crate::dns::DnsSenders {
            records: records_tx,
            grants: grant_addresses_tx,
        },
        book,
        handover,
        telemetry.dns.clone(),
    )?;
    let mut dns = dns;
    let broker = start_broker(
        dns.as_mut(),
        egress_ca,
        (&state.config, &state.policy),
        dns_view,
        &credentials,
        broker_records_tx,
    )?;
    let (hand_over, hand_over_asked) = mpsc::channel(1);
    let rescan = namespaces::Rescan::default();
    let dns = dns.map(|dns| {
        let reader = dns.reader();
        tokio::spawn(namespaces::watch(
            dns,
            state.scope_dir.clone(),
            rescan.clone(),
            hand_over_asked,
        ));
        reader
    });
    let (restart, restart_asked) = mpsc::channel(1);
    let feed = telemetry.feed.clone();
    let queue_depth = telemetry.owner_queue();
    let bindings = root_workloads::Bindings {
        identities: identities.clone(),
        root: state.root.clone(),
    };
    if let Some(listener) = workload_api {
        crate::workload_api::spawn(
            listener,
            credentials.clone(),
            identities,
            state.root.clone(),
        )?;
    }
    if let Some(endpoint) = bundle_endpoint {
        endpoint.spawn(credentials.clone())?;
    }
    if let Some(provider) = oidc {
        provider.spawn(credentials.clone())?;
    }
    crate::federation::run(&credentials);
    tokio::spawn(credentials.clone().run_rotation());

    // Discovery: inotify on the scope, then one pass over everything for
    // whatever appeared between the first attestation and the watch.
    let (found_tx, found) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(discovery::watch(state.scope_dir.clone(), found_tx.clone()));
    if let Some(notices) = state.enforcer.exec_notices.take() {
        let tx = found_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = discovery::exec_notices(notices, tx).await {
                tracing::error!(error = %e, "exec notices stopped: attestation after exec waits for the periodic resync");
            }
        });
    }
    let _ = found_tx.send(discovery::Found::Dir(state.scope_dir.clone()));

    let (commands_tx, commands) = mpsc::channel(handle::QUEUE);
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::of(&state, false)));
    if let Some(broker) = broker {
        tokio::spawn(constrain_egress_ca(broker, snapshot.clone()));
    }
    let handle = Handle::new(commands_tx, snapshot, queue_depth.clone());
    let (done_tx, owner_done) = oneshot::channel();
    let workload_socket = state.config.svid.workload_api.then_some(workload_socket);
    Owner {
        state,
        observers: Observers { telemetry, view },
        snapshot: snapshot_tx,
        commands,
        queue_depth,
        found,
        rescan,
        kubelet: kubelet_rx,
        grant_addresses,
    }
    .spawn(done_tx)?;
    Ok(Started {
        handle,
        feed,
        dns,
        bindings,
        restart,
        restart_asked,
        hand_over,
        auth,
        socket,
        workload_socket,
        owner_done,
        watcher,
    })
}

impl Started {
    /// Serves the control socket and the signals until told to stop, or
    /// until the owner or the discovery watch fails.
    async fn serve(self) -> Result<(), DaemonError> {
        let Started {
            handle,
            feed,
            dns,
            bindings,
            restart,
            mut restart_asked,
            hand_over,
            auth,
            socket,
            workload_socket,
            mut owner_done,
            watcher,
        } = self;
        let control = handle.clone();
        let server = admin::serve(&socket, auth, move |peer, request| {
            let (handle, feed) = (control.clone(), feed.clone());
            let (dns, restart) = (dns.clone(), restart.clone());
            let parts = control::Parts {
                owner: handle,
                feed,
                dns,
                bindings: bindings.clone(),
                restart,
            };
            async move { control::handle(&parts, peer, request).await }
        });
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
        let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
        tracing::info!(socket = %socket.display(), "ready");
        tokio::pin!(server);
        tokio::pin!(watcher);
        let result = loop {
            tokio::select! {
                r = &mut server => break r.map_err(DaemonError::from),
                r = &mut owner_done => break r.unwrap_or(Err(DaemonError::OwnerGone)),
                r = &mut watcher => {
                    let e = match r {
                        Ok(Ok(())) => std::io::Error::other("the watch ended"),
                        Ok(Err(e)) => e,
                        Err(e) => std::io::Error::other(e),
                    };
                    break Err(DaemonError::Discovery(e));
                }
                Some(replied) = restart_asked.recv() => {
                    let _ = replied.await;
                    tracing::info!("restarting: the DNS listeners are handed over");
                    let (tx, rx) = oneshot::channel();
                    let handover = match hand_over.send(tx).await {
                        Ok(()) => rx.await.unwrap_or_default(),
                        // No DNS path: nothing to hand over.
                        Err(_) => crate::dns::Handover::default(),
                    };
                    break Err(restart::exec(handover));
                }
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading policy");
                    // The owner logs the outcome.
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle.ask(Command::Reload, SIGHUP_RELOAD_WAIT).await {
                            tracing::error!(error = %e, "SIGHUP: the reload was not made");
                        }
                    });
                }
            }
        };
        if let Err(e) = std::fs::remove_file(&socket) {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the control socket");
        }
        if let Some(path) = workload_socket
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the Workload API socket");
        }
        result
    }
}

/// DNS decision records waiting for the events reader; past it they are
/// dropped (and logged at debug).
const DNS_RECORDS: usize = 4096;

/// How long a SIGHUP's reload is waited for before it is logged as lost.
const SIGHUP_RELOAD_WAIT: Duration = Duration::from_secs(300);
