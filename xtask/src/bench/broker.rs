//! The credential broker: HTTPS requests through it beside the same
//! requests straight to the same upstream, from the same workload cgroup,
//! in one run.
//!
//! The upstream is `idgate-bench-api` (hyper, rustls; HTTP/1.1 and HTTP/2
//! by ALPN; a test CA of its own), listening on port 443 of two loopback
//! addresses of the benchmark's: [`NAME`]'s address (`127.56.P.1`, P
//! from the pid), which dnsmasq (`127.56.P.53:53`) gives for the name, and
//! `127.56.P.2`, which no name has. An agent of its own ("broker") runs
//! the DNS path (forwarding to that dnsmasq) and the broker (trusting the
//! upstream's CA by `extra_roots`, an audit log of its records); its one
//! workload cgroup `web` is bound to [`ID`], whose policy has a credential
//! rule for [`NAME`] (header [`HEADER`] from a secret file of mode 0600)
//! and a CIDR rule allowing TCP to `127.56.P.2` port 443. The client is
//! `idgate-bench-http` (release build), in `web` for both:
//! - **direct**: to `127.56.P.2:443`, naming [`NAME`] in TLS, trusting
//!   the upstream's CA and sending the key itself;
//! - **broker**: [`NAME`] looked up through the agent (the kernel
//!   redirects the workload's DNS to it), then a connect to its address,
//!   port 443, which the kernel sends to the broker; the client trusts
//!   the agent's egress bundle and sends a placeholder key, which the
//!   broker replaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::cost;
use super::dnsmasq::Dnsmasq;
use super::interrupt;

/// The credential's host, the upstream's name.
pub const NAME: &str = "api.bench.test";
/// The workload's identity.
pub const ID: &str = "spiffe://bench.test/broker";
/// The credential's header.
pub const HEADER: &str = "x-api-key";
/// The credential rule's name.
pub const CREDENTIAL: &str = "bench-api";
/// The nameserver the workload asks (TEST-NET-1: nothing listens there;
/// the kernel sends the query to the agent).
const ASKED: &str = "192.0.2.53:53";
/// The key the upstream requires.
const KEY: &str = "sk-bench-0123456789";
/// Events per stream, and the time between two.
pub const CHUNKS: u64 = 50;
pub const CHUNK_INTERVAL: Duration = Duration::from_millis(20);
/// Untimed requests before a run on one connection, and new connections
/// before a new-connection run.
pub const WARMUP_REUSED: u64 = 100;
pub const WARMUP_NEW: u64 = 10;
/// Time a client may take beyond its own bound before it is killed.
const GRACE: Duration = Duration::from_secs(60);

/// The section's sizes and bounds (from the command line).
#[derive(Clone)]
pub struct Sizes {
    pub rounds: usize,
    /// Most requests per run on one connection.
    pub requests: u64,
    /// Most requests per new-connection run.
    pub new_requests: u64,
    /// Most seconds per latency run.
    pub seconds: f64,
    /// Connections held open for the memory figure.
    pub connections: usize,
    /// Streams at once.
    pub streams: usize,
    /// Seconds per throughput run.
    pub flood_seconds: f64,
    /// Connections of a throughput run of small requests.
    pub flood_connections: usize,
    /// The large body's size, and the connections fetching it.
    pub body_bytes: u64,
    pub body_connections: usize,
}

/// CPU seconds over a run's timed part.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub agent: f64,
    pub client: f64,
    pub upstream: f64,
}

impl Cpu {
    pub fn add(&mut self, other: Cpu) {
        self.agent += other.agent;
        self.client += other.client;
        self.upstream += other.upstream;
    }
}

/// One timed run: each request's (or event's) nanoseconds, and the CPU.
#[derive(Clone, Default)]
pub struct Timed {
    pub ns: Vec<u64>,
    pub cpu: Cpu,
}

impl Timed {
    /// Every run's values and CPU together.
    pub fn pooled(runs: &[Timed]) -> Timed {
        let mut all = Timed::default();
        for run in runs {
            all.ns.extend(&run.ns);
            all.cpu.add(run.cpu);
        }
        all
    }
}

/// One throughput run.
#[derive(Clone, Copy)]
pub struct Flood {
    pub requests: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub cpu: Cpu,
}

/// The agent's memory around one run that held connections open.
#[derive(Clone, Copy)]
pub struct Held {
    pub connections: u64,
    /// VmRSS, KiB: before the client started, with every connection
    /// open, and after they closed.
    pub before_kib: u64,
    pub open_kib: u64,
    pub after_kib: u64,
}

/// What the upstream counted on one of its addresses.
#[derive(Clone, Copy, Default)]
pub struct Served {
    pub h2: u64,
    pub http1: u64,
    pub requests: u64,
}

/// Direct first, then through the broker: `[direct, broker]`, one entry
/// per round.
pub type Pair<T> = [Vec<T>; 2];

/// The runs of one kind of request.
pub struct LatencyKind {
    pub name: &'static str,
    pub runs: Pair<Timed>,
}

pub struct BrokerBench {
    pub sizes: Sizes,
    pub dnsmasq: String,
    /// `/proc/loadavg` at the section's start and end.
    pub load: (String, String),
    /// HTTP/1.1 on one connection, HTTP/2 on one connection, HTTP/1.1 on
    /// a new connection each.
    pub latency: Vec<LatencyKind>,
    /// Each event's arrival less its stamp.
    pub streams: Pair<Timed>,
    pub small: Pair<Flood>,
    pub large: Pair<Flood>,
    pub held: Vec<Held>,
    /// The agent's VmRSS when it was ready, KiB.
    pub agent_start_kib: u64,
    /// What the upstream counted: `[direct address, the name's address]`.
    pub served: [Served; 2],
}

/// Runs the section with the release binaries in `bins`; the agent's
/// scope and the workload cgroup are made below the run's `tree`
/// (named `tag`).
pub fn measure(
    sizes: Sizes,
    bins: &Path,
    tag: &str,
    tree: &super::cgroups::Tree,
) -> Result<BrokerBench> {
    if sizes.rounds == 0
        || sizes.requests == 0
        || sizes.new_requests == 0
        || sizes.connections == 0
        || sizes.streams == 0
        || sizes.flood_connections == 0
        || sizes.body_connections == 0
        || sizes.body_bytes == 0
    {
        bail!("the --broker-* counts and --rounds must be above 0");
    }
    if sizes.seconds <= 0.0 || sizes.flood_seconds <= 0.0 {
        bail!("--broker-seconds and --broker-flood-seconds must be above 0");
    }
    let dnsmasq = Dnsmasq::version()?;
    let load_before = super::dns::load_average();
    let world = World::start(bins, tag, tree)?;
    let agent_start_kib = cost::sample(world.agent.pid())?.rss_kib;
    let client = Client {
        bin: bins.join("idgate-bench-http"),
        cgroup: world.web.clone(),
        agent: world.agent.pid(),
        upstream: world.api.pid(),
        targets: [
            vec![
                "--connect".into(),
                world.direct.to_string(),
                "--ca".into(),
                world.upstream_ca().display().to_string(),
                "--key-file".into(),
                world.key_file().display().to_string(),
            ],
            vec![
                "--resolve-via".into(),
                ASKED.into(),
                "--ca".into(),
                world.bundle().display().to_string(),
            ],
        ],
    };
    client.wait_ready()?;

    let latency_ops: [(&str, &str, &str, u64, u64); 3] = [
        (
            "HTTP/1.1, one connection (keep-alive)",
            "reused",
            "h1",
            sizes.requests,
            WARMUP_REUSED,
        ),
        (
            "HTTP/2, one connection",
            "reused",
            "h2",
            sizes.requests,
            WARMUP_REUSED,
        ),
        (
            "HTTP/1.1, a new connection each (TCP, TLS, request)",
            "new",
            "h1",
            sizes.new_requests,
            WARMUP_NEW,
        ),
    ];
    let mut latency: Vec<LatencyKind> = latency_ops
        .iter()
        .map(|(name, ..)| LatencyKind {
            name,
            runs: [Vec::new(), Vec::new()],
        })
        .collect();
    let mut streams: Pair<Timed> = [Vec::new(), Vec::new()];
    let mut small: Pair<Flood> = [Vec::new(), Vec::new()];
    let mut large: Pair<Flood> = [Vec::new(), Vec::new()];
    let mut held = Vec::new();
    let big_path = format!("/bytes?n={}", sizes.body_bytes);
    for round in 0..sizes.rounds {
        eprintln!(
            "bench: broker: round {}/{} (memory, latency, streams, throughput)",
            round + 1,
            sizes.rounds
        );
        // First: in the first round the agent has served only the
        // readiness probes, so little freed memory is there to reuse.
        held.push(client.hold(sizes.connections, sizes.seconds)?);
        // The configurations' order turns from round to round.
        let order = [round % 2, (round + 1) % 2];
        for (kind, (_, op, proto, count, warmup)) in latency.iter_mut().zip(latency_ops) {
            for k in order {
                let (v, cpu) = client.run(
                    k,
                    &[
                        "--op",
                        op,
                        "--proto",
                        proto,
                        "--count",
                        &count.to_string(),
                        "--seconds",
                        &sizes.seconds.to_string(),
                        "--warmup",
                        &warmup.to_string(),
                    ],
                    sizes.seconds,
                )?;
                kind.runs[k].push(Timed {
                    ns: numbers(&v, "latency_ns")?,
                    cpu,
                });
            }
        }
        for k in order {
            let (v, cpu) = client.run(
                k,
                &[
                    "--op",
                    "stream",
                    "--conns",
                    &sizes.streams.to_string(),
                    "--chunks",
                    &CHUNKS.to_string(),
                    "--interval-ms",
                    &CHUNK_INTERVAL.as_millis().to_string(),
                ],
                (CHUNK_INTERVAL * CHUNKS as u32).as_secs_f64(),
            )?;
            streams[k].push(Timed {
                ns: numbers(&v, "delays_ns")?,
                cpu,
            });
        }
        for (runs, path, conns) in [
            (&mut small, "/small", sizes.flood_connections),
            (&mut large, big_path.as_str(), sizes.body_connections),
        ] {
            for k in order {
                let (v, cpu) = client.run(
                    k,
                    &[
                        "--op",
                        "flood",
                        "--path",
                        path,
                        "--conns",
                        &conns.to_string(),
                        "--count",
                        &u64::MAX.to_string(),
                        "--seconds",
                        &sizes.flood_seconds.to_string(),
                    ],
                    sizes.flood_seconds,
                )?;
                let u = |key: &str| v[key].as_u64().with_context(|| format!("no {key} in {v}"));
                runs[k].push(Flood {
                    requests: u("requests")?,
                    bytes: u("bytes")?,
                    seconds: u("elapsed_ns")? as f64 / 1e9,
                    cpu,
                });
            }
        }
    }
    let served = world.finish()?;
    Ok(BrokerBench {
        sizes,
        dnsmasq,
        load: (load_before, super::dns::load_average()),
        latency,
        streams,
        small,
        large,
        held,
        agent_start_kib,
        served,
    })
}

/// The numbers of the array `key` of a client's answer.
fn numbers(v: &serde_json::Value, key: &str) -> Result<Vec<u64>> {
    Ok(v[key]
        .as_array()
        .with_context(|| format!("no {key} in the client's answer"))?
        .iter()
        .filter_map(|x| x.as_u64())
        .collect())
}

/// A loopback address of the section's: `127.56.P.host`.
fn address(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 56, (std::process::id() % 256) as u8, host)
}

/// A TCP port free on IPv4 loopback when it was picked.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Everything the section runs: dropped in order (agent, upstream,
/// dnsmasq, then the directory of the secret and the CA).
struct World {
    agent: Agent,
    api: Upstream,
    _dns: Dnsmasq,
    dir: TempDir,
    /// The workload cgroup.
    web: PathBuf,
    /// The upstream's address that no name has.
    direct: SocketAddr,
}

impl World {
    fn start(bins: &Path, tag: &str, tree: &super::cgroups::Tree) -> Result<Self> {
        let dir = TempDir::new(std::env::temp_dir().join(format!("{tag}-broker-world")))?;
        let key_file = dir.0.join("api-key");
        std::fs::write(&key_file, format!("{KEY}\n"))?;
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let named = SocketAddr::new(address(1).into(), 443);
        let direct = SocketAddr::new(address(2).into(), 443);
        let dns_addr = SocketAddr::new(address(53).into(), 53);
        eprintln!(
            "bench: broker: starting dnsmasq on {dns_addr} and the upstream on {named} and {direct}"
        );
        let dns = Dnsmasq::start(
            &dir.0.join("dnsmasq"),
            dns_addr,
            &format!(
                "host-record={NAME},{},3600\naddress=/bench.test/\n",
                named.ip()
            ),
        )?;
        let api = Upstream::start(&bins.join("idgate-bench-api"), &dir.0, &[named, direct])?;
        let policy = format!(
            "mode = \"enforce\"\n\n[unknown]\ndefault = \"deny\"\n\n\
             [[identity]]\nid = \"{ID}\"\ndefault = \"deny\"\n\n\
             [[identity.credential]]\nname = \"{CREDENTIAL}\"\nhost = \"{NAME}\"\n\
             header = \"{HEADER}\"\nsecret_file = {key_file:?}\n\n\
             [[identity.egress]]\nname = \"direct\"\nto = [\"{}/32\"]\nports = [443]\n\
             protocol = \"tcp\"\naction = \"allow\"\n",
            direct.ip(),
        );
        let tables = format!(
            "\n[[workload]]\ncgroup = \"web\"\nidentity = \"{ID}\"\n\n\
             [events]\naudit_log = {audit:?}\n\n\
             [dns]\nupstreams = [\"{dns_addr}\"]\nprivate_answers = \"allow\"\n\
             listen_port = {dns_port}\n\n\
             [egress]\nenabled = true\ntls_port = {tls}\nhttp_port = {http}\n\
             extra_roots = [{ca:?}]\n",
            audit = dir.0.join("audit.jsonl"),
            dns_port = super::dns::free_dual_port()?,
            tls = free_port()?,
            http = free_port()?,
            ca = dir.0.join("upstream-ca.pem"),
        );
        eprintln!("bench: broker: starting agent broker");
        let agent = Agent::start_with_policy(
            &bins.join("idgate"),
            std::env::temp_dir().join(format!("{tag}-broker")),
            &format!("{tag}/broker"),
            Path::new("/sys/fs/bpf").join(format!("{tag}-broker")),
            &[],
            &tables,
            &[("broker.toml".into(), policy)],
        )?;
        let web = tree.make("broker/web")?;
        Ok(Self {
            agent,
            api,
            _dns: dns,
            dir,
            web,
            direct,
        })
    }

    fn key_file(&self) -> PathBuf {
        self.dir.0.join("api-key")
    }

    fn upstream_ca(&self) -> PathBuf {
        self.dir.0.join("upstream-ca.pem")
    }

    /// The trust bundle the agent gives workloads.
    fn bundle(&self) -> PathBuf {
        self.agent.file("state/egress/bundle.pem")
    }

    /// Stops the upstream: what it counted on the direct address and on
    /// the name's.
    fn finish(mut self) -> Result<[Served; 2]> {
        let v = self.api.finish()?;
        let served = |addr: SocketAddr| -> Result<Served> {
            let a = &v[addr.to_string()];
            let n = |key: &str| a[key].as_u64().with_context(|| format!("no {key} in {v}"));
            Ok(Served {
                h2: n("h2")?,
                http1: n("http/1.1")?,
                requests: n("requests")?,
            })
        };
        Ok([
            served(self.direct)?,
            served(SocketAddr::new(address(1).into(), 443))?,
        ])
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            bail!("{} exists already", path.display());
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `idgate-bench-api`, killed on drop if it has not ended.
struct Upstream {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl Upstream {
    /// Starts it on `listen`, its CA written to `dir/upstream-ca.pem`;
    /// waits until it listens (at most 10 s).
    fn start(bin: &Path, dir: &Path, listen: &[SocketAddr]) -> Result<Self> {
        let ready = dir.join("api.ready");
        let mut command = Command::new(bin);
        for addr in listen {
            command.arg("--listen").arg(addr.to_string());
        }
        let mut child = command
            .args(["--name", NAME, "--header", HEADER, "--key-file"])
            .arg(dir.join("api-key"))
            .arg("--ca-out")
            .arg(dir.join("upstream-ca.pem"))
            .arg("--ready")
            .arg(&ready)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("api.stderr"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take();
        let mut api = Self {
            child: Some(child),
            stdin,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            interrupt::check()?;
            if let Some(status) = api.child.as_mut().expect("started").try_wait()? {
                let err = std::fs::read_to_string(dir.join("api.stderr")).unwrap_or_default();
                bail!("idgate-bench-api ended with {status}: {}", err.trim());
            }
            if Instant::now() > deadline {
                bail!("idgate-bench-api did not listen within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(api)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    /// Closes its stdin, so it ends: the counts it prints.
    fn finish(&mut self) -> Result<serde_json::Value> {
        drop(self.stdin.take());
        let mut child = self.child.take().context("finished twice")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("idgate-bench-api did not end within 10 s of its stdin's end");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        serde_json::from_str(out.trim()).context("the upstream's counts are not JSON")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `idgate-bench-http` in the workload cgroup, direct (0) or through the
/// broker (1).
struct Client {
    bin: PathBuf,
    cgroup: PathBuf,
    agent: u32,
    upstream: u32,
    /// Each configuration's arguments: where to connect, whom to trust,
    /// the key.
    targets: [Vec<String>; 2],
}

impl Client {
    /// Probes both ways until a request goes through each (the broker's
    /// listeners open just after the agent answers; at most 10 s).
    fn wait_ready(&self) -> Result<()> {
        for k in 0..2 {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.spawn(k, &["--op", "probe"], 1.0)?.wait(|_| Ok(())) {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context("no request went through within 10 s"));
                    }
                    Err(_) => interrupt::sleep(Duration::from_millis(100))?,
                }
            }
        }
        Ok(())
    }

    /// Runs `args` (with `--steps`) in configuration `k`: the client's
    /// answer, and the CPU the agent, the client and the upstream used
    /// between its steps `start` and `end`.
    fn run(&self, k: usize, args: &[&str], seconds: f64) -> Result<(serde_json::Value, Cpu)> {
        let mut args = args.to_vec();
        args.push("--steps");
        let running = self.spawn(k, &args, seconds)?;
        let client = running.pid();
        let mut at_start = None;
        let mut cpu = Cpu::default();
        let v = running.wait(|step| {
            let sample = [self.agent, client, self.upstream].map(cost::sample);
            let [a, c, u] = sample;
            let (a, c, u) = (a?.cpu_seconds, c?.cpu_seconds, u?.cpu_seconds);
            match step {
                "start" => at_start = Some((a, c, u)),
                "end" => {
                    let (a0, c0, u0) = at_start.context("step end before start")?;
                    cpu = Cpu {
                        agent: a - a0,
                        client: c - c0,
                        upstream: u - u0,
                    };
                }
                other => bail!("unexpected step {other}"),
            }
            Ok(())
        })?;
        Ok((v, cpu))
    }

    /// Opens `n` connections through the broker and closes them again:
    /// the agent's memory before, meanwhile and after.
    fn hold(&self, n: usize, seconds: f64) -> Result<Held> {
        let rss = || -> Result<u64> { Ok(cost::sample(self.agent)?.rss_kib) };
        let before_kib = rss()?;
        let mut open_kib = 0;
        let mut after_kib = 0;
        let args = ["--op", "hold", "--conns", &n.to_string(), "--steps"];
        let v = self.spawn(1, &args, seconds)?.wait(|step| {
            match step {
                "open" => open_kib = rss()?,
                "end" => after_kib = rss()?,
                other => bail!("unexpected step {other}"),
            }
            Ok(())
        })?;
        let connections = v["opened"]
            .as_u64()
            .with_context(|| format!("no opened in {v}"))?;
        Ok(Held {
            connections,
            before_kib,
            open_kib,
            after_kib,
        })
    }

    fn spawn(&self, k: usize, args: &[&str], seconds: f64) -> Result<Running> {
        interrupt::check()?;
        let mut command = Command::new(&self.bin);
        command
            .args(["--name", NAME, "--header", HEADER, "--cgroup"])
            .arg(&self.cgroup)
            .args(&self.targets[k])
            .args(args);
        let described = format!("idgate-bench-http {}", args.join(" "));
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("no stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().context("no stderr")?;
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Running {
            stdin: child.stdin.take(),
            child: Some(child),
            lines,
            stderr: Some(stderr),
            deadline: Instant::now() + Duration::from_secs_f64(seconds) + GRACE,
            described,
        })
    }
}

/// A client running; killed on drop if it has not ended.
struct Running {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    deadline: Instant,
    described: String,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("spawned").id()
    }

    /// Answers its steps (after `on_step` has run) until it ends (killed
    /// past its bound): its JSON answer.
    fn wait(mut self, mut on_step: impl FnMut(&str) -> Result<()>) -> Result<serde_json::Value> {
        let mut answer = None;
        loop {
            interrupt::check()?;
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{} did not end in time", self.described);
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => match line.strip_prefix("step ") {
                    Some(step) => {
                        on_step(step)?;
                        let stdin = self.stdin.as_mut().context("no stdin")?;
                        stdin.write_all(b"\n")?;
                        stdin.flush()?;
                    }
                    None => answer = Some(line),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut child = self.child.take().context("waited for twice")?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not end in time", self.described);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        if !status.success() {
            bail!("{}: {status}: {}", self.described, stderr.trim());
        }
        let answer = answer.with_context(|| format!("{}: no answer", self.described))?;
        serde_json::from_str(&answer)
            .with_context(|| format!("{}: the answer is not JSON", self.described))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
