//! `idgate agent`: checks everything first, then puts the programs in place
//! (or adopts them), writes policy and bindings, and serves the control
//! socket until SIGTERM or SIGINT; SIGHUP reloads the policy. Stopping
//! leaves every pin: enforcement goes on without the agent.

mod control;
mod revocations;
mod state;

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Authoriser};
use crate::config::Config;
use state::State;

pub use revocations::RevocationError;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Revocations(#[from] RevocationError),
    #[error("{0}")]
    Privileges(String),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent with the configuration at `config_path`.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    tracing::info!(config = %config_path.display(), ?config, "effective configuration");
    let auth = Authoriser {
        uids: config.operator_uids.clone(),
        gids: config.operator_gids.clone(),
    };
    let socket = config.control_socket.clone();
    let state = Arc::new(Mutex::new(State::start(config)?));

    let handler_state = state.clone();
    let server = admin::serve(&socket, auth, move |request| {
        control::handle(&mut handler_state.lock().expect("state lock"), request)
    });
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    tracing::info!(socket = %socket.display(), "ready");
    tokio::pin!(server);
    let result = loop {
        tokio::select! {
            r = &mut server => break r.map_err(DaemonError::from),
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policy");
                // The outcome is logged by `reload`.
                let _ = state.lock().expect("state lock").reload();
            }
        }
    };
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the control socket");
    }
    tracing::info!("stopped; programs stay attached and pinned");
    result
}
