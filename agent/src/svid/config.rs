//! `[svid]` in the agent configuration: the Workload API, SVID lifetimes,
//! the CAs, the bundle endpoint, the foreign trust domains federated
//! with and the OIDC issuer, and the checks serde cannot make. The
//! federation module serves and fetches what the bundle endpoint and the
//! foreign domains describe; the oidc module serves the issuer's
//! documents.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Bundle, SvidError};
use crate::identity::{SpiffeId, SpiffeIdError};

/// What is wrong in `[svid]`.
#[derive(Debug, thiserror::Error)]
pub enum SvidConfigError {
    #[error("`svid.{name}` must be at least 1s")]
    TtlTooShort { name: &'static str },
    #[error(
        "`svid.{name}` ({}) must be at most a sixth of `svid.ca_ttl` ({}): an SVID must expire before the CA that signed it leaves the bundle",
        humantime::format_duration(*ttl),
        humantime::format_duration(*ca_ttl)
    )]
    TtlTooLong {
        name: &'static str,
        ttl: Duration,
        ca_ttl: Duration,
    },
    #[error("{what}: {source}")]
    TrustDomain {
        what: String,
        source: TrustDomainError,
    },
    #[error("{what}: {td:?} is not in `trust_domains`")]
    NotLocal { what: String, td: String },
    #[error("{what}: {td:?} is one of this agent's own trust domains")]
    Local { what: String, td: String },
    #[error("{what}: trust domain {td:?} appears twice")]
    Twice { what: String, td: String },
    #[error("`{key}` is needed unless `trust_domains` names exactly one")]
    WhichTrustDomain { key: &'static str },
    #[error("`svid.bundle_endpoint`: profile https_web needs `cert` and `key`")]
    EndpointWebFiles,
    #[error(
        "`svid.bundle_endpoint`: `cert` and `key` are for https_web; https_spiffe presents an SVID"
    )]
    EndpointSpiffeFiles,
    #[error("{what}: {source}")]
    Foreign {
        what: String,
        source: ForeignDomainError,
    },
    #[error("`svid.oidc`: {0}")]
    Oidc(#[from] OidcConfigError),
}

/// What is wrong in `[svid.oidc]`.
#[derive(Debug, thiserror::Error)]
pub enum OidcConfigError {
    #[error("issuer {issuer:?}: {source}")]
    IssuerSyntax {
        issuer: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error("issuer {issuer:?}: {why}")]
    Issuer { issuer: String, why: &'static str },
    #[error("needs `address` (serve), `static_dir` (write), or both")]
    NoOutput,
    #[error("`cert` and `key` go together, and only with `address`")]
    CertAndKey,
    #[error(
        "`address` {0} is not loopback: plain HTTP only on loopback (behind a reverse proxy); give `cert` and `key` for HTTPS"
    )]
    PlainNotLoopback(SocketAddr),
}

/// What is wrong in one `[[svid.federates_with]]`.
#[derive(Debug, thiserror::Error)]
pub enum ForeignDomainError {
    #[error("url {url:?}: {source}")]
    UrlSyntax {
        url: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error("url {url:?}: {why}")]
    Url { url: String, why: &'static str },
    #[error("endpoint_id {id:?}: {source}")]
    EndpointId { id: String, source: SpiffeIdError },
    #[error("needs a `url` to fetch the bundle from, or a `bundle` file")]
    NoSource,
    #[error("profile https_spiffe needs `endpoint_id`")]
    NoEndpointId,
    #[error("a self-serving https_spiffe endpoint needs a bootstrap `bundle` file")]
    NoBootstrap,
}

/// Why a name is not a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    #[error("{td:?}: {source}")]
    Syntax { td: String, source: SpiffeIdError },
    #[error("{td:?} is not a bare trust domain name")]
    Path { td: String },
}

/// A trust domain name, checked as the SPIFFE ID spec says.
pub fn check_trust_domain(td: &str) -> Result<SpiffeId, TrustDomainError> {
    let id: SpiffeId =
        format!("spiffe://{td}")
            .parse()
            .map_err(|source| TrustDomainError::Syntax {
                td: td.to_owned(),
                source,
            })?;
    if !id.path().is_empty() {
        return Err(TrustDomainError::Path { td: td.to_owned() });
    }
    Ok(id)
}

/// `[svid]` in the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SvidConfig {
    /// Serve the SPIFFE Workload API. Default true.
    pub workload_api: bool,
    /// The Workload API socket, connectable by every local user. Default:
    /// `workload.sock` beside `control_socket` (so
    /// `/run/idgate/workload.sock`).
    pub socket: Option<PathBuf>,
    /// Lifetime of X.509-SVIDs. Default 1h; at most a sixth of `ca_ttl`.
    #[serde(with = "humantime_serde")]
    pub x509_ttl: Duration,
    /// Lifetime of JWT-SVIDs. Default 5m; at most a sixth of `ca_ttl`.
    #[serde(with = "humantime_serde")]
    pub jwt_ttl: Duration,
    /// Lifetime of each generated CA (and JWT key) generation; a new one
    /// is published at half of it. Default 24h.
    #[serde(with = "humantime_serde")]
    pub ca_ttl: Duration,
    /// `[[svid.upstream_ca]]`: trust domains whose X.509-SVIDs an
    /// operator's intermediate CA signs, instead of a generated root.
    pub upstream_ca: Vec<UpstreamCa>,
    /// `[svid.bundle_endpoint]`: serve a trust domain's bundle over HTTPS
    /// for other trust domains to federate with. None by default.
    pub bundle_endpoint: Option<EndpointConfig>,
    /// `[[svid.federates_with]]`: foreign trust domains whose bundles are
    /// fetched (or read from a file) and handed to workloads.
    pub federates_with: Vec<ForeignDomain>,
    /// `[svid.jwt_algorithms]`: trust domain = `"ES256"` (the default,
    /// P-256) or `"RS256"` (RSA-2048): the key type of the domain's new
    /// JWT key generations.
    pub jwt_algorithms: BTreeMap<String, JwtAlgorithm>,
    /// `[svid.oidc]`: an OpenID Connect issuer for one trust domain's
    /// JWT-SVIDs, its discovery documents served and/or written. None by
    /// default.
    pub oidc: Option<OidcConfig>,
}

/// An operator's intermediate CA for one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamCa {
    pub trust_domain: String,
    /// PEM: the intermediate certificate, then any further intermediates
    /// up to (not including) a root.
    pub cert: PathBuf,
    /// PEM private key of the intermediate; mode 0600 or stricter.
    pub key: PathBuf,
    /// PEM root certificates: the trust domain's X.509 bundle.
    pub bundle: PathBuf,
}

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            workload_api: true,
            socket: None,
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            ca_ttl: Duration::from_secs(24 * 3600),
            upstream_ca: Vec::new(),
            bundle_endpoint: None,
            federates_with: Vec::new(),
            jwt_algorithms: BTreeMap::new(),
            oidc: None,
        }
    }
}

/// Durations as humantime strings (`"90s"`, `"1h"`).
mod humantime_serde {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl SvidConfig {
    /// Makes relative paths relative to `base`, and fills in the socket
    /// default beside the control socket.
    pub fn resolve(&mut self, base: &Path, control_socket: &Path) {
        let socket = self.socket.get_or_insert_with(|| {
            control_socket
                .parent()
                .unwrap_or(Path::new("/run/idgate"))
                .join("workload.sock")
        });
        let mut paths: Vec<&mut PathBuf> = vec![socket];
        for u in &mut self.upstream_ca {
            paths.extend([&mut u.cert, &mut u.key, &mut u.bundle]);
        }
        if let Some(e) = &mut self.bundle_endpoint {
            paths.extend(e.cert.iter_mut().chain(e.key.iter_mut()));
        }
        for f in &mut self.federates_with {
            paths.extend(f.bundle.iter_mut().chain(f.ca.iter_mut()));
        }
        if let Some(o) = &mut self.oidc {
            paths.extend(o.cert.iter_mut().chain(o.key.iter_mut()));
            paths.extend(o.static_dir.iter_mut().chain(o.include_jwks.iter_mut()));
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// The algorithm of `td`'s new JWT keys.
    pub fn jwt_algorithm(&self, td: &str) -> JwtAlgorithm {
        self.jwt_algorithms.get(td).copied().unwrap_or_default()
    }

    /// The socket the Workload API listens on (after `resolve`).
    pub fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .unwrap_or(Path::new("/run/idgate/workload.sock"))
    }

    /// Checks what serde cannot; `trust_domains` is the agent's list
    /// (empty: any).
    pub fn check(&self, trust_domains: &[String]) -> Result<(), SvidConfigError> {
        for (name, ttl) in [("x509_ttl", self.x509_ttl), ("jwt_ttl", self.jwt_ttl)] {
            if ttl < Duration::from_secs(1) {
                return Err(SvidConfigError::TtlTooShort { name });
            }
            if ttl > self.ca_ttl / 6 {
                return Err(SvidConfigError::TtlTooLong {
                    name,
                    ttl,
                    ca_ttl: self.ca_ttl,
                });
            }
        }
        let domain = |td: &str, what: &str| {
            check_trust_domain(td).map_err(|source| SvidConfigError::TrustDomain {
                what: what.to_owned(),
                source,
            })
        };
        let local = |td: &str, what: &str| {
            domain(td, what)?;
            if !trust_domains.is_empty() && !trust_domains.iter().any(|t| t == td) {
                return Err(SvidConfigError::NotLocal {
                    what: what.to_owned(),
                    td: td.to_owned(),
                });
            }
            Ok(())
        };
        let twice = |what: &str, td: &str| SvidConfigError::Twice {
            what: what.to_owned(),
            td: td.to_owned(),
        };
        for (i, u) in self.upstream_ca.iter().enumerate() {
            local(
                &u.trust_domain,
                &format!("svid.upstream_ca[{i}].trust_domain"),
            )?;
            if self.upstream_ca[..i]
                .iter()
                .any(|o| o.trust_domain == u.trust_domain)
            {
                return Err(twice("svid.upstream_ca", &u.trust_domain));
            }
        }
        if let Some(e) = &self.bundle_endpoint {
            let td = e.trust_domain(trust_domains)?;
            local(&td, "svid.bundle_endpoint.trust_domain")?;
            e.check()?;
        }
        for (i, f) in self.federates_with.iter().enumerate() {
            let what = format!("svid.federates_with[{i}]");
            domain(&f.trust_domain, &format!("{what}.trust_domain"))?;
            if trust_domains.contains(&f.trust_domain) {
                return Err(SvidConfigError::Local {
                    what,
                    td: f.trust_domain.clone(),
                });
            }
            if self.federates_with[..i]
                .iter()
                .any(|o| o.trust_domain == f.trust_domain)
            {
                return Err(twice(&what, &f.trust_domain));
            }
            f.check()
                .map_err(|source| SvidConfigError::Foreign { what, source })?;
        }
        for td in self.jwt_algorithms.keys() {
            local(td, "svid.jwt_algorithms")?;
        }
        if let Some(o) = &self.oidc {
            local(&o.trust_domain(trust_domains)?, "svid.oidc.trust_domain")?;
            o.check()?;
        }
        Ok(())
    }
}

/// The algorithm a trust domain's JWT-SVIDs are signed with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 with SHA-256.
    #[default]
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys (for verifiers that
    /// take RSA keys only).
    RS256,
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
    /// The trust domain whose bundle is served.
    pub fn trust_domain(&self, trust_domains: &[String]) -> Result<String, SvidConfigError> {
        configured_trust_domain(
            &self.trust_domain,
            trust_domains,
            "svid.bundle_endpoint.trust_domain",
        )
    }

    fn check(&self) -> Result<(), SvidConfigError> {
        match (self.profile, &self.cert, &self.key) {
            (Profile::HttpsWeb, Some(_), Some(_)) | (Profile::HttpsSpiffe, None, None) => Ok(()),
            (Profile::HttpsWeb, _, _) => Err(SvidConfigError::EndpointWebFiles),
            (Profile::HttpsSpiffe, _, _) => Err(SvidConfigError::EndpointSpiffeFiles),
        }
    }
}

/// The trust domain a table names under `key`, or else the agent's only
/// one.
fn configured_trust_domain(
    given: &Option<String>,
    trust_domains: &[String],
    key: &'static str,
) -> Result<String, SvidConfigError> {
    match (given, trust_domains) {
        (Some(td), _) => Ok(td.clone()),
        (None, [only]) => Ok(only.clone()),
        (None, _) => Err(SvidConfigError::WhichTrustDomain { key }),
    }
}

/// `[svid.oidc]`: an OpenID Connect issuer of one local trust domain's
/// JWT-SVIDs (see the oidc module).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL: `https://host[:port][/path]` (plain `http` only
    /// for a loopback host), no query, fragment, user or trailing `/`.
    pub issuer: String,
    /// Whose JWT-SVIDs; default: the agent's only trust domain.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Serve the documents here. Plain HTTP unless `cert` and `key` are
    /// given, and then only on a loopback address (for a reverse proxy).
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS on `address`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its PEM private key (mode 0600).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Write `.well-known/openid-configuration` and `jwks.json` under this
    /// directory (to publish from, e.g. a bucket), rewritten on rotation.
    #[serde(default)]
    pub static_dir: Option<PathBuf>,
    /// JWK Set files of the other agents that share this issuer; their
    /// signing keys are served and written with this agent's. Read again
    /// every 5 s; a file that cannot be read keeps its last keys.
    #[serde(default)]
    pub include_jwks: Vec<PathBuf>,
}

/// The longest an issuer URL may be (the documents and every token name
/// it).
const MAX_ISSUER: usize = 1024;

impl OidcConfig {
    /// The trust domain whose JWT-SVIDs the issuer covers.
    pub fn trust_domain(&self, trust_domains: &[String]) -> Result<String, SvidConfigError> {
        configured_trust_domain(&self.trust_domain, trust_domains, "svid.oidc.trust_domain")
    }

    /// The issuer URL, checked as OpenID Connect Discovery 1.0 asks
    /// (`https`, no query or fragment), allowing `http` for a loopback
    /// host.
    pub fn issuer_uri(&self) -> Result<hyper::Uri, OidcConfigError> {
        let issuer = &self.issuer;
        let bad = |why| OidcConfigError::Issuer {
            issuer: issuer.clone(),
            why,
        };
        if issuer.len() > MAX_ISSUER {
            return Err(bad("longer than 1024 bytes"));
        }
        if issuer.contains(['?', '#', '@']) || issuer.ends_with('/') {
            return Err(bad("no query, fragment, user or trailing `/`"));
        }
        let uri: hyper::Uri = issuer
            .parse()
            .map_err(|source| OidcConfigError::IssuerSyntax {
                issuer: issuer.clone(),
                source,
            })?;
        let host = uri.host().filter(|h| !h.is_empty()).ok_or(bad("no host"))?;
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match uri.scheme_str() {
            Some("https") => Ok(uri),
            Some("http") if loopback => Ok(uri),
            _ => Err(bad("must be https:// (http:// only for a loopback host)")),
        }
    }

    fn check(&self) -> Result<(), OidcConfigError> {
        self.issuer_uri()?;
        if self.address.is_none() && self.static_dir.is_none() {
            return Err(OidcConfigError::NoOutput);
        }
        match (&self.cert, &self.key, self.address) {
            (Some(_), Some(_), Some(_)) | (None, None, None) => Ok(()),
            (None, None, Some(a)) if !a.ip().is_loopback() => {
                Err(OidcConfigError::PlainNotLoopback(a))
            }
            (None, None, Some(_)) => Ok(()),
            _ => Err(OidcConfigError::CertAndKey),
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
    /// The endpoint's URI, checked.
    pub fn uri(&self) -> Result<Option<hyper::Uri>, ForeignDomainError> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let bad = |why| ForeignDomainError::Url {
            url: url.clone(),
            why,
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|source| ForeignDomainError::UrlSyntax {
                url: url.clone(),
                source,
            })?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("a bundle endpoint URL is https"));
        }
        match uri.authority() {
            Some(a) if !a.as_str().contains('@') => Ok(Some(uri)),
            _ => Err(bad("needs a host and no user info")),
        }
    }

    /// The SPIFFE ID an `https_spiffe` endpoint must present, checked.
    pub fn endpoint_spiffe_id(&self) -> Result<Option<SpiffeId>, ForeignDomainError> {
        self.endpoint_id
            .as_deref()
            .map(|id| {
                id.parse().map_err(|source| ForeignDomainError::EndpointId {
                    id: id.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    pub(crate) fn check(&self) -> Result<(), ForeignDomainError> {
        let uri = self.uri()?;
        let endpoint = self.endpoint_spiffe_id()?;
        match (uri, self.profile) {
            (None, _) if self.bundle.is_none() => Err(ForeignDomainError::NoSource),
            (None, _) => Ok(()),
            (Some(_), Profile::HttpsSpiffe) => {
                let id = endpoint.ok_or(ForeignDomainError::NoEndpointId)?;
                if id.trust_domain() == self.trust_domain && self.bundle.is_none() {
                    return Err(ForeignDomainError::NoBootstrap);
                }
                Ok(())
            }
            (Some(_), Profile::HttpsWeb) => Ok(()),
        }
    }

    /// The bundle to start with: the last one fetched (kept in the state
    /// directory), else the configured file.
    pub fn initial_bundle(&self, state_dir: &Path) -> Result<Option<Bundle>, SvidError> {
        let kept = super::federated_path(state_dir, &self.trust_domain);
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
            .map_err(|source| SvidError::File {
                path,
                source: Box::new(source),
            })
    }
}
