//! The addresses each identity's lookups learned: the one owner of
//! `IDG_LEARNED` and `IDG_NAMES`, and their mirror in user space.
//!
//! An address is written for a slot and a name class with an expiry on
//! the monotonic clock: the TTL handed to the workload plus the grace.
//! Writes are all or nothing for one answer: either every address of it
//! is in the kernel when [`Learned::learn`] returns, or none changed and
//! the caller answers SERVFAIL. Nothing learned is ever evicted to make
//! room; expired entries are removed by [`Learned::sweep`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use idgate_common::{
    DestTables, FAMILY_V4, FAMILY_V6, LEARNED_INLINE, LearnedKey, LearnedName, LearnedValue,
    MAX_LEARNED, NAME_CLASS_BYTES, NAME_TEXT_BYTES, NameText,
};

use super::kernel::{KernelError, LearnedMaps};
use super::view::DnsView;
use crate::clock::{boot_ns, monotonic_ns};
use crate::policy::ClassId;

/// Why an answer's addresses were not learned.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("the identity already has {limit} learned addresses (max_addresses_per_identity)")]
    IdentityFull { limit: u32 },
    #[error("the learned-address table is full ({MAX_LEARNED} entries)")]
    TableFull,
    #[error("{addr} is already learned for {LEARNED_INLINE} other names of this identity")]
    TooManyNames { addr: IpAddr },
    #[error("name {0:?} is too long to keep")]
    NameTooLong(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// The names of learned entries by id, for decision records; shared
/// with the events reader.
#[derive(Debug, Default)]
pub struct NameBook(RwLock<HashMap<u32, Arc<str>>>);

impl NameBook {
    pub fn get(&self, id: u32) -> Option<Arc<str>> {
        self.0.read().ok()?.get(&id).cloned()
    }
}

/// The map key of `addr` learned for `slot` (an IPv4-mapped IPv6 address
/// is keyed as IPv4, as the programs judge it).
pub fn key_of(slot: u32, addr: IpAddr) -> LearnedKey {
    let mut key = LearnedKey {
        slot,
        ..Default::default()
    };
    match addr.to_canonical() {
        IpAddr::V4(v4) => {
            key.family = FAMILY_V4;
            key.addr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            key.family = FAMILY_V6;
            key.addr = v6.octets();
        }
    }
    key
}

/// The address a key holds.
pub fn addr_of(key: &LearnedKey) -> IpAddr {
    if key.family == FAMILY_V4 {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    }
}

/// One learned address, as `status` and `explain` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedAddress {
    pub addr: IpAddr,
    pub name: Option<Arc<str>>,
    pub class: [u8; NAME_CLASS_BYTES],
    /// `CLOCK_MONOTONIC` nanoseconds ([`monotonic_ns`]).
    pub expiry_ns: u64,
}

/// The learned addresses and names, and their maps.
pub struct Learned {
    maps: LearnedMaps,
    per_identity: u32,
    entries: HashMap<LearnedKey, KeptNames>,
    per_slot: HashMap<u32, u32>,
    ids: HashMap<Arc<str>, u32>,
    book: Arc<NameBook>,
    next_id: u32,
    /// [`suspended_ns`] when the expiries were last brought up to it.
    suspended: u64,
    /// The generation value of the last full [`Learned::restamp`].
    stamped_for: u32,
}

/// A suspend shorter than this is not followed: two clock reads differ by
/// a little anyway, and the grace is longer.
const SUSPEND_FOLLOWED: Duration = Duration::from_secs(1);

/// How long the host has been suspended since boot: `CLOCK_BOOTTIME`
/// less `CLOCK_MONOTONIC`.
fn suspended_ns() -> u64 {
    boot_ns().saturating_sub(monotonic_ns())
}

/// What the agent keeps of one name of an entry: the kernel's
/// [`LearnedName`] but for its copy of the class's tables, which is taken
/// from the view whenever the entry is written, so it is not held twice
/// (112 bytes a name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Kept {
    expiry_ns: u64,
    class: ClassId,
    name_id: u32,
    /// The stamp the kernel's copy has.
    generation: u32,
}

type KeptNames = [Kept; LEARNED_INLINE];

fn kept_of(value: &LearnedValue) -> KeptNames {
    value.names.map(|n| Kept {
        expiry_ns: n.expiry_ns,
        class: n.class,
        name_id: n.name_id,
        generation: n.generation,
    })
}

/// The tables to stamp a name of `class` learned for `slot` with: the
/// class's in `view`'s generation, or none (0: the programs look the class
/// up) when there is no view, the view has no such class, or no
/// generation yet.
fn stamp_of(view: Option<&DnsView>, slot: u32, class: &ClassId) -> (u32, DestTables) {
    match view.and_then(|v| Some((v.stamp, v.class_tables(slot, class)?))) {
        Some((stamp, tables)) if stamp != 0 => (stamp, tables),
        _ => (0, DestTables::default()),
    }
}

/// The kernel's value of `names`, learned for `slot`, each name stamped
/// from `view`; and the names with the stamps written.
fn written(slot: u32, mut names: KeptNames, view: Option<&DnsView>) -> (KeptNames, LearnedValue) {
    let mut value = LearnedValue::default();
    for (kept, out) in names.iter_mut().zip(value.names.iter_mut()) {
        let (generation, tables) = if kept.expiry_ns == 0 {
            (0, DestTables::default())
        } else {
            stamp_of(view, slot, &kept.class)
        };
        kept.generation = generation;
        *out = LearnedName {
            expiry_ns: kept.expiry_ns,
            class: kept.class,
            name_id: kept.name_id,
            generation,
            tables,
        };
    }
    (names, value)
}

/// `names`' expiries moved `by` earlier.
fn moved_earlier(mut names: KeptNames, by: u64) -> KeptNames {
    for n in names.iter_mut() {
        n.expiry_ns = n.expiry_ns.saturating_sub(by);
    }
    names
}

impl Learned {
    /// Takes over the maps with what an earlier agent learned.
    /// `book` is filled with the names, for the events reader.
    pub fn open(
        maps: LearnedMaps,
        per_identity: u32,
        book: Arc<NameBook>,
    ) -> Result<Self, KernelError> {
        let super::kernel::Remembered {
            learned: entries,
            names,
        } = maps.read()?;
        let mut me = Self {
            maps,
            per_identity,
            entries: HashMap::new(),
            per_slot: HashMap::new(),
            ids: HashMap::new(),
            book,
            next_id: 1,
            suspended: suspended_ns(),
            stamped_for: 0,
        };
        for (key, value) in entries {
            *me.per_slot.entry(key.slot).or_default() += 1;
            // Stamps of an earlier agent's may name a generation value
            // that the kernel's count gives again (its map made anew):
            // none is trusted until stamped again with this agent's view.
            let names = kept_of(&value);
            let (unstamped, value) = written(key.slot, names, None);
            if unstamped != names {
                me.maps.put(&key, &value)?;
            }
            me.entries.insert(key, unstamped);
        }
        {
            let mut book = me.book.0.write().expect("not poisoned");
            for (id, text) in names {
                let end = text
                    .text
                    .iter()
                    .position(|b| *b == 0)
                    .unwrap_or(NAME_TEXT_BYTES);
                if let Ok(name) = std::str::from_utf8(&text.text[..end]) {
                    let name: Arc<str> = name.into();
                    me.ids.insert(name.clone(), id);
                    book.insert(id, name);
                    me.next_id = me.next_id.max(id.wrapping_add(1)).max(1);
                }
            }
        }
        Ok(me)
    }

    /// Learned addresses of `slot`.
    pub fn count(&self, slot: u32) -> u32 {
        self.per_slot.get(&slot).copied().unwrap_or(0)
    }

    /// Learned addresses of every slot, and the bound per identity.
    pub fn counts(&self) -> (HashMap<u32, u32>, u32) {
        (self.per_slot.clone(), self.per_identity)
    }

    /// Entries of the whole table.
    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Puts `addrs` (each with the TTL handed to the workload) in the
    /// kernel for `slot` under `class`, open until that TTL plus `grace`,
    /// each entry stamped with what its classes allow in `view`'s
    /// generation. All of them, or none: on an error nothing changed.
    pub fn learn(
        &mut self,
        view: &DnsView,
        (slot, class): (u32, ClassId),
        name: &str,
        addrs: &[(IpAddr, u32)],
        grace: Duration,
    ) -> Result<(), LearnError> {
        if addrs.is_empty() {
            return Ok(());
        }
        self.follow_suspend(view);
        let now = monotonic_ns();
        let name_id = self.intern(name)?;
        let mut plan: Vec<(LearnedKey, KeptNames, Option<KeptNames>)> = Vec::new();
        for &(addr, ttl) in addrs {
            let key = key_of(slot, addr);
            if plan.iter().any(|(k, _, _)| *k == key) {
                continue;
            }
            let expiry = now + (Duration::from_secs(ttl.into()) + grace).as_nanos() as u64;
            let old = self.entries.get(&key).copied();
            let mut names = old.unwrap_or_default();
            let place = names
                .iter()
                .position(|n| n.expiry_ns > now && n.class == class)
                .or_else(|| names.iter().position(|n| n.expiry_ns <= now))
                .ok_or(LearnError::TooManyNames { addr })?;
            let entry = &mut names[place];
            let keep = entry.class == class && entry.expiry_ns > now;
            *entry = Kept {
                expiry_ns: if keep {
                    entry.expiry_ns.max(expiry)
                } else {
                    expiry
                },
                class,
                name_id,
                generation: 0,
            };
            plan.push((key, names, old));
        }
        let added = plan.iter().filter(|(_, _, old)| old.is_none()).count();
        if self.count(slot) as usize + added > self.per_identity as usize {
            return Err(LearnError::IdentityFull {
                limit: self.per_identity,
            });
        }
        if self.entries.len() + added > MAX_LEARNED as usize {
            return Err(LearnError::TableFull);
        }
        for done in 0..plan.len() {
            let (key, names, _) = plan[done];
            let (names, value) = written(slot, names, Some(view));
            if let Err(e) = self.maps.put(&key, &value) {
                self.undo(&plan[..done], view);
                return Err(e.into());
            }
            plan[done].1 = names;
        }
        *self.per_slot.entry(slot).or_default() += added as u32;
        for (key, names, _) in plan {
            self.entries.insert(key, names);
        }
        Ok(())
    }

    /// Moves every expiry earlier by the time the host was suspended since
    /// the last call, which the monotonic clock of the expiries did not
    /// count: an address closes when its TTL has passed on the boot-time
    /// clock, as if the host had not slept. Called before every answer is
    /// learned and at every sweep, so an entry written after a resume is
    /// never moved. A suspend while no agent runs is not followed.
    pub fn follow_suspend(&mut self, view: &DnsView) {
        let now = suspended_ns();
        let slept = now.saturating_sub(self.suspended);
        if slept < SUSPEND_FOLLOWED.as_nanos() as u64 {
            return;
        }
        self.suspended = now;
        let mut failed = 0;
        for (key, names) in self.entries.iter_mut() {
            let value;
            (*names, value) = written(key.slot, moved_earlier(*names, slept), Some(view));
            if self.maps.put(key, &value).is_err() {
                failed += 1;
            }
        }
        tracing::info!(
            slept = %humantime::format_duration(Duration::from_nanos(slept)),
            entries = self.entries.len(),
            "the host was suspended: learned addresses' expiries moved earlier by that"
        );
        if failed > 0 {
            tracing::warn!(
                failed,
                "learned addresses whose earlier expiry the kernel did not take keep their old one until the sweep removes them"
            );
        }
    }

    /// The generation value every entry was last stamped for.
    pub fn stamped_for(&self) -> u32 {
        self.stamped_for
    }

    /// Every entry's key, to stamp again with [`Learned::restamp`] a few
    /// at a time.
    pub fn keys(&self) -> Vec<LearnedKey> {
        self.entries.keys().copied().collect()
    }

    /// Stamps the entries of `keys` with what their classes allow in
    /// `view`'s generation (none where the class is gone), so the programs
    /// need not look the classes up. Call with every key after each
    /// switch, then [`Learned::restamped`]. Until then an entry stamped
    /// for another generation is judged by the class's trie entry.
    pub fn restamp(&mut self, view: &DnsView, keys: &[LearnedKey]) {
        for key in keys {
            let Some(old) = self.entries.get(key).copied() else {
                continue;
            };
            let (names, value) = written(key.slot, old, Some(view));
            if names == old {
                continue;
            }
            match self.maps.put(key, &value) {
                Ok(()) => {
                    self.entries.insert(*key, names);
                }
                Err(e) => {
                    tracing::warn!(error = %e, addr = %addr_of(key), "a learned address keeps its old stamp (judged by the class's trie entry) until the next switch")
                }
            }
        }
    }

    /// Every entry was stamped for `stamp`.
    pub fn restamped(&mut self, stamp: u32) {
        self.stamped_for = stamp;
    }

    /// Puts back what the entries of `done` replaced.
    fn undo(&mut self, done: &[(LearnedKey, KeptNames, Option<KeptNames>)], view: &DnsView) {
        for (key, _, old) in done {
            let restored = match old {
                Some(old) => self.maps.put(key, &written(key.slot, *old, Some(view)).1),
                None => self.maps.remove(key),
            };
            if let Err(e) = restored {
                tracing::error!(error = %e, addr = %addr_of(key), slot = key.slot, "a learned address written for an answer that failed could not be taken back; it expires with its TTL");
            }
        }
    }

    /// The id of `name`, written to `IDG_NAMES` when new.
    fn intern(&mut self, name: &str) -> Result<u32, LearnError> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        if name.len() >= NAME_TEXT_BYTES {
            return Err(LearnError::NameTooLong(name.to_owned()));
        }
        let book = self.book.clone();
        let mut book = book.0.write().expect("not poisoned");
        while self.next_id == 0 || book.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut text = NameText {
            text: [0; NAME_TEXT_BYTES],
        };
        text.text[..name.len()].copy_from_slice(name.as_bytes());
        self.maps.put_name(id, &text)?;
        let name: Arc<str> = name.into();
        self.ids.insert(name.clone(), id);
        book.insert(id, name);
        Ok(id)
    }

    /// Entries whose every name has expired, to remove with
    /// [`Learned::remove_expired`] a few at a time.
    pub fn expired(&self) -> Vec<LearnedKey> {
        let now = monotonic_ns();
        self.entries
            .iter()
            .filter(|(_, v)| v.iter().all(|n| n.expiry_ns <= now))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Removes those of `keys` still expired (one may have been learned
    /// again meanwhile). Returns how many went.
    pub fn remove_expired(&mut self, keys: &[LearnedKey]) -> usize {
        let now = monotonic_ns();
        let mut removed = 0;
        for key in keys {
            let still = self
                .entries
                .get(key)
                .is_some_and(|v| v.iter().all(|n| n.expiry_ns <= now));
            if !still {
                continue;
            }
            match self.maps.remove(key) {
                Ok(()) => {
                    self.entries.remove(key);
                    if let Some(n) = self.per_slot.get_mut(&key.slot) {
                        *n = n.saturating_sub(1);
                    }
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove an expired learned address; tried again at the next sweep")
                }
            }
        }
        self.per_slot.retain(|_, n| *n > 0);
        removed
    }

    /// Forgets the names no live entry refers to.
    pub fn forget_unused_names(&mut self) {
        let now = monotonic_ns();
        let used: HashSet<u32> = self
            .entries
            .values()
            .flat_map(|v| v.iter().filter(|n| n.expiry_ns > now).map(|n| n.name_id))
            .collect();
        let unused: Vec<(Arc<str>, u32)> = self
            .ids
            .iter()
            .filter(|(_, id)| !used.contains(id))
            .map(|(n, id)| (n.clone(), *id))
            .collect();
        for (name, id) in unused {
            if self.maps.remove_name(id).is_ok() {
                self.ids.remove(&name);
                if let Ok(mut book) = self.book.0.write() {
                    book.remove(&id);
                }
            }
        }
    }

    /// The names looked up by each slot with open addresses.
    pub fn names_by_slot(&self) -> HashMap<u32, Vec<Arc<str>>> {
        let now = monotonic_ns();
        let mut out: HashMap<u32, Vec<Arc<str>>> = HashMap::new();
        for (k, v) in &self.entries {
            for n in v.iter().filter(|n| n.expiry_ns > now) {
                if let Some(name) = self.book.get(n.name_id) {
                    out.entry(k.slot).or_default().push(name);
                }
            }
        }
        for names in out.values_mut() {
            names.sort();
            names.dedup();
        }
        out
    }

    /// The addresses of `slot` open now.
    pub fn of_slot(&self, slot: u32) -> Vec<LearnedAddress> {
        let now = monotonic_ns();
        let mut out: Vec<LearnedAddress> = self
            .entries
            .iter()
            .filter(|(k, _)| k.slot == slot)
            .flat_map(|(k, v)| {
                v.iter()
                    .filter(|n| n.expiry_ns > now)
                    .map(|n| LearnedAddress {
                        addr: addr_of(k),
                        name: self.book.get(n.name_id),
                        class: n.class,
                        expiry_ns: n.expiry_ns,
                    })
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.addr).cmp(&(&b.name, b.addr)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspend_moves_every_expiry_earlier_and_past_ones_stay_closed() {
        let mut names = KeptNames::default();
        names[0].expiry_ns = 10_000;
        names[1].expiry_ns = 3_000;
        let moved = moved_earlier(names, 5_000);
        assert_eq!(moved[0].expiry_ns, 5_000);
        // Expired by the suspend: closed (0 is before every clock reading).
        assert_eq!(moved[1].expiry_ns, 0);
        assert_eq!(moved[2].expiry_ns, 0);
    }
}
