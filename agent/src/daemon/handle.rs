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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn handle() -> (Handle, mpsc::Receiver<Command>, Gauge) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let snapshot = Snapshot {
            started: Instant::now(),
            status: Default::default(),
            policy_path: Default::default(),
            policy: Default::default(),
            slots: Default::default(),
        };
        let (_, snapshot) = watch::channel(Arc::new(snapshot));
        let depth = Gauge::default();
        (Handle::new(tx, snapshot, depth.clone()), rx, depth)
    }

    /// An owner that takes nothing: the queue fills, the next caller is
    /// told the agent is busy after the bounded wait, and the depth counts
    /// exactly what is queued.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_refused_after_a_bounded_wait() {
        let (handle, mut rx, depth) = handle();
        let mut waiting = Vec::new();
        for _ in 0..QUEUE {
            let h = handle.clone();
            waiting.push(tokio::spawn(async move {
                h.ask(Command::Workloads, Duration::from_secs(3600)).await
            }));
        }
        while depth.get() < QUEUE as i64 {
            tokio::task::yield_now().await;
        }
        let refused = handle
            .ask(Command::Workloads, Duration::from_secs(3600))
            .await;
        assert!(matches!(refused, Err(OwnerError::Busy)), "{refused:?}");
        assert_eq!(depth.get(), QUEUE as i64);
        // An owner that takes a request and drops it unanswered.
        drop(rx.recv().await);
        let gone = waiting.remove(0).await.unwrap();
        assert!(matches!(gone, Err(OwnerError::Gone)), "{gone:?}");
    }

    /// An owner that takes a request and never answers: the caller is
    /// told so once its wait is over.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_ends_with_its_wait() {
        let (handle, mut rx, _) = handle();
        let asking = tokio::spawn(async move {
            handle
                .ask(Command::Workloads, Duration::from_secs(10))
                .await
        });
        let _held = rx.recv().await;
        let outcome = asking.await.unwrap();
        assert!(
            matches!(outcome, Err(OwnerError::NoAnswer(_))),
            "{outcome:?}"
        );
    }
}
