//! Policy reload time: from `idgate policy reload` being started to its
//! reply, which comes after the agent has switched the generation.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::interrupt;
use super::rules::{self, Identity};

pub struct Reloads {
    /// `idgate policy check` of the same files, for the share of reading
    /// and validating in a reload.
    pub check: Vec<Duration>,
    /// The whole policy again, unchanged.
    pub unchanged: Vec<Duration>,
    /// One rule's port changed (and back, alternately).
    pub one_rule: Vec<Duration>,
}

pub fn measure(agent: &Agent, identities: &mut [Identity], times: usize) -> Result<Reloads> {
    Ok(Reloads {
        check: checks(agent, times)?,
        unchanged: changed(times, |_| Ok(()), || reload(agent))?,
        one_rule: changed(
            times,
            |step| change_one_rule(agent, identities, step),
            || reload(agent),
        )?,
    })
}

/// `times` timed `idgate policy check`s of the agent's policy files.
pub fn checks(agent: &Agent, times: usize) -> Result<Vec<Duration>> {
    let mut check = Vec::with_capacity(times);
    for _ in 0..times {
        interrupt::check()?;
        let started = Instant::now();
        agent.check_policy()?;
        check.push(started.elapsed());
    }
    Ok(check)
}

/// `times` steps of `change` (untimed, given the step's number), each
/// followed by a timed `apply` (a reload).
pub fn changed(
    times: usize,
    mut change: impl FnMut(usize) -> Result<()>,
    mut apply: impl FnMut() -> Result<Duration>,
) -> Result<Vec<Duration>> {
    let mut took = Vec::with_capacity(times);
    for step in 0..times {
        change(step)?;
        took.push(apply()?);
    }
    Ok(took)
}

/// Changes the port of the last identity's last rule in the agent's
/// policy files (one up on even steps, back down on odd ones), for the
/// next reload to apply.
pub fn change_one_rule(agent: &Agent, identities: &mut [Identity], step: usize) -> Result<()> {
    let index = identities.len() - 1;
    let rule = identities[index]
        .rules
        .last_mut()
        .expect("every identity has a rule");
    shift_ports(&mut rule.ports[0], step);
    let (name, text) = rules::idgate_policy_file_of(identities, index);
    agent.write_policy(&name, &text)
}

/// Changes the port of every rule but the loopback one (which the
/// connect loops and probes need as it is) in every policy file, one up
/// on even steps and back down on odd ones, and writes every file again.
pub fn change_every_rule(agent: &Agent, identities: &mut [Identity], step: usize) -> Result<()> {
    for rule in identities.iter_mut().flat_map(|i| i.rules.iter_mut()) {
        if rule.name != rules::LOOPBACK_RULE {
            shift_ports(&mut rule.ports[0], step);
        }
    }
    for (name, text) in rules::idgate_policy(identities) {
        agent.write_policy(&name, &text)?;
    }
    Ok(())
}

/// A port range one up on even steps, back down on odd ones.
pub fn shift_ports(ports: &mut (u16, u16), step: usize) {
    if step.is_multiple_of(2) {
        *ports = (ports.0 + 1, ports.1 + 1);
    } else {
        *ports = (ports.0 - 1, ports.1 - 1);
    }
}

/// One timed `idgate policy reload`; the generation must have switched.
/// Only the reply's `generation` and `previous_generation` are read.
pub fn reload(agent: &Agent) -> Result<Duration> {
    interrupt::check()?;
    let started = Instant::now();
    let reply = agent.cli(&["policy", "reload", "--json"])?;
    let took = started.elapsed();
    let reply: serde_json::Value = serde_json::from_str(&reply)
        .with_context(|| format!("`idgate policy reload --json` replied no JSON: {reply}"))?;
    let field = |key: &str| {
        reply.get(key).filter(|v| !v.is_null()).with_context(|| {
            format!("no `{key}` in the reply of `idgate policy reload --json`: {reply}")
        })
    };
    if field("generation")? == field("previous_generation")? {
        bail!("the reload did not switch the generation: {reply}");
    }
    Ok(took)
}
