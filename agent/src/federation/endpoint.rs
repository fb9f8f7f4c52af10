//! The bundle endpoint: `GET` (any path) answers this trust domain's
//! SPIFFE bundle over HTTPS, with no client authentication.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{FederationError, endpoint_id};
use crate::identity::SpiffeId;
use crate::serve::{self, Answer};
use crate::svid::{Credentials, EndpointConfig, Parts, Profile, X509Svid, tls};

/// A bound bundle endpoint, not yet serving.
pub struct BundleEndpoint {
    listener: TcpListener,
    trust_domain: String,
    tls: Arc<rustls::ServerConfig>,
}

/// Binds the endpoint's address and prepares its certificate. Call before
/// anything is put in the kernel, so a bad address or file stops the
/// agent cleanly.
pub fn bind(
    config: &EndpointConfig,
    trust_domains: &[String],
    creds: &Arc<Credentials>,
) -> Result<BundleEndpoint, FederationError> {
    let trust_domain = config
        .trust_domain(trust_domains)
        .expect("checked with the configuration");
    let tls = match config.profile {
        Profile::HttpsSpiffe => {
            let resolver = SvidResolver {
                creds: creds.clone(),
                id: endpoint_id(&trust_domain),
                provider: crate::tls::provider(),
                current: Mutex::new(None),
            };
            // Issue now: a CA that cannot sign stops the agent here.
            resolver.certified_key()?;
            serve::tls_builder().with_cert_resolver(Arc::new(resolver))
        }
        Profile::HttpsWeb => serve::tls_from_files(
            config.cert.as_ref().expect("checked"),
            config.key.as_ref().expect("checked"),
        )?,
    };
    let address = config.address;
    let err = |source| FederationError::Listen { address, source };
    let listener = TcpListener::bind(address).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(BundleEndpoint {
        listener,
        trust_domain,
        tls: Arc::new(tls),
    })
}

impl BundleEndpoint {
    /// Serves for as long as the runtime runs.
    pub fn spawn(self, creds: Arc<Credentials>) -> Result<(), FederationError> {
        let td = self.trust_domain;
        let answer_td = td.clone();
        let address = serve::spawn(
            self.listener,
            Some(self.tls),
            "bundle endpoint",
            move |req| answer(req, &creds, &answer_td),
        )
        .map_err(|source| FederationError::Listen {
            address: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        tracing::info!(%address, trust_domain = %td, "serving the bundle endpoint");
        Ok(())
    }
}

fn answer(req: &Request<Incoming>, creds: &Credentials, td: &str) -> Answer {
    if req.method() != Method::GET {
        return serve::text(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    let set = creds.bundle_set();
    match set.local.get(td).map(|b| b.to_json(Parts::All)) {
        Some(Ok(json)) => serve::reply(StatusCode::OK, "application/json", json),
        _ => serve::text(StatusCode::SERVICE_UNAVAILABLE, "no bundle"),
    }
}

/// Presents the endpoint's current X.509-SVID, renewed with the others.
struct SvidResolver {
    creds: Arc<Credentials>,
    id: SpiffeId,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: Mutex<Option<(Arc<X509Svid>, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidResolver")
            .field("id", &self.id)
            .finish()
    }
}

impl SvidResolver {
    fn certified_key(&self) -> Result<Arc<CertifiedKey>, FederationError> {
        let svid = self.creds.x509_svid(&self.id, SystemTime::now())?;
        let mut current = self.current.lock().expect("resolver lock");
        if let Some((s, ck)) = current.as_ref()
            && Arc::ptr_eq(s, &svid)
        {
            return Ok(ck.clone());
        }
        let (chain, key) = tls::identity(&svid.chain, &svid.key);
        let ck = CertifiedKey::from_der(chain, key, &self.provider).map_err(|source| {
            FederationError::Identity {
                what: self.id.to_string(),
                source,
            }
        })?;
        let ck = Arc::new(ck);
        *current = Some((svid, ck.clone()));
        Ok(ck)
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
            .map_err(|e| tracing::error!(error = %e, "bundle endpoint: no SVID to present"))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::fetch::fetch;
    use crate::svid::{ForeignDomain, SvidConfig, certs_pem};

    fn state(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("idgate-fed-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn another_agent_fetches_the_bundle_over_https_spiffe_from_the_right_endpoint_only() {
        let (state_a, state_b) = (state("a"), state("b"));
        let a = Credentials::load(&SvidConfig::default(), &["a.test".into()], &state_a).unwrap();
        let config = EndpointConfig {
            address: ([127, 0, 0, 1], 0).into(),
            trust_domain: None,
            profile: Profile::HttpsSpiffe,
            cert: None,
            key: None,
        };
        let endpoint = bind(&config, &["a.test".into()], &a).unwrap();
        let port = endpoint.listener.local_addr().unwrap().port();
        endpoint.spawn(a.clone()).unwrap();

        // b bootstraps with a's roots as PEM (as `idgate svid --write`
        // leaves them).
        let a_bundle = a.bundle_set().local["a.test"].clone();
        let boot = state_b.join("a.test.pem");
        std::fs::write(&boot, certs_pem(&a_bundle.x509_authorities)).unwrap();
        let foreign = ForeignDomain {
            trust_domain: "a.test".into(),
            url: Some(format!("https://127.0.0.1:{port}/bundle")),
            profile: Profile::HttpsSpiffe,
            endpoint_id: Some("spiffe://a.test/idgate/bundle-endpoint".into()),
            bundle: Some(boot),
            ca: None,
            refresh: None,
        };
        foreign.check().unwrap();
        let config_b = SvidConfig {
            federates_with: vec![foreign.clone()],
            ..Default::default()
        };
        let b = Credentials::load(&config_b, &["b.test".into()], &state_b).unwrap();
        // Before any fetch the bootstrap bundle is what b hands out.
        assert_eq!(
            b.bundle_set().federated["a.test"].x509_authorities,
            a_bundle.x509_authorities
        );
        let got = fetch(&foreign, &b).await.unwrap();
        assert_eq!(got, a_bundle);
        assert!(!got.jwt_authorities.is_empty());
        b.set_federated(got).unwrap();
        assert!(crate::svid::federated_path(&state_b, "a.test").exists());

        // The endpoint must present exactly the configured SPIFFE ID.
        let mut wrong_id = foreign.clone();
        wrong_id.endpoint_id = Some("spiffe://a.test/someone-else".into());
        assert!(fetch(&wrong_id, &b).await.is_err());
        // And its SVID must verify against a's bundle: a bundle that
        // claims to be a's but holds other roots does not let it through.
        let state_c = state("c");
        let c = Credentials::load(&SvidConfig::default(), &["a.test".into()], &state_c).unwrap();
        let c_roots = c.bundle_set().local["a.test"].clone();
        b.set_federated(c_roots).unwrap();
        let e = fetch(&foreign, &b).await.unwrap_err();
        assert!(
            matches!(
                e,
                FederationError::Fetch {
                    source: crate::tls::HttpsError::Tls(_),
                    ..
                }
            ),
            "{e}"
        );
        for d in [state_a, state_b, state_c] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
