//! SPIFFE credentials: a signing authority per trust domain (generated and
//! rotated, or an operator's intermediate), X.509- and JWT-SVIDs issued
//! from it, the trust domain's bundle, and the federated bundles of
//! foreign trust domains. The Workload API and the bundle endpoint serve
//! what [`Credentials`] holds.

mod bundle;
mod ca;
mod config;
mod jwt;
pub mod tls;
mod x509;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::identity::SpiffeId;

pub use bundle::{Bundle, CaCertError, Parts, PublicJwk, certs_pem, pem, split_der};
pub use ca::{refresh_hint, write_file};
pub use config::{
    EndpointConfig, ForeignDomain, ForeignDomainError, JwtAlgorithm, OidcConfig, OidcConfigError,
    Profile, SvidConfig, SvidConfigError, TrustDomainError, UpstreamCa, check_trust_domain,
};
pub use jwt::{JwtError, Validated};
pub(crate) use x509::ca_params;
pub use x509::{Role, VerifyError, X509Svid, leaf_id, verify as verify_x509};

/// Errors loading, issuing or reading credentials.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA key {path} {problem}")]
    KeyNotPrivate {
        path: PathBuf,
        problem: crate::files::NotPrivate,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: Box<SvidError>,
    },
    #[error(transparent)]
    Pem(#[from] crate::tls::PemError),
    #[error("PEM: {0}")]
    PemText(#[from] x509_parser::error::PEMError),
    #[error("{path}: certificate {index}: {source}")]
    Ca {
        path: PathBuf,
        index: usize,
        source: bundle::CaCertError,
    },
    #[error("bundle for {trust_domain}: {source}")]
    BundleKey {
        trust_domain: String,
        source: bundle::JwkError,
    },
    #[error("a certificate does not parse: {0}")]
    Cert(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not a usable key or CA: {source}")]
    Key { path: PathBuf, source: rcgen::Error },
    #[error("JWT signing key: {0}")]
    JwtKey(ring::error::KeyRejected),
    #[error("generating an RSA JWT signing key: {0}")]
    RsaGenerate(#[source] rsa::Error),
    #[error("encoding an RSA JWT signing key: {0}")]
    RsaEncode(#[source] rsa::pkcs8::Error),
    #[error("issuing {what}: {source}")]
    Sign { what: String, source: rcgen::Error },
    #[error("bundle for {trust_domain}: X.509 authority: {source}")]
    BundleAuthority {
        trust_domain: String,
        source: bundle::CaCertError,
    },
    #[error("issuing: {0}")]
    Issue(String),
    #[error("{0}")]
    Bundle(String),
    #[error("no CA for trust domain {0}: it is not in `trust_domains`")]
    NoAuthority(String),
}

impl SvidError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Every bundle the agent hands out, and the generation that signs in
/// each of its own trust domains; streams wake when it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    /// This agent's trust domains.
    pub local: BTreeMap<String, Bundle>,
    /// Foreign trust domains federated with.
    pub federated: BTreeMap<String, Bundle>,
    /// Which generation signs now, per local trust domain.
    pub active: BTreeMap<String, u64>,
}

impl BundleSet {
    /// The bundle that verifies SVIDs of `td`, local or federated.
    pub fn get(&self, td: &str) -> Option<&Bundle> {
        self.local.get(td).or_else(|| self.federated.get(td))
    }

    /// The bundles a workload of `td` may use: its own domain's and the
    /// federated ones (never another local domain's).
    pub fn for_workload(&self, td: &str) -> impl Iterator<Item = &Bundle> {
        self.local.get(td).into_iter().chain(
            self.federated
                .values()
                .filter(move |b| b.trust_domain != td),
        )
    }
}

/// The agent's authorities, federated bundles and SVID cache.
pub struct Credentials {
    config: SvidConfig,
    state_dir: PathBuf,
    /// When the agent names its trust domains, SVIDs are issued for those
    /// only; otherwise an authority is made for a domain when first needed.
    fixed_domains: bool,
    /// `(trust domain, issuer)`: the JWT-SVIDs of the domain carry `iss`.
    issuer: Option<(String, String)>,
    inner: Mutex<Inner>,
    bundles: watch::Sender<Arc<BundleSet>>,
}

struct Inner {
    authorities: BTreeMap<String, ca::Authority>,
    federated: BTreeMap<String, Bundle>,
    /// One X.509-SVID per identity, shared by its workloads until renewal.
    cache: HashMap<SpiffeId, Arc<X509Svid>>,
}

impl Inner {
    fn snapshot(&self, now: SystemTime) -> BundleSet {
        BundleSet {
            local: self
                .authorities
                .iter()
                .map(|(td, a)| (td.clone(), a.bundle()))
                .collect(),
            federated: self.federated.clone(),
            active: self
                .authorities
                .iter()
                .map(|(td, a)| (td.clone(), a.active_generation(now)))
                .collect(),
        }
    }
}

impl Credentials {
    /// Loads (or makes) the authority of every trust domain in
    /// `trust_domains` and of every one kept in `state_dir` from earlier
    /// runs, and the federated bundles; checks every key file and
    /// certificate. Call before anything is put in the kernel.
    pub fn load(
        config: &SvidConfig,
        trust_domains: &[String],
        state_dir: &Path,
    ) -> Result<Arc<Self>, SvidError> {
        let now = SystemTime::now();
        let mut names: Vec<String> = trust_domains.to_vec();
        if trust_domains.is_empty() {
            let dir = state_dir.join("svid/ca");
            if let Ok(read) = std::fs::read_dir(&dir) {
                for entry in read.flatten() {
                    if let Some(n) = entry.file_name().to_str()
                        && check_trust_domain(n).is_ok()
                    {
                        names.push(n.to_owned());
                    }
                }
            }
            names.extend(config.upstream_ca.iter().map(|u| u.trust_domain.clone()));
            names.sort();
            names.dedup();
        }
        let mut authorities = BTreeMap::new();
        for td in names {
            let upstream = config.upstream_ca.iter().find(|u| u.trust_domain == td);
            let alg = config.jwt_algorithm(&td);
            let a = ca::Authority::load(&td, state_dir, config.ca_ttl, alg, upstream, now)?;
            authorities.insert(td, a);
        }
        let mut federated = BTreeMap::new();
        for f in &config.federates_with {
            if let Some(b) = f.initial_bundle(state_dir)? {
                federated.insert(f.trust_domain.clone(), b);
            }
        }
        let inner = Inner {
            authorities,
            federated,
            cache: HashMap::new(),
        };
        let (bundles, _) = watch::channel(Arc::new(inner.snapshot(now)));
        tracing::info!(
            trust_domains = ?inner.authorities.keys().collect::<Vec<_>>(),
            federated = ?inner.federated.keys().collect::<Vec<_>>(),
            "SPIFFE credentials ready"
        );
        Ok(Arc::new(Self {
            config: config.clone(),
            state_dir: state_dir.to_owned(),
            fixed_domains: !trust_domains.is_empty(),
            issuer: config.oidc.as_ref().and_then(|o| {
                let td = o.trust_domain(trust_domains).ok()?;
                Some((td, o.issuer.clone()))
            }),
            inner: Mutex::new(inner),
            bundles,
        }))
    }

    pub fn config(&self) -> &SvidConfig {
        &self.config
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The bundles, as they change.
    pub fn bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.bundles.subscribe()
    }

    /// The bundles now.
    pub fn bundle_set(&self) -> Arc<BundleSet> {
        self.bundles.borrow().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("credentials lock")
    }

    /// Publishes the bundles when they (or an active generation) changed.
    fn publish(&self, inner: &Inner, now: SystemTime) {
        let set = inner.snapshot(now);
        self.bundles.send_if_modified(|old| {
            if **old == set {
                false
            } else {
                *old = Arc::new(set);
                true
            }
        });
    }

    /// Rotates every authority and drops expired cached SVIDs.
    pub fn tick(&self, now: SystemTime) {
        let mut inner = self.lock();
        for a in inner.authorities.values_mut() {
            if let Err(e) = a.rotate(now) {
                tracing::error!(trust_domain = %a.trust_domain, error = %e, "CA rotation failed; the current generation keeps signing");
            }
        }
        inner.cache.retain(|_, s| s.not_after > now);
        self.publish(&inner, now);
    }

    /// Rotates once a second, for as long as the runtime runs.
    pub async fn run_rotation(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.tick(SystemTime::now());
        }
    }

    /// The authority of `td`, made now (second value true) when the agent
    /// does not name its trust domains and this one is new.
    fn authority<'a>(
        &self,
        authorities: &'a mut BTreeMap<String, ca::Authority>,
        td: &str,
        now: SystemTime,
    ) -> Result<(&'a mut ca::Authority, bool), SvidError> {
        let mut made = false;
        if !authorities.contains_key(td) {
            if self.fixed_domains {
                return Err(SvidError::NoAuthority(td.to_owned()));
            }
            let alg = self.config.jwt_algorithm(td);
            let a = ca::Authority::load(td, &self.state_dir, self.config.ca_ttl, alg, None, now)?;
            authorities.insert(td.to_owned(), a);
            made = true;
        }
        Ok((authorities.get_mut(td).expect("just made"), made))
    }

    /// The X.509-SVID of `id`: the cached one while it is short of its
    /// renewal time and signed by the active generation, else a new one.
    pub fn x509_svid(&self, id: &SpiffeId, now: SystemTime) -> Result<Arc<X509Svid>, SvidError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (authority, made) = self.authority(&mut inner.authorities, id.trust_domain(), now)?;
        let active = authority.active_generation(now);
        if let Some(s) = inner.cache.get(id)
            && s.renew_at > now
            && s.generation == active
        {
            return Ok(s.clone());
        }
        let svid = Arc::new(x509::issue(
            id,
            &authority.x509_signer(now),
            self.config.x509_ttl,
            now,
        )?);
        tracing::debug!(identity = %id, generation = active, "X.509-SVID issued");
        inner.cache.insert(id.clone(), svid.clone());
        if made {
            self.publish(inner, now);
        }
        Ok(svid)
    }

    /// A JWT-SVID of `id` for `audiences`, and its expiry.
    pub fn jwt_svid(
        &self,
        id: &SpiffeId,
        audiences: &[String],
        now: SystemTime,
    ) -> Result<(String, SystemTime), SvidError> {
        let mut inner = self.lock();
        let (authority, made) = self.authority(&mut inner.authorities, id.trust_domain(), now)?;
        let (signer, not_after) = authority.jwt_signer(now);
        let issuer = self
            .issuer
            .as_ref()
            .filter(|(td, _)| td == id.trust_domain())
            .map(|(_, iss)| iss.as_str());
        let token = signer.sign(id, audiences, issuer, self.config.jwt_ttl, now, not_after)?;
        if made {
            self.publish(&inner, now);
        }
        Ok(token)
    }

    /// Validates a JWT-SVID against the bundle of its subject's trust
    /// domain (local or federated).
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Validated, JwtError> {
        let set = self.bundle_set();
        let keys_of = |td: &str| {
            set.get(td).map(|b| {
                b.jwt_authorities
                    .iter()
                    .map(|a| (a.kid.clone(), a.key.clone()))
                    .collect()
            })
        };
        jwt::validate(token, audience, &keys_of, now)
    }

    /// Replaces a foreign trust domain's bundle with a freshly fetched
    /// one, and keeps it in the state directory for the next start.
    pub fn set_federated(&self, bundle: Bundle) -> Result<(), SvidError> {
        let path = federated_path(&self.state_dir, &bundle.trust_domain);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SvidError::io(dir, e))?;
        }
        ca::write_file(&path, bundle.to_json(Parts::All)?.as_bytes(), 0o644)?;
        let mut inner = self.lock();
        inner.federated.insert(bundle.trust_domain.clone(), bundle);
        self.publish(&inner, SystemTime::now());
        Ok(())
    }
}

/// The PKCS#8 DER key of a PEM private key file that only its owner may
/// read (a looser file is refused).
pub fn private_key_file(path: &Path) -> Result<Vec<u8>, SvidError> {
    ca::private_key(path)
}

/// Where the last fetched bundle of a foreign trust domain is kept.
pub fn federated_path(state_dir: &Path, trust_domain: &str) -> PathBuf {
    state_dir
        .join("svid/federated")
        .join(format!("{trust_domain}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_state(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("idgate-svid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/svid/agent.toml");
        let c = crate::config::Config::load(&path).unwrap();
        assert_eq!(c.svid.socket(), Path::new("/run/idgate/workload.sock"));
        assert!(c.svid.bundle_endpoint.is_some());
    }

    #[test]
    fn config_checks_ttls_and_domains() {
        let mut c = SvidConfig::default();
        assert!(c.check(&[]).is_ok());
        c.x509_ttl = Duration::from_secs(5 * 3600);
        let e = c.check(&[]).unwrap_err().to_string();
        assert!(e.contains("x509_ttl") && e.contains("sixth"), "{e}");
        let mut c = SvidConfig::default();
        c.upstream_ca.push(UpstreamCa {
            trust_domain: "other.org".into(),
            cert: "c".into(),
            key: "k".into(),
            bundle: "b".into(),
        });
        let e = c.check(&["example.org".into()]).unwrap_err();
        assert!(matches!(e, SvidConfigError::NotLocal { .. }), "{e}");
        let c: SvidConfig =
            toml::from_str("[jwt_algorithms]\n\"other.org\" = \"RS256\"\n").unwrap();
        assert_eq!(c.jwt_algorithm("other.org"), JwtAlgorithm::RS256);
        assert_eq!(c.jwt_algorithm("example.org"), JwtAlgorithm::ES256);
        let e = c.check(&["example.org".into()]).unwrap_err();
        assert!(e.to_string().contains("svid.jwt_algorithms"), "{e}");
        assert!(toml::from_str::<SvidConfig>("[jwt_algorithms]\n\"a.org\" = \"HS256\"\n").is_err());
    }

    #[test]
    fn an_rs256_trust_domain_publishes_an_rsa_key_and_keeps_it_across_restarts() {
        let state = temp_state("rs256");
        let mut config = SvidConfig::default();
        config
            .jwt_algorithms
            .insert("example.org".into(), JwtAlgorithm::RS256);
        let creds = Credentials::load(&config, &["example.org".into()], &state).unwrap();
        let keys = creds.bundle_set().local["example.org"]
            .jwt_authorities
            .clone();
        assert!(matches!(keys[0].key, PublicJwk::Rsa { .. }));
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let now = SystemTime::now();
        let (token, _) = creds.jwt_svid(&id, &["svc".into()], now).unwrap();
        assert_eq!(creds.validate_jwt(&token, "svc", now).unwrap().id, id);
        drop(creds);
        // The key stays RSA when the option goes: new generations only
        // take the new algorithm.
        let again =
            Credentials::load(&SvidConfig::default(), &["example.org".into()], &state).unwrap();
        assert_eq!(
            again.bundle_set().local["example.org"].jwt_authorities,
            keys
        );
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn issues_caches_and_rotates_with_overlap() {
        let state = temp_state("rotate");
        let config = SvidConfig {
            ca_ttl: Duration::from_secs(600),
            x509_ttl: Duration::from_secs(60),
            ..Default::default()
        };
        let creds = Credentials::load(&config, &["example.org".into()], &state).unwrap();
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let t0 = SystemTime::now();
        let s1 = creds.x509_svid(&id, t0).unwrap();
        assert!(Arc::ptr_eq(
            &s1,
            &creds.x509_svid(&id, t0 + Duration::from_secs(1)).unwrap()
        ));
        // Past its renewal time a new one is issued.
        let s2 = creds.x509_svid(&id, t0 + Duration::from_secs(30)).unwrap();
        assert_ne!(s1.chain, s2.chain);
        // Outside the configured domains nothing is issued.
        let other: SpiffeId = "spiffe://other.org/a".parse().unwrap();
        assert!(matches!(
            creds.x509_svid(&other, t0),
            Err(SvidError::NoAuthority(_))
        ));

        let roots = |c: &Credentials| c.bundle_set().local["example.org"].x509_authorities.clone();
        let first_root = roots(&creds);
        assert_eq!(first_root.len(), 1);
        // At half the CA lifetime a second root is published, but the
        // first still signs.
        let half = t0 + Duration::from_secs(301);
        creds.tick(half);
        assert_eq!(roots(&creds).len(), 2);
        let s3 = creds.x509_svid(&id, half).unwrap();
        assert_eq!(s3.generation, s1.generation);
        // With a sixth left, the new one signs; both roots verify.
        let late = t0 + Duration::from_secs(505);
        creds.tick(late);
        let s4 = creds.x509_svid(&id, late).unwrap();
        assert_eq!(s4.generation, s1.generation + 1);
        let set = creds.bundle_set();
        let bundle_of = |td: &str| set.get(td).map(|b| b.x509_authorities.clone());
        for (s, at) in [(&s3, half), (&s4, late)] {
            let chain = [s.chain[0].clone().into()];
            assert_eq!(
                verify_x509(&chain, &bundle_of, Role::Client, at).unwrap(),
                id
            );
        }
        // Once the first expires it leaves the bundle (the second is half
        // way through its life by then: a third is published).
        creds.tick(t0 + Duration::from_secs(601));
        let now_roots = roots(&creds);
        assert!(!now_roots.contains(&first_root[0]));
        assert_eq!(now_roots.len(), 2);

        // A restart reloads the same keys.
        let before = creds.bundle_set().local["example.org"].clone();
        drop(creds);
        let again = Credentials::load(&config, &["example.org".into()], &state).unwrap();
        let after = again.bundle_set().local["example.org"].clone();
        assert_eq!(before.jwt_authorities, after.jwt_authorities);
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let state = temp_state("perm");
        let config = SvidConfig::default();
        drop(Credentials::load(&config, &["example.org".into()], &state).unwrap());
        let key = state.join("svid/ca/example.org/1/ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::load(&config, &["example.org".into()], &state)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("ca.key") && e.contains("0644") && e.contains("chmod 600"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn jwt_svids_validate_and_unknown_domains_do_not() {
        let state = temp_state("jwt");
        let creds = Credentials::load(&SvidConfig::default(), &[], &state).unwrap();
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let now = SystemTime::now();
        let (token, _) = creds.jwt_svid(&id, &["svc".into()], now).unwrap();
        assert_eq!(creds.validate_jwt(&token, "svc", now).unwrap().id, id);
        assert_eq!(
            creds.validate_jwt(&token, "other", now),
            Err(JwtError::Audience("other".into()))
        );
        let _ = std::fs::remove_dir_all(&state);
    }
}
