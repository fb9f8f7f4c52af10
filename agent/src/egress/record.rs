//! The record of each request through the broker and of each connection
//! it refused or passed through, and the channel they go out on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::identity::SpiffeId;

/// What happened to a request or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream with its credential; `status` is the upstream's.
    Forwarded,
    /// A TLS connection for another name the identity may reach, spliced
    /// to it untouched.
    Passthrough,
    /// Refused by the rules (or for want of an identity); the reason is
    /// what the workload was told.
    Refused(String),
    /// Allowed, but the upstream or the credential failed (502, 504, 500).
    Failed(String),
}

/// One request through the broker, or one connection it refused or passed
/// through. Never holds a credential's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRecord {
    /// The slot the connection was redirected for; none when it did not
    /// come to a slot's address (a direct connect to the listener).
    pub slot: Option<u32>,
    pub identity: Option<SpiffeId>,
    /// The host the request named (Host or `:authority`), or the SNI.
    pub host: Option<String>,
    /// The TLS server name; none for plain HTTP or a ClientHello without.
    pub sni: Option<String>,
    /// None for a connection refused or passed through.
    pub method: Option<String>,
    /// The path without the query (which may hold secrets of its own).
    pub path: Option<String>,
    /// The status the workload got; none for a refused connection or a
    /// passthrough.
    pub status: Option<u16>,
    /// Body bytes from the workload (for a passthrough: all bytes).
    pub bytes_up: u64,
    /// Body bytes to the workload (for a passthrough: all bytes).
    pub bytes_down: u64,
    /// From the request's head (or the connection's accept) to the end of
    /// the response body (or of the connection).
    pub duration: Duration,
    pub credential: Option<Arc<str>>,
    pub outcome: Outcome,
    pub at: SystemTime,
}

/// The sending end of the records, counting those the channel had no
/// room for.
pub(super) struct Records {
    tx: mpsc::Sender<BrokerRecord>,
    dropped: AtomicU64,
}

impl Records {
    pub(super) fn new(tx: mpsc::Sender<BrokerRecord>) -> Self {
        Self {
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    /// Sends `record` unless the channel is full or closed (then counts
    /// it as dropped).
    pub(super) fn send(&self, record: BrokerRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped so far.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
