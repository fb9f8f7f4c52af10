//! The DNS path as the daemon runs it: the kernel's redirect switched on,
//! listeners in every network namespace that holds workloads of the
//! scope, the resolver they share, and the sweep of expired addresses.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idgate_common::{DnsSettings, EgressSettings};
use tokio::sync::{Semaphore, mpsc, watch};

use super::config::DnsConfig;
use super::handover::{Handed, Handover};
use super::inspect::DnsReader;
use super::kernel::{KernelError, LearnedMaps, RedirectMaps};
use super::learned::{Learned, NameBook};
use super::listener;
use super::message::FilterOptions;
use super::metrics::DnsMetrics;
use super::resolver::{DnsRecord, GrantAddresses, Resolver};
use super::server::{self, IN_FLIGHT, Serving};
use super::upstream::Upstream;
use super::view::DnsView;

/// Why the DNS path cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DnsPathError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("the DNS listeners on port {port} cannot be opened: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] super::config::DnsConfigError),
    #[error("the credential broker's listeners: {0}")]
    Egress(#[from] std::io::Error),
}

/// Where the DNS path sends what it does not own.
pub struct DnsSenders {
    /// Its decision records, to the events reader.
    pub records: mpsc::Sender<DnsRecord>,
    /// Answers to lookups grants by name cover, to the grants' owner.
    pub grants: mpsc::Sender<GrantAddresses>,
}

/// How often expired learned addresses are removed.
const SWEEP: Duration = Duration::from_secs(5);

/// The listeners of one network namespace.
struct Namespace {
    cookie: u64,
    /// Copies of the sockets' descriptors, to hand over: they keep the
    /// sockets open after the tasks serving them stop.
    udp: OwnedFd,
    tcp: OwnedFd,
    serving: Serving,
    /// The credential broker's listeners there, when it runs.
    egress: Option<crate::egress::Serving>,
}

/// The credential broker as the DNS path serves it: its listeners are
/// opened beside the DNS listeners of every namespace.
pub struct EgressListening {
    pub broker: Arc<crate::egress::Broker>,
    pub maps: super::EgressMaps,
    pub tls_port: u16,
    pub http_port: u16,
}

/// How long a hand-over waits for the queries being answered.
const DRAIN: Duration = Duration::from_secs(2);

/// The running DNS path.
pub struct DnsPath {
    redirect: RedirectMaps,
    resolver: Arc<Resolver>,
    limit: Arc<Semaphore>,
    net: u8,
    port: u16,
    /// By the namespace's inode; the agent's own is `None`.
    namespaces: HashMap<Option<u64>, Namespace>,
    /// How many there are, for `status`.
    listening: Arc<AtomicUsize>,
    reader: DnsReader,
    egress: Option<EgressListening>,
}

impl DnsPath {
    /// Switches the redirect on (or off, with `enabled = false`) and opens
    /// the listeners of the agent's own namespace.
    pub fn start(
        config: &DnsConfig,
        pin_dir: &Path,
        view: watch::Receiver<Arc<DnsView>>,
        senders: DnsSenders,
        book: Arc<NameBook>,
        handover: Handover,
        metrics: DnsMetrics,
    ) -> Result<Option<Self>, DnsPathError> {
        let DnsSenders { records, grants } = senders;
        let mut redirect = RedirectMaps::open(pin_dir)?;
        if !config.enabled {
            redirect.set(DnsSettings::default())?;
            return Ok(None);
        }
        let learned = Learned::open(
            LearnedMaps::open(pin_dir)?,
            config.max_addresses_per_identity,
            book,
        )?;
        let learned = Arc::new(Mutex::new(learned));
        let mut source = config.upstream_source();
        let servers = source.current().unwrap_or_else(|e| {
            tracing::error!(error = %e, "no upstream DNS server: every query gets SERVFAIL until one is configured");
            Vec::new()
        });
        let upstream = Upstream::new(servers, config.upstream_timeout);
        let resolver = Arc::new(Resolver {
            view,
            upstream,
            learned: learned.clone(),
            filter: FilterOptions::of_config(config),
            grace: config.grace,
            records,
            metrics,
            grants,
        });
        let listening = Arc::new(AtomicUsize::new(0));
        let reader = DnsReader {
            learned: learned.clone(),
            view: resolver.view.clone(),
            resolver: resolver.clone(),
            namespaces: listening.clone(),
        };
        let mut path = Self {
            redirect,
            resolver,
            limit: Arc::new(Semaphore::new(IN_FLIGHT)),
            net: config.reserved_net,
            port: config.listen_port,
            namespaces: HashMap::new(),
            listening,
            reader,
            egress: None,
        };
        let own = own_namespace().map_err(|source| DnsPathError::Listen {
            port: path.port,
            source,
        })?;
        let mut own_listening = false;
        for h in handover.0 {
            let inode = (h.inode != own).then_some(h.inode);
            let adopted = listener::adopt(h.udp, h.tcp).map_err(|source| DnsPathError::Listen {
                port: path.port,
                source,
            })?;
            // A restart with another `listen_port`: the old sockets go.
            if adopted.udp.local_addr().map(|a| a.port()).ok() != Some(path.port) {
                tracing::info!(
                    netns = h.inode,
                    "DNS listeners handed over on another port: closed"
                );
                continue;
            }
            path.serve(inode, adopted)?;
            own_listening |= inode.is_none();
            tracing::info!(
                netns = h.inode,
                "DNS listeners taken over from the previous agent"
            );
        }
        if !own_listening {
            path.listen(None, None)?;
        }
        path.redirect.set(DnsSettings {
            enabled: 1,
            net: config.reserved_net.into(),
            port: config.listen_port.into(),
            _pad: 0,
        })?;
        warn_of_local_resolvers();
        tokio::spawn(sweep(learned, path.reader.clone()));
        tokio::spawn(follow_upstreams(source, path.resolver.clone()));
        Ok(Some(path))
    }

    /// A handle for `status` and `explain`.
    pub fn reader(&self) -> DnsReader {
        self.reader.clone()
    }

    /// Lookups for the agent itself, through the same upstreams.
    pub fn host_lookup(&self) -> super::HostLookup {
        super::HostLookup {
            resolver: self.resolver.clone(),
        }
    }

    /// Runs the credential broker beside the DNS listeners: tells the
    /// kernel where its listeners are, and opens them in the agent's own
    /// namespace now and in every other with its next look
    /// ([`Self::sync_namespaces`]).
    pub fn start_egress(&mut self, mut egress: EgressListening) -> Result<(), DnsPathError> {
        egress.maps.set(EgressSettings {
            enabled: 1,
            tls_port: egress.tls_port.into(),
            http_port: egress.http_port.into(),
            _pad: 0,
        })?;
        self.egress = Some(egress);
        self.open_egress(None, None)
    }

    /// Opens and serves the listeners of a namespace (`ns`, its
    /// `/proc/PID/ns/net`, or the agent's own): the DNS path's, and the
    /// broker's when it runs (a namespace whose broker listeners cannot
    /// be opened keeps its DNS).
    fn listen(&mut self, inode: Option<u64>, ns: Option<OwnedFd>) -> Result<(), DnsPathError> {
        let port = self.port;
        let egress = self.egress.as_ref().map(|e| (e.tls_port, e.http_port));
        let (dns, egress) = listener::in_namespace(ns, move || {
            (
                listener::open_here(port),
                egress.map(|(tls, http)| crate::egress::open_listeners(tls, http)),
            )
        })
        .map_err(|source| DnsPathError::Listen { port, source })?;
        let l = dns.map_err(|source| DnsPathError::Listen { port, source })?;
        self.serve(inode, l)?;
        if let Some(opened) = egress {
            self.serve_egress(inode, opened);
        }
        Ok(())
    }

    /// Opens the broker's listeners in a namespace whose DNS listeners are
    /// served already.
    fn open_egress(&mut self, inode: Option<u64>, ns: Option<OwnedFd>) -> Result<(), DnsPathError> {
        let Some(e) = &self.egress else {
            return Ok(());
        };
        let (tls, http) = (e.tls_port, e.http_port);
        let opened = listener::in_namespace(ns, move || crate::egress::open_listeners(tls, http))
            .map_err(|source| DnsPathError::Listen { port: tls, source })?;
        self.serve_egress(inode, opened);
        Ok(())
    }

    /// Serves the broker's listeners of a namespace and tells the kernel
    /// they listen; a failure is logged: that namespace's credential
    /// connects are denied (`egress_not_ready`) until a later look.
    fn serve_egress(
        &mut self,
        inode: Option<u64>,
        opened: std::io::Result<(std::net::TcpListener, std::net::TcpListener)>,
    ) {
        let (Some(egress), Some(ns)) = (&mut self.egress, self.namespaces.get_mut(&inode)) else {
            return;
        };
        let served = opened.map_err(DnsPathError::from).and_then(|(tls, http)| {
            egress.maps.listening(ns.cookie, &tls)?;
            Ok(egress.broker.serve(tls, http, self.net)?)
        });
        match served {
            Ok(serving) => ns.egress = Some(serving),
            Err(e) => tracing::warn!(
                netns = inode,
                tls_port = egress.tls_port,
                error = %e,
                "cannot open the credential broker's listeners in a network namespace; its credential connects are denied until they open"
            ),
        }
    }

    /// Serves a namespace's listeners, and tells the kernel they listen.
    fn serve(&mut self, inode: Option<u64>, l: listener::Listeners) -> Result<(), DnsPathError> {
        let port = self.port;
        let err = |source| DnsPathError::Listen { port, source };
        self.redirect.listening(l.cookie, &l.udp)?;
        let udp = l.udp.as_fd().try_clone_to_owned().map_err(err)?;
        let tcp = l.tcp.as_fd().try_clone_to_owned().map_err(err)?;
        let serving = server::serve(
            l.udp,
            l.tcp,
            self.resolver.clone(),
            self.limit.clone(),
            self.net,
        )
        .map_err(err)?;
        self.namespaces.insert(
            inode,
            Namespace {
                cookie: l.cookie,
                udp,
                tcp,
                serving,
                egress: None,
            },
        );
        self.listening
            .store(self.namespaces.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Makes the listeners match the namespaces of the workloads: `wanted`
    /// maps a namespace inode to an open handle of it. The agent's own
    /// namespace is always served.
    pub fn sync_namespaces(&mut self, own: u64, wanted: HashMap<u64, OwnedFd>) {
        let gone: Vec<Option<u64>> = self
            .namespaces
            .keys()
            .filter(|k| matches!(k, Some(i) if !wanted.contains_key(i)))
            .copied()
            .collect();
        for inode in gone {
            if let Some(ns) = self.namespaces.remove(&inode) {
                if let Err(e) = self.redirect.closed(ns.cookie) {
                    tracing::warn!(error = %e, "cannot mark a network namespace's DNS listeners closed");
                }
                if let Some(egress) = &mut self.egress
                    && let Err(e) = egress.maps.closed(ns.cookie)
                {
                    tracing::warn!(error = %e, "cannot mark a network namespace's broker listeners closed");
                }
                tracing::info!(
                    netns = inode,
                    "DNS listeners closed: no workload left in the network namespace"
                );
            }
        }
        for (inode, fd) in wanted {
            if inode == own {
                continue;
            }
            if let Some(ns) = self.namespaces.get(&Some(inode)) {
                // Handed over by an earlier agent: the DNS listeners only.
                if ns.egress.is_none()
                    && self.egress.is_some()
                    && let Err(e) = self.open_egress(Some(inode), Some(fd))
                {
                    tracing::warn!(netns = inode, error = %e, "cannot enter a workload network namespace for the broker's listeners");
                }
                continue;
            }
            match self.listen(Some(inode), Some(fd)) {
                Ok(()) => tracing::info!(
                    netns = inode,
                    "DNS listeners open in a workload network namespace"
                ),
                Err(e) => {
                    tracing::warn!(netns = inode, error = %e, "cannot open DNS listeners in a workload network namespace; its queries fail until they open")
                }
            }
        }
    }
}

impl DnsPath {
    /// Stops reading queries, lets those being answered finish (at most
    /// [`DRAIN`]), and gives up the sockets, still open, for the next
    /// agent. Queries sent from now on wait in the sockets.
    pub async fn hand_over(self) -> Handover {
        let own = own_namespace().unwrap_or(0);
        let mut handed = Vec::new();
        for (inode, ns) in self.namespaces {
            drop(ns.serving);
            handed.push(Handed {
                inode: inode.unwrap_or(own),
                udp: ns.udp,
                tcp: ns.tcp,
            });
        }
        let all = u32::try_from(IN_FLIGHT).unwrap_or(u32::MAX);
        if tokio::time::timeout(DRAIN, self.limit.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "queries still being answered at the hand-over are dropped; their clients ask again"
            );
        }
        Handover(handed)
    }
}

/// Local resolver services whose lookups never use port 53, so never
/// reach the DNS path: a workload that can reach their sockets gets
/// answers whose addresses no name rule opens (docs/security-model.md).
const LOCAL_RESOLVERS: [(&str, &str); 3] = [
    ("/run/nscd/socket", "nscd"),
    ("/var/lib/sss/pipes/nss", "sssd"),
    (
        "/run/systemd/resolve/io.systemd.Resolve",
        "systemd-resolved (varlink)",
    ),
];

/// Says which of [`LOCAL_RESOLVERS`] this host runs.
fn warn_of_local_resolvers() {
    for (socket, service) in LOCAL_RESOLVERS {
        if std::path::Path::new(socket).exists() {
            tracing::warn!(
                socket,
                service,
                "a local resolver that workloads may ask without port 53: its answers open nothing for name rules; keep its socket out of workloads' reach, or have glibc use DNS (nsswitch.conf `hosts: dns`)"
            );
        }
    }
}

/// The inode of the agent's own network namespace.
fn own_namespace() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}

/// How often the host's resolv.conf is looked at for new upstreams.
const UPSTREAMS_EVERY: Duration = Duration::from_secs(2);

/// Follows the upstream list (the host's resolv.conf when none is
/// configured): a file that cannot be read keeps the last good list.
async fn follow_upstreams(mut source: super::config::UpstreamSource, resolver: Arc<Resolver>) {
    if matches!(source, super::config::UpstreamSource::Fixed(_)) {
        return;
    }
    let mut tick = tokio::time::interval(UPSTREAMS_EVERY);
    loop {
        tick.tick().await;
        match source.current() {
            Ok(servers) if *servers != *resolver.upstream.servers() => {
                tracing::info!(?servers, "upstream DNS servers changed");
                resolver.upstream.set_servers(servers);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "upstream DNS servers not read again; the last list stays")
            }
        }
    }
}

/// Expired learned addresses removed under one hold of the table's lock.
const SWEEP_STEP: usize = 256;

/// Stamps every learned entry again after a generation switch (at once: a
/// view of a new generation wakes it) and at every tick (an answer learned
/// with the view of before the switch); removes expired learned addresses
/// now and then; each a step at a time, so that a lookup never waits for a
/// whole pass; then brings the table's metrics up to date.
async fn sweep(learned: Arc<Mutex<Learned>>, reader: DnsReader) {
    let mut tick = tokio::time::interval(SWEEP);
    let mut views = reader.view.clone();
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
        };
        let view = views.borrow_and_update().clone();
        if !ticked && view.stamp == learned.lock().expect("not poisoned").stamped_for() {
            continue;
        }
        let (learned, reader) = (learned.clone(), reader.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let keys = learned.lock().expect("not poisoned").keys();
            for step in keys.chunks(SWEEP_STEP) {
                learned.lock().expect("not poisoned").restamp(&view, step);
            }
            learned.lock().expect("not poisoned").restamped(view.stamp);
            learned.lock().expect("not poisoned").follow_suspend(&view);
            let expired = learned.lock().expect("not poisoned").expired();
            let mut removed = 0;
            for step in expired.chunks(SWEEP_STEP) {
                removed += learned.lock().expect("not poisoned").remove_expired(step);
            }
            learned.lock().expect("not poisoned").forget_unused_names();
            reader.resolver.metrics.table(&reader.figures());
            if removed > 0 {
                tracing::debug!(removed, "expired learned addresses removed");
            }
        })
        .await;
    }
}
