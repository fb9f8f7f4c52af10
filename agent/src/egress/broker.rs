//! The broker's connections: the listeners of each network namespace, the
//! slot of each accepted connection (from its local address, which the
//! kernel's redirect chose), and per TLS connection the choice between
//! terminating it (its SNI is a credential's host), passing it through
//! (another host the identity may reach) and refusing it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use idgate_common::dns_address;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::ca::EgressCa;
use super::config::EgressConfig;
use super::forward::{self, Conn};
use super::hello::{Prefixed, read_hello};
use super::record::{BrokerRecord, Outcome, Records};
use super::rules::same_host;
use super::secrets::SecretFiles;
use super::tokens::Tokens;
use super::upstream::{Upstreams, one_line};
use super::view::Directory;
use super::{EgressError, HTTP_PORT, TLS_PORT};
use crate::identity::SpiffeId;

/// The credential broker: serves the listeners of every workload network
/// namespace, with one CA, one pool of upstream connections and one
/// record channel.
pub struct Broker {
    pub(super) ca: EgressCa,
    pub(super) directory: Arc<dyn Directory>,
    pub(super) records: Records,
    pub(super) upstreams: Upstreams,
    pub(super) secrets: SecretFiles,
    pub(super) tokens: Tokens,
    pub(super) upstream_timeout: Duration,
    /// The upstream ports: 443 for TLS, 80 for plain HTTP (others only
    /// in tests).
    pub(super) upstream_ports: Ports,
    idle_timeout: Duration,
    /// Cloned per terminated connection, with a resolver for its name.
    tls: ServerConfig,
}

/// The serving of one namespace's listeners; dropping it stops them and
/// ends their connections (an upgraded connection's splice excepted).
pub struct Serving {
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A port for TLS and one for plain HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ports {
    pub(super) tls: u16,
    pub(super) http: u16,
}

/// Which listener a connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Tls,
    Http,
}

impl Broker {
    /// A broker with `ca`, upstream roots of the system and of
    /// `config.extra_roots`, and records sent on `records`.
    pub fn new(
        config: &EgressConfig,
        ca: EgressCa,
        directory: Arc<dyn Directory>,
        records: mpsc::Sender<BrokerRecord>,
    ) -> Result<Arc<Self>, EgressError> {
        let mut roots = rustls::RootCertStore::empty();
        let (_, unusable) =
            roots.add_parsable_certificates(ca.system_roots().iter().map(|c| c.clone().into()));
        if unusable > 0 {
            tracing::warn!(unusable, "system root certificates passed over");
        }
        for der in config.extra_root_certs()? {
            roots.add(der.into()).map_err(EgressError::ExtraRoot)?;
        }
        let upstreams = Upstreams::new(
            directory.clone(),
            roots,
            config.upstream_timeout,
            config.idle_timeout,
        )
        .map_err(EgressError::Tls)?;
        let mut tls = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(EgressError::Tls)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneName::default()));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            ca,
            directory,
            records: Records::new(records),
            upstreams,
            secrets: SecretFiles::default(),
            tokens: Tokens::default(),
            upstream_timeout: config.upstream_timeout,
            upstream_ports: Ports {
                tls: TLS_PORT,
                http: HTTP_PORT,
            },
            idle_timeout: config.idle_timeout,
            tls,
        }))
    }

    /// The egress CA (its trust bundle, its rotation).
    pub fn ca(&self) -> &EgressCa {
        &self.ca
    }

    /// Records the channel had no room for so far.
    pub fn dropped_records(&self) -> u64 {
        self.records.dropped()
    }

    /// Serves one namespace's two listeners (from [`super::open_listeners`])
    /// until the returned handle is dropped. `net` is N of the reserved
    /// range `127.N.0.0/16` the slots' addresses are in. Call it within
    /// the tokio runtime.
    pub fn serve(
        self: &Arc<Self>,
        tls: std::net::TcpListener,
        http: std::net::TcpListener,
        net: u8,
    ) -> std::io::Result<Serving> {
        let mut tasks = Vec::with_capacity(2);
        for (listener, kind) in [(tls, Listener::Tls), (http, Listener::Http)] {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let task = tokio::spawn(self.clone().accept(listener, net, kind));
            tasks.push(task.abort_handle());
        }
        Ok(Serving { tasks })
    }

    async fn accept(self: Arc<Self>, listener: tokio::net::TcpListener, net: u8, kind: Listener) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(self.clone().connection(stream, net, kind));
                    }
                    Err(e) => {
                        // Out of file descriptors, or the like: not a
                        // reason to stop, nor to spin.
                        tracing::warn!(error = %e, "egress listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next() => {}
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, net: u8, kind: Listener) {
        let start = Instant::now();
        let slot = match stream.local_addr() {
            Ok(SocketAddr::V4(a)) => dns_address::slot(net.into(), a.ip().octets()),
            Ok(SocketAddr::V6(a)) => a
                .ip()
                .to_ipv4_mapped()
                .and_then(|ip| dns_address::slot(net.into(), ip.octets())),
            Err(_) => None,
        };
        let Some(slot) = slot else {
            let at = stream.local_addr().map(|a| a.ip());
            let reason = match at {
                Ok(ip) => format!("connection to {ip}, not to a slot's address"),
                Err(e) => format!("connection without a local address: {e}"),
            };
            self.record_connection(None, None, None, start, Outcome::Refused(reason));
            return;
        };
        let _ = stream.set_nodelay(true);
        match kind {
            Listener::Http => {
                let conn = Arc::new(Conn { slot, sni: None });
                self.serve_http(stream, conn).await;
            }
            Listener::Tls => self.tls_connection(stream, slot, start).await,
        }
    }

    async fn tls_connection(self: &Arc<Self>, mut stream: TcpStream, slot: u32, start: Instant) {
        let refuse = |identity: Option<SpiffeId>, sni: Option<String>, reason: String| {
            self.record_connection(Some(slot), identity, sni, start, Outcome::Refused(reason));
        };
        let hello = match tokio::time::timeout(self.idle_timeout, read_hello(&mut stream)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(e)) => return refuse(None, None, e.to_string()),
            Err(_) => return refuse(None, None, "no ClientHello in time".to_owned()),
        };
        let Some(sni) = hello.sni.clone() else {
            return refuse(
                None,
                None,
                "TLS ClientHello without a server name (SNI)".into(),
            );
        };
        let Some((id, credentials)) = self.directory.identity(slot) else {
            return refuse(None, Some(sni), "no identity is bound to the slot".into());
        };
        if credentials.iter().any(|c| same_host(&c.host, &sni)) {
            let key = match self.ca.leaf(&sni, SystemTime::now()) {
                Ok(key) => key,
                Err(e) => {
                    tracing::error!(%sni, error = %e, "egress CA cannot issue a certificate");
                    return refuse(Some(id), Some(sni), format!("no certificate: {e}"));
                }
            };
            let mut config = self.tls.clone();
            config.cert_resolver = Arc::new(OneName {
                name: sni.clone(),
                key: Some(key),
            });
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let handshake = acceptor.accept(Prefixed::new(hello.bytes, stream));
            let tls = match tokio::time::timeout(self.idle_timeout, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    return refuse(Some(id), Some(sni), format!("TLS handshake: {e}"));
                }
                Err(_) => return refuse(Some(id), Some(sni), "TLS handshake timed out".into()),
            };
            let conn = Arc::new(Conn {
                slot,
                sni: Some(sni),
            });
            self.serve_http(tls, conn).await;
        } else if self.directory.may_reach(slot, &sni, TLS_PORT) {
            self.passthrough(stream, hello.bytes, slot, id, sni, start)
                .await;
        } else {
            let reason = format!(
                "server name {sni} is not a credential's host, nor a name {id} may reach on port {TLS_PORT}"
            );
            refuse(Some(id), Some(sni), reason);
        }
    }

    /// Splices the connection to `sni` port 443, the ClientHello first.
    async fn passthrough(
        &self,
        mut stream: TcpStream,
        hello: Vec<u8>,
        slot: u32,
        id: SpiffeId,
        sni: String,
        start: Instant,
    ) {
        let connect = self.upstreams.connect(&sni, self.upstream_ports.tls);
        let mut upstream = match tokio::time::timeout(self.upstream_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = format!("passthrough to {sni}: {}", one_line(&*e));
                let outcome = Outcome::Failed(reason);
                return self.record_connection(Some(slot), Some(id), Some(sni), start, outcome);
            }
            Err(_) => {
                let reason = format!("passthrough to {sni}: no connection in time");
                let outcome = Outcome::Failed(reason);
                return self.record_connection(Some(slot), Some(id), Some(sni), start, outcome);
            }
        };
        let _ = upstream.set_nodelay(true);
        let (up, down) = match upstream.write_all(&hello).await {
            Ok(()) => tokio::io::copy_bidirectional(&mut stream, &mut upstream)
                .await
                .unwrap_or((0, 0)),
            Err(_) => (0, 0),
        };
        self.records.send(BrokerRecord {
            slot: Some(slot),
            identity: Some(id),
            host: Some(sni.clone()),
            sni: Some(sni),
            method: None,
            path: None,
            status: None,
            bytes_up: hello.len() as u64 + up,
            bytes_down: down,
            duration: start.elapsed(),
            credential: None,
            outcome: Outcome::Passthrough,
            at: SystemTime::now() - start.elapsed(),
        });
    }

    /// Serves HTTP/1.1 and HTTP/2 on a connection until it ends.
    async fn serve_http<S>(self: &Arc<Self>, io: S, conn: Arc<Conn>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.idle_timeout);
        builder.http2().timer(TokioTimer::new());
        let broker = self.clone();
        let service = hyper::service::service_fn(move |request| {
            forward::handle(broker.clone(), conn.clone(), request)
        });
        if let Err(e) = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await
        {
            tracing::debug!(error = %e, "egress connection ended with an error");
        }
    }

    fn record_connection(
        &self,
        slot: Option<u32>,
        identity: Option<SpiffeId>,
        sni: Option<String>,
        start: Instant,
        outcome: Outcome,
    ) {
        tracing::debug!(?slot, ?sni, ?outcome, "egress connection not served");
        self.records.send(BrokerRecord {
            slot,
            identity,
            host: sni.clone(),
            sni,
            method: None,
            path: None,
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: start.elapsed(),
            credential: None,
            outcome,
            at: SystemTime::now() - start.elapsed(),
        });
    }
}

/// The certificate of a terminated connection: for its one server name,
/// for no other (nor for a ClientHello without one).
#[derive(Debug, Default)]
struct OneName {
    name: String,
    key: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for OneName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        if same_host(name, &self.name) {
            self.key.clone()
        } else {
            None
        }
    }
}
