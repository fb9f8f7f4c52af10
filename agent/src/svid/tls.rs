//! rustls with SPIFFE authentication: certificate verifiers that accept
//! a peer only when its X.509-SVID verifies against the bundle of the
//! peer's own trust domain and its SPIFFE ID is authorised, and configs
//! that present an X.509-SVID. Used by the federation client
//! (`https_spiffe`) and by workloads talking mutual TLS. What is not
//! SPIFFE's (the provider, the handshake signatures) is `crate::tls`.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::DistinguishedName;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use super::x509::{Role, verify};
use crate::identity::SpiffeId;
use crate::tls::{handshake_signatures, provider};

/// The X.509 bundle (DER CA certificates) of a trust domain, or `None`
/// when its identities are not trusted.
pub type BundleSource = Arc<dyn Fn(&str) -> Option<Vec<Vec<u8>>> + Send + Sync>;

/// Whether a verified peer identity may connect.
pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// Verifies peers by SPIFFE ID; works as both a server's verifier of
/// client certificates and a client's verifier of the server's.
#[derive(Clone)]
pub struct SpiffeVerifier {
    bundles: BundleSource,
    authorize: Authorizer,
    algs: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeVerifier")
    }
}

impl SpiffeVerifier {
    pub fn new(bundles: BundleSource, authorize: Authorizer) -> Self {
        Self {
            bundles,
            authorize,
            algs: provider().signature_verification_algorithms,
        }
    }

    /// Accepts exactly these SPIFFE IDs.
    pub fn exactly(bundles: BundleSource, ids: Vec<SpiffeId>) -> Self {
        Self::new(bundles, Arc::new(move |id| ids.contains(id)))
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: Role,
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
        let id = verify(&chain, &*self.bundles, role, at).map_err(|e| {
            tracing::debug!(error = %e, "peer SVID refused");
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if !(self.authorize)(&id) {
            tracing::debug!(peer = %id, "peer SPIFFE ID not authorised");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(id)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, Role::Server, now)
            .map(|_| ServerCertVerified::assertion())
    }

    handshake_signatures!(algs);
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, Role::Client, now)
            .map(|_| ClientCertVerified::assertion())
    }

    handshake_signatures!(algs);
}

/// A certificate chain and key as rustls takes them.
pub fn identity(
    chain: &[Vec<u8>],
    key: &[u8],
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
    )
}

/// A client that presents `chain`/`key` (when given) and accepts the
/// server that `verifier` accepts.
pub fn client_config(
    verifier: SpiffeVerifier,
    svid: Option<(&[Vec<u8>], &[u8])>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    Ok(match svid {
        Some((chain, key)) => {
            let (chain, key) = identity(chain, key);
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// A server that presents `chain`/`key` and requires a client SVID that
/// `verifier` accepts.
pub fn mtls_server_config(
    verifier: SpiffeVerifier,
    chain: &[Vec<u8>],
    key: &[u8],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let (chain, key) = identity(chain, key);
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::{Credentials, SvidConfig};
    use std::io::{Read, Write};

    /// Runs one mutual TLS exchange in memory; returns whether both ends
    /// accepted each other.
    fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> bool {
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), "peer.invalid".try_into().unwrap())
                .unwrap();
        c.writer().write_all(b"hi").unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            if c.write_tls(&mut buf).is_err() {
                return false;
            }
            if s.read_tls(&mut &buf[..]).is_err() || s.process_new_packets().is_err() {
                return false;
            }
            buf.clear();
            if s.write_tls(&mut buf).is_err() {
                return false;
            }
            if c.read_tls(&mut &buf[..]).is_err() || c.process_new_packets().is_err() {
                return false;
            }
        }
        let mut got = [0u8; 2];
        s.reader().read_exact(&mut got).is_ok() && &got == b"hi"
    }

    #[test]
    fn mutual_tls_accepts_the_authorised_peer_only() {
        let state = std::env::temp_dir().join(format!("idgate-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let creds = Credentials::load(&SvidConfig::default(), &[], &state).unwrap();
        let now = SystemTime::now();
        let ids: Vec<SpiffeId> = [
            "spiffe://a.test/server",
            "spiffe://a.test/client",
            "spiffe://b.test/client",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let svids: Vec<_> = ids
            .iter()
            .map(|id| creds.x509_svid(id, now).unwrap())
            .collect();
        let set = creds.bundle_set();
        // Only a.test is trusted by these ends: b.test is local to the
        // issuing agent here, but not federated with a.test's workloads.
        let bundles: BundleSource = Arc::new(move |td| {
            (td == "a.test").then(|| set.get(td).unwrap().x509_authorities.clone())
        });
        let server = |allowed: &SpiffeId| {
            mtls_server_config(
                SpiffeVerifier::exactly(bundles.clone(), vec![allowed.clone()]),
                &svids[0].chain,
                &svids[0].key,
            )
            .unwrap()
        };
        let client = |i: usize| {
            client_config(
                SpiffeVerifier::exactly(bundles.clone(), vec![ids[0].clone()]),
                Some((&svids[i].chain, &svids[i].key)),
            )
            .unwrap()
        };
        assert!(handshake(server(&ids[1]), client(1)));
        // The server allows another ID than the client's.
        assert!(!handshake(server(&ids[2]), client(1)));
        // A foreign, non-federated identity is refused even when allowed.
        assert!(!handshake(server(&ids[2]), client(2)));
        let _ = std::fs::remove_dir_all(&state);
    }
}
