//! What the DNS path reads of the owner's state: which identity holds
//! each slot, whether it is revoked or in audit mode, the name classes of
//! its policy in the active generation, and the running grants by name of
//! each slot. The owner publishes a new view with every generation
//! switch, revocation and change of the grants.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use idgate_common::{DestTables, UNKNOWN_SLOT, slot_policy};

use crate::identity::SpiffeId;
use crate::policy::{
    ClassId, CompiledPolicy, CredentialRule, HTTPS, NameIndex, NamePattern, SlotEntry,
    evaluate_name,
};

/// An operator's grant by name, as the DNS path needs it: a lookup from
/// its slot of a name it covers is answered, and the answer's addresses
/// are opened by the grant until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedName {
    pub id: u32,
    pub pattern: NamePattern,
    /// `CLOCK_BOOTTIME` nanoseconds from which it answers nothing.
    pub expiry_boot_ns: u64,
}

/// The view at one generation.
#[derive(Debug, Clone, Default)]
pub struct DnsView {
    /// The generation as operators see it.
    pub generation: u64,
    /// The kernel's whole generation value for it, which learned entries
    /// are stamped with; 0 before the first switch (stamps nothing).
    pub stamp: u32,
    by_slot: Arc<HashMap<u32, SpiffeId>>,
    revoked: BTreeSet<SpiffeId>,
    compiled: Arc<CompiledPolicy>,
    /// Each slot's entry of `compiled`, by slot.
    entries: Arc<HashMap<u32, SlotEntry>>,
    /// The grants by name of each slot.
    granted: HashMap<u32, Vec<GrantedName>>,
    /// The version of the grants it was taken at.
    pub grants_version: u64,
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

    /// The identity, when it is bound and not revoked.
    pub fn live_identity(&self) -> Option<&SpiffeId> {
        match self {
            Self::Identity { id, .. } => Some(id),
            Self::Unknown | Self::Revoked(_) => None,
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
            by_slot: Arc::new(identities.iter().cloned().collect()),
            revoked,
            entries: Arc::new(compiled.slots.iter().map(|e| (e.slot, *e)).collect()),
            compiled,
            granted: HashMap::new(),
            grants_version: 0,
        }
    }

    /// With the running grants by name, each with its slot, at `version`
    /// (a view that differs from another only in its grants shares the
    /// rest with it: see [`DnsView::clone`]).
    pub fn with_grants(
        mut self,
        version: u64,
        grants: impl IntoIterator<Item = (u32, GrantedName)>,
    ) -> Self {
        self.granted.clear();
        for (slot, g) in grants {
            if slot != UNKNOWN_SLOT {
                self.granted.entry(slot).or_default().push(g);
            }
        }
        self.grants_version = version;
        self
    }

    /// The grants by name of `slot` that cover `name` and run at
    /// `now_boot` (`CLOCK_BOOTTIME` nanoseconds).
    pub fn grants_for(&self, slot: u32, name: &str, now_boot: u64) -> Vec<&GrantedName> {
        self.granted
            .get(&slot)
            .into_iter()
            .flatten()
            .filter(|g| g.expiry_boot_ns > now_boot && g.pattern.covers(name))
            .collect()
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

    /// The credential rules of `slot`'s identity in this generation.
    pub fn credentials(&self, slot: u32) -> Option<&Arc<[CredentialRule]>> {
        let entry = self.entries.get(&slot)?;
        self.compiled.credentials.get(entry.rule_set)
    }

    /// The identities holding a slot whose credential rules in this
    /// generation are not empty.
    pub fn credential_identities(&self) -> BTreeSet<SpiffeId> {
        self.by_slot
            .iter()
            .filter(|(slot, _)| self.credentials(**slot).is_some_and(|c| !c.is_empty()))
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Whether a name rule of `slot`'s identity (bound, not revoked)
    /// allows a TCP connect to `port` of an address learned for `host`.
    pub fn name_allows(&self, slot: u32, host: &str, port: u16) -> bool {
        let Asker::Identity {
            names: Some(names), ..
        } = self.asker(slot)
        else {
            return false;
        };
        let Some(found) = names.class_of(host) else {
            return false;
        };
        self.entries
            .get(&slot)
            .and_then(|entry| evaluate_name(&self.compiled, entry, &found.class, port, true))
            .is_some_and(|(verdict, _)| verdict == idgate_common::verdict::ALLOW)
    }

    /// Whether `class` of `slot`'s policy is a credential rule's host: its
    /// TCP connects to port 443 go to the credential broker.
    pub fn brokered(&self, slot: u32, class: &ClassId) -> bool {
        self.entries
            .get(&slot)
            .and_then(|entry| evaluate_name(&self.compiled, entry, class, HTTPS, true))
            .is_some_and(|(verdict, _)| verdict == idgate_common::verdict::BROKER)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_s_grants_by_name_cover_their_names_until_they_end() {
        let g = |id, pattern: &str, expiry_boot_ns| GrantedName {
            id,
            pattern: pattern.parse().unwrap(),
            expiry_boot_ns,
        };
        let view = DnsView::default().with_grants(
            7,
            [
                (5, g(1, "api.example.com", 100)),
                (5, g(2, "*.example.com", 200)),
                (6, g(3, "api.example.com", 100)),
                // Unknown workloads get no grants.
                (UNKNOWN_SLOT, g(4, "api.example.com", 100)),
            ],
        );
        assert_eq!(view.grants_version, 7);
        let ids = |slot, name, now| -> Vec<u32> {
            view.grants_for(slot, name, now)
                .iter()
                .map(|g| g.id)
                .collect()
        };
        assert_eq!(ids(5, "api.example.com", 10), [1, 2]);
        assert_eq!(ids(5, "www.example.com", 10), [2]);
        assert!(ids(5, "example.com", 10).is_empty());
        assert!(ids(5, "api.example.org", 10).is_empty());
        // Ended: at its expiry it covers nothing.
        assert_eq!(ids(5, "api.example.com", 100), [2]);
        assert!(ids(5, "api.example.com", 200).is_empty());
        // Per slot.
        assert_eq!(ids(6, "api.example.com", 10), [3]);
        assert!(ids(UNKNOWN_SLOT, "api.example.com", 10).is_empty());
        assert!(ids(9, "api.example.com", 10).is_empty());
    }
}
