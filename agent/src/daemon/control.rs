//! Answers control-socket requests: those that only read from the owner's
//! latest snapshot (off the owner, on a blocking thread where the work
//! grows with the policy), the others by a command to the owner.

use std::net::SocketAddr;
use std::time::Duration;

use idgate_common::{UNKNOWN_SLOT, slot_policy, verdict};
use serde_json::{Value, json};

use super::handle::{Handle, OwnerError};
use super::owner::Command;
use super::snapshot::Snapshot;
use super::state::State;
use crate::admin::{Peer, Reply, Request, Response};
use crate::events::EventFeed;
use crate::identity::SpiffeId;
use crate::policy;

/// The slot `explain` compiles a lone identity into.
const EXPLAIN_SLOT: u32 = 1;
/// How long a caller waits for the owner's answer to a quick command.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long a caller waits for a reload (a large policy takes seconds; a
/// reload asked for during another waits for it too).
const RELOAD_WAIT: Duration = Duration::from_secs(300);

pub async fn handle(owner: &Handle, feed: &EventFeed, peer: Peer, request: Request) -> Response {
    let reply = match request {
        Request::Events {
            follow,
            identity,
            verdict,
        } => return events(feed, follow, identity, verdict),
        Request::Status => Ok(status(&owner.snapshot())),
        Request::PolicyReload => reload(owner).await,
        Request::PolicyShow => {
            let snapshot = owner.snapshot();
            off_runtime(move || policy_show(&snapshot)).await
        }
        Request::Explain {
            identity,
            to,
            protocol,
        } => {
            let snapshot = owner.snapshot();
            off_runtime(move || explain(&snapshot, &identity, &to, &protocol)).await
        }
        Request::Revoke { identity } => revoke(owner, &identity, true).await,
        Request::Unrevoke { identity } => revoke(owner, &identity, false).await,
        Request::Workloads => owner
            .ask(Command::Workloads, ANSWER_WAIT)
            .await
            .map_err(|e| e.to_string()),
        Request::Run {
            identity,
            ttl_seconds,
            pid,
        } => run(owner, peer, &identity, ttl_seconds, pid).await,
    };
    reply.unwrap_or_else(Reply::error).into()
}

/// Runs `work` on the blocking pool, off the runtime's workers.
async fn off_runtime(
    work: impl FnOnce() -> Result<Reply, String> + Send + 'static,
) -> Result<Reply, String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(format!("the request's work failed: {e}")))
}

fn status(s: &Snapshot) -> Reply {
    Reply::ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "scope": s.scope_dir,
        "pin_dir": s.pin_dir,
        "programs": s.programs,
        "generation": s.generation,
        "reloading": s.writing_generation,
        "mode": format!("{:?}", s.policy.mode).to_lowercase(),
        "identities": s.slots.len(),
        "rules": s.rules,
        "workloads": s.workloads,
        "revoked": s.revoked.iter().map(SpiffeId::as_str).collect::<Vec<_>>(),
        "reloads": s.reloads,
        "reload_errors": s.reload_errors,
        "pins_restored": s.pins_restored,
        "bind_failures": s.bind_failures,
        "max_workloads": s.max_workloads,
        "kubernetes": s.kubernetes,
    }))
}

fn policy_show(s: &Snapshot) -> Result<Reply, String> {
    Ok(Reply::ok(json!({
        "generation": s.generation,
        "policy_path": s.policy_path,
        "summary": policy::summary(&s.policy),
    })))
}

async fn reload(owner: &Handle) -> Result<Reply, String> {
    match owner.ask(Command::Reload, RELOAD_WAIT).await {
        Ok(Ok(r)) => Ok(Reply::ok(json!({
            "previous_generation": r.previous,
            "generation": r.generation,
            "diff": r.diff,
        }))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `idgate workloads`, built by the owner from its table.
pub fn workloads(state: &State) -> Reply {
    Reply::ok(json!({
        "scope": state.scope_dir,
        "workloads": state.workloads.iter().map(|w| {
            let mut row = serde_json::to_value(w).expect("workload row");
            // Attested but not taken by the kernel (map full, or waiting
            // for its identity's generation): denied.
            row["enforced"] = json!(w.binding.bound_id().is_none()
                || state.applied.bound.contains_key(&w.cgroup_id));
            row
        }).collect::<Vec<_>>(),
        "kubernetes": match &state.kubelet {
            Some(k) => k.summary(&state.pods),
            None => "no kubelet configured: k8s selectors match nothing".into(),
        },
    }))
}

fn parse_id(identity: &str) -> Result<SpiffeId, String> {
    identity
        .parse()
        .map_err(|e| format!("identity {identity:?}: {e}"))
}

async fn revoke(owner: &Handle, identity: &str, revoked: bool) -> Result<Reply, String> {
    let id = parse_id(identity)?;
    let asked = owner
        .ask(
            |reply| Command::SetRevoked {
                id: id.clone(),
                revoked,
                reply,
            },
            ANSWER_WAIT,
        )
        .await;
    let done = flatten(asked)?;
    Ok(Reply::ok(json!({
        "identity": id.as_str(),
        "revoked": revoked,
        "changed": done.changed,
        "slot": done.slot,
    })))
}

/// The owner's answer, or why there was none, as the caller sees it.
fn flatten<T, E: std::fmt::Display>(asked: Result<Result<T, E>, OwnerError>) -> Result<T, String> {
    match asked {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
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
async fn run(
    owner: &Handle,
    peer: Peer,
    identity: &str,
    ttl_seconds: Option<u64>,
    pid: u32,
) -> Result<Reply, String> {
    let id = parse_id(identity)?;
    let ttl = match ttl_seconds {
        Some(0) => return Err("ttl must be at least one second".into()),
        other => other.map(Duration::from_secs),
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
    let asked = owner
        .ask(
            |reply| Command::Run {
                id: id.clone(),
                ttl,
                pid,
                reply,
            },
            RELOAD_WAIT,
        )
        .await;
    let started = flatten(asked)?;
    Ok(Reply::ok(json!({
        "identity": id.as_str(),
        "cgroup": started.cgroup,
        "slot": started.slot,
    })))
}

/// Which rule of the running policy decides a connect, as the kernel
/// would. `identity` is a SPIFFE ID or `unknown`.
fn explain(s: &Snapshot, identity: &str, to: &str, protocol: &str) -> Result<Reply, String> {
    let addr: SocketAddr = to.parse().map_err(|_| {
        format!("destination {to:?} is not ADDR:PORT (like 10.0.0.1:443 or [::1]:53)")
    })?;
    let tcp = match protocol {
        "tcp" => true,
        "udp" => false,
        other => return Err(format!("protocol {other:?} is not tcp or udp")),
    };
    let (id, slot, compiled) = if identity == "unknown" {
        (None, UNKNOWN_SLOT, policy::compile(&s.policy, &[]))
    } else {
        let id = parse_id(identity)?;
        let compiled = policy::compile(&s.policy, &[(EXPLAIN_SLOT, id.clone())]);
        (Some(id), EXPLAIN_SLOT, compiled)
    };
    let revoked = id.as_ref().is_some_and(|i| s.revoked.contains(i));
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
        "bound": id.as_ref().is_some_and(|i| s.slots.contains_key(i)),
        "generation": s.generation,
    })))
}
