//! Answers control-socket requests: those that only read from the owner's
//! latest snapshot (off the owner, on a blocking thread where the work
//! grows with the policy), the others by a command to the owner.

use std::net::IpAddr;
use std::time::Duration;

use idgate_common::{MAX_LEARNED, UNKNOWN_SLOT, slot_policy, verdict};
use tokio::sync::{mpsc, oneshot};

use super::handle::{Handle, OwnerError};
use super::owner::{Command, GrantChange};
use super::root_workloads::Bindings;
use super::snapshot::Snapshot;
use super::state::RunProcess;
use crate::admin::{
    Answer, DnsIdentity, DnsStatus, EventsOpened, Explained, GrantChanged, GrantShown, GrantsList,
    Identity, LearnedOpen, Peer, PolicyReloaded, PolicyShown, Ports, Protocol, Reply, Request,
    Response, Restarting, Revocation, Role, Started, Status, Target,
};
use crate::dns::DnsReader;
use crate::events::{Event, EventFeed, Verdict};
use crate::grants::{
    GrantAction, GrantProtocol, GrantSpec, InputError, grant_destination, grant_identity,
};
use crate::identity::SpiffeId;
use crate::policy::{self, ClassId};

/// The slot `explain` compiles a lone identity into.
const EXPLAIN_SLOT: u32 = 1;
/// How long a caller waits for the owner's answer to a quick command.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long a caller waits for a reload (a large policy takes seconds; a
/// reload asked for during another waits for it too).
const RELOAD_WAIT: Duration = Duration::from_secs(300);

/// What the control socket's requests reach.
pub struct Parts {
    pub owner: Handle,
    pub feed: EventFeed,
    /// The DNS path, when it runs.
    pub dns: Option<DnsReader>,
    /// The bindings, for `status`'s uid 0 warning.
    pub bindings: Bindings,
    /// Asks the agent to execute itself again once the receiver is told
    /// the reply is out.
    pub restart: mpsc::Sender<oneshot::Receiver<()>>,
}

pub async fn handle(parts: &Parts, peer: Peer, request: Request) -> Response {
    let (owner, feed, dns) = (&parts.owner, &parts.feed, parts.dns.as_ref());
    if let Role::Granter { max_duration } = peer.role
        && let Err(e) = granter_may(owner, peer.uid, max_duration, &request).await
    {
        tracing::warn!(uid = peer.uid, ?request, "control socket: {e}");
        return Reply::error(e).into();
    }
    let answer: Result<Answer, String> = match request {
        Request::Events {
            follow,
            identity,
            verdict,
        } => return events(feed, follow, identity, verdict),
        Request::Status => {
            let (snapshot, dns) = (owner.snapshot(), dns.cloned());
            let bindings = parts.bindings.clone();
            off_runtime(move || status(&snapshot, dns.as_ref(), &bindings).into()).await
        }
        Request::PolicyReload => reload(owner).await.map(Answer::from),
        Request::PolicyShow => {
            let snapshot = owner.snapshot();
            off_runtime(move || policy_show(&snapshot).into()).await
        }
        Request::Explain {
            identity,
            to,
            protocol,
        } => {
            let (snapshot, dns) = (owner.snapshot(), dns.cloned());
            off_runtime(move || explain(&snapshot, dns.as_ref(), identity, to, protocol).into())
                .await
        }
        Request::Revoke { identity } => revoke(owner, identity, true).await.map(Answer::from),
        Request::Unrevoke { identity } => revoke(owner, identity, false).await.map(Answer::from),
        Request::Restart => {
            // The restart starts once the reply is written.
            let (then, written) = oneshot::channel();
            return match parts.restart.try_send(written) {
                Ok(()) => Response::Then {
                    reply: Reply::ok(Restarting {
                        pid: std::process::id(),
                    }),
                    then,
                },
                Err(_) => Reply::error("a restart is already under way".to_owned()).into(),
            };
        }
        Request::Workloads => owner
            .ask(Command::Workloads, ANSWER_WAIT)
            .await
            .map(Answer::from)
            .map_err(|e| e.to_string()),
        Request::Run {
            identity,
            ttl_seconds,
            pid,
        } => run(owner, peer, identity, ttl_seconds, pid)
            .await
            .map(Answer::from),
        Request::Grant {
            identity,
            to,
            ports,
            protocol,
            duration_seconds,
            reason,
        } => match grant_spec(&identity, &to, ports, protocol, duration_seconds, reason) {
            Ok(spec) => change_grant(owner, peer, GrantChange::Grant(spec)).await,
            Err(e) => Err(e.to_string()),
        },
        Request::GrantRevoke { id } => change_grant(owner, peer, GrantChange::Revoke(id)).await,
        Request::GrantExtend {
            id,
            duration_seconds,
        } => {
            let duration = Duration::from_secs(duration_seconds);
            change_grant(owner, peer, GrantChange::Extend(id, duration)).await
        }
        Request::Grants => owner
            .ask(Command::Grants, ANSWER_WAIT)
            .await
            .map(|grants| {
                GrantsList {
                    grants: grants.into_iter().map(GrantShown::from).collect(),
                }
                .into()
            })
            .map_err(|e| e.to_string()),
    };
    answer.map_or_else(Reply::error, Reply::ok).into()
}

/// Runs `work` on the blocking pool, off the runtime's workers.
async fn off_runtime(work: impl FnOnce() -> Answer + Send + 'static) -> Result<Answer, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("the request's work failed: {e}"))
}

/// The snapshot's status, with the DNS path's figures and the bound
/// workloads with credential rules that run as uid 0 (credential rules
/// need the DNS path).
fn status(s: &Snapshot, dns: Option<&DnsReader>, bindings: &Bindings) -> Status {
    Status {
        uptime_seconds: s.started.elapsed().as_secs(),
        dns: dns.map(dns_status),
        root_workloads: dns
            .map(|d| bindings.root_workloads(&d.credential_identities()))
            .unwrap_or_default(),
        ..s.status.clone()
    }
}

fn dns_status(dns: &DnsReader) -> DnsStatus {
    let f = dns.figures();
    DnsStatus {
        learned_addresses: f.learned_addresses,
        capacity: MAX_LEARNED,
        per_identity_limit: f.per_identity_limit,
        namespaces: f.namespaces,
        upstreams: f.upstreams,
        identities: f
            .slots
            .into_values()
            .map(|(identity, addresses, names)| DnsIdentity {
                identity,
                addresses,
                names,
            })
            .collect(),
    }
}

fn policy_show(s: &Snapshot) -> PolicyShown {
    PolicyShown {
        generation: s.status.generation,
        policy_path: s.policy_path.clone(),
        summary: policy::summary(&s.policy),
    }
}

async fn reload(owner: &Handle) -> Result<PolicyReloaded, String> {
    let r = flatten(owner.ask(Command::Reload, RELOAD_WAIT).await)?;
    Ok(PolicyReloaded {
        previous_generation: r.previous,
        generation: r.generation,
        diff: r.diff.clone(),
    })
}

async fn revoke(owner: &Handle, identity: SpiffeId, revoked: bool) -> Result<Revocation, String> {
    let asked = owner
        .ask(
            |reply| Command::SetRevoked {
                id: identity.clone(),
                revoked,
                reply,
            },
            ANSWER_WAIT,
        )
        .await;
    let done = flatten(asked)?;
    Ok(Revocation {
        identity,
        revoked,
        changed: done.changed,
        slot: done.slot,
    })
}

/// A grant request's words, checked: every error names what is wrong.
fn grant_spec(
    identity: &str,
    to: &str,
    ports: Option<Ports>,
    protocol: Option<Protocol>,
    duration_seconds: u64,
    reason: Option<String>,
) -> Result<GrantSpec, InputError> {
    Ok(GrantSpec {
        identity: grant_identity(identity)?,
        to: grant_destination(to)?,
        ports: ports.unwrap_or(Ports::ALL),
        protocol: match protocol {
            Some(Protocol::Tcp) => GrantProtocol::Tcp,
            Some(Protocol::Udp) => GrantProtocol::Udp,
            None => GrantProtocol::Any,
        },
        duration: Duration::from_secs(duration_seconds),
        reason,
    })
}

/// Whether a granter (uid `uid`, grants up to `max_duration`) may make
/// `request`: a grant or an extension within its duration, the list, and
/// a revocation or extension of one of its own grants; nothing else.
async fn granter_may(
    owner: &Handle,
    uid: u32,
    max_duration: Duration,
    request: &Request,
) -> Result<(), String> {
    let within = |seconds: u64| {
        if Duration::from_secs(seconds) <= max_duration {
            Ok(())
        } else {
            Err(format!(
                "uid {uid} may grant for at most {} ([[grants.granters]])",
                humantime::format_duration(max_duration)
            ))
        }
    };
    let own = |id: u32| async move {
        let grants = owner
            .ask(Command::Grants, ANSWER_WAIT)
            .await
            .map_err(|e| e.to_string())?;
        match grants.iter().find(|g| g.grant.id == id) {
            Some(g) if g.grant.granted_by != uid => Err(format!(
                "uid {uid} may only revoke or extend its own grants; grant {id} is uid {}'s",
                g.grant.granted_by
            )),
            // One not running is refused as for anyone.
            _ => Ok(()),
        }
    };
    match request {
        Request::Grant {
            duration_seconds, ..
        } => within(*duration_seconds),
        Request::Grants => Ok(()),
        Request::GrantExtend {
            id,
            duration_seconds,
        } => {
            within(*duration_seconds)?;
            own(*id).await
        }
        Request::GrantRevoke { id } => own(*id).await,
        _ => Err(format!(
            "permission denied: uid {uid} may only grant ([[grants.granters]])"
        )),
    }
}

/// A grant made, revoked or extended by the operator `peer`.
async fn change_grant(owner: &Handle, peer: Peer, change: GrantChange) -> Result<Answer, String> {
    let action = match &change {
        GrantChange::Grant(_) => GrantAction::Granted,
        GrantChange::Revoke(_) => GrantAction::Revoked,
        GrantChange::Extend(..) => GrantAction::Extended,
    };
    let asked = owner
        .ask(
            |reply| Command::Grant {
                change,
                uid: peer.uid,
                reply,
            },
            ANSWER_WAIT,
        )
        .await;
    let running = flatten(asked)?;
    Ok(GrantChanged {
        action,
        grant: running.into(),
    }
    .into())
}

/// The owner's answer, or why there was none, as the caller sees it.
fn flatten<T, E: std::fmt::Display>(asked: Result<Result<T, E>, OwnerError>) -> Result<T, String> {
    match asked {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `idgate events`: the recent events, and with `follow` the new ones,
/// those of one identity (or of unknown workloads) and verdict.
fn events(
    feed: &EventFeed,
    follow: bool,
    identity: Option<Identity>,
    verdict: Option<Verdict>,
) -> Response {
    let (recent, live) = feed.subscribe();
    let keep = move |line: &str| {
        let Ok(event) = serde_json::from_str::<Event>(line) else {
            return false;
        };
        let identity_ok = match &identity {
            None => true,
            Some(Identity::Unknown) => event.identity.is_none(),
            Some(Identity::Id(id)) => event.identity.as_deref() == Some(id.as_str()),
        };
        identity_ok && verdict.is_none_or(|v| event.verdict == v)
    };
    Response::Stream {
        reply: Reply::ok(EventsOpened { follow }),
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
    identity: SpiffeId,
    ttl_seconds: Option<u64>,
    pid: u32,
) -> Result<Started, String> {
    let ttl = match ttl_seconds {
        Some(0) => return Err("ttl must be at least one second".into()),
        other => other.map(Duration::from_secs),
    };
    let process = RunProcess::of(pid).map_err(|e| format!("process {pid}: {e}"))?;
    if Some(process.parent) != peer.pid {
        return Err(format!(
            "process {pid} is not a child of the caller (pid {:?})",
            peer.pid
        ));
    }
    let asked = owner
        .ask(
            |reply| Command::Run {
                id: identity.clone(),
                ttl,
                process,
                reply,
            },
            RELOAD_WAIT,
        )
        .await;
    let started = flatten(asked)?;
    Ok(Started {
        identity,
        cgroup: started.cgroup,
        slot: started.slot,
        egress_bundle: started.egress_bundle,
    })
}

/// Which rule of the running policy decides a connect, as the kernel
/// would: for an address, with the names the identity's lookups learned
/// it for; for a name, for each address its lookups opened.
fn explain(
    s: &Snapshot,
    dns: Option<&DnsReader>,
    identity: Identity,
    to: Target,
    protocol: Protocol,
) -> Explained {
    let (id, slot, compiled) = match &identity {
        Identity::Unknown => (None, UNKNOWN_SLOT, policy::compile(&s.policy, &[])),
        Identity::Id(id) => {
            let compiled = policy::compile(&s.policy, &[(EXPLAIN_SLOT, id.clone())]);
            (Some(id), EXPLAIN_SLOT, compiled)
        }
    };
    let revoked = id.is_some_and(|i| s.status.revoked.contains(i));
    let tcp = protocol == Protocol::Tcp;
    let audit = compiled
        .slot(slot)
        .is_some_and(|e| e.policy.flags & slot_policy::AUDIT != 0);
    // What the kernel does with a connect the policy decides `decided`: a
    // credential rule's TCP connect goes to the broker, its UDP is denied.
    let brokered = |decided: u32| tcp && decided == verdict::BROKER;
    let judge = |decided: u32| {
        let passes = decided == verdict::ALLOW || brokered(decided);
        let audit_allowed = !revoked && !passes && audit && decided != verdict::BROKER;
        let allowed = !revoked && (passes || audit_allowed);
        (allowed, audit_allowed)
    };
    let learned = |addr: Option<IpAddr>| match (dns, id) {
        (Some(dns), Some(id)) => dns.learned_of(id, addr),
        _ => Vec::new(),
    };
    let open = |addr: IpAddr, classes: &[ClassId], port: u16| {
        policy::evaluate_learned(&compiled, slot, addr, classes, port, tcp)
    };
    let (decided, rule_id, pattern, learned) = match &to {
        Target::Addr(a) => {
            let here = learned(Some(a.ip()));
            let classes: Vec<ClassId> = here.iter().map(|(l, _)| l.class).collect();
            let (decided, rule) = open(a.ip(), &classes, a.port());
            (decided, rule, None, here)
        }
        Target::Name { name, port } => {
            let pattern = compiled
                .names(slot)
                .and_then(|n| n.class_of(name).map(|m| (m.class, m.pattern.to_owned())));
            let here: Vec<_> = learned(None)
                .into_iter()
                .filter(|(l, _)| l.name.as_deref() == Some(name.as_str()))
                .collect();
            // With no address learned, a connect to one of the name's
            // addresses is judged as any address no rule names: by the
            // default.
            let (decided, rule) = match (here.first(), compiled.slot(slot)) {
                (Some((l, _)), _) => open(l.addr, &[l.class], *port),
                (None, Some(e)) => (e.policy.default_verdict, e.policy.default_rule),
                (None, None) => (verdict::DENY, 0),
            };
            (decided, rule, pattern.map(|(_, p)| p), here)
        }
    };
    let port = match &to {
        Target::Addr(a) => a.port(),
        Target::Name { port, .. } => *port,
    };
    let grants = match (&to, dns, id) {
        (Target::Name { name, .. }, Some(dns), Some(id)) => dns.grants_covering(id, name),
        _ => Vec::new(),
    };
    let learned = learned
        .into_iter()
        .map(|(l, left)| {
            let (decided, rule) = open(l.addr, &[l.class], port);
            LearnedOpen {
                addr: l.addr,
                name: l.name.map(|n| n.to_string()),
                verdict: if judge(decided).0 {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                },
                rule: compiled.rules[rule as usize].name.to_string(),
                expires_in_seconds: left,
            }
        })
        .collect();
    let (allowed, audit_allowed) = judge(decided);
    let rule = &compiled.rules[rule_id as usize];
    Explained {
        bound: id.is_some_and(|i| s.slots.contains_key(i)),
        identity,
        to,
        protocol,
        verdict: if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        revoked,
        audit_allowed,
        brokered: !revoked && brokered(decided),
        rule: rule.name.to_string(),
        rule_owner: rule.owner.to_string(),
        generation: s.status.generation,
        pattern,
        grants,
        learned,
    }
}
