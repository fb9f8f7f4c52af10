//! Policy reload time: from `idgate policy reload` being started to its
//! reply, which comes after the agent has switched the generation.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

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
    let index = identities.len() - 1;
    let mut one_rule = Vec::with_capacity(times);
    for step in 0..times {
        let rule = identities[index]
            .rules
            .last_mut()
            .expect("every identity has a rule");
        let ports = &mut rule.ports[0];
        if step % 2 == 0 {
            *ports = (ports.0 + 1, ports.1 + 1);
        } else {
            *ports = (ports.0 - 1, ports.1 - 1);
        }
        let (name, text) = rules::idgate_policy_file_of(identities, index);
        agent.write_policy(&name, &text)?;
        one_rule.push(reload(agent)?);
    }
    Ok(Reloads {
        check,
        unchanged,
        one_rule,
    })
}

/// One timed `idgate policy reload`; the generation must have switched.
fn reload(agent: &Agent) -> Result<Duration> {
    interrupt::check()?;
    let started = Instant::now();
    let reply = agent.cli(&["policy", "reload", "--json"])?;
    let took = started.elapsed();
    let reply: serde_json::Value = serde_json::from_str(&reply)?;
    if reply["generation"] == reply["previous_generation"] {
        bail!("the reload did not switch the generation: {reply}");
    }
    Ok(took)
}
