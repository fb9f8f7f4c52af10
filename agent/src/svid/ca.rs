//! The signing authority of one trust domain: X.509 CA and JWT signing
//! keys in *generations*, kept under `<state_dir>/svid/ca/<trust domain>/`.
//!
//! A generation is a self-signed root CA (unless an upstream intermediate
//! signs the X.509-SVIDs) and a JWT key, valid for `ca_ttl`. Rotation
//! overlaps: when the newest generation has lived half its lifetime a new
//! one is made and published in the bundle at once; it starts signing
//! when the old one has a sixth of its lifetime left; the old one stays in
//! the bundle until it expires. So every key is in the bundle a third of
//! a lifetime before it signs anything, and until nothing it signed can
//! still be valid.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, PublicKeyData};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use super::bundle::{Bundle, CaCertError, JwtAuthority, check_ca_cert, pem};
use super::jwt::JwtSigner;
use super::x509::{Signer, root_params};
use super::{JwtAlgorithm, SvidError, UpstreamCa};

/// The signing authority of one trust domain.
pub struct Authority {
    pub trust_domain: String,
    dir: PathBuf,
    ttl: Duration,
    /// The algorithm of the JWT keys of new generations (a generation
    /// keeps the key it was made with).
    jwt_algorithm: JwtAlgorithm,
    upstream: Option<Upstream>,
    /// Oldest first.
    generations: Vec<Generation>,
    /// The bundle's `spiffe_sequence`, kept in `<dir>/sequence`.
    sequence: u64,
}

/// An operator's intermediate CA that signs the X.509-SVIDs, under roots
/// that the operator's bundle file holds.
struct Upstream {
    issuer: Issuer<'static, KeyPair>,
    /// The certificate file: the intermediate, then any further ones.
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
    not_after: SystemTime,
}

struct Generation {
    seq: u64,
    not_before: SystemTime,
    not_after: SystemTime,
    /// The self-signed root; none under an upstream CA.
    root: Option<Root>,
    jwt: JwtSigner,
}

struct Root {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// `<generation>/generation.json`.
#[derive(Serialize, Deserialize)]
struct Validity {
    not_before: u64,
    not_after: u64,
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const JWT_KEY: &str = "jwt.key";
const VALIDITY: &str = "generation.json";

impl Authority {
    /// Loads the trust domain's generations (checking every key file's
    /// permissions and every certificate), or makes the first one; an
    /// `upstream` CA is loaded and checked to chain to its bundle.
    pub fn load(
        trust_domain: &str,
        state_dir: &Path,
        ttl: Duration,
        jwt_algorithm: JwtAlgorithm,
        upstream: Option<&UpstreamCa>,
        now: SystemTime,
    ) -> Result<Self, SvidError> {
        let dir = state_dir.join("svid/ca").join(trust_domain);
        make_private_dir(&dir)?;
        let upstream = upstream
            .map(|u| Upstream::load(trust_domain, u, now))
            .transpose()?;
        let mut generations = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| SvidError::io(&dir, e))? {
            let entry = entry.map_err(|e| SvidError::io(&dir, e))?;
            let Some(seq) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            generations.push(Generation::load(
                trust_domain,
                &entry.path(),
                seq,
                upstream.is_none(),
            )?);
        }
        generations.sort_by_key(|g| g.seq);
        let seq_file = dir.join("sequence");
        let sequence = match std::fs::read_to_string(&seq_file) {
            Ok(s) => s.trim().parse().map_err(|_| SvidError::Invalid {
                path: seq_file.clone(),
                message: "not a number".into(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(SvidError::io(&seq_file, e)),
        };
        let mut authority = Self {
            trust_domain: trust_domain.to_owned(),
            dir,
            ttl,
            jwt_algorithm,
            upstream,
            generations,
            sequence,
        };
        authority.rotate(now)?;
        Ok(authority)
    }

    /// Drops expired generations and prepares a new one when the newest
    /// has lived half its lifetime. Returns whether the bundle changed.
    pub fn rotate(&mut self, now: SystemTime) -> Result<bool, SvidError> {
        let mut changed = false;
        while let Some(g) = self.generations.first()
            && g.not_after <= now
        {
            let g = self.generations.remove(0);
            let dir = self.dir.join(g.seq.to_string());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an expired CA generation");
            }
            tracing::info!(trust_domain = %self.trust_domain, generation = g.seq, "CA generation expired; removed from the bundle");
            changed = true;
        }
        let due = self
            .generations
            .last()
            .is_none_or(|g| now >= g.not_before + self.ttl / 2);
        if due {
            let seq = self.generations.last().map_or(1, |g| g.seq + 1);
            let g = Generation::create(self, seq, now)?;
            tracing::info!(
                trust_domain = %self.trust_domain,
                generation = seq,
                not_after = %humantime::format_rfc3339_seconds(g.not_after),
                "new CA generation prepared and published"
            );
            self.generations.push(g);
            changed = true;
        }
        if changed {
            self.sequence += 1;
            let path = self.dir.join("sequence");
            write_file(&path, self.sequence.to_string().as_bytes(), 0o644)?;
        }
        Ok(changed)
    }

    /// The generation that signs now: the oldest with more than a sixth
    /// of its lifetime left, or else the newest.
    fn active(&self, now: SystemTime) -> &Generation {
        self.generations
            .iter()
            .find(|g| g.not_after > now + self.ttl / 6)
            .or(self.generations.last())
            .expect("an authority always has a generation after rotate")
    }

    /// The sequence number of the generation that signs now.
    pub fn active_generation(&self, now: SystemTime) -> u64 {
        self.active(now).seq
    }

    /// Who signs X.509-SVIDs now.
    pub(super) fn x509_signer(&self, now: SystemTime) -> Signer<'_> {
        let g = self.active(now);
        match (&self.upstream, &g.root) {
            (Some(u), _) => Signer {
                issuer: &u.issuer,
                intermediates: &u.chain,
                not_after: u.not_after,
                generation: g.seq,
            },
            (None, Some(root)) => Signer {
                issuer: &root.issuer,
                intermediates: &[],
                not_after: g.not_after,
                generation: g.seq,
            },
            (None, None) => unreachable!("a generation without upstream has a root"),
        }
    }

    /// Who signs JWT-SVIDs now, and until when.
    pub fn jwt_signer(&self, now: SystemTime) -> (&JwtSigner, SystemTime) {
        let g = self.active(now);
        (&g.jwt, g.not_after)
    }

    /// The trust domain's bundle: every unexpired generation's keys (or
    /// the upstream roots).
    pub fn bundle(&self) -> Bundle {
        let x509_authorities = match &self.upstream {
            Some(u) => u.roots.clone(),
            None => self
                .generations
                .iter()
                .filter_map(|g| g.root.as_ref().map(|r| r.der.clone()))
                .collect(),
        };
        Bundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities,
            jwt_authorities: self
                .generations
                .iter()
                .map(|g| JwtAuthority {
                    kid: g.jwt.kid.clone(),
                    key: g.jwt.public.clone(),
                })
                .collect(),
            sequence: Some(self.sequence),
            refresh_hint: Some(refresh_hint(self.ttl).as_secs()),
        }
    }
}

/// How often others should fetch the bundle: a twelfth of the CA
/// lifetime (so a new key is in the bundle four hints before it signs),
/// at most five minutes, at least one second.
pub fn refresh_hint(ttl: Duration) -> Duration {
    (ttl / 12).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

impl Generation {
    fn create(authority: &Authority, seq: u64, now: SystemTime) -> Result<Self, SvidError> {
        let td = &authority.trust_domain;
        let dir = authority.dir.join(seq.to_string());
        // X.509 times have whole seconds.
        let not_before = round_down(now);
        let not_after = not_before + authority.ttl;
        let tmp = authority.dir.join(format!(".{seq}.new"));
        let _ = std::fs::remove_dir_all(&tmp);
        make_private_dir(&tmp)?;
        let (jwt, jwt_der) = JwtSigner::generate(authority.jwt_algorithm)?;
        write_file(
            &tmp.join(JWT_KEY),
            pem("PRIVATE KEY", &jwt_der).as_bytes(),
            0o600,
        )?;
        let root = if authority.upstream.is_none() {
            let err = |source| SvidError::Sign {
                what: format!("the CA for {td}"),
                source,
            };
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
            let cert = root_params(td, not_before, not_after)?
                .self_signed(&key)
                .map_err(err)?;
            write_file(&tmp.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&tmp.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
            let der = cert.der().to_vec();
            let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(err)?;
            Some(Root { der, issuer })
        } else {
            None
        };
        let validity = Validity {
            not_before: unix(not_before),
            not_after: unix(not_after),
        };
        write_file(
            &tmp.join(VALIDITY),
            &serde_json::to_vec(&validity).expect("validity serialises"),
            0o644,
        )?;
        std::fs::rename(&tmp, &dir).map_err(|e| SvidError::io(&dir, e))?;
        Ok(Self {
            seq,
            not_before,
            not_after,
            root,
            jwt,
        })
    }

    fn load(td: &str, dir: &Path, seq: u64, self_signed: bool) -> Result<Self, SvidError> {
        let validity_path = dir.join(VALIDITY);
        let validity: Validity =
            serde_json::from_slice(&read(&validity_path)?).map_err(|source| SvidError::Json {
                path: validity_path,
                source,
            })?;
        let jwt_path = dir.join(JWT_KEY);
        let jwt_der = private_key(&jwt_path)?;
        let jwt = JwtSigner::from_pkcs8(&jwt_der).map_err(|e| SvidError::File {
            path: jwt_path,
            source: Box::new(e),
        })?;
        // A generation made under an upstream CA has no root of its own;
        // with the upstream gone it cannot sign X.509-SVIDs: refused.
        let root = if self_signed {
            let key_path = dir.join(CA_KEY);
            let cert_path = dir.join(CA_CERT);
            if !cert_path.exists() {
                return Err(SvidError::Invalid {
                    path: cert_path,
                    message: format!(
                        "generation {seq} of {td} has no CA of its own (it was made under an upstream CA, which is no longer configured)"
                    ),
                });
            }
            let key = load_key_pair(&key_path)?;
            let certs = crate::tls::pem_certs_file(&cert_path)?;
            let [der] = certs.as_slice() else {
                return Err(SvidError::Invalid {
                    path: cert_path,
                    message: "expected exactly one certificate".into(),
                });
            };
            check_ca(der, Some(&key), Some(der.as_slice()), td).map_err(|source| {
                SvidError::Ca {
                    path: cert_path.clone(),
                    index: 1,
                    source,
                }
            })?;
            let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(|source| {
                SvidError::Key {
                    path: cert_path,
                    source,
                }
            })?;
            Some(Root {
                der: der.clone(),
                issuer,
            })
        } else {
            None
        };
        Ok(Self {
            seq,
            not_before: SystemTime::UNIX_EPOCH + Duration::from_secs(validity.not_before),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(validity.not_after),
            root,
            jwt,
        })
    }
}

impl Upstream {
    fn load(td: &str, cfg: &UpstreamCa, now: SystemTime) -> Result<Self, SvidError> {
        let key = load_key_pair(&cfg.key)?;
        let chain = crate::tls::pem_certs_file(&cfg.cert)?;
        let invalid = |path: &Path, message: String| SvidError::Invalid {
            path: path.to_owned(),
            message,
        };
        let first = &chain[0];
        let roots = crate::tls::pem_certs_file(&cfg.bundle)?;
        // Each certificate is signed by the next; the last by a root.
        for (i, der) in chain.iter().enumerate() {
            let next = chain.get(i + 1);
            let signed_by = match next {
                Some(n) => Some(n),
                None => roots.iter().find(|r| signs(r, der)),
            };
            let Some(parent) = signed_by else {
                return Err(invalid(
                    &cfg.cert,
                    format!(
                        "the certificate does not chain to any root in {}",
                        cfg.bundle.display()
                    ),
                ));
            };
            let key_for = (i == 0).then_some(&key);
            check_ca_chain_link(der, key_for, parent, td, now).map_err(|source| SvidError::Ca {
                path: cfg.cert.clone(),
                index: i + 1,
                source,
            })?;
        }
        let cert = check_ca_cert(first).map_err(|source| SvidError::Ca {
            path: cfg.cert.clone(),
            index: 1,
            source,
        })?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        let issuer = Issuer::from_ca_cert_der(&first.clone().into(), key).map_err(|source| {
            SvidError::Key {
                path: cfg.cert.clone(),
                source,
            }
        })?;
        tracing::info!(
            trust_domain = td,
            cert = %cfg.cert.display(),
            subject = %cert.subject(),
            not_after = %humantime::format_rfc3339_seconds(not_after),
            "upstream CA loaded"
        );
        Ok(Self {
            issuer,
            chain,
            roots,
            not_after,
        })
    }
}

/// Whether `parent`'s key verifies `child`'s signature.
fn signs(parent: &[u8], child: &[u8]) -> bool {
    let (Ok((_, p)), Ok((_, c))) = (
        X509Certificate::from_der(parent),
        X509Certificate::from_der(child),
    ) else {
        return false;
    };
    c.verify_signature(Some(p.public_key())).is_ok()
}

fn check_ca_chain_link(
    der: &[u8],
    key: Option<&KeyPair>,
    parent: &[u8],
    td: &str,
    now: SystemTime,
) -> Result<(), CaCertError> {
    let cert = check_ca(der, key, Some(parent), td)?;
    let t = ASN1Time::from_timestamp(unix(now) as i64).map_err(CaCertError::Clock)?;
    if !cert.validity().is_valid_at(t) {
        return Err(CaCertError::NotValidNow {
            not_before: cert.validity().not_before.to_string(),
            not_after: cert.validity().not_after.to_string(),
        });
    }
    Ok(())
}

/// A signing certificate: a CA with `keyCertSign`, whose key is `key`
/// (when given), signed by `parent`'s key, whose SPIFFE ID (if it has
/// one) is the trust domain's. Returns it parsed.
fn check_ca<'a>(
    der: &'a [u8],
    key: Option<&KeyPair>,
    parent: Option<&[u8]>,
    td: &str,
) -> Result<X509Certificate<'a>, CaCertError> {
    let cert = check_ca_cert(der)?;
    if !matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign()) {
        return Err(CaCertError::NoKeyCertSign);
    }
    if let Some(key) = key
        && cert.public_key().raw != key.subject_public_key_info().as_slice()
    {
        return Err(CaCertError::OtherKey);
    }
    if let Some(parent) = parent
        && !signs(parent, der)
    {
        return Err(CaCertError::Signature);
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let want = format!("spiffe://{td}");
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name
                && *u != want
            {
                return Err(CaCertError::Uri {
                    uri: (*u).to_owned(),
                    want,
                });
            }
        }
    }
    Ok(cert)
}

/// Reads a private key file, refusing one that group or others may read.
fn read_key(path: &Path) -> Result<Vec<u8>, SvidError> {
    let meta = std::fs::metadata(path).map_err(|e| SvidError::io(path, e))?;
    crate::files::check_private(&meta).map_err(|problem| SvidError::KeyNotPrivate {
        path: path.to_owned(),
        problem,
    })?;
    read(path)
}

fn load_key_pair(path: &Path) -> Result<KeyPair, SvidError> {
    let pem = String::from_utf8(read_key(path)?).map_err(|_| SvidError::Invalid {
        path: path.to_owned(),
        message: "not PEM text".into(),
    })?;
    KeyPair::from_pem(&pem).map_err(|source| SvidError::Key {
        path: path.to_owned(),
        source,
    })
}

/// The PKCS#8 DER of a PEM private key file only its owner may read.
pub(super) fn private_key(path: &Path) -> Result<Vec<u8>, SvidError> {
    x509_parser::pem::Pem::iter_from_buffer(&read_key(path)?)
        .filter_map(Result::ok)
        .find(|p| p.label == "PRIVATE KEY")
        .map(|p| p.contents)
        .ok_or_else(|| SvidError::Invalid {
            path: path.to_owned(),
            message: "no PKCS#8 PRIVATE KEY block".into(),
        })
}

fn read(path: &Path) -> Result<Vec<u8>, SvidError> {
    std::fs::read(path).map_err(|e| SvidError::io(path, e))
}

/// Writes a file with `mode`, through a temporary file and a rename.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SvidError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| SvidError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| SvidError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SvidError::io(path, e))
}

/// Makes a directory (and parents) that only its owner may enter.
pub(super) fn make_private_dir(dir: &Path) -> Result<(), SvidError> {
    std::fs::create_dir_all(dir).map_err(|e| SvidError::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| SvidError::io(dir, e))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn round_down(t: SystemTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix(t))
}
