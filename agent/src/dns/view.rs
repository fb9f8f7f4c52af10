//! What the DNS path reads of the owner's state: which identity holds
//! each slot, whether it is revoked or in audit mode, and the name
//! classes of its policy in the active generation. The owner publishes a
//! new view with every generation switch and revocation.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use idgate_common::{DestTables, UNKNOWN_SLOT, slot_policy};

use crate::identity::SpiffeId;
use crate::policy::{ClassId, CompiledPolicy, NameIndex, SlotEntry};

/// The view at one generation.
#[derive(Debug, Clone, Default)]
pub struct DnsView {
    /// The generation as operators see it.
    pub generation: u64,
    /// The kernel's whole generation value for it, which learned entries
    /// are stamped with; 0 before the first switch (stamps nothing).
    pub stamp: u32,
    by_slot: HashMap<u32, SpiffeId>,
    revoked: BTreeSet<SpiffeId>,
    compiled: Arc<CompiledPolicy>,
    /// Each slot's entry of `compiled`, by slot.
    entries: HashMap<u32, SlotEntry>,
}

/// Who asks.
pub enum Asker<'a> {
    /// A cgroup with no identity: unknown workloads have no names.
    Unknown,
    Revoked(&'a SpiffeId),
    Identity {
        slot: u32,
        id: &'a SpiffeId,
        /// `None` when the identity's policy names nothing.
        names: Option<&'a NameIndex>,
        audit: bool,
    },
}

impl Asker<'_> {
    pub fn identity(&self) -> Option<&SpiffeId> {
        match self {
            Self::Unknown => None,
            Self::Revoked(id) | Self::Identity { id, .. } => Some(id),
        }
    }
}

impl DnsView {
    pub fn new(
        (generation, stamp): (u64, u32),
        identities: &[(u32, SpiffeId)],
        revoked: BTreeSet<SpiffeId>,
        compiled: Arc<CompiledPolicy>,
    ) -> Self {
        Self {
            generation,
            stamp,
            by_slot: identities.iter().cloned().collect(),
            revoked,
            entries: compiled.slots.iter().map(|e| (e.slot, *e)).collect(),
            compiled,
        }
    }

    /// What `class` allows `slot` in this generation, as its tries hold
    /// it; `None` when the slot's rule set has no such class.
    pub fn class_tables(&self, slot: u32, class: &ClassId) -> Option<DestTables> {
        let entry = self.entries.get(&slot)?;
        self.compiled.rule_sets[entry.rule_set]
            .names
            .iter()
            .find(|n| n.class == *class)
            .map(|n| DestTables {
                tcp: n.tcp,
                udp: n.udp,
            })
    }

    /// Who holds `slot`.
    pub fn asker(&self, slot: u32) -> Asker<'_> {
        let Some(id) = self.by_slot.get(&slot).filter(|_| slot != UNKNOWN_SLOT) else {
            return Asker::Unknown;
        };
        if self.revoked.contains(id) {
            return Asker::Revoked(id);
        }
        let entry = self.entries.get(&slot);
        let audit = entry.is_some_and(|e| e.policy.flags & slot_policy::AUDIT != 0);
        Asker::Identity {
            slot,
            id,
            names: entry.map(|e| &*self.compiled.names[e.rule_set]),
            audit,
        }
    }

    /// Whether the view's revocations are `revoked`.
    pub fn revoked_are(&self, revoked: &BTreeSet<SpiffeId>) -> bool {
        self.revoked == *revoked
    }

    /// The identity that holds `slot`.
    pub fn identity(&self, slot: u32) -> Option<&SpiffeId> {
        self.by_slot.get(&slot)
    }

    /// The slot of `id`, if it holds one.
    pub fn slot_of(&self, id: &SpiffeId) -> Option<u32> {
        self.by_slot.iter().find(|(_, i)| *i == id).map(|(s, _)| *s)
    }
}
