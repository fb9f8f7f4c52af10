//! An OpenID Connect discovery provider for one local trust domain's
//! JWT-SVIDs, so that verifiers that know OIDC and not SPIFFE (cloud token
//! services, API gateways) can check them: JWT-SVIDs of the domain carry
//! `iss`, and the agent serves the discovery document
//! (`<issuer>/.well-known/openid-configuration`) and the JWK Set it names
//! (`<issuer>/jwks.json`) from the trust domain's bundle as it is now, on
//! a listener of its own, and/or writes both as static files, rewritten
//! whenever the bundle's JWT keys change.
//!
//! Each agent signs with keys of its own, so by default the issuer is
//! this agent's: one issuer URL per agent (host). Several agents can share
//! one issuer when each includes the others' JWK Set files
//! (`include_jwks`, e.g. their `static_dir/jwks.json` on a shared volume):
//! then every agent serves and writes the union, and each signs its own
//! JWT-SVIDs with that issuer.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::serve::{self, Answer};
use crate::svid::{BundleSet, Credentials, OidcConfig, Parts, SvidError};

/// Errors starting the provider.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("OIDC discovery listener {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("OIDC discovery: no bundle for trust domain {0}")]
    NoBundle(String),
    #[error(transparent)]
    Svid(#[from] SvidError),
    #[error("OIDC discovery listener: {0}")]
    Serve(#[from] serve::ServeError),
}

const DISCOVERY: &str = "/.well-known/openid-configuration";
const JWKS: &str = "/jwks.json";
/// The largest included JWK Set file.
const MAX_INCLUDED: u64 = 256 * 1024;
/// How often the included files are read again.
const INCLUDE_EVERY: Duration = Duration::from_secs(5);

/// The two documents of one issuer, made from the bundles as they are.
#[derive(Debug, Clone)]
struct Documents {
    issuer: String,
    trust_domain: String,
    /// The issuer URL's path, without a trailing `/`.
    base: String,
    /// `Cache-Control: max-age` of the served documents, seconds.
    max_age: u64,
    /// The signing keys of the JWK Sets of `include_jwks`.
    included: watch::Receiver<Arc<Vec<Value>>>,
}

impl Documents {
    /// `(discovery document, JWK Set)` of the bundles `set` and the keys
    /// of the other agents sharing the issuer.
    fn render(&self, set: &BundleSet) -> Result<(String, String), OidcError> {
        let bundle = set
            .local
            .get(&self.trust_domain)
            .ok_or_else(|| OidcError::NoBundle(self.trust_domain.clone()))?;
        let mut jwks: Value =
            serde_json::from_str(&bundle.to_json(Parts::Oidc)?).expect("our JWK Set parses");
        let keys = jwks["keys"].as_array_mut().expect("a JWK Set has keys");
        for k in self.included.borrow().iter() {
            if !keys.iter().any(|o| o["kid"] == k["kid"]) {
                keys.push(k.clone());
            }
        }
        let mut algs: Vec<&str> = keys.iter().filter_map(|k| k["alg"].as_str()).collect();
        algs.sort_unstable();
        algs.dedup();
        let discovery = json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}{JWKS}", self.issuer),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "claims_supported": ["sub", "aud", "exp", "iat", "iss"],
        });
        let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON serialises");
        Ok((pretty(&discovery), pretty(&jwks)))
    }

    fn answer(&self, req: &Request<Incoming>, creds: &Credentials) -> Answer {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut a = serve::text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only");
            a.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return a;
        }
        let path = req.uri().path();
        let which = match path.strip_prefix(self.base.as_str()) {
            Some(DISCOVERY) => 0,
            Some(JWKS) => 1,
            _ => {
                return serve::text(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "not found: only {}{DISCOVERY} and {}{JWKS}",
                        self.base, self.base
                    ),
                );
            }
        };
        match self.render(&creds.bundle_set()) {
            Ok(docs) => {
                let body = if which == 0 { docs.0 } else { docs.1 };
                let mut a = serve::reply(StatusCode::OK, "application/json", body);
                let cache = format!("public, max-age={}", self.max_age);
                a.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_str(&cache).expect("ASCII"));
                a
            }
            Err(e) => serve::text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    /// Writes both documents under `dir` when they differ from `last`.
    fn write(
        &self,
        dir: &Path,
        set: &BundleSet,
        last: &mut Option<(String, String)>,
    ) -> Result<(), OidcError> {
        let docs = self.render(set)?;
        if last.as_ref() == Some(&docs) {
            return Ok(());
        }
        let well_known = dir.join(".well-known");
        std::fs::create_dir_all(&well_known).map_err(|e| SvidError::Invalid {
            path: well_known.clone(),
            message: e.to_string(),
        })?;
        crate::svid::write_file(
            &dir.join(JWKS.trim_start_matches('/')),
            docs.1.as_bytes(),
            0o644,
        )?;
        crate::svid::write_file(
            &well_known.join("openid-configuration"),
            docs.0.as_bytes(),
            0o644,
        )?;
        tracing::info!(dir = %dir.display(), "OIDC discovery documents written");
        *last = Some(docs);
        Ok(())
    }
}

/// The signing keys (`kid`, `kty` EC or RSA, `use` sig or none) of a JWK
/// Set file.
fn read_jwks(path: &Path) -> Result<Vec<Value>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_INCLUDED + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_INCLUDED {
        return Err(format!("larger than {MAX_INCLUDED} bytes"));
    }
    let set: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let keys = set["keys"].as_array().ok_or("not a JWK Set (no `keys`)")?;
    Ok(keys
        .iter()
        .filter(|k| {
            k["kid"].is_string()
                && matches!(k["kty"].as_str(), Some("EC" | "RSA"))
                && matches!(k.get("use").and_then(Value::as_str), None | Some("sig"))
        })
        .cloned()
        .collect())
}

/// The included files' keys, each file's last good ones kept (a file that
/// cannot be read is reported once per new error).
struct Included {
    paths: Vec<PathBuf>,
    good: HashMap<PathBuf, Vec<Value>>,
    errors: HashMap<PathBuf, String>,
}

impl Included {
    fn read(&mut self) -> Vec<Value> {
        for path in &self.paths {
            match read_jwks(path) {
                Ok(keys) => {
                    self.errors.remove(path);
                    self.good.insert(path.clone(), keys);
                }
                Err(e) => {
                    if self.errors.get(path) != Some(&e) {
                        tracing::warn!(path = %path.display(), error = %e, "OIDC: an included JWK Set cannot be read; its last keys stay");
                        self.errors.insert(path.clone(), e);
                    }
                }
            }
        }
        self.paths
            .iter()
            .filter_map(|p| self.good.get(p))
            .flatten()
            .cloned()
            .collect()
    }
}

/// A provider with its listener bound and its files written, not yet
/// serving.
pub struct Provider {
    documents: Documents,
    listener: Option<(TcpListener, Option<Arc<rustls::ServerConfig>>)>,
    static_dir: Option<PathBuf>,
    written: Option<(String, String)>,
    included: (Included, watch::Sender<Arc<Vec<Value>>>),
}

/// Binds the listener, reads the certificate and the included JWK Sets,
/// and writes the static files. Call before anything is put in the
/// kernel, so a bad address, file or directory stops the agent cleanly.
pub fn bind(
    config: &OidcConfig,
    trust_domains: &[String],
    creds: &Credentials,
) -> Result<Provider, OidcError> {
    let issuer = config.issuer.clone();
    let base = config
        .issuer_uri()
        .expect("checked with the configuration")
        .path()
        .trim_end_matches('/')
        .to_owned();
    // A verifier caches the JWK Set for at most this long; a new key is
    // in the bundle a third of `ca_ttl` before it signs, so a sixth
    // leaves room, and 5 minutes bounds how long a removed key is trusted.
    let max_age = (creds.config().ca_ttl / 6)
        .min(Duration::from_secs(300))
        .as_secs()
        .max(1);
    let mut included = Included {
        paths: config.include_jwks.clone(),
        good: HashMap::new(),
        errors: HashMap::new(),
    };
    let (included_tx, included_rx) = watch::channel(Arc::new(included.read()));
    let documents = Documents {
        issuer,
        trust_domain: config
            .trust_domain(trust_domains)
            .expect("checked with the configuration"),
        base,
        max_age,
        included: included_rx,
    };
    let listener = match config.address {
        Some(address) => {
            let err = |source| OidcError::Listen { address, source };
            let tls = match (&config.cert, &config.key) {
                (Some(cert), Some(key)) => Some(Arc::new(serve::tls_from_files(cert, key)?)),
                _ => None,
            };
            let l = TcpListener::bind(address).map_err(err)?;
            l.set_nonblocking(true).map_err(err)?;
            Some((l, tls))
        }
        None => None,
    };
    let mut written = None;
    if let Some(dir) = &config.static_dir {
        documents.write(dir, &creds.bundle_set(), &mut written)?;
    }
    Ok(Provider {
        documents,
        listener,
        static_dir: config.static_dir.clone(),
        written,
        included: (included, included_tx),
    })
}

impl Provider {
    /// Serves, reads the included JWK Sets again every 5 s, and rewrites
    /// the files on every change, for as long as the runtime runs.
    pub fn spawn(self, creds: Arc<Credentials>) -> Result<(), OidcError> {
        let documents = Arc::new(self.documents);
        if let Some((listener, tls)) = self.listener {
            let https = tls.is_some();
            let (d, c) = (documents.clone(), creds.clone());
            let address = serve::spawn(listener, tls, "OIDC discovery", move |req| {
                d.answer(req, &c)
            })
            .map_err(|source| OidcError::Listen {
                address: ([0, 0, 0, 0], 0).into(),
                source,
            })?;
            tracing::info!(%address, https, issuer = %documents.issuer, "serving OIDC discovery");
        }
        let (mut included, included_tx) = self.included;
        if !included.paths.is_empty() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(INCLUDE_EVERY).await;
                    let Ok((i, keys)) = tokio::task::spawn_blocking(move || {
                        let keys = included.read();
                        (included, keys)
                    })
                    .await
                    else {
                        tracing::error!("OIDC: the reader of the included JWK Sets was lost");
                        return;
                    };
                    included = i;
                    included_tx.send_if_modified(|old| {
                        let changed = **old != keys;
                        if changed {
                            *old = Arc::new(keys);
                        }
                        changed
                    });
                }
            });
        }
        if let Some(dir) = self.static_dir {
            let mut written = self.written;
            let mut bundles = creds.bundles();
            let mut keys = documents.included.clone();
            tokio::spawn(async move {
                loop {
                    // Without included files the keys never change.
                    tokio::select! {
                        r = bundles.changed() => if r.is_err() { return },
                        Ok(()) = keys.changed() => {}
                    }
                    let set = bundles.borrow_and_update().clone();
                    let (d, dir2) = (documents.clone(), dir.clone());
                    let mut last = written.take();
                    let done = tokio::task::spawn_blocking(move || {
                        let r = d.write(&dir2, &set, &mut last);
                        (r, last)
                    })
                    .await;
                    match done {
                        Ok((r, last)) => {
                            written = last;
                            if let Err(e) = r {
                                tracing::error!(error = %e, "OIDC discovery documents not rewritten");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "OIDC discovery writer lost"),
                    }
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::SvidConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(issuer: &str) -> OidcConfig {
        OidcConfig {
            issuer: issuer.into(),
            trust_domain: None,
            address: Some(([127, 0, 0, 1], 0).into()),
            cert: None,
            key: None,
            static_dir: None,
            include_jwks: Vec::new(),
        }
    }

    fn check(c: &OidcConfig) -> Result<(), String> {
        let svid = SvidConfig {
            oidc: Some(c.clone()),
            ..Default::default()
        };
        svid.check(&["example.org".into()])
            .map_err(|e| e.to_string())
    }

    #[test]
    fn issuers_and_listeners_are_checked() {
        for good in [
            "https://oidc.example.org",
            "https://oidc.example.org:8443/agents/host-1",
            "http://127.0.0.1:8080/x",
            "http://localhost:1",
            "http://[::1]:9/a",
        ] {
            check(&config(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "http://oidc.example.org",
            "https://oidc.example.org/",
            "https://oidc.example.org/a?b=c",
            "https://oidc.example.org/a#f",
            "https://u@oidc.example.org",
            "oidc.example.org",
            "ftp://oidc.example.org",
            "https://",
        ] {
            let e = check(&config(bad)).unwrap_err();
            assert!(
                e.contains("svid.oidc") && e.contains("issuer"),
                "{bad}: {e}"
            );
        }
        assert!(check(&config(&format!("https://a.org/{}", "x".repeat(2000)))).is_err());
        let mut c = config("https://a.org");
        c.trust_domain = Some("other.org".into());
        let e = check(&c).unwrap_err();
        assert!(e.contains("not in `trust_domains`"), "{e}");
        c.trust_domain = None;
        c.address = Some(([0, 0, 0, 0], 8080).into());
        let e = check(&c).unwrap_err();
        assert!(e.contains("not loopback"), "{e}");
        c.cert = Some("c".into());
        assert!(check(&c).is_err());
        c.key = Some("k".into());
        check(&c).unwrap();
        c.address = None;
        assert!(check(&c).is_err());
        c.cert = None;
        c.key = None;
        let e = check(&c).unwrap_err();
        assert!(e.contains("static_dir"), "{e}");
        c.static_dir = Some("d".into());
        check(&c).unwrap();
    }

    async fn request(port: u16, raw: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        // The server may answer (and close) before it has read it all.
        let _ = s.write_all(raw).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn body(answer: &str) -> serde_json::Value {
        let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
    }

    #[tokio::test]
    async fn serves_and_writes_the_documents_and_survives_bad_requests() {
        let state = std::env::temp_dir().join(format!("idgate-oidc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let creds =
            Credentials::load(&SvidConfig::default(), &["example.org".into()], &state).unwrap();
        let mut c = config("https://oidc.example.org/agents/h1");
        c.static_dir = Some(state.join("www"));
        let provider = bind(&c, &["example.org".into()], &creds).unwrap();
        let port = provider
            .listener
            .as_ref()
            .unwrap()
            .0
            .local_addr()
            .unwrap()
            .port();
        provider.spawn(creds.clone()).unwrap();

        let get =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let a = request(
            port,
            get("/agents/h1/.well-known/openid-configuration").as_bytes(),
        )
        .await;
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        assert!(a.contains("content-type: application/json"), "{a}");
        assert!(a.contains("cache-control: public, max-age=300"), "{a}");
        let d = body(&a);
        assert_eq!(d["issuer"], "https://oidc.example.org/agents/h1");
        assert_eq!(
            d["jwks_uri"],
            "https://oidc.example.org/agents/h1/jwks.json"
        );
        assert_eq!(d["id_token_signing_alg_values_supported"], json!(["ES256"]));
        let jwks = body(&request(port, get("/agents/h1/jwks.json").as_bytes()).await);
        let kid = creds.bundle_set().local["example.org"].jwt_authorities[0]
            .kid
            .clone();
        assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
        assert_eq!(jwks["keys"][0]["use"], "sig");
        // The static files hold the same documents.
        let www = state.join("www");
        let file = |p: &str| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(www.join(p)).unwrap())
                .unwrap()
        };
        assert_eq!(file(".well-known/openid-configuration"), d);
        assert_eq!(file("jwks.json"), jwks);

        // Bad requests get a clear status, and the next one is served.
        let big = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
        for (raw, status) in [
            (get("/.well-known/openid-configuration"), "404"),
            (get("/agents/h1/jwks.json/more"), "404"),
            ("POST /agents/h1/jwks.json HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".into(), "405"),
            ("DELETE /agents/h1/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), "405"),
            ("\x16\x03\x01 not http at all\r\n\r\n".into(), "400"),
            (big, "431"),
            (format!("GET /x HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "b".repeat(64 * 1024)), "431"),
        ] {
            let a = request(port, raw.as_bytes()).await;
            assert!(a.starts_with(&format!("HTTP/1.1 {status}")), "{}: {a}", &raw[..raw.len().min(60)]);
        }
        let head = request(
            port,
            b"HEAD /agents/h1/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let a = request(port, get("/agents/h1/jwks.json?x=1").as_bytes()).await;
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");

        // A rotation reaches the served JWK Set at once and the files soon.
        let later = std::time::SystemTime::now() + Duration::from_secs(13 * 3600);
        creds.tick(later);
        let jwks = body(&request(port, get("/agents/h1/jwks.json").as_bytes()).await);
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "{jwks}");
        let mut tries = 0;
        while file("jwks.json") != jwks {
            tries += 1;
            assert!(tries < 100, "the file was not rewritten");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_dir_all(&state);
    }

    #[tokio::test]
    async fn agents_sharing_an_issuer_serve_each_others_keys() {
        let state = std::env::temp_dir().join(format!("idgate-oidc-shared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let td = ["example.org".to_owned()];
        let agent = |name: &str, other: &str| {
            let creds = Credentials::load(&SvidConfig::default(), &td, &state.join(name)).unwrap();
            let mut c = config("https://oidc.example.org");
            c.address = None;
            c.static_dir = Some(state.join(name).join("www"));
            c.include_jwks = vec![state.join(other).join("www/jwks.json")];
            (creds, c)
        };
        let (a, config_a) = agent("a", "b");
        let (b, config_b) = agent("b", "a");
        let kid = |c: &Credentials| {
            c.bundle_set().local["example.org"].jwt_authorities[0]
                .kid
                .clone()
        };
        let kids = |dir: &str| -> Vec<String> {
            let path = state.join(dir).join("www/jwks.json");
            let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_owned())
                .collect()
        };
        // a starts first: b's file is missing, a serves its own key.
        bind(&config_a, &td, &a).unwrap().spawn(a.clone()).unwrap();
        assert_eq!(kids("a"), [kid(&a)]);
        bind(&config_b, &td, &b).unwrap().spawn(b.clone()).unwrap();
        assert_eq!(kids("b"), [kid(&b), kid(&a)]);
        // a reads b's file again within 5 s and rewrites its own.
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        while kids("a") != [kid(&a), kid(&b)] {
            assert!(std::time::Instant::now() < deadline, "{:?}", kids("a"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A broken file keeps its last keys.
        std::fs::write(state.join("b/www/jwks.json"), "not json").unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(kids("a"), [kid(&a), kid(&b)]);
        let _ = std::fs::remove_dir_all(&state);
    }
}
