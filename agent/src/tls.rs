//! TLS plumbing that every HTTPS client and server of the agent shares:
//! the crypto provider, PEM certificate files and root stores, the
//! handshake-signature checks of a custom certificate verifier, and one
//! bounded HTTPS `GET` (the kubelet's pod list, foreign trust domains'
//! bundles). Verifying peers by SPIFFE ID is `svid::tls`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::HeaderName;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{InvalidDnsNameError, ServerName};
use x509_parser::error::PEMError;

/// The *ring* provider every idgate TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Errors reading a PEM certificate file.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: PEM: {source}")]
    Syntax { path: PathBuf, source: PEMError },
    #[error("{path}: no PEM certificate in it")]
    Empty { path: PathBuf },
    #[error("{path}: not a usable root certificate: {source}")]
    Root {
        path: PathBuf,
        source: rustls::Error,
    },
}

/// The DER certificates of PEM text (other blocks are passed over).
pub fn pem_certs(bytes: &[u8]) -> Result<Vec<Vec<u8>>, PEMError> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let pem = pem?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    Ok(out)
}

/// The DER certificates of a PEM file; a file without one is an error.
pub fn pem_certs_file(path: &Path) -> Result<Vec<Vec<u8>>, PemError> {
    let bytes = std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = pem_certs(&bytes).map_err(|source| PemError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    if certs.is_empty() {
        return Err(PemError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The roots of a PEM file, to verify a server's chain with.
pub fn roots_file(path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs_file(path)? {
        roots.add(c.into()).map_err(|source| PemError::Root {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The handshake-signature methods of a rustls certificate verifier
/// (server's or client's) that checks them with the algorithms in its
/// field `$algs` (`WebPkiSupportedAlgorithms`): the same in every
/// verifier, whatever it checks of the certificate itself.
macro_rules! handshake_signatures {
    ($algs:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$algs)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$algs.supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures;

/// Errors of an HTTPS `GET`.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("no host in the URL")]
    NoHost,
    #[error("server name {name:?}: {source}")]
    ServerName {
        name: String,
        source: InvalidDnsNameError,
    },
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("HTTP status {0}")]
    Status(hyper::StatusCode),
    #[error("reading the body: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `GET uri` (an `https` URI) over TLS set up by `config`, with
/// `headers`: the body of a success answer, at most `limit` bytes. The
/// connection ends with the call. Bound it in time where it is called.
pub async fn get(
    uri: &hyper::Uri,
    config: rustls::ClientConfig,
    headers: &[(HeaderName, &str)],
    limit: usize,
) -> Result<Bytes, HttpsError> {
    let authority = uri.authority().ok_or(HttpsError::NoHost)?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(443);
    let name = ServerName::try_from(host.to_owned()).map_err(|source| HttpsError::ServerName {
        name: host.to_owned(),
        source,
    })?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(HttpsError::Connect)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(HttpsError::Tls)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // Ends with the request: the connection is dropped with `sender`.
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, authority.as_str());
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await?;
    if !response.status().is_success() {
        return Err(HttpsError::Status(response.status()));
    }
    Ok(Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(HttpsError::Body)?
        .to_bytes())
}
