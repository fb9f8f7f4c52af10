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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

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
}

struct Generation {
    seq: u64,
    not_before: SystemTime,
    not_after: SystemTime,
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
        let ca = Self {
            dir: ca_dir,
            bundle: dir.join(BUNDLE),
            lifetime: config.ca_lifetime,
            leaf_lifetime: config.certificate_lifetime,
            system_roots,
            state: Mutex::new(State {
                generations,
                leaves: HashMap::new(),
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

    /// Drops expired generations and makes a new one when the newest has
    /// lived half its lifetime; rewrites the bundle when that changed it.
    /// Returns whether it did. Writes files: call it off the runtime's
    /// workers (the broker also calls it when it issues a leaf).
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
            let g = Generation::create(&self.dir, seq, now, self.lifetime)?;
            tracing::info!(
                generation = seq,
                not_after = %humantime::format_rfc3339_seconds(g.not_after),
                "new egress CA made and put in the bundle"
            );
            state.generations.push(g);
            changed = true;
        }
        Ok(changed)
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
    ) -> Result<Self, EgressCaError> {
        let err = |source| EgressCaError::Sign {
            what: format!("egress CA {seq}"),
            source,
        };
        // X.509 times have whole seconds.
        let not_before = round_down(now);
        let not_after = not_before + lifetime;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "idgate");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("idgate egress CA {seq}"));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(err)?;
        let tmp = ca_dir.join(format!(".{seq}.new"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| EgressCaError::io(&tmp, e))?;
        let write = |name: &str, bytes: &[u8], mode| {
            crate::svid::write_file(&tmp.join(name), bytes, mode).map_err(EgressCaError::Write)
        };
        write(CA_KEY, key.serialize_pem().as_bytes(), 0o600)?;
        write(CA_CERT, cert.pem().as_bytes(), 0o644)?;
        let dir = ca_dir.join(seq.to_string());
        std::fs::rename(&tmp, &dir).map_err(|e| EgressCaError::io(&dir, e))?;
        let der = cert.der().to_vec();
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(err)?;
        Ok(Self {
            seq,
            not_before,
            not_after,
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
            der: der.clone(),
            issuer,
        })
    }
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
