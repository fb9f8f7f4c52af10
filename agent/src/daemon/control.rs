//! Answers control-socket requests from the running agent's state.

use std::net::SocketAddr;

use idgate_common::{UNKNOWN_SLOT, slot_policy, verdict};
use serde_json::{Value, json};

use super::state::State;
use crate::admin::{Peer, Reply, Request, Response};
use crate::events::EventFeed;
use crate::identity::SpiffeId;
use crate::policy;

/// The slot `explain` compiles a lone identity into.
const EXPLAIN_SLOT: u32 = 1;

pub fn handle(state: &mut State, feed: &EventFeed, peer: Peer, request: Request) -> Response {
    match request {
        Request::Events {
            follow,
            identity,
            verdict,
        } => events(feed, follow, identity, verdict),
        other => reply(state, peer, other).into(),
    }
}

fn reply(state: &mut State, peer: Peer, request: Request) -> Reply {
    match request {
        Request::Events { .. } => unreachable!("answered by `handle`"),
        Request::Status => Reply::ok(status(state)),
        Request::PolicyReload => match state.reload() {
            Ok(r) => Reply::ok(json!({
                "previous_generation": r.previous,
                "generation": r.generation,
                "diff": r.diff,
            })),
            Err(e) => Reply::error(e),
        },
        Request::PolicyShow => Reply::ok(json!({
            "generation": state.applied.generation,
            "policy_path": state.config.policy,
            "summary": policy::summary(&state.policy),
        })),
        Request::Explain {
            identity,
            to,
            protocol,
        } => explain(state, &identity, &to, &protocol).unwrap_or_else(Reply::error),
        Request::Revoke { identity } => revoke(state, &identity, true),
        Request::Unrevoke { identity } => revoke(state, &identity, false),
        Request::Workloads => Reply::ok(json!({
            "scope": state.scope_dir,
            "workloads": state.workloads.iter().map(|w| {
                let mut row = serde_json::to_value(w).expect("workload row");
                // Attested but not taken by the kernel (map full): denied.
                row["enforced"] = json!(w.binding.bound_id().is_none()
                    || state.applied.bound.contains_key(&w.cgroup_id));
                row
            }).collect::<Vec<_>>(),
            "kubernetes": match &state.kubelet {
                Some(k) => k.summary(&state.pods),
                None => "no kubelet configured: k8s selectors match nothing".into(),
            },
        })),
        Request::Run {
            identity,
            ttl_seconds,
            pid,
        } => run(state, peer, &identity, ttl_seconds, pid).unwrap_or_else(Reply::error),
    }
}

fn status(state: &State) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "scope": state.scope_dir,
        "pin_dir": state.config.pin_dir,
        "programs": state.enforcer.attachment,
        "generation": state.applied.generation,
        "mode": format!("{:?}", state.policy.mode).to_lowercase(),
        "identities": state.applied.identities.len(),
        // Rule 0 is the default, not a rule.
        "rules": state.applied.compiled.rules.len() - 1,
        "workloads": state.applied.bound.len(),
        "revoked": state.revocations.ids().iter().map(SpiffeId::as_str).collect::<Vec<_>>(),
        "reloads": state.reloads,
        "reload_errors": state.reload_errors,
        "pins_restored": state.pins_restored,
        "bind_failures": state.bind_failures.len(),
        "max_workloads": state.config.max_workloads,
        "kubernetes": state.kubelet.as_ref().map(|k| k.status(&state.pods)),
    })
}

fn parse_id(identity: &str) -> Result<SpiffeId, String> {
    identity
        .parse()
        .map_err(|e| format!("identity {identity:?}: {e}"))
}

fn revoke(state: &mut State, identity: &str, revoked: bool) -> Reply {
    let id = match parse_id(identity) {
        Ok(id) => id,
        Err(e) => return Reply::error(e),
    };
    match state.set_revoked(&id, revoked) {
        Ok(changed) => Reply::ok(json!({
            "identity": id.as_str(),
            "revoked": revoked,
            "changed": changed,
            "slot": state.slot_of(&id),
        })),
        Err(e) => Reply::error(e.to_string()),
    }
}

/// `idgate events`: the recent events, and with `follow` the new ones,
/// those of one identity (`unknown`: of unknown workloads) and verdict.
fn events(
    feed: &EventFeed,
    follow: bool,
    identity: Option<String>,
    verdict: Option<String>,
) -> Response {
    if let Some(v) = verdict.as_deref()
        && v != "allow"
        && v != "deny"
    {
        return Reply::error(format!("verdict {v:?} is not allow or deny")).into();
    }
    let (recent, live) = feed.subscribe();
    let keep = move |line: &str| {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            return false;
        };
        let identity_ok = match identity.as_deref() {
            None => true,
            Some("unknown") => event["identity"].is_null(),
            Some(id) => event["identity"] == id,
        };
        identity_ok && verdict.as_deref().is_none_or(|v| event["verdict"] == v)
    };
    Response::Stream {
        reply: Reply::ok(json!({ "follow": follow })),
        recent,
        live: follow.then_some(live),
        keep: Box::new(keep),
    }
}

/// `idgate run`: the process to move must be a child of the caller, so an
/// operator's request cannot carry off someone else's process.
fn run(
    state: &mut State,
    peer: Peer,
    identity: &str,
    ttl_seconds: Option<u64>,
    pid: u32,
) -> Result<Reply, String> {
    let id = parse_id(identity)?;
    let ttl = match ttl_seconds {
        Some(0) => return Err("ttl must be at least one second".into()),
        other => other.map(std::time::Duration::from_secs),
    };
    let parent = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map_err(|e| format!("process {pid}: {e}"))?
        .ppid;
    if Some(parent) != peer.pid {
        return Err(format!(
            "process {pid} is not a child of the caller (pid {:?})",
            peer.pid
        ));
    }
    let cgroup = state.run(id.clone(), ttl, pid).map_err(|e| e.to_string())?;
    Ok(Reply::ok(json!({
        "identity": id.as_str(),
        "cgroup": cgroup,
        "slot": state.slot_of(&id),
    })))
}

/// Which rule of the running policy decides a connect, as the kernel
/// would. `identity` is a SPIFFE ID or `unknown`.
fn explain(state: &State, identity: &str, to: &str, protocol: &str) -> Result<Reply, String> {
    let addr: SocketAddr = to.parse().map_err(|_| {
        format!("destination {to:?} is not ADDR:PORT (like 10.0.0.1:443 or [::1]:53)")
    })?;
    let tcp = match protocol {
        "tcp" => true,
        "udp" => false,
        other => return Err(format!("protocol {other:?} is not tcp or udp")),
    };
    let (id, slot, compiled) = if identity == "unknown" {
        (None, UNKNOWN_SLOT, policy::compile(&state.policy, &[]))
    } else {
        let id = parse_id(identity)?;
        let compiled = policy::compile(&state.policy, &[(EXPLAIN_SLOT, id.clone())]);
        (Some(id), EXPLAIN_SLOT, compiled)
    };
    let revoked = id.as_ref().is_some_and(|i| state.revocations.contains(i));
    let (decided, rule_id) = policy::evaluate(&compiled, slot, addr.ip(), addr.port(), tcp);
    let audit = compiled
        .slot(slot)
        .is_some_and(|e| e.policy.flags & slot_policy::AUDIT != 0);
    let rule = &compiled.rules[rule_id as usize];
    let outcome = match (revoked, decided, audit) {
        (true, _, _) => "deny (revoked)",
        (false, verdict::ALLOW, _) => "allow",
        (false, _, true) => "allow (audit: would deny)",
        (false, _, false) => "deny",
    };
    Ok(Reply::ok(json!({
        "identity": identity,
        "to": addr,
        "protocol": protocol,
        "verdict": outcome,
        "rule": rule.name,
        "rule_owner": rule.owner,
        "bound": id.as_ref().is_some_and(|i| state.slot_of(i).is_some()),
        "generation": state.applied.generation,
    })))
}
