//! Operators' grants: time-bounded access for one identity to one
//! destination, on top of its policy, ended by the kernel itself.
//!
//! [`Grants`] is the one owner of grant state (the daemon's owner holds
//! it and calls it with the slot table it applies): the grants by id, the
//! file in `state_dir` ([`store`]) and the entries of `IDG_GRANTS`
//! ([`entries`]). A grant is keyed by its SPIFFE ID; its kernel entries
//! follow the identity's slot: written when the identity gets one, and
//! removed when the slot goes. Every change is in the file before it is in
//! the kernel, and in both before it is answered; each is audited.
//!
//! The kernel compares each grant's expiry with the boot-time clock on
//! every decision, so a grant ends on time with no agent running; the
//! agent's one-second tick only removes what expired from the map and the
//! file, and audits it.

mod audit;
mod config;
mod entries;
mod model;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use idgate_common::GrantValue;
use tokio::sync::mpsc;

use crate::bpf::{BpfError, GrantMap};
use crate::clock::{boot_id, boot_ns, wall_time};
use crate::identity::SpiffeId;
use entries::EntryKey;
use store::Store;

pub use audit::{GrantAction, GrantRecord};
pub use config::{Granter, GrantsConfig, GrantsConfigError};
pub use entries::TooManyOverlapping;
pub use model::{
    Grant, GrantProtocol, GrantSpec, InputError, Ports, grant_destination, grant_identity,
};
pub use store::StoreError;

/// Why a grant request was refused (nothing changed), or why grant state
/// could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("a grant's duration must be more than zero")]
    ZeroDuration,
    #[error(
        "{} is longer than the longest grant allowed, {} ([grants] max_duration)",
        humantime::format_duration(*.asked),
        humantime::format_duration(*.max)
    )]
    TooLong { asked: Duration, max: Duration },
    #[error("{max} grants already run, the most allowed ([grants] max_live)")]
    TooMany { max: u32 },
    #[error(transparent)]
    Overlap(#[from] TooManyOverlapping),
    #[error("no grant {0} runs (it may have expired or been revoked)")]
    NoSuchGrant(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("cannot read the boot id: {0}")]
    BootId(std::io::Error),
}

/// A running grant, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub grant: Grant,
    /// When it ends, on the wall clock (as far as the clocks agree now).
    pub expires_at: SystemTime,
    pub left: Duration,
    /// The identity's slot, when it holds one: only then is it in the
    /// kernel.
    pub slot: Option<u32>,
}

/// The grants file as read at start.
pub struct Read {
    config: GrantsConfig,
    store: Store,
    loaded: store::Loaded,
}

/// The slot each identity holds.
pub type Slots = HashMap<SpiffeId, u32>;

/// The grants, their file and their map.
pub struct Grants {
    config: GrantsConfig,
    store: Store,
    map: GrantMap,
    grants: BTreeMap<u32, Grant>,
    next_id: u32,
    /// What the map holds.
    written: BTreeMap<EntryKey, GrantValue>,
    /// A change the map has not taken yet: tried again every tick.
    behind: bool,
    audit: mpsc::UnboundedSender<GrantRecord>,
}

impl Grants {
    /// Reads the grants file (before anything is put in the kernel: a file
    /// that cannot be read stops the agent there).
    pub fn load(config: GrantsConfig, state_dir: &Path) -> Result<Read, GrantError> {
        let store = Store::new(state_dir, boot_id().map_err(GrantError::BootId)?);
        let loaded = store.load(boot_ns())?;
        Ok(Read {
            config,
            store,
            loaded,
        })
    }

    /// Takes over the map in `pin_dir` with the grants `read`. Grants of
    /// another boot are dropped and those that expired while no agent ran
    /// are removed, each audited, and the file is written without them,
    /// so none comes back. The map is brought in line by the first
    /// [`Grants::follow`].
    pub fn open(
        read: Read,
        pin_dir: &Path,
        audit: mpsc::UnboundedSender<GrantRecord>,
    ) -> Result<Self, GrantError> {
        let Read {
            config,
            store,
            loaded,
        } = read;
        let map = GrantMap::open(pin_dir)?;
        let written = map.read()?;
        let me = Self {
            config,
            store,
            map,
            grants: loaded.live.into_iter().map(|g| (g.id, g)).collect(),
            next_id: loaded.next_id,
            written,
            behind: true,
            audit,
        };
        if !loaded.other_boot.is_empty() || !loaded.expired.is_empty() {
            me.save(me.next_id, &me.grants)?;
        }
        let now_boot = boot_ns();
        let now = SystemTime::now();
        for g in &loaded.other_boot {
            tracing::warn!(grant = g.id, identity = %g.identity, to = %g.to, "grant of an earlier boot dropped");
            me.record(GrantAction::Dropped, g, None, now);
        }
        for g in &loaded.expired {
            tracing::info!(grant = g.id, identity = %g.identity, to = %g.to, "grant expired while the agent was down");
            me.record(
                GrantAction::Expired,
                g,
                None,
                wall_time(g.expiry_boot_ns, now, now_boot),
            );
        }
        tracing::info!(
            live = me.grants.len(),
            dropped = loaded.other_boot.len(),
            expired = loaded.expired.len(),
            file = %me.store.path().display(),
            "grants read"
        );
        Ok(me)
    }

    /// Grants running.
    pub fn live(&self) -> usize {
        self.grants.len()
    }

    /// Entries of `IDG_GRANTS` written (one per destination prefix of a
    /// slot's grants).
    pub fn entries(&self) -> usize {
        self.written.len()
    }

    /// Grants `spec` for `uid`: in the file, then in the kernel if the
    /// identity holds a slot, then audited.
    pub fn grant(&mut self, spec: GrantSpec, uid: u32, slots: &Slots) -> Result<Grant, GrantError> {
        self.expire(slots);
        self.check_duration(spec.duration)?;
        if self.grants.len() >= self.config.max_live as usize {
            return Err(GrantError::TooMany {
                max: self.config.max_live,
            });
        }
        let grant = Grant {
            id: self.next_id,
            identity: spec.identity,
            to: spec.to,
            ports: spec.ports,
            protocol: spec.protocol,
            granted_by: uid,
            granted_at: SystemTime::now(),
            expiry_boot_ns: boot_ns().saturating_add(spec.duration.as_nanos() as u64),
            reason: spec.reason,
        };
        let mut next = self.grants.clone();
        next.insert(grant.id, grant.clone());
        self.change(next, self.next_id + 1, slots)?;
        tracing::warn!(grant = grant.id, identity = %grant.identity, to = %grant.to, ports = %grant.ports, protocol = %grant.protocol, uid, "granted");
        self.record(GrantAction::Granted, &grant, Some(uid), grant.granted_at);
        Ok(grant)
    }

    /// Ends grant `id` now.
    pub fn revoke(&mut self, id: u32, uid: u32, slots: &Slots) -> Result<Grant, GrantError> {
        self.expire(slots);
        let mut next = self.grants.clone();
        let grant = next.remove(&id).ok_or(GrantError::NoSuchGrant(id))?;
        self.change(next, self.next_id, slots)?;
        tracing::warn!(grant = id, identity = %grant.identity, uid, "grant revoked");
        self.record(GrantAction::Revoked, &grant, Some(uid), SystemTime::now());
        Ok(grant)
    }

    /// Makes grant `id` run until `duration` from now.
    pub fn extend(
        &mut self,
        id: u32,
        duration: Duration,
        uid: u32,
        slots: &Slots,
    ) -> Result<Grant, GrantError> {
        self.expire(slots);
        self.check_duration(duration)?;
        let mut next = self.grants.clone();
        let grant = next.get_mut(&id).ok_or(GrantError::NoSuchGrant(id))?;
        grant.expiry_boot_ns = boot_ns().saturating_add(duration.as_nanos() as u64);
        let grant = grant.clone();
        self.change(next, self.next_id, slots)?;
        tracing::warn!(grant = id, identity = %grant.identity, uid, "grant extended");
        self.record(GrantAction::Extended, &grant, Some(uid), SystemTime::now());
        Ok(grant)
    }

    /// The running grants.
    pub fn list(&self, slots: &Slots) -> Vec<Running> {
        self.grants
            .values()
            .map(|g| self.running(g.clone(), slots))
            .filter(|r| !r.left.is_zero())
            .collect()
    }

    /// `grant` as it stands now.
    pub fn running(&self, grant: Grant, slots: &Slots) -> Running {
        let (now, now_boot) = (SystemTime::now(), boot_ns());
        Running {
            expires_at: wall_time(grant.expiry_boot_ns, now, now_boot),
            left: Duration::from_nanos(grant.expiry_boot_ns.saturating_sub(now_boot)),
            slot: slots.get(&grant.identity).copied(),
            grant,
        }
    }

    /// Removes the grants that expired from the map and the file, and
    /// audits each; brings the map in line if an earlier change could not.
    pub fn expire(&mut self, slots: &Slots) {
        let (now, now_boot) = (SystemTime::now(), boot_ns());
        let (expired, live): (BTreeMap<u32, Grant>, BTreeMap<u32, Grant>) = self
            .grants
            .clone()
            .into_iter()
            .partition(|(_, g)| g.expiry_boot_ns <= now_boot);
        if !expired.is_empty() {
            // The kernel allows nothing by them any more, whatever the
            // file says: a file that cannot be written only means they are
            // audited again at the next start.
            if let Err(e) = self.save(self.next_id, &live) {
                tracing::error!(error = %e, "cannot write the grants file without the expired grants");
            }
            self.grants = live;
            self.behind = true;
            for g in expired.values() {
                tracing::info!(grant = g.id, identity = %g.identity, "grant expired");
                self.record(
                    GrantAction::Expired,
                    g,
                    None,
                    wall_time(g.expiry_boot_ns, now, now_boot),
                );
            }
        }
        if self.behind
            && let Err(e) = self.follow(slots)
        {
            tracing::error!(error = %e, "cannot bring the grants map in line; tried again in a second");
        }
    }

    /// Brings the map in line with the grants and `slots`: each identity's
    /// grants under the slot it holds, nothing under any other slot. Only
    /// entries that differ are written; new and changed ones go first, so
    /// no running grant is missing in between.
    pub fn follow(&mut self, slots: &Slots) -> Result<(), GrantError> {
        self.behind = true;
        let wanted = desired(&self.grants, slots)?;
        for (key, value) in &wanted {
            if self.written.get(key) != Some(value) {
                self.map.put(key, value)?;
                self.written.insert(*key, *value);
            }
        }
        let stale: Vec<EntryKey> = self
            .written
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.map.remove(&key)?;
            self.written.remove(&key);
        }
        self.behind = false;
        Ok(())
    }

    /// Puts `next` in the file and then in the kernel; if the kernel
    /// refuses, the file is put back as it was.
    fn change(
        &mut self,
        next: BTreeMap<u32, Grant>,
        next_id: u32,
        slots: &Slots,
    ) -> Result<(), GrantError> {
        // Refused before anything is written: too many overlapping.
        desired(&next, &Slots::new())?;
        self.save(next_id, &next)?;
        let before = std::mem::replace(&mut self.grants, next);
        // An id stays used even if the change is taken back: a grant id is
        // never given twice.
        self.next_id = next_id;
        if let Err(e) = self.follow(slots) {
            self.grants = before;
            if let Err(undo) = self.save(self.next_id, &self.grants) {
                tracing::error!(error = %undo, "cannot take back the grants file's change after the kernel refused it");
            }
            // The map may hold part of the change: put it back too.
            if let Err(undo) = self.follow(slots) {
                tracing::error!(error = %undo, "cannot take back the grants map's change; tried again in a second");
            }
            return Err(e);
        }
        Ok(())
    }

    fn check_duration(&self, asked: Duration) -> Result<(), GrantError> {
        if asked.is_zero() {
            return Err(GrantError::ZeroDuration);
        }
        if asked > self.config.max_duration {
            return Err(GrantError::TooLong {
                asked,
                max: self.config.max_duration,
            });
        }
        Ok(())
    }

    fn save(&self, next_id: u32, grants: &BTreeMap<u32, Grant>) -> Result<(), StoreError> {
        self.store.save(next_id, grants.values())
    }

    fn record(&self, action: GrantAction, grant: &Grant, uid: Option<u32>, time: SystemTime) {
        // No audit log reader (events off): the tracing line is the record.
        let _ = self.audit.send(GrantRecord::new(action, grant, uid, time));
    }
}

/// The map's entries for `grants`: each identity's under its slot, if it
/// holds one. Without slots, it only checks that every identity's grants
/// fit their entries.
fn desired(
    grants: &BTreeMap<u32, Grant>,
    slots: &Slots,
) -> Result<BTreeMap<EntryKey, GrantValue>, TooManyOverlapping> {
    let mut by_identity: HashMap<&SpiffeId, Vec<&Grant>> = HashMap::new();
    for g in grants.values() {
        by_identity.entry(&g.identity).or_default().push(g);
    }
    let mut out = BTreeMap::new();
    for (id, grants) in by_identity {
        let slot = slots.get(id).copied();
        let entries = entries::entries(slot.unwrap_or(0), grants)?;
        if slot.is_some() {
            out.extend(entries);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: u32, identity: &str, to: &str) -> Grant {
        Grant {
            id,
            identity: identity.parse().unwrap(),
            to: to.parse().unwrap(),
            ports: Ports::ALL,
            protocol: GrantProtocol::Any,
            granted_by: 0,
            granted_at: SystemTime::UNIX_EPOCH,
            expiry_boot_ns: u64::MAX,
            reason: None,
        }
    }

    #[test]
    fn entries_follow_the_slots_their_identities_hold() {
        let (a, b) = ("spiffe://example.org/a", "spiffe://example.org/b");
        let grants: BTreeMap<u32, Grant> = [
            grant(1, a, "10.0.0.0/8"),
            grant(2, a, "10.1.0.0/16"),
            grant(3, b, "10.0.0.0/8"),
        ]
        .into_iter()
        .map(|g| (g.id, g))
        .collect();
        let slots_of = |pairs: &[(&str, u32)]| -> Slots {
            pairs
                .iter()
                .map(|(id, s)| (id.parse().unwrap(), *s))
                .collect()
        };
        // No slot: nothing in the kernel, but the overlap is still checked.
        assert!(desired(&grants, &Slots::new()).unwrap().is_empty());
        // Only `a` holds one: its two entries, under its slot.
        let only_a = desired(&grants, &slots_of(&[(a, 5)])).unwrap();
        assert_eq!(only_a.len(), 2);
        assert!(only_a.keys().all(|(_, k)| k.slot == 5));
        // Both: `b`'s /8 is an entry of its own slot, never in `a`'s.
        let both = desired(&grants, &slots_of(&[(a, 5), (b, 6)])).unwrap();
        assert_eq!(both.len(), 3);
        let of_b: Vec<_> = both.iter().filter(|((_, k), _)| k.slot == 6).collect();
        assert_eq!(of_b.len(), 1);
        assert_eq!(of_b[0].1.grants[0].id, 3);
        assert_eq!(of_b[0].1.grants[1].expiry_boot_ns, 0, "only b's grant");
        // A slot that changes hands takes the new holder's entries only.
        let moved = desired(&grants, &slots_of(&[(b, 5)])).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved.values().next().unwrap().grants[0].id, 3);
    }
}
