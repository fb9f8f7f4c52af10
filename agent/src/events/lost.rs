//! The audit log's record of decision records that were lost: the kernel
//! found its ring buffer full, or the log could not be written. Readers
//! of the log (`idgate policy suggest`) learn from it that what they read
//! of that time is not complete.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Where records were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostSource {
    /// The kernel's ring buffer was full (`IDG_EVENT_DROPS`).
    RingBuffer,
    /// Writes to the audit log failed (a full disk).
    AuditLog,
}

/// One audit-log line saying records were lost (`kind` `lost`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LostRecord {
    pub version: u32,
    /// When the agent found out, RFC 3339.
    pub time: String,
    /// Always `lost`: tells these lines from decision events.
    pub kind: String,
    pub source: LostSource,
    /// Records lost since this agent last said so: for the ring buffer,
    /// at the agent's first look the kernel's count since the maps were
    /// made (which may repeat what an earlier agent said).
    pub records: u64,
}

impl LostRecord {
    pub fn new(source: LostSource, records: u64, time: SystemTime) -> Self {
        Self {
            version: super::SCHEMA_VERSION,
            time: humantime::format_rfc3339_nanos(time).to_string(),
            kind: "lost".into(),
            source,
            records,
        }
    }
}
