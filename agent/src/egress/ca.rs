//! The egress CA: the authority whose certificates the broker shows a
//! workload for a credential's host, and the trust bundle workloads are
//! given (the system's roots plus this CA).
//!
//! Kept in a directory of its own (the daemon's `state_dir/egress`):
//!
//! - `ca/<N>/ca.key` (mode 0600) and `ca/<N>/ca.crt`: generation N, an
//!   ECDSA P-256 root valid for `ca_lifetime`, written to a temporary
//!   directory and renamed into place;
//! - `bundle.pem` (mode 0644): the system's roots and every unexpired
//!   generation, for `SSL_CERT_FILE` and the like.
//!
//! Rotation: when the newest generation has lived half its lifetime a new
//! one is made and put in the bundle at once. A generation signs until
//! three quarters of its lifetime, then the next one does; since a leaf
//! lives at most a quarter of the CA's lifetime (checked by the
//! configuration), nothing a generation signed outlives it, and a new one
//! is in the bundle a quarter of a lifetime before it signs. A generation
//! is dropped from the bundle, and its directory removed, when it expires.
//!
//! Leaves: one per host name (SAN = that name), valid for
//! `certificate_lifetime` (never past its CA), issued on first use and
//! again when half its lifetime has passed.
//!
//! Name constraints: every generation's certificate carries a critical
//! NameConstraints extension whose permitted DNS subtrees are the
//! credential hosts of the running policy ([`EgressCa::constrain`]); with
//! none, only the reserved name `invalid`. A client that enforces them
//! (OpenSSL, Go, rustls/webpki) accepts nothing else from this CA, even
//! if its key leaks. When the hosts change, each generation's certificate
//! is issued again with the same key, subject and validity, so leaves
//! already issued chain to it; the certificate file is the record of the
//! constraint across restarts.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::config::EgressConfig;
use super::secrets::{SecretError, read_private};
use crate::svid::SvidError;

/// Why the egress CA cannot be loaded, made, or sign.
#[derive(Debug, thiserror::Error)]
pub enum EgressCaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the egress CA: {0}")]
    Write(#[source] SvidError),
    #[error("egress CA key: {0}")]
    Key(#[from] SecretError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: not a usable key or certificate: {source}")]
    Load { path: PathBuf, source: rcgen::Error },
    #[error("issuing {what}: {source}")]
    Sign { what: String, source: rcgen::Error },
    #[error("the leaf key for {name}: {source}")]
    LeafKey { name: String, source: rustls::Error },
    #[error("a serial number for egress CA {seq}: {source}")]
    Serial { seq: u64, source: SvidError },
}

impl EgressCaError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The egress CA of one agent, its trust bundle and its leaves.
pub struct EgressCa {
    dir: PathBuf,
    bundle: PathBuf,
    lifetime: Duration,
    leaf_lifetime: Duration,
    /// The system's roots, DER: the rest of the bundle, and what upstreams
    /// are verified against.
    system_roots: Vec<Vec<u8>>,
    state: Mutex<State>,
}

struct State {
    /// Oldest first; never empty after `rotate`.
    generations: Vec<Generation>,
    leaves: HashMap<String, Leaf>,
    /// The hosts every generation is to be constrained to.
    hosts: BTreeSet<String>,
}

struct Generation {
    seq: u64,
    not_before: SystemTime,
    not_after: SystemTime,
    /// The DNS names its certificate permits; `None` when it carries no
    /// name constraints (made before they were).
    permitted: Option<BTreeSet<String>>,
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

struct Leaf {
    key: Arc<CertifiedKey>,
    /// Issued again from then on.
    renew_at: SystemTime,
}

const CA_KEY: &str = "ca.key";
const CA_CERT: &str = "ca.crt";
/// The trust bundle's file name in the CA's directory.
pub const BUNDLE: &str = "bundle.pem";
/// The one name a CA constrained to no host permits: reserved, so that
/// no real host is under it (RFC 6761).
const NO_HOST: &str = "invalid";
/// How far back a leaf's validity starts, for clients whose clock is
/// slightly behind.
const BACKDATE: Duration = Duration::from_secs(300);

impl EgressCa {
    /// Loads the CA kept in `dir` (checking every key file's mode and that
    /// each key is its certificate's), or makes it; rotates it when due and
    /// writes the trust bundle with the system's roots of now.
    pub fn open(dir: &Path, config: &EgressConfig, now: SystemTime) -> Result<Self, EgressCaError> {
        let system_roots = system_roots();
        Self::open_with_roots(dir, config, system_roots, now)
    }

    /// [`EgressCa::open`] with the given system roots (DER).
    pub fn open_with_roots(
        dir: &Path,
        config: &EgressConfig,
        system_roots: Vec<Vec<u8>>,
        now: SystemTime,
    ) -> Result<Self, EgressCaError> {
        let ca_dir = dir.join("ca");
        std::fs::create_dir_all(&ca_dir).map_err(|e| EgressCaError::io(&ca_dir, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| EgressCaError::io(&ca_dir, e))?;
            // Workloads of any user reach the bundle by its path; nobody
            // lists the directory.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| EgressCaError::io(dir, e))?;
        }
        let mut generations = Vec::new();
        for entry in std::fs::read_dir(&ca_dir).map_err(|e| EgressCaError::io(&ca_dir, e))? {
            let entry = entry.map_err(|e| EgressCaError::io(&ca_dir, e))?;
            let Some(seq) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            generations.push(Generation::load(&entry.path(), seq)?);
        }
        generations.sort_by_key(|g| g.seq);
        // Until told, the constraint the newest certificate carries.
        let hosts = generations
            .last()
            .and_then(|g| g.permitted.clone())
            .unwrap_or_default();
        let ca = Self {
            dir: ca_dir,
            bundle: dir.join(BUNDLE),
            lifetime: config.ca_lifetime,
            leaf_lifetime: config.certificate_lifetime,
            system_roots,
            state: Mutex::new(State {
                generations,
                leaves: HashMap::new(),
                hosts,
            }),
        };
        ca.rotate(now)?;
        ca.write_bundle()?;
        Ok(ca)
    }

    /// The trust bundle file: the system's roots and the CA's generations.
    pub fn bundle_path(&self) -> &Path {
        &self.bundle
    }

    /// The system's roots (DER) the bundle holds.
    pub fn system_roots(&self) -> &[Vec<u8>] {
        &self.system_roots
    }

    /// The certificates (DER) of the CA's unexpired generations, oldest
    /// first.
    pub fn certificates(&self) -> Vec<Vec<u8>> {
        self.lock()
            .generations
            .iter()
            .map(|g| g.der.clone())
            .collect()
    }

    /// Constrains the CA to `hosts` (the credential hosts of the running
    /// policy): when they differ from the current ones, issues every
    /// generation's certificate again for them, with the same key,
    /// subject and validity, and rewrites the bundle. Returns whether it
    /// did. Leaves issued before still chain to the new certificates;
    /// those of hosts no longer there are dropped from the cache. Writes
    /// files: call it off the runtime's workers.
    pub fn constrain(&self, hosts: &BTreeSet<String>) -> Result<bool, EgressCaError> {
        let changed = {
            let mut state = self.lock();
            state.hosts = hosts.clone();
            state.leaves.retain(|name, _| hosts.contains(name));
            self.constrain_locked(&mut state)?
        };
        if changed {
            self.write_bundle()?;
            tracing::info!(
                hosts = hosts.len(),
                "egress CA constrained to the credential hosts of the policy"
            );
        }
        Ok(changed)
    }

    /// Issues again every generation whose constraint is not `state.hosts`.
    fn constrain_locked(&self, state: &mut State) -> Result<bool, EgressCaError> {
        let mut changed = false;
        for g in &mut state.generations {
            if g.permitted.as_ref() != Some(&state.hosts) {
                *g = g.reissue(&self.dir, &state.hosts)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Drops expired generations and makes a new one when the newest has
    /// lived half its lifetime; rewrites the bundle when that changed it
    /// (or when a generation's constraint had to be issued again, after
    /// a [`EgressCa::constrain`] that failed). Returns whether it did.
    /// Writes files: call it off the runtime's workers (the broker also
    /// calls it when it issues a leaf).
    pub fn rotate(&self, now: SystemTime) -> Result<bool, EgressCaError> {
        let changed = {
            let mut state = self.lock();
            self.rotate_locked(&mut state, now)?
        };
        if changed {
            self.write_bundle()?;
        }
        Ok(changed)
    }

    fn rotate_locked(&self, state: &mut State, now: SystemTime) -> Result<bool, EgressCaError> {
        let mut changed = false;
        while let Some(g) = state.generations.first()
            && g.not_after <= now
        {
            let g = state.generations.remove(0);
            let dir = self.dir.join(g.seq.to_string());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an expired egress CA");
            }
            tracing::info!(
                generation = g.seq,
                "egress CA expired; removed from the bundle"
            );
            changed = true;
        }
        let due = state
            .generations
            .last()
            .is_none_or(|g| now >= g.not_before + self.lifetime / 2);
        if due {
            let seq = state.generations.last().map_or(1, |g| g.seq + 1);
            let g = Generation::create(&self.dir, seq, now, self.lifetime, &state.hosts)?;
            tracing::info!(
                generation = seq,
                not_after = %humantime::format_rfc3339_seconds(g.not_after),
                "new egress CA made and put in the bundle"
            );
            state.generations.push(g);
            changed = true;
        }
        Ok(self.constrain_locked(state)? || changed)
    }

    fn write_bundle(&self) -> Result<(), EgressCaError> {
        let mut text = crate::svid::certs_pem(&self.system_roots);
        text.push_str(&crate::svid::certs_pem(&self.certificates()));
        crate::svid::write_file(&self.bundle, text.as_bytes(), 0o644).map_err(EgressCaError::Write)
    }

    /// The certificate and key to show for `name`: the cached one, or a
    /// new one when there is none or it is past half its lifetime.
    pub fn leaf(&self, name: &str, now: SystemTime) -> Result<Arc<CertifiedKey>, EgressCaError> {
        let mut state = self.lock();
        if let Some(leaf) = state.leaves.get(name)
            && now < leaf.renew_at
        {
            return Ok(leaf.key.clone());
        }
        if self.rotate_locked(&mut state, now)? {
            drop(state);
            self.write_bundle()?;
            state = self.lock();
        }
        // The oldest generation before three quarters of its lifetime
        // signs, or else the newest.
        let signer = state
            .generations
            .iter()
            .find(|g| now < g.not_before + self.lifetime / 4 * 3)
            .or(state.generations.last())
            .expect("rotate leaves a generation");
        let (key, renew_at) = issue(signer, name, now, self.leaf_lifetime)?;
        state.leaves.retain(|_, l| l.renew_at > now);
        state.leaves.insert(
            name.to_owned(),
            Leaf {
                key: key.clone(),
                renew_at,
            },
        );
        Ok(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A leaf for `name` signed by `ca`, and when to issue it again.
fn issue(
    ca: &Generation,
    name: &str,
    now: SystemTime,
    lifetime: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), EgressCaError> {
    let err = |source| EgressCaError::Sign {
        what: format!("a certificate for {name}"),
        source,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(err)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let not_before = round_down(now.checked_sub(BACKDATE).unwrap_or(now)).max(ca.not_before);
    let not_after = round_down(now + lifetime).min(ca.not_after);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer).map_err(err)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|source| {
        EgressCaError::LeafKey {
            name: name.to_owned(),
            source,
        }
    })?;
    let certified = CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signing);
    let renew_at = now + not_after.duration_since(now).unwrap_or_default() / 2;
    Ok((Arc::new(certified), renew_at))
}

impl Generation {
    fn create(
        ca_dir: &Path,
        seq: u64,
        now: SystemTime,
        lifetime: Duration,
        hosts: &BTreeSet<String>,
    ) -> Result<Self, EgressCaError> {
        // X.509 times have whole seconds.
        let not_before = round_down(now);
        let not_after = not_before + lifetime;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_error(seq))?;
        let der = ca_certificate(seq, not_before, not_after, hosts, &key)?;
        let tmp = ca_dir.join(format!(".{seq}.new"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| EgressCaError::io(&tmp, e))?;
        let write = |name: &str, bytes: &[u8], mode| {
            crate::svid::write_file(&tmp.join(name), bytes, mode).map_err(EgressCaError::Write)
        };
        write(CA_KEY, key.serialize_pem().as_bytes(), 0o600)?;
        write(
            CA_CERT,
            crate::svid::pem("CERTIFICATE", &der).as_bytes(),
            0o644,
        )?;
        let dir = ca_dir.join(seq.to_string());
        std::fs::rename(&tmp, &dir).map_err(|e| EgressCaError::io(&dir, e))?;
        Self::new(seq, (not_before, not_after), hosts, der, key)
    }

    /// This generation with a certificate constrained to `hosts`: the same
    /// key, subject and validity, written over its certificate file.
    fn reissue(&self, ca_dir: &Path, hosts: &BTreeSet<String>) -> Result<Self, EgressCaError> {
        let key = self.issuer.key();
        let der = ca_certificate(self.seq, self.not_before, self.not_after, hosts, key)?;
        let key =
            KeyPair::try_from(key.serialize_der().as_slice()).map_err(sign_error(self.seq))?;
        let path = ca_dir.join(self.seq.to_string()).join(CA_CERT);
        crate::svid::write_file(
            &path,
            crate::svid::pem("CERTIFICATE", &der).as_bytes(),
            0o644,
        )
        .map_err(EgressCaError::Write)?;
        tracing::debug!(
            generation = self.seq,
            "egress CA issued again with new name constraints"
        );
        Self::new(self.seq, (self.not_before, self.not_after), hosts, der, key)
    }

    /// Generation `seq` with the certificate `der` just made from `key`
    /// for `hosts`.
    fn new(
        seq: u64,
        (not_before, not_after): (SystemTime, SystemTime),
        hosts: &BTreeSet<String>,
        der: Vec<u8>,
        key: KeyPair,
    ) -> Result<Self, EgressCaError> {
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(sign_error(seq))?;
        Ok(Self {
            seq,
            not_before,
            not_after,
            permitted: Some(hosts.clone()),
            der,
            issuer,
        })
    }

    fn load(dir: &Path, seq: u64) -> Result<Self, EgressCaError> {
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let invalid = |path: &Path, message: &str| EgressCaError::Invalid {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        let pem = String::from_utf8(read_private(&key_path)?)
            .map_err(|_| invalid(&key_path, "not PEM text"))?;
        let key = KeyPair::from_pem(&pem).map_err(|source| EgressCaError::Load {
            path: key_path.clone(),
            source,
        })?;
        let certs = crate::tls::pem_certs_file(&cert_path)
            .map_err(|e| invalid(&cert_path, &e.to_string()))?;
        let [der] = certs.as_slice() else {
            return Err(invalid(&cert_path, "expected exactly one certificate"));
        };
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| invalid(&cert_path, &format!("does not parse: {e}")))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(&cert_path, &format!("its key is not {CA_KEY}'s")));
        }
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        let not_before = at(cert.validity().not_before);
        let not_after = at(cert.validity().not_after);
        let permitted = permitted_of(der).map_err(|message| invalid(&cert_path, &message))?;
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(|source| {
            EgressCaError::Load {
                path: cert_path.clone(),
                source,
            }
        })?;
        Ok(Self {
            seq,
            not_before,
            not_after,
            permitted,
            der: der.clone(),
            issuer,
        })
    }
}

/// The certificate (DER) of egress CA `seq`, self-signed by `key`,
/// constrained to `hosts`.
fn ca_certificate(
    seq: u64,
    not_before: SystemTime,
    not_after: SystemTime,
    hosts: &BTreeSet<String>,
    key: &KeyPair,
) -> Result<Vec<u8>, EgressCaError> {
    // Issued again with the same key and subject when the hosts change:
    // a serial of its own each time.
    let mut params = crate::svid::ca_params(
        &format!("idgate egress CA {seq}"),
        BasicConstraints::Constrained(0),
        not_before,
        not_after,
    )
    .map_err(|source| EgressCaError::Serial { seq, source })?;
    let permitted = match hosts.is_empty() {
        true => vec![GeneralSubtree::DnsName(NO_HOST.to_owned())],
        false => hosts.iter().cloned().map(GeneralSubtree::DnsName).collect(),
    };
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: Vec::new(),
    });
    let cert = params.self_signed(key).map_err(sign_error(seq))?;
    Ok(cert.der().to_vec())
}

/// The error of making or signing egress CA `seq`.
fn sign_error(seq: u64) -> impl FnOnce(rcgen::Error) -> EgressCaError {
    move |source| EgressCaError::Sign {
        what: format!("egress CA {seq}"),
        source,
    }
}

/// The DNS names a CA certificate's name constraints permit (none for
/// [`NO_HOST`] alone); `None` when it has no name constraints.
fn permitted_of(der: &[u8]) -> Result<Option<BTreeSet<String>>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("does not parse: {e}"))?;
    let Some(constraints) = cert
        .name_constraints()
        .map_err(|e| format!("its name constraints do not parse: {e}"))?
    else {
        return Ok(None);
    };
    let mut names = BTreeSet::new();
    for subtree in constraints.value.permitted_subtrees.iter().flatten() {
        match subtree.base {
            GeneralName::DNSName(name) if name != NO_HOST => {
                names.insert(name.to_owned());
            }
            GeneralName::DNSName(_) => {}
            ref other => return Err(format!("a name constraint that is not a DNS name: {other}")),
        }
    }
    Ok(Some(names))
}

/// The system's trusted roots (DER), as rustls-native-certs finds them;
/// files it cannot read are logged and passed over.
pub fn system_roots() -> Vec<Vec<u8>> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "a system root certificate cannot be read");
    }
    found.certs.into_iter().map(|c| c.to_vec()).collect()
}

fn round_down(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("idgate-egress-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn bundle_certs(ca: &EgressCa) -> Vec<Vec<u8>> {
        crate::tls::pem_certs_file(ca.bundle_path()).unwrap()
    }

    #[test]
    fn made_loaded_and_rotated() {
        let d = dir("rotate");
        let config = EgressConfig::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let root = vec![b"not really a root".to_vec()];
        let ca = EgressCa::open_with_roots(&d, &config, root.clone(), t0).unwrap();
        let key = d.join("ca/1/ca.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let first = ca.certificates();
        assert_eq!(first.len(), 1);
        assert_eq!(bundle_certs(&ca), [root.clone(), first.clone()].concat());
        drop(ca);

        // Loaded again: the same CA; a leaf is cached until half its life.
        let ca = EgressCa::open_with_roots(&d, &config, root.clone(), t0 + DAY).unwrap();
        assert_eq!(ca.certificates(), first);
        let a = ca.leaf("api.example.com", t0 + DAY).unwrap();
        let b = ca.leaf("api.example.com", t0 + DAY + DAY / 3).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = ca.leaf("api.example.com", t0 + DAY + DAY / 2).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        let (_, leaf) = X509Certificate::from_der(&c.cert[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"api.example.com\")]"
        );
        assert!(!leaf.is_ca());

        // Half the CA's life: a second CA in the bundle, the first signs.
        let half = t0 + config.ca_lifetime / 2;
        assert!(ca.rotate(half).unwrap());
        assert_eq!(ca.certificates().len(), 2);
        assert_eq!(bundle_certs(&ca).len(), 3);
        let issuer_of = |k: &CertifiedKey| {
            let (_, c) = X509Certificate::from_der(&k.cert[0]).unwrap();
            c.issuer().to_string()
        };
        let l = ca.leaf("b.example.com", half).unwrap();
        assert!(
            issuer_of(&l).contains("idgate egress CA 1"),
            "{}",
            issuer_of(&l)
        );
        // Three quarters: the second signs.
        let late = t0 + config.ca_lifetime / 4 * 3;
        let l = ca.leaf("c.example.com", late).unwrap();
        assert!(
            issuer_of(&l).contains("idgate egress CA 2"),
            "{}",
            issuer_of(&l)
        );
        // The first expires: out of the bundle, its directory removed;
        // the second is at half its life: a third comes in.
        ca.rotate(t0 + config.ca_lifetime).unwrap();
        assert_eq!(ca.certificates().len(), 2);
        assert_eq!(bundle_certs(&ca).len(), 3);
        assert!(!d.join("ca/1").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Whether `leaf` chains to `ca` (DER) for a server at `now`, as
    /// rustls clients (webpki) judge it, name constraints included.
    fn verifies(ca: &[u8], leaf: &CertifiedKey, now: SystemTime) -> Result<(), webpki::Error> {
        let ca = CertificateDer::from(ca.to_vec());
        let anchor = webpki::anchor_from_trusted_cert(&ca)?;
        let end_entity = webpki::EndEntityCert::try_from(&leaf.cert[0])?;
        let time = rustls::pki_types::UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
        );
        end_entity
            .verify_for_usage(
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .all,
                &[anchor],
                &[],
                time,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map(|_| ())
    }

    fn hosts(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn constrained_to_the_credential_hosts_and_follows_them() {
        let d = dir("constrain");
        let config = EgressConfig::default();
        let now = SystemTime::now();
        let ca = EgressCa::open_with_roots(&d, &config, vec![], now).unwrap();
        // Made with no host: only the reserved name is permitted, so no
        // leaf verifies.
        assert_eq!(
            permitted_of(&ca.certificates()[0]).unwrap(),
            Some(BTreeSet::new())
        );
        let made = ca.certificates().remove(0);
        let (_, cert) = X509Certificate::from_der(&made).unwrap();
        assert!(cert.name_constraints().unwrap().unwrap().critical);
        let none = ca.leaf("api.example.com", now).unwrap();
        assert!(verifies(&made, &none, now).is_err());

        assert!(
            ca.constrain(&hosts(&["api.example.com", "b.example.org"]))
                .unwrap()
        );
        assert!(
            !ca.constrain(&hosts(&["api.example.com", "b.example.org"]))
                .unwrap()
        );
        let first = ca.certificates()[0].clone();
        let a = ca.leaf("api.example.com", now).unwrap();
        verifies(&first, &a, now).unwrap();
        // Outside the constraint: the CA issues it, but it does not verify.
        let outside = ca.leaf("evil.example.net", now).unwrap();
        let e = verifies(&first, &outside, now).unwrap_err();
        assert!(matches!(e, webpki::Error::NameConstraintViolation), "{e:?}");
        // The bundle holds the constrained certificate.
        assert_eq!(bundle_certs(&ca), std::slice::from_ref(&first));

        // A host added (a reload): issued again with the same key and
        // subject; the leaf issued before still chains to it.
        assert!(
            ca.constrain(&hosts(&["api.example.com", "new.example.com"]))
                .unwrap()
        );
        let second = ca.certificates()[0].clone();
        assert_ne!(second, first);
        let (_, c1) = X509Certificate::from_der(&first).unwrap();
        let (_, c2) = X509Certificate::from_der(&second).unwrap();
        assert_eq!(c1.subject(), c2.subject());
        assert_eq!(c1.public_key().raw, c2.public_key().raw);
        assert_eq!(c1.validity().not_after, c2.validity().not_after);
        assert_ne!(c1.serial, c2.serial);
        verifies(&second, &a, now).unwrap();
        let new = ca.leaf("new.example.com", now).unwrap();
        verifies(&second, &new, now).unwrap();
        assert!(verifies(&first, &new, now).is_err());
        assert_eq!(bundle_certs(&ca), std::slice::from_ref(&second));
        drop(ca);

        // Loaded again: the constraint is the certificate's.
        let ca = EgressCa::open_with_roots(&d, &config, vec![], now).unwrap();
        assert_eq!(ca.certificates(), [second]);
        assert_eq!(
            permitted_of(&ca.certificates()[0]).unwrap(),
            Some(hosts(&["api.example.com", "new.example.com"]))
        );
        assert!(
            !ca.constrain(&hosts(&["api.example.com", "new.example.com"]))
                .unwrap()
        );
        // A new generation takes the constraint of the old.
        let half = now + config.ca_lifetime / 2;
        assert!(ca.rotate(half).unwrap());
        for der in ca.certificates() {
            assert_eq!(
                permitted_of(&der).unwrap(),
                Some(hosts(&["api.example.com", "new.example.com"]))
            );
        }
        // Back to no host: nothing verifies.
        assert!(ca.constrain(&BTreeSet::new()).unwrap());
        let gone = ca.leaf("api.example.com", now).unwrap();
        for der in ca.certificates() {
            assert!(verifies(&der, &gone, now).is_err());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_a_readable_key_or_another_key() {
        let d = dir("refuse");
        let config = EgressConfig::default();
        let now = SystemTime::now();
        drop(EgressCa::open_with_roots(&d, &config, vec![], now).unwrap());
        let key = d.join("ca/1/ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = EgressCa::open_with_roots(&d, &config, vec![], now)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ca/1/ca.key") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = EgressCa::open_with_roots(&d, &config, vec![], now)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ca.crt") && e.contains("key"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
