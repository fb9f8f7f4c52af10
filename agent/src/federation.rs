//! SPIFFE federation (the SPIFFE Federation specification): serving this
//! agent's trust domain bundle at a bundle endpoint, and fetching the
//! bundles of foreign trust domains from theirs, refreshed on their
//! `spiffe_refresh_hint`, so workloads get them as federated bundles.
//!
//! Both profiles: `https_spiffe` (the endpoint presents an X.509-SVID,
//! checked against the endpoint's trust domain bundle: the configured
//! bootstrap bundle first, then the latest fetched one) and `https_web`
//! (Web PKI: the system's roots, or a configured CA file).

mod endpoint;
mod fetch;

use std::net::SocketAddr;

use crate::identity::SpiffeId;
use crate::svid::{ForeignDomainError, SvidError};
use crate::tls::{HttpsError, PemError};

pub use endpoint::{BundleEndpoint, bind};
pub use fetch::run;

/// Errors serving or fetching bundles.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("bundle endpoint {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// The certificate the endpoint presents (a file, or its SVID).
    #[error("bundle endpoint {what}: {source}")]
    Identity { what: String, source: rustls::Error },
    #[error(transparent)]
    Svid(#[from] SvidError),
    #[error(transparent)]
    ForeignDomain(#[from] ForeignDomainError),
    #[error("{url}: {source}")]
    Fetch { url: String, source: HttpsError },
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("TLS settings: {0}")]
    TlsSettings(#[from] rustls::Error),
    #[error("bundle endpoint: {0}")]
    Serve(#[from] crate::serve::ServeError),
}

/// The SPIFFE ID the `https_spiffe` bundle endpoint presents:
/// `spiffe://<trust domain>/idgate/bundle-endpoint`.
pub fn endpoint_id(trust_domain: &str) -> SpiffeId {
    format!("spiffe://{trust_domain}/idgate/bundle-endpoint")
        .parse()
        .expect("a checked trust domain makes a valid ID")
}
