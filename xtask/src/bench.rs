//! `cargo xtask bench`: what idgate costs, measured on this machine with
//! the release binaries, written to `docs/benchmarks.md`.
//!
//! Five configurations of one workload cgroup, measured interleaved in
//! the same run: (a) nothing attached; (b) an agent with one identity and
//! one rule; (c) an agent with many identities and rules, each identity's
//! cgroup bound; (d) the same rules as nftables `socket cgroupv2` rules;
//! (e) programs that only allow, on idgate's hooks: the floor any policy
//! engine on those hooks pays.
//! Then reload time, the agents' memory and CPU, how fast agent (c)'s
//! control socket and Workload API answer during reloads, binding
//! latency (new cgroup, and exec, to identity) and the event path's
//! throughput. Then the DNS path: lookups through idgate beside the
//! same lookups straight to the upstream, and what names in policy cost
//! (`--only-dns` runs that section alone). Then updates in
//! milliseconds on agent (c): one-rule reloads, grants, full reloads,
//! and its memory over many updates (`--only-updates` runs that section
//! alone, with agent (c)). Then the credential broker: HTTPS requests
//! through it beside the same requests straight to the upstream
//! (`--only-broker` runs that section alone).
//! Everything made here (cgroups, agents and their pins, the nft table,
//! files) is removed at the end, on failure and on Ctrl-C too.

mod agent;
mod binding;
mod broker;
mod cgroups;
mod cost;
mod dns;
mod dnsmasq;
mod events;
mod floor;
mod interrupt;
mod loops;
mod machine;
mod nft;
mod overhead;
mod probe;
mod prog_time;
mod reload;
mod report;
mod responsiveness;
mod rules;
mod updates;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use agent::Agent;
use cost::{MapMemory, ProcSample};
use floor::Floor;
use loops::{Loop, Op};
use machine::Machine;
use overhead::{Config, Judge, Overhead};
use reload::Reloads;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Identities in the large policy, each with a cgroup bound to it.
    #[arg(long, default_value_t = 10_000)]
    identities: usize,
    /// Rules in the large policy, spread evenly over its identities.
    #[arg(long, default_value_t = 100_000)]
    rules: usize,
    /// Interleaved rounds of every configuration; figures are medians.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Most operations per loop run.
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Most seconds per loop run.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Timed reloads of each kind.
    #[arg(long, default_value_t = 5)]
    reloads: usize,
    /// Seconds the idle agents are watched.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// New workloads timed for binding latency, per agent and case (new
    /// cgroup, exec).
    #[arg(long, default_value_t = 1_000)]
    workloads: usize,
    /// Probes of each kind (status, revoke, unrevoke, a Workload API
    /// SVID) timed on agent (c) with no reload, and as many during
    /// reloads.
    #[arg(long, default_value_t = 200)]
    probes: usize,
    /// Most seconds of each of those two phases.
    #[arg(long, default_value_t = 60.0)]
    probe_seconds: f64,
    /// Seconds of connects flat out for the event path.
    #[arg(long, default_value_t = 5.0)]
    event_seconds: f64,
    /// Run only the DNS path's section (7) and put it into the report in
    /// place of the one there; the other sections stay as they are.
    #[arg(long)]
    only_dns: bool,
    /// Run only agent (c) and the updates section (8), and put that
    /// section into the report in place of the one there; the other
    /// sections stay as they are.
    #[arg(long, conflicts_with = "only_dns")]
    only_updates: bool,
    /// Run only the credential broker's section (9) and put it into the
    /// report in place of the one there (or after the others).
    #[arg(long, conflicts_with_all = ["only_dns", "only_updates"])]
    only_broker: bool,
    /// Most requests per broker latency run on one connection (HTTP/1.1,
    /// HTTP/2), each way.
    #[arg(long, default_value_t = 5_000)]
    broker_requests: u64,
    /// Most requests per broker latency run with a new connection each.
    #[arg(long, default_value_t = 300)]
    broker_new_requests: u64,
    /// Most seconds per broker latency run.
    #[arg(long, default_value_t = 10.0)]
    broker_seconds: f64,
    /// Connections held open through the broker for its memory figure.
    #[arg(long, default_value_t = 200)]
    broker_connections: usize,
    /// Server-sent-event streams at once, each way.
    #[arg(long, default_value_t = 10)]
    broker_streams: usize,
    /// Seconds per broker throughput run.
    #[arg(long, default_value_t = 2.0)]
    broker_flood_seconds: f64,
    /// Connections of a broker throughput run of small requests.
    #[arg(long, default_value_t = 16)]
    broker_flood_connections: usize,
    /// Bytes of the large body of the broker throughput runs, and the
    /// connections fetching it.
    #[arg(long, default_value_t = 4 << 20)]
    broker_body_bytes: u64,
    #[arg(long, default_value_t = 4)]
    broker_body_connections: usize,
    /// Timed runs of each small update in the updates section: a reload
    /// after one rule of an exact-ID block changed, the same for a
    /// pattern block, and a grant (each revoked once timed).
    #[arg(long, default_value_t = 50)]
    update_runs: usize,
    /// Timed full reloads of each kind in the updates section (the same
    /// policy again, every rule changed), and as many `idgate policy
    /// check`s.
    #[arg(long, default_value_t = 10)]
    full_reloads: usize,
    /// Grants issued one after another in the updates section, each for
    /// a second, and left to expire: the agent's memory before and after.
    #[arg(long, default_value_t = 1_000)]
    grant_churn: usize,
    /// Names in the DNS upstream's zone, one address each: all looked up
    /// once through idgate first (and so learned), then the latency runs
    /// cycle through them.
    #[arg(long, default_value_t = 20_000)]
    dns_names: u64,
    /// Most lookups per DNS latency run, one at a time.
    #[arg(long, default_value_t = 20_000)]
    dns_queries: u64,
    /// Most seconds per DNS latency run.
    #[arg(long, default_value_t = 10.0)]
    dns_seconds: f64,
    /// Seconds of lookups flat out, per configuration and level.
    #[arg(long, default_value_t = 2.0)]
    dns_flood_seconds: f64,
    /// Lookups kept outstanding at once, one flood run each (up to 4
    /// client threads share them).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,2048")]
    dns_outstanding: Vec<usize>,
    /// A remark put at the top of the report (e.g. how quiet the machine
    /// was).
    #[arg(long)]
    note: Option<String>,
    /// The report, relative to the workspace.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: std::path::PathBuf,
}

/// One agent's cost.
pub struct AgentCost {
    pub start_time: Duration,
    /// After the idle window.
    pub idle: ProcSample,
    /// CPU over the idle window, seconds per second.
    pub idle_cpu: f64,
    pub maps: Vec<MapMemory>,
}

/// Everything a run measured.
pub struct Results {
    pub nft_version: String,
    pub nft_load: Duration,
    pub nft_excerpt: String,
    pub overhead: Overhead,
    /// (a) before anything was attached.
    pub hooks_off: overhead::HooksOff,
    /// idgate's programs' own time per call, `[op][config]`.
    pub prog_times: prog_time::ProgTimes,
    pub small: AgentCost,
    pub large: AgentCost,
    pub reloads: Reloads,
    /// The large agent after the reloads: memory, and its maps with both
    /// policy generations filled.
    pub large_after_reloads: (ProcSample, Vec<MapMemory>),
    /// Agent (c)'s control socket and Workload API, with no reload and
    /// during reloads.
    pub responsiveness: responsiveness::Responsiveness,
    /// Agents (b) and (c).
    pub binding: Vec<binding::Latencies>,
    pub events: events::EventPath,
    pub dns: dns::DnsBench,
    /// Agent (c)'s updates.
    pub updates: updates::Updates,
    pub broker: broker::BrokerBench,
}

pub fn run(args: BenchArgs, root: &Path) -> Result<()> {
    interrupt::install();
    if !is_root() {
        bail!("cargo xtask bench needs root: it loads BPF programs and makes cgroups");
    }
    let started = Instant::now();
    let machine = Machine::describe();
    let nft_version = nft::ensure_installed()?;
    // Map memory, program statistics and the hooks' programs are read
    // with it.
    machine::ensure_tool("bpftool", &["version"], "bpftool")?;
    if args.only_dns {
        return run_dns_only(&args, root, &machine, started);
    }
    if args.only_updates {
        return run_updates_only(&args, root, &machine, started);
    }
    if args.only_broker {
        return run_broker_only(&args, root, &machine, started);
    }
    let results = measure(&args, root, nft_version)?;
    let text = report::render(&args, &machine, &results, started.elapsed());
    let out = root.join(&args.out);
    std::fs::write(&out, text)?;
    eprintln!(
        "bench: wrote {} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--only-dns`: the DNS section alone, put into the report in place of
/// the one there (or after the others).
fn run_dns_only(args: &BenchArgs, root: &Path, machine: &Machine, started: Instant) -> Result<()> {
    let bins = crate::target_dir(root).join("release");
    let lp = Loop {
        bin: bins.join("idgate-bench-loop"),
        count: args.count,
        seconds: args.seconds,
    };
    let ports = Ports::pick()?;
    let tag = format!("idgate-bench-{}", std::process::id());
    let tree = cgroups::Tree::new(&cgroups::cgroup2_root()?, &tag)?;
    let plain = tree.make("none")?;
    let results = dns::measure(
        dns_sizes(args),
        &bins.join("idgate"),
        &bins.join("idgate-bench-dns"),
        &lp,
        &tag,
        &plain,
        &tree,
        &ports.ops(),
        rules::loopback_rule(ports.tcp, ports.udp),
        ports.denied[0],
    )?;
    drop(tree);
    let section = report::dns_alone(args, machine, &results, started.elapsed());
    put_section(args, root, report::DNS_TITLE, &section, started)
}

/// `--only-updates`: agent (c) alone and the updates section, put into
/// the report in place of the one there (or after the others).
fn run_updates_only(
    args: &BenchArgs,
    root: &Path,
    machine: &Machine,
    started: Instant,
) -> Result<()> {
    check_sizes(args)?;
    let bins = crate::target_dir(root).join("release");
    let lp = Loop {
        bin: bins.join("idgate-bench-loop"),
        count: args.count,
        seconds: args.seconds,
    };
    let ports = Ports::pick()?;
    let mut large_ids = rules::generate(
        args.identities,
        args.rules,
        rules::loopback_rule(ports.tcp, ports.udp),
    );
    let tag = format!("idgate-bench-{}", std::process::id());
    let tree = cgroups::Tree::new(&cgroups::cgroup2_root()?, &tag)?;
    let large = start_agent(&bins.join("idgate"), &tag, "large", &large_ids, "")?;
    let results = updates::measure(
        &large,
        &mut large_ids,
        &lp,
        ports.denied[0],
        update_sizes(args),
    )?;
    drop(large);
    drop(tree);
    let section = report::updates_alone(args, machine, &results, started.elapsed());
    put_section(args, root, report::UPDATES_TITLE, &section, started)
}

/// `--only-broker`: the credential broker's section alone, put into the
/// report in place of the one there (or after the others).
fn run_broker_only(
    args: &BenchArgs,
    root: &Path,
    machine: &Machine,
    started: Instant,
) -> Result<()> {
    let bins = crate::target_dir(root).join("release");
    let tag = format!("idgate-bench-{}", std::process::id());
    let tree = cgroups::Tree::new(&cgroups::cgroup2_root()?, &tag)?;
    let results = broker::measure(broker_sizes(args), &bins, &tag, &tree)?;
    drop(tree);
    let section = report::broker_alone(args, machine, &results, started.elapsed());
    put_section(args, root, report::BROKER_TITLE, &section, started)
}

/// Puts `section` (titled `title`) into the report in place of the one
/// there.
fn put_section(
    args: &BenchArgs,
    root: &Path,
    title: &str,
    section: &str,
    started: Instant,
) -> Result<()> {
    let out = root.join(&args.out);
    let old = std::fs::read_to_string(&out).unwrap_or_default();
    std::fs::write(&out, report::replace_section(&old, title, section))?;
    eprintln!(
        "bench: put section {:?} into {} in {:.0} s",
        title.trim(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn update_sizes(args: &BenchArgs) -> updates::Sizes {
    updates::Sizes {
        runs: args.update_runs,
        full_reloads: args.full_reloads,
        churn: args.grant_churn,
    }
}

/// Starts agent `name` of this run (`tag`): a directory, a scope below
/// the run's cgroup tree and pins of its own, every identity's cgroup
/// bound, its DNS path on (as by default) with listeners on a port of
/// its own (two agents cannot share one; their workloads make no
/// lookups, so the upstream is never asked), then `tables`.
fn start_agent(
    idgate: &Path,
    tag: &str,
    name: &str,
    identities: &[rules::Identity],
    tables: &str,
) -> Result<Agent> {
    eprintln!(
        "bench: starting agent {name} ({} identities)",
        identities.len()
    );
    let tables = format!(
        "{tables}\n[dns]\nlisten_port = {}\nupstreams = [\"127.0.0.1:53\"]\n",
        dns::free_dual_port()?
    );
    Agent::start(
        idgate,
        std::env::temp_dir().join(format!("{tag}-{name}")),
        &format!("{tag}/{name}"),
        Path::new("/sys/fs/bpf").join(format!("{tag}-{name}")),
        identities,
        &tables,
    )
}

fn broker_sizes(args: &BenchArgs) -> broker::Sizes {
    broker::Sizes {
        rounds: args.rounds,
        requests: args.broker_requests,
        new_requests: args.broker_new_requests,
        seconds: args.broker_seconds,
        connections: args.broker_connections,
        streams: args.broker_streams,
        flood_seconds: args.broker_flood_seconds,
        flood_connections: args.broker_flood_connections,
        body_bytes: args.broker_body_bytes,
        body_connections: args.broker_body_connections,
    }
}

fn dns_sizes(args: &BenchArgs) -> dns::Sizes {
    dns::Sizes {
        names: args.dns_names,
        queries: args.dns_queries,
        seconds: args.dns_seconds,
        flood_seconds: args.dns_flood_seconds,
        outstanding: args.dns_outstanding.clone(),
        rounds: args.rounds,
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, as the benchmark's clients read it
/// (the same clock in every process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sets everything up, measures, and tears it down (the guards are
/// dropped in reverse order: agents, nft table, cgroups).
fn measure(args: &BenchArgs, root: &Path, nft_version: String) -> Result<Results> {
    check_sizes(args)?;
    if args.probes == 0 || args.probe_seconds <= 0.0 {
        bail!("--probes and --probe-seconds must be above 0");
    }
    if args.workloads == 0 || args.event_seconds <= 0.0 {
        bail!("--workloads and --event-seconds must be above 0");
    }
    let bins = crate::target_dir(root).join("release");
    let idgate = bins.join("idgate");
    let lp = Loop {
        bin: bins.join("idgate-bench-loop"),
        count: args.count,
        seconds: args.seconds,
    };
    let ports = Ports::pick()?;
    let first = rules::loopback_rule(ports.tcp, ports.udp);
    let small_ids = rules::generate(1, 1, first.clone());
    let mut large_ids = rules::generate(args.identities, args.rules, first.clone());

    let tag = format!("idgate-bench-{}", std::process::id());
    let cgroup_root = cgroups::cgroup2_root()?;
    let tree = cgroups::Tree::new(&cgroup_root, &tag)?;
    let plain = tree.make("none")?;
    let hooks_off = overhead::measure_hooks_off(&lp, &plain, &ports.ops(), args.rounds)?;
    eprintln!("bench: making {} cgroups for nftables", large_ids.len());
    let mut nft_workloads = Vec::with_capacity(large_ids.len());
    for identity in &large_ids {
        interrupt::check()?;
        nft_workloads.push((identity, tree.make(&format!("nft/{}", identity.cgroup))?));
    }
    let nft_name = tag.replace('-', "_");
    eprintln!("bench: loading the nftables table");
    let table = nft::Table::load(&nft_name, &cgroup_root, &nft_workloads)?;
    let nft_excerpt = nft::excerpt(&nft_name, &cgroup_root, nft_workloads[0].clone())?;
    drop(nft_workloads);

    let start_agent = |name: &str, identities: &[rules::Identity], tables: &str| {
        start_agent(&idgate, &tag, name, identities, tables)
    };
    let small = start_agent("small", &small_ids, "")?;
    let large = start_agent("large", &large_ids, "")?;
    eprintln!("bench: attaching the empty programs");
    let floor = Floor::attach(&tree.make("floor")?)?;
    let workload = &large_ids[0].cgroup;
    let configs = [
        Config {
            name: "(a) no program attached".into(),
            cgroup: plain.clone(),
            judge: Judge::Nothing,
        },
        Config {
            name: "(b) idgate, 1 identity, 1 rule".into(),
            cgroup: tree.path(&format!("small/{workload}")),
            judge: Judge::Idgate(&small),
        },
        Config {
            name: format!(
                "(c) idgate, {} identities, {} rules",
                thousands(args.identities),
                thousands(args.rules)
            ),
            cgroup: tree.path(&format!("large/{workload}")),
            judge: Judge::Idgate(&large),
        },
        Config {
            name: format!("(d) nftables, the same {} rules", thousands(args.rules)),
            cgroup: tree.path(&format!("nft/{workload}")),
            judge: Judge::Nftables(&table),
        },
        Config {
            name: "(e) an empty program on the same hooks".into(),
            cgroup: tree.path("floor"),
            judge: Judge::Floor(&floor),
        },
    ];
    check_in_force(&lp, &configs, ports.denied)?;

    eprintln!(
        "bench: watching the idle agents for {} s",
        args.idle_seconds
    );
    let idle = Duration::from_secs(args.idle_seconds);
    let before = [cost::sample(small.pid())?, cost::sample(large.pid())?];
    interrupt::sleep(idle)?;
    let agent_cost = |agent: &Agent, before: ProcSample| -> Result<AgentCost> {
        let after = cost::sample(agent.pid())?;
        Ok(AgentCost {
            start_time: agent.start_time,
            idle: after,
            idle_cpu: (after.cpu_seconds - before.cpu_seconds) / idle.as_secs_f64(),
            maps: cost::maps(agent.pid())?,
        })
    };
    let small_cost = agent_cost(&small, before[0])?;
    let large_cost = agent_cost(&large, before[1])?;

    let overhead = overhead::measure(&lp, &configs, &ports.ops(), args.rounds)?;
    let prog_times = prog_time::measure(&lp, &configs, &ports.ops())?;
    // (e) is measured: its programs leave the hooks.
    drop(floor);

    eprintln!("bench: timing {} reloads of each kind", args.reloads);
    let reloads = reload::measure(&large, &mut large_ids, args.reloads)?;
    let large_after_reloads = (cost::sample(large.pid())?, cost::maps(large.pid())?);
    eprintln!(
        "bench: probing agent (c) with no reload and during reloads ({} of each kind, at most {} s each)",
        args.probes, args.probe_seconds
    );
    let responsiveness =
        responsiveness::measure(&large, &mut large_ids, args.probes, args.probe_seconds)?;
    let updates = updates::measure(
        &large,
        &mut large_ids,
        &lp,
        ports.denied[0],
        update_sizes(args),
    )?;

    let udp: SocketAddr = (Ipv4Addr::LOCALHOST, ports.udp).into();
    let binding = [("(b)", &small), ("(c)", &large)]
        .into_iter()
        .map(|(name, agent)| {
            binding::measure(
                agent,
                name,
                &lp.bin,
                &plain,
                first.clone(),
                udp,
                args.workloads,
            )
        })
        .collect::<Result<Vec<_>>>()?;

    let metrics = events::free_metrics_address()?;
    let events_agent = start_agent("events", &small_ids, &events::agent_tables(metrics))?;
    let events = events::measure(
        &events_agent,
        metrics,
        &lp,
        &tree.path(&format!("events/{}", small_ids[0].cgroup)),
        udp,
        args.event_seconds,
    )?;
    drop(events_agent);
    let dns = dns::measure(
        dns_sizes(args),
        &idgate,
        &bins.join("idgate-bench-dns"),
        &lp,
        &tag,
        &plain,
        &tree,
        &ports.ops(),
        first.clone(),
        ports.denied[0],
    )?;
    let broker = broker::measure(broker_sizes(args), &bins, &tag, &tree)?;
    Ok(Results {
        nft_version,
        nft_load: table.load_time,
        nft_excerpt,
        overhead,
        hooks_off,
        prog_times,
        small: small_cost,
        large: large_cost,
        reloads,
        large_after_reloads,
        responsiveness,
        binding,
        events,
        dns,
        updates,
        broker,
    })
}

/// Checks the sizes agent (c) and the updates section need.
fn check_sizes(args: &BenchArgs) -> Result<()> {
    if args.identities < 2 || args.rules < args.identities {
        bail!("--rules must be at least --identities, and --identities at least 2");
    }
    if args.update_runs == 0 || args.full_reloads == 0 {
        bail!("--update-runs and --full-reloads must be above 0");
    }
    Ok(())
}

/// Proof that each configuration judges its workload: a UDP send to a
/// port no rule allows goes through with nothing attached and under the
/// empty programs (which bpftool must show on the workload's cgroup), and
/// fails with EPERM under idgate and nftables.
fn check_in_force(lp: &Loop, configs: &[Config<'_>], denied: [SocketAddr; 2]) -> Result<()> {
    for config in configs {
        let expect = match config.judge {
            Judge::Nothing | Judge::Floor(_) => "ok",
            Judge::Idgate(_) | Judge::Nftables(_) => "eperm",
        };
        if let Judge::Floor(floor) = config.judge {
            floor.check()?;
        }
        if let Judge::Nftables(table) = config.judge {
            table.hook()?;
        }
        let checked = denied
            .iter()
            .filter(|addr| addr.is_ipv4() || has_ipv6())
            .try_for_each(|addr| lp.check(&config.cgroup, *addr, expect));
        if let Judge::Nftables(table) = config.judge {
            table.unhook()?;
        }
        checked?;
    }
    Ok(())
}

/// Whether IPv6 loopback is usable here.
fn has_ipv6() -> bool {
    UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// Loopback ports for the loops: TCP and UDP ones the workload may reach,
/// and a UDP one it may not. Free on IPv4 and IPv6 when they are picked.
struct Ports {
    tcp: u16,
    udp: u16,
    denied: [SocketAddr; 2],
}

impl Ports {
    fn pick() -> Result<Self> {
        let any: SocketAddr = if has_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let tcp = TcpListener::bind(any)?.local_addr()?.port();
        let udp = UdpSocket::bind(any)?;
        // Held while the next is picked, so it is not picked again; the
        // denied port must not be the TCP one either (the loopback rule
        // allows that port for UDP too).
        let mut held = Vec::new();
        let denied = loop {
            let socket = UdpSocket::bind(any)?;
            let port = socket.local_addr()?.port();
            held.push(socket);
            if port != tcp {
                break port;
            }
            if held.len() > 10 {
                bail!("no free UDP port apart from {tcp}");
            }
        };
        Ok(Self {
            tcp,
            udp: udp.local_addr()?.port(),
            denied: [
                (Ipv4Addr::LOCALHOST, denied).into(),
                (Ipv6Addr::LOCALHOST, denied).into(),
            ],
        })
    }

    /// Every operation with its destination: IPv4, then IPv6 if usable.
    fn ops(&self) -> Vec<(Op, SocketAddr)> {
        let mut hosts = vec![std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if has_ipv6() {
            hosts.push(Ipv6Addr::LOCALHOST.into());
        }
        hosts
            .into_iter()
            .flat_map(|host| {
                Op::ALL.map(|op| {
                    let port = match op {
                        Op::TcpConnect => self.tcp,
                        Op::UdpConnect | Op::UdpSendto => self.udp,
                    };
                    (op, SocketAddr::new(host, port))
                })
            })
            .collect()
    }
}

/// `10000` as `10,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_separates() {
        assert_eq!(super::thousands(100_000), "100,000");
        assert_eq!(super::thousands(999), "999");
    }
}
