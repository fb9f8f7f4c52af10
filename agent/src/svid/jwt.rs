//! JWT-SVIDs per the SPIFFE JWT-SVID specification: signed ES256 (or
//! RS256, per trust domain) with a key that the trust domain's bundle
//! publishes under its `kid`, and
//! validated strictly (allowed `alg` only, no other JOSE headers, `sub`
//! a SPIFFE ID, `aud` containing the validator's audience, `exp` in the
//! future, signature by a key in the bundle of the subject's domain).

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rsa::pkcs8::EncodePrivateKey as _;
use serde_json::{Map, Value, json};

use super::bundle::PublicJwk;
use super::{JwtAlgorithm, SvidError};
use crate::identity::SpiffeId;

/// The bits of a generated RS256 key.
const RSA_BITS: usize = 2048;

/// A JWT-SVID signing key.
pub struct JwtSigner {
    key: SigningKey,
    pub kid: String,
    pub public: PublicJwk,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner").field("kid", &self.kid).finish()
    }
}

enum SigningKey {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

impl JwtSigner {
    /// A new key for `alg`, and its PKCS#8 DER to keep.
    pub fn generate(alg: JwtAlgorithm) -> Result<(Self, Vec<u8>), SvidError> {
        let der = match alg {
            JwtAlgorithm::ES256 => EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|_| SvidError::Issue("cannot generate a JWT signing key".into()))?
            .as_ref()
            .to_vec(),
            JwtAlgorithm::RS256 => rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
                .map_err(SvidError::RsaGenerate)?
                .to_pkcs8_der()
                .map_err(SvidError::RsaEncode)?
                .as_bytes()
                .to_vec(),
        };
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// The key of a PKCS#8 DER private key, P-256 (ES256) or RSA
    /// (RS256). Its `kid` is derived from the public key, so it is the
    /// same on every start.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, SvidError> {
        let (key, public) = match EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &SystemRandom::new(),
        ) {
            Ok(key) => {
                let public = PublicJwk::p256(key.public_key().as_ref());
                (SigningKey::Es256(key), public)
            }
            Err(ec) => {
                // Report the P-256 refusal unless the key is RSA.
                let key = RsaKeyPair::from_pkcs8(der).map_err(|_| SvidError::JwtKey(ec))?;
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
                let public = PublicJwk::Rsa { n: c.n, e: c.e };
                (SigningKey::Rs256(key), public)
            }
        };
        let material = match &public {
            PublicJwk::Ec { x, y, .. } => [&[4u8][..], x, y].concat(),
            PublicJwk::Rsa { n, e } => [n.as_slice(), e].concat(),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &material);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..18]);
        Ok(Self { key, kid, public })
    }

    /// Signs a JWT-SVID for `sub` and `audiences`, with `iss` when an
    /// issuer is given, expiring `ttl` from `now`, never after
    /// `not_after`. Returns the token and its expiry.
    pub fn sign(
        &self,
        sub: &SpiffeId,
        audiences: &[String],
        issuer: Option<&str>,
        ttl: Duration,
        now: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, SystemTime), SvidError> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        };
        let exp = (now + ttl).min(not_after);
        if secs(exp) <= secs(now) {
            return Err(SvidError::Issue("the JWT signing key has expired".into()));
        }
        let header = json!({"alg": self.public.alg(), "kid": self.kid, "typ": "JWT"});
        let mut claims = json!({
            "sub": sub.as_str(),
            "aud": audiences,
            "iat": secs(now),
            "exp": secs(exp),
        });
        if let Some(iss) = issuer {
            claims["iss"] = iss.into();
        }
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let failed = |_| SvidError::Issue("JWT signing failed".into());
        let rng = SystemRandom::new();
        let sig = match &self.key {
            SigningKey::Es256(key) => key
                .sign(&rng, input.as_bytes())
                .map_err(failed)?
                .as_ref()
                .to_vec(),
            SigningKey::Rs256(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .map_err(failed)?;
                sig
            }
        };
        Ok((
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig)),
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs(exp)),
        ))
    }
}

/// Why a JWT-SVID is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("header: {0}")]
    Header(String),
    #[error("claims: {0}")]
    Claims(String),
    #[error("the token has expired")]
    Expired,
    #[error("the audience {0:?} is not in the token's `aud`")]
    Audience(String),
    #[error("no JWT bundle for trust domain {0}: its tokens are not trusted here")]
    NoBundle(String),
    #[error("no key {0:?} in the bundle of {1}")]
    UnknownKey(String, String),
    #[error("the signature does not verify")]
    Signature,
}

/// A validated token's subject and claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub id: SpiffeId,
    pub claims: Map<String, Value>,
}

/// The JWT-SVID algorithms this validator knows (ES512 is not in *ring*).
const ALGS: &[&str] = &[
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
];

/// The JWT authorities of a trust domain, `(kid, key)`, or `None` when
/// there is no bundle for it.
pub type KeysOf<'a> = &'a dyn Fn(&str) -> Option<Vec<(String, PublicJwk)>>;

/// Validates `token` for `audience` with the keys `keys_of` gives.
pub fn validate(
    token: &str,
    audience: &str,
    keys_of: KeysOf<'_>,
    now: SystemTime,
) -> Result<Validated, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return Err(JwtError::Malformed(
            "not three dot-separated parts (JWS compact serialisation)".into(),
        ));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| JwtError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header: Map<String, Value> = serde_json::from_slice(&decode(h, "the header")?)
        .map_err(|e| JwtError::Header(e.to_string()))?;
    let claims: Map<String, Value> = serde_json::from_slice(&decode(c, "the claims")?)
        .map_err(|e| JwtError::Claims(e.to_string()))?;
    let sig = decode(s, "the signature")?;

    if let Some(k) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtError::Header(format!(
            "header parameter {k:?} is not allowed in a JWT-SVID"
        )));
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .filter(|a| ALGS.contains(a))
        .ok_or_else(|| JwtError::Header(format!("`alg` must be one of {ALGS:?}")))?;
    if let Some(typ) = header.get("typ")
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(JwtError::Header("`typ` must be JWT or JOSE".into()));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(JwtError::Header("`kid` must be a string".into())),
    };

    let id: SpiffeId = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Claims("no `sub`".into()))?
        .parse()
        .map_err(|e| JwtError::Claims(format!("`sub` is not a SPIFFE ID: {e}")))?;
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if audiences.is_empty() {
        return Err(JwtError::Claims("no `aud`".into()));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or_else(|| JwtError::Claims("no numeric `exp`".into()))?;
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if exp <= now_secs {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64)
        && nbf > now_secs
    {
        return Err(JwtError::Claims("not valid yet (`nbf`)".into()));
    }
    if !audiences.contains(&audience) {
        return Err(JwtError::Audience(audience.to_owned()));
    }

    let td = id.trust_domain();
    let keys = keys_of(td).ok_or_else(|| JwtError::NoBundle(td.to_owned()))?;
    let message = format!("{h}.{c}");
    let candidates: Vec<&PublicJwk> = match kid {
        Some(kid) => vec![
            keys.iter()
                .find(|(k, _)| k == kid)
                .map(|(_, key)| key)
                .ok_or_else(|| JwtError::UnknownKey(kid.to_owned(), td.to_owned()))?,
        ],
        None => keys.iter().map(|(_, key)| key).collect(),
    };
    if !candidates
        .into_iter()
        .any(|key| verify_signature(alg, key, message.as_bytes(), &sig))
    {
        return Err(JwtError::Signature);
    }
    Ok(Validated { id, claims })
}

/// Whether `sig` is `key`'s `alg` signature of `message`; a key of the
/// wrong type for `alg` never verifies.
fn verify_signature(alg: &str, key: &PublicJwk, message: &[u8], sig: &[u8]) -> bool {
    match key {
        PublicJwk::Ec { crv, x, y } => {
            let params: &dyn signature::VerificationAlgorithm = match (alg, *crv) {
                ("ES256", "P-256") => &signature::ECDSA_P256_SHA256_FIXED,
                ("ES384", "P-384") => &signature::ECDSA_P384_SHA384_FIXED,
                _ => return false,
            };
            let mut point = vec![4u8];
            point.extend_from_slice(x);
            point.extend_from_slice(y);
            signature::UnparsedPublicKey::new(params, point)
                .verify(message, sig)
                .is_ok()
        }
        PublicJwk::Rsa { n, e } => {
            let params: &signature::RsaParameters = match alg {
                "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                "PS512" => &signature::RSA_PSS_2048_8192_SHA512,
                _ => return false,
            };
            signature::RsaPublicKeyComponents { n, e }
                .verify(params, message, sig)
                .is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (JwtSigner, SpiffeId, SystemTime) {
        let (signer, der) = JwtSigner::generate(JwtAlgorithm::ES256).unwrap();
        // The kid is a function of the key: the same after a reload.
        assert_eq!(JwtSigner::from_pkcs8(&der).unwrap().kid, signer.kid);
        (
            signer,
            "spiffe://example.org/web".parse().unwrap(),
            SystemTime::now(),
        )
    }

    fn keys(signer: &JwtSigner) -> impl Fn(&str) -> Option<Vec<(String, PublicJwk)>> + '_ {
        move |td| (td == "example.org").then(|| vec![(signer.kid.clone(), signer.public.clone())])
    }

    /// A token for audience `api`, valid for a minute.
    fn api_token(signer: &JwtSigner, id: &SpiffeId, now: SystemTime) -> String {
        let far = now + Duration::from_secs(600);
        let ttl = Duration::from_secs(60);
        signer
            .sign(id, &["api".into()], None, ttl, now, far)
            .unwrap()
            .0
    }

    fn header_of(token: &str) -> Value {
        let b64 = token.split('.').next().unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(b64).unwrap()).unwrap()
    }

    #[test]
    fn signs_and_validates_with_the_spec_claims() {
        let (signer, id, now) = setup();
        let far = now + Duration::from_secs(3600);
        let (token, exp) = signer
            .sign(
                &id,
                &["db".into(), "api".into()],
                Some("https://oidc.example.org"),
                Duration::from_secs(300),
                now,
                far,
            )
            .unwrap();
        assert!(exp > now);
        let v = validate(&token, "api", &keys(&signer), now).unwrap();
        assert_eq!(v.id, id);
        assert_eq!(v.claims["sub"], id.as_str());
        assert!(v.claims.contains_key("exp") && v.claims.contains_key("iat"));
        assert_eq!(v.claims["iss"], "https://oidc.example.org");
        let header = header_of(&token);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], signer.kid.as_str());

        assert_eq!(
            validate(&token, "other", &keys(&signer), now),
            Err(JwtError::Audience("other".into()))
        );
        assert_eq!(
            validate(
                &token,
                "api",
                &keys(&signer),
                now + Duration::from_secs(301)
            ),
            Err(JwtError::Expired)
        );
        let none = |_: &str| None;
        assert_eq!(
            validate(&token, "api", &none, now),
            Err(JwtError::NoBundle("example.org".into()))
        );
        // Someone else's key under the same kid does not verify.
        let (other, _) = JwtSigner::generate(JwtAlgorithm::ES256).unwrap();
        let wrong = |_: &str| Some(vec![(signer.kid.clone(), other.public.clone())]);
        assert_eq!(
            validate(&token, "api", &wrong, now),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn refuses_tampering_and_forbidden_headers() {
        let (signer, id, now) = setup();
        let token = api_token(&signer, &id, now);
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            json!({"sub": "spiffe://example.org/admin", "aud": ["api"], "exp": 4e9}).to_string(),
        );
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(
            validate(&forged, "api", &keys(&signer), now),
            Err(JwtError::Signature)
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            parts[1]
        );
        assert!(matches!(
            validate(&none_alg, "api", &keys(&signer), now),
            Err(JwtError::Header(_))
        ));
        let jku = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","jku":"https://x"}"#),
            parts[1],
            parts[2]
        );
        assert!(matches!(
            validate(&jku, "api", &keys(&signer), now),
            Err(JwtError::Header(_))
        ));
        assert!(matches!(
            validate("a.b", "api", &keys(&signer), now),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn rs256_keys_sign_tokens_that_validate() {
        let (signer, der) = JwtSigner::generate(JwtAlgorithm::RS256).unwrap();
        assert_eq!(JwtSigner::from_pkcs8(&der).unwrap().kid, signer.kid);
        assert!(matches!(&signer.public, PublicJwk::Rsa { n, .. } if n.len() == 256));
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let now = SystemTime::now();
        let token = api_token(&signer, &id, now);
        let header = header_of(&token);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(validate(&token, "api", &keys(&signer), now).unwrap().id, id);
        // An ES256 key under the same kid does not verify it.
        let (ec, _) = JwtSigner::generate(JwtAlgorithm::ES256).unwrap();
        let wrong = |_: &str| Some(vec![(signer.kid.clone(), ec.public.clone())]);
        assert_eq!(
            validate(&token, "api", &wrong, now),
            Err(JwtError::Signature)
        );
    }
}
