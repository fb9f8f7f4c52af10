//! Compiles a policy for a set of identity slots into map entries.
//!
//! Precedence, for one identity and one destination address, port and
//! protocol (the most specific rule wins; see `docs/policy.md`):
//! 1. the longer destination prefix;
//! 2. then the narrower port range (fewer ports);
//! 3. then a rule for one protocol over a rule for `any`;
//! 4. then `deny` over `allow`.
//!
//! The kernel does no such ranking: for each destination prefix the
//! compiler folds in the rules of every less specific prefix, and splits
//! the port space into disjoint intervals each with one winner, so the
//! kernel's longest-prefix match on address, then on port, is the answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use idgate_common::{SlotPolicy, UNKNOWN_SLOT, slot_policy, verdict};
use ipnet::IpNet;

use super::model::{Action, Destination, IdentityPolicy, Mode, PolicySet, Protocol};
use super::ports;
use crate::identity::SpiffeId;

/// Rule id reported for a decision by an identity's default.
pub const DEFAULT_RULE_ID: u32 = 0;

/// What a rule id stands for, for events and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// The identity (or `unknown`) whose rule it is.
    pub owner: String,
    pub name: String,
}

/// A destination-trie entry: `(slot, address prefix)` -> port tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestEntry {
    pub slot: u32,
    pub net: IpNet,
    pub tcp_table: u32,
    pub udp_table: u32,
}

/// A port-trie entry: `(table, port block)` -> verdict and rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEntry {
    pub table: u32,
    pub port: u16,
    /// Bits of the port matched, 0-16.
    pub prefix_len: u32,
    pub verdict: u32,
    pub rule_id: u32,
}

/// Everything one policy generation writes into the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub slots: Vec<(u32, SlotPolicy)>,
    pub dests: Vec<DestEntry>,
    pub ports: Vec<PortEntry>,
    /// Indexed by rule id; id 0 is the default.
    pub rules: Vec<RuleInfo>,
}

/// One rule for one destination network, as the compiler ranks it.
#[derive(Debug, Clone)]
struct FlatRule {
    id: u32,
    net: IpNet,
    ports: Vec<(u16, u16)>,
    protocol: Protocol,
    verdict: u32,
}

/// Compiles `policy` for the bound identities in `slots` (slot, id). The
/// unknown-workload policy goes to [`UNKNOWN_SLOT`]. An identity with no
/// policy block gets deny-all.
pub fn compile(policy: &PolicySet, slots: &[(u32, SpiffeId)]) -> CompiledPolicy {
    let mut out = CompiledPolicy {
        rules: vec![RuleInfo {
            owner: String::new(),
            name: "default".into(),
        }],
        ..Default::default()
    };
    let mut tables = TableInterner::default();
    let deny_all = IdentityPolicy::default();

    let mut targets: Vec<(u32, String, &IdentityPolicy)> =
        vec![(UNKNOWN_SLOT, "unknown".into(), &policy.unknown)];
    for (slot, id) in slots {
        let p = policy
            .identities
            .iter()
            .find(|(pid, _)| pid == id)
            .map_or(&deny_all, |(_, p)| p);
        targets.push((*slot, id.to_string(), p));
    }

    for (slot, owner, p) in targets {
        let audit = p.audit.unwrap_or(policy.mode == Mode::Audit);
        let flags = slot_policy::PRESENT | if audit { slot_policy::AUDIT } else { 0 };
        out.slots.push((
            slot,
            SlotPolicy {
                default_verdict: verdict_of(p.default),
                default_rule: DEFAULT_RULE_ID,
                flags,
            },
        ));
        let mut flat = Vec::new();
        for rule in &p.egress {
            let id = out.rules.len() as u32;
            out.rules.push(RuleInfo {
                owner: owner.clone(),
                name: rule.name.clone(),
            });
            let ports: Vec<(u16, u16)> = if rule.ports.is_empty() {
                vec![(0, u16::MAX)]
            } else {
                rule.ports.iter().map(|p| (p.first, p.last)).collect()
            };
            for dest in &rule.to {
                let nets: Vec<IpNet> = match dest {
                    Destination::Any => vec![
                        "0.0.0.0/0".parse().expect("valid"),
                        "::/0".parse().expect("valid"),
                    ],
                    Destination::Net(n) => vec![*n],
                };
                for net in nets {
                    flat.push(FlatRule {
                        id,
                        net,
                        ports: ports.clone(),
                        protocol: rule.protocol,
                        verdict: verdict_of(rule.action),
                    });
                }
            }
        }
        let mut by_net: HashMap<IpNet, Vec<&FlatRule>> = HashMap::new();
        for r in &flat {
            by_net.entry(r.net).or_default().push(r);
        }
        let prefixes: BTreeSet<IpNet> = by_net.keys().copied().collect();
        for net in prefixes {
            // The rules that apply within `net`: its own and those of every
            // less specific prefix, found by walking up its prefix lengths
            // (at most 129 lookups, however many rules there are).
            let applicable: Vec<&FlatRule> = (0..=net.prefix_len())
                .filter_map(|len| IpNet::new(net.network(), len).ok())
                .filter_map(|n| by_net.get(&n.trunc()))
                .flatten()
                .copied()
                .collect();
            let tcp = tables.intern(resolve(&applicable, Protocol::Tcp));
            let udp = tables.intern(resolve(&applicable, Protocol::Udp));
            out.dests.push(DestEntry {
                slot,
                net,
                tcp_table: tcp,
                udp_table: udp,
            });
        }
    }
    out.ports = tables.into_entries();
    out
}

fn verdict_of(a: Action) -> u32 {
    match a {
        Action::Allow => verdict::ALLOW,
        Action::Deny => verdict::DENY,
    }
}

/// A disjoint port interval and the rule that decides it.
type Interval = (u16, u16, u32, u32); // first, last, verdict, rule id

/// The winner for every port, as disjoint intervals, from the rules that
/// apply to one destination prefix and protocol.
fn resolve(rules: &[&FlatRule], proto: Protocol) -> Vec<Interval> {
    struct Candidate {
        first: u32,
        last: u32,
        rank: (u8, std::cmp::Reverse<u32>, bool, bool),
        verdict: u32,
        id: u32,
    }
    let mut cands = Vec::new();
    for r in rules {
        if r.protocol != proto && r.protocol != Protocol::Any {
            continue;
        }
        for &(first, last) in &r.ports {
            let (first, last) = (u32::from(first), u32::from(last));
            cands.push(Candidate {
                first,
                last,
                rank: (
                    r.net.prefix_len(),
                    std::cmp::Reverse(last - first),
                    r.protocol != Protocol::Any,
                    r.verdict == verdict::DENY,
                ),
                verdict: r.verdict,
                id: r.id,
            });
        }
    }
    let mut bounds: BTreeSet<u32> = BTreeSet::new();
    for c in &cands {
        bounds.insert(c.first);
        bounds.insert(c.last + 1);
    }
    let bounds: Vec<u32> = bounds.into_iter().collect();
    let mut out: Vec<Interval> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let Some(win) = cands
            .iter()
            .filter(|c| c.first <= lo && hi <= c.last)
            .max_by(|a, b| a.rank.cmp(&b.rank).then(b.id.cmp(&a.id)))
        else {
            continue;
        };
        match out.last_mut() {
            Some(last)
                if u32::from(last.1) + 1 == lo && last.2 == win.verdict && last.3 == win.id =>
            {
                last.1 = hi as u16;
            }
            _ => out.push((lo as u16, hi as u16, win.verdict, win.id)),
        }
    }
    out
}

/// Gives each distinct interval list one table id (ids from 1).
#[derive(Default)]
struct TableInterner {
    ids: HashMap<Vec<Interval>, u32>,
    order: BTreeMap<u32, Vec<Interval>>,
}

impl TableInterner {
    fn intern(&mut self, intervals: Vec<Interval>) -> u32 {
        if intervals.is_empty() {
            return idgate_common::NO_TABLE;
        }
        let next = self.ids.len() as u32 + 1;
        let id = *self.ids.entry(intervals.clone()).or_insert(next);
        self.order.entry(id).or_insert(intervals);
        id
    }

    fn into_entries(self) -> Vec<PortEntry> {
        let mut out = Vec::new();
        for (table, intervals) in self.order {
            for (first, last, verdict, rule_id) in intervals {
                for (port, prefix_len) in ports::blocks(first, last) {
                    out.push(PortEntry {
                        table,
                        port,
                        prefix_len,
                        verdict,
                        rule_id,
                    });
                }
            }
        }
        out
    }
}

/// What the compiled entries decide for one connect, as the kernel would:
/// longest address prefix, then longest port block, then the default. Used
/// by tests and by `explain`.
pub fn evaluate(c: &CompiledPolicy, slot: u32, addr: IpAddr, port: u16, tcp: bool) -> (u32, u32) {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    let Some((_, sp)) = c.slots.iter().find(|(s, _)| *s == slot) else {
        return (verdict::DENY, DEFAULT_RULE_ID);
    };
    let default = (sp.default_verdict, sp.default_rule);
    let Some(dest) = c
        .dests
        .iter()
        .filter(|d| d.slot == slot && d.net.contains(&addr))
        .max_by_key(|d| d.net.prefix_len())
    else {
        return default;
    };
    let table = if tcp { dest.tcp_table } else { dest.udp_table };
    c.ports
        .iter()
        .filter(|p| {
            p.table == table && {
                let span = 1u32 << (16 - p.prefix_len);
                (u32::from(p.port)..u32::from(p.port) + span).contains(&u32::from(port))
            }
        })
        .max_by_key(|p| p.prefix_len)
        .map_or(default, |p| (p.verdict, p.rule_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> PolicySet {
        let dir = std::env::temp_dir().join(format!(
            "idgate-compile-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.toml");
        std::fs::write(&f, text).unwrap();
        let p = super::super::load(&f, &[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        p
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    const WEB: &str = "spiffe://example.org/web";

    fn decide(c: &CompiledPolicy, addr: &str, port: u16, tcp: bool) -> (u32, String) {
        let (v, rule) = evaluate(c, 1, addr.parse().unwrap(), port, tcp);
        (v, c.rules[rule as usize].name.clone())
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
    fn narrower_ports_then_protocol_then_deny_win() {
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
        assert_eq!(c.dests.len(), 2);
        let tables: BTreeSet<u32> = c.dests.iter().map(|d| d.tcp_table).collect();
        assert_eq!(tables.len(), 2, "rules a and b differ by rule id");
        let unknown = c.slots.iter().find(|(s, _)| *s == UNKNOWN_SLOT).unwrap().1;
        assert_eq!(unknown.default_verdict, verdict::DENY);
        assert_ne!(unknown.flags & slot_policy::AUDIT, 0);
        // An identity without a block is deny-all.
        assert_eq!(
            evaluate(&c, 2, "127.0.0.1".parse().unwrap(), 1, true).0,
            verdict::DENY
        );
    }
}
