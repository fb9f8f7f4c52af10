//! The agent's small HTTP endpoints for others (the federation bundle
//! endpoint, the OIDC discovery provider): accept, TLS when configured,
//! HTTP/1.1 with bounded request heads and time limits, and one
//! synchronous answer per request from the current state.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::svid::{SvidError, tls};
use crate::tls::PemError;

/// An answer.
pub type Answer = Response<Full<Bytes>>;

/// The most a request head (request line and headers) may take; a larger
/// one is answered 431 and the connection closed.
const MAX_HEAD: usize = 16 * 1024;
/// The most a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// The most one connection may last.
const CONNECTION: Duration = Duration::from_secs(30);

/// An answer of `status` with a body of type `content_type`.
pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

/// A plain-text answer.
pub fn text(status: StatusCode, message: &str) -> Answer {
    reply(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

/// Serves `listener` (non-blocking) for as long as the runtime runs,
/// over TLS when `tls` is given; `name` labels the logs. Returns the
/// address it serves.
pub fn spawn<F>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    name: &'static str,
    answer: F,
) -> std::io::Result<SocketAddr>
where
    F: Fn(&Request<Incoming>) -> Answer + Send + Sync + 'static,
{
    let address = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "{name} listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else {
                    return connection(stream, answer).await;
                };
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => connection(tls, answer).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "{name}: TLS handshake failed"),
                    Err(_) => tracing::debug!("{name}: TLS handshake timed out"),
                }
            });
        }
    });
    Ok(address)
}

async fn connection<I, F>(io: I, answer: Arc<F>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Request<Incoming>) -> Answer + Send + Sync + 'static,
{
    let service = service_fn(move |req| {
        let answer = answer.clone();
        async move { Ok::<_, Infallible>(answer(&req)) }
    });
    let conn = http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(CONNECTION, conn).await;
}

/// Errors preparing an endpoint's TLS from files.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error(transparent)]
    Key(#[from] SvidError),
    #[error("{path}: {source}")]
    Certificate {
        path: PathBuf,
        source: rustls::Error,
    },
}

/// A TLS server configuration presenting the PEM certificate chain in
/// `cert` with the PEM private key in `key` (owner-only, as every key).
pub fn tls_from_files(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ServeError> {
    let chain = crate::tls::pem_certs_file(cert)?;
    let key_der = crate::svid::private_key_file(key)?;
    let (chain, key_der) = tls::identity(&chain, &key_der);
    tls_builder()
        .with_single_cert(chain, key_der)
        .map_err(|source| ServeError::Certificate {
            path: cert.to_owned(),
            source,
        })
}

/// A TLS server configuration builder with idgate's provider and no
/// client authentication.
pub fn tls_builder() -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>
{
    rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
}
