//! Typed access to the pinned maps: identity bindings, revocation, the slot
//! table, and policy generations with their atomic switch.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use aya::Pod;
use aya::maps::{Array, ArrayOfMaps, HashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use aya::sys::SyscallError;
use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LPM_TRIE;
use idgate_common::{
    DEST_FIXED_BITS, DestKey, DestTables, FAMILY_NAME, FAMILY_V4, FAMILY_V6, MAX_SET_DESTS,
    MAX_SET_PORT_BLOCKS, MAX_SLOTS, NAME_CLASS_BYTES, PORT_FIXED_BITS, PortKey, RuleVerdict,
    SlotPolicy, UNKNOWN_SLOT, binding, maps, slot_policy_index, slot_state,
};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::identity_index::IdentityIndex;
use super::{BpfError, syscall};
use crate::hashing::{FastMap, FastSet};
use crate::identity::SpiffeId;
use crate::parallel;
use crate::policy::{CompiledPolicy, DestEntry, NameEntry, RuleSet};

type SlotHash = [u8; 32];

/// `BPF_F_NO_PREALLOC`, which the kernel requires of LPM tries (the inner
/// tries' template in the eBPF object has it too).
const NO_PREALLOC: u32 = 1;

/// The layout of the tries in each array of maps: (array, key size, value
/// size).
pub(super) const TRIE_LAYOUTS: [(&str, u32, u32); 2] = [
    (
        maps::SLOT_DESTS,
        size_of::<Key<DestKey>>() as u32,
        size_of::<DestTables>() as u32,
    ),
    (
        maps::SLOT_PORTS,
        size_of::<Key<PortKey>>() as u32,
        size_of::<RuleVerdict>() as u32,
    ),
];

/// Rule sets whose tries a reload holds open at once (two descriptors
/// each) before it puts them into the outer arrays in one batch.
const BATCH_SETS: usize = 512;

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// Whether a removal failed only because the key was not there (aya
/// reports that as the syscall's ENOENT).
pub fn key_was_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A removal's outcome, where a key that was not there is no error.
pub(super) fn removed(name: &'static str, r: Result<(), MapError>) -> Result<(), BpfError> {
    match r {
        Err(source) if !key_was_missing(&source) => Err(BpfError::Map { name, source }),
        _ => Ok(()),
    }
}

/// A new LPM trie of the inner template's type, named `name` (as
/// `bpftool` shows it), holding `entries`.
fn new_trie<K: Pod, V: Pod>(
    outer: &'static str,
    name: &str,
    max_entries: u32,
    entries: impl IntoIterator<Item = (Key<K>, V)>,
) -> Result<MapData, BpfError> {
    let obj = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_LPM_TRIE as u32,
        size_of::<Key<K>>() as u32,
        size_of::<V>() as u32,
        max_entries,
        NO_PREALLOC,
    );
    let data = MapData::create(obj, name, None).map_err(map_err(outer))?;
    let (keys, values): (Vec<Key<K>>, Vec<V>) = entries.into_iter().unzip();
    syscall::update_batch(data.fd().as_fd(), &keys, &values).map_err(batch_err(outer))?;
    Ok(data)
}

/// The two tries of one rule set.
struct Tries {
    dests: MapData,
    /// `None` for a set without port blocks, whose programs never read
    /// their port trie: its slots point at the generation maps' one empty
    /// trie (a full reload of such sets makes half as many maps).
    ports: Option<MapData>,
}

impl Tries {
    /// New tries holding `set`.
    fn build(set: &RuleSet) -> Result<Self, BpfError> {
        let ports = set.ports.iter().map(|p| {
            let key = PortKey {
                table: p.table,
                port: p.port.to_be_bytes(),
                _pad: [0; 2],
            };
            let value = RuleVerdict {
                verdict: p.verdict,
                rule_id: p.rule_id,
            };
            (Key::new(PORT_FIXED_BITS + p.prefix_len, key), value)
        });
        Ok(Self {
            dests: dest_trie(dest_entries(set))?,
            ports: (!set.ports.is_empty())
                .then(|| port_trie(ports))
                .transpose()?,
        })
    }

    /// Empty tries, both made.
    fn empty() -> Result<Self, BpfError> {
        Ok(Self {
            dests: dest_trie([])?,
            ports: Some(port_trie([])?),
        })
    }
}

fn dest_trie(
    entries: impl IntoIterator<Item = (Key<DestKey>, DestTables)>,
) -> Result<MapData, BpfError> {
    new_trie(maps::SLOT_DESTS, "idg_dests", MAX_SET_DESTS, entries)
}

fn port_trie(
    entries: impl IntoIterator<Item = (Key<PortKey>, RuleVerdict)>,
) -> Result<MapData, BpfError> {
    new_trie(maps::SLOT_PORTS, "idg_ports", MAX_SET_PORT_BLOCKS, entries)
}

/// The destination-trie entries of `set`: its address prefixes, and its
/// name classes (see [`address_entry`] and [`name_entry`]).
fn dest_entries(set: &RuleSet) -> impl Iterator<Item = (Key<DestKey>, DestTables)> + '_ {
    let addresses = set.dests.iter().map(address_entry);
    addresses.chain(set.names.iter().map(name_entry))
}

/// The destination-trie entry of an address prefix. Every key's prefix
/// covers the family ([`DEST_FIXED_BITS`]), which is matched in full, so
/// an address entry never matches a name key nor the reverse.
fn address_entry(d: &DestEntry) -> (Key<DestKey>, DestTables) {
    let (family, addr) = match d.net {
        IpNet::V4(n) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&n.network().octets());
            (FAMILY_V4, addr)
        }
        IpNet::V6(n) => (FAMILY_V6, n.network().octets()),
    };
    let plen = DEST_FIXED_BITS + u32::from(d.net.prefix_len());
    let tables = DestTables {
        tcp: d.tcp,
        udp: d.udp,
    };
    (Key::new(plen, DestKey { family, addr }), tables)
}

/// The destination-trie entry of a name class: a [`FAMILY_NAME`] key of
/// full length.
fn name_entry(n: &NameEntry) -> (Key<DestKey>, DestTables) {
    let key = DestKey {
        family: FAMILY_NAME,
        addr: n.class,
    };
    let plen = DEST_FIXED_BITS + 8 * NAME_CLASS_BYTES as u32;
    let tables = DestTables {
        tcp: n.tcp,
        udp: n.udp,
    };
    (Key::new(plen, key), tables)
}

/// A failed batch update of the map `name` (or of a map for it).
fn batch_err(name: &'static str) -> impl Fn(std::io::Error) -> BpfError {
    move |io_error| {
        map_err(name)(MapError::SyscallError(SyscallError {
            call: "bpf_map_update_batch",
            io_error,
        }))
    }
}

/// One of the outer arrays of maps.
pub(super) struct Outer {
    name: &'static str,
    map: Map,
}

impl Outer {
    pub(super) fn new(name: &'static str, map: Map) -> Result<Self, BpfError> {
        ArrayOfMaps::<&MapData, MapData>::try_from(&map).map_err(map_err(name))?;
        Ok(Self { name, map })
    }

    /// The inner map at `index`.
    pub(super) fn get(&self, index: u32) -> Result<MapData, BpfError> {
        ArrayOfMaps::<&MapData, MapData>::try_from(&self.map)
            .and_then(|a| a.get(&index, 0))
            .map_err(map_err(self.name))
    }

    /// Sets each of `keys` to the map of the same position in `inner`.
    fn set_all(&self, keys: &[u32], inner: &[BorrowedFd<'_>]) -> Result<(), BpfError> {
        let Map::ArrayOfMaps(data) = &self.map else {
            unreachable!("checked in Outer::new")
        };
        syscall::set_inner_maps(data.fd().as_fd(), keys, inner).map_err(batch_err(self.name))
    }
}

/// The maps that bind cgroups to slots and mark slots revoked: written by
/// the daemon's owner one entry at a time, outside the policy generations.
pub struct BindingMaps {
    identities: HashMap<MapData, u64, u32>,
    /// The end of each binding that has one, on the boot-time clock.
    expiry: HashMap<MapData, u64, u64>,
    /// Most bindings of `identities` again, where a program finds them
    /// without hashing.
    index: IdentityIndex,
    slot_state: Array<MapData, u32>,
}

impl BindingMaps {
    /// Takes the maps out of a loaded object, by their shared names.
    pub fn new(mut take: impl FnMut(&'static str) -> Option<Map>) -> Result<Self, BpfError> {
        let mut get = |name: &'static str| take(name).ok_or(BpfError::MissingMap(name));
        let maps = Self {
            identities: HashMap::try_from(get(maps::IDENTITIES)?)
                .map_err(map_err(maps::IDENTITIES))?,
            expiry: HashMap::try_from(get(maps::BINDING_EXPIRY)?)
                .map_err(map_err(maps::BINDING_EXPIRY))?,
            index: IdentityIndex::new(get(maps::IDENTITY_INDEX)?)?,
            slot_state: Array::try_from(get(maps::SLOT_STATE)?)
                .map_err(map_err(maps::SLOT_STATE))?,
        };
        // An earlier agent may have stopped between the two writes of a
        // binding; the hash is the truth (a binding with an expiry is
        // never indexed: its value does not fit an entry).
        maps.index.rebuild(&maps.values()?);
        Ok(maps)
    }

    /// Binds a cgroup to a slot (or moves it to another), until `end`
    /// (`CLOCK_BOOTTIME` nanoseconds) when given: the kernel ends it then
    /// by itself.
    pub fn bind(&mut self, cgroup_id: u64, slot: u32, end: Option<u64>) -> Result<(), BpfError> {
        let value = match end {
            Some(end) => {
                // Out of the index first: every lookup then reads the
                // expiry.
                self.index.unbind(cgroup_id);
                self.expiry
                    .insert(cgroup_id, end, 0)
                    .map_err(map_err(maps::BINDING_EXPIRY))?;
                slot | binding::EXPIRES
            }
            None => slot,
        };
        self.identities
            .insert(cgroup_id, value, 0)
            .map_err(map_err(maps::IDENTITIES))?;
        self.index.bind(cgroup_id, value);
        if end.is_none() {
            self.forget_expiry(cgroup_id)?;
        }
        Ok(())
    }

    /// Forgets a cgroup: it is judged as an unknown workload again.
    pub fn unbind(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        self.index.unbind(cgroup_id);
        removed(maps::IDENTITIES, self.identities.remove(&cgroup_id))?;
        self.forget_expiry(cgroup_id)
    }

    fn forget_expiry(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        removed(maps::BINDING_EXPIRY, self.expiry.remove(&cgroup_id))
    }

    /// Every bound cgroup and its slot.
    pub fn bindings(&self) -> Result<BTreeMap<u64, u32>, BpfError> {
        Ok(self
            .values()?
            .into_iter()
            .map(|(cg, value)| (cg, binding::slot(value)))
            .collect())
    }

    /// Every bound cgroup and its value in the hash.
    fn values(&self) -> Result<BTreeMap<u64, u32>, BpfError> {
        self.identities
            .iter()
            .map(|r| r.map_err(map_err(maps::IDENTITIES)))
            .collect()
    }

    /// Revokes (or restores) every cgroup bound to a slot, in one update.
    pub fn set_revoked(&mut self, slot: u32, revoked: bool) -> Result<(), BpfError> {
        let value = if revoked { slot_state::REVOKED } else { 0 };
        self.slot_state
            .set(slot, value, 0)
            .map_err(map_err(maps::SLOT_STATE))
    }
}

/// The two policy generations and the switch between them. Owned by one
/// party at a time: the daemon lends them to the thread that writes a new
/// generation, and nothing else writes them meanwhile.
pub struct GenerationMaps {
    generation: Array<MapData, u32>,
    slot_policy: Array<MapData, SlotPolicy>,
    slot_dests: Outer,
    slot_ports: Outer,
    /// Empty tries, which the entries of slots without a policy point at
    /// (so that no old tries are kept alive by them).
    empty: Option<Tries>,
    /// What each generation's entries hold, by slot; `None` when not
    /// known (maps adopted from an earlier agent, or a write that failed
    /// part way).
    held: [Option<FastMap<u32, Held>>; 2],
    /// Each rule set of the active generation (by its address, which the
    /// `Arc` held keeps its own), with a slot whose entries hold its
    /// tries: a write reuses them for a set that did not change.
    published: FastMap<usize, (Arc<RuleSet>, u32)>,
    /// Waits out an RCU grace period after the last switch (see
    /// [`Grace`]).
    grace: Option<Grace>,
}

/// An RCU grace period, waited out on a thread of its own from a switch
/// on. Programs read a generation's tries under the RCU read lock, so
/// once it is over no program still reads the generation switched away
/// from: its tries can be changed in place (see
/// [`GenerationMaps::write`]). `membarrier(MEMBARRIER_CMD_GLOBAL)` is the
/// same wait the kernel makes for an update of a map of maps.
/// (`None`: no thread could be started to wait, so it is never over.)
struct Grace(Option<std::thread::JoinHandle<bool>>);

impl Grace {
    fn start() -> Self {
        let waiting = std::thread::Builder::new()
            .name("idgate-grace".into())
            .spawn(|| {
                const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
                // SAFETY: membarrier takes no pointers; GLOBAL only waits.
                let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
                r == 0
            });
        Self(waiting.ok())
    }

    /// Whether it is over (waiting for it if it is not); `false` when it
    /// could not be waited for (then nothing is changed in place).
    fn wait(self) -> bool {
        self.0.is_some_and(|t| t.join().unwrap_or(false))
    }
}

/// What one slot's entries of a generation hold.
#[derive(Clone)]
struct Held {
    /// The rule set whose tries they point at.
    set: Arc<RuleSet>,
    policy: SlotPolicy,
}

/// The rule sets a switch retired, held only to be dropped.
pub struct RetiredSets {
    _sets: FastMap<usize, (Arc<RuleSet>, u32)>,
}

/// A generation written in full and not yet switched to: the only way to
/// [`GenerationMaps::switch`].
#[must_use = "a written generation is judged by nothing until switched to"]
pub struct Written {
    next: u32,
    held: FastMap<u32, Held>,
    published: FastMap<usize, (Arc<RuleSet>, u32)>,
}

/// The key of a rule set in [`GenerationMaps::published`].
fn address(set: &Arc<RuleSet>) -> usize {
    Arc::as_ptr(set) as usize
}

impl GenerationMaps {
    /// Takes the maps out of a loaded object, by their shared names.
    pub fn new(mut take: impl FnMut(&'static str) -> Option<Map>) -> Result<Self, BpfError> {
        let mut get = |name: &'static str| take(name).ok_or(BpfError::MissingMap(name));
        Ok(Self {
            generation: Array::try_from(get(maps::GENERATION)?)
                .map_err(map_err(maps::GENERATION))?,
            slot_policy: Array::try_from(get(maps::SLOT_POLICY)?)
                .map_err(map_err(maps::SLOT_POLICY))?,
            slot_dests: Outer::new(maps::SLOT_DESTS, get(maps::SLOT_DESTS)?)?,
            slot_ports: Outer::new(maps::SLOT_PORTS, get(maps::SLOT_PORTS)?)?,
            empty: None,
            held: [None, None],
            published: FastMap::default(),
            grace: None,
        })
    }

    /// The generation the kernel judges by now.
    pub fn active_generation(&self) -> Result<u32, BpfError> {
        Ok(self
            .generation
            .get(&0, 0)
            .map_err(map_err(maps::GENERATION))?
            & 1)
    }

    /// Writes `policy` into the inactive generation and makes it active
    /// (see [`GenerationMaps::write`] and [`GenerationMaps::switch`]).
    /// Returns the new active generation.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<u32, BpfError> {
        let written = self.write(policy)?;
        Ok(self.switch(written)?.0 & 1)
    }

    /// Writes `policy` into the inactive generation, which no program
    /// reads, and returns it to be switched to.
    ///
    /// Only the entries that differ from what the inactive generation
    /// holds are written (a rule set is the same when it is the same
    /// `Arc`: the compiler shares unchanged ones). A set new to the slot
    /// gets, in this order:
    /// - the slot's own tries, changed in place, when no other entry of
    ///   either generation holds them nor is given them, the port entries
    ///   are the same, and a grace period has passed since the switch
    ///   away from this generation (a changed rule of one identity: no
    ///   outer update, so no wait for the kernel's grace period);
    /// - the tries that another slot of either generation has for it;
    /// - new tries.
    pub fn write(&mut self, policy: &CompiledPolicy) -> Result<Written, BpfError> {
        if self.empty.is_none() {
            self.empty = Some(Tries::empty()?);
        }
        let active = self.active_generation()?;
        let next = active ^ 1;
        // Until this write is whole, nobody knows what the inactive
        // generation holds: a failed write leaves it to be cleared in full.
        let before = self.held[next as usize].take();
        // A slot of the inactive generation that holds each set, and how
        // many hold it.
        let mut in_next: FastMap<usize, (u32, usize)> = FastMap::default();
        for (slot, h) in before.iter().flatten() {
            in_next.entry(address(&h.set)).or_insert((*slot, 0)).1 += 1;
        }
        // Tries of the inactive generation may be changed in place only
        // once no program reads them: after a grace period from the
        // switch away from it, waited for when first needed. (Without a
        // switch by this agent, what it holds was written with the
        // kernel's own waits, or is unknown.)
        let mut grace = self.grace.take();
        let mut settled = None;
        let sets_now: FastSet<usize> = policy.rule_sets.iter().map(address).collect();
        let mut held = FastMap::with_capacity_and_hasher(policy.slots.len(), Default::default());
        let mut published =
            FastMap::with_capacity_and_hasher(policy.rule_sets.len(), Default::default());
        // Slots to point at each set's tries, in the order first seen, and
        // those of them whose port trie must change too.
        let mut to_point: Vec<(Arc<RuleSet>, Vec<u32>, Vec<u32>)> = Vec::new();
        let mut pointing: FastMap<usize, usize> = FastMap::default();
        for entry in &policy.slots {
            let set = &policy.rule_sets[entry.rule_set];
            published
                .entry(address(set))
                .or_insert_with(|| (set.clone(), entry.slot));
            let was = before.as_ref().and_then(|b| b.get(&entry.slot));
            let index = slot_policy_index(next, entry.slot);
            if was.is_none_or(|w| w.policy != entry.policy) {
                self.slot_policy
                    .set(index, entry.policy, 0)
                    .map_err(map_err(maps::SLOT_POLICY))?;
            }
            let editable = |w: &Held| {
                let old = address(&w.set);
                // The old set's tries are this entry's alone: no other
                // entry of either generation points at them, and no entry
                // is given them by this write. Port tries are shared
                // (see `Tries::ports`), so they must not change.
                in_next.get(&old).is_some_and(|(_, n)| *n == 1)
                    && !self.published.contains_key(&old)
                    && !sets_now.contains(&old)
                    && w.set.ports == set.ports
            };
            match was {
                Some(w)
                    if !Arc::ptr_eq(&w.set, set)
                        && editable(w)
                        && *settled.get_or_insert_with(|| grace.take().is_none_or(Grace::wait)) =>
                {
                    self.edit_in_place(index, &w.set, set)?;
                }
                Some(w) if Arc::ptr_eq(&w.set, set) => {}
                _ => {
                    let at = *pointing.entry(address(set)).or_insert_with(|| {
                        to_point.push((set.clone(), Vec::new(), Vec::new()));
                        to_point.len() - 1
                    });
                    to_point[at].1.push(index);
                    // A set without port blocks never reads its port trie, so
                    // a slot going from one such set to another keeps the
                    // empty trie it has: one outer update (and the kernel's
                    // wait for an RCU grace period) fewer.
                    if was.is_none_or(|w| !(w.set.ports.is_empty() && set.ports.is_empty())) {
                        to_point[at].2.push(index);
                    }
                }
            }
            held.insert(
                entry.slot,
                Held {
                    set: set.clone(),
                    policy: entry.policy,
                },
            );
        }
        for chunk in to_point.chunks(BATCH_SETS) {
            // The tries of a set that either generation holds are reused;
            // the others are built, side by side (a full reload builds
            // thousands).
            let mut found = Vec::with_capacity(chunk.len());
            let mut to_build = Vec::new();
            for (set, _, _) in chunk {
                let key = address(set);
                let held = if let Some((_, slot)) = self.published.get(&key) {
                    Some(self.tries_at(slot_policy_index(active, *slot))?)
                } else if let Some((slot, _)) = in_next.get(&key) {
                    Some(self.tries_at(slot_policy_index(next, *slot))?)
                } else {
                    to_build.push(set);
                    None
                };
                found.push(held);
            }
            let mut built =
                parallel::map(to_build, |set, (): &mut ()| Tries::build(set)).into_iter();
            let mut batch = Vec::with_capacity(chunk.len());
            for ((_, indices, port_indices), held) in chunk.iter().zip(found) {
                let tries = match held {
                    Some(tries) => tries,
                    None => built.next().expect("one built per set not held")?,
                };
                batch.push((tries, indices.as_slice(), port_indices.as_slice()));
            }
            self.point(batch.iter().map(|(t, i, p)| (t, *i, *p)))?;
        }
        self.clear_generation(next, before.as_ref(), &held)?;
        // Not waited for: still owed by a later write of this generation.
        if settled.is_none() {
            self.grace = grace;
        }
        Ok(Written {
            next,
            held,
            published,
        })
    }

    /// Writes `policy`, the active generation's, into the inactive
    /// generation too (without a switch) when what that one holds is not
    /// known: after a start on maps an earlier agent wrote, so that the
    /// first reload writes only what it changes, not every slot.
    pub fn prime(&mut self, policy: &CompiledPolicy) -> Result<(), BpfError> {
        let next = self.active_generation()? ^ 1;
        if self.held[next as usize].is_some() {
            return Ok(());
        }
        let written = self.write(policy)?;
        self.held[written.next as usize] = Some(written.held);
        Ok(())
    }

    /// Makes a written generation the one every decision reads, with one
    /// map update. A program reads the generation once per decision, so
    /// every decision sees the old rule set or the new one. Returns the
    /// whole `IDG_GENERATION` value written (the new active buffer in its
    /// lowest bit, the count of switches above it: learned entries are
    /// stamped with it, see idgate-common, step 7), and the old
    /// generation's rule sets (for the caller to free where it costs
    /// nothing).
    pub fn switch(&mut self, written: Written) -> Result<(u32, RetiredSets), BpfError> {
        let before = self
            .generation
            .get(&0, 0)
            .map_err(map_err(maps::GENERATION))?;
        // The count of switches above the buffer's bit; never 0, which
        // stamps nothing.
        let count = (before >> 1).wrapping_add(1).max(1);
        let stamp = (count << 1) | written.next;
        self.generation
            .set(0, stamp, 0)
            .map_err(map_err(maps::GENERATION))?;
        self.held[written.next as usize] = Some(written.held);
        self.grace = Some(Grace::start());
        let old = std::mem::replace(&mut self.published, written.published);
        Ok((stamp, RetiredSets { _sets: old }))
    }

    /// Changes the destination trie at `index` (of the inactive
    /// generation, held by that entry alone) from `old`'s entries to
    /// `new`'s, a key at a time: no new tries, and no update of the outer
    /// array, which the kernel makes wait for an RCU grace period. Their
    /// port entries are the same.
    fn edit_in_place(&self, index: u32, old: &RuleSet, new: &RuleSet) -> Result<(), BpfError> {
        let mut map = Map::LpmTrie(self.slot_dests.get(index)?);
        let mut trie: LpmTrie<&mut MapData, DestKey, DestTables> =
            LpmTrie::try_from(&mut map).map_err(map_err(maps::SLOT_DESTS))?;
        let mut nets: FastMap<IpNet, &DestEntry> = old.dests.iter().map(|d| (d.net, d)).collect();
        let mut classes: FastMap<_, &NameEntry> = old.names.iter().map(|n| (n.class, n)).collect();
        let changed = (new.dests.iter())
            .filter(|d| nets.remove(&d.net) != Some(*d))
            .map(address_entry)
            .chain(
                (new.names.iter())
                    .filter(|n| classes.remove(&n.class) != Some(*n))
                    .map(name_entry),
            );
        for (key, tables) in changed {
            trie.insert(&key, tables, 0)
                .map_err(map_err(maps::SLOT_DESTS))?;
        }
        let gone = (nets.values().map(|d| address_entry(d)))
            .chain(classes.values().map(|n| name_entry(n)));
        for (key, _) in gone {
            trie.remove(&key).map_err(map_err(maps::SLOT_DESTS))?;
        }
        Ok(())
    }

    /// The tries the entries at `index` hold.
    fn tries_at(&self, index: u32) -> Result<Tries, BpfError> {
        Ok(Tries {
            dests: self.slot_dests.get(index)?,
            ports: Some(self.slot_ports.get(index)?),
        })
    }

    /// Points the destination entries at each `indices`, and the port
    /// entries at each `port_indices`, at their `tries`, with one batch
    /// update per outer array (none for an array with nothing to point).
    fn point<'a>(
        &self,
        batch: impl IntoIterator<Item = (&'a Tries, &'a [u32], &'a [u32])>,
    ) -> Result<(), BpfError> {
        let empty = self
            .empty
            .as_ref()
            .and_then(|e| e.ports.as_ref())
            .expect("made by the write before it points");
        let (mut dest_keys, mut dests) = (Vec::new(), Vec::new());
        let (mut port_keys, mut ports) = (Vec::new(), Vec::new());
        for (tries, indices, port_indices) in batch {
            for &index in indices {
                dest_keys.push(index);
                dests.push(tries.dests.fd().as_fd());
            }
            for &index in port_indices {
                port_keys.push(index);
                ports.push(tries.ports.as_ref().unwrap_or(empty).fd().as_fd());
            }
        }
        if !dest_keys.is_empty() {
            self.slot_dests.set_all(&dest_keys, &dests)?;
        }
        if !port_keys.is_empty() {
            self.slot_ports.set_all(&port_keys, &ports)?;
        }
        Ok(())
    }

    /// Clears the entries of every slot of one (inactive) generation that
    /// may have been written before (`before`; every slot when not known)
    /// and is not in `keep`: no policy, and the empty tries.
    fn clear_generation(
        &mut self,
        generation: u32,
        before: Option<&FastMap<u32, Held>>,
        keep: &FastMap<u32, Held>,
    ) -> Result<(), BpfError> {
        let stale: Vec<u32> = match before {
            Some(s) => s
                .keys()
                .filter(|s| !keep.contains_key(s))
                .copied()
                .collect(),
            None => (0..MAX_SLOTS).filter(|s| !keep.contains_key(s)).collect(),
        };
        if stale.is_empty() {
            return Ok(());
        }
        let mut indices = Vec::with_capacity(stale.len());
        for slot in stale {
            let index = slot_policy_index(generation, slot);
            self.slot_policy
                .set(index, SlotPolicy::default(), 0)
                .map_err(map_err(maps::SLOT_POLICY))?;
            indices.push(index);
        }
        let empty = self.empty.as_ref().expect("made by the write");
        self.point([(empty, indices.as_slice(), indices.as_slice())])
    }
}

/// Which SPIFFE ID holds which slot, kept in the pinned `IDG_SLOT_IDS` map
/// (as SHA-256 of the ID) so that numbers survive an agent restart.
pub struct SlotTable {
    map: Array<MapData, SlotHash>,
    by_hash: StdHashMap<SlotHash, u32>,
}

impl SlotTable {
    /// Opens the table and reads what an earlier agent recorded.
    pub fn new(map: Map) -> Result<Self, BpfError> {
        let map: Array<MapData, SlotHash> =
            Array::try_from(map).map_err(map_err(maps::SLOT_IDS))?;
        let mut by_hash = StdHashMap::new();
        for slot in 1..MAX_SLOTS {
            let h = map.get(&slot, 0).map_err(map_err(maps::SLOT_IDS))?;
            if h != SlotHash::default() {
                by_hash.insert(h, slot);
            }
        }
        Ok(Self { map, by_hash })
    }

    /// The slot `id` holds, if any (assigned for the active generation or
    /// for one being written).
    pub fn slot_of(&self, id: &SpiffeId) -> Option<u32> {
        let h: SlotHash = Sha256::digest(id.as_str().as_bytes()).into();
        self.by_hash.get(&h).copied()
    }

    /// The slot of each id: the one it held before, or the lowest free one.
    pub fn assign(&mut self, ids: &BTreeSet<SpiffeId>) -> Result<Vec<(u32, SpiffeId)>, BpfError> {
        let mut used: BTreeSet<u32> = self.by_hash.values().copied().collect();
        used.insert(UNKNOWN_SLOT);
        let mut out = Vec::with_capacity(ids.len());
        // Numbers below it are all used: `used` only grows here.
        let mut lowest_free = 1;
        for id in ids {
            let h: SlotHash = Sha256::digest(id.as_str().as_bytes()).into();
            let slot = match self.by_hash.get(&h) {
                Some(s) => *s,
                None => {
                    let free = (lowest_free..MAX_SLOTS)
                        .find(|s| !used.contains(s))
                        .ok_or(BpfError::SlotsFull(MAX_SLOTS))?;
                    lowest_free = free + 1;
                    self.map.set(free, h, 0).map_err(map_err(maps::SLOT_IDS))?;
                    self.by_hash.insert(h, free);
                    used.insert(free);
                    free
                }
            };
            out.push((slot, id.clone()));
        }
        Ok(out)
    }

    /// Frees every slot not in `keep`. Call only once no cgroup is bound to
    /// them any more, so a freed number is never reused under a binding.
    pub fn retain(&mut self, keep: &BTreeSet<u32>) -> Result<(), BpfError> {
        let gone: Vec<(SlotHash, u32)> = self
            .by_hash
            .iter()
            .filter(|(_, s)| !keep.contains(s))
            .map(|(h, s)| (*h, *s))
            .collect();
        for (h, slot) in gone {
            self.map
                .set(slot, SlotHash::default(), 0)
                .map_err(map_err(maps::SLOT_IDS))?;
            self.by_hash.remove(&h);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile;
    use crate::policy::testing::policy;

    #[test]
    fn name_classes_are_whole_keys_of_their_own_family() {
        let p = policy(
            "[[identity]]\nid = \"spiffe://e.org/a\"\n[[identity.egress]]\nname = \"r\"\nto = [\"any\", \"api.x.com\"]\nports = [443]\naction = \"allow\"\n",
        );
        let c = compile(&p, &[(1, "spiffe://e.org/a".parse().unwrap())]);
        let set = &c.rule_sets[c.slot(1).unwrap().rule_set];
        let keys: Vec<(u32, DestKey)> = dest_entries(set)
            .map(|(k, _)| (k.prefix_len(), k.data()))
            .collect();
        assert_eq!(keys.len(), 3);
        let name = &set.names[0];
        assert_eq!(
            keys[2],
            (
                DEST_FIXED_BITS + 128,
                DestKey {
                    family: FAMILY_NAME,
                    addr: name.class
                }
            )
        );
        // `any` is /0 of each family: still the whole family.
        assert_eq!(keys[0].0, DEST_FIXED_BITS);
        assert!(keys[..2].iter().all(|(_, k)| k.family != FAMILY_NAME));
    }
}
