//! Binding latency: how long a new workload waits for its identity, end
//! to end, as the workload sees it: from just before its cgroup is made
//! (or just before its process execs the program an entry names) to its
//! first `connect()` the kernel allows (EPERM until then: an unbound
//! cgroup is an unknown workload, denied).
//!
//! Two registration entries are added to a running agent (with a policy
//! for their identity, one rule allowing the loopback port): one matches
//! `cgroup:path:/SCOPE/bind-create/c*`, found by the agent's inotify watch
//! when the cgroup is made; the other matches
//! `cgroup:path:/SCOPE/bind-exec/e*` and `unix:path:COPY`, a copy of the
//! loop program, found by the agent's exec notices (raw tracepoint
//! `sched_process_exec`). The work is done by `idgate-bench-loop`: its
//! `bind-create`, `exec-wait` and `bind-probe` ops.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::interrupt;
use super::probe::ProbeProcess;
use super::rules::{self, Identity, Rule};

/// The longest one workload may wait for its identity before the
/// benchmark fails (above the agent's 10 s resync, which would catch a
/// lost event).
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after each workload made and removed, for the agent to handle
/// the removal before the next one.
pub const GAP_MS: u64 = 10;
/// Processes waiting to exec at once.
const BATCH: usize = 50;
/// The identity both entries give.
const IDENTITY: &str = "bind";

/// One agent's binding latencies.
pub struct Latencies {
    /// The agent, as the report names it.
    pub agent: String,
    /// From just before `mkdir` to the first allowed connect, ns.
    pub created: Vec<u64>,
    /// From just before `mkdir` to the probe being in the new cgroup, ns.
    pub joined: Vec<u64>,
    /// From just before `exec` to the first allowed connect, ns.
    pub exec: Vec<u64>,
    /// Polls (connects) after the first, over both cases, and the time
    /// from the first to the last, ns: their ratio is the poll interval.
    pub repolls: u64,
    pub polling_ns: u64,
}

/// Adds the entries and their identity's policy to `agent` and reloads
/// it; then times `workloads` new cgroups, then `workloads` execs, one at
/// a time. `home` is a cgroup outside the scope for the probe to return
/// to.
pub fn measure(
    agent: &Agent,
    name: &str,
    loop_bin: &Path,
    home: &Path,
    rule: Rule,
    addr: SocketAddr,
    workloads: usize,
) -> Result<Latencies> {
    let scope_dir = super::cgroups::cgroup2_root()?.join(&agent.scope);
    let copy = agent.file("idgate-bench-bound");
    std::fs::copy(loop_bin, &copy)
        .with_context(|| format!("copying {} to {}", loop_bin.display(), copy.display()))?;
    let identity = Identity {
        id: format!("spiffe://{}/{IDENTITY}", rules::TRUST_DOMAIN),
        cgroup: String::new(),
        rules: vec![rule],
    };
    agent.write_policy(
        "identities-bind.toml",
        &rules::extra_policy_file(std::slice::from_ref(&identity)),
    )?;
    agent.write_entries(
        "bind.toml",
        &format!(
            "[[entry]]\nid = {id:?}\nselectors = [\"cgroup:path:/{scope}/bind-create/c*\"]\n\n\
             [[entry]]\nid = {id:?}\nselectors = [\"cgroup:path:/{scope}/bind-exec/e*\", \"unix:path:{copy}\"]\n",
            id = identity.id,
            scope = agent.scope,
            copy = copy.display(),
        ),
    )?;
    agent.cli(&["policy", "reload"])?;
    for dir in ["bind-create", "bind-exec"] {
        let dir = scope_dir.join(dir);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }

    eprintln!("bench: binding latency, agent {name}: {workloads} new cgroups");
    let mut probe = Command::new(loop_bin);
    probe
        .args(["--op", "bind-create", "--cgroup"])
        .arg(scope_dir.join("bind-create"))
        .arg("--home")
        .arg(home)
        .args(["--addr", &addr.to_string()])
        .args(["--count", &workloads.to_string()])
        .args(["--seconds", &TIMEOUT.as_secs_f64().to_string()])
        .args(["--gap-ms", &GAP_MS.to_string()]);
    let reply = run_to_end(&mut probe)?;
    let numbers = |key: &str| -> Result<Vec<u64>> {
        reply[key]
            .as_array()
            .with_context(|| format!("no {key} in the probe's answer"))?
            .iter()
            .map(|v| v.as_u64().context("not a number"))
            .collect()
    };
    let created = numbers("bound_ns")?;
    let joined = numbers("joined_ns")?;
    let mut repolls: u64 = numbers("polls")?.iter().map(|n| n - 1).sum();
    let mut polling_ns: u64 = numbers("polling_ns")?.iter().sum();

    eprintln!("bench: binding latency, agent {name}: {workloads} execs");
    let mut exec = Vec::with_capacity(workloads);
    let mut next = 0;
    while next < workloads {
        let batch: Vec<usize> = (next..(next + BATCH).min(workloads)).collect();
        next += batch.len();
        let waiting = batch
            .iter()
            .map(|i| {
                let rel = format!("bind-exec/e{i}");
                let path = format!("/{}/{rel}", agent.scope);
                Waiting::start(loop_bin, &scope_dir.join(rel), path, &copy, addr)
            })
            .collect::<Result<Vec<_>>>()?;
        wait_unknown(agent, &waiting)?;
        for w in waiting {
            let (bound, polls, polling) = w.go()?;
            exec.push(bound);
            repolls += polls - 1;
            polling_ns += polling;
        }
    }

    Ok(Latencies {
        agent: name.to_owned(),
        created,
        joined,
        exec,
        repolls,
        polling_ns,
    })
}

/// A process in its own new cgroup under `bind-exec`, not yet the
/// program the entry names, waiting for the word to exec it.
struct Waiting {
    dir: PathBuf,
    /// As the agent lists it: relative to the cgroup v2 root.
    path: String,
    process: ProbeProcess,
    stdin: Option<ChildStdin>,
}

impl Waiting {
    fn start(
        loop_bin: &Path,
        dir: &Path,
        path: String,
        copy: &Path,
        addr: SocketAddr,
    ) -> Result<Self> {
        interrupt::check()?;
        std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let mut process = ProbeProcess::start(
            Command::new(loop_bin)
                .args(["--op", "exec-wait", "--cgroup"])
                .arg(dir)
                .arg("--exec")
                .arg(copy)
                .args(["--addr", &addr.to_string()])
                .args(["--seconds", &TIMEOUT.as_secs_f64().to_string()])
                .stdin(Stdio::piped()),
            "joined",
            &format!("exec-wait in {}", dir.display()),
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            path,
            stdin: process.take_stdin(),
            process,
        })
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Lets it exec; its latency, polls and time polling.
    fn go(mut self) -> Result<(u64, u64, u64)> {
        interrupt::check()?;
        self.stdin
            .take()
            .expect("not told yet")
            .write_all(b"x")
            .context("telling the waiting process to exec")?;
        let what = format!("bind-probe in {}", self.dir.display());
        let [bound, polls, polling] = self
            .process
            .answer(&what, ["bound_ns", "polls", "polling_ns"])?;
        remove_cgroup(&self.dir)?;
        Ok((bound, polls, polling))
    }
}

/// Waits until the agent has attested every waiting process's cgroup,
/// with the process in it, as an unknown workload: only then does its
/// exec alone decide the binding.
fn wait_unknown(agent: &Agent, waiting: &[Waiting]) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        interrupt::check()?;
        let reply: serde_json::Value = serde_json::from_str(&agent.cli(&["workloads", "--json"])?)?;
        let rows = reply["workloads"].as_array().cloned().unwrap_or_default();
        let missing = waiting.iter().find(|w| {
            !rows.iter().any(|row| {
                row["path"] == w.path.as_str()
                    && row["state"] == "unknown"
                    && row["pids"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(w.pid().into())))
            })
        });
        let Some(missing) = missing else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!(
                "the agent did not list {} (pid {}) as an unknown workload within {TIMEOUT:?}",
                missing.dir.display(),
                missing.pid()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` to its end, or until a signal comes; its standard
/// output as JSON. It must succeed.
fn run_to_end(command: &mut Command) -> Result<serde_json::Value> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting idgate-bench-loop")?;
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let status = loop {
        if let Err(e) = interrupt::check() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("idgate-bench-loop: {status}: {}", err.trim());
    }
    serde_json::from_str(&out).context("the probe's answer is not JSON")
}

/// Removes an empty cgroup, waiting while the kernel still counts the
/// process that just ended in it.
fn remove_cgroup(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}
