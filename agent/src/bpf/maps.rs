//! Typed access to the pinned maps: identity bindings, revocation, the slot
//! table, and policy generations with their atomic switch.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use idgate_common::{
    DEST_FIXED_BITS, DestTables, DestV4, DestV6, MAX_SLOTS, PORT_FIXED_BITS, PortKey, RuleVerdict,
    SlotPolicy, UNKNOWN_SLOT, maps, slot_policy_index, slot_state,
};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::BpfError;
use crate::identity::SpiffeId;
use crate::policy::CompiledPolicy;

type SlotHash = [u8; 32];

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// Handles on every map of a loaded or adopted object.
pub struct PolicyMaps {
    identities: HashMap<MapData, u64, u32>,
    slot_state: Array<MapData, u32>,
    generation: Array<MapData, u32>,
    slot_policy: Array<MapData, SlotPolicy>,
    dest_v4: LpmTrie<MapData, DestV4, DestTables>,
    dest_v6: LpmTrie<MapData, DestV6, DestTables>,
    ports: LpmTrie<MapData, PortKey, RuleVerdict>,
    /// Slots that may have a policy entry in each generation; `None` when
    /// not known (maps adopted from an earlier agent).
    written: [Option<BTreeSet<u32>>; 2],
}

impl PolicyMaps {
    /// Takes the maps out of a loaded object, by their shared names.
    pub fn new(mut take: impl FnMut(&'static str) -> Option<Map>) -> Result<Self, BpfError> {
        let mut get = |name: &'static str| take(name).ok_or(BpfError::MissingMap(name));
        Ok(Self {
            identities: HashMap::try_from(get(maps::IDENTITIES)?)
                .map_err(map_err(maps::IDENTITIES))?,
            slot_state: Array::try_from(get(maps::SLOT_STATE)?)
                .map_err(map_err(maps::SLOT_STATE))?,
            generation: Array::try_from(get(maps::GENERATION)?)
                .map_err(map_err(maps::GENERATION))?,
            slot_policy: Array::try_from(get(maps::SLOT_POLICY)?)
                .map_err(map_err(maps::SLOT_POLICY))?,
            dest_v4: LpmTrie::try_from(get(maps::DEST_V4)?).map_err(map_err(maps::DEST_V4))?,
            dest_v6: LpmTrie::try_from(get(maps::DEST_V6)?).map_err(map_err(maps::DEST_V6))?,
            ports: LpmTrie::try_from(get(maps::PORTS)?).map_err(map_err(maps::PORTS))?,
            written: [None, None],
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

    /// Writes `policy` into the inactive generation, then makes it active
    /// with one map update. A program reads the generation once per
    /// decision, so every decision sees the old rule set or the new one.
    /// Returns the new active generation.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<u32, BpfError> {
        let next = self.active_generation()? ^ 1;
        self.clear_generation(next)?;
        let mut written = BTreeSet::new();
        for (slot, sp) in &policy.slots {
            self.slot_policy
                .set(slot_policy_index(next, *slot), sp, 0)
                .map_err(map_err(maps::SLOT_POLICY))?;
            written.insert(*slot);
        }
        for d in &policy.dests {
            let tables = DestTables {
                tcp: d.tcp_table,
                udp: d.udp_table,
            };
            let plen = DEST_FIXED_BITS + u32::from(d.net.prefix_len());
            match d.net {
                IpNet::V4(n) => {
                    let data = DestV4 {
                        generation: next,
                        slot: d.slot,
                        addr: n.network().octets(),
                    };
                    self.dest_v4
                        .insert(&Key::new(plen, data), tables, 0)
                        .map_err(map_err(maps::DEST_V4))?;
                }
                IpNet::V6(n) => {
                    let data = DestV6 {
                        generation: next,
                        slot: d.slot,
                        addr: n.network().octets(),
                    };
                    self.dest_v6
                        .insert(&Key::new(plen, data), tables, 0)
                        .map_err(map_err(maps::DEST_V6))?;
                }
            }
        }
        for p in &policy.ports {
            let key = PortKey {
                generation: next,
                table: p.table,
                port: p.port.to_be_bytes(),
                _pad: [0; 2],
            };
            let value = RuleVerdict {
                verdict: p.verdict,
                rule_id: p.rule_id,
            };
            self.ports
                .insert(&Key::new(PORT_FIXED_BITS + p.prefix_len, key), value, 0)
                .map_err(map_err(maps::PORTS))?;
        }
        // The switch.
        self.generation
            .set(0, next, 0)
            .map_err(map_err(maps::GENERATION))?;
        self.written[next as usize] = Some(written);
        Ok(next)
    }

    /// Removes every entry of one (inactive) generation.
    fn clear_generation(&mut self, generation: u32) -> Result<(), BpfError> {
        let slots: Vec<u32> = match &self.written[generation as usize] {
            Some(s) => s.iter().copied().collect(),
            None => (0..MAX_SLOTS).collect(),
        };
        for slot in slots {
            self.slot_policy
                .set(
                    slot_policy_index(generation, slot),
                    SlotPolicy::default(),
                    0,
                )
                .map_err(map_err(maps::SLOT_POLICY))?;
        }
        let stale: Vec<_> = self
            .dest_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in stale {
            self.dest_v4.remove(&k).map_err(map_err(maps::DEST_V4))?;
        }
        let stale: Vec<_> = self
            .dest_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in stale {
            self.dest_v6.remove(&k).map_err(map_err(maps::DEST_V6))?;
        }
        let stale: Vec<_> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in stale {
            self.ports.remove(&k).map_err(map_err(maps::PORTS))?;
        }
        self.written[generation as usize] = Some(BTreeSet::new());
        Ok(())
    }

    /// Binds a cgroup to a slot (or moves it to another).
    pub fn bind(&mut self, cgroup_id: u64, slot: u32) -> Result<(), BpfError> {
        self.identities
            .insert(cgroup_id, slot, 0)
            .map_err(map_err(maps::IDENTITIES))
    }

    /// Forgets a cgroup: it is judged as an unknown workload again.
    pub fn unbind(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        match self.identities.remove(&cgroup_id) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(map_err(maps::IDENTITIES)(e)),
        }
    }

    /// Every bound cgroup and its slot.
    pub fn bindings(&self) -> Result<BTreeMap<u64, u32>, BpfError> {
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

    /// The slot of each id: the one it held before, or the lowest free one.
    pub fn assign(&mut self, ids: &BTreeSet<SpiffeId>) -> Result<Vec<(u32, SpiffeId)>, BpfError> {
        let mut used: BTreeSet<u32> = self.by_hash.values().copied().collect();
        used.insert(UNKNOWN_SLOT);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let h: SlotHash = Sha256::digest(id.as_str().as_bytes()).into();
            let slot = match self.by_hash.get(&h) {
                Some(s) => *s,
                None => {
                    let free = (1..MAX_SLOTS)
                        .find(|s| !used.contains(s))
                        .ok_or(BpfError::SlotsFull(MAX_SLOTS))?;
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
