//! The owner of the agent's state: one task, on a thread of its own, that
//! holds [`State`] and is the only one to change it. Everything else talks
//! to it through typed [`Command`]s (sent through a
//! [`Handle`](super::handle::Handle)) or reads the [`Snapshot`] it
//! publishes after every change, so no request holds a lock, and nothing
//! the owner does blocks the async runtime's workers.
//!
//! Work that takes long runs off the owner: a reload's reading and checking
//! of the policy and entries, and every new generation's compiling and
//! writing ([`GenerationJob`]), on threads of their own. The owner only
//! assigns slots before and switches the generation after; meanwhile it
//! keeps answering bindings, revocations and queries.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot, watch};

use super::discovery::Found;
use super::kubelet::Outcome;
use super::namespaces::Rescan;
use super::snapshot::Snapshot;
use super::state::{
    GenerationDone, ReloadTimes, Reloaded, Retired, Run, RunProcess, State, load_changed_entries,
};
use super::{DaemonError, Observers};
use crate::admin::WorkloadsList;
use crate::config::Config;
use crate::dns::GrantAddresses;
use crate::grants::{GrantError, GrantSpec, Running as RunningGrant};
use crate::identity::{EntriesError, EntrySet, SpiffeId};
use crate::policy::{self, PolicyDiff, PolicyError, PolicySet};

/// A request for the owner, with where its answer goes.
pub enum Command {
    /// Re-read, check and apply the policy and entries.
    Reload(oneshot::Sender<ReloadOutcome>),
    /// Revoke (or restore) an identity.
    SetRevoked {
        id: SpiffeId,
        revoked: bool,
        reply: oneshot::Sender<Result<Revoked, DaemonError>>,
    },
    /// `idgate run`: bind a new cgroup and move `pid` in.
    Run {
        id: SpiffeId,
        ttl: Option<Duration>,
        process: RunProcess,
        reply: oneshot::Sender<Result<RunStarted, DaemonError>>,
    },
    /// Every cgroup under the scope and how it stands.
    Workloads(oneshot::Sender<WorkloadsList>),
    /// Grant, revoke or extend a grant, for the operator `uid`.
    Grant {
        change: GrantChange,
        uid: u32,
        reply: oneshot::Sender<Result<RunningGrant, GrantError>>,
    },
    /// The running grants.
    Grants(oneshot::Sender<Vec<RunningGrant>>),
}

/// What an operator asks of a grant.
pub enum GrantChange {
    Grant(GrantSpec),
    Revoke(u32),
    Extend(u32, Duration),
}

/// A reload's outcome, shared by every caller it answers (reloads asked
/// for while one is under way are served by the next one, together).
pub type ReloadOutcome = Result<Arc<Reloaded>, Arc<ReloadError>>;

/// Why a reload was refused; the running policy stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Entries(#[from] EntriesError),
    #[error("applying the new generation: {0}")]
    Apply(#[from] DaemonError),
    #[error("the thread reading the policy stopped before it finished")]
    Lost,
}

/// What a revocation did.
#[derive(Debug)]
pub struct Revoked {
    pub changed: bool,
    /// The identity's slot, if it holds one.
    pub slot: Option<u32>,
}

/// A started `idgate run`.
#[derive(Debug)]
pub struct RunStarted {
    /// The cgroup, relative to the cgroup v2 root.
    pub cgroup: String,
    pub slot: Option<u32>,
    /// The egress trust bundle the command's TLS clients are given.
    pub egress_bundle: Option<String>,
}

/// How long a run may wait for its identity's generation before it is
/// given up.
const RUN_WAIT: Duration = Duration::from_secs(60);
/// How soon a generation that could not be made is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What the owner is doing off its own thread.
enum Work {
    Idle,
    /// A reload's files being read and checked.
    Loading {
        done: oneshot::Receiver<Result<Box<Loaded>, ReloadError>>,
        waiters: Vec<oneshot::Sender<ReloadOutcome>>,
        started: Instant,
    },
    /// A generation being compiled and written.
    Writing {
        done: oneshot::Receiver<Box<GenerationDone>>,
        reload: Option<Box<Reloading>>,
    },
}

/// A reload whose generation is being written.
struct Reloading {
    /// The reload's entries, when they are not the running ones.
    entries: Option<EntrySet>,
    diff: PolicyDiff,
    waiters: Vec<oneshot::Sender<ReloadOutcome>>,
    started: Instant,
    read: Duration,
}

/// A reload's files, read and checked.
struct Loaded {
    policy: PolicySet,
    /// `None` when they are the running ones.
    entries: Option<EntrySet>,
    diff: PolicyDiff,
}

enum Finished {
    Loaded(Result<Result<Box<Loaded>, ReloadError>, oneshot::error::RecvError>),
    Written(Result<Box<GenerationDone>, oneshot::error::RecvError>),
}

/// The owner and what it listens to.
pub struct Owner {
    pub state: State,
    pub observers: Observers,
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    pub commands: mpsc::Receiver<Command>,
    /// Requests queued for the owner (the handles count them in).
    pub queue_depth: Gauge,
    pub found: mpsc::UnboundedReceiver<Found>,
    /// Told of whatever discovery finds: the DNS path's namespaces may
    /// have changed with it.
    pub rescan: Rescan,
    pub kubelet: mpsc::UnboundedReceiver<Outcome>,
    /// The DNS path's answers to grants by name, whose addresses wait for
    /// the kernel.
    pub grant_addresses: mpsc::Receiver<GrantAddresses>,
}

/// An `idgate run` waiting for its binding to be in the kernel.
struct PendingRun {
    run: Run,
    asked: Instant,
    reply: oneshot::Sender<Result<RunStarted, DaemonError>>,
}

/// The owner's loop state.
struct Running {
    owner: Owner,
    work: Work,
    /// Reloads asked for while other work ran: one reload serves them.
    reloads_asked: Vec<oneshot::Sender<ReloadOutcome>>,
    runs: Vec<PendingRun>,
    /// Reloads applied whose new entries are still being attested (a pass
    /// over the scope): answered once it is over, so a reload's answer
    /// means every cgroup is bound by the new entries.
    settling: Vec<(Vec<oneshot::Sender<ReloadOutcome>>, Reloaded)>,
    /// What switches retired, freed off the owner once a snapshot without
    /// it is published.
    retired: Vec<Retired>,
    /// No new generation is tried before this (after one failed).
    retry_at: Option<Instant>,
}

impl Owner {
    /// Runs the owner on a thread of its own until every handle is gone
    /// or a fault leaves it unable to go on; `done` gets the outcome.
    pub fn spawn(self, done: oneshot::Sender<Result<(), DaemonError>>) -> Result<(), DaemonError> {
        std::thread::Builder::new()
            .name("idgate-owner".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let outcome = match runtime {
                    Ok(rt) => rt.block_on(self.run()),
                    Err(e) => Err(DaemonError::Runtime(e)),
                };
                let _ = done.send(outcome);
            })
            .map(drop)
            .map_err(DaemonError::Runtime)
    }

    async fn run(self) -> Result<(), DaemonError> {
        let resync_every = Duration::from_secs(self.state.config.resync_seconds);
        let mut running = Running {
            owner: self,
            work: Work::Idle,
            reloads_asked: Vec::new(),
            runs: Vec::new(),
            settling: Vec::new(),
            retired: Vec::new(),
            retry_at: None,
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_resync = Instant::now();
        loop {
            running.start_work();
            running.settle_runs();
            running.settle_reloads();
            running.publish();
            for retired in running.retired.drain(..) {
                retired.reclaim();
            }
            let resyncing = running.owner.state.resyncing();
            let o = &mut running.owner;
            let event = tokio::select! {
                biased;
                command = o.commands.recv() => match command {
                    Some(command) => Event::Command(command),
                    None => return Ok(()),
                },
                Some(request) = o.grant_addresses.recv() => Event::GrantAddresses(request),
                finished = finished(&mut running.work) => Event::Finished(finished),
                Some(dir) = o.found.recv() => {
                    let mut dirs = BTreeSet::from([dir]);
                    while let Ok(more) = o.found.try_recv() {
                        dirs.insert(more);
                    }
                    o.rescan.ask();
                    Event::Found(dirs)
                }
                Some(outcome) = o.kubelet.recv() => Event::Kubelet(outcome),
                _ = tick.tick() => {
                    if last_resync.elapsed() >= resync_every && !resyncing {
                        last_resync = Instant::now();
                        Event::Resync
                    } else {
                        Event::Tick
                    }
                }
                // A pass over the scope goes on a step at a time, between
                // requests and events.
                () = tokio::task::yield_now(), if resyncing => Event::ResyncStep,
            };
            running.handle(event)?;
        }
    }
}

/// What woke the owner.
enum Event {
    Command(Command),
    /// An answer to a lookup a grant by name covers.
    GrantAddresses(GrantAddresses),
    Finished(Finished),
    Found(BTreeSet<Found>),
    Kubelet(Outcome),
    /// The periodic pass is due.
    Resync,
    /// A second went by: expiries.
    Tick,
    ResyncStep,
}

/// Waits for the work under way, if any.
async fn finished(work: &mut Work) -> Finished {
    match work {
        Work::Idle => std::future::pending().await,
        Work::Loading { done, .. } => Finished::Loaded(done.await),
        Work::Writing { done, .. } => Finished::Written(done.await),
    }
}

impl Running {
    fn handle(&mut self, event: Event) -> Result<(), DaemonError> {
        let state = &mut self.owner.state;
        let (outcome, what) = match event {
            Event::Command(command) => {
                self.owner.queue_depth.dec();
                self.command(command);
                return Ok(());
            }
            Event::Finished(finished) => return self.finished(finished),
            Event::GrantAddresses(request) => {
                let GrantAddresses {
                    slot,
                    grants,
                    name,
                    addresses,
                    reply,
                } = request;
                let outcome = state
                    .grants
                    .learn(slot, &grants, &addresses, &state.applied.slots)
                    .map_err(|e| e.to_string());
                match &outcome {
                    Ok(opened) => {
                        tracing::debug!(
                            slot,
                            name,
                            ?opened,
                            addresses = addresses.len(),
                            "addresses opened by grants by name"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(slot, name, error = %e, "addresses of a grant by name not opened; the lookup gets SERVFAIL")
                    }
                }
                let _ = reply.send(outcome);
                return Ok(());
            }
            Event::Found(dirs) => (state.attest(&dirs), "attestation pass failed"),
            Event::Kubelet(outcome) => (
                state.kubelet_fetched(outcome),
                "attestation after a kubelet fetch failed",
            ),
            Event::Resync => (state.resync(), "resync failed"),
            Event::Tick => (state.expire(), "expiry failed"),
            Event::ResyncStep => (state.resync_step(), "resync failed"),
        };
        if let Err(e) = outcome {
            tracing::error!(error = %e, "{what}; unbound workloads stay denied");
        }
        Ok(())
    }

    fn command(&mut self, command: Command) {
        let state = &mut self.owner.state;
        match command {
            Command::Reload(reply) => self.reloads_asked.push(reply),
            Command::SetRevoked { id, revoked, reply } => {
                let outcome = state.set_revoked(&id, revoked).map(|changed| Revoked {
                    changed,
                    slot: state.slot_of(&id),
                });
                // A caller that reads the status after the answer sees the
                // change.
                self.publish();
                let _ = reply.send(outcome);
            }
            Command::Run {
                id,
                ttl,
                process,
                reply,
            } => match state.start_run(id, ttl, process) {
                Ok(run) => self.runs.push(PendingRun {
                    run,
                    asked: Instant::now(),
                    reply,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Workloads(reply) => {
                let _ = reply.send(super::snapshot::workloads(state));
            }
            Command::Grant { change, uid, reply } => {
                let slots = state.applied.slots.clone();
                let grants = &mut state.grants;
                let outcome = match change {
                    GrantChange::Grant(spec) => grants.grant(spec, uid, &slots),
                    GrantChange::Revoke(id) => grants.revoke(id, uid, &slots),
                    GrantChange::Extend(id, duration) => grants.extend(id, duration, uid, &slots),
                };
                let outcome = outcome.map(|g| grants.running(g, &slots));
                self.publish();
                let _ = reply.send(outcome);
            }
            Command::Grants(reply) => {
                let _ = reply.send(state.grants.list(&state.applied.slots));
            }
        }
    }

    /// Starts what waits, when nothing runs: a reload asked for, else a
    /// generation for identities that wait for a slot.
    fn start_work(&mut self) {
        if !matches!(self.work, Work::Idle) {
            return;
        }
        let state = &mut self.owner.state;
        if !self.reloads_asked.is_empty() {
            let waiters = std::mem::take(&mut self.reloads_asked);
            let config = state.config.clone();
            let running = state.policy.clone();
            let running_entries = state.entries.clone();
            let reader = state.policy_reader.clone();
            self.work = Work::Loading {
                done: off_owner("reload", move || {
                    load(&config, &running, &running_entries, &reader).map(Box::new)
                }),
                waiters,
                started: Instant::now(),
            };
            return;
        }
        if !state.wants_generation() || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match state.generation_job(state.policy.clone(), None) {
            Ok(job) => {
                self.work = Work::Writing {
                    done: off_owner("generation", move || Box::new(job.run())),
                    reload: None,
                };
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot prepare a generation for new identities; their workloads stay denied");
                self.retry_at = Some(Instant::now() + RETRY);
            }
        }
    }

    fn finished(&mut self, finished: Finished) -> Result<(), DaemonError> {
        let work = std::mem::replace(&mut self.work, Work::Idle);
        let state = &mut self.owner.state;
        match (finished, work) {
            (
                Finished::Loaded(loaded),
                Work::Loading {
                    waiters, started, ..
                },
            ) => {
                let read = started.elapsed();
                let loaded = loaded.unwrap_or(Err(ReloadError::Lost));
                let job = loaded.and_then(|l| {
                    let Loaded {
                        policy,
                        entries,
                        diff,
                    } = *l;
                    let job = state.generation_job(Arc::new(policy), entries.as_ref())?;
                    Ok((job, entries, diff))
                });
                match job {
                    Ok((job, entries, diff)) => {
                        self.work = Work::Writing {
                            done: off_owner("generation", move || Box::new(job.run())),
                            reload: Some(Box::new(Reloading {
                                entries,
                                diff,
                                waiters,
                                started,
                                read,
                            })),
                        };
                    }
                    Err(e) => self.reload_done(waiters, Err(e)),
                }
            }
            (Finished::Written(done), Work::Writing { reload, .. }) => {
                // The thread had the generation maps: without them no
                // policy can change any more, so the agent stops (its
                // programs and pins stay; a new agent takes over).
                let done = *done.map_err(|_| DaemonError::GenerationLost)?;
                let previous = state.applied.generation;
                let (compile, write) = (done.compile, done.write);
                match reload {
                    Some(r) => {
                        let r = *r;
                        let outcome = state
                            .finish_generation(done, r.entries)
                            .map(|retired| {
                                let new_entries = retired.new_entries();
                                self.retired.push(retired);
                                new_entries
                            })
                            .map(|new_entries| {
                                let reloaded = Reloaded {
                                    previous,
                                    generation: state.applied.generation,
                                    diff: r.diff,
                                    took: ReloadTimes {
                                        read: r.read,
                                        compile,
                                        write,
                                        total: r.started.elapsed(),
                                    },
                                };
                                (new_entries, reloaded)
                            })
                            .map_err(ReloadError::from);
                        match outcome {
                            // New entries start a pass over the scope: the
                            // reload is answered once every cgroup is bound
                            // by them. (A periodic pass under way does not
                            // hold up a reload whose entries are the same.)
                            Ok((true, reloaded)) if state.resyncing() => {
                                self.settling.push((r.waiters, reloaded));
                            }
                            outcome => self.reload_done(r.waiters, outcome.map(|(_, r)| r)),
                        }
                    }
                    None => match state.finish_generation(done, None) {
                        Ok(retired) => {
                            self.retired.push(retired);
                            self.retry_at = None;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "a generation for new identities failed; their workloads stay denied");
                            self.retry_at = Some(Instant::now() + RETRY);
                        }
                    },
                }
            }
            _ => unreachable!("the work finished is the work under way"),
        }
        Ok(())
    }

    /// Answers the reloads whose entries' pass over the scope is over.
    fn settle_reloads(&mut self) {
        if self.settling.is_empty() || self.owner.state.resyncing() {
            return;
        }
        for (waiters, reloaded) in std::mem::take(&mut self.settling) {
            self.reload_done(waiters, Ok(reloaded));
        }
    }

    fn reload_done(
        &mut self,
        waiters: Vec<oneshot::Sender<ReloadOutcome>>,
        outcome: Result<Reloaded, ReloadError>,
    ) {
        let state = &mut self.owner.state;
        let outcome = match outcome {
            Ok(r) => {
                state.reloads += 1;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let took = r.took;
                tracing::info!(
                    previous = r.previous,
                    generation = r.generation,
                    diff = %r.diff,
                    read_ms = ms(took.read),
                    compile_ms = ms(took.compile),
                    write_ms = ms(took.write),
                    total_ms = ms(took.total),
                    "policy reloaded"
                );
                Ok(Arc::new(r))
            }
            Err(e) => {
                state.reload_errors += 1;
                tracing::error!(error = %e, "policy reload refused; the running policy stays");
                Err(Arc::new(e))
            }
        };
        self.publish();
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }

    /// Answers the runs whose binding is in the kernel now (or can no
    /// longer be), and gives up those that waited too long.
    fn settle_runs(&mut self) {
        let mut waiting = Vec::with_capacity(self.runs.len());
        let mut settled_runs = Vec::new();
        let state = &mut self.owner.state;
        for pending in self.runs.drain(..) {
            let run = &pending.run;
            let settled = match state.settle_run(run) {
                Some(outcome) => outcome,
                None if pending.asked.elapsed() < RUN_WAIT => {
                    waiting.push(pending);
                    continue;
                }
                None => {
                    state.abandon_run(run);
                    Err(DaemonError::RunNotBound(format!(
                        "no policy generation for {} within {RUN_WAIT:?}",
                        run.id
                    )))
                }
            };
            let slot = state.slot_of(&run.id);
            settled_runs.push((
                pending.reply,
                settled.map(|cgroup| RunStarted {
                    cgroup,
                    slot,
                    egress_bundle: state.config.egress.enabled.then(|| {
                        crate::egress::bundle_path(&state.config.state_dir)
                            .display()
                            .to_string()
                    }),
                }),
            ));
        }
        self.runs = waiting;
        if !settled_runs.is_empty() {
            self.publish();
        }
        for (reply, outcome) in settled_runs {
            let _ = reply.send(outcome);
        }
    }

    fn publish(&mut self) {
        let state = &self.owner.state;
        self.owner.observers.publish(state);
        let snapshot = Snapshot::of(state, !matches!(self.work, Work::Idle));
        self.owner.snapshot.send_replace(Arc::new(snapshot));
    }
}

/// Reads and checks a reload's policy and entries, and what changes
/// against the running policy. Runs off the owner.
fn load(
    config: &Config,
    running: &PolicySet,
    running_entries: &EntrySet,
    reader: &std::sync::Mutex<policy::Reader>,
) -> Result<Loaded, ReloadError> {
    let policy = reader
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .load(&config.policy, &config.trust_domains)?;
    super::state::log_warnings(&policy);
    let entries = load_changed_entries(config, running_entries)?;
    let diff = policy::diff(running, &policy);
    Ok(Loaded {
        policy,
        entries,
        diff,
    })
}

/// Runs `work` on a thread of its own; the receiver gets its result (or
/// an error, if the thread could not be started or died).
fn off_owner<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    // Held where a thread that cannot be started does not drop it (with
    // it, the generation maps a job was lent).
    let held = Arc::new(std::sync::Mutex::new(Some((work, tx))));
    let mine = held.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("idgate-{what}"))
        .spawn(move || {
            if let Some((work, tx)) = mine.lock().expect("work lock").take() {
                let _ = tx.send(work());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, work = what, "cannot start a thread: the work runs on the owner, which waits for it");
        if let Some((work, tx)) = held.lock().expect("work lock").take() {
            let _ = tx.send(work());
        }
    }
    rx
}
