//! The audit log's record of what happened to a grant: made, extended,
//! revoked, expired, or dropped at start as a grant of an earlier boot.
//! Schema: docs/events.md.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::model::{Grant, GrantProtocol, GrantTo, Ports};
use crate::identity::SpiffeId;

/// What happened to the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantAction {
    Granted,
    Extended,
    Revoked,
    Expired,
    /// Of an earlier boot, found at start: its expiry means nothing now.
    Dropped,
}

/// One audit-log line about a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRecord {
    pub version: u32,
    /// When it happened (for an expiry, the moment the kernel's clock
    /// passed it, even if the agent was down), RFC 3339.
    pub time: String,
    /// Always `grant`: tells these lines from decision events.
    pub kind: String,
    pub action: GrantAction,
    pub grant_id: u32,
    pub identity: SpiffeId,
    pub to: GrantTo,
    pub ports: Ports,
    pub protocol: GrantProtocol,
    /// The operator who acted (SO_PEERCRED); null for an expiry or a drop.
    pub uid: Option<u32>,
    /// The operator who granted it.
    pub granted_by: u32,
    pub reason: Option<String>,
    /// The grant's end on the boot-time clock (`CLOCK_BOOTTIME`).
    pub expiry_boot_ns: u64,
}

impl GrantRecord {
    pub fn new(action: GrantAction, grant: &Grant, uid: Option<u32>, time: SystemTime) -> Self {
        Self {
            version: crate::events::SCHEMA_VERSION,
            time: humantime::format_rfc3339_nanos(time).to_string(),
            kind: "grant".into(),
            action,
            grant_id: grant.id,
            identity: grant.identity.clone(),
            to: grant.to.clone(),
            ports: grant.ports,
            protocol: grant.protocol,
            uid,
            granted_by: grant.granted_by,
            reason: grant.reason.clone(),
            expiry_boot_ns: grant.expiry_boot_ns,
        }
    }
}
