//! Updates in milliseconds (issue 17): how long agent (c) takes to put a
//! small change in force (one rule of a policy file, or an operator's
//! grant), beside reloads of its whole policy, and whether its memory
//! grows with the number of updates.
//!
//! Every update is made with the real CLI and timed from its spawn to
//! its reply. A grant is also timed as a workload sees it: a probe
//! (`idgate-bench-loop --op wait-allowed`, polling a UDP `connect()` as
//! the binding probe does) waits in the cgroup bound to the identity,
//! denied, from before the grant is asked for to the first connect the
//! kernel allows. The order: timed grants, the grant churn (many short
//! grants left to expire), one-rule reloads of an exact-ID block and of a
//! pattern block, `idgate policy check`s, full reloads; the agent's
//! memory is read before and after each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::cost::{self, ProcSample};
use super::interrupt;
use super::loops::Loop;
use super::monotonic_ns;
use super::probe::ProbeProcess;
use super::reload;
use super::rules::{self, Identity, Protocol, Rule};
use super::thousands;

/// The pattern block's ID: it matches none of the bench's identities
/// (`spiffe://bench.test/id/N`).
pub const PATTERN: &str = "spiffe://bench.test/pattern/*";
/// The pattern block's policy file.
const PATTERN_FILE: &str = "pattern.toml";
/// How long a timed grant runs (it is revoked once timed).
pub const GRANT_FOR: &str = "60s";
/// How long each grant of the churn runs.
pub const CHURN_FOR: &str = "1s";
/// The churn's grants' destination port and protocol (the address is
/// `192.0.2.N`, TEST-NET-1).
pub const CHURN_PORT: u16 = 9;
/// The longest a probe may wait for its grant, and the churn may take to
/// be issued, before the benchmark fails.
const TIMEOUT: Duration = Duration::from_secs(30);
const CHURN_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest the churn's grants may take to be gone from `idgate
/// grants` after the last was issued (each runs [`CHURN_FOR`]; the agent
/// sweeps expired grants on its tick).
const EXPIRY_TIMEOUT: Duration = Duration::from_secs(60);

/// How many of each measurement.
pub struct Sizes {
    /// Timed one-rule reloads of each kind, and timed grants.
    pub runs: usize,
    /// Timed full reloads of each kind, and `idgate policy check`s.
    pub full_reloads: usize,
    /// Grants of the churn.
    pub churn: usize,
}

pub struct Updates {
    pub sizes: Sizes,
    /// Agent (c)'s start: spawn to its first answer.
    pub start_time: Duration,
    /// The exact-ID block whose rule changes, and the pattern block's
    /// rules.
    pub exact: String,
    pub pattern_rules: usize,
    /// Spawn to reply, ns, of each reload: one rule of the exact-ID
    /// block, one rule of the pattern block, the same policy again, every
    /// rule changed; and of each `idgate policy check`.
    pub one_rule: Vec<u64>,
    pub pattern_rule: Vec<u64>,
    pub unchanged: Vec<u64>,
    pub every_rule: Vec<u64>,
    pub check: Vec<u64>,
    pub grants: Grants,
    pub churn: Churn,
    /// The agent's memory at the start and after each step, with what
    /// the step was.
    pub memory: Vec<(String, ProcSample)>,
    /// `/proc/loadavg`'s first three figures at the section's start and
    /// end: how busy the machine was.
    pub load: (String, String),
}

pub struct Grants {
    /// The identity granted to, and the destination.
    pub identity: String,
    pub addr: SocketAddr,
    /// From just before `idgate grant` is spawned to the probe's first
    /// allowed connect, ns.
    pub first_allowed: Vec<u64>,
    /// `idgate grant`, spawn to reply, ns.
    pub cli: Vec<u64>,
    /// `idgate grant --revoke`, spawn to reply, ns.
    pub revoke: Vec<u64>,
    /// Polls after the first, and the time from the first to the last
    /// poll, ns, over every probe: their ratio is the poll interval.
    pub repolls: u64,
    pub polling_ns: u64,
}

pub struct Churn {
    /// Grants issued, and the time it took.
    pub issued: usize,
    pub issuing: Duration,
    /// From the last grant's reply to `idgate grants` listing none.
    pub drained: Duration,
    /// The agent's memory just before the first grant and once none was
    /// listed.
    pub before: ProcSample,
    pub after: ProcSample,
}

/// Measures agent `agent`, whose policy is `identities` (the first one's
/// cgroup is bound and empty, its first rule the loopback one; the last
/// one's last rule changes from reload to reload). `denied` is a UDP
/// destination no rule of the first identity covers; `lp` runs the
/// probes and checks.
pub fn measure(
    agent: &Agent,
    identities: &mut [Identity],
    lp: &Loop,
    denied: SocketAddr,
    sizes: Sizes,
) -> Result<Updates> {
    if identities.len() < 2 {
        bail!("the updates section needs two identities");
    }
    let load = super::dns::load_average();
    let pid = agent.pid();
    let mut memory = vec![("start".to_owned(), cost::sample(pid)?)];
    let mut note = |what: String| -> Result<()> {
        memory.push((what, cost::sample(pid)?));
        Ok(())
    };

    eprintln!("bench: updates: {} timed grants", sizes.runs);
    let grants = time_grants(agent, &identities[0], lp, denied, sizes.runs)?;
    note(format!(
        "{} timed grants, each revoked",
        thousands(sizes.runs)
    ))?;
    eprintln!(
        "bench: updates: {} grants for {CHURN_FOR} each, left to expire",
        sizes.churn
    );
    let churn = churn(agent, &identities[1..], sizes.churn)?;
    note(format!(
        "{} grants for {CHURN_FOR}, and their expiries",
        thousands(churn.issued)
    ))?;

    eprintln!(
        "bench: updates: {} one-rule reloads of each kind",
        sizes.runs
    );
    let mut pattern = pattern_block();
    let write_pattern = |pattern: &Identity| {
        agent.write_policy(
            PATTERN_FILE,
            &rules::extra_policy_file(std::slice::from_ref(pattern)),
        )
    };
    write_pattern(&pattern)?;
    reload::reload(agent).context("adding the pattern block")?;
    let one_rule = reload::changed(
        sizes.runs,
        |step| reload::change_one_rule(agent, identities, step),
        || reload::reload(agent),
    )?;
    note(format!(
        "the pattern block added, and {} reloads of one exact-ID rule",
        sizes.runs
    ))?;
    let pattern_rule = reload::changed(
        sizes.runs,
        |step| {
            let rule = pattern
                .rules
                .last_mut()
                .expect("the pattern block has rules");
            reload::shift_ports(&mut rule.ports[0], step);
            write_pattern(&pattern)
        },
        || reload::reload(agent),
    )?;
    note(format!("{} reloads of one pattern rule", sizes.runs))?;

    eprintln!(
        "bench: updates: {} full reloads of each kind",
        sizes.full_reloads
    );
    let check = reload::checks(agent, sizes.full_reloads)?;
    let unchanged = reload::changed(sizes.full_reloads, |_| Ok(()), || reload::reload(agent))?;
    note(format!("{} reloads of the same policy", sizes.full_reloads))?;
    let every_rule = reload::changed(
        sizes.full_reloads,
        |step| reload::change_every_rule(agent, identities, step),
        || reload::reload(agent),
    )?;
    note(format!(
        "{} reloads with every rule changed",
        sizes.full_reloads
    ))?;

    let ns = |runs: Vec<Duration>| runs.iter().map(|d| d.as_nanos() as u64).collect();
    Ok(Updates {
        sizes,
        start_time: agent.start_time,
        exact: identities[identities.len() - 1].id.clone(),
        pattern_rules: pattern.rules.len(),
        one_rule: ns(one_rule),
        pattern_rule: ns(pattern_rule),
        unchanged: ns(unchanged),
        every_rule: ns(every_rule),
        check: ns(check),
        grants,
        churn,
        memory,
        load: (load, super::dns::load_average()),
    })
}

/// The pattern block: two rules (an IPv4 and an IPv6 network, TCP),
/// which no bound identity gets.
fn pattern_block() -> Identity {
    let rule = |name: &str, to: IpAddr, prefix: u8, port: u16| Rule {
        name: name.into(),
        to: vec![(to, prefix)],
        ports: vec![(port, port)],
        protocol: Protocol::Tcp,
    };
    Identity {
        id: PATTERN.into(),
        cgroup: String::new(),
        rules: vec![
            rule("pattern-v4", Ipv4Addr::new(10, 254, 0, 0).into(), 16, 8443),
            rule(
                "pattern-v6",
                Ipv6Addr::new(0xfd00, 0xfe, 0, 0, 0, 0, 0, 0).into(),
                32,
                8443,
            ),
        ],
    }
}

/// `runs` grants of `denied` (UDP) to `identity`, each timed from just
/// before `idgate grant` is spawned to a waiting probe's first allowed
/// connect from the identity's cgroup, then revoked; the destination
/// must be denied before each grant and again after each revoke.
fn time_grants(
    agent: &Agent,
    identity: &Identity,
    lp: &Loop,
    denied: SocketAddr,
    runs: usize,
) -> Result<Grants> {
    let cgroup = super::cgroups::cgroup2_root()?
        .join(&agent.scope)
        .join(&identity.cgroup);
    let (to, port) = (denied.ip().to_string(), denied.port().to_string());
    let mut grants = Grants {
        identity: identity.id.clone(),
        addr: denied,
        first_allowed: Vec::with_capacity(runs),
        cli: Vec::with_capacity(runs),
        revoke: Vec::with_capacity(runs),
        repolls: 0,
        polling_ns: 0,
    };
    for _ in 0..runs {
        interrupt::check()?;
        let probe = Probe::start(&lp.bin, &cgroup, denied)?;
        let t0 = monotonic_ns();
        let started = Instant::now();
        let reply = agent.cli(&[
            "grant",
            "--identity",
            &identity.id,
            "--to",
            &to,
            "--ports",
            &port,
            "--protocol",
            "udp",
            "--for",
            GRANT_FOR,
            "--json",
        ])?;
        grants.cli.push(started.elapsed().as_nanos() as u64);
        let (allowed_at, polls, polling) = probe.finish()?;
        grants.first_allowed.push(allowed_at.saturating_sub(t0));
        grants.repolls += polls - 1;
        grants.polling_ns += polling;

        let reply: serde_json::Value = serde_json::from_str(&reply)
            .with_context(|| format!("`idgate grant --json` replied no JSON: {reply}"))?;
        let id = reply["grant"]["id"]
            .as_u64()
            .with_context(|| format!("no grant id in {reply}"))?;
        if reply["grant"]["slot"].is_null() {
            bail!("the grant is not in force (its identity holds no slot): {reply}");
        }
        let started = Instant::now();
        agent.cli(&["grant", "--revoke", &id.to_string()])?;
        grants.revoke.push(started.elapsed().as_nanos() as u64);
        lp.check(&cgroup, denied, "eperm")
            .context("the destination after the grant's revoke")?;
    }
    Ok(grants)
}

/// A probe waiting in a bound cgroup, denied, until a connect is allowed.
struct Probe {
    process: ProbeProcess,
    what: String,
}

impl Probe {
    /// Starts it and waits until it has been denied once.
    fn start(bin: &Path, cgroup: &Path, addr: SocketAddr) -> Result<Self> {
        let what = format!("wait-allowed in {}", cgroup.display());
        let process = ProbeProcess::start(
            Command::new(bin)
                .args(["--op", "wait-allowed", "--cgroup"])
                .arg(cgroup)
                .args(["--addr", &addr.to_string()])
                .args(["--seconds", &TIMEOUT.as_secs_f64().to_string()]),
            "denied",
            &what,
        )?;
        Ok(Self { process, what })
    }

    /// Waits for its answer (it ends within its own timeout): the
    /// `CLOCK_MONOTONIC` ns of the first allowed connect, the polls, and
    /// the ns from the first poll to the last.
    fn finish(mut self) -> Result<(u64, u64, u64)> {
        let [allowed_at, polls, polling] = self
            .process
            .answer(&self.what, ["allowed_at_ns", "polls", "polling_ns"])?;
        Ok((allowed_at, polls, polling))
    }
}

/// `count` grants of [`CHURN_FOR`] each, one after another (to the
/// identities in turn, each to another `192.0.2.N`), then waits until
/// `idgate grants` lists none.
fn churn(agent: &Agent, identities: &[Identity], count: usize) -> Result<Churn> {
    let before = cost::sample(agent.pid())?;
    let started = Instant::now();
    let port = CHURN_PORT.to_string();
    let mut issued = 0;
    while issued < count {
        interrupt::check()?;
        if started.elapsed() > CHURN_TIMEOUT {
            bail!("{issued} of {count} grants issued in {CHURN_TIMEOUT:?}");
        }
        let identity = &identities[issued % identities.len()];
        let to = format!("192.0.2.{}", issued % 256);
        agent.cli(&[
            "grant",
            "--identity",
            &identity.id,
            "--to",
            &to,
            "--ports",
            &port,
            "--protocol",
            "tcp",
            "--for",
            CHURN_FOR,
            "--reason",
            "bench churn",
        ])?;
        issued += 1;
    }
    let issuing = started.elapsed();
    let last = Instant::now();
    loop {
        interrupt::check()?;
        let reply = agent.cli(&["grants", "--json"])?;
        let reply: serde_json::Value = serde_json::from_str(&reply)
            .with_context(|| format!("`idgate grants --json` replied no JSON: {reply}"))?;
        let live = reply["grants"]
            .as_array()
            .with_context(|| format!("no grants in {reply}"))?
            .len();
        if live == 0 {
            break;
        }
        if last.elapsed() > EXPIRY_TIMEOUT {
            bail!("{live} grants still listed {EXPIRY_TIMEOUT:?} after the last was issued");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let drained = last.elapsed();
    Ok(Churn {
        issued,
        issuing,
        drained,
        before,
        after: cost::sample(agent.pid())?,
    })
}
