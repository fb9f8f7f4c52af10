//! Connect-path overhead: every operation under every configuration,
//! interleaved round by round (the order of the configurations turns each
//! round), so that drift on the machine falls on all of them alike.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;

use super::agent::Agent;
use super::cost::{self, ProcSample};
use super::floor::{self, Floor};
use super::loops::{Loop, Op};
use super::nft::Table;

/// What judges the workload's calls.
pub enum Judge<'a> {
    Nothing,
    /// Programs that allow everything, on idgate's hooks: the floor.
    Floor(&'a Floor),
    Idgate(&'a Agent),
    Nftables(&'a Table),
}

/// One configuration: a name, its workload cgroup, its judge.
pub struct Config<'a> {
    pub name: String,
    pub cgroup: PathBuf,
    pub judge: Judge<'a>,
}

/// An agent's cost while the loop ran in its cgroups.
pub struct AgentUnderLoad {
    /// CPU the agent used over the loop runs, seconds.
    pub cpu_seconds: f64,
    /// Wall time of those runs, seconds.
    pub wall_seconds: f64,
    /// The agent's memory after the last run.
    pub after: ProcSample,
}

pub struct Overhead {
    /// The operations and their destinations, in table order.
    pub ops: Vec<(Op, SocketAddr)>,
    pub configs: Vec<String>,
    /// `ns[op][config]`: nanoseconds per operation, one per round.
    pub ns: Vec<Vec<Vec<f64>>>,
    /// Per configuration judged by idgate: its agent under load.
    pub agents: Vec<Option<AgentUnderLoad>>,
}

/// (a) with these hooks off machine-wide, measured before anything of
/// the run is attached.
pub enum HooksOff {
    /// `ns[op]`: one figure per round.
    Measured(Vec<Vec<f64>>),
    /// Some cgroup of the machine already has a program on one of the
    /// hooks (the kernel then runs them for every cgroup): what and where.
    Skipped(String),
}

/// Times every operation `rounds` times in `cgroup` with no program on
/// idgate's hooks anywhere, so that the kernel skips them (each hook is a
/// static branch, on for every cgroup once any cgroup has a program).
pub fn measure_hooks_off(
    lp: &Loop,
    cgroup: &std::path::Path,
    ops: &[(Op, SocketAddr)],
    rounds: usize,
) -> Result<HooksOff> {
    let others = floor::attached_anywhere()?;
    if !others.is_empty() {
        let list: Vec<String> = others
            .iter()
            .map(|(cgroup, attach, name)| format!("`{name}` ({attach}) on {cgroup}"))
            .collect();
        return Ok(HooksOff::Skipped(list.join(", ")));
    }
    eprintln!("bench: connect path with the hooks off, {rounds} rounds");
    let mut ns = vec![Vec::with_capacity(rounds); ops.len()];
    for _ in 0..rounds {
        for (o, &(op, addr)) in ops.iter().enumerate() {
            ns[o].push(lp.measure(cgroup, op, addr)?);
        }
    }
    Ok(HooksOff::Measured(ns))
}

pub fn measure(
    lp: &Loop,
    configs: &[Config<'_>],
    ops: &[(Op, SocketAddr)],
    rounds: usize,
) -> Result<Overhead> {
    let mut ns = vec![vec![Vec::with_capacity(rounds); configs.len()]; ops.len()];
    let mut agents: Vec<Option<AgentUnderLoad>> = configs.iter().map(|_| None).collect();
    for round in 0..rounds {
        eprintln!("bench: connect path, round {}/{rounds}", round + 1);
        for (o, &(op, addr)) in ops.iter().enumerate() {
            for i in 0..configs.len() {
                let c = (i + round) % configs.len();
                let config = &configs[c];
                let before = match config.judge {
                    Judge::Idgate(agent) => Some((agent.pid(), cost::sample(agent.pid())?)),
                    Judge::Nftables(table) => {
                        table.hook()?;
                        None
                    }
                    Judge::Nothing | Judge::Floor(_) => None,
                };
                let started = std::time::Instant::now();
                let measured = lp.measure(&config.cgroup, op, addr);
                let wall = started.elapsed().as_secs_f64();
                if let Judge::Nftables(table) = config.judge {
                    table.unhook()?;
                }
                ns[o][c].push(measured?);
                if let Some((pid, before)) = before {
                    let after = cost::sample(pid)?;
                    let load = agents[c].get_or_insert(AgentUnderLoad {
                        cpu_seconds: 0.0,
                        wall_seconds: 0.0,
                        after,
                    });
                    load.cpu_seconds += after.cpu_seconds - before.cpu_seconds;
                    load.wall_seconds += wall;
                    load.after = after;
                }
            }
        }
    }
    Ok(Overhead {
        ops: ops.to_vec(),
        configs: configs.iter().map(|c| c.name.clone()).collect(),
        ns,
        agents,
    })
}
