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
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::identity::SpiffeId;
use crate::svid::{Bundle, SvidError};

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
    #[error("bundle endpoint {path}: {message}")]
    Identity { path: PathBuf, message: String },
    #[error(transparent)]
    Svid(#[from] SvidError),
}

/// The SPIFFE ID the `https_spiffe` bundle endpoint presents:
/// `spiffe://<trust domain>/idgate/bundle-endpoint`.
pub fn endpoint_id(trust_domain: &str) -> SpiffeId {
    format!("spiffe://{trust_domain}/idgate/bundle-endpoint")
        .parse()
        .expect("a checked trust domain makes a valid ID")
}

/// How a bundle endpoint is authenticated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// The endpoint presents an X.509-SVID.
    #[default]
    HttpsSpiffe,
    /// The endpoint presents a Web PKI certificate for its host name.
    HttpsWeb,
}

/// `[svid.bundle_endpoint]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Where to listen, e.g. `0.0.0.0:8443`.
    pub address: SocketAddr,
    /// Whose bundle to serve; default: the agent's only trust domain.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// `https_spiffe` (default: presents the X.509-SVID
    /// `spiffe://<trust domain>/idgate/bundle-endpoint`) or `https_web`.
    #[serde(default)]
    pub profile: Profile,
    /// `https_web`: PEM certificate chain for the endpoint's host name.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// `https_web`: its PEM private key (mode 0600).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl EndpointConfig {
    pub(crate) fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        self.cert.iter_mut().chain(self.key.iter_mut())
    }

    /// The trust domain whose bundle is served.
    pub fn trust_domain(&self, trust_domains: &[String]) -> Result<String, String> {
        match (&self.trust_domain, trust_domains) {
            (Some(td), _) => Ok(td.clone()),
            (None, [only]) => Ok(only.clone()),
            (None, _) => Err(
                "`svid.bundle_endpoint.trust_domain` is needed unless `trust_domains` names exactly one"
                    .into(),
            ),
        }
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        match (self.profile, &self.cert, &self.key) {
            (Profile::HttpsWeb, Some(_), Some(_)) | (Profile::HttpsSpiffe, None, None) => Ok(()),
            (Profile::HttpsWeb, _, _) => {
                Err("`svid.bundle_endpoint`: profile https_web needs `cert` and `key`".into())
            }
            (Profile::HttpsSpiffe, _, _) => Err(
                "`svid.bundle_endpoint`: `cert` and `key` are for https_web; https_spiffe presents an SVID"
                    .into(),
            ),
        }
    }
}

/// `[[svid.federates_with]]`: a foreign trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForeignDomain {
    pub trust_domain: String,
    /// Its bundle endpoint (`https://host:port/path`); without one the
    /// `bundle` file is the bundle, as it is.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub profile: Profile,
    /// `https_spiffe`: the SPIFFE ID the endpoint must present.
    #[serde(default)]
    pub endpoint_id: Option<String>,
    /// A bundle file (SPIFFE bundle JSON, or PEM CA certificates): the
    /// bootstrap bundle of a self-serving `https_spiffe` endpoint, or the
    /// whole bundle when there is no `url`.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// `https_web`: PEM roots to trust instead of the system's.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// How often to fetch; default: the bundle's refresh hint, else 5m.
    #[serde(default, deserialize_with = "optional_duration")]
    pub refresh: Option<Duration>,
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: String = Deserialize::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl ForeignDomain {
    pub(crate) fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        self.bundle.iter_mut().chain(self.ca.iter_mut())
    }

    /// The endpoint's URI, checked.
    fn uri(&self) -> Result<Option<hyper::Uri>, String> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let uri: hyper::Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("url {url:?}: a bundle endpoint URL is https"));
        }
        match uri.authority() {
            Some(a) if !a.as_str().contains('@') => Ok(Some(uri)),
            _ => Err(format!("url {url:?}: needs a host and no user info")),
        }
    }

    fn endpoint_spiffe_id(&self) -> Result<Option<SpiffeId>, String> {
        self.endpoint_id
            .as_deref()
            .map(|s| s.parse().map_err(|e| format!("endpoint_id {s:?}: {e}")))
            .transpose()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        let uri = self.uri()?;
        let endpoint = self.endpoint_spiffe_id()?;
        match (uri, self.profile) {
            (None, _) if self.bundle.is_none() => {
                Err("needs a `url` to fetch the bundle from, or a `bundle` file".into())
            }
            (None, _) => Ok(()),
            (Some(_), Profile::HttpsSpiffe) => {
                let id = endpoint.ok_or("profile https_spiffe needs `endpoint_id`")?;
                if id.trust_domain() == self.trust_domain && self.bundle.is_none() {
                    return Err(
                        "a self-serving https_spiffe endpoint needs a bootstrap `bundle` file"
                            .into(),
                    );
                }
                Ok(())
            }
            (Some(_), Profile::HttpsWeb) => Ok(()),
        }
    }

    /// The bundle to start with: the last one fetched (kept in the state
    /// directory), else the configured file.
    pub fn initial_bundle(&self, state_dir: &Path) -> Result<Option<Bundle>, SvidError> {
        let kept = crate::svid::federated_path(state_dir, &self.trust_domain);
        let path = if self.url.is_some() && kept.exists() {
            kept
        } else if let Some(file) = &self.bundle {
            file.clone()
        } else {
            return Ok(None);
        };
        let bytes = std::fs::read(&path).map_err(|source| SvidError::Io {
            path: path.clone(),
            source,
        })?;
        Bundle::from_file_contents(&self.trust_domain, &bytes)
            .map(Some)
            .map_err(|e| SvidError::Invalid {
                path,
                message: e.to_string(),
            })
    }
}
