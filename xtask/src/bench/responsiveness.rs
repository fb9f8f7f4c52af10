//! Responsiveness of agent (c) while it reloads its whole policy: how
//! long an operator's `idgate status`, `idgate revoke` and `idgate
//! unrevoke`, and a workload's new Workload API `FetchX509SVID` stream
//! (to its first message), take from start to answer, with no reload and
//! while a reload is in flight.
//!
//! Every probe is a real client started afresh (`idgate svid` in a bound
//! cgroup for the Workload API), timed from spawn to exit, one after
//! another from one thread, kinds in turn. Meanwhile [`POLLERS`] threads
//! run `idgate status` again and again, as a DaemonSet's readiness and
//! liveness probes and an operator would. The two phases alternate: a
//! burst of probes with no reload, then a reload with probes taken while
//! it runs, and again, each phase to its count or time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::interrupt;
use super::reload;
use super::rules::Identity;

/// Threads polling `idgate status` throughout.
pub const POLLERS: usize = 3;
/// Each poller's pause between an answer and its next call.
pub const POLL_PAUSE: Duration = Duration::from_millis(100);
/// From starting `idgate policy reload` to the first probe that may
/// count as during it: time for that CLI to start and send its request.
pub const SETTLE: Duration = Duration::from_millis(20);
/// From a reload's reply to the next probe that counts as with no
/// reload: time for the agent to finish whatever follows the reply.
pub const QUIET: Duration = Duration::from_millis(100);
/// How long the first SVID may take (its trust domain's CA is made then).
const FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than both phases' bounds a poller may run if the
/// section does not stop it (it always does unless it panics).
const POLLERS_BACKSTOP: Duration = Duration::from_secs(300);

/// What a probe does; one of each in a turn, in this order (the revoked
/// identity stays revoked from its revoke to its unrevoke).
#[derive(Clone, Copy)]
pub enum Probe {
    Status,
    Revoke,
    Svid,
    Unrevoke,
}

impl Probe {
    pub const ALL: [Probe; 4] = [Probe::Status, Probe::Revoke, Probe::Svid, Probe::Unrevoke];
}

/// Nanoseconds per probe, `[Probe as usize]`.
pub type ByProbe = [Vec<u64>; 4];

pub struct Responsiveness {
    /// Probes with no reload in flight.
    pub idle: ByProbe,
    /// Probes started while a reload was in flight.
    pub reloading: ByProbe,
    /// Probes of the reload phase that started after their reload had
    /// replied: not counted.
    pub late: usize,
    /// Each reload of the section, spawn to reply.
    pub reloads: Vec<Duration>,
    /// `idgate status` calls the pollers made.
    pub polls: u64,
    /// The identity revoked and unrevoked.
    pub revoked: String,
    /// The identity whose cgroup `idgate svid` runs in.
    pub svid_identity: String,
}

/// Measures agent `agent`, whose policy is `identities` (at least two:
/// the first one's cgroup fetches SVIDs, the last one is revoked and its
/// last rule changes from reload to reload): up to `probes` of each kind
/// per phase, at most `seconds` per phase.
pub fn measure(
    agent: &Agent,
    identities: &mut [Identity],
    probes: usize,
    seconds: f64,
) -> Result<Responsiveness> {
    let [first, .., last] = identities else {
        bail!("the responsiveness probes need two identities");
    };
    let (svid_identity, revoked) = (first.id.clone(), last.id.clone());
    let cgroup = super::cgroups::cgroup2_root()?
        .join(&agent.scope)
        .join(&first.cgroup);
    // The trust domain's CA is made when its first SVID is asked for:
    // until then the Workload API answers Unavailable.
    let deadline = Instant::now() + FIRST_SVID_TIMEOUT;
    let first_svid = loop {
        interrupt::check()?;
        match agent.svid_in(&cgroup) {
            Ok(out) => break out,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.context(format!("no SVID within {FIRST_SVID_TIMEOUT:?}"))),
        }
    };
    let reply: serde_json::Value =
        serde_json::from_str(&first_svid).context("`idgate svid --json` printed no JSON")?;
    if reply["spiffe_id"] != svid_identity.as_str() {
        bail!(
            "`idgate svid` in {} got {}, not {svid_identity}",
            cgroup.display(),
            reply["spiffe_id"]
        );
    }
    let phase = Duration::from_secs_f64(seconds);
    let stop = AtomicBool::new(false);
    let until = Instant::now() + 2 * phase + POLLERS_BACKSTOP;
    let (phases, polls) = std::thread::scope(|s| {
        let pollers: Vec<_> = (0..POLLERS)
            .map(|_| s.spawn(|| poll(agent, &stop, until)))
            .collect();
        let prober = Prober {
            agent,
            cgroup: &cgroup,
            revoked: &revoked,
            turn: 0,
            is_revoked: false,
        };
        let phases = prober.run(identities, probes, phase);
        stop.store(true, Ordering::Relaxed);
        let polls = pollers
            .into_iter()
            .map(|p| p.join().expect("a status poller panicked"))
            .sum::<Result<u64>>();
        (phases, polls)
    });
    let (idle, reloading, late, reloads) = phases?;
    Ok(Responsiveness {
        idle,
        reloading,
        late,
        reloads,
        polls: polls.context("a status poller failed")?,
        revoked,
        svid_identity,
    })
}

/// `idgate status`, again [`POLL_PAUSE`] after each answer, until `stop`
/// (or `until`); the calls made.
fn poll(agent: &Agent, stop: &AtomicBool, until: Instant) -> Result<u64> {
    let mut polls = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        interrupt::check()?;
        agent.cli(&["status"])?;
        polls += 1;
        std::thread::sleep(POLL_PAUSE);
    }
    Ok(polls)
}

type Phases = (ByProbe, ByProbe, usize, Vec<Duration>);

struct Prober<'a> {
    agent: &'a Agent,
    /// The cgroup `idgate svid` runs in.
    cgroup: &'a Path,
    revoked: &'a str,
    /// Probes taken so far: the next one's kind.
    turn: usize,
    /// Whether `revoked` is revoked now (from its revoke to its unrevoke).
    is_revoked: bool,
}

impl Prober<'_> {
    /// Alternates a burst of probes with no reload (at least one turn, and
    /// as long as the last reload took) and a reload with probes while it
    /// runs, each phase until it has `probes` of each kind or has taken
    /// `phase`. Leaves the revoked identity unrevoked.
    fn run(
        mut self,
        identities: &mut [Identity],
        probes: usize,
        phase: Duration,
    ) -> Result<Phases> {
        let mut idle = ByProbe::default();
        let mut reloading = ByProbe::default();
        let (mut idle_time, mut reload_time) = (Duration::ZERO, Duration::ZERO);
        let mut late = 0;
        let mut reloads = Vec::new();
        let short = |by: &ByProbe| by.iter().any(|ns| ns.len() < probes);
        loop {
            let more_idle = short(&idle) && idle_time < phase;
            let more_reloading = short(&reloading) && reload_time < phase;
            if !more_idle && !more_reloading {
                break;
            }
            if more_idle {
                let started = Instant::now();
                let burst = reloads.last().copied().unwrap_or_default();
                loop {
                    for _ in Probe::ALL {
                        let (probe, _, ns) = self.take()?;
                        idle[probe as usize].push(ns);
                    }
                    if started.elapsed() >= burst {
                        break;
                    }
                }
                idle_time += started.elapsed();
            }
            if more_reloading {
                reload::change_one_rule(self.agent, identities, reloads.len())?;
                let started = Instant::now();
                let ((end, took), taken) = std::thread::scope(|s| -> Result<_> {
                    let agent = self.agent;
                    let running = s.spawn(move || {
                        let spawned = Instant::now();
                        reload::reload(agent).map(|took| (spawned + took, took))
                    });
                    std::thread::sleep(SETTLE);
                    let mut taken = Vec::new();
                    while !running.is_finished() {
                        taken.push(self.take()?);
                    }
                    let done = running.join().expect("the reload thread panicked")?;
                    Ok((done, taken))
                })?;
                reloads.push(took);
                reload_time += started.elapsed();
                for (probe, at, ns) in taken {
                    if at < end {
                        reloading[probe as usize].push(ns);
                    } else {
                        late += 1;
                    }
                }
                interrupt::sleep(QUIET)?;
            }
        }
        if self.is_revoked {
            self.agent.cli(&["unrevoke", self.revoked])?;
        }
        Ok((idle, reloading, late, reloads))
    }

    /// The next probe in turn: its kind, start and nanoseconds.
    fn take(&mut self) -> Result<(Probe, Instant, u64)> {
        interrupt::check()?;
        let probe = Probe::ALL[self.turn % Probe::ALL.len()];
        self.turn += 1;
        let started = Instant::now();
        match probe {
            Probe::Status => self.agent.cli(&["status"]),
            Probe::Revoke => self.agent.cli(&["revoke", self.revoked]),
            Probe::Unrevoke => self.agent.cli(&["unrevoke", self.revoked]),
            Probe::Svid => self.agent.svid_in(self.cgroup),
        }?;
        match probe {
            Probe::Revoke => self.is_revoked = true,
            Probe::Unrevoke => self.is_revoked = false,
            Probe::Status | Probe::Svid => {}
        }
        Ok((probe, started, started.elapsed().as_nanos() as u64))
    }
}
