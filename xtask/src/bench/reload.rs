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
    let mut check = Vec::with_capacity(times);
    for _ in 0..times {
        interrupt::check()?;
        let started = Instant::now();
        agent.check_policy()?;
        check.push(started.elapsed());
    }
    let mut unchanged = Vec::with_capacity(times);
    for _ in 0..times {
        unchanged.push(reload(agent)?);
    }
    let mut one_rule = Vec::with_capacity(times);
    for step in 0..times {
        change_one_rule(agent, identities, step)?;
        one_rule.push(reload(agent)?);
    }
    Ok(Reloads {
        check,
        unchanged,
        one_rule,
    })
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
    let ports = &mut rule.ports[0];
    if step.is_multiple_of(2) {
        *ports = (ports.0 + 1, ports.1 + 1);
    } else {
        *ports = (ports.0 - 1, ports.1 - 1);
    }
    let (name, text) = rules::idgate_policy_file_of(identities, index);
    agent.write_policy(&name, &text)
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
