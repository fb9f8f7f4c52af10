//! Which blocks apply to an identity, and which of their rules decides
//! each connect: the precedence, shared by the compiler and the checks.
//!
//! An identity gets the rules of every block that matches it: its exact
//! block and each pattern it falls under. For one destination address,
//! port and transport, the rules that cover it rank by, in order:
//! 1. the longer destination prefix;
//! 2. the narrower port range (fewer ports);
//! 3. a rule for one protocol over a rule for `any`;
//! 4. the more specific block: the exact ID, then the longer pattern;
//! 5. `deny` over `allow`;
//! 6. the rule written first (only rules of one block can tie this far,
//!    and such ties are reported by the checks).
//!
//! Rules for DNS names are read only when no address rule covers the
//! connect; among the name rules that cover one name, the steps are the
//! same but the first, and before them all a credential rule for the name
//! (which sends its ports to the broker) beats every other rule.
//!
//! An identity's credential rules are, per host, those of the most
//! specific block that has one for it.
//!
//! When no rule covers a connect, the identity's `default` decides. It,
//! `audit` and `raw_sockets` come from the most specific block that sets
//! them; unset, they are `deny`, the global mode and `false`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};

use super::model::{
    Action, CredentialRule, EgressRule, IdentityPolicy, Mode, PolicySet, Protocol, Serial,
};
use super::names::NamePattern;
use super::subject::{Specificity, Subject, pattern_bases};
use crate::hashing::{FastMap, FastSet};
use crate::identity::SpiffeId;

/// What a rule id stands for, for events and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// The block whose rule it is: its `id` as written, or `unknown`.
    pub owner: Arc<str>,
    pub name: Arc<str>,
}

impl RuleInfo {
    /// What [`DEFAULT_RULE_ID`] stands for.
    pub fn default_rule() -> Self {
        Self {
            owner: "".into(),
            name: "default".into(),
        }
    }
}

/// What every rule id of a compiled policy stands for. Kept as each
/// block's own list, shared with the compiler and with the next policy's
/// table wherever the block is the same parse: a new table costs one
/// entry per block, not one per rule.
#[derive(Debug, Clone, Default)]
pub struct RuleTable {
    /// The first rule id of each list, ascending, and the list: each
    /// starts where the one before ends, none is empty.
    parts: Arc<[(u32, Arc<[RuleInfo]>)]>,
}

impl RuleTable {
    /// The table of `parts` (first rule id, infos from it on), in order;
    /// empty parts are left out.
    pub fn new(parts: impl IntoIterator<Item = (u32, Arc<[RuleInfo]>)>) -> Self {
        let parts: Vec<_> = parts.into_iter().filter(|(_, i)| !i.is_empty()).collect();
        debug_assert!(
            parts
                .windows(2)
                .all(|w| w[0].0 + w[0].1.len() as u32 == w[1].0)
        );
        Self {
            parts: parts.into(),
        }
    }

    /// What rule id `id` stands for.
    pub fn get(&self, id: usize) -> Option<&RuleInfo> {
        let id = u32::try_from(id).ok()?;
        let part = self.parts.partition_point(|(first, _)| *first <= id);
        let (first, infos) = &self.parts[part.checked_sub(1)?];
        infos.get((id - first) as usize)
    }

    /// How many rule ids it names, the default's included.
    pub fn len(&self) -> usize {
        self.parts
            .last()
            .map_or(0, |(first, infos)| *first as usize + infos.len())
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Every rule id's info, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &RuleInfo> {
        self.parts.iter().flat_map(|(_, infos)| infos.iter())
    }
}

impl From<Vec<RuleInfo>> for RuleTable {
    /// A table of rule ids from 0, in order.
    fn from(infos: Vec<RuleInfo>) -> Self {
        Self::new([(0, infos.into())])
    }
}

impl std::ops::Index<usize> for RuleTable {
    type Output = RuleInfo;

    fn index(&self, id: usize) -> &RuleInfo {
        self.get(id)
            .unwrap_or_else(|| panic!("rule id {id} is not in the table"))
    }
}

/// Tables are equal when every id stands for the same, however they are
/// split.
impl PartialEq for RuleTable {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for RuleTable {}

/// Rule id reported for a decision by an identity's default.
pub const DEFAULT_RULE_ID: u32 = 0;

/// How many rule ids a block's rules take: one per egress rule, then one
/// per credential rule.
fn rule_count(policy: &IdentityPolicy) -> u32 {
    (policy.egress.len() + policy.credentials.len()) as u32
}

/// Index of the unknown-workload policy among [`Blocks`].
pub const UNKNOWN_BLOCK: usize = 0;

/// One block of the policy, as the precedence sees it.
pub struct Block<'a> {
    /// `None` for the unknown-workload policy.
    pub subject: Option<&'a Subject>,
    pub policy: &'a IdentityPolicy,
    pub specificity: Specificity,
    /// The id of its first rule; the others follow in order.
    pub first_rule: u32,
    /// Its parse, for the unknown-workload policy `None`.
    pub serial: Option<Serial>,
}

/// Every block of a policy (the unknown-workload policy first), its rule
/// ids, and an index to find the blocks that match an identity.
pub struct Blocks<'a> {
    mode: Mode,
    list: Vec<Block<'a>>,
    /// Exact IDs, made when first asked for: checking a policy needs only
    /// the patterns.
    exact: std::cell::OnceCell<FastMap<&'a str, usize>>,
    /// Patterns by the ID before their `/*`.
    patterns: FastMap<&'a str, usize>,
    /// Whether some pattern has a base of each length (by length): an
    /// ancestor of an ID whose length no base has is not looked up, so
    /// finding the blocks of an identity hashes none of its ancestors in
    /// a policy with few patterns.
    base_lengths: Vec<bool>,
}

/// The settings an identity ends up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub default: Action,
    pub audit: bool,
    pub raw_sockets: bool,
}

/// What the rule that decides a connect does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allow,
    Deny,
    /// Sends it to the agent's egress broker (a credential rule).
    Broker,
}

impl From<Action> for Outcome {
    fn from(a: Action) -> Self {
        match a {
            Action::Allow => Self::Allow,
            Action::Deny => Self::Deny,
        }
    }
}

/// One rule for one destination network, as the precedence ranks it.
/// A rule for a name has [`NAME_NET`]: the same for every name rule, so
/// the prefix step ties among them.
#[derive(Debug, Clone)]
pub struct FlatRule {
    pub id: u32,
    pub net: IpNet,
    pub ports: Vec<(u16, u16)>,
    pub protocol: Protocol,
    pub outcome: Outcome,
    pub specificity: Specificity,
}

/// A credential rule as an identity gets it: with its rule id and its
/// block's specificity.
#[derive(Debug, Clone, Copy)]
pub struct Credential<'a> {
    pub id: u32,
    pub rule: &'a CredentialRule,
    pub specificity: Specificity,
}

impl<'a> Credential<'a> {
    /// Its rule for its host: its ports, to the broker. UDP too, which
    /// the kernel denies for a broker verdict (QUIC falls back to TCP).
    pub fn name_rule(&self) -> (&'a NamePattern, FlatRule) {
        let rule = FlatRule {
            id: self.id,
            net: NAME_NET,
            ports: self.rule.ports(),
            protocol: Protocol::Any,
            outcome: Outcome::Broker,
            specificity: self.specificity,
        };
        (&self.rule.host, rule)
    }
}

/// The net of every name rule's [`FlatRule`].
pub const NAME_NET: IpNet = IpNet::V4(Ipv4Net::new_assert(std::net::Ipv4Addr::UNSPECIFIED, 0));

impl FlatRule {
    fn new(id: u32, net: IpNet, rule: &EgressRule, specificity: Specificity) -> Self {
        Self {
            id,
            net,
            ports: rule.port_ranges(),
            protocol: rule.protocol,
            outcome: rule.action.into(),
            specificity,
        }
    }
}

/// A port interval and the rule that decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interval {
    pub first: u16,
    pub last: u16,
    pub outcome: Outcome,
    pub rule: u32,
}

/// One destination prefix and, per transport, which rule decides which
/// ports there (disjoint intervals; ports in none go to the default).
/// The rules of less specific prefixes are folded in, so the longest
/// prefix that contains an address is the whole answer for it.
#[derive(Debug, Clone)]
pub struct Decided {
    pub net: IpNet,
    pub tcp: Vec<Interval>,
    pub udp: Vec<Interval>,
}

impl Block<'_> {
    /// `unknown`, or the block's `id` as written.
    pub fn owner(&self) -> String {
        self.subject
            .map_or_else(|| "unknown".to_owned(), Subject::to_string)
    }
}

impl<'a> Blocks<'a> {
    pub fn new(policy: &'a PolicySet) -> Self {
        let mut list = vec![Block {
            subject: None,
            policy: &policy.unknown,
            specificity: Specificity::Exact,
            first_rule: DEFAULT_RULE_ID + 1,
            serial: None,
        }];
        let mut patterns = FastMap::default();
        let mut base_lengths = Vec::new();
        for block in &policy.identities {
            let last = &list[list.len() - 1];
            let first_rule = last.first_rule + rule_count(last.policy);
            if let Subject::Pattern(base) = &block.subject {
                patterns.entry(base.as_str()).or_insert(list.len());
                let length = base.as_str().len();
                if base_lengths.len() <= length {
                    base_lengths.resize(length + 1, false);
                }
                base_lengths[length] = true;
            }
            list.push(Block {
                subject: Some(&block.subject),
                policy: &block.policy,
                specificity: block.subject.specificity(),
                first_rule,
                serial: Some(block.serial),
            });
        }
        Self {
            mode: policy.mode,
            list,
            exact: std::cell::OnceCell::new(),
            patterns,
            base_lengths,
        }
    }

    /// The block of each exact ID (the first, if one has two).
    fn exact(&self) -> &FastMap<&'a str, usize> {
        self.exact.get_or_init(|| {
            let mut exact = FastMap::with_capacity_and_hasher(self.list.len(), Default::default());
            for (i, block) in self.list.iter().enumerate() {
                if let Some(Subject::Exact(id)) = block.subject {
                    exact.entry(id.as_str()).or_insert(i);
                }
            }
            exact
        })
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn get(&self, block: usize) -> &Block<'a> {
        &self.list[block]
    }

    /// The patterns that match `id`, least specific first.
    fn patterns_over<'s>(&'s self, id: &'s SpiffeId) -> impl Iterator<Item = usize> + 's {
        pattern_bases(id)
            .filter(|base| self.base_lengths.get(base.len()) == Some(&true))
            .filter_map(|base| self.patterns.get(base).copied())
    }

    /// Puts the blocks that apply to `id` in `out`, least specific
    /// first.
    pub fn for_identity_into(&self, id: &SpiffeId, out: &mut Vec<usize>) {
        out.extend(self.patterns_over(id));
        out.extend(self.exact().get(id.as_str()).copied());
    }

    /// Puts in `out` what the entries of an identity the blocks `which`
    /// apply to are made of, whatever policy the blocks are in: each
    /// block's parse and its first rule id. `false` (and `out` cleared)
    /// for the unknown-workload policy's, which has no parse of its own.
    pub fn key_into(&self, which: &[usize], out: &mut Vec<(Serial, u32)>) -> bool {
        out.clear();
        for &b in which {
            let Some(serial) = self.list[b].serial else {
                out.clear();
                return false;
            };
            out.push((serial, self.list[b].first_rule));
        }
        true
    }

    /// `block` and the blocks that apply to every identity it applies to,
    /// least specific first: what its rules always rank against.
    pub fn context(&self, block: usize) -> Vec<usize> {
        let over = match self.list[block].subject {
            None => Vec::new(),
            Some(Subject::Exact(id) | Subject::Pattern(id)) => self.patterns_over(id).collect(),
        };
        over.into_iter().chain([block]).collect()
    }

    /// Puts in `out` the parse ([`Serial`]) of each block of
    /// [`Self::context`]`(block)`, in its order: what the block's overlap
    /// checks are about. `false` for the unknown-workload policy's, which
    /// has no parse of its own.
    pub fn context_key_into(&self, block: usize, out: &mut Vec<Serial>) -> bool {
        out.clear();
        let Some(serial) = self.list[block].serial else {
            return false;
        };
        if let Some(Subject::Exact(id) | Subject::Pattern(id)) = self.list[block].subject {
            out.extend(self.patterns_over(id).filter_map(|p| self.list[p].serial));
        }
        out.push(serial);
        true
    }

    /// The block of an egress rule's id, and the rule.
    pub fn rule(&self, id: u32) -> (&Block<'a>, &'a EgressRule) {
        let block = &self.list[self.list.partition_point(|b| b.first_rule <= id) - 1];
        (
            block,
            &block.policy.egress[(id - block.first_rule) as usize],
        )
    }

    /// What the rule ids of block `b` stand for, in order from its first:
    /// its egress rules, then its credential rules.
    pub fn block_rule_infos(&self, b: usize) -> Vec<RuleInfo> {
        let block = &self.list[b];
        let owner: Arc<str> = block.owner().into();
        let policy = block.policy;
        let egress = policy.egress.iter().map(|r| &r.name);
        let credentials = policy.credentials.iter().map(|c| &c.name);
        egress
            .chain(credentials)
            .map(|name| RuleInfo {
                owner: owner.clone(),
                name: name.as_str().into(),
            })
            .collect()
    }

    /// The credential rules of an identity the blocks `which` apply to
    /// (least specific first): for each host, the rule of the most
    /// specific block that has one, in the order of the blocks and their
    /// rules.
    pub fn credentials(&self, which: &[usize]) -> Vec<Credential<'a>> {
        let mut hosts: FastSet<&NamePattern> = FastSet::default();
        let mut out = Vec::new();
        for &b in which.iter().rev() {
            let block = &self.list[b];
            let first = block.first_rule + block.policy.egress.len() as u32;
            for (id, rule) in (first..).zip(&block.policy.credentials) {
                if hosts.insert(&rule.host) {
                    out.push(Credential {
                        id,
                        rule,
                        specificity: block.specificity,
                    });
                }
            }
        }
        out.sort_by_key(|c| c.id);
        out
    }

    /// The settings of an identity the blocks `which` apply to (least
    /// specific first).
    pub fn settings(&self, which: &[usize]) -> Settings {
        Settings {
            default: self
                .most_specific(which, |p| p.default)
                .unwrap_or(Action::Deny),
            audit: self
                .most_specific(which, |p| p.audit)
                .unwrap_or(self.mode == Mode::Audit),
            raw_sockets: self
                .most_specific(which, |p| p.raw_sockets)
                .unwrap_or(false),
        }
    }

    /// A setting as the most specific of the blocks `which` that sets it
    /// has it.
    fn most_specific<T>(
        &self,
        which: &[usize],
        get: impl Fn(&IdentityPolicy) -> Option<T>,
    ) -> Option<T> {
        which.iter().rev().find_map(|&b| get(self.list[b].policy))
    }

    /// The rules of the blocks `which`, one per destination network.
    pub fn rules(&self, which: &[usize]) -> Vec<FlatRule> {
        self.each_rule(which)
            .flat_map(|(id, rule, specificity)| {
                rule.nets()
                    .map(move |net| FlatRule::new(id, net, rule, specificity))
            })
            .collect()
    }

    /// The rules of the blocks `which` for names, one per name pattern,
    /// each with [`NAME_NET`].
    pub fn name_rules(&self, which: &[usize]) -> Vec<(&'a NamePattern, FlatRule)> {
        self.each_rule(which)
            .flat_map(|(id, rule, specificity)| {
                rule.names()
                    .map(move |name| (name, FlatRule::new(id, NAME_NET, rule, specificity)))
            })
            .collect()
    }

    /// Every rule of the blocks `which`, with its id and its block's
    /// specificity.
    fn each_rule<'s>(
        &'s self,
        which: &'s [usize],
    ) -> impl Iterator<Item = (u32, &'a EgressRule, Specificity)> + 's {
        which.iter().flat_map(|&b| {
            let block = &self.list[b];
            (block.first_rule..)
                .zip(&block.policy.egress)
                .map(|(id, rule)| (id, rule, block.specificity))
        })
    }
}

/// For every destination prefix of `rules`, the winner of every port and
/// transport. Sorted so that a prefix comes before the prefixes inside it,
/// which follow it contiguously.
pub fn decide(rules: &[FlatRule]) -> Vec<Decided> {
    let mut by_net: BTreeMap<IpNet, Vec<&FlatRule>> = BTreeMap::new();
    for r in rules {
        by_net.entry(r.net).or_default().push(r);
    }
    let mut out = Vec::with_capacity(by_net.len());
    // The enclosing prefixes of the current one, with their own rules.
    let mut enclosing: Vec<(IpNet, Vec<&FlatRule>)> = Vec::new();
    for (net, own) in by_net {
        while enclosing
            .last()
            .is_some_and(|(outer, _)| !outer.contains(&net))
        {
            enclosing.pop();
        }
        let applicable: Vec<&FlatRule> = enclosing
            .iter()
            .flat_map(|(_, rules)| rules.iter().copied())
            .chain(own.iter().copied())
            .collect();
        out.push(Decided {
            net,
            tcp: resolve(&applicable, Protocol::Tcp),
            udp: resolve(&applicable, Protocol::Udp),
        });
        enclosing.push((net, own));
    }
    out
}

/// The winner of every port, as disjoint intervals, among rules that all
/// cover one destination prefix, for one transport.
fn resolve(rules: &[&FlatRule], transport: Protocol) -> Vec<Interval> {
    type Rank = (
        bool,
        u8,
        Reverse<u32>,
        bool,
        Specificity,
        bool,
        Reverse<u32>,
    );
    struct Candidate {
        first: u32,
        last: u32,
        rank: Rank,
        outcome: Outcome,
        id: u32,
    }
    let mut candidates = Vec::new();
    for r in rules.iter().filter(|r| r.protocol.covers(transport)) {
        for &(first, last) in &r.ports {
            let (first, last) = (u32::from(first), u32::from(last));
            candidates.push(Candidate {
                first,
                last,
                rank: (
                    r.outcome == Outcome::Broker,
                    r.net.prefix_len(),
                    Reverse(last - first),
                    r.protocol != Protocol::Any,
                    r.specificity,
                    r.outcome == Outcome::Deny,
                    Reverse(r.id),
                ),
                outcome: r.outcome,
                id: r.id,
            });
        }
    }
    let bounds: BTreeSet<u32> = candidates
        .iter()
        .flat_map(|c| [c.first, c.last + 1])
        .collect();
    let bounds: Vec<u32> = bounds.into_iter().collect();
    let mut out: Vec<Interval> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let Some(win) = candidates
            .iter()
            .filter(|c| c.first <= lo && hi <= c.last)
            .max_by_key(|c| c.rank)
        else {
            continue;
        };
        match out.last_mut() {
            Some(last) if u32::from(last.last) + 1 == lo && last.rule == win.id => {
                last.last = hi as u16;
            }
            _ => out.push(Interval {
                first: lo as u16,
                last: hi as u16,
                outcome: win.outcome,
                rule: win.id,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::policy;

    #[test]
    fn a_rule_table_finds_each_id_in_its_part_however_it_is_split() {
        let info = |name: &str| RuleInfo {
            owner: "o".into(),
            name: name.into(),
        };
        let part = |first: u32, names: &[&str]| -> (u32, Arc<[RuleInfo]>) {
            (first, names.iter().map(|n| info(n)).collect())
        };
        let split = RuleTable::new([
            part(0, &["default"]),
            part(1, &[]),
            part(1, &["a", "b"]),
            part(3, &["c"]),
        ]);
        let whole = RuleTable::from(vec![info("default"), info("a"), info("b"), info("c")]);
        assert_eq!(split, whole);
        assert_eq!(split.len(), 4);
        let names: Vec<&str> = (0..4).map(|id| &*split[id].name).collect();
        assert_eq!(names, ["default", "a", "b", "c"]);
        assert!(split.get(4).is_none());
        assert!(RuleTable::default().get(0).is_none());
        assert_ne!(split, RuleTable::from(vec![info("default"), info("a")]));
    }

    fn rule(id: u32, ports: (u16, u16), protocol: Protocol, action: Action) -> FlatRule {
        FlatRule {
            id,
            net: "10.0.0.0/8".parse().unwrap(),
            ports: vec![ports],
            protocol,
            outcome: action.into(),
            specificity: Specificity::Exact,
        }
    }

    fn winners(rules: &[FlatRule]) -> Vec<(u16, u16, u32)> {
        let decided = decide(rules);
        assert_eq!(decided.len(), 1);
        decided[0]
            .tcp
            .iter()
            .map(|i| (i.first, i.last, i.rule))
            .collect()
    }

    /// Ties this far only happen within one block, where the checks
    /// refuse them (a conflict) or report the later rule (never matches);
    /// still, the compiler decides them fail-closed and deterministically.
    #[test]
    fn full_ties_go_to_deny_then_to_the_rule_written_first() {
        use Action::{Allow, Deny};
        let tcp = Protocol::Tcp;
        assert_eq!(
            winners(&[rule(1, (80, 89), tcp, Allow), rule(2, (85, 94), tcp, Deny)]),
            [(80, 84, 1), (85, 94, 2)]
        );
        assert_eq!(
            winners(&[rule(1, (80, 89), tcp, Allow), rule(2, (85, 94), tcp, Allow)]),
            [(80, 89, 1), (90, 94, 2)]
        );
        // Earlier steps come first: narrower ports, then the protocol.
        assert_eq!(
            winners(&[
                rule(1, (80, 80), Protocol::Any, Allow),
                rule(2, (80, 81), tcp, Deny)
            ]),
            [(80, 80, 1), (81, 81, 2)]
        );
        assert_eq!(
            winners(&[
                rule(1, (80, 81), Protocol::Any, Deny),
                rule(2, (80, 81), tcp, Allow)
            ]),
            [(80, 81, 2)]
        );
    }

    #[test]
    fn rule_ids_follow_the_blocks_in_order() {
        let p = policy(
            r#"
            [[unknown.egress]]
            name = "u"
            to = ["10.0.0.1"]
            action = "allow"
            [[identity]]
            id = "spiffe://example.org/empty"
            [[identity]]
            id = "spiffe://example.org/web"
            [[identity.egress]]
            name = "w1"
            to = ["10.0.0.1"]
            action = "allow"
            [[identity.egress]]
            name = "w2"
            to = ["10.0.0.2"]
            action = "allow"
            "#,
        );
        let blocks = Blocks::new(&p);
        let infos = crate::policy::compile(&p, &[]).rules;
        let names: Vec<(&str, &str)> = infos.iter().map(|r| (&*r.owner, &*r.name)).collect();
        assert_eq!(
            names,
            [
                ("", "default"),
                ("unknown", "u"),
                ("spiffe://example.org/web", "w1"),
                ("spiffe://example.org/web", "w2")
            ]
        );
        for (id, info) in infos.iter().enumerate().skip(1) {
            let (block, rule) = blocks.rule(id as u32);
            assert_eq!(
                (block.owner().as_str(), rule.name.as_str()),
                (&*info.owner, &*info.name)
            );
        }
    }
}
