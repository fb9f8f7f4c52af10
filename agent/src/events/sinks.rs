//! Where events go: the audit log, and standard output when asked. Each
//! event is one JSON line; lines are queued per batch and written at once.

use std::io::Write;

use super::audit_log::{AuditLog, AuditLogError};
use super::feed::EventFeed;
use super::record::Event;

/// The configured destinations of events.
pub struct Sinks {
    audit_log: Option<AuditLog>,
    /// Lines queued for standard output, when it is a destination.
    stdout: Option<Vec<u8>>,
    /// `idgate events` followers.
    feed: EventFeed,
    line: Vec<u8>,
}

impl Sinks {
    pub fn new(audit_log: Option<AuditLog>, stdout: bool) -> Self {
        Self {
            audit_log,
            stdout: stdout.then(Vec::new),
            feed: EventFeed::default(),
            line: Vec::new(),
        }
    }

    /// The feed of these sinks' events, for `idgate events`.
    pub fn feed(&self) -> EventFeed {
        self.feed.clone()
    }

    /// Queues one event for every destination.
    pub fn push(&mut self, event: &Event) -> Result<(), AuditLogError> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, event).expect("an event serialises");
        self.feed.publish(&self.line);
        self.line.push(b'\n');
        self.write_line()
    }

    /// Queues the line in `self.line` for standard output and the log.
    fn write_line(&mut self) -> Result<(), AuditLogError> {
        if let Some(out) = &mut self.stdout {
            out.extend_from_slice(&self.line);
        }
        match &mut self.audit_log {
            Some(log) => log.push(&self.line),
            None => Ok(()),
        }
    }

    /// Queues a record that is not a decision event (a grant's) for the
    /// audit log and standard output; `idgate events` shows decisions only.
    pub fn push_record(&mut self, record: &impl serde::Serialize) -> Result<(), AuditLogError> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, record).expect("a record serialises");
        self.line.push(b'\n');
        self.write_line()
    }

    /// Writes what is queued. Standard output that cannot be written (the
    /// reader went away) is given up, once, with a warning.
    pub fn flush(&mut self) -> Result<(), AuditLogError> {
        if let Some(out) = &mut self.stdout
            && !out.is_empty()
        {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(out).and_then(|()| stdout.flush()) {
                tracing::warn!(error = %e, "standard output cannot be written: events go on to the audit log only");
                self.stdout = None;
            } else {
                out.clear();
            }
        }
        match &mut self.audit_log {
            Some(log) => log.flush(),
            None => Ok(()),
        }
    }
}
