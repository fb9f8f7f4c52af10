//! SPIFFE bundles: a trust domain's X.509 authorities (CA certificates)
//! and JWT authorities (signing keys), in the SPIFFE bundle format (a JWK
//! Set, per the SPIFFE Trust Domain and Bundle specification), in PEM and
//! as concatenated DER for the Workload API.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use super::SvidError;

/// One trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: String,
    /// DER CA certificates that X.509-SVIDs of the domain chain to.
    pub x509_authorities: Vec<Vec<u8>>,
    /// Keys that JWT-SVIDs of the domain are signed with.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: changes whenever the contents do.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint: Option<u64>,
}

/// A JWT-SVID signing key as a bundle publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    pub kid: String,
    pub key: PublicJwk,
}

/// The public key of a JWK: the kinds the JWT-SVID algorithms use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicJwk {
    /// `crv` is `P-256` or `P-384`; `x` and `y` are the big-endian
    /// coordinates.
    Ec {
        crv: &'static str,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    /// Big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// What a bundle's JSON carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// The whole SPIFFE bundle: both kinds of keys, sequence and hint.
    All,
    /// Only the JWT-SVID keys (the Workload API's JWT bundles).
    Jwt,
    /// Only the JWT-SVID keys, as an OpenID Connect provider's JWK Set:
    /// `use` is `sig` (OIDC verifiers skip other uses) and each key names
    /// its `alg`.
    Oidc,
}

/// A JWK as it is written; unknown members are ignored when read.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Jwk {
    #[serde(default)]
    kty: String,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

const USE_X509: &str = "x509-svid";
const USE_JWT: &str = "jwt-svid";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

impl Bundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// The X.509 authorities as the Workload API sends them: DER
    /// certificates, concatenated.
    pub fn x509_der(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The X.509 authorities as PEM.
    pub fn x509_pem(&self) -> String {
        certs_pem(&self.x509_authorities)
    }

    /// The bundle as a JWK Set.
    pub fn to_json(&self, parts: Parts) -> Result<String, SvidError> {
        let mut keys = Vec::new();
        if parts == Parts::All {
            for der in &self.x509_authorities {
                let mut jwk = public_jwk_of_cert(der)?.to_jwk();
                jwk.use_ = Some(USE_X509.into());
                jwk.x5c = Some(vec![STANDARD.encode(der)]);
                keys.push(jwk);
            }
        }
        for a in &self.jwt_authorities {
            let mut jwk = a.key.to_jwk();
            jwk.kid = Some(a.kid.clone());
            if parts == Parts::Oidc {
                jwk.use_ = Some("sig".into());
                jwk.alg = Some(a.key.alg().into());
            } else {
                jwk.use_ = Some(USE_JWT.into());
            }
            keys.push(jwk);
        }
        let set = JwkSet {
            keys,
            spiffe_sequence: self.sequence.filter(|_| parts == Parts::All),
            spiffe_refresh_hint: self.refresh_hint.filter(|_| parts == Parts::All),
        };
        Ok(serde_json::to_string_pretty(&set).expect("a JWK set serialises"))
    }

    /// Reads a SPIFFE bundle (JWK Set) for `trust_domain`. Keys of unknown
    /// type or use are ignored, as the specification says; an X.509
    /// authority that is not a CA certificate, or a JWT authority without
    /// a `kid`, makes the whole bundle invalid.
    pub fn from_json(trust_domain: &str, json: &[u8]) -> Result<Self, SvidError> {
        let bad = |source| SvidError::BundleKey {
            trust_domain: trust_domain.to_owned(),
            source,
        };
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| bad(JwkError::Json(e)))?;
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = set.spiffe_sequence;
        bundle.refresh_hint = set.spiffe_refresh_hint;
        for jwk in set.keys {
            match jwk.use_.as_deref() {
                Some(USE_X509) => {
                    let Some(first) = jwk.x5c.as_ref().and_then(|v| v.first()) else {
                        continue;
                    };
                    let der = STANDARD.decode(first).map_err(|source| {
                        bad(JwkError::Base64 {
                            name: "x5c",
                            source,
                        })
                    })?;
                    check_ca_cert(&der).map_err(|source| SvidError::BundleAuthority {
                        trust_domain: trust_domain.to_owned(),
                        source,
                    })?;
                    bundle.x509_authorities.push(der);
                }
                Some(USE_JWT) => {
                    let Some(key) = PublicJwk::from_jwk(&jwk).map_err(bad)? else {
                        continue;
                    };
                    let kid = jwk
                        .kid
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| bad(JwkError::NoKid))?;
                    bundle.jwt_authorities.push(JwtAuthority { kid, key });
                }
                _ => {}
            }
        }
        Ok(bundle)
    }

    /// Reads a bundle file: the SPIFFE bundle format (JSON), or PEM CA
    /// certificates (X.509 authorities only).
    pub fn from_file_contents(trust_domain: &str, bytes: &[u8]) -> Result<Self, SvidError> {
        if bytes.trim_ascii_start().starts_with(b"{") {
            return Self::from_json(trust_domain, bytes);
        }
        let mut bundle = Self::new(trust_domain);
        for der in crate::tls::pem_certs(bytes)? {
            check_ca_cert(&der).map_err(|source| SvidError::BundleAuthority {
                trust_domain: trust_domain.to_owned(),
                source,
            })?;
            bundle.x509_authorities.push(der);
        }
        if bundle.x509_authorities.is_empty() {
            return Err(SvidError::Bundle(format!(
                "bundle for {trust_domain}: neither a SPIFFE bundle (JSON) nor PEM certificates"
            )));
        }
        Ok(bundle)
    }

    /// The signing key with this `kid`.
    pub fn jwt_authority(&self, kid: &str) -> Option<&PublicJwk> {
        self.jwt_authorities
            .iter()
            .find(|a| a.kid == kid)
            .map(|a| &a.key)
    }
}

impl PublicJwk {
    /// The key of an uncompressed P-256 point (`04 || x || y`).
    pub fn p256(point: &[u8]) -> Self {
        let coords = &point[1..];
        let (x, y) = coords.split_at(coords.len() / 2);
        Self::Ec {
            crv: "P-256",
            x: x.to_vec(),
            y: y.to_vec(),
        }
    }

    /// The algorithm idgate signs with this key (a JWK names one).
    pub fn alg(&self) -> &'static str {
        match self {
            Self::Ec { crv: "P-384", .. } => "ES384",
            Self::Ec { .. } => "ES256",
            Self::Rsa { .. } => "RS256",
        }
    }

    fn to_jwk(&self) -> Jwk {
        let b = |v: &[u8]| Some(URL_SAFE_NO_PAD.encode(v));
        match self {
            Self::Ec { crv, x, y } => Jwk {
                kty: "EC".into(),
                crv: Some((*crv).into()),
                x: b(x),
                y: b(y),
                ..Default::default()
            },
            Self::Rsa { n, e } => Jwk {
                kty: "RSA".into(),
                n: b(n),
                e: b(e),
                ..Default::default()
            },
        }
    }

    /// `None` for a key type the JWT-SVID algorithms here do not use.
    fn from_jwk(jwk: &Jwk) -> Result<Option<Self>, JwkError> {
        let field = |v: &Option<String>, name: &'static str| {
            let s = v.as_deref().ok_or_else(|| JwkError::Missing {
                kty: jwk.kty.clone(),
                name,
            })?;
            URL_SAFE_NO_PAD
                .decode(s.trim_end_matches('='))
                .map_err(|source| JwkError::Base64 { name, source })
        };
        Ok(match jwk.kty.as_str() {
            "EC" => {
                let crv = match jwk.crv.as_deref() {
                    Some("P-256") => "P-256",
                    Some("P-384") => "P-384",
                    _ => return Ok(None),
                };
                Some(Self::Ec {
                    crv,
                    x: field(&jwk.x, "x")?,
                    y: field(&jwk.y, "y")?,
                })
            }
            "RSA" => Some(Self::Rsa {
                n: field(&jwk.n, "n")?,
                e: field(&jwk.e, "e")?,
            }),
            _ => None,
        })
    }
}

/// The public key of a certificate, as a JWK.
fn public_jwk_of_cert(der: &[u8]) -> Result<PublicJwk, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(SvidError::Cert)?;
    let spki = cert.public_key();
    let unsupported = || SvidError::Bundle("a CA certificate's key type is not supported".into());
    match spki.parsed().map_err(|_| unsupported())? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let crv = match curve.as_deref() {
                Some(OID_P256) => "P-256",
                Some(OID_P384) => "P-384",
                _ => return Err(unsupported()),
            };
            let coords = &point.data()[1..];
            let (x, y) = coords.split_at(coords.len() / 2);
            Ok(PublicJwk::Ec {
                crv,
                x: x.to_vec(),
                y: y.to_vec(),
            })
        }
        PublicKey::RSA(rsa) => Ok(PublicJwk::Rsa {
            n: strip_zeros(rsa.modulus),
            e: strip_zeros(rsa.exponent),
        }),
        _ => Err(unsupported()),
    }
}

fn strip_zeros(v: &[u8]) -> Vec<u8> {
    let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    v[start..].to_vec()
}

/// Why a JWK of a bundle cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JwkError {
    #[error(transparent)]
    Json(serde_json::Error),
    #[error("{kty} key without `{name}`")]
    Missing { kty: String, name: &'static str },
    #[error("`{name}` is not base64: {source}")]
    Base64 {
        name: &'static str,
        source: base64::DecodeError,
    },
    #[error("a jwt-svid key without `kid`")]
    NoKid,
}

/// Why a certificate cannot stand as a CA of a bundle or an authority.
#[derive(Debug, thiserror::Error)]
pub enum CaCertError {
    #[error("does not parse: {0}")]
    Parse(#[from] x509_parser::nom::Err<X509Error>),
    #[error("has trailing bytes")]
    Trailing,
    #[error("{subject} is not a CA certificate (no basicConstraints cA)")]
    NotCa { subject: String },
    #[error("its key usage lacks keyCertSign")]
    NoKeyCertSign,
    #[error("the key file does not hold this certificate's key")]
    OtherKey,
    #[error("its signature does not verify against its issuer")]
    Signature,
    #[error("its URI SAN {uri:?} is not the trust domain's SPIFFE ID {want}")]
    Uri { uri: String, want: String },
    #[error("not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        not_before: String,
        not_after: String,
    },
    #[error("the time now: {0}")]
    Clock(#[source] X509Error),
}

/// Checks that `der` is one CA certificate: it parses, whole, and has the
/// CA bit; returns it parsed.
pub fn check_ca_cert(der: &[u8]) -> Result<X509Certificate<'_>, CaCertError> {
    let (rest, cert) = X509Certificate::from_der(der)?;
    if !rest.is_empty() {
        return Err(CaCertError::Trailing);
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => Ok(cert),
        _ => Err(CaCertError::NotCa {
            subject: cert.subject().to_string(),
        }),
    }
}

/// DER certificates as PEM.
pub fn certs_pem(ders: &[Vec<u8>]) -> String {
    ders.iter().map(|der| pem("CERTIFICATE", der)).collect()
}

/// One PEM block.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Splits concatenated DER certificates (as the Workload API sends chains
/// and bundles) into one DER per certificate.
pub fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = X509Certificate::from_der(bytes).map_err(SvidError::Cert)?;
        out.push(bytes[..bytes.len() - rest.len()].to_vec());
        bytes = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn round_trips_through_the_spiffe_format() {
        let ca = ca_der();
        let bundle = Bundle {
            trust_domain: "example.org".into(),
            x509_authorities: vec![ca.clone()],
            jwt_authorities: vec![JwtAuthority {
                kid: "k1".into(),
                key: PublicJwk::p256(&[4; 65]),
            }],
            sequence: Some(7),
            refresh_hint: Some(300),
        };
        let json = bundle.to_json(Parts::All).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert!(v["keys"][0].get("kid").is_none());
        assert_eq!(v["keys"][1]["use"], "jwt-svid");
        assert_eq!(v["keys"][1]["kid"], "k1");
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(
            Bundle::from_json("example.org", json.as_bytes()).unwrap(),
            bundle
        );

        let jwt_only = bundle.to_json(Parts::Jwt).unwrap();
        let v: serde_json::Value = serde_json::from_str(&jwt_only).unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), 1);
        assert!(v.get("spiffe_sequence").is_none());

        let oidc = bundle.to_json(Parts::Oidc).unwrap();
        let v: serde_json::Value = serde_json::from_str(&oidc).unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), 1);
        assert_eq!(v["keys"][0]["use"], "sig");
        assert_eq!(v["keys"][0]["alg"], "ES256");
        assert_eq!(v["keys"][0]["kid"], "k1");
        assert!(v.get("spiffe_sequence").is_none());
    }

    #[test]
    fn unknown_uses_and_types_are_ignored_and_bad_keys_refused() {
        let json =
            br#"{"keys":[{"kty":"EC","use":"other"},{"kty":"OKP","use":"jwt-svid","kid":"a"}]}"#;
        let b = Bundle::from_json("td", json).unwrap();
        assert!(b.x509_authorities.is_empty() && b.jwt_authorities.is_empty());
        let no_kid = br#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"AA","y":"AA"}]}"#;
        assert!(Bundle::from_json("td", no_kid).is_err());
        let leaf = {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::new(vec!["a".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        let json = format!(
            r#"{{"keys":[{{"kty":"EC","use":"x509-svid","x5c":["{}"]}}]}}"#,
            STANDARD.encode(&leaf)
        );
        let e = Bundle::from_json("td", json.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
    }

    #[test]
    fn pem_and_der_forms() {
        let (a, b) = (ca_der(), ca_der());
        let pem = certs_pem(&[a.clone(), b.clone()]);
        let bundle = Bundle::from_file_contents("td", pem.as_bytes()).unwrap();
        assert_eq!(bundle.x509_authorities, vec![a.clone(), b.clone()]);
        assert_eq!(split_der(&bundle.x509_der()).unwrap(), vec![a, b]);
        assert!(Bundle::from_file_contents("td", b"nothing").is_err());
    }
}
