//! X.509-SVIDs per the SPIFFE X509-SVID specification: issuing leaves
//! (one URI SAN, `digitalSignature`, no CA bit, short lifetime) and
//! verifying a presented chain against the bundle of its trust domain.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

use super::SvidError;
use crate::identity::SpiffeId;

/// An issued X.509-SVID and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    pub id: SpiffeId,
    /// DER certificates, the leaf first, then any intermediates.
    pub chain: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER.
    pub key: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When a fresh SVID replaces it: before half its lifetime.
    pub renew_at: SystemTime,
    /// The CA generation that signed it.
    pub generation: u64,
}

/// The most a leaf's `notBefore` is set back, for clocks slightly behind.
const MAX_BACKDATE: Duration = Duration::from_secs(10);

/// How a leaf is to be signed.
pub(super) struct Signer<'a> {
    pub issuer: &'a Issuer<'static, KeyPair>,
    /// Certificates between the leaf and the bundle (empty when the
    /// issuer is a root in the bundle).
    pub intermediates: &'a [Vec<u8>],
    /// The issuer's own `notAfter`: no leaf outlives it.
    pub not_after: SystemTime,
    pub generation: u64,
}

/// Issues a leaf X.509-SVID for `id`, valid for `ttl` from `now` (never
/// past the issuer's expiry), with a fresh P-256 key.
pub(super) fn issue(
    id: &SpiffeId,
    signer: &Signer<'_>,
    ttl: Duration,
    now: SystemTime,
) -> Result<X509Svid, SvidError> {
    if id.path().is_empty() {
        return Err(SvidError::Issue(format!(
            "{id}: an X.509-SVID's SPIFFE ID needs a path"
        )));
    }
    let sign = |source| SvidError::Sign {
        what: id.to_string(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign)?;
    let not_before = now - (ttl / 10).min(MAX_BACKDATE);
    let not_after = (now + ttl).min(signer.not_after);
    if not_after <= now {
        return Err(SvidError::Issue(format!("{id}: the CA has expired")));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "idgate");
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(sign)?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial()?);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, signer.issuer).map_err(sign)?;
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let mut chain = vec![cert.der().to_vec()];
    chain.extend(signer.intermediates.iter().cloned());
    Ok(X509Svid {
        id: id.clone(),
        chain,
        key: key.serialize_der(),
        not_before,
        not_after,
        renew_at: not_before + lifetime * 2 / 5,
        generation: signer.generation,
    })
}

/// Parameters of a self-signed root CA for `trust_domain`: a signing
/// certificate whose URI SAN is the trust domain's SPIFFE ID.
pub(super) fn root_params(
    trust_domain: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, SvidError> {
    let err = |source| SvidError::Sign {
        what: format!("the CA for {trust_domain}"),
        source,
    };
    let mut params = ca_params(
        &format!("idgate CA {trust_domain}"),
        BasicConstraints::Unconstrained,
        not_before,
        not_after,
    )?;
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}").try_into().map_err(err)?,
    )];
    Ok(params)
}

/// Parameters of a CA certificate of idgate's (the SPIFFE CAs, the egress
/// CA): subject `O=idgate, CN=common_name`, `constraints` on its path,
/// signing key usages, a random serial (one of its own even when a
/// certificate is issued again with the same key), and its validity.
pub(crate) fn ca_params(
    common_name: &str,
    constraints: BasicConstraints,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, SvidError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "idgate");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// A positive 128-bit random serial number.
fn random_serial() -> Result<SerialNumber, SvidError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| SvidError::Issue("no randomness".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Which end of a TLS connection an SVID is presented by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Why a presented X.509-SVID is not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate was presented")]
    Empty,
    #[error("the certificate does not parse: {0}")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("not an X.509-SVID: {0}")]
    NotSvid(String),
    #[error("no bundle for trust domain {0}: its identities are not trusted here")]
    NoBundle(String),
    #[error("the bundle of {0} holds no usable authority")]
    NoAuthority(String),
    #[error("the chain does not verify against the bundle of {trust_domain}: {source}")]
    Chain {
        trust_domain: String,
        source: webpki::Error,
    },
}

/// Verifies a presented chain (leaf first) per the X509-SVID
/// specification: the leaf checks of section 5.2 with x509-parser, then
/// RFC 5280 path validation (webpki) against the bundle that `bundle_of`
/// gives for the leaf's trust domain, and no other. Returns the SPIFFE ID.
pub fn verify(
    chain: &[CertificateDer<'_>],
    bundle_of: &dyn Fn(&str) -> Option<Vec<Vec<u8>>>,
    role: Role,
    now: SystemTime,
) -> Result<SpiffeId, VerifyError> {
    let leaf = chain.first().ok_or(VerifyError::Empty)?;
    let id = leaf_id(leaf)?;
    let td = id.trust_domain().to_owned();
    let bundle = bundle_of(&td).ok_or_else(|| VerifyError::NoBundle(td.clone()))?;
    let chain_err = |source| VerifyError::Chain {
        trust_domain: td.clone(),
        source,
    };
    let bundle: Vec<CertificateDer<'_>> = bundle.into_iter().map(CertificateDer::from).collect();
    let anchors = bundle
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect::<Vec<_>>();
    if anchors.is_empty() {
        return Err(VerifyError::NoAuthority(td));
    }
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(chain_err)?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let usage = match role {
        Role::Server => webpki::KeyUsage::server_auth(),
        Role::Client => webpki::KeyUsage::client_auth(),
    };
    end_entity
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &chain[1..],
            time,
            usage,
            None,
            None,
        )
        .map_err(chain_err)?;
    Ok(id)
}

/// The SPIFFE ID of a leaf X.509-SVID, after the specification's leaf
/// checks: exactly one URI SAN, a SPIFFE ID with a path, no CA bit, key
/// usage with `digitalSignature` and without `keyCertSign` or `cRLSign`.
pub fn leaf_id(der: &[u8]) -> Result<SpiffeId, VerifyError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(VerifyError::Parse)?;
    let not_svid = |m: &str| VerifyError::NotSvid(m.to_owned());
    if let Ok(Some(bc)) = cert.basic_constraints()
        && bc.value.ca
    {
        return Err(not_svid("the CA bit is set"));
    }
    let ku = cert
        .key_usage()
        .map_err(|_| not_svid("the key usage extension is malformed"))?
        .ok_or_else(|| not_svid("no key usage extension"))?
        .value;
    if !ku.digital_signature() || ku.key_cert_sign() || ku.crl_sign() {
        return Err(not_svid(
            "key usage must have digitalSignature and neither keyCertSign nor cRLSign",
        ));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| not_svid("the subject alternative names are malformed"))?
        .ok_or_else(|| not_svid("no subject alternative name"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(not_svid(&format!(
            "{} URI SANs; an X.509-SVID has exactly one",
            uris.len()
        )));
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| not_svid(&format!("URI SAN {uri:?}: {e}")))?;
    if id.path().is_empty() {
        return Err(not_svid("the SPIFFE ID has no path"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(td: &str) -> (Issuer<'static, KeyPair>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let now = SystemTime::now();
        let params = root_params(
            td,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).unwrap();
        (issuer, der)
    }

    #[test]
    fn issues_a_leaf_per_the_spec_and_verifies_it_against_its_own_bundle_only() {
        let (issuer, root_der) = root("example.org");
        let now = SystemTime::now();
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let signer = Signer {
            issuer: &issuer,
            intermediates: &[],
            not_after: now + Duration::from_secs(3600),
            generation: 1,
        };
        let svid = issue(&id, &signer, Duration::from_secs(600), now).unwrap();
        assert_eq!(svid.chain.len(), 1);
        assert!(
            svid.renew_at
                < svid.not_before + (svid.not_after.duration_since(svid.not_before).unwrap() / 2)
        );
        let (_, cert) = X509Certificate::from_der(&svid.chain[0]).unwrap();
        assert!(cert.key_usage().unwrap().unwrap().critical);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(leaf_id(&svid.chain[0]).unwrap(), id);

        let chain = [CertificateDer::from(svid.chain[0].clone())];
        let ours = |td: &str| (td == "example.org").then(|| vec![root_der.clone()]);
        assert_eq!(verify(&chain, &ours, Role::Client, now).unwrap(), id);
        assert_eq!(verify(&chain, &ours, Role::Server, now).unwrap(), id);
        // Another domain's bundle never vouches for example.org.
        let (_, other_root) = root("other.org");
        let wrong = |_: &str| Some(vec![other_root.clone()]);
        assert!(matches!(
            verify(&chain, &wrong, Role::Client, now),
            Err(VerifyError::Chain { .. })
        ));
        let none = |_: &str| None;
        assert_eq!(
            verify(&chain, &none, Role::Client, now),
            Err(VerifyError::NoBundle("example.org".into()))
        );
        // Expired.
        assert!(verify(&chain, &ours, Role::Client, now + Duration::from_secs(601)).is_err());
    }

    #[test]
    fn a_leaf_never_outlives_its_ca_and_needs_a_path() {
        let (issuer, _) = root("example.org");
        let now = SystemTime::now();
        let signer = Signer {
            issuer: &issuer,
            intermediates: &[],
            not_after: now + Duration::from_secs(30),
            generation: 1,
        };
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let svid = issue(&id, &signer, Duration::from_secs(600), now).unwrap();
        assert_eq!(svid.not_after, now + Duration::from_secs(30));
        let bare: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert!(issue(&bare, &signer, Duration::from_secs(60), now).is_err());
    }

    #[test]
    fn a_ca_certificate_is_not_an_svid() {
        let (_, root_der) = root("example.org");
        let e = leaf_id(&root_der).unwrap_err();
        assert!(matches!(e, VerifyError::NotSvid(_)), "{e}");
    }
}
