//! The time idgate's own programs take per call, from the kernel's BPF
//! statistics (`kernel.bpf_stats_enabled`: each program's `run_time_ns`
//! and `run_cnt`). Measured in a pass of its own after the timed rounds:
//! the statistics cost two clock reads per program run, so they are off
//! while anything else is timed.

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result};

use super::loops::{Loop, Op};
use super::overhead::{Config, Judge};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Nanoseconds per call spent in the agent's programs, `[op][config]`
/// (`None` for configurations that idgate does not judge).
pub type ProgTimes = Vec<Vec<Option<f64>>>;

pub fn measure(lp: &Loop, configs: &[Config<'_>], ops: &[(Op, SocketAddr)]) -> Result<ProgTimes> {
    eprintln!("bench: idgate's programs' own time, with BPF statistics on");
    // Each agent's programs, looked up once.
    let programs = configs
        .iter()
        .map(|c| match c.judge {
            Judge::Idgate(agent) => agent.program_ids().map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::write(STATS, "1").with_context(|| format!("writing {STATS}"))?;
    let result = ops
        .iter()
        .map(|&(op, addr)| {
            configs
                .iter()
                .zip(&programs)
                .map(|(c, progs)| {
                    progs
                        .as_deref()
                        .map(|progs| per_call(lp, progs, &c.cgroup, op, addr))
                        .transpose()
                })
                .collect()
        })
        .collect();
    std::fs::write(STATS, "0").with_context(|| format!("writing {STATS}"))?;
    result
}

/// The run time of the programs `progs` (name, id) over one loop run, per run of the hook that
/// sees every call (connect4/6 for connects, sendmsg4/6 for sends); it
/// includes any other program of the agent that ran meanwhile (TCP's new
/// socket each call passes `sock_create`).
fn per_call(
    lp: &Loop,
    progs: &[(String, u64)],
    cgroup: &std::path::Path,
    op: Op,
    addr: SocketAddr,
) -> Result<f64> {
    let hook = match (op, addr.is_ipv4()) {
        (Op::UdpSendto, true) => "idgate_sendmsg4",
        (Op::UdpSendto, false) => "idgate_sendmsg6",
        (_, true) => "idgate_connect4",
        (_, false) => "idgate_connect6",
    };
    let before = stats(progs)?;
    lp.measure(cgroup, op, addr)?;
    let after = stats(progs)?;
    let time: u64 = progs.iter().map(|(_, id)| after[id].0 - before[id].0).sum();
    let (_, hook_id) = progs
        .iter()
        .find(|(name, _)| name == hook)
        .with_context(|| format!("no {hook} among the agent's programs"))?;
    let runs = after[hook_id].1 - before[hook_id].1;
    Ok(time as f64 / runs.max(1) as f64)
}

/// `(run_time_ns, run_cnt)` of each program, by id.
fn stats(progs: &[(String, u64)]) -> Result<std::collections::BTreeMap<u64, (u64, u64)>> {
    progs
        .iter()
        .map(|(_, id)| {
            let out = Command::new("bpftool")
                .args(["-j", "prog", "show", "id", &id.to_string()])
                .output()?;
            let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("parsing bpftool -j prog show id {id}"))?;
            // bpftool leaves both out while they are zero.
            let field = |k: &str| shown[k].as_u64().unwrap_or(0);
            Ok((*id, (field("run_time_ns"), field("run_cnt"))))
        })
        .collect()
}
