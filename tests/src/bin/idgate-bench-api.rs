//! The upstream "API" of `cargo xtask bench`'s credential broker section:
//! an HTTPS server (hyper, rustls; HTTP/1.1 and HTTP/2 by ALPN) with a
//! certificate for `--name` from a test CA of its own, which requires an
//! API key in a header, as the model APIs do.
//!
//! ```text
//! idgate-bench-api --listen IP:PORT [--listen IP:PORT ...] --name NAME
//!                  --header HEADER --key-file FILE --ca-out FILE --ready FILE
//! ```
//!
//! It writes its CA's certificate (PEM) to `--ca-out`, listens, then
//! writes `--ready`. A request without HEADER equal to the key in
//! `--key-file` (less a trailing newline) gets 401. With it:
//! - `GET /small`: a short JSON body;
//! - `GET /bytes?n=N`: N bytes (at most [`MAX_BYTES`]);
//! - `GET /stream?chunks=C&interval_ms=I`: server-sent events, C events I
//!   ms apart (the first at once), each `data: {"i":K,"t":NS}`, NS the
//!   server's `CLOCK_MONOTONIC` in nanoseconds when it sent the event.
//!
//! It runs until its stdin ends, then prints one JSON line: for each
//! listening address, the connections it took by protocol (`h2`,
//! `http/1.1`) and the requests it served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use idgate_tests::monotonic_ns;
use idgate_tests::pki::TestCa;

/// The largest body `/bytes` sends.
const MAX_BYTES: usize = 64 << 20;
/// The most events `/stream` sends.
const MAX_CHUNKS: u64 = 10_000;

struct Args {
    listen: Vec<SocketAddr>,
    name: String,
    header: String,
    key_file: String,
    ca_out: String,
    ready: String,
}

/// What every connection shares.
struct Shared {
    header: http::HeaderName,
    key: http::HeaderValue,
    /// `MAX_BYTES` bytes, sliced for `/bytes`.
    big: Bytes,
}

/// One listening address's counts.
#[derive(Default)]
struct Counts {
    h2: AtomicU64,
    http1: AtomicU64,
    requests: AtomicU64,
}

type ResBody = BoxBody<Bytes, Infallible>;

fn main() {
    if let Err(e) = run() {
        eprintln!("idgate-bench-api: {e}");
        std::process::exit(1);
    }
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = Vec::new();
    let (mut name, mut header, mut key_file, mut ca_out, mut ready) =
        (None, None, None, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen.push(value.parse().map_err(|e| format!("--listen: {e}"))?),
            "--name" => name = Some(value),
            "--header" => header = Some(value),
            "--key-file" => key_file = Some(value),
            "--ca-out" => ca_out = Some(value),
            "--ready" => ready = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let need = |v: Option<String>, flag: &str| v.ok_or(format!("{flag} is required"));
    if listen.is_empty() {
        return Err("--listen is required".into());
    }
    Ok(Args {
        listen,
        name: need(name, "--name")?,
        header: need(header, "--header")?,
        key_file: need(key_file, "--key-file")?,
        ca_out: need(ca_out, "--ca-out")?,
        ready: need(ready, "--ready")?,
    })
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    let key =
        std::fs::read_to_string(&args.key_file).map_err(|e| format!("{}: {e}", args.key_file))?;
    let key = key.strip_suffix('\n').unwrap_or(&key);
    let shared = Arc::new(Shared {
        header: http::HeaderName::from_bytes(args.header.as_bytes())
            .map_err(|e| format!("--header: {e}"))?,
        key: http::HeaderValue::from_str(key).map_err(|e| format!("the key: {e}"))?,
        big: Bytes::from(vec![b'x'; MAX_BYTES]),
    });
    let counts: Vec<Arc<Counts>> = args.listen.iter().map(|_| Arc::default()).collect();
    let ca = TestCa::new("idgate bench upstream CA");
    std::fs::write(&args.ca_out, &ca.pem).map_err(|e| format!("{}: {e}", args.ca_out))?;
    let leaf = ca.leaf(&[&args.name]);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der.into()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.into()),
    )
    .map_err(|e| format!("TLS: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        for (addr, counts) in args.listen.iter().zip(&counts) {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("listening on {addr}: {e}"))?;
            tokio::spawn(accept(
                listener,
                acceptor.clone(),
                shared.clone(),
                counts.clone(),
            ));
        }
        std::fs::write(&args.ready, "").map_err(|e| format!("{}: {e}", args.ready))?;
        // Until stdin ends.
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await
            .map_err(|e| format!("stdin: {e}"))?
            .map_err(|e| format!("stdin: {e}"))?;
        Ok::<_, String>(())
    })?;
    let out: serde_json::Map<String, serde_json::Value> = args
        .listen
        .iter()
        .zip(&counts)
        .map(|(addr, c)| {
            let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let v = serde_json::json!({
                "h2": n(&c.h2),
                "http/1.1": n(&c.http1),
                "requests": n(&c.requests),
            });
            (addr.to_string(), v)
        })
        .collect();
    println!("{}", serde_json::Value::Object(out));
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

async fn accept(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    counts: Arc<Counts>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let counter = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => &counts.h2,
                _ => &counts.http1,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let service = hyper::service::service_fn(move |request| {
                counts.requests.fetch_add(1, Ordering::Relaxed);
                let response = respond(&shared, request);
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn respond(shared: &Shared, request: Request<Incoming>) -> Response<ResBody> {
    if request.headers().get(&shared.header) != Some(&shared.key) {
        return reply(
            StatusCode::UNAUTHORIZED,
            "{\"error\":\"missing or wrong key\"}",
        );
    }
    let query = |key: &str| -> Option<u64> {
        request
            .uri()
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    match request.uri().path() {
        "/small" => reply(
            StatusCode::OK,
            "{\"id\":\"bench\",\"type\":\"message\",\"content\":[{\"type\":\"text\",\"text\":\"ok\"}]}",
        ),
        "/bytes" => {
            let n = query("n").unwrap_or(0).min(MAX_BYTES as u64) as usize;
            Response::new(Full::new(shared.big.slice(..n)).boxed())
        }
        "/stream" => {
            let events = Events {
                left: query("chunks").unwrap_or(1).min(MAX_CHUNKS),
                sent: 0,
                tick: tokio::time::interval(Duration::from_millis(
                    query("interval_ms").unwrap_or(20),
                )),
            };
            let mut response = Response::new(events.boxed());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            response
        }
        _ => reply(StatusCode::NOT_FOUND, "{\"error\":\"no such path\"}"),
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<ResBody> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The body of `/stream`: an event at each tick, stamped when it is sent.
struct Events {
    left: u64,
    sent: u64,
    tick: tokio::time::Interval,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if self.tick.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        self.left -= 1;
        let i = self.sent;
        self.sent += 1;
        let event = format!("data: {{\"i\":{i},\"t\":{}}}\n\n", monotonic_ns());
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}
