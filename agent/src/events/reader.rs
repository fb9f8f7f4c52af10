//! The task that reads decision records from the ring buffer as they come
//! (and what an earlier agent left in it), names them and writes them out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::EventsError;
use super::audit_log::AuditLogError;
use super::kernel::EventMaps;
use super::lost::{LostRecord, LostSource};
use super::metrics::EventMetrics;
use super::names::Names;
use super::record::{self, Enricher, Event};
use super::sinks::Sinks;
use crate::dns::{DnsRecord, NameBook};
use crate::egress::BrokerRecord;
use crate::grants::GrantRecord;

/// Records handled before the task lets others run.
const MAX_BATCH: usize = 4096;
/// How often the drop count is read, and the ring buffer drained even
/// without a wake-up.
const TICK: Duration = Duration::from_secs(1);

/// Starts the reader on the runtime it is called from.
pub fn spawn(
    maps: EventMaps,
    sinks: Sinks,
    names: Arc<Names>,
    metrics: EventMetrics,
    feeds: Feeds,
) -> Result<(), EventsError> {
    // SAFETY: the descriptor is the ring buffer map's, owned by `maps`,
    // which the `AsyncFd` owns from now on and never replaces it.
    let fd = unsafe { AsyncFd::register_with_interest(maps, Interest::READABLE) }
        .map_err(|e| EventsError::Watch(e.into_parts().1))?;
    let reader = Reader {
        sinks,
        names,
        metrics,
        enricher: Enricher::new(),
        lost_while_failing: None,
        drops_seen: 0,
        book: feeds.book,
    };
    tokio::spawn(run(fd, reader, feeds.dns, feeds.grants, feeds.broker));
    Ok(())
}

/// What the rest of the agent sends the reader: the DNS path's decision
/// records and the names of learned addresses for the kernel's, and what
/// happened to grants.
pub struct Feeds {
    pub book: Arc<NameBook>,
    pub dns: mpsc::Receiver<DnsRecord>,
    pub grants: mpsc::UnboundedReceiver<GrantRecord>,
    /// The credential broker's records.
    pub broker: mpsc::Receiver<BrokerRecord>,
}

async fn run(
    mut fd: AsyncFd<EventMaps>,
    mut reader: Reader,
    mut dns: mpsc::Receiver<DnsRecord>,
    mut grants: mpsc::UnboundedReceiver<GrantRecord>,
    mut broker: mpsc::Receiver<BrokerRecord>,
) {
    reader.check_drops(fd.get_ref());
    let mut checked = Instant::now();
    loop {
        let ready = tokio::select! {
            r = tokio::time::timeout(TICK, fd.readable_mut()) => r,
            Some(first) = dns.recv() => {
                reader.records(first, &mut dns, Enricher::dns_event);
                continue;
            }
            Some(first) = broker.recv() => {
                reader.records(first, &mut broker, Enricher::broker_event);
                continue;
            }
            Some(record) = grants.recv() => {
                reader.grant(&record);
                continue;
            }
        };
        match ready {
            Ok(Ok(mut guard)) => {
                // Readiness is cleared only once the buffer is empty: the
                // kernel wakes the reader only when it had caught up.
                if reader.drain(&mut guard.get_inner_mut().ring) {
                    guard.clear_ready();
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot watch the events ring buffer: no more decision events (enforcement goes on)");
                return;
            }
            Err(_) => {
                reader.drain(&mut fd.get_mut().ring);
            }
        }
        if checked.elapsed() >= TICK {
            reader.check_drops(fd.get_ref());
            checked = Instant::now();
        }
        tokio::task::yield_now().await;
    }
}

struct Reader {
    sinks: Sinks,
    names: Arc<Names>,
    metrics: EventMetrics,
    enricher: Enricher,
    /// While the audit log cannot be written: records lost so far.
    lost_while_failing: Option<u64>,
    /// The kernel's drop count when last read.
    drops_seen: u64,
    book: Arc<NameBook>,
}

impl Reader {
    /// Handles up to [`MAX_BATCH`] records; returns whether the ring buffer
    /// was emptied.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let names = self.names.snapshot();
        self.enricher.begin_batch();
        let mut handled = 0;
        let mut undecodable = None;
        let emptied = loop {
            if handled == MAX_BATCH {
                break false;
            }
            let Some(item) = ring.next() else {
                break true;
            };
            handled += 1;
            let decoded = record::decode(&item);
            drop(item);
            match decoded {
                Ok(r) => {
                    let event = self.enricher.event(&r, &names, &self.book);
                    self.metrics.decision(&event);
                    if let Err(e) = self.sinks.push(&event) {
                        self.write_failed(e);
                    }
                }
                Err(e) => {
                    self.metrics.undecodable();
                    undecodable.get_or_insert((e, 0)).1 += 1;
                }
            }
        };
        if let Some((first, count)) = undecodable {
            tracing::warn!(count, first = %first, "ring buffer items skipped: not a decision record this agent reads");
        }
        if handled > 0 {
            match self.sinks.flush() {
                Ok(()) => {
                    if let Some(lost) = self.lost_while_failing.take() {
                        tracing::warn!(lost, "audit log writable again");
                        self.lost(LostSource::AuditLog, lost);
                    }
                }
                Err(e) => self.write_failed(e),
            }
        }
        emptied
    }

    /// Writes `first` and whatever other records of its feed (the DNS
    /// path's, the broker's) wait, up to a batch.
    fn records<R>(
        &mut self,
        first: R,
        more: &mut mpsc::Receiver<R>,
        event_of: fn(&Enricher, &R) -> Event,
    ) {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(r) = next.take() {
            let event = event_of(&self.enricher, &r);
            self.metrics.decision(&event);
            if let Err(e) = self.sinks.push(&event) {
                self.write_failed(e);
            }
            handled += 1;
            if handled < MAX_BATCH {
                next = more.try_recv().ok();
            }
        }
        if let Err(e) = self.sinks.flush() {
            self.write_failed(e);
        }
    }

    /// Writes a grant's record to the audit log (and standard output).
    fn grant(&mut self, record: &GrantRecord) {
        if let Err(e) = self
            .sinks
            .push_record(record)
            .and_then(|()| self.sinks.flush())
        {
            self.write_failed(e);
        }
    }

    /// Writes that `records` were lost to the audit log (and standard
    /// output), for readers of the log.
    fn lost(&mut self, source: LostSource, records: u64) {
        let record = LostRecord::new(source, records, std::time::SystemTime::now());
        if let Err(e) = self
            .sinks
            .push_record(&record)
            .and_then(|()| self.sinks.flush())
        {
            self.write_failed(e);
        }
    }

    /// Counts a failed write, and logs it once per spell of failures (the
    /// end of the spell is logged by `drain`).
    fn write_failed(&mut self, e: AuditLogError) {
        match e {
            AuditLogError::Rotate { .. } => tracing::warn!(error = %e, "audit log"),
            AuditLogError::Write { .. } => {
                self.metrics.audit_log_lost(e.lost());
                match &mut self.lost_while_failing {
                    Some(lost) => *lost += e.lost(),
                    None => {
                        tracing::error!(error = %e, "audit log write failed: decision records are lost (and counted) until it can be written again; enforcement goes on");
                        self.lost_while_failing = Some(e.lost());
                    }
                }
            }
        }
    }

    fn check_drops(&mut self, maps: &EventMaps) {
        match maps.drops() {
            Ok(total) => {
                self.metrics.ring_drops_total(total);
                if total > self.drops_seen {
                    let dropped = total - self.drops_seen;
                    tracing::warn!(
                        dropped,
                        total,
                        "events ring buffer was full: decision records dropped by the kernel"
                    );
                    self.drops_seen = total;
                    self.lost(LostSource::RingBuffer, dropped);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the ring buffer drop count"),
        }
    }
}
