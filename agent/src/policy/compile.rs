//! Compiles a policy for a set of identity slots into map entries.
//!
//! The kernel does no ranking: the precedence (see `precedence.rs` and
//! `docs/policy.md`) is applied here. For each destination prefix the
//! rules of every less specific prefix are folded in, and the port space
//! is split into disjoint intervals each with one winner, so the kernel's
//! longest-prefix match on address, then on port, is the answer.
//!
//! Names compile to one entry per name class (each name pattern of the
//! identity): the rules of every pattern that covers the class, ranked
//! the same way but for the prefix, as one port table per protocol.
//! A credential rule is a name rule for its host, on 443 (and 80), with
//! the verdict [`verdict::BROKER`]: the kernel sends those TCP connects
//! to the agent's egress broker, and denies UDP.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;

use idgate_common::{
    INLINE_RANGES, NO_TABLE, PortRange, PortTable, SlotPolicy, UNKNOWN_SLOT, slot_policy, verdict,
};
use ipnet::IpNet;

use super::model::{CredentialRule, Mode, PolicySet, Serial};
use super::names::{ClassId, NameIndex, NamePattern};
use super::ports;
use super::precedence::{
    Blocks, DEFAULT_RULE_ID, Decided, FlatRule, Interval, Outcome, RuleInfo, RuleTable,
    UNKNOWN_BLOCK, decide,
};
use crate::hashing::FastMap;
use crate::identity::SpiffeId;

/// A destination-trie entry: address prefix -> the port table of each
/// protocol, as the kernel reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DestEntry {
    pub net: IpNet,
    pub tcp: PortTable,
    pub udp: PortTable,
}

/// A name class's entry of the destination trie, under a
/// [`FAMILY_NAME`](idgate_common::FAMILY_NAME) key that is matched in
/// full: the port table of each protocol for addresses learned for the
/// class.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameEntry {
    pub class: ClassId,
    pub tcp: PortTable,
    pub udp: PortTable,
}

/// A port-trie entry: `(table, port block)` -> verdict and rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortEntry {
    pub table: u32,
    pub port: u16,
    /// Bits of the port matched, 0-16.
    pub prefix_len: u32,
    pub verdict: u32,
    pub rule_id: u32,
}

/// The trie entries of one rule set, which every slot with that set
/// shares. Port-trie table ids count from 1 within the set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RuleSet {
    pub dests: Vec<DestEntry>,
    /// One per name class, by class id; in the destination trie too.
    pub names: Vec<NameEntry>,
    pub ports: Vec<PortEntry>,
}

impl RuleSet {
    /// Entries of its destination trie: address prefixes and name
    /// classes.
    pub fn dest_trie_len(&self) -> usize {
        self.dests.len() + self.names.len()
    }
}

/// One slot of a generation: its policy, and its rule set (an index into
/// [`CompiledPolicy::rule_sets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry {
    pub slot: u32,
    pub policy: SlotPolicy,
    pub rule_set: usize,
}

/// Everything one policy generation writes into the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub slots: Vec<SlotEntry>,
    /// Each distinct rule set once (shared with the policies compiled
    /// before and after it that have the same set).
    pub rule_sets: Vec<Arc<RuleSet>>,
    /// The name classes of each rule set, indexed like `rule_sets`.
    pub names: Vec<Arc<NameIndex>>,
    /// The credential rules of each rule set's identities, indexed like
    /// `rule_sets` (a rule set names the rule id of each).
    pub credentials: Vec<Arc<[CredentialRule]>>,
    /// Indexed by rule id: id 0 is the default, then every rule of the
    /// policy in order (the unknown-workload policy's first), so a rule
    /// keeps its id whichever identities are bound.
    pub rules: RuleTable,
}

impl CompiledPolicy {
    /// Sets a [`slot_policy`] flag in the entries of `slots`.
    pub fn add_flag(&mut self, slots: &[u32], flag: u32) {
        for e in self.slots.iter_mut().filter(|e| slots.contains(&e.slot)) {
            e.policy.flags |= flag;
        }
    }

    /// The entry of `slot`, if the generation has one.
    pub fn slot(&self, slot: u32) -> Option<&SlotEntry> {
        self.slots.iter().find(|e| e.slot == slot)
    }

    /// The name classes of `slot`'s rule set, if the generation has the
    /// slot: which class a name looked up by its identity falls in.
    pub fn names(&self, slot: u32) -> Option<&Arc<NameIndex>> {
        self.slot(slot).map(|e| &self.names[e.rule_set])
    }

    /// The credential rules of `slot`'s identity, if the generation has
    /// the slot: at most one per host, each the most specific block's
    /// (see `precedence.rs`), in rule id order. Shared by every slot of
    /// the same rule set, and with earlier compiles where the identity's
    /// blocks did not change.
    pub fn credentials(&self, slot: u32) -> Option<&Arc<[CredentialRule]>> {
        self.slot(slot).map(|e| &self.credentials[e.rule_set])
    }
}

/// Compiles `policy` for the bound identities in `slots` (slot, id). The
/// unknown-workload policy goes to [`UNKNOWN_SLOT`]. An identity that no
/// block matches gets deny-all.
pub fn compile(policy: &PolicySet, slots: &[(u32, SpiffeId)]) -> CompiledPolicy {
    Compiler::default().compile(policy, slots)
}

/// Compiles policies one after another, keeping what each identity's
/// blocks came to: an identity whose blocks are the same parses (see
/// [`Serial`]) with the same rule ids as in the last policy it compiled
/// gets the same entries without compiling them again, so a policy where
/// one block changed compiles that block's identities only.
#[derive(Default)]
pub struct Compiler {
    /// The mode the kept entries were compiled in (it sets the audit
    /// default of every identity).
    mode: Option<Mode>,
    /// By [`Blocks::key`] of the blocks an identity gets, with the count
    /// of the last compile that used it.
    kept: FastMap<Vec<(Serial, u32)>, (Compiled, u64)>,
    /// Compiles so far.
    round: u64,
    /// Every rule set in use, by a hash of its entries: a new set equal
    /// to one of them is shared with it.
    interned: FastMap<u64, Vec<Arc<RuleSet>>>,
    hasher: foldhash::fast::RandomState,
    /// What each block's rule ids stand for, by its parse.
    rule_infos: FastMap<Serial, Arc<[RuleInfo]>>,
}

/// The entries of the identities one list of blocks applies to.
#[derive(Clone)]
struct Compiled {
    policy: SlotPolicy,
    set: Arc<RuleSet>,
    names: Arc<NameIndex>,
    credentials: Arc<[CredentialRule]>,
}

impl Compiler {
    /// [`compile`], taking from the last policy compiled what has not
    /// changed.
    pub fn compile(&mut self, policy: &PolicySet, slots: &[(u32, SpiffeId)]) -> CompiledPolicy {
        let blocks = Blocks::new(policy);
        if self.mode != Some(policy.mode) {
            self.kept.clear();
            self.mode = Some(policy.mode);
        }
        let mut out = CompiledPolicy {
            rules: self.rule_infos(&blocks),
            ..Default::default()
        };
        // Identities matched by the same blocks get the same entries;
        // blocks that come to the same entries share one rule set. One
        // buffer each for an identity's blocks and their key, so that an
        // identity whose entries are kept costs two lookups.
        self.round += 1;
        let mut index_of: FastMap<*const RuleSet, usize> = FastMap::default();
        let (mut which, mut key) = (Vec::new(), Vec::new());
        let targets = std::iter::once((UNKNOWN_SLOT, None))
            .chain(slots.iter().map(|(slot, id)| (*slot, Some(id))));
        for (slot, id) in targets {
            which.clear();
            match id {
                Some(id) => blocks.for_identity_into(id, &mut which),
                None => which.push(UNKNOWN_BLOCK),
            }
            let keyed = blocks.key_into(&which, &mut key);
            let compiled = match keyed.then(|| self.kept.get_mut(key.as_slice())).flatten() {
                Some((compiled, used)) => {
                    *used = self.round;
                    compiled.clone()
                }
                None => {
                    let compiled = self.compile_blocks(&blocks, &which);
                    if keyed {
                        self.kept
                            .insert(key.clone(), (compiled.clone(), self.round));
                    }
                    compiled
                }
            };
            let next = out.rule_sets.len();
            let rule_set = *index_of
                .entry(Arc::as_ptr(&compiled.set))
                .or_insert_with(|| {
                    out.rule_sets.push(compiled.set);
                    out.names.push(compiled.names);
                    out.credentials.push(compiled.credentials);
                    next
                });
            out.slots.push(SlotEntry {
                slot,
                policy: compiled.policy,
                rule_set,
            });
        }
        let round = self.round;
        self.kept.retain(|_, (_, used)| *used == round);
        self.interned.retain(|_, sets| {
            sets.retain(|s| index_of.contains_key(&Arc::as_ptr(s)));
            !sets.is_empty()
        });
        out
    }

    /// What every rule id stands for (indexed by id; see [`Blocks::block_rule_infos`]), taking
    /// each block's from the last policy compiled where it is the same
    /// parse.
    fn rule_infos(&mut self, blocks: &Blocks) -> RuleTable {
        let mut parts = Vec::with_capacity(blocks.len() + 1);
        parts.push((DEFAULT_RULE_ID, Arc::from([RuleInfo::default_rule()])));
        let mut kept = FastMap::with_capacity_and_hasher(blocks.len(), Default::default());
        for b in 0..blocks.len() {
            let block = blocks.get(b);
            let infos: Arc<[RuleInfo]> = match block.serial.and_then(|s| self.rule_infos.get(&s)) {
                Some(infos) => infos.clone(),
                None => blocks.block_rule_infos(b).into(),
            };
            if let Some(serial) = block.serial {
                kept.insert(serial, infos.clone());
            }
            parts.push((block.first_rule, infos));
        }
        self.rule_infos = kept;
        RuleTable::new(parts)
    }

    /// The entries of an identity the blocks `which` apply to.
    fn compile_blocks(&mut self, blocks: &Blocks, which: &[usize]) -> Compiled {
        let settings = blocks.settings(which);
        let flag = |set: bool, flag: u32| if set { flag } else { 0 };
        let credentials = blocks.credentials(which);
        let mut names = blocks.name_rules(which);
        names.extend(credentials.iter().map(|c| c.name_rule()));
        let set = rule_set(decide(&blocks.rules(which)), &names);
        let policy = SlotPolicy {
            default_verdict: verdict_of(settings.default.into()),
            default_rule: DEFAULT_RULE_ID,
            flags: slot_policy::PRESENT
                | flag(settings.audit, slot_policy::AUDIT)
                | flag(settings.raw_sockets, slot_policy::RAW_SOCKETS)
                | flag(set.dests.is_empty(), slot_policy::NO_ADDRESS_RULES),
        };
        let patterns = names.iter().map(|(p, _)| *p);
        Compiled {
            policy,
            set: self.intern(set),
            names: Arc::new(NameIndex::new(patterns)),
            credentials: credentials.iter().map(|c| c.rule.clone()).collect(),
        }
    }

    /// `set`, or the equal one in use.
    fn intern(&mut self, set: RuleSet) -> Arc<RuleSet> {
        let sets = self.interned.entry(self.hasher.hash_one(&set)).or_default();
        if let Some(same) = sets.iter().find(|s| ***s == set) {
            return same.clone();
        }
        let set = Arc::new(set);
        sets.push(set.clone());
        set
    }
}

/// The trie entries of one identity's decided prefixes and of its name
/// rules. An interval list of up to [`INLINE_RANGES`] is held in its
/// destination entry; each distinct longer one becomes one port-trie
/// table.
fn rule_set(decided: Vec<Decided>, names: &[(&NamePattern, FlatRule)]) -> RuleSet {
    let mut ids: HashMap<Vec<Interval>, u32> = HashMap::new();
    let mut set = RuleSet::default();
    let mut table = |intervals: Vec<Interval>, ports: &mut Vec<PortEntry>| -> PortTable {
        let mut out = PortTable::default();
        if intervals.len() <= INLINE_RANGES {
            out.count = intervals.len() as u32;
            for (range, i) in out.ranges.iter_mut().zip(&intervals) {
                *range = PortRange {
                    first: i.first,
                    last: i.last,
                    verdict: verdict_of(i.outcome),
                    rule_id: i.rule,
                };
            }
            return out;
        }
        let next = ids.len() as u32 + 1;
        out.table = *ids.entry(intervals).or_insert_with_key(|intervals| {
            for i in intervals {
                for (port, prefix_len) in ports::blocks(i.first, i.last) {
                    ports.push(PortEntry {
                        table: next,
                        port,
                        prefix_len,
                        verdict: verdict_of(i.outcome),
                        rule_id: i.rule,
                    });
                }
            }
            next
        });
        out
    };
    for d in decided {
        let tcp = table(d.tcp, &mut set.ports);
        let udp = table(d.udp, &mut set.ports);
        set.dests.push(DestEntry {
            net: d.net,
            tcp,
            udp,
        });
    }
    for (class, decided) in name_classes(names) {
        let tcp = table(decided.tcp, &mut set.ports);
        let udp = table(decided.udp, &mut set.ports);
        set.names.push(NameEntry { class, tcp, udp });
    }
    set
}

/// Each name class (each pattern of `names`, in order) and the winners of
/// its ports: among the rules of every pattern that covers the class.
fn name_classes(names: &[(&NamePattern, FlatRule)]) -> Vec<(ClassId, Decided)> {
    let mut by_pattern: HashMap<&str, Vec<&FlatRule>> = HashMap::new();
    for (pattern, rule) in names {
        by_pattern.entry(pattern.as_str()).or_default().push(rule);
    }
    let classes: BTreeSet<&NamePattern> = names.iter().map(|(p, _)| *p).collect();
    classes
        .into_iter()
        .map(|class| {
            let rules: Vec<FlatRule> = class
                .covering()
                .filter_map(|p| by_pattern.get(p.as_ref()))
                .flatten()
                .map(|r| (*r).clone())
                .collect();
            // Every rule has the one name net: one entry.
            let decided = decide(&rules).pop().expect("a class has its own rules");
            (class.class_id(), decided)
        })
        .collect()
}

fn verdict_of(o: Outcome) -> u32 {
    match o {
        Outcome::Allow => verdict::ALLOW,
        Outcome::Deny => verdict::DENY,
        Outcome::Broker => verdict::BROKER,
    }
}

/// What the compiled entries decide for one connect, as the kernel would:
/// longest address prefix, then the range of its inline table that holds
/// the port, or else the longest block of its port-trie table, then the
/// default. Used by tests and by `explain`.
pub fn evaluate(c: &CompiledPolicy, slot: u32, addr: IpAddr, port: u16, tcp: bool) -> (u32, u32) {
    evaluate_learned(c, slot, addr, &[], port, tcp)
}

/// [`evaluate`] for an address learned, by lookups of `slot`'s identity,
/// for the name `classes` (those not expired): as step 7 of the kernel's
/// lookup, when no address rule covers the connect, each class's port
/// table in turn, and the first rule found decides. The unknown
/// workload's slot has no names.
pub fn evaluate_learned(
    c: &CompiledPolicy,
    slot: u32,
    addr: IpAddr,
    classes: &[ClassId],
    port: u16,
    tcp: bool,
) -> (u32, u32) {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    let Some(entry) = c.slot(slot) else {
        return (verdict::DENY, DEFAULT_RULE_ID);
    };
    let set = &c.rule_sets[entry.rule_set];
    let pick = |tcp_table: &PortTable, udp_table: &PortTable| {
        let table = if tcp { tcp_table } else { udp_table };
        judge(set, table, port)
    };
    let by_address = set
        .dests
        .iter()
        .filter(|d| d.net.contains(&addr))
        .max_by_key(|d| d.net.prefix_len())
        .and_then(|d| pick(&d.tcp, &d.udp));
    let by_name = || {
        classes
            .iter()
            .find_map(|class| evaluate_name(c, entry, class, port, tcp))
    };
    by_address
        .or_else(by_name)
        .unwrap_or((entry.policy.default_verdict, entry.policy.default_rule))
}

/// The verdict and rule the name `class` of a slot's policy (`entry`, its
/// entry in `c`) has for a connect to `port` of an address learned for
/// it; `None` when the class has no rule there (or the slot no such
/// class). The unknown workload's slot has no names.
pub fn evaluate_name(
    c: &CompiledPolicy,
    entry: &SlotEntry,
    class: &ClassId,
    port: u16,
    tcp: bool,
) -> Option<(u32, u32)> {
    if entry.slot == UNKNOWN_SLOT {
        return None;
    }
    let set = &c.rule_sets[entry.rule_set];
    let n = set.names.iter().find(|n| n.class == *class)?;
    judge(set, if tcp { &n.tcp } else { &n.udp }, port)
}

/// The verdict and rule `table` has for `port`: the range of its inline
/// list that holds it, or else the longest block of its port-trie table;
/// `None` when neither has the port (the default would decide).
fn judge(set: &RuleSet, table: &PortTable, port: u16) -> Option<(u32, u32)> {
    let inline = &table.ranges[..table.count as usize];
    if !inline.is_empty() {
        return inline
            .iter()
            .find(|r| (r.first..=r.last).contains(&port))
            .map(|r| (r.verdict, r.rule_id));
    }
    if table.table == NO_TABLE {
        return None;
    }
    set.ports
        .iter()
        .filter(|p| {
            p.table == table.table && {
                let span = 1u32 << (16 - p.prefix_len);
                (u32::from(p.port)..u32::from(p.port) + span).contains(&u32::from(port))
            }
        })
        .max_by_key(|p| p.prefix_len)
        .map(|p| (p.verdict, p.rule_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::policy;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    const WEB: &str = "spiffe://example.org/web";

    fn decide(c: &CompiledPolicy, addr: &str, port: u16, tcp: bool) -> (u32, String) {
        let (v, rule) = evaluate(c, 1, addr.parse().unwrap(), port, tcp);
        (v, c.rules[rule as usize].name.to_string())
    }

    #[test]
    fn longer_prefix_wins_and_less_specific_rules_are_inherited() {
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "{WEB}"
            [[identity.egress]]
            name = "lan"
            to = ["10.0.0.0/8"]
            action = "allow"
            [[identity.egress]]
            name = "db-ssh"
            to = ["10.1.0.0/16"]
            ports = [22]
            action = "deny"
            "#
        ));
        let c = compile(&p, &[(1, id(WEB))]);
        assert_eq!(
            decide(&c, "10.1.2.3", 22, true),
            (verdict::DENY, "db-ssh".into())
        );
        // Port 80 in the /16 is not covered by the /16 rule: the /8 decides.
        assert_eq!(
            decide(&c, "10.1.2.3", 80, true),
            (verdict::ALLOW, "lan".into())
        );
        assert_eq!(
            decide(&c, "10.9.0.1", 22, true),
            (verdict::ALLOW, "lan".into())
        );
        assert_eq!(
            decide(&c, "192.0.2.1", 80, true),
            (verdict::DENY, "default".into())
        );
    }

    #[test]
    fn narrower_ports_then_a_specific_protocol_win() {
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "{WEB}"
            default = "allow"
            [[identity.egress]]
            name = "wide"
            to = ["127.0.0.0/8"]
            ports = ["1000-2000"]
            action = "deny"
            [[identity.egress]]
            name = "narrow"
            to = ["127.0.0.0/8"]
            ports = ["1500-1600"]
            action = "allow"
            [[identity.egress]]
            name = "udp-only"
            to = ["127.0.0.0/8"]
            ports = ["1500-1600"]
            protocol = "udp"
            action = "deny"
            "#
        ));
        let c = compile(&p, &[(1, id(WEB))]);
        assert_eq!(decide(&c, "127.0.0.1", 1000, true).1, "wide");
        assert_eq!(
            decide(&c, "127.0.0.1", 1550, true),
            (verdict::ALLOW, "narrow".into())
        );
        assert_eq!(
            decide(&c, "127.0.0.1", 1550, false),
            (verdict::DENY, "udp-only".into())
        );
        assert_eq!(
            decide(&c, "127.0.0.1", 2001, true),
            (verdict::ALLOW, "default".into())
        );
    }

    #[test]
    fn mapped_v6_is_judged_by_v4_rules_and_any_covers_both_families() {
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "{WEB}"
            [[identity.egress]]
            name = "v6-all"
            to = ["::/0"]
            action = "allow"
            [[identity.egress]]
            name = "v4-local"
            to = ["127.0.0.1"]
            ports = [80]
            action = "allow"
            "#
        ));
        let c = compile(&p, &[(1, id(WEB))]);
        assert_eq!(decide(&c, "::ffff:127.0.0.2", 80, true).0, verdict::DENY);
        assert_eq!(decide(&c, "::ffff:127.0.0.1", 80, true).0, verdict::ALLOW);
        assert_eq!(decide(&c, "::1", 9, true).0, verdict::ALLOW);
    }

    /// `api.x.com` has its own rule and those of `*.x.com`; `*.x.com`
    /// has only its own; `*.eu.x.com` gets those of `*.x.com` too.
    #[test]
    fn a_class_has_the_rules_of_every_pattern_covering_it() {
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "spiffe://example.org/*"
            [[identity.egress]]
            name = "any-x"
            to = ["*.x.com"]
            ports = [80]
            action = "allow"
            [[identity]]
            id = "{WEB}"
            [[identity.egress]]
            name = "api"
            to = ["API.x.com."]
            ports = [443]
            protocol = "tcp"
            action = "allow"
            [[identity.egress]]
            name = "eu"
            to = ["*.eu.x.com"]
            ports = ["80-81"]
            protocol = "udp"
            action = "allow"
            "#
        ));
        let c = compile(&p, &[(1, id(WEB)), (2, id("spiffe://example.org/db"))]);
        let index = c.names(1).unwrap();
        let class = |name: &str| index.class_of(name).unwrap().class;
        let at = |slot: u32, name: &str, port: u16, tcp: bool| {
            let addr = "192.0.2.1".parse().unwrap();
            let (v, rule) = evaluate_learned(&c, slot, addr, &[class(name)], port, tcp);
            (v, &*c.rules[rule as usize].name)
        };
        let api: NamePattern = "api.x.com".parse().unwrap();
        assert_eq!(class("api.x.com"), api.class_id());
        assert_eq!(at(1, "api.x.com", 443, true), (verdict::ALLOW, "api"));
        assert_eq!(at(1, "api.x.com", 80, true), (verdict::ALLOW, "any-x"));
        assert_eq!(at(1, "api.x.com", 443, false), (verdict::DENY, "default"));
        assert_eq!(at(1, "www.x.com", 80, false), (verdict::ALLOW, "any-x"));
        assert_eq!(at(1, "www.x.com", 443, true), (verdict::DENY, "default"));
        // The precedence but the prefix: at 80, the one port of `any-x`
        // is narrower than the two of `eu`, though `eu` is of the exact
        // block and for one protocol.
        assert_eq!(at(1, "a.eu.x.com", 80, false), (verdict::ALLOW, "any-x"));
        assert_eq!(at(1, "a.eu.x.com", 81, false), (verdict::ALLOW, "eu"));
        assert_eq!(at(1, "a.eu.x.com", 81, true), (verdict::DENY, "default"));
        // Not learned, or learned for another class: the default.
        let addr = "192.0.2.1".parse().unwrap();
        assert_eq!(evaluate(&c, 1, addr, 80, true).0, verdict::DENY);
        // db has the pattern block only: one class.
        let db = c.names(2).unwrap();
        assert_eq!(db.class_of("api.x.com").unwrap().pattern, "*.x.com");
        assert_eq!(c.rule_sets[c.slot(2).unwrap().rule_set].names.len(), 1);
        let set = &c.rule_sets[c.slot(1).unwrap().rule_set];
        assert_eq!(set.names.len(), 3);
        assert_eq!(set.dests.len(), 0);
        // Names only: the programs skip the address lookup.
        let flags = |slot: u32| c.slot(slot).unwrap().policy.flags;
        assert_ne!(flags(1) & slot_policy::NO_ADDRESS_RULES, 0);
        assert_ne!(flags(2) & slot_policy::NO_ADDRESS_RULES, 0);
        // The unknown workload has none.
        assert!(
            c.names(UNKNOWN_SLOT)
                .unwrap()
                .class_of("api.x.com")
                .is_none()
        );
    }

    #[test]
    fn address_rules_decide_before_names() {
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "{WEB}"
            [[identity.egress]]
            name = "api"
            to = ["api.x.com"]
            action = "allow"
            [[identity.egress]]
            name = "no-metadata"
            to = ["169.254.169.254"]
            action = "deny"
            [[identity.egress]]
            name = "lan-ssh"
            to = ["10.0.0.0/8"]
            ports = [22]
            protocol = "tcp"
            action = "allow"
            "#
        ));
        let c = compile(&p, &[(1, id(WEB))]);
        let api = c.names(1).unwrap().class_of("api.x.com").unwrap().class;
        let at = |addr: &str, port: u16| {
            let (v, rule) =
                evaluate_learned(&c, 1, addr.parse().unwrap(), &[[7; 16], api], port, true);
            (v, &*c.rules[rule as usize].name)
        };
        // A deny whose CIDR covers the address beats the name.
        assert_eq!(at("169.254.169.254", 443), (verdict::DENY, "no-metadata"));
        // An address rule for the port decides; for another port the
        // prefix's table has nothing, so the name does.
        assert_eq!(at("10.1.2.3", 22), (verdict::ALLOW, "lan-ssh"));
        assert_eq!(at("10.1.2.3", 443), (verdict::ALLOW, "api"));
        assert_eq!(at("::ffff:192.0.2.1", 443), (verdict::ALLOW, "api"));
        // With address rules, the programs look them up first.
        let flags = c.slot(1).unwrap().policy.flags;
        assert_eq!(flags & slot_policy::NO_ADDRESS_RULES, 0);
    }

    #[test]
    fn identical_rule_sets_share_a_table_and_unknown_gets_slot_zero() {
        let p = policy(&format!(
            r#"
            mode = "audit"
            [[identity]]
            id = "{WEB}"
            [[identity.egress]]
            name = "a"
            to = ["127.0.0.1"]
            action = "allow"
            [[identity.egress]]
            name = "b"
            to = ["127.0.0.2"]
            action = "allow"
            "#
        ));
        let c = compile(&p, &[(1, id(WEB)), (2, id("spiffe://example.org/none"))]);
        let web = &c.rule_sets[c.slot(1).unwrap().rule_set];
        assert_eq!(web.dests.len(), 2);
        assert_ne!(
            web.dests[0].tcp, web.dests[1].tcp,
            "a and b differ by rule id"
        );
        // The unknown workload and the identity without a block both have
        // no rules: one (empty) rule set serves both.
        assert_eq!(c.rule_sets.len(), 2);
        assert_eq!(
            c.slot(UNKNOWN_SLOT).unwrap().rule_set,
            c.slot(2).unwrap().rule_set
        );
        let unknown = c.slot(UNKNOWN_SLOT).unwrap().policy;
        assert_eq!(unknown.default_verdict, verdict::DENY);
        assert_ne!(unknown.flags & slot_policy::AUDIT, 0);
        // An identity without a block is deny-all.
        assert_eq!(
            evaluate(&c, 2, "127.0.0.1".parse().unwrap(), 1, true).0,
            verdict::DENY
        );
    }

    #[test]
    fn compiles_to_exact_entries() {
        let p = policy(&format!(
            "[[identity]]\nid = \"{WEB}\"\n[[identity.egress]]\nname = \"http\"\nto = [\"10.0.0.0/8\"]\nports = [\"80-81\"]\nprotocol = \"tcp\"\naction = \"allow\"\n"
        ));
        let deny_all = SlotPolicy {
            default_verdict: verdict::DENY,
            default_rule: DEFAULT_RULE_ID,
            flags: slot_policy::PRESENT,
        };
        assert_eq!(
            compile(&p, &[(7, id(WEB))]),
            CompiledPolicy {
                slots: vec![
                    SlotEntry {
                        slot: UNKNOWN_SLOT,
                        // No rule at all: no address rule to look up.
                        policy: SlotPolicy {
                            flags: slot_policy::PRESENT | slot_policy::NO_ADDRESS_RULES,
                            ..deny_all
                        },
                        rule_set: 0,
                    },
                    SlotEntry {
                        slot: 7,
                        policy: deny_all,
                        rule_set: 1,
                    },
                ],
                names: vec![Arc::default(), Arc::default()],
                credentials: vec![Arc::from([]), Arc::from([])],
                rule_sets: vec![
                    Arc::default(),
                    Arc::new(RuleSet {
                        names: vec![],
                        dests: vec![DestEntry {
                            net: "10.0.0.0/8".parse().unwrap(),
                            tcp: PortTable {
                                table: NO_TABLE,
                                count: 1,
                                ranges: [
                                    PortRange {
                                        first: 80,
                                        last: 81,
                                        verdict: verdict::ALLOW,
                                        rule_id: 1,
                                    },
                                    PortRange::default(),
                                    PortRange::default(),
                                    PortRange::default(),
                                ],
                            },
                            udp: PortTable::default(),
                        }],
                        ports: vec![],
                    }),
                ],
                rules: RuleTable::from(vec![
                    RuleInfo {
                        owner: "".into(),
                        name: "default".into(),
                    },
                    RuleInfo {
                        owner: WEB.into(),
                        name: "http".into(),
                    },
                ]),
            }
        );
    }

    /// Up to [`INLINE_RANGES`] intervals stay in the destination entry;
    /// one more moves the list into the port trie, as prefix blocks, once
    /// for every prefix that has the same list. Both decide alike.
    #[test]
    fn long_port_lists_go_to_the_port_trie_and_decide_alike() {
        let rule = |name: &str, to: &str, ports: &str| {
            format!(
                "[[identity.egress]]\nname = \"{name}\"\nto = [{to}]\nports = [{ports}]\nprotocol = \"udp\"\naction = \"allow\"\n"
            )
        };
        let p = policy(&format!(
            "[[identity]]\nid = \"{WEB}\"\n{}{}",
            rule("four", "\"10.0.0.1\"", "10, 20, 30, \"40-47\""),
            rule(
                "five",
                "\"10.0.0.2\", \"10.0.0.3\"",
                "10, 20, 30, 40, \"50-52\""
            ),
        ));
        assert_eq!(INLINE_RANGES, 4);
        let c = compile(&p, &[(1, id(WEB))]);
        let set = &c.rule_sets[c.slot(1).unwrap().rule_set];
        let udp = |addr: &str| {
            let net: IpNet = format!("{addr}/32").parse().unwrap();
            set.dests.iter().find(|d| d.net == net).unwrap().udp
        };
        assert_eq!(
            (udp("10.0.0.1").count, udp("10.0.0.1").table),
            (4, NO_TABLE)
        );
        assert_eq!((udp("10.0.0.2").count, udp("10.0.0.2").table), (0, 1));
        assert_eq!(udp("10.0.0.3"), udp("10.0.0.2"), "one table for both");
        // 10, 20, 30, 40 and 50-52 as blocks: 50/15 and 52/16.
        assert_eq!(set.ports.len(), 6);
        for (addr, name, ports) in [
            ("10.0.0.1", "four", &[10, 20, 30, 40, 47][..]),
            ("10.0.0.3", "five", &[10, 20, 30, 40, 50, 51, 52][..]),
        ] {
            for &port in ports {
                assert_eq!(decide(&c, addr, port, false), (verdict::ALLOW, name.into()));
            }
            for port in [9, 11, 48, 53] {
                assert_eq!(decide(&c, addr, port, false).1, "default", "{addr}:{port}");
            }
            assert_eq!(decide(&c, addr, 10, true).1, "default", "tcp {addr}");
        }
    }

    /// Three blocks match `agents/coder`, two match `agents/other`, one
    /// matches `web`: at equal prefix, ports and protocol the most
    /// specific block decides, and each setting comes from the most
    /// specific block that sets it.
    #[test]
    fn exact_blocks_outrank_patterns_and_longer_patterns_outrank_shorter() {
        let p = policy(
            r#"
            [[identity]]
            id = "spiffe://example.org/*"
            default = "allow"
            [[identity.egress]]
            name = "td-https"
            to = ["10.0.0.0/8"]
            ports = [443]
            protocol = "tcp"
            action = "allow"
            [[identity.egress]]
            name = "td-narrow"
            to = ["10.1.0.0/16"]
            ports = [443]
            protocol = "tcp"
            action = "deny"

            [[identity]]
            id = "spiffe://example.org/agents/*"
            audit = true
            raw_sockets = true
            [[identity.egress]]
            name = "agents-https"
            to = ["10.0.0.0/8"]
            ports = [443]
            protocol = "tcp"
            action = "deny"

            [[identity]]
            id = "spiffe://example.org/agents/coder"
            default = "deny"
            raw_sockets = false
            [[identity.egress]]
            name = "coder-https"
            to = ["10.0.0.0/8"]
            ports = [443]
            protocol = "tcp"
            action = "allow"
            "#,
        );
        let ids = [
            "spiffe://example.org/agents/coder",
            "spiffe://example.org/agents/other",
            "spiffe://example.org/web",
            "spiffe://example.org/agents",
            "spiffe://other.org/agents/coder",
        ];
        let slots: Vec<(u32, SpiffeId)> = (1..).zip(ids.iter().map(|s| id(s))).collect();
        let c = compile(&p, &slots);
        let at = |slot: u32, addr: &str, port: u16| {
            let (v, rule) = evaluate(&c, slot, addr.parse().unwrap(), port, true);
            let r = &c.rules[rule as usize];
            (v, format!("{}{}", r.owner, r.name))
        };
        let allow = |rule: &str| (verdict::ALLOW, rule.to_owned());
        let deny = |rule: &str| (verdict::DENY, rule.to_owned());
        // The exact block over both patterns, though its rule allows.
        assert_eq!(
            at(1, "10.2.0.1", 443),
            allow("spiffe://example.org/agents/codercoder-https")
        );
        // The longer pattern over the shorter.
        assert_eq!(
            at(2, "10.2.0.1", 443),
            deny("spiffe://example.org/agents/*agents-https")
        );
        assert_eq!(
            at(3, "10.2.0.1", 443),
            allow("spiffe://example.org/*td-https")
        );
        // A pattern does not match the ID before its `/*`.
        assert_eq!(
            at(4, "10.2.0.1", 443),
            allow("spiffe://example.org/*td-https")
        );
        // No block for another trust domain: deny-all.
        assert_eq!(at(5, "10.2.0.1", 443), deny("default"));
        // A longer prefix ranks before the block.
        assert_eq!(
            at(1, "10.1.0.1", 443),
            deny("spiffe://example.org/*td-narrow")
        );
        // Defaults: coder sets deny; other inherits allow from the
        // trust-domain pattern.
        assert_eq!(at(1, "192.0.2.1", 80), deny("default"));
        assert_eq!(at(2, "192.0.2.1", 80), allow("default"));
        let has = |slot: u32, flag: u32| c.slot(slot).unwrap().policy.flags & flag != 0;
        let audit = |slot: u32| has(slot, slot_policy::AUDIT);
        // `audit = true` of agents/* reaches coder, which does not set it.
        assert!(audit(1) && audit(2));
        assert!(!audit(3) && !audit(4) && !audit(5) && !audit(UNKNOWN_SLOT));
        // `raw_sockets = true` of agents/* does not: coder sets false.
        let raw = |slot: u32| has(slot, slot_policy::RAW_SOCKETS);
        assert!(!raw(1) && raw(2));
        assert!(!raw(3) && !raw(4) && !raw(5) && !raw(UNKNOWN_SLOT));
    }

    #[test]
    fn rule_ids_do_not_depend_on_the_bound_identities_and_pattern_members_share_entries() {
        let p = policy(
            r#"
            [unknown]
            [[unknown.egress]]
            name = "dns"
            to = ["127.0.0.53"]
            ports = [53]
            action = "allow"
            [[identity]]
            id = "spiffe://example.org/agents/*"
            [[identity.egress]]
            name = "api"
            to = ["10.0.0.0/8", "fd00::/8"]
            ports = [443]
            action = "allow"
            "#,
        );
        let a = id("spiffe://example.org/agents/a");
        let b = id("spiffe://example.org/agents/b");
        let none = compile(&p, &[]);
        let both = compile(&p, &[(1, a.clone()), (2, b)]);
        assert_eq!(none.rules, both.rules);
        assert_eq!(&*both.rules[1].owner, "unknown");
        assert_eq!(&*both.rules[2].owner, "spiffe://example.org/agents/*");
        let set = both.slot(1).unwrap().rule_set;
        assert_eq!(both.slot(2).unwrap().rule_set, set);
        assert_eq!(both.rule_sets[set].dests.len(), 2);
        // The same rule sets as for one member alone: nothing duplicated.
        assert_eq!(both.rule_sets, compile(&p, &[(1, a)]).rule_sets);
        let (v, rule) = evaluate(&both, 2, "fd00::1".parse().unwrap(), 443, false);
        assert_eq!(
            (v, &*both.rules[rule as usize].name),
            (verdict::ALLOW, "api")
        );
        let (v, rule) = evaluate(
            &both,
            UNKNOWN_SLOT,
            "127.0.0.53".parse().unwrap(),
            53,
            false,
        );
        assert_eq!(
            (v, &*both.rules[rule as usize].name),
            (verdict::ALLOW, "dns")
        );
    }

    #[test]
    fn a_compiler_keeps_the_rule_sets_of_blocks_that_did_not_change() {
        const DB: &str = "spiffe://example.org/db";
        const HTTP: &str = "[[identity.egress]]\nname = \"http\"\nto = [\"10.0.0.0/8\"]\nprotocol = \"tcp\"\naction = \"allow\"\n";
        let dir = crate::policy::testing::PolicyDir::new(&[
            ("a.toml", &format!("[[identity]]\nid = \"{WEB}\"\n{HTTP}")),
            (
                "b.toml",
                &format!("[[identity]]\nid = \"{DB}\"\n{HTTP}ports = [81]\n"),
            ),
        ]);
        let mut reader = crate::policy::Reader::default();
        let slots = [
            (1, WEB.parse().unwrap()),
            (2, DB.parse().unwrap()),
            (3, "spiffe://example.org/none".parse().unwrap()),
        ];
        let mut compiler = Compiler::default();
        let set_of = |c: &CompiledPolicy, slot| c.rule_sets[c.slot(slot).unwrap().rule_set].clone();
        let first = compiler.compile(&reader.load(&dir.path, &[]).unwrap(), &slots);
        let again = compiler.compile(&reader.load(&dir.path, &[]).unwrap(), &slots);
        assert!(Arc::ptr_eq(&set_of(&first, 1), &set_of(&again, 1)));
        assert!(Arc::ptr_eq(&set_of(&first, 2), &set_of(&again, 2)));
        std::fs::write(
            dir.file("b.toml"),
            format!("[[identity]]\nid = \"{DB}\"\n{HTTP}ports = [82]\n"),
        )
        .unwrap();
        let changed = compiler.compile(&reader.load(&dir.path, &[]).unwrap(), &slots);
        assert!(Arc::ptr_eq(&set_of(&first, 1), &set_of(&changed, 1)));
        assert!(!Arc::ptr_eq(&set_of(&first, 2), &set_of(&changed, 2)));
        // The same entries as compiling from nothing.
        let fresh = compile(&reader.load(&dir.path, &[]).unwrap(), &slots);
        assert_eq!(changed, fresh);
        // A set equal to one in use is shared, compiled anew or not: a
        // block without rules and an identity no block names.
        std::fs::write(dir.file("b.toml"), format!("[[identity]]\nid = \"{DB}\"\n")).unwrap();
        let equal = compiler.compile(&reader.load(&dir.path, &[]).unwrap(), &slots);
        assert!(Arc::ptr_eq(&set_of(&equal, 2), &set_of(&equal, 3)));
        assert!(Arc::ptr_eq(&set_of(&first, 3), &set_of(&equal, 3)));
    }

    /// A credential rule is a name rule for its host, on 443 (and 80
    /// with `http`), to the broker: it beats every other name rule of the
    /// identity there, even one of a more specific block, and the host is
    /// a name the identity may look up.
    #[test]
    fn credential_rules_send_their_host_s_https_to_the_broker() {
        let secret = crate::policy::testing::secret_file().display();
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "spiffe://example.org/*"
            [[identity.egress]]
            name = "anthropic-all"
            to = ["*.anthropic.com"]
            action = "allow"
            [[identity.credential]]
            name = "anthropic"
            host = "api.anthropic.com"
            header = "x-api-key"
            secret_file = "{secret}"
            [[identity.credential]]
            name = "openai-td"
            host = "api.openai.com"
            header = "authorization"
            secret_file = "{secret}"
            [[identity]]
            id = "{WEB}"
            [[identity.egress]]
            name = "direct"
            to = ["api.anthropic.com"]
            ports = [443]
            protocol = "tcp"
            action = "allow"
            [[identity.credential]]
            name = "openai"
            host = "api.openai.com"
            kind = "jwt_svid"
            audience = ["openai"]
            http = true
            "#
        ));
        let db = id("spiffe://example.org/db");
        let c = compile(&p, &[(1, id(WEB)), (2, db)]);
        let at = |slot: u32, name: &str, port: u16, tcp: bool| {
            let index = c.names(slot).unwrap();
            let class = index.class_of(name).unwrap();
            let addr = "192.0.2.1".parse().unwrap();
            let (v, rule) = evaluate_learned(&c, slot, addr, &[class.class], port, tcp);
            let r = &c.rules[rule as usize];
            (
                v,
                format!("{}#{}", r.owner, r.name),
                class.pattern.to_owned(),
            )
        };
        let td = "spiffe://example.org/*";
        // The host is a class of its own: its lookups are answered.
        assert_eq!(
            at(1, "api.anthropic.com", 443, true),
            (
                verdict::BROKER,
                format!("{td}#anthropic"),
                "api.anthropic.com".into()
            )
        );
        // UDP to its ports too, which the kernel denies (QUIC falls
        // back to TCP); its other ports are the other rules'.
        assert_eq!(
            at(1, "api.anthropic.com", 443, false),
            (
                verdict::BROKER,
                format!("{td}#anthropic"),
                "api.anthropic.com".into()
            )
        );
        assert_eq!(at(1, "api.anthropic.com", 8443, true).0, verdict::ALLOW);
        assert_eq!(at(1, "api.anthropic.com", 8443, false).0, verdict::ALLOW);
        // Plain HTTP is not brokered without `http`.
        assert_eq!(
            at(1, "api.anthropic.com", 80, true).1,
            format!("{td}#anthropic-all")
        );
        // The exact block's credential for a host beats the pattern's;
        // with `http`, port 80 is brokered too.
        assert_eq!(
            at(1, "api.openai.com", 443, true).1,
            format!("{WEB}#openai")
        );
        assert_eq!(at(1, "api.openai.com", 80, true).0, verdict::BROKER);
        assert_eq!(at(1, "api.openai.com", 81, true).0, verdict::DENY);
        assert_eq!(
            at(2, "api.openai.com", 443, true).1,
            format!("{td}#openai-td")
        );
        assert_eq!(at(2, "api.openai.com", 80, true).0, verdict::DENY);
        let names = |slot: u32| -> Vec<String> {
            c.credentials(slot)
                .unwrap()
                .iter()
                .map(|r| r.name.clone())
                .collect()
        };
        assert_eq!(names(1), ["anthropic", "openai"]);
        assert_eq!(names(2), ["anthropic", "openai-td"]);
        assert!(names(UNKNOWN_SLOT).is_empty());
        // Rule ids: a block's egress rules, then its credential rules.
        let rules: Vec<&str> = c.rules.iter().map(|r| &*r.name).collect();
        assert_eq!(
            rules,
            [
                "default",
                "anthropic-all",
                "anthropic",
                "openai-td",
                "direct",
                "openai"
            ]
        );
        // A credential rule is never an address rule.
        assert_ne!(
            c.slot(1).unwrap().policy.flags & slot_policy::NO_ADDRESS_RULES,
            0
        );
    }

    #[test]
    fn the_credential_rules_of_identities_with_the_same_blocks_are_shared() {
        let secret = crate::policy::testing::secret_file().display();
        let p = policy(&format!(
            "[[identity]]\nid = \"spiffe://example.org/agents/*\"\n[[identity.credential]]\nname = \"api\"\nhost = \"api.x.com\"\nheader = \"x-key\"\nsecret_file = \"{secret}\"\n"
        ));
        let slots = [
            (1, id("spiffe://example.org/agents/a")),
            (2, id("spiffe://example.org/agents/b")),
        ];
        let mut compiler = Compiler::default();
        let first = compiler.compile(&p, &slots);
        let (a, b) = (first.credentials(1).unwrap(), first.credentials(2).unwrap());
        assert!(Arc::ptr_eq(a, b));
        assert_eq!(a[0].host.as_str(), "api.x.com");
        let again = compiler.compile(&p, &slots);
        assert!(Arc::ptr_eq(a, again.credentials(1).unwrap()));
        assert!(first.credentials(3).is_none());
    }
}
