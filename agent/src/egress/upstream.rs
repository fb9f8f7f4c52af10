//! The broker's connections to upstreams: names resolved through the
//! [`Directory`], TLS verified against the system's roots plus the
//! configured extra roots, pooled HTTP/1.1 and HTTP/2 clients, and plain
//! TCP for passthrough.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;

use super::view::{BoxFuture, Directory, DirectoryError};

/// A request body sent upstream.
pub(super) type UpBody = BoxBody<Bytes, hyper::Error>;

type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// Resolves names for the HTTP connector through the [`Directory`].
#[derive(Clone)]
struct Resolver(Arc<dyn Directory>);

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DirectoryError;
    type Future = BoxFuture<'static, Result<Self::Response, DirectoryError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DirectoryError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolving = self.0.resolve(name.as_str());
        Box::pin(async move {
            let ips = resolving.await?;
            if ips.is_empty() {
                return Err(format!("{name} has no addresses").into());
            }
            // The connector puts in the URI's port.
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(addrs.into_iter())
        })
    }
}

/// The pooled clients.
pub(super) struct Upstreams {
    /// Offers h2 and http/1.1.
    client: Client<Connector, UpBody>,
    /// Offers http/1.1 only: for requests that upgrade the connection.
    http1: Client<Connector, UpBody>,
    tcp: HttpConnector<Resolver>,
}

impl Upstreams {
    /// Clients that resolve through `directory`, verify servers against
    /// `roots`, and give up connecting after `connect_timeout`; an unused
    /// connection is closed after `idle_timeout`.
    pub(super) fn new(
        directory: Arc<dyn Directory>,
        roots: rustls::RootCertStore,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let mut tcp = HttpConnector::new_with_resolver(Resolver(directory));
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = |http2: bool| {
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            if http2 {
                builder
                    .enable_http1()
                    .enable_http2()
                    .wrap_connector(tcp.clone())
            } else {
                builder.enable_http1().wrap_connector(tcp.clone())
            }
        };
        let client = |connector| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(idle_timeout)
                .build(connector)
        };
        Ok(Self {
            client: client(connector(true)),
            http1: client(connector(false)),
            tcp,
        })
    }

    /// Sends `request` (an absolute URI) on a pooled connection; an
    /// upgrading request only over HTTP/1.1.
    pub(super) async fn send(
        &self,
        request: http::Request<UpBody>,
        upgrade: bool,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        if upgrade {
            self.http1.request(request).await
        } else {
            self.client.request(request).await
        }
    }

    /// A TCP connection to `host` port `port`, resolved through the
    /// directory (every address tried, IPv6 and IPv4 raced).
    pub(super) async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, DirectoryError> {
        let uri: http::Uri = format!("tcp://{host}:{port}").parse()?;
        let mut tcp = self.tcp.clone();
        let io = tower::ServiceExt::oneshot(&mut tcp, uri).await?;
        Ok(io.into_inner())
    }
}

/// An error and its sources on one line.
pub(super) fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text.replace(['\n', '\r'], " ")
}
