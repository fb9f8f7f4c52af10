//! The DNS path: lookups through idgate beside the same lookups straight
//! to the upstream, the time from the upstream's answer to the addresses
//! being in the kernel, lookups per second and the agent's CPU for them,
//! the connect path for an identity whose rules are all names, and the
//! memory a learned name and address takes.
//!
//! The upstream is Debian's dnsmasq on a loopback address of the
//! benchmark's (`127.55.P.1:53`, P from the pid; not in the agent's
//! reserved `127.53.0.0/16`), serving a zone of [`ZONE`] names
//! (`h0`, `h1`, ... each with one IPv4 address of its own in
//! `127.100.0.0/16`) and [`LOOP_NAME`] (127.0.0.1 and ::1, the connect
//! loop's destinations). An agent of its own ("dns") forwards to it; its
//! scope has two workload cgroups: `cidr`, whose identity reaches the
//! loop's destinations by a CIDR rule, and `names`, whose identity has
//! name rules only (the zone's names, and [`LOOP_NAME`]). The client is
//! `idgate-bench-dns` (release build), moved into a cgroup before it
//! makes a socket: in `names` it asks `192.0.2.53:53`, where nothing
//! listens, and the kernel redirects the query to the agent; in the
//! benchmark's cgroup outside every scope it asks dnsmasq itself.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::cost::{self, MapMemory, ProcSample};
use super::dnsmasq::Dnsmasq;
use super::interrupt;
use super::loops::{Loop, Op};
use super::monotonic_ns;
use super::overhead::{self, Config, Judge, Overhead};
use super::rules::{self, Identity};

/// The suffix of the zone's names.
pub const ZONE: &str = "zone.bench.test";
/// The name of the connect loop's destinations.
pub const LOOP_NAME: &str = "loop.bench.test";
/// The nameserver the workload asks (TEST-NET-1: nothing listens there).
pub const ASKED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), 53);
/// TTL of every record: nothing learned expires during the run.
const TTL: u32 = 3_600;
/// A query unanswered for this long is counted as a timeout.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// Most names in the zone (one address each in `127.100.0.0/16`).
const MAX_NAMES: u64 = 65_000;
/// Time a client may take beyond its own bound before it is killed.
const GRACE: Duration = Duration::from_secs(30);
/// The identity whose rules are all names.
pub const NAMES_ID: &str = "spiffe://bench.test/dns-names";

/// The section's sizes and bounds (from the command line).
pub struct Sizes {
    pub names: u64,
    pub queries: u64,
    pub seconds: f64,
    pub flood_seconds: f64,
    pub outstanding: Vec<usize>,
    pub rounds: usize,
}

/// One sequential run of the client.
#[derive(Default, Clone)]
pub struct Sequential {
    pub queries: u64,
    pub latency_ns: Vec<u64>,
    pub timeouts: u64,
    /// Answers other than NOERROR with an address: by rcode, and
    /// `no address`.
    pub failures: Vec<(String, u64)>,
    pub connects_allowed: u64,
    pub connects_denied: u64,
    pub first_denied: Option<String>,
    pub seconds: f64,
}

impl Sequential {
    /// Adds `other`'s counts and latencies to these.
    pub fn add_run(&mut self, other: &Sequential) {
        self.queries += other.queries;
        self.latency_ns.extend(&other.latency_ns);
        self.timeouts += other.timeouts;
        for (k, v) in &other.failures {
            match self.failures.iter_mut().find(|(x, _)| x == k) {
                Some((_, n)) => *n += v,
                None => self.failures.push((k.clone(), *v)),
            }
        }
        self.connects_allowed += other.connects_allowed;
        self.connects_denied += other.connects_denied;
        if self.first_denied.is_none() {
            self.first_denied.clone_from(&other.first_denied);
        }
        self.seconds += other.seconds;
    }
}

/// One flood run: the client's counts, and the CPU the agent and dnsmasq
/// used over it.
#[derive(Clone, Copy)]
pub struct Flood {
    pub answered: u64,
    pub timeouts: u64,
    /// Answers other than NOERROR.
    pub failed: u64,
    pub seconds: f64,
    pub agent_cpu: f64,
    pub dnsmasq_cpu: f64,
}

/// Both configurations at one number of queries outstanding.
pub struct FloodLevel {
    pub outstanding: usize,
    pub threads: usize,
    /// `[direct, through idgate]`, one per round.
    pub runs: [Vec<Flood>; 2],
}

/// The agent's learned-address histogram, as its endpoint gives it.
pub struct LearnHistogram {
    /// (upper bound in seconds, cumulative count).
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl LearnHistogram {
    /// The upper bound of the bucket that holds the `p` quantile.
    pub fn quantile_bound(&self, p: f64) -> Option<f64> {
        let rank = (p * self.count as f64).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank.max(1))
            .map(|(le, _)| *le)
    }
}

/// The agent and its maps at one moment.
pub struct Memory {
    pub proc: ProcSample,
    pub maps: Vec<MapMemory>,
}

impl Memory {
    fn read(pid: u32) -> Result<Self> {
        Ok(Self {
            proc: cost::sample(pid)?,
            maps: cost::maps(pid)?,
        })
    }

    /// `memlock:` bytes of the maps named `name`.
    pub fn map_bytes(&self, name: &str) -> u64 {
        self.maps
            .iter()
            .filter(|m| m.name == name)
            .map(|m| m.bytes)
            .sum()
    }
}

pub struct DnsBench {
    pub dnsmasq: String,
    /// `/proc/loadavg`'s first three figures at the section's start and
    /// end: how busy the machine was.
    pub load: (String, String),
    pub sizes: Sizes,
    /// Every name of the zone asked once through idgate, with a connect
    /// after each answer: the first lookups.
    pub first: Sequential,
    /// Before anything was learned, and after the first lookups.
    pub memory: (Memory, Memory),
    /// `[direct, through idgate]`, one per round.
    pub latency: [Vec<Sequential>; 2],
    pub learn: LearnHistogram,
    pub flood: Vec<FloodLevel>,
    /// (a), the CIDR identity and the names identity.
    pub connect: Overhead,
    /// idgate's programs' own time per call, `[op][config]`, in the
    /// same three.
    pub prog_times: super::prog_time::ProgTimes,
    /// What the names identity's lookup of [`LOOP_NAME`] answered.
    pub loop_addrs: Vec<String>,
    /// One per round: `idgate restart`, then a crash and a new agent.
    pub planned: Vec<Planned>,
    pub crashes: Vec<Crash>,
}

/// Longest a restart's client runs.
pub const GAP_SECONDS: f64 = 10.0;
/// Lookups before the restart or the kill.
pub const GAP_LEAD: Duration = Duration::from_millis(300);
/// Lookups after the restart (or the first answer after the crash)
/// before the client stops.
pub const GAP_TAIL: Duration = Duration::from_millis(300);
/// How long the agent stays down after the kill.
pub const DOWN: Duration = Duration::from_millis(300);
/// The crash's client's timeout: a query the killed agent had taken in is
/// lost, and the client must not wait the whole time the agent is down
/// for it (the planned restart's client waits [`TIMEOUT`]).
pub const CRASH_TIMEOUT: Duration = Duration::from_millis(100);
/// The client's pause after a failed send before it asks again.
pub const RETRY: Duration = Duration::from_millis(1);

/// One lookup of the `gaps` client.
#[derive(Clone, Copy)]
pub struct GapLookup {
    /// `CLOCK_MONOTONIC` at its send, ns.
    pub start: u64,
    pub ns: u64,
    /// 0 answered, 1 timed out, 2 send EPERM, 3 other send or receive
    /// error, 4 another answer.
    pub outcome: u64,
}

/// What the `gaps` client saw: its lookups, and its errors by their text.
struct GapRun {
    lookups: Vec<GapLookup>,
    errors: Vec<(String, u64)>,
}

/// One `idgate restart` with lookups running.
#[derive(Clone)]
pub struct Planned {
    /// How long `idgate restart` took (it returns once the new agent
    /// answers).
    pub command_ns: u64,
    /// Lookups that overlap the command's run.
    pub in_window: u64,
    /// Of those, not answered with an address (timed out, failed).
    pub failed_in_window: u64,
    /// In the whole run.
    pub lookups: u64,
    pub failed: u64,
    /// The longest lookup in the window.
    pub max_in_window_ns: u64,
}

/// One SIGKILL of the agent with lookups running, and its start again.
#[derive(Clone)]
pub struct Crash {
    /// Lookups from the kill to the first answer after it that failed
    /// at once (the send failed, or the receive: outcomes 2 and 3), and
    /// how long each took to fail.
    pub failed_fast_ns: Vec<u64>,
    /// The client's errors by their text, over its whole run.
    pub errors: Vec<(String, u64)>,
    /// Lookups that failed otherwise (timed out, refused, another
    /// answer) from the kill on.
    pub failed_other: u64,
    /// Of which timed out.
    pub timeouts: u64,
    /// From the new agent's spawn to its first answer on its control
    /// socket.
    pub ready_ns: u64,
    /// From the new agent's spawn, and from the kill, to the end of the
    /// first answered lookup after the kill.
    pub spawn_to_answer_ns: u64,
    pub kill_to_answer_ns: u64,
}

/// Runs the whole section. `plain` is a cgroup outside every scope;
/// the agent and its cgroups are made below `tag`.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    sizes: Sizes,
    idgate: &Path,
    client: &Path,
    lp: &Loop,
    tag: &str,
    plain: &Path,
    tree: &super::cgroups::Tree,
    ops: &[(Op, SocketAddr)],
    loop_rule: rules::Rule,
    denied: SocketAddr,
) -> Result<DnsBench> {
    if sizes.names == 0 || sizes.names > MAX_NAMES || sizes.queries == 0 {
        bail!("--dns-names must be from 1 to {MAX_NAMES}, --dns-queries above 0");
    }
    if sizes.outstanding.contains(&0) || sizes.flood_seconds <= 0.0 || sizes.seconds <= 0.0 {
        bail!("--dns-outstanding, --dns-seconds and --dns-flood-seconds must be above 0");
    }
    let dnsmasq = Dnsmasq::version()?;
    let load_before = load_average();
    let upstream = SocketAddr::new(
        Ipv4Addr::new(127, 55, (std::process::id() % 256) as u8, 1).into(),
        53,
    );
    let dir = std::env::temp_dir().join(format!("{tag}-dnsmasq"));
    eprintln!(
        "bench: dns: starting dnsmasq on {upstream} with {} names",
        sizes.names
    );
    let server = Dnsmasq::start(&dir, upstream, &zone_conf(sizes.names))?;
    let c = Client {
        bin: client.to_owned(),
    };
    c.wait_answering(upstream)?;

    let zone_port = loop_rule.ports[1].0;
    let cidr = Identity {
        id: "spiffe://bench.test/dns-cidr".into(),
        cgroup: "cidr".into(),
        rules: vec![loop_rule.clone()],
    };
    let tcp = loop_rule.ports[0].0;
    let names_policy = format!(
        "[[identity]]\nid = \"{NAMES_ID}\"\ndefault = \"deny\"\n\n\
         [[identity.egress]]\nname = \"zone\"\nto = [\"*.{ZONE}\"]\nports = [{zone_port}]\n\
         protocol = \"udp\"\naction = \"allow\"\n\n\
         [[identity.egress]]\nname = \"loop\"\nto = [\"{LOOP_NAME}\"]\nports = [{tcp}, {zone_port}]\n\
         protocol = \"any\"\naction = \"allow\"\n"
    );
    let metrics = super::events::free_metrics_address()?;
    let tables = format!(
        "\n[[workload]]\ncgroup = \"names\"\nidentity = \"{NAMES_ID}\"\n\n\
         [dns]\nupstreams = [\"{upstream}\"]\nprivate_answers = \"allow\"\n\
         listen_port = {port}\nmax_addresses_per_identity = {max}\n\n\
         [metrics]\naddress = \"{metrics}\"\n",
        port = free_dual_port()?,
        max = sizes.names + 16,
    );
    eprintln!("bench: dns: starting agent dns");
    let agent = Agent::start_with_policy(
        idgate,
        std::env::temp_dir().join(format!("{tag}-dns")),
        &format!("{tag}/dns"),
        Path::new("/sys/fs/bpf").join(format!("{tag}-dns")),
        &[cidr],
        &tables,
        &[("dns-names.toml".into(), names_policy)],
    )?;
    let names_cg = tree.path("dns/names");
    let cidr_cg = tree.path("dns/cidr");

    let before = Memory::read(agent.pid())?;
    eprintln!(
        "bench: dns: first lookups of {} names through idgate, a connect after each",
        sizes.names
    );
    let first = c.sequential(
        &names_cg,
        ASKED,
        &Seq {
            start: 0,
            count: sizes.names,
            seconds: (sizes.names as f64 / 100.0).max(sizes.seconds),
            connect_port: Some(zone_port),
            names: sizes.names,
        },
    )?;
    let after = Memory::read(agent.pid())?;

    let mut latency = [Vec::new(), Vec::new()];
    for round in 0..sizes.rounds {
        eprintln!(
            "bench: dns: lookup latency, round {}/{}",
            round + 1,
            sizes.rounds
        );
        for k in 0..2 {
            let k = (k + round) % 2;
            let seq = Seq {
                start: round as u64 * sizes.queries,
                count: sizes.queries,
                seconds: sizes.seconds,
                connect_port: (k == 1).then_some(zone_port),
                names: sizes.names,
            };
            let run = match k {
                0 => c.sequential(plain, upstream, &seq)?,
                _ => c.sequential(&names_cg, ASKED, &seq)?,
            };
            latency[k].push(run);
        }
    }
    let learn = LearnHistogram::read(metrics)?;

    let mut flood: Vec<FloodLevel> = Vec::new();
    for round in 0..sizes.rounds {
        for (n, &outstanding) in sizes.outstanding.iter().enumerate() {
            let threads = outstanding.clamp(1, 4);
            let window = outstanding.div_ceil(threads);
            eprintln!(
                "bench: dns: lookups flat out, {outstanding} outstanding, {} s each way, round {}/{}",
                sizes.flood_seconds,
                round + 1,
                sizes.rounds
            );
            let run = |k: usize| -> Result<Flood> {
                let (cgroup, to) = match k {
                    0 => (plain, upstream),
                    _ => (names_cg.as_path(), ASKED),
                };
                let agent0 = cost::sample(agent.pid())?.cpu_seconds;
                let dnsmasq0 = cost::sample(server.pid())?.cpu_seconds;
                let mut f = c.flood(
                    cgroup,
                    to,
                    sizes.names,
                    threads,
                    window,
                    sizes.flood_seconds,
                )?;
                f.agent_cpu = cost::sample(agent.pid())?.cpu_seconds - agent0;
                f.dnsmasq_cpu = cost::sample(server.pid())?.cpu_seconds - dnsmasq0;
                Ok(f)
            };
            if round == 0 {
                flood.push(FloodLevel {
                    outstanding: threads * window,
                    threads,
                    runs: [Vec::new(), Vec::new()],
                });
            }
            for k in 0..2 {
                let k = (k + round) % 2;
                flood[n].runs[k].push(run(k)?);
            }
        }
    }

    // The names identity reaches the loop's destination only once it
    // has looked the name up; a port no rule names stays denied.
    let udp: SocketAddr = (Ipv4Addr::LOCALHOST, zone_port).into();
    lp.check(&names_cg, udp, "eperm")?;
    eprintln!("bench: dns: {LOOP_NAME} looked up by the names identity");
    let loop_addrs = c.resolve(&names_cg, ASKED, LOOP_NAME)?;
    lp.check(&names_cg, udp, "ok")?;
    lp.check(&names_cg, denied, "eperm")?;
    let configs = [
        Config {
            name: "(a) no program attached".into(),
            cgroup: plain.to_owned(),
            judge: Judge::Nothing,
        },
        Config {
            name: "(f) idgate, the destination by address (CIDR rule)".into(),
            cgroup: cidr_cg,
            judge: Judge::Idgate(&agent),
        },
        Config {
            name: "(g) idgate, the destination by name (learned)".into(),
            cgroup: names_cg.clone(),
            judge: Judge::Idgate(&agent),
        },
    ];
    let connect = overhead::measure(lp, &configs, ops, sizes.rounds)?;
    let prog_times = super::prog_time::measure(lp, &configs, ops)?;
    drop(configs);
    let mut agent = agent;
    let (planned, crashes) = restarts(&c, &mut agent, &names_cg, tag, sizes.rounds)?;
    drop(agent);
    drop(server);
    Ok(DnsBench {
        load: (load_before, load_average()),
        dnsmasq,
        sizes,
        first,
        memory: (before, after),
        latency,
        learn,
        flood,
        connect,
        prog_times,
        loop_addrs,
        planned,
        crashes,
    })
}

/// `rounds` planned restarts, then `rounds` crashes, each with the names
/// identity's client looking names up one at a time through idgate.
fn restarts(
    c: &Client,
    agent: &mut Agent,
    cgroup: &Path,
    tag: &str,
    rounds: usize,
) -> Result<(Vec<Planned>, Vec<Crash>)> {
    let stop = std::env::temp_dir().join(format!("{tag}-dns-gaps-stop"));
    let result = (|| {
        let mut planned = Vec::new();
        for round in 0..rounds {
            eprintln!(
                "bench: dns: idgate restart with lookups running, round {}/{rounds}",
                round + 1
            );
            let _ = std::fs::remove_file(&stop);
            let pid = agent.pid();
            let client = c.gaps(cgroup, &stop, None, TIMEOUT)?;
            interrupt::sleep(GAP_LEAD)?;
            let t0 = monotonic_ns();
            let out = agent.cli(&["restart"]);
            let t1 = monotonic_ns();
            interrupt::sleep(GAP_TAIL)?;
            std::fs::write(&stop, "")?;
            let lookups = client.finish()?.lookups;
            let out = out?;
            agent.check_running()?;
            if agent.pid() != pid || !out.contains("restarted") {
                bail!("idgate restart: {out} (pid {pid} before)");
            }
            planned.push(Planned::of(&lookups, t0, t1));
        }
        let mut crashes = Vec::new();
        for round in 0..rounds {
            eprintln!(
                "bench: dns: the agent killed with lookups running, and started again, round {}/{rounds}",
                round + 1
            );
            let _ = std::fs::remove_file(&stop);
            let client = c.gaps(cgroup, &stop, Some(GAP_TAIL), CRASH_TIMEOUT)?;
            interrupt::sleep(GAP_LEAD)?;
            let killed = monotonic_ns();
            agent.kill()?;
            interrupt::sleep(DOWN)?;
            let spawned = monotonic_ns();
            let ready = agent.respawn();
            let ready_ns = monotonic_ns() - spawned;
            if ready.is_err() {
                std::fs::write(&stop, "")?;
            }
            let run = client.finish();
            ready?;
            let GapRun { lookups, errors } = run?;
            let mut crash = Crash::of(&lookups, killed, spawned, ready_ns)?;
            crash.errors = errors;
            crashes.push(crash);
        }
        Ok((planned, crashes))
    })();
    let _ = std::fs::remove_file(&stop);
    result
}

impl Planned {
    fn of(lookups: &[GapLookup], t0: u64, t1: u64) -> Self {
        let window: Vec<&GapLookup> = lookups
            .iter()
            .filter(|l| l.start <= t1 && l.start + l.ns >= t0)
            .collect();
        Self {
            command_ns: t1 - t0,
            in_window: window.len() as u64,
            failed_in_window: window.iter().filter(|l| l.outcome != 0).count() as u64,
            lookups: lookups.len() as u64,
            failed: lookups.iter().filter(|l| l.outcome != 0).count() as u64,
            max_in_window_ns: window.iter().map(|l| l.ns).max().unwrap_or(0),
        }
    }
}

impl Crash {
    fn of(lookups: &[GapLookup], killed: u64, spawned: u64, ready_ns: u64) -> Result<Self> {
        let after: Vec<&GapLookup> = lookups
            .iter()
            .filter(|l| l.start + l.ns >= killed)
            .collect();
        let answer = after
            .iter()
            .find(|l| l.outcome == 0 && l.start >= killed)
            .context("no lookup answered after the agent was started again")?;
        let answered = answer.start + answer.ns;
        let down: Vec<&&GapLookup> = after.iter().filter(|l| l.start < answered).collect();
        Ok(Self {
            failed_fast_ns: down
                .iter()
                .filter(|l| l.outcome == 2 || l.outcome == 3)
                .map(|l| l.ns)
                .collect(),
            errors: Vec::new(),
            failed_other: down
                .iter()
                .filter(|l| l.outcome == 1 || l.outcome == 4)
                .count() as u64,
            timeouts: down.iter().filter(|l| l.outcome == 1).count() as u64,
            ready_ns,
            spawn_to_answer_ns: answered.saturating_sub(spawned),
            kill_to_answer_ns: answered - killed,
        })
    }
}

/// The 1, 5 and 15 minute load averages.
/// `/proc/loadavg`'s first three figures: how busy the machine is.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A port free for both UDP and TCP on IPv4 (the agent's listeners).
pub fn free_dual_port() -> Result<u16> {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP")
}

/// dnsmasq's configuration for the zone of `names` names and
/// [`LOOP_NAME`].
fn zone_conf(names: u64) -> String {
    let mut conf = String::new();
    for i in 0..names {
        conf.push_str(&format!("host-record=h{i}.{ZONE},{},{TTL}\n", zone_addr(i)));
    }
    conf.push_str(&format!("host-record={LOOP_NAME},127.0.0.1,{TTL}\n"));
    conf.push_str(&format!("host-record={LOOP_NAME},::1,{TTL}\n"));
    // Any other name under the zone: NXDOMAIN, not REFUSED.
    conf.push_str("address=/bench.test/\n");
    conf
}

/// The zone's address of name number `i`.
fn zone_addr(i: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 100, (i >> 8) as u8, i as u8)
}

/// A sequential run's bounds.
struct Seq {
    start: u64,
    count: u64,
    seconds: f64,
    connect_port: Option<u16>,
    names: u64,
}

/// `idgate-bench-dns`, run in a cgroup to its bounds.
struct Client {
    bin: PathBuf,
}

impl Client {
    /// Polls dnsmasq until it answers (at most 10 s).
    fn wait_answering(&self, server: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = self.run(
                None,
                server,
                &[
                    "--op",
                    "resolve",
                    "--name",
                    LOOP_NAME,
                    "--timeout-ms",
                    "200",
                ],
                1.0,
            );
            match answered {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("dnsmasq did not answer within 10 s"));
                }
                Err(_) => interrupt::sleep(Duration::from_millis(100))?,
            }
        }
    }

    fn sequential(&self, cgroup: &Path, server: SocketAddr, seq: &Seq) -> Result<Sequential> {
        let mut args = vec![
            "--op".to_owned(),
            "sequential".into(),
            "--zone".into(),
            ZONE.into(),
            "--names".into(),
            seq.names.to_string(),
            "--start".into(),
            seq.start.to_string(),
            "--count".into(),
            seq.count.to_string(),
            "--seconds".into(),
            seq.seconds.to_string(),
            "--timeout-ms".into(),
            TIMEOUT.as_millis().to_string(),
        ];
        if let Some(port) = seq.connect_port {
            args.extend(["--connect-port".into(), port.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = self.run(Some(cgroup), server, &args, seq.seconds)?;
        let u = |key: &str| v[key].as_u64().with_context(|| format!("no {key} in {v}"));
        let mut failures: Vec<(String, u64)> = v["rcodes"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        if u("no_address")? > 0 {
            failures.push(("no address".into(), u("no_address")?));
        }
        Ok(Sequential {
            queries: u("queries")?,
            latency_ns: v["latency_ns"]
                .as_array()
                .context("no latency_ns")?
                .iter()
                .filter_map(|x| x.as_u64())
                .collect(),
            timeouts: u("timeouts")?,
            failures,
            connects_allowed: u("connects_allowed")?,
            connects_denied: u("connects_denied")?,
            first_denied: v["first_denied"].as_str().map(str::to_owned),
            seconds: u("elapsed_ns")? as f64 / 1e9,
        })
    }

    fn flood(
        &self,
        cgroup: &Path,
        server: SocketAddr,
        names: u64,
        threads: usize,
        window: usize,
        seconds: f64,
    ) -> Result<Flood> {
        let args = [
            "--op".to_owned(),
            "flood".into(),
            "--zone".into(),
            ZONE.into(),
            "--names".into(),
            names.to_string(),
            "--threads".into(),
            threads.to_string(),
            "--window".into(),
            window.to_string(),
            "--count".into(),
            u64::MAX.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--timeout-ms".into(),
            TIMEOUT.as_millis().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = self.run(Some(cgroup), server, &args, seconds)?;
        let u = |key: &str| v[key].as_u64().with_context(|| format!("no {key} in {v}"));
        Ok(Flood {
            answered: u("answered")?,
            timeouts: u("timeouts")?,
            failed: v["rcodes"]
                .as_object()
                .map(|o| o.values().filter_map(|n| n.as_u64()).sum())
                .unwrap_or(0),
            seconds: u("elapsed_ns")? as f64 / 1e9,
            agent_cpu: 0.0,
            dnsmasq_cpu: 0.0,
        })
    }

    /// Starts the `gaps` client in `cgroup`, asking through idgate; it
    /// stops once `stop` exists, or `after_recovery` after its first
    /// answer that follows a failure, or at [`GAP_SECONDS`].
    fn gaps(
        &self,
        cgroup: &Path,
        stop: &Path,
        after_recovery: Option<Duration>,
        timeout: Duration,
    ) -> Result<Running> {
        let mut args = vec![
            "--op".to_owned(),
            "gaps".into(),
            "--zone".into(),
            ZONE.into(),
            "--names".into(),
            "1".into(),
            "--count".into(),
            "1000000".into(),
            "--seconds".into(),
            GAP_SECONDS.to_string(),
            "--timeout-ms".into(),
            timeout.as_millis().to_string(),
            "--retry-ms".into(),
            RETRY.as_millis().to_string(),
            "--stop-file".into(),
            stop.display().to_string(),
        ];
        if let Some(after) = after_recovery {
            args.extend([
                "--stop-ms-after-recovery".into(),
                after.as_millis().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(Some(cgroup), ASKED, &args, GAP_SECONDS)
    }

    fn resolve(&self, cgroup: &Path, server: SocketAddr, name: &str) -> Result<Vec<String>> {
        let v = self.run(
            Some(cgroup),
            server,
            &["--op", "resolve", "--name", name],
            1.0,
        )?;
        Ok(v["addrs"]
            .as_array()
            .context("no addrs")?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect())
    }

    fn run(
        &self,
        cgroup: Option<&Path>,
        server: SocketAddr,
        args: &[&str],
        seconds: f64,
    ) -> Result<serde_json::Value> {
        self.spawn(cgroup, server, args, seconds)?.wait()
    }

    fn spawn(
        &self,
        cgroup: Option<&Path>,
        server: SocketAddr,
        args: &[&str],
        seconds: f64,
    ) -> Result<Running> {
        interrupt::check()?;
        let mut command = Command::new(&self.bin);
        command.args(["--server", &server.to_string()]).args(args);
        if let Some(cgroup) = cgroup {
            command.arg("--cgroup").arg(cgroup);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        // Read while it runs: its answer (every latency) is larger than a
        // pipe holds, and it would block writing it.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        Ok(Running {
            child: Some(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
            deadline: Instant::now() + Duration::from_secs_f64(seconds) + TIMEOUT + GRACE,
            args: args.join(" "),
        })
    }
}

/// A client running; killed on drop if it has not ended.
struct Running {
    child: Option<Child>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    deadline: Instant,
    args: String,
}

impl Running {
    /// Waits for its end (killed past its bound): its JSON answer.
    fn wait(mut self) -> Result<serde_json::Value> {
        let mut child = self.child.take().context("waited for twice")?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > self.deadline || interrupt::check().is_err() {
                let _ = child.kill();
                let _ = child.wait();
                interrupt::check()?;
                bail!("idgate-bench-dns {} did not end in time", self.args);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        let stdout = join(self.stdout.take());
        let stderr = join(self.stderr.take());
        if !status.success() {
            bail!(
                "idgate-bench-dns {}: {status}: {}",
                self.args,
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        serde_json::from_slice(&stdout).context("the DNS client's answer is not JSON")
    }

    /// [`Running::wait`] for the `gaps` client.
    fn finish(self) -> Result<GapRun> {
        let v = self.wait()?;
        let errors = v["errors"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let lookups = v["lookups"]
            .as_array()
            .context("no lookups")?
            .iter()
            .map(|l| {
                let n = |i: usize| l[i].as_u64().with_context(|| format!("lookup {l}"));
                Ok(GapLookup {
                    start: n(0)?,
                    ns: n(1)?,
                    outcome: n(2)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GapRun { lookups, errors })
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

impl LearnHistogram {
    /// `idgate_dns_learn_seconds` from the agent's metrics endpoint.
    fn read(address: SocketAddr) -> Result<Self> {
        let text = super::events::get_metrics(address)?;
        let name = "idgate_dns_learn_seconds";
        let mut h = Self {
            buckets: Vec::new(),
            count: 0,
            sum: 0.0,
        };
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let value = rest.rsplit(' ').next().unwrap_or("");
            if let Some(le) = rest
                .strip_prefix("_bucket{le=\"")
                .and_then(|r| r.split_once('"'))
                .map(|(le, _)| le)
            {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()
                        .with_context(|| format!("metric line {line:?}"))?
                };
                let n: f64 = value
                    .parse()
                    .with_context(|| format!("metric line {line:?}"))?;
                h.buckets.push((le, n as u64));
            } else if rest.starts_with("_count ") {
                h.count = value.parse::<f64>()? as u64;
            } else if rest.starts_with("_sum ") {
                h.sum = value.parse()?;
            }
        }
        if h.buckets.is_empty() {
            bail!("no {name} on the agent's metrics endpoint");
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::LearnHistogram;

    #[test]
    fn a_quantile_is_its_bucket_bound() {
        let h = LearnHistogram {
            buckets: vec![(1e-6, 10), (2e-6, 90), (4e-6, 99), (f64::INFINITY, 100)],
            count: 100,
            sum: 0.0,
        };
        assert_eq!(h.quantile_bound(0.5), Some(2e-6));
        assert_eq!(h.quantile_bound(0.99), Some(4e-6));
        assert_eq!(h.quantile_bound(1.0), Some(f64::INFINITY));
    }
}
