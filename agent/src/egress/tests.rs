//! The broker end to end, in-process: a test CA's HTTPS upstream that
//! wants a key, a stub directory, the broker serving listeners at slot 5's
//! address `127.53.0.5`, and clients that trust the egress CA.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

use super::*;
use crate::identity::SpiffeId;

const NET: u8 = 53;
const SLOT: u32 = 5;
const SECRET: &str = "sk-test-secret-7f3a";
/// Every wait of a test is bounded by this.
const BOUND: Duration = Duration::from_secs(5);

/// The upstream's names: all on the upstream's address but `down.test`.
const API: &str = "api.test";
const DOWN: &str = "down.test";
const OTHER: &str = "other.test";
const JWT: &str = "jwt.test";
/// Hosts of `oauth` credentials, and their token endpoint's host.
const OAUTH: &str = "oauth.test";
const OAUTH_DENIED: &str = "oauth-denied.test";
const OAUTH_SLOW: &str = "oauth-slow.test";
const STS: &str = "sts.test";
/// The access token the token endpoint issues.
const ACCESS_TOKEN: &str = "at-7e11";

struct Stub {
    id: SpiffeId,
    credentials: Arc<[Credential]>,
    addrs: HashMap<&'static str, IpAddr>,
}

impl Directory for Stub {
    fn identity(&self, slot: u32) -> Option<(SpiffeId, Arc<[Credential]>)> {
        (slot == SLOT).then(|| (self.id.clone(), self.credentials.clone()))
    }

    fn may_reach(&self, slot: u32, host: &str, port: u16) -> bool {
        slot == SLOT && host == OTHER && port == 443
    }

    fn resolve(&self, host: &str) -> BoxFuture<'static, Result<Vec<IpAddr>, DirectoryError>> {
        let found = self.addrs.get(host).copied();
        let host = host.to_owned();
        Box::pin(async move {
            found
                .map(|ip| vec![ip])
                .ok_or_else(|| format!("{host}: no such name").into())
        })
    }

    fn jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
    ) -> BoxFuture<'static, Result<String, DirectoryError>> {
        let jwt = format!(
            "jwt.{}.{}",
            id.path().trim_start_matches('/'),
            audience.join(",")
        );
        Box::pin(async move { Ok(jwt) })
    }
}

/// What the upstream was sent: its requests count.
struct Upstream {
    addr: SocketAddr,
    /// Requests to the API (not to the token endpoint).
    requests: AtomicU64,
    /// Requests to the token endpoint.
    token_requests: AtomicU64,
    /// `/sse` sends its second event when notified.
    sse_next: Notify,
}

struct World {
    dir: PathBuf,
    broker: Arc<Broker>,
    _serving: Serving,
    tls: SocketAddr,
    http: SocketAddr,
    upstream: Arc<Upstream>,
    test_ca: Vec<u8>,
    records: mpsc::Receiver<BrokerRecord>,
}

fn credential(name: &str, host: &str, secret_file: &std::path::Path) -> Credential {
    Credential {
        name: Arc::from(name),
        host: Arc::from(host),
        source: CredentialSource::Header {
            header: http::HeaderName::from_static("x-api-key"),
            secret_file: secret_file.to_owned(),
            prefix: String::new(),
        },
        methods: vec![Method::GET, Method::POST],
        paths: vec!["/v1".into(), "/ws".into()],
        http: false,
    }
}

/// A credential of kind `oauth` whose token endpoint is `path` on
/// `sts.test:port` (the upstream), presenting a JWT-SVID for `sts`.
fn oauth_credential(
    name: &str,
    host: &str,
    path: &str,
    port: u16,
    secret_file: &std::path::Path,
) -> Credential {
    let client = crate::policy::OAuthClient {
        token_endpoint: format!("https://{STS}:{port}{path}").parse().unwrap(),
        grant: crate::policy::OAuthGrant::TokenExchange,
        audience: vec!["sts".into()],
        scope: Some("api".into()),
        resource: None,
        token_audience: None,
        client_id: None,
    };
    Credential {
        source: CredentialSource::OAuth(Arc::new(client)),
        ..credential(name, host, secret_file)
    }
}

impl World {
    async fn new(name: &str, secret_mode: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("idgate-egress-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The upstream's own CA, trusted through `extra_roots`.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
        std::fs::write(dir.join("test-ca.pem"), ca_cert.pem()).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(
            [API, OTHER, DOWN, JWT, OAUTH, OAUTH_DENIED, OAUTH_SLOW, STS]
                .map(Into::into)
                .to_vec(),
        )
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
        let upstream = serve_upstream(leaf.der().to_vec(), leaf_key.serialize_der()).await;

        let secret = dir.join("key");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(secret_mode)).unwrap();
        let config = EgressConfig {
            enabled: true,
            extra_roots: vec![dir.join("test-ca.pem")],
            upstream_timeout: Duration::from_millis(500),
            ..EgressConfig::default()
        };
        config.check().unwrap();
        let ca = EgressCa::open_with_roots(&dir.join("egress"), &config, vec![], SystemTime::now())
            .unwrap();
        let stub = Stub {
            id: "spiffe://example.org/agent".parse().unwrap(),
            credentials: vec![
                credential("api", API, &secret),
                credential("down", DOWN, &secret),
                Credential {
                    source: CredentialSource::JwtSvid {
                        audience: vec!["aud1".into()],
                    },
                    ..credential("jwt", JWT, &secret)
                },
                oauth_credential("oauth", OAUTH, "/token", upstream.addr.port(), &secret),
                oauth_credential(
                    "oauth-denied",
                    OAUTH_DENIED,
                    "/token-denied",
                    upstream.addr.port(),
                    &secret,
                ),
                oauth_credential(
                    "oauth-slow",
                    OAUTH_SLOW,
                    "/token-hang",
                    upstream.addr.port(),
                    &secret,
                ),
            ]
            .into(),
            addrs: HashMap::from([
                (API, upstream.addr.ip()),
                (OTHER, upstream.addr.ip()),
                (JWT, upstream.addr.ip()),
                (OAUTH, upstream.addr.ip()),
                (OAUTH_DENIED, upstream.addr.ip()),
                (OAUTH_SLOW, upstream.addr.ip()),
                (STS, upstream.addr.ip()),
                // Nothing listens there.
                (DOWN, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
            ]),
        };
        // Constrained to the credential hosts, as the daemon does.
        ca.constrain(
            &stub
                .credentials
                .iter()
                .map(|c| c.host.to_string())
                .collect(),
        )
        .unwrap();
        let (tx, records) = mpsc::channel(1000);
        let mut broker = Broker::new(&config, ca, Arc::new(stub), tx).unwrap();
        Arc::get_mut(&mut broker).unwrap().upstream_ports.tls = upstream.addr.port();
        let slot_ip = Ipv4Addr::from(idgate_common::dns_address::of_slot(NET.into(), SLOT));
        let tls = std::net::TcpListener::bind((slot_ip, 0)).unwrap();
        let http = std::net::TcpListener::bind((slot_ip, 0)).unwrap();
        let (tls_at, http_at) = (tls.local_addr().unwrap(), http.local_addr().unwrap());
        let serving = broker.serve(tls, http, NET).unwrap();
        Self {
            dir,
            broker,
            _serving: serving,
            tls: tls_at,
            http: http_at,
            upstream,
            test_ca: ca_cert.der().to_vec(),
            records,
        }
    }

    /// A TLS connection to the broker with `sni` (none for an address),
    /// trusting `roots` (the egress CA's when empty).
    async fn connect(
        &self,
        sni: ServerName<'static>,
        alpn: &[&[u8]],
        roots: &[Vec<u8>],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut store = rustls::RootCertStore::empty();
        let certs = if roots.is_empty() {
            self.broker.ca().certificates()
        } else {
            roots.to_vec()
        };
        for c in certs {
            store.add(c.into()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(self.tls).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(sni, tcp)
            .await
    }

    /// An HTTP/1.1 request over a new TLS connection for `sni`.
    async fn h1(&self, sni: &str, request: Request<Empty<Bytes>>) -> Response<Incoming> {
        let io = self.connect(name(sni), &[b"http/1.1"], &[]).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        bounded(send.send_request(request)).await.unwrap()
    }

    /// An HTTP/2 request over a new TLS connection for `sni`.
    async fn h2(&self, sni: &str, request: Request<Empty<Bytes>>) -> Response<Incoming> {
        let io = self.connect(name(sni), &[b"h2"], &[]).await.unwrap();
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        bounded(send.send_request(request)).await.unwrap()
    }

    /// The next record.
    async fn record(&mut self) -> BrokerRecord {
        bounded(self.records.recv()).await.unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn name(s: &str) -> ServerName<'static> {
    ServerName::try_from(s.to_owned()).unwrap()
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f).await.expect("took too long")
}

fn get(uri: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(uri)
        .header("host", host)
        .header("x-api-key", "placeholder")
        .body(Empty::new())
        .unwrap()
}

async fn text(response: Response<Incoming>) -> String {
    let body = bounded(response.into_body().collect()).await.unwrap();
    String::from_utf8(body.to_bytes().to_vec()).unwrap()
}

/// The upstream "API": wants `x-api-key: SECRET`; `/v1/echo` answers with
/// the keys and host it got, `/v1/sse` sends an event, waits, sends
/// another; `/v1/hang` never answers; `/ws` upgrades and echoes.
async fn serve_upstream(cert: Vec<u8>, key: Vec<u8>) -> Arc<Upstream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = Arc::new(Upstream {
        addr: listener.local_addr().unwrap(),
        requests: AtomicU64::new(0),
        token_requests: AtomicU64::new(0),
        sse_next: Notify::new(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let up = upstream.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, up) = (acceptor.clone(), up.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |r| answer(up.clone(), r));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    upstream
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn answer(
    up: Arc<Upstream>,
    mut request: Request<Incoming>,
) -> Result<Response<TestBody>, std::convert::Infallible> {
    if request.uri().path().starts_with("/token") {
        return Ok(token_endpoint(up, request).await);
    }
    up.requests.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<_> = request
        .headers()
        .get_all("x-api-key")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let full = |status: StatusCode, text: String| {
        let mut r = Response::new(http_body_util::Full::new(Bytes::from(text)).boxed());
        *r.status_mut() = status;
        Ok(r)
    };
    let bearer = request
        .headers()
        .get_all("authorization")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    if bearer == ["Bearer jwt.agent.aud1"] && keys.is_empty() {
        return full(StatusCode::OK, "bearer ok".into());
    }
    if bearer == [format!("Bearer {ACCESS_TOKEN}")] && keys.is_empty() {
        return full(StatusCode::OK, "access token ok".into());
    }
    if keys != [SECRET] {
        return full(StatusCode::UNAUTHORIZED, format!("keys {keys:?}"));
    }
    match request.uri().path() {
        "/v1/echo" => {
            let host = request
                .headers()
                .get("host")
                .map(|h| h.to_str().unwrap().to_owned())
                .or_else(|| request.uri().authority().map(|a| a.to_string()));
            full(
                StatusCode::OK,
                format!("key ok; host {}", host.unwrap_or_default()),
            )
        }
        "/v1/sse" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: 1\n\n")))).await;
                up.sse_next.notified().await;
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: 2\n\n")))).await;
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(BodyExt::boxed(body)))
        }
        "/v1/hang" => std::future::pending().await,
        "/ws" => {
            let on = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 4];
                io.read_exact(&mut buf).await.unwrap();
                io.write_all(&buf).await.unwrap();
            });
            let mut r = Response::new(Empty::new().boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            r.headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            Ok(r)
        }
        _ => full(StatusCode::NOT_FOUND, String::new()),
    }
}

/// The token endpoint stand-in: `/token` takes a token exchange of the
/// stub's JWT-SVID for `sts` (after a pause, so that requests overlap)
/// and issues [`ACCESS_TOKEN`]; `/token-hang` never answers; any other
/// refuses every request.
async fn token_endpoint(up: Arc<Upstream>, request: Request<Incoming>) -> Response<TestBody> {
    up.token_requests.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_owned();
    if path == "/token-hang" {
        return std::future::pending().await;
    }
    let form = request.into_body().collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = form_urlencoded::parse(&form).into_owned().collect();
    let (status, answer) = if path == "/token"
        && form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
        && form["subject_token"] == "jwt.agent.sts"
        && form["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
        && form["scope"] == "api"
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = format!(
            r#"{{"access_token":"{ACCESS_TOKEN}","token_type":"Bearer","expires_in":300}}"#
        );
        (StatusCode::OK, answer)
    } else {
        let answer = r#"{"error":"invalid_client","error_description":"wrong audience"}"#;
        (StatusCode::UNAUTHORIZED, answer.to_owned())
    };
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(answer)).boxed());
    *r.status_mut() = status;
    r
}

#[tokio::test]
async fn http1_and_http2_requests_get_the_key() {
    let mut w = World::new("key", 0o600).await;
    let r = w.h1(API, get("/v1/echo", API)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        text(r).await,
        format!("key ok; host {API}:{}", w.upstream.addr.port())
    );
    let rec = w.record().await;
    assert_eq!(rec.outcome, Outcome::Forwarded);
    assert_eq!((rec.slot, rec.status), (Some(SLOT), Some(200)));
    assert_eq!(rec.credential.as_deref(), Some("api"));
    assert_eq!(rec.host.as_deref(), Some(API));
    assert_eq!(rec.path.as_deref(), Some("/v1/echo"));
    assert!(rec.bytes_down > 0);
    assert!(!format!("{rec:?}").contains(SECRET));

    let request = Request::builder()
        .uri(format!("https://{API}/v1/echo"))
        .header("x-api-key", "placeholder")
        .header("x-api-key", "another")
        .body(Empty::new())
        .unwrap();
    let r = w.h2(API, request).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(text(r).await.starts_with("key ok"));
    assert_eq!(w.record().await.outcome, Outcome::Forwarded);
}

#[tokio::test]
async fn another_host_than_the_server_name_is_refused() {
    let mut w = World::new("host", 0o600).await;
    let r = w.h1(API, get("/v1/echo", OTHER)).await;
    assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(
        text(r)
            .await
            .contains("host other.test is not the TLS server name api.test")
    );
    let request = Request::builder()
        .uri(format!("https://{OTHER}/v1/echo"))
        .body(Empty::new())
        .unwrap();
    let r = w.h2(API, request).await;
    assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
    let rec = w.record().await;
    assert!(matches!(rec.outcome, Outcome::Refused(_)), "{rec:?}");
    assert_eq!(w.upstream.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn method_path_and_connect_rules() {
    let mut w = World::new("rules", 0o600).await;
    let mut request = get("/v1/echo", API);
    *request.method_mut() = Method::DELETE;
    let r = w.h1(API, request).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        text(r)
            .await
            .contains("method DELETE is not allowed for credential api")
    );
    let r = w.h1(API, get("/admin", API)).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        text(r)
            .await
            .contains("path /admin is not allowed for credential api")
    );
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri("evil.test:443")
        .header("host", "evil.test:443")
        .body(Empty::new())
        .unwrap();
    let r = w.h1(API, connect).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    for _ in 0..3 {
        let rec = w.record().await;
        assert!(matches!(rec.outcome, Outcome::Refused(_)), "{rec:?}");
    }
    assert_eq!(w.upstream.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_in_time() {
    let mut w = World::new("fail", 0o600).await;
    let r = w.h1(DOWN, get("/v1/echo", DOWN)).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let reason = text(r).await;
    assert!(reason.contains("upstream down.test"), "{reason}");
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(matches!(w.record().await.outcome, Outcome::Failed(_)));

    let start = Instant::now();
    let r = w.h1(API, get("/v1/hang", API)).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(text(r).await.contains("did not answer within 500ms"));
    // The broker still serves.
    let r = w.h2(API, get("/v1/echo", API)).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn server_sent_events_flow_one_by_one() {
    let w = World::new("sse", 0o600).await;
    let r = w.h1(API, get("/v1/sse", API)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body();
    let first = bounded(body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 1\n\n");
    // The second is only sent now: the first came through alone.
    w.upstream.sse_next.notify_one();
    let second = bounded(body.frame()).await.unwrap().unwrap();
    assert_eq!(second.into_data().unwrap(), "data: 2\n\n");
}

#[tokio::test]
async fn upgrades_are_spliced() {
    let w = World::new("ws", 0o600).await;
    let request = Request::builder()
        .uri("/ws")
        .header("host", API)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(Empty::new())
        .unwrap();
    let r = w.h1(API, request).await;
    assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(bounded(hyper::upgrade::on(r)).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    bounded(io.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn tls_without_a_server_name_or_for_another_is_refused() {
    let mut w = World::new("sni", 0o600).await;
    let ip = ServerName::IpAddress(Ipv4Addr::new(127, 53, 0, 5).into());
    assert!(bounded(w.connect(ip, &[], &[])).await.is_err());
    let rec = w.record().await;
    assert_eq!(
        rec.outcome,
        Outcome::Refused("TLS ClientHello without a server name (SNI)".into())
    );
    assert_eq!(rec.slot, Some(SLOT));
    assert!(
        bounded(w.connect(name("evil.test"), &[], &[]))
            .await
            .is_err()
    );
    let rec = w.record().await;
    assert!(
        matches!(rec.outcome, Outcome::Refused(ref r) if r.contains("evil.test")),
        "{rec:?}"
    );
    // Not TLS at all.
    let mut tcp = TcpStream::connect(w.tls).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: api.test\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    // Closed, maybe with a reset: nothing comes back.
    let _ = bounded(tcp.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    assert!(matches!(w.record().await.outcome, Outcome::Refused(_)));
}

#[tokio::test]
async fn another_reachable_name_is_passed_through() {
    let mut w = World::new("pass", 0o600).await;
    // The upstream's own certificate, by the test CA: not terminated.
    let roots = [w.test_ca.clone()];
    let io = w
        .connect(name(OTHER), &[b"http/1.1"], &roots)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = bounded(send.send_request(get("/v1/echo", OTHER)))
        .await
        .unwrap();
    // Nothing added: the placeholder reached the upstream.
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(text(r).await, "keys [\"placeholder\"]");
    drop(send);
    let rec = w.record().await;
    assert_eq!(rec.outcome, Outcome::Passthrough);
    assert_eq!(rec.sni.as_deref(), Some(OTHER));
    assert!(rec.bytes_up > 0 && rec.bytes_down > 0);
}

#[tokio::test]
async fn a_secret_file_others_may_read_is_refused() {
    let mut w = World::new("mode", 0o644).await;
    let r = w.h1(API, get("/v1/echo", API)).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let reason = text(r).await;
    assert!(
        reason.contains("0644") && !reason.contains(SECRET),
        "{reason}"
    );
    assert_eq!(w.upstream.requests.load(Ordering::SeqCst), 0);
    let rec = w.record().await;
    assert!(matches!(rec.outcome, Outcome::Failed(_)));
    assert!(!format!("{rec:?}").contains(SECRET));
}

#[tokio::test]
async fn plain_http_needs_a_credential_that_allows_it() {
    let mut w = World::new("plain", 0o600).await;
    let tcp = TcpStream::connect(w.http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = bounded(send.send_request(get("/v1/echo", API)))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        text(r)
            .await
            .contains("no credential for api.test over plain HTTP")
    );
    assert!(matches!(w.record().await.outcome, Outcome::Refused(_)));
}

#[tokio::test]
async fn a_connection_to_no_slot_address_is_refused() {
    let mut w = World::new("noslot", 0o600).await;
    // Served listeners whose address is not in 127.53/16.
    let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = tls.local_addr().unwrap();
    let _serving = w.broker.serve(tls, http, NET).unwrap();
    let mut tcp = TcpStream::connect(at).await.unwrap();
    let mut rest = Vec::new();
    let _ = bounded(tcp.read_to_end(&mut rest)).await;
    let rec = w.record().await;
    assert_eq!(rec.slot, None);
    assert!(matches!(rec.outcome, Outcome::Refused(_)));
}

#[tokio::test]
async fn a_jwt_svid_credential_replaces_the_authorization() {
    let mut w = World::new("jwt", 0o600).await;
    let mut request = get("/v1/echo", JWT);
    request.headers_mut().remove("x-api-key");
    request
        .headers_mut()
        .insert("authorization", "Bearer placeholder".parse().unwrap());
    let r = w.h2(JWT, request).await;
    let status = r.status();
    assert_eq!(
        (status, text(r).await.as_str()),
        (StatusCode::OK, "bearer ok")
    );
    assert_eq!(w.record().await.credential.as_deref(), Some("jwt"));
}

#[tokio::test]
async fn an_oauth_credential_gets_one_token_and_keeps_it() {
    let mut w = World::new("oauth", 0o600).await;
    let request = || {
        let mut r = get("/v1/echo", OAUTH);
        r.headers_mut().remove("x-api-key");
        r.headers_mut()
            .insert("authorization", "Bearer placeholder".parse().unwrap());
        r
    };
    // Three requests at once wait for one fetch.
    let (a, b, c) = tokio::join!(
        w.h2(OAUTH, request()),
        w.h2(OAUTH, request()),
        w.h1(OAUTH, request())
    );
    for r in [a, b, c] {
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(text(r).await, "access token ok");
    }
    // A later one uses the kept token.
    let r = w.h1(OAUTH, request()).await;
    assert_eq!(text(r).await, "access token ok");
    assert_eq!(w.upstream.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(w.upstream.requests.load(Ordering::SeqCst), 4);
    for _ in 0..4 {
        let rec = w.record().await;
        assert_eq!(rec.outcome, Outcome::Forwarded);
        assert_eq!(rec.credential.as_deref(), Some("oauth"));
        assert!(!format!("{rec:?}").contains(ACCESS_TOKEN));
    }
}

#[tokio::test]
async fn a_token_endpoint_that_refuses_gives_a_502_that_names_it() {
    let mut w = World::new("oauth-denied", 0o600).await;
    for _ in 0..2 {
        let r = w.h1(OAUTH_DENIED, get("/v1/echo", OAUTH_DENIED)).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let reason = text(r).await;
        let endpoint = format!("https://{STS}:{}/token-denied", w.upstream.addr.port());
        assert_eq!(
            reason,
            format!(
                "idgate: credential oauth-denied: token endpoint {endpoint} answered 401: invalid_client: wrong audience\n"
            )
        );
        assert!(!reason.contains("jwt."), "{reason}");
        let rec = w.record().await;
        assert!(matches!(rec.outcome, Outcome::Failed(_)), "{rec:?}");
        assert_eq!(rec.status, Some(502));
    }
    // A failure is not kept: each request asked again.
    assert_eq!(w.upstream.token_requests.load(Ordering::SeqCst), 2);
    assert_eq!(w.upstream.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_token_endpoint_that_does_not_answer_gives_a_504_in_time() {
    let mut w = World::new("oauth-slow", 0o600).await;
    let start = Instant::now();
    let r = w.h2(OAUTH_SLOW, get("/v1/echo", OAUTH_SLOW)).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() < Duration::from_secs(3));
    let endpoint = format!("https://{STS}:{}/token-hang", w.upstream.addr.port());
    assert_eq!(
        text(r).await,
        format!(
            "idgate: credential oauth-slow: token endpoint {endpoint} gave no token within 500ms\n"
        )
    );
    assert!(matches!(w.record().await.outcome, Outcome::Failed(_)));
    // The broker still serves.
    let r = w.h2(API, get("/v1/echo", API)).await;
    assert_eq!(r.status(), StatusCode::OK);
}
