//! Connect-path overhead: every operation under every configuration,
//! interleaved round by round (the order of the configurations turns each
//! round), so that drift on the machine falls on all of them alike.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;

use super::agent::Agent;
use super::cost::{self, ProcSample};
use super::loops::{Loop, Op};
use super::nft::Table;

/// What judges the workload's calls.
pub enum Judge<'a> {
    Nothing,
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
                    Judge::Nothing => None,
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
