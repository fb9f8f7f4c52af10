//! Fetching the kubelet's pod list: `GET {kubelet_url}/pods` over HTTPS
//! with the service account's bearer token, as SPIRE's `k8s` workload
//! attestor does.
//!
//! The token and the CA are read anew for every fetch (both rotate). The
//! kubelet's serving certificate is verified against the configured CA:
//! its chain always, its name only when `kubelet_server_name` is given,
//! because a kubelet's certificate names the node, not the `127.0.0.1`
//! the agent reaches it at (SPIRE verifies the same way). Every fetch is
//! bounded in time and in size; any failure is an error, never a partial
//! list.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::CertificateError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, InvalidDnsNameError, ServerName, UnixTime};
use serde::Deserialize;

use super::pods::{Pods, PodsError};
use crate::tls::{HttpsError, PemError, handshake_signatures};

/// The most a pod list may weigh: a full node (110 pods) lists a few MiB.
pub const MAX_POD_LIST_BYTES: usize = 64 << 20;

/// Errors in the `[kubernetes]` settings and fetching the pod list.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("`kubernetes.kubelet_url` {url:?}: {source}")]
    UrlSyntax {
        url: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error("`kubernetes.kubelet_url` {url:?}: {why}")]
    Url { url: String, why: &'static str },
    #[error("`kubernetes.kubelet_server_name` {name:?}: {source}")]
    ServerName {
        name: String,
        source: InvalidDnsNameError,
    },
    #[error("`kubernetes.refresh` must be at least 1s")]
    Refresh,
    #[error("`kubernetes.timeout` must be between 1ms and 60s")]
    TimeoutSetting,
    #[error("kubelet token {path}: {source}")]
    TokenRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubelet token {path}: {why}")]
    Token { path: PathBuf, why: &'static str },
    #[error("kubelet CA {0}")]
    Ca(#[from] PemError),
    #[error("kubelet CA {path}: {source}")]
    Verifier {
        path: PathBuf,
        source: rustls::client::VerifierBuilderError,
    },
    #[error("kubelet TLS settings: {0}")]
    TlsSettings(#[source] rustls::Error),
    #[error("kubelet {url}: {source}")]
    Fetch { url: String, source: HttpsError },
    #[error("kubelet {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("kubelet {url}: {source}")]
    Pods { url: String, source: PodsError },
}

/// `[kubernetes]` in the agent configuration: where the kubelet is and how
/// to talk to it. Absent means off: `k8s:` selectors match nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeletConfig {
    /// The kubelet's HTTPS endpoint. Default `https://127.0.0.1:10250`
    /// (the node's kubelet, from a pod on the host network).
    pub kubelet_url: String,
    /// The bearer token, re-read for every fetch. Default
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`.
    pub token_path: PathBuf,
    /// PEM CA certificates that verify the kubelet's serving certificate.
    /// Default `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt` (the
    /// cluster CA, which signs kubelet serving certificates with
    /// `serverTLSBootstrap`).
    pub kubelet_ca_path: PathBuf,
    /// Also check that the kubelet's certificate names this DNS name or IP
    /// address. Default none: the chain is verified, the name is not.
    pub kubelet_server_name: Option<String>,
    /// Accept any kubelet certificate. Default false; only for test
    /// clusters whose kubelet serves a self-signed certificate.
    pub skip_kubelet_verification: bool,
    /// How often the list is fetched, on top of the fetches a new pod's
    /// cgroup asks for. Default 10s.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub refresh: Duration,
    /// The most one fetch may take. Default 5s.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub timeout: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            kubelet_url: "https://127.0.0.1:10250".into(),
            token_path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            kubelet_ca_path: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
            kubelet_server_name: None,
            skip_kubelet_verification: false,
            refresh: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

impl KubeletConfig {
    /// Makes relative paths relative to `base`.
    pub fn resolve(&mut self, base: &Path) {
        for p in [&mut self.token_path, &mut self.kubelet_ca_path] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks the values serde cannot.
    pub fn check(&self) -> Result<(), KubeletError> {
        Kubelet::new(self.clone())?;
        if self.refresh < Duration::from_secs(1) {
            return Err(KubeletError::Refresh);
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(KubeletError::TimeoutSetting);
        }
        self.server_name()?;
        Ok(())
    }

    /// `kubelet_server_name`, checked.
    fn server_name(&self) -> Result<Option<ServerName<'static>>, KubeletError> {
        self.kubelet_server_name
            .as_ref()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|source| KubeletError::ServerName {
                    name: name.clone(),
                    source,
                })
            })
            .transpose()
    }
}

/// A kubelet to fetch pod lists from.
#[derive(Debug, Clone)]
pub struct Kubelet {
    config: KubeletConfig,
    uri: hyper::Uri,
}

impl Kubelet {
    /// Checks the URL: `https://HOST[:PORT]`, no user info, no path.
    pub fn new(config: KubeletConfig) -> Result<Self, KubeletError> {
        let url = &config.kubelet_url;
        let bad = |why| KubeletError::Url {
            url: url.clone(),
            why,
        };
        let syntax = |source| KubeletError::UrlSyntax {
            url: url.clone(),
            source,
        };
        let base: hyper::Uri = url.parse().map_err(syntax)?;
        if base.scheme_str() != Some("https") {
            return Err(bad("must be https (the token goes with every request)"));
        }
        match base.authority() {
            Some(a) if !a.as_str().contains('@') && !a.host().is_empty() => {}
            _ => return Err(bad("needs a host and no user info")),
        }
        if !matches!(base.path(), "" | "/") || base.query().is_some() {
            return Err(bad("names the kubelet only, no path or query"));
        }
        let uri = format!("https://{}/pods", base.authority().expect("checked"))
            .parse()
            .map_err(syntax)?;
        Ok(Self { config, uri })
    }

    pub fn config(&self) -> &KubeletConfig {
        &self.config
    }

    /// The URL the pod list is fetched from.
    pub fn url(&self) -> String {
        self.uri.to_string()
    }

    /// One fetch of the pod list, bounded by the configured timeout.
    pub async fn fetch(&self) -> Result<Pods, KubeletError> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.fetch_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(KubeletError::Timeout {
                url: self.url(),
                timeout,
            }),
        }
    }

    async fn fetch_unbounded(&self) -> Result<Pods, KubeletError> {
        let token = format!("Bearer {}", read_token(&self.config.token_path)?);
        let headers = [
            (hyper::header::AUTHORIZATION, token.as_str()),
            (hyper::header::ACCEPT, "application/json"),
        ];
        let body = crate::tls::get(&self.uri, self.tls_config()?, &headers, MAX_POD_LIST_BYTES)
            .await
            .map_err(|source| KubeletError::Fetch {
                url: self.url(),
                source,
            })?;
        Pods::from_kubelet_json(&body).map_err(|source| KubeletError::Pods {
            url: self.url(),
            source,
        })
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, KubeletError> {
        let provider = crate::tls::provider();
        let chain = if self.config.skip_kubelet_verification {
            None
        } else {
            let path = &self.config.kubelet_ca_path;
            let roots = crate::tls::roots_file(path)?;
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|source| KubeletError::Verifier {
                        path: path.clone(),
                        source,
                    })?;
            Some(inner)
        };
        let verifier = KubeletVerifier {
            chain,
            name: self.config.server_name()?,
            algs: provider.signature_verification_algorithms,
        };
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(KubeletError::TlsSettings)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth())
    }
}

/// The token file's content, trimmed; an empty or unreadable file is an
/// error (no anonymous requests).
fn read_token(path: &Path) -> Result<String, KubeletError> {
    let err = |why| KubeletError::Token {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|source| KubeletError::TokenRead {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err("not a bearer token (non-printable characters)"));
    }
    Ok(token.to_owned())
}

/// Verifies the kubelet's chain against the CA (unless
/// `skip_kubelet_verification`), and its name only when one is
/// configured; the handshake's signatures always.
#[derive(Debug)]
struct KubeletVerifier {
    /// `None`: any certificate.
    chain: Option<Arc<WebPkiServerVerifier>>,
    name: Option<ServerName<'static>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for KubeletVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        let name = self.name.as_ref().unwrap_or(server_name);
        match chain.verify_server_cert(end_entity, intermediates, name, ocsp_response, now) {
            // The chain is checked before the name: only the name failed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.name.is_none() => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    handshake_signatures!(algs);
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const FIXTURE: &[u8] = include_bytes!("testdata/kubelet-pods.json");

    /// A CA and a kubelet serving certificate it signed for `names`.
    struct Pki {
        ca_pem: String,
        cert: CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    }

    fn pki(names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert: cert.der().clone(),
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// Serves one connection with `status` and `body`; returns the port
    /// and the request head it saw.
    async fn serve_once(pki: &Pki, status: u16, body: Vec<u8>) -> (u16, Arc<Mutex<String>>) {
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(String::new()));
        let out = seen.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            *out.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.write_all(&body).await;
            let _ = tls.shutdown().await;
        });
        (port, seen)
    }

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(tag: &str, pki: &Pki) -> Self {
            let dir =
                std::env::temp_dir().join(format!("idgate-kubelet-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("token"), "tok-123\n").unwrap();
            std::fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
            Self { dir }
        }

        fn kubelet(&self, port: u16) -> Kubelet {
            Kubelet::new(KubeletConfig {
                kubelet_url: format!("https://127.0.0.1:{port}"),
                token_path: self.dir.join("token"),
                kubelet_ca_path: self.dir.join("ca.crt"),
                ..Default::default()
            })
            .unwrap()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn tls_failed(e: &KubeletError) -> bool {
        matches!(
            e,
            KubeletError::Fetch {
                source: HttpsError::Tls(_),
                ..
            }
        )
    }

    #[tokio::test]
    async fn fetches_the_pods_with_the_token_and_verifies_the_chain() {
        // The certificate names the node, not 127.0.0.1: the chain counts.
        let pki = pki(&["node-1.example"]);
        let files = Files::new("ok", &pki);
        let (port, seen) = serve_once(&pki, 200, FIXTURE.to_vec()).await;
        let pods = files.kubelet(port).fetch().await.unwrap();
        assert_eq!(pods.len(), 4);
        let head = seen.lock().unwrap().clone();
        assert!(head.starts_with("GET /pods HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer tok-123\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_configured_server_name_must_match() {
        let pki = pki(&["node-1.example"]);
        let files = Files::new("name", &pki);
        let (port, _) = serve_once(&pki, 200, FIXTURE.to_vec()).await;
        let mut kubelet = files.kubelet(port);
        kubelet.config.kubelet_server_name = Some("node-2.example".into());
        let e = kubelet.fetch().await.unwrap_err();
        assert!(tls_failed(&e), "{e}");
        let (port, _) = serve_once(&pki, 200, FIXTURE.to_vec()).await;
        let mut kubelet = files.kubelet(port);
        kubelet.config.kubelet_server_name = Some("node-1.example".into());
        assert_eq!(kubelet.fetch().await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn another_ca_fails_unless_verification_is_skipped() {
        let pki = pki(&["127.0.0.1"]);
        let other = self::pki(&["127.0.0.1"]);
        let files = Files::new("ca", &other);
        let (port, _) = serve_once(&pki, 200, FIXTURE.to_vec()).await;
        let e = files.kubelet(port).fetch().await.unwrap_err();
        assert!(tls_failed(&e), "{e}");
        assert!(e.to_string().contains("TLS"), "{e}");
        let (port, _) = serve_once(&pki, 200, FIXTURE.to_vec()).await;
        let mut kubelet = files.kubelet(port);
        kubelet.config.skip_kubelet_verification = true;
        assert_eq!(kubelet.fetch().await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn http_errors_bad_json_missing_token_and_silence_fail() {
        let pki = pki(&["127.0.0.1"]);
        let files = Files::new("fail", &pki);
        let (port, _) = serve_once(&pki, 500, b"oops".to_vec()).await;
        let e = files.kubelet(port).fetch().await.unwrap_err();
        assert!(
            matches!(&e, KubeletError::Fetch { source: HttpsError::Status(s), .. } if s.as_u16() == 500),
            "{e}"
        );
        let (port, _) = serve_once(&pki, 200, b"{\"items\": 3}".to_vec()).await;
        let e = files.kubelet(port).fetch().await.unwrap_err();
        assert!(matches!(e, KubeletError::Pods { .. }), "{e}");

        std::fs::write(files.dir.join("token"), " \n").unwrap();
        let (port, _) = serve_once(&pki, 200, FIXTURE.to_vec()).await;
        let e = files.kubelet(port).fetch().await.unwrap_err();
        assert!(matches!(e, KubeletError::Token { .. }), "{e}");
        std::fs::write(files.dir.join("token"), "tok-123").unwrap();

        // Accepts, never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut kubelet = files.kubelet(port);
        kubelet.config.timeout = Duration::from_millis(300);
        let e = kubelet.fetch().await.unwrap_err();
        assert!(matches!(e, KubeletError::Timeout { .. }), "{e}");
        drop(listener);
        let e = kubelet.fetch().await.unwrap_err();
        assert!(
            matches!(
                e,
                KubeletError::Fetch {
                    source: HttpsError::Connect(_),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn urls_and_durations_are_checked() {
        let check = |url: &str| {
            KubeletConfig {
                kubelet_url: url.into(),
                ..Default::default()
            }
            .check()
        };
        assert!(check("https://127.0.0.1:10250").is_ok());
        assert!(check("https://[::1]:10250/").is_ok());
        for bad in [
            "http://127.0.0.1:10255",
            "https://u:p@127.0.0.1:10250",
            "https://127.0.0.1:10250/pods",
            "127.0.0.1:10250",
        ] {
            let e = check(bad).unwrap_err().to_string();
            assert!(e.contains("kubelet_url"), "{bad}: {e}");
        }
        let k = Kubelet::new(KubeletConfig::default()).unwrap();
        assert_eq!(k.url(), "https://127.0.0.1:10250/pods");
        let e = KubeletConfig {
            refresh: Duration::from_millis(10),
            ..Default::default()
        }
        .check()
        .unwrap_err();
        assert!(matches!(e, KubeletError::Refresh), "{e}");
    }
}
