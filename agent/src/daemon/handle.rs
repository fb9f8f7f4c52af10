//! A cheap handle on the owner: sends it [`Command`]s and waits for the
//! answer, each step with a bound, and reads its latest [`Snapshot`].

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{mpsc, oneshot, watch};

use super::owner::Command;
use super::snapshot::Snapshot;

/// Requests the owner's queue holds; past that a caller waits up to
/// [`ENQUEUE_WAIT`] for room.
pub const QUEUE: usize = 64;
/// How long a caller waits for room in a full queue.
pub const ENQUEUE_WAIT: Duration = Duration::from_secs(2);

/// Why the owner gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(
        "the agent is busy: {QUEUE} requests were queued ahead of this one for {ENQUEUE_WAIT:?}; try again"
    )]
    Busy,
    #[error("the agent is stopping")]
    Gone,
    #[error("no answer within {0:?}; the request may still take effect (see `idgate status`)")]
    NoAnswer(Duration),
}

#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    depth: Gauge,
}

impl Handle {
    pub fn new(
        commands: mpsc::Sender<Command>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        depth: Gauge,
    ) -> Self {
        Self {
            commands,
            snapshot,
            depth,
        }
    }

    /// The owner's latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Sends the command `make` builds around its reply channel and waits
    /// up to `wait` for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
        wait: Duration,
    ) -> Result<T, OwnerError> {
        let (tx, rx) = oneshot::channel();
        // Counted before it is sent, so the owner never takes away what
        // was not counted yet.
        self.depth.inc();
        if let Err(e) = self.commands.send_timeout(make(tx), ENQUEUE_WAIT).await {
            self.depth.dec();
            return Err(match e {
                SendTimeoutError::Timeout(_) => OwnerError::Busy,
                SendTimeoutError::Closed(_) => OwnerError::Gone,
            });
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(OwnerError::Gone),
            Err(_) => Err(OwnerError::NoAnswer(wait)),
        }
    }
}
