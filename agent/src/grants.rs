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
//!
//! A grant by name is in the kernel as the addresses its identity's
//! lookups of the name were answered: the DNS path hands each answer's
//! addresses to [`Grants::learn`] (through the daemon's owner) before the
//! workload gets it, and each becomes a host entry of the grant until the
//! earlier of the grant's end and the answer's TTL. They are not kept in
//! the file: an agent that starts takes them back from the map as they
//! are, never longer.

mod audit;
mod config;
mod entries;
mod model;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use idgate_common::GrantValue;
use tokio::sync::mpsc;

use crate::bpf::{BpfError, GrantMap};
use crate::clock::{boot_id, boot_ns, wall_time};
use crate::hashing::FastMap;
use crate::identity::SpiffeId;
use entries::{EntryKey, LearnedAddresses};
use store::Store;

pub use audit::{GrantAction, GrantRecord};
pub use config::{Granter, GrantsConfig, GrantsConfigError};
pub use entries::TooManyOverlapping;
pub use model::{
    Grant, GrantProtocol, GrantSpec, GrantTo, InputError, Ports, grant_destination, grant_identity,
};

/// The most addresses one grant by name holds learned at once (a
/// wildcard's lookups of many names): past that an answer is refused
/// (SERVFAIL) until some expire.
pub const MAX_LEARNED_PER_GRANT: usize = 256;
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
    #[error(
        "no grant by name of the identity of slot {slot} runs among {ids:?} (expired, revoked, or the slot changed hands)"
    )]
    NotGranted { slot: u32, ids: Vec<u32> },
    #[error(
        "grant {id} already holds {MAX_LEARNED_PER_GRANT} addresses learned for its names; more are opened as those expire"
    )]
    TooManyLearned { id: u32 },
}

/// A running grant by name, for the DNS path: whose lookups it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameGrant {
    pub slot: u32,
    pub id: u32,
    pub pattern: crate::policy::NamePattern,
    pub expiry_boot_ns: u64,
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
    /// For a grant by name: the addresses learned for it that it opens.
    pub learned: usize,
}

/// The grants file as read at start.
pub struct Read {
    config: GrantsConfig,
    store: Store,
    loaded: store::Loaded,
}

/// The slot each identity holds.
pub type Slots = FastMap<SpiffeId, u32>;

/// The grants, their file and their map.
pub struct Grants {
    config: GrantsConfig,
    store: Store,
    map: GrantMap,
    grants: BTreeMap<u32, Grant>,
    next_id: u32,
    /// The addresses learned for grants by name, by grant.
    learned: LearnedAddresses,
    /// What the map holds.
    written: BTreeMap<EntryKey, GrantValue>,
    /// Counts changes of the grants (not of learned addresses): the DNS
    /// path's view of the grants by name is taken again when it moves.
    version: u64,
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
        let grants: BTreeMap<u32, Grant> = loaded.live.into_iter().map(|g| (g.id, g)).collect();
        let learned = learned_in(&written, &grants);
        let me = Self {
            config,
            store,
            map,
            grants,
            next_id: loaded.next_id,
            learned,
            written,
            version: 0,
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
            learned = me.learned.values().map(BTreeMap::len).sum::<usize>(),
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
            learned: self
                .learned
                .get(&grant.id)
                .map_or(0, |a| a.values().filter(|e| **e > now_boot).count()),
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
            self.version += 1;
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
        if self.forget_learned(now_boot) {
            self.behind = true;
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
        let wanted = desired(&self.grants, &self.learned, slots)?;
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
        desired(&next, &self.learned, &Slots::default())?;
        self.save(next_id, &next)?;
        let before = std::mem::replace(&mut self.grants, next);
        // An id stays used even if the change is taken back: a grant id is
        // never given twice.
        self.next_id = next_id;
        self.version += 1;
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
        self.forget_learned(boot_ns());
        Ok(())
    }

    /// Learns `addresses` (each with the end of its answer's TTL on the
    /// boot-time clock), the answer to a lookup from `slot`, for those of
    /// grants `ids` that still run for the identity holding `slot`: in the
    /// kernel before this returns, so a connect made as soon as the
    /// answer is out is judged with them. Returns the grants they were
    /// learned for. An answer that would hold more than an entry can (too
    /// many grants over one address) or than a grant may, or that the map
    /// refuses, changes nothing.
    pub fn learn(
        &mut self,
        slot: u32,
        ids: &[u32],
        addresses: &[(IpAddr, u64)],
        slots: &Slots,
    ) -> Result<Vec<u32>, GrantError> {
        let now_boot = boot_ns();
        let running: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| {
                self.grants.get(id).is_some_and(|g| {
                    g.to.name().is_some()
                        && g.expiry_boot_ns > now_boot
                        && slots.get(&g.identity) == Some(&slot)
                })
            })
            .collect();
        if running.is_empty() {
            return Err(GrantError::NotGranted {
                slot,
                ids: ids.to_vec(),
            });
        }
        self.forget_learned(now_boot);
        let mut next = self.learned.clone();
        for id in &running {
            let held = next.entry(*id).or_default();
            for (addr, expiry) in addresses {
                let addr = canonical(*addr);
                let at = held.entry(addr).or_insert(0);
                // A shorter TTL now than before: the later holds (the
                // answer given before still counts on it).
                *at = (*at).max(*expiry);
            }
            if held.len() > MAX_LEARNED_PER_GRANT {
                return Err(GrantError::TooManyLearned { id: *id });
            }
        }
        let before = std::mem::replace(&mut self.learned, next);
        if let Err(e) = self.follow(slots) {
            self.learned = before;
            if let Err(undo) = self.follow(slots) {
                tracing::error!(error = %undo, "cannot take back the grants map's change; tried again in a second");
            }
            return Err(e);
        }
        Ok(running)
    }

    /// The running grants by name of identities that hold a slot.
    pub fn names(&self, slots: &Slots) -> Vec<NameGrant> {
        self.grants
            .values()
            .filter_map(|g| {
                Some(NameGrant {
                    slot: *slots.get(&g.identity)?,
                    id: g.id,
                    pattern: g.to.name()?.clone(),
                    expiry_boot_ns: g.expiry_boot_ns,
                })
            })
            .collect()
    }

    /// Counts changes of the grants themselves.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Addresses learned for grants by name now in the kernel.
    pub fn learned(&self) -> usize {
        self.learned.values().map(BTreeMap::len).sum()
    }

    /// Drops learned addresses whose TTL is over and those of grants that
    /// no longer run; whether any went.
    fn forget_learned(&mut self, now_boot: u64) -> bool {
        let before = self.learned();
        let grants = &self.grants;
        self.learned.retain(|id, addrs| {
            addrs.retain(|_, expiry| *expiry > now_boot);
            grants.contains_key(id) && !addrs.is_empty()
        });
        self.learned() != before
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

/// The map's entries for `grants` and the addresses `learned` for those by
/// name: each identity's under its slot, if it holds one. Without slots,
/// it only checks that every identity's grants fit their entries.
fn desired(
    grants: &BTreeMap<u32, Grant>,
    learned: &LearnedAddresses,
    slots: &Slots,
) -> Result<BTreeMap<EntryKey, GrantValue>, TooManyOverlapping> {
    let mut by_identity: HashMap<&SpiffeId, Vec<&Grant>> = HashMap::new();
    for g in grants.values() {
        by_identity.entry(&g.identity).or_default().push(g);
    }
    let mut out = BTreeMap::new();
    for (id, grants) in by_identity {
        let slot = slots.get(id).copied();
        let entries = entries::entries(slot.unwrap_or(0), grants, learned)?;
        if slot.is_some() {
            out.extend(entries);
        }
    }
    Ok(out)
}

/// An IPv4-mapped IPv6 address as the IPv4 one: connects to it are
/// judged as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The learned addresses the map holds for `grants` by name (after a
/// restart): each host entry's inline grant that is a running grant by
/// name, with the expiry the entry holds, which is never later than what
/// the answer gave.
fn learned_in(
    written: &BTreeMap<EntryKey, GrantValue>,
    grants: &BTreeMap<u32, Grant>,
) -> LearnedAddresses {
    let mut learned = LearnedAddresses::new();
    for (key, value) in written {
        let Some(addr) = entries::host_of(key) else {
            continue;
        };
        for e in &value.grants {
            if e.expiry_boot_ns != 0 && grants.get(&e.id).is_some_and(|g| g.to.name().is_some()) {
                learned
                    .entry(e.id)
                    .or_default()
                    .insert(addr, e.expiry_boot_ns);
            }
        }
    }
    learned
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
        assert!(
            desired(&grants, &LearnedAddresses::new(), &Slots::default())
                .unwrap()
                .is_empty()
        );
        // Only `a` holds one: its two entries, under its slot.
        let only_a = desired(&grants, &LearnedAddresses::new(), &slots_of(&[(a, 5)])).unwrap();
        assert_eq!(only_a.len(), 2);
        assert!(only_a.keys().all(|(_, k)| k.slot == 5));
        // Both: `b`'s /8 is an entry of its own slot, never in `a`'s.
        let both = desired(
            &grants,
            &LearnedAddresses::new(),
            &slots_of(&[(a, 5), (b, 6)]),
        )
        .unwrap();
        assert_eq!(both.len(), 3);
        let of_b: Vec<_> = both.iter().filter(|((_, k), _)| k.slot == 6).collect();
        assert_eq!(of_b.len(), 1);
        assert_eq!(of_b[0].1.grants[0].id, 3);
        assert_eq!(of_b[0].1.grants[1].expiry_boot_ns, 0, "only b's grant");
        // A slot that changes hands takes the new holder's entries only.
        let moved = desired(&grants, &LearnedAddresses::new(), &slots_of(&[(b, 5)])).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved.values().next().unwrap().grants[0].id, 3);
    }
}
