//! The HTTPS client of `cargo xtask bench`'s credential broker section:
//! moves itself into a cgroup before it makes a socket, connects to the
//! upstream (directly, or by its name, which the kernel then sends to the
//! broker), and prints one JSON line.
//!
//! ```text
//! idgate-bench-http --op OP --name NAME --ca PEM --header HEADER
//!                   (--connect IP:PORT | --resolve-via IP:PORT [--port P])
//!                   [--key-file FILE] [--cgroup DIR] [--proto h1|h2]
//!                   [--count N] [--seconds S] [--warmup W] [--conns C]
//!                   [--path PATH] [--chunks C] [--interval-ms I] [--steps]
//! ```
//!
//! With `--resolve-via`, NAME's first IPv4 address is asked of that DNS
//! server once, before anything is timed, and port P (443) of it is
//! connected to. TLS (rustls, ring) trusts the certificates of `--ca`
//! only, names NAME, offers one protocol by ALPN (`--proto`) and never
//! resumes a session: each new connection is a full handshake. Every
//! request sends HEADER: the key of `--key-file`, or without one the
//! placeholder SDKs send when they have no key. A response other than 200
//! ends the run with an error. `OP` is one of:
//! - `reused`: one connection; `--warmup` requests of `--path`, then
//!   requests one after another until `--count` or `--seconds`, each timed
//!   from its send to its body's end (`latency_ns`);
//! - `new`: the same, with a new connection for each request, timed from
//!   before the TCP connect to the body's end; the connection is closed
//!   after each;
//! - `flood`: `--conns` connections (one request each first), then
//!   requests of `--path` back to back on each, all at once, for
//!   `--seconds` (and at most `--count` in all): `requests` and body
//!   `bytes`;
//! - `stream`: `--conns` connections (one request of `/small` each
//!   first), then on each at once one `GET /stream` of `--chunks` events
//!   `--interval-ms` apart: for every event, its arrival less the
//!   server's stamp in it (`delays_ns`; the same clock);
//! - `hold`: opens `--conns` connections, one request of `/small` each,
//!   and keeps them open until the step `open` is answered, then closes
//!   them;
//! - `probe`: one request of `/small`.
//!
//! With `--steps`, at `start` (warm-up done, before the timed part), `end`
//! (after it) and, for `hold`, `open`, it prints `step NAME` and waits for
//! a line (or the end) on stdin: the bench reads CPU and memory then.
//! Everything runs on one thread.

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idgate_tests::monotonic_ns;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// What SDKs send as the key when they are given none.
const PLACEHOLDER: &str = "placeholder";
/// How long the DNS server has to answer, per try.
const DNS_TIMEOUT: Duration = Duration::from_secs(1);

struct Args {
    op: String,
    name: String,
    ca: PathBuf,
    header: HeaderName,
    key_file: Option<PathBuf>,
    connect: Option<SocketAddr>,
    resolve_via: Option<SocketAddr>,
    port: u16,
    cgroup: Option<PathBuf>,
    h2: bool,
    count: u64,
    seconds: f64,
    warmup: u64,
    conns: usize,
    path: String,
    chunks: u64,
    interval_ms: u64,
    steps: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("idgate-bench-http: {e}");
        std::process::exit(1);
    }
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        op: String::new(),
        name: String::new(),
        ca: PathBuf::new(),
        header: HeaderName::from_static("x-api-key"),
        key_file: None,
        connect: None,
        resolve_via: None,
        port: 443,
        cgroup: None,
        h2: false,
        count: 1,
        seconds: 10.0,
        warmup: 0,
        conns: 1,
        path: "/small".into(),
        chunks: 50,
        interval_ms: 20,
        steps: false,
    };
    fn num<T: FromStr>(flag: &str, v: &str) -> Result<T, String> {
        v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
    }
    while let Some(flag) = it.next() {
        if flag == "--steps" {
            a.steps = true;
            continue;
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--op" => a.op = v,
            "--name" => a.name = v,
            "--ca" => a.ca = v.into(),
            "--header" => {
                a.header =
                    HeaderName::from_bytes(v.as_bytes()).map_err(|e| format!("--header: {e}"))?
            }
            "--key-file" => a.key_file = Some(v.into()),
            "--connect" => a.connect = Some(v.parse().map_err(|e| format!("--connect: {e}"))?),
            "--resolve-via" => {
                a.resolve_via = Some(v.parse().map_err(|e| format!("--resolve-via: {e}"))?)
            }
            "--port" => a.port = num(&flag, &v)?,
            "--cgroup" => a.cgroup = Some(v.into()),
            "--proto" => {
                a.h2 = match v.as_str() {
                    "h1" => false,
                    "h2" => true,
                    _ => return Err(format!("--proto: h1 or h2, not {v}")),
                }
            }
            "--count" => a.count = num(&flag, &v)?,
            "--seconds" => a.seconds = num(&flag, &v)?,
            "--warmup" => a.warmup = num(&flag, &v)?,
            "--conns" => a.conns = num(&flag, &v)?,
            "--path" => a.path = v,
            "--chunks" => a.chunks = num(&flag, &v)?,
            "--interval-ms" => a.interval_ms = num(&flag, &v)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.op.is_empty() || a.name.is_empty() || a.ca.as_os_str().is_empty() {
        return Err("--op, --name and --ca are required".into());
    }
    if a.connect.is_some() == a.resolve_via.is_some() {
        return Err("give one of --connect and --resolve-via".into());
    }
    if a.conns == 0 || a.seconds <= 0.0 {
        return Err("--conns and --seconds must be above 0".into());
    }
    Ok(a)
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    // Before any socket exists: a socket belongs to the cgroup it is
    // made in.
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", cgroup.display()))?;
    }
    let client = Arc::new(Client::new(&args)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let out = runtime.block_on(async {
        match args.op.as_str() {
            "reused" => reused(&client, &args).await,
            "new" => new(&client, &args).await,
            "flood" => flood(&client, &args).await,
            "stream" => stream(&client, &args).await,
            "hold" => hold(&client, &args).await,
            "probe" => {
                let mut c = client.connect().await?;
                c.get(&client, "/small").await?;
                Ok(serde_json::json!({ "protocol": c.protocol() }))
            }
            other => Err(format!("unknown --op {other:?}")),
        }
    })?;
    println!("{out}");
    Ok(())
}

/// Says `step NAME` and waits for the bench's line (with `--steps`).
fn step(args: &Args, name: &str) -> Result<(), String> {
    if !args.steps {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "step {name}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("stdin: {e}"))?;
    Ok(())
}

/// Where and how to connect, and the headers every request carries.
struct Client {
    addr: SocketAddr,
    name: ServerName<'static>,
    authority: String,
    tls: tokio_rustls::TlsConnector,
    h2: bool,
    header: HeaderName,
    value: HeaderValue,
}

impl Client {
    fn new(args: &Args) -> Result<Self, String> {
        let addr = match (args.connect, args.resolve_via) {
            (Some(addr), _) => addr,
            (None, Some(server)) => SocketAddr::new(resolve(server, &args.name)?, args.port),
            (None, None) => unreachable!("checked by parse"),
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&args.ca)
            .map_err(|e| format!("{}: {e}", args.ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", args.ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", args.ca.display()))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.resumption = rustls::client::Resumption::disabled();
        tls.alpn_protocols = vec![if args.h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let value = match &args.key_file {
            Some(path) => {
                let key = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                HeaderValue::from_str(key.strip_suffix('\n').unwrap_or(&key))
                    .map_err(|e| format!("the key: {e}"))?
            }
            None => HeaderValue::from_static(PLACEHOLDER),
        };
        Ok(Self {
            addr,
            name: ServerName::try_from(args.name.clone()).map_err(|e| format!("--name: {e}"))?,
            authority: args.name.clone(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            h2: args.h2,
            header: args.header.clone(),
            value,
        })
    }

    /// A new connection: TCP, TLS, the HTTP handshake; its driver runs as
    /// a task of its own.
    async fn connect(&self) -> Result<Conn, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let tls = self
            .tls
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", self.addr))?;
        let io = TokioIo::new(tls);
        if self.h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Conn::H2(send))
        } else {
            let (send, conn) = http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Conn::H1(send))
        }
    }

    fn request(&self, path: &str) -> Result<Request<Empty<Bytes>>, String> {
        let builder = if self.h2 {
            Request::get(format!("https://{}{path}", self.authority))
        } else {
            Request::get(path).header(http::header::HOST, &self.authority)
        };
        builder
            .header(&self.header, &self.value)
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))
    }
}

/// One connection's request sender.
enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn protocol(&self) -> &'static str {
        match self {
            Conn::H1(_) => "http/1.1",
            Conn::H2(_) => "h2",
        }
    }

    /// Sends a GET of `path`; the response with its head checked (200).
    async fn send(
        &mut self,
        client: &Client,
        path: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let request = client.request(path)?;
        let response = match self {
            Conn::H1(s) => {
                s.ready().await.map_err(|e| format!("connection: {e}"))?;
                s.send_request(request).await
            }
            Conn::H2(s) => {
                s.ready().await.map_err(|e| format!("connection: {e}"))?;
                s.send_request(request).await
            }
        }
        .map_err(|e| format!("GET {path}: {e}"))?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            let body = body
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            return Err(format!("GET {path}: {status}: {}", body.trim()));
        }
        Ok(response)
    }

    /// A GET of `path`, its body read to the end: its length.
    async fn get(&mut self, client: &Client, path: &str) -> Result<u64, String> {
        let mut body = self.send(client, path).await?.into_body();
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("GET {path}: body: {e}"))?;
            if let Some(data) = frame.data_ref() {
                n += data.len() as u64;
            }
        }
        Ok(n)
    }
}

/// The first IPv4 address of `name`, asked of `server` (three tries).
fn resolve(server: SocketAddr, name: &str) -> Result<IpAddr, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp socket: {e}"))?;
    socket
        .connect(server)
        .map_err(|e| format!("connect {server}: {e}"))?;
    socket
        .set_read_timeout(Some(DNS_TIMEOUT))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut query = Message::new();
    query
        .set_id(0x1dea)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_str(name).map_err(|e| format!("--name {name:?}: {e}"))?,
            RecordType::A,
        ));
    let bytes = query.to_vec().map_err(|e| format!("a query: {e}"))?;
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        socket
            .send(&bytes)
            .map_err(|e| format!("send to {server}: {e}"))?;
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let answer = Message::from_vec(&buf[..n]).map_err(|e| format!("an answer: {e}"))?;
        return answer
            .answers()
            .iter()
            .find_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .ok_or(format!("{server} has no IPv4 address for {name}"));
    }
    Err(format!("{server} did not answer for {name}"))
}

/// Whether a run that started at `started` may go on after `done`.
fn within(args: &Args, started: Instant, done: u64) -> bool {
    done < args.count && started.elapsed().as_secs_f64() < args.seconds
}

async fn reused(client: &Client, args: &Args) -> Result<serde_json::Value, String> {
    let mut conn = client.connect().await?;
    for _ in 0..args.warmup {
        conn.get(client, &args.path).await?;
    }
    step(args, "start")?;
    let mut latency_ns = Vec::new();
    let started = Instant::now();
    while within(args, started, latency_ns.len() as u64) {
        let t = Instant::now();
        conn.get(client, &args.path).await?;
        latency_ns.push(t.elapsed().as_nanos() as u64);
    }
    step(args, "end")?;
    Ok(serde_json::json!({ "protocol": conn.protocol(), "latency_ns": latency_ns }))
}

async fn new(client: &Client, args: &Args) -> Result<serde_json::Value, String> {
    for _ in 0..args.warmup {
        client.connect().await?.get(client, &args.path).await?;
    }
    step(args, "start")?;
    let mut latency_ns = Vec::new();
    let started = Instant::now();
    while within(args, started, latency_ns.len() as u64) {
        let t = Instant::now();
        let mut conn = client.connect().await?;
        conn.get(client, &args.path).await?;
        latency_ns.push(t.elapsed().as_nanos() as u64);
        drop(conn);
    }
    step(args, "end")?;
    Ok(serde_json::json!({ "latency_ns": latency_ns }))
}

/// `args.conns` connections, each with one request of `/small` made.
async fn open(client: &Client, args: &Args) -> Result<Vec<Conn>, String> {
    let mut conns = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let mut conn = client.connect().await?;
        conn.get(client, "/small").await?;
        conns.push(conn);
    }
    Ok(conns)
}

async fn flood(client: &Arc<Client>, args: &Args) -> Result<serde_json::Value, String> {
    let conns = open(client, args).await?;
    step(args, "start")?;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.seconds);
    let per_conn = args.count.div_ceil(args.conns as u64);
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let client = client.clone();
        let path = args.path.clone();
        tasks.spawn(async move {
            let (mut requests, mut bytes) = (0u64, 0u64);
            while requests < per_conn && started.elapsed() < limit {
                bytes += conn.get(&client, &path).await?;
                requests += 1;
            }
            Ok::<_, String>((requests, bytes))
        });
    }
    let (mut requests, mut bytes) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (r, b) = done.map_err(|e| format!("a task: {e}"))??;
        requests += r;
        bytes += b;
    }
    let elapsed_ns = started.elapsed().as_nanos() as u64;
    step(args, "end")?;
    Ok(serde_json::json!({ "requests": requests, "bytes": bytes, "elapsed_ns": elapsed_ns }))
}

async fn stream(client: &Arc<Client>, args: &Args) -> Result<serde_json::Value, String> {
    let conns = open(client, args).await?;
    step(args, "start")?;
    let path = format!(
        "/stream?chunks={}&interval_ms={}",
        args.chunks, args.interval_ms
    );
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let client = client.clone();
        let path = path.clone();
        tasks.spawn(async move {
            let mut body = conn.send(&client, &path).await?.into_body();
            let mut delays = Vec::new();
            let mut pending = String::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("GET {path}: body: {e}"))?;
                let arrived = monotonic_ns();
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.push_str(&String::from_utf8_lossy(data));
                while let Some((event, rest)) = pending.split_once("\n\n") {
                    let stamp = event
                        .split_once("\"t\":")
                        .and_then(|(_, t)| t.trim_end_matches('}').parse::<u64>().ok())
                        .ok_or(format!("an event without a stamp: {event:?}"))?;
                    delays.push(arrived.saturating_sub(stamp));
                    pending = rest.to_owned();
                }
            }
            Ok::<_, String>(delays)
        });
    }
    let mut delays_ns = Vec::new();
    while let Some(done) = tasks.join_next().await {
        delays_ns.extend(done.map_err(|e| format!("a task: {e}"))??);
    }
    step(args, "end")?;
    let expected = args.chunks * args.conns as u64;
    if delays_ns.len() as u64 != expected {
        return Err(format!(
            "{} events arrived, not {expected}",
            delays_ns.len()
        ));
    }
    Ok(serde_json::json!({ "delays_ns": delays_ns }))
}

async fn hold(client: &Client, args: &Args) -> Result<serde_json::Value, String> {
    let conns = open(client, args).await?;
    step(args, "open")?;
    let opened = conns.len();
    drop(conns);
    // The closes go out before the bench reads memory again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    step(args, "end")?;
    Ok(serde_json::json!({ "opened": opened }))
}
