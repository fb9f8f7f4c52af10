//! What the events reader needs to name a record's slot and rule, per
//! policy generation. The daemon publishes a new table after every change
//! it applies; the reader takes a snapshot per batch.
//!
//! The kernel has two generations (0 and 1) and a record says which one
//! decided it, so a record decided just before a reload is still named by
//! the rule set that decided it. A record older than the reload before
//! that (the reader was stalled over two reloads) would be named by the
//! newer table of its generation: rule ids are only meaningful within one
//! policy, so such a record's names may be wrong; its ids are not.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use idgate_common::UNKNOWN_SLOT;

use crate::identity::SpiffeId;
use crate::policy::{RuleInfo, RuleTable};

/// The names of one applied policy generation.
#[derive(Debug, Default)]
pub struct GenerationNames {
    /// Which applied policy (the daemon's count) these names are of.
    applied: u64,
    identities: HashMap<u32, SpiffeId>,
    /// Indexed by rule id; shared with the compiled policy.
    rules: RuleTable,
}

/// How a record's slot is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotName<'a> {
    /// The unknown-workload slot.
    Unknown,
    Identity(&'a SpiffeId),
    /// A slot this agent has no name for (decided by a policy it did not
    /// apply, e.g. left in the ring buffer by an earlier agent).
    Unresolved,
}

impl GenerationNames {
    pub fn slot(&self, slot: u32) -> SlotName<'_> {
        if slot == UNKNOWN_SLOT {
            return SlotName::Unknown;
        }
        self.identities
            .get(&slot)
            .map_or(SlotName::Unresolved, SlotName::Identity)
    }

    pub fn rule(&self, rule_id: u32) -> Option<&RuleInfo> {
        self.rules.get(rule_id as usize)
    }
}

/// The shared, swappable tables: one per kernel generation.
#[derive(Debug, Default)]
pub struct Names {
    tables: RwLock<[Option<Arc<GenerationNames>>; 2]>,
}

/// A reader's view for one batch of records.
pub type Snapshot = [Option<Arc<GenerationNames>>; 2];

impl Names {
    /// Publishes the names of the active generation.
    /// `applied` counts the policies the daemon has applied: publishing
    /// the one already held is free. The daemon publishes after every
    /// attestation, and copying a large policy's names each time would
    /// cost more than the attestation itself.
    pub fn publish(
        &self,
        generation: u32,
        applied: u64,
        identities: &[(u32, SpiffeId)],
        rules: &RuleTable,
    ) {
        let index = (generation & 1) as usize;
        let held = |tables: &Snapshot| tables[index].as_ref().is_some_and(|t| t.applied == applied);
        if held(&self.tables.read().expect("names lock")) {
            return;
        }
        let table = GenerationNames {
            applied,
            identities: identities.iter().cloned().collect(),
            rules: rules.clone(),
        };
        self.tables.write().expect("names lock")[index] = Some(Arc::new(table));
    }

    pub fn snapshot(&self) -> Snapshot {
        self.tables.read().expect("names lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> RuleInfo {
        RuleInfo {
            owner: "spiffe://example.org/a".into(),
            name: name.into(),
        }
    }

    #[test]
    fn each_generation_keeps_its_own_names() {
        let a: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let names = Names::default();
        names.publish(
            1,
            1,
            &[(3, a.clone())],
            &RuleTable::from(vec![rule("default"), rule("old")]),
        );
        names.publish(
            0,
            2,
            &[],
            &RuleTable::from(vec![rule("default"), rule("new")]),
        );
        let snap = names.snapshot();
        let (g0, g1) = (snap[0].as_ref().unwrap(), snap[1].as_ref().unwrap());
        assert_eq!(g1.slot(3), SlotName::Identity(&a));
        assert_eq!(g0.slot(3), SlotName::Unresolved);
        assert_eq!(g0.slot(UNKNOWN_SLOT), SlotName::Unknown);
        assert_eq!(&*g1.rule(1).unwrap().name, "old");
        assert_eq!(&*g0.rule(1).unwrap().name, "new");
        assert!(g0.rule(2).is_none());
    }

    #[test]
    fn publishing_the_generation_held_changes_nothing() {
        let names = Names::default();
        names.publish(0, 1, &[], &RuleTable::from(vec![rule("first")]));
        let before = names.snapshot()[0].clone().unwrap();
        names.publish(0, 1, &[], &RuleTable::from(vec![rule("first")]));
        assert!(Arc::ptr_eq(&before, names.snapshot()[0].as_ref().unwrap()));
        // The policy applied after the next one has the same generation.
        names.publish(1, 2, &[], &RuleTable::from(vec![rule("other")]));
        names.publish(0, 3, &[], &RuleTable::from(vec![rule("second")]));
        assert_eq!(
            &*names.snapshot()[0].as_ref().unwrap().rule(0).unwrap().name,
            "second"
        );
    }
}
