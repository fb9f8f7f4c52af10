//! `idgate agent`: checks everything first, then puts the programs in place
//! (or adopts them), writes policy and bindings, and serves the control
//! socket until SIGTERM or SIGINT. Stopping leaves every pin: enforcement
//! goes on without the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Authoriser, Reply, Request};
use crate::bpf::{self, Enforcer};
use crate::cgroup;
use crate::config::Config;
use crate::identity::SpiffeId;
use crate::policy::{self, PolicySet};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("{0}")]
    Privileges(String),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// What one application of policy and bindings put in the kernel.
struct Applied {
    /// Slot and SPIFFE ID of every identity with a bound cgroup.
    identities: Vec<(u32, SpiffeId)>,
    /// Bound cgroup ids and their slots.
    bound: BTreeMap<u64, u32>,
    /// The policy generation now active.
    generation: u32,
}

/// What the running agent knows, for the control socket.
struct State {
    config: Config,
    scope_dir: PathBuf,
    enforcer: Enforcer,
    applied: Applied,
    started: Instant,
}

/// Runs the agent with the configuration at `config_path`.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    // Everything that can be wrong with the input is found before anything
    // in the kernel is touched.
    let config = Config::load(config_path)?;
    let policy = policy::load(&config.policy, &config.trust_domains)?;
    crate::privileges::check().map_err(DaemonError::Privileges)?;
    tracing::info!(config = %config_path.display(), ?config, "effective configuration");

    let root = cgroup::cgroup2_root()?;
    let scope_dir = root.join(&config.scope);
    cgroup::ensure_dir(&scope_dir)?;
    let mut enforcer = bpf::install(&config.pin_dir, &scope_dir)?;
    tracing::info!(
        scope = %scope_dir.display(),
        pin_dir = %config.pin_dir.display(),
        adopted = ?enforcer.attachment.adopted,
        attached = ?enforcer.attachment.attached,
        "programs in place"
    );

    let applied = apply(&mut enforcer, &config, &scope_dir, &policy)?;
    tracing::info!(
        generation = applied.generation,
        identities = applied.identities.len(),
        workloads = applied.bound.len(),
        mode = ?policy.mode,
        "policy active"
    );

    let auth = Authoriser {
        uids: config.operator_uids.clone(),
        gids: config.operator_gids.clone(),
    };
    let socket = config.control_socket.clone();
    let state = Arc::new(Mutex::new(State {
        config,
        scope_dir,
        enforcer,
        applied,
        started: Instant::now(),
    }));
    let handler_state = state.clone();
    let server = admin::serve(&socket, auth, move |request| {
        handle(&handler_state.lock().expect("state lock"), request)
    });

    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    tracing::info!(socket = %socket.display(), "ready");
    let result = tokio::select! {
        r = server => r.map_err(DaemonError::from),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the control socket");
    }
    tracing::info!("stopped; programs stay attached and pinned");
    result
}

/// Compiles the policy for the configured bindings, switches the kernel to
/// it, then brings the identity bindings in line.
fn apply(
    enforcer: &mut Enforcer,
    config: &Config,
    scope_dir: &Path,
    policy: &PolicySet,
) -> Result<Applied, DaemonError> {
    let mut wanted: Vec<(u64, SpiffeId)> = Vec::new();
    for (rel, id) in config.bindings() {
        // A statically bound cgroup is the operator's declaration: make it
        // if it is missing, so workloads can be started in it.
        let dir = scope_dir.join(&rel);
        cgroup::ensure_dir(&dir)?;
        wanted.push((cgroup::cgroup_id(&dir)?, id));
    }
    let ids: BTreeSet<SpiffeId> = wanted.iter().map(|(_, id)| id.clone()).collect();
    let slots = enforcer.slots.assign(&ids)?;
    let compiled = policy::compile(policy, &slots);
    let generation = enforcer.maps.apply(&compiled)?;

    let slot_of: BTreeMap<&SpiffeId, u32> = slots.iter().map(|(s, id)| (id, *s)).collect();
    let bound: BTreeMap<u64, u32> = wanted.iter().map(|(cg, id)| (*cg, slot_of[id])).collect();
    for (cg, slot) in &bound {
        enforcer.maps.bind(*cg, *slot)?;
    }
    for cg in enforcer.maps.bindings()?.keys() {
        if !bound.contains_key(cg) {
            enforcer.maps.unbind(*cg)?;
        }
    }
    enforcer
        .slots
        .retain(&slots.iter().map(|(s, _)| *s).collect())?;
    Ok(Applied {
        identities: slots,
        bound,
        generation,
    })
}

fn handle(state: &State, request: Request) -> Reply {
    match request {
        Request::Status => Reply::ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": state.started.elapsed().as_secs(),
            "scope": state.scope_dir,
            "pin_dir": state.config.pin_dir,
            "programs": state.enforcer.attachment,
            "generation": state.applied.generation,
            "identities": state.applied.identities.len(),
            "workloads": state.applied.bound.len(),
        })),
    }
}
