//! Checks of how rules overlap: rules that tie (conflicts), and rules that
//! can never match because others decide everything they cover. Both are
//! about addresses; name rules only allow, so they never conflict.

use std::collections::{BTreeSet, HashMap, HashSet};

use ipnet::IpNet;

use super::diagnostic::Diagnostic;
use super::model::{Action, EgressRule, PolicySet, Protocol, Serial};
use super::precedence::{Blocks, Decided, decide};
use super::summary::{describe_ports, protocol_text};
use crate::hashing::FastMap;

/// How many deciding rules a "never matches" report names.
const NAMED: usize = 3;

/// The blocks (by [`Serial`], least specific first) whose rules were
/// checked together and found neither conflicting nor never matching,
/// each with the last check that found it: kept from one check to the
/// next, so a context found clean again costs one lookup, not a copy.
#[derive(Default)]
pub struct Clean {
    contexts: FastMap<Vec<Serial>, u64>,
    /// Checks so far.
    round: u64,
}

/// Adds a diagnostic for every conflict and every rule that can never
/// match. A rule named in a conflict is not reported again as never
/// matching.
///
/// A block is checked against the blocks that rank with it (its
/// context); a context in `clean` (found clean by an earlier check of the
/// same parses) is not checked again. Afterwards `clean` holds the
/// contexts found clean now.
pub fn check(policy: &PolicySet, clean: &mut Clean, diagnostics: &mut Vec<Diagnostic>) {
    let blocks = Blocks::new(policy);
    clean.round += 1;
    let round = clean.round;
    let mut key = Vec::new();
    for b in 0..blocks.len() {
        let rules = &blocks.get(b).policy.egress;
        if rules.is_empty() {
            continue;
        }
        // The unknown-workload policy has no parse of its own: no key.
        let keyed = blocks.context_key_into(b, &mut key);
        if keyed && let Some(used) = clean.contexts.get_mut(key.as_slice()) {
            *used = round;
            continue;
        }
        let before = diagnostics.len();
        let conflicting = conflicts(rules, diagnostics);
        never_matching(&blocks, b, &conflicting, diagnostics);
        if keyed && diagnostics.len() == before {
            clean.contexts.insert(key.clone(), round);
        }
    }
    clean.contexts.retain(|_, used| *used == round);
}

/// Reports each rule of block `b` that wins nowhere against the rules
/// that apply wherever it applies, except those in `conflicting`.
fn never_matching(
    blocks: &Blocks,
    b: usize,
    conflicting: &HashSet<usize>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let block = blocks.get(b);
    let rules = &block.policy.egress;
    let context = blocks.context(b);
    let decided = decide(&blocks.rules(&context));
    let reachable = reachable(&decided);
    let winners: HashSet<u32> = decided
        .iter()
        .zip(&reachable)
        .filter(|(_, r)| **r)
        .flat_map(|(d, _)| d.tcp.iter().chain(&d.udp).map(|i| i.rule))
        .collect();
    for (i, rule) in rules.iter().enumerate() {
        let id = block.first_rule + i as u32;
        // A rule that names hosts matches by them, whatever its addresses.
        if winners.contains(&id) || conflicting.contains(&i) || rule.names().next().is_some() {
            continue;
        }
        let deciders: Vec<String> = deciders(rule, &decided, &reachable)
            .into_iter()
            .map(|d| {
                let (owner, other) = blocks.rule(d);
                if std::ptr::eq(owner, block) {
                    format!("{:?} ({})", other.name, other.at)
                } else {
                    format!("{:?} of {} ({})", other.name, owner.owner(), other.at)
                }
            })
            .collect();
        let more = match deciders.len().saturating_sub(NAMED) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        diagnostics.push(Diagnostic::at(
            &rule.at,
            format!(
                "rule {:?} can never match: everything it covers is decided by rules that rank above it: {}{more}; remove it, or change it or them",
                rule.name,
                deciders[..deciders.len().min(NAMED)].join(", "),
            ),
        ));
    }
}

/// Reports pairs of rules of one block that cover the same prefix and
/// protocol with port ranges of the same width that overlap, one allowing
/// and one denying: neither is more specific, so only the tie-break
/// (deny over allow) decides between them. Returns the indexes of the
/// rules involved.
fn conflicts(rules: &[EgressRule], diagnostics: &mut Vec<Diagnostic>) -> HashSet<usize> {
    let mut by_dest: HashMap<(IpNet, Protocol), Vec<usize>> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        for net in rule.nets().collect::<BTreeSet<_>>() {
            by_dest.entry((net, rule.protocol)).or_default().push(i);
        }
    }
    let mut groups: Vec<_> = by_dest.into_iter().collect();
    groups.sort_by_key(|((net, _), members)| (members[0], *net));
    let mut reported: HashSet<(usize, usize)> = HashSet::new();
    for ((net, protocol), members) in groups {
        for (k, &a) in members.iter().enumerate() {
            for &b in &members[k + 1..] {
                let (first, second) = (&rules[a], &rules[b]);
                if first.action == second.action || reported.contains(&(a, b)) {
                    continue;
                }
                let Some(overlap) = equal_width_overlap(first, second) else {
                    continue;
                };
                reported.insert((a, b));
                let deny = if first.action == Action::Deny {
                    first
                } else {
                    second
                };
                diagnostics.push(Diagnostic::at(
                    &second.at,
                    format!(
                        "rule {:?} conflicts with rule {:?} ({}): for {} to {net} {} both are equally specific, but one allows and the other denies (so {:?} wins); make one of them narrower, or remove one",
                        second.name,
                        first.name,
                        first.at,
                        protocol_text(protocol),
                        describe_ports(&[overlap]),
                        deny.name,
                    ),
                ));
            }
        }
    }
    reported.into_iter().flat_map(|(a, b)| [a, b]).collect()
}

/// The first overlap of a port range of `a` with a range of `b` that has
/// the same number of ports.
fn equal_width_overlap(a: &EgressRule, b: &EgressRule) -> Option<(u16, u16)> {
    let ranges_b = b.port_ranges();
    a.port_ranges().into_iter().find_map(|(af, al)| {
        ranges_b.iter().find_map(|&(bf, bl)| {
            let (first, last) = (af.max(bf), al.min(bl));
            (al - af == bl - bf && first <= last).then_some((first, last))
        })
    })
}

/// Whether some address reaches each prefix's entry: one whose prefixes
/// inside it tile it whole is never the longest match.
fn reachable(decided: &[Decided]) -> Vec<bool> {
    // `decided` lists a prefix before those inside it: the nearest
    // enclosing prefix is the top of a stack of open ones.
    let mut children: Vec<Vec<IpNet>> = vec![Vec::new(); decided.len()];
    let mut open: Vec<usize> = Vec::new();
    for (i, d) in decided.iter().enumerate() {
        while open
            .last()
            .is_some_and(|&o| !decided[o].net.contains(&d.net))
        {
            open.pop();
        }
        if let Some(&parent) = open.last() {
            children[parent].push(d.net);
        }
        open.push(i);
    }
    decided
        .iter()
        .zip(&children)
        .map(|(d, inside)| inside.is_empty() || IpNet::aggregate(inside) != [d.net])
        .collect()
}

/// The rules that decide what `rule` covers, by id.
fn deciders(rule: &EgressRule, decided: &[Decided], reachable: &[bool]) -> BTreeSet<u32> {
    let nets: Vec<IpNet> = rule.nets().collect();
    let ranges = rule.port_ranges();
    let mut out = BTreeSet::new();
    for (d, _) in decided
        .iter()
        .zip(reachable)
        .filter(|(d, r)| **r && nets.iter().any(|n| n.contains(&d.net)))
    {
        for (transport, intervals) in [(Protocol::Tcp, &d.tcp), (Protocol::Udp, &d.udp)] {
            if !rule.protocol.covers(transport) {
                continue;
            }
            out.extend(
                intervals
                    .iter()
                    .filter(|i| ranges.iter().any(|&(f, l)| i.first <= l && f <= i.last))
                    .map(|i| i.rule),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::policy::testing::errors;

    fn rule(name: &str, to: &str, ports: &str, protocol: &str, action: &str) -> String {
        format!(
            "[[identity.egress]]\nname = \"{name}\"\nto = [{to}]\nports = [{ports}]\nprotocol = \"{protocol}\"\naction = \"{action}\"\n"
        )
    }

    fn block(id: &str, rules: &[String]) -> String {
        format!("[[identity]]\nid = \"{id}\"\n{}", rules.concat())
    }

    const WEB: &str = "spiffe://example.org/web";
    const NET: &str = "\"10.0.0.0/8\"";

    /// Each rule takes 6 lines; the first starts on line 3.
    fn line_of_rule(n: u32) -> u32 {
        3 + 6 * n
    }

    #[test]
    fn a_repeated_rule_never_matches() {
        let text = block(
            WEB,
            &[
                rule("https", NET, "443", "tcp", "allow"),
                rule("https-again", NET, "443", "tcp", "allow"),
            ],
        );
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, line_of_rule(1));
        assert!(
            got[0].1.starts_with(
                "rule \"https-again\" can never match: everything it covers is decided by rules that rank above it: \"https\" ("
            ),
            "{}",
            got[0].1
        );
        assert!(got[0].1.contains("p.toml:3:1)"), "{}", got[0].1);
    }

    #[test]
    fn a_prefix_tiled_by_longer_prefixes_never_matches() {
        let text = block(
            WEB,
            &[
                rule("wide", "\"10.0.0.0/24\"", "80", "tcp", "allow"),
                rule("low", "\"10.0.0.0/25\"", "80", "any", "deny"),
                rule("high", "\"10.0.0.128/25\"", "\"1-1000\"", "tcp", "deny"),
                // Covered by `wide` except at one port: it matches.
                rule("some", "\"10.0.0.0/24\"", "\"80-81\"", "tcp", "allow"),
            ],
        );
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, line_of_rule(0));
        let m = &got[0].1;
        assert!(m.starts_with("rule \"wide\" can never match"), "{m}");
        assert!(m.contains("\"low\" (") && m.contains("\"high\" ("), "{m}");
        assert!(!m.contains("\"some\""), "{m}");
    }

    #[test]
    fn rules_of_the_blocks_over_a_block_count_but_not_those_under_it() {
        let text = [
            block(
                "spiffe://example.org/agents/*",
                &[
                    rule("low-half", "\"10.0.0.0/17\"", "", "tcp", "deny"),
                    rule("high-half", "\"10.0.128.0/17\"", "", "tcp", "deny"),
                    rule("web", "\"192.0.2.0/24\"", "80", "tcp", "allow"),
                ],
            ),
            block(
                "spiffe://example.org/agents/coder",
                &[
                    rule("api", "\"10.0.0.0/16\"", "443", "tcp", "allow"),
                    // Decides `web` for coder only: `web` still matches for
                    // the other agents.
                    rule("no-web", "\"192.0.2.0/24\"", "80", "tcp", "deny"),
                ],
            ),
        ]
        .concat();
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 2 + line_of_rule(3));
        let m = &got[0].1;
        assert!(m.starts_with("rule \"api\" can never match"), "{m}");
        assert!(
            m.contains("\"low-half\" of spiffe://example.org/agents/* (")
                && m.contains("\"high-half\" of spiffe://example.org/agents/* ("),
            "{m}"
        );
    }

    #[test]
    fn the_unknown_workload_policy_is_checked_too() {
        let text = "[[unknown.egress]]\nname = \"a\"\nto = [\"any\"]\naction = \"allow\"\n[[unknown.egress]]\nname = \"b\"\nto = [\"0.0.0.0/0\", \"::/0\"]\naction = \"allow\"\n";
        let got = errors(text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 5);
        assert!(
            got[0].1.starts_with("rule \"b\" can never match"),
            "{}",
            got[0].1
        );
    }

    #[test]
    fn equally_specific_rules_with_different_actions_conflict() {
        let text = block(
            WEB,
            &[
                rule("allow-web", NET, "\"80-89\"", "tcp", "allow"),
                rule("deny-web", NET, "\"85-94\"", "tcp", "deny"),
            ],
        );
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, line_of_rule(1));
        let m = &got[0].1;
        assert!(
            m.starts_with("rule \"deny-web\" conflicts with rule \"allow-web\" ("),
            "{m}"
        );
        assert!(
            m.contains("p.toml:3:1): for tcp to 10.0.0.0/8 ports 85-89 both are equally specific, but one allows and the other denies (so \"deny-web\" wins)"),
            "{m}"
        );
        // `any` is 0.0.0.0/0 and ::/0; a fully covered rule in a conflict
        // is reported once, as a conflict.
        let text = block(
            WEB,
            &[
                rule("all", "\"any\"", "53", "udp", "allow"),
                rule("none", "\"0.0.0.0/0\"", "53", "udp", "deny"),
            ],
        );
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].1.contains("for udp to 0.0.0.0/0 port 53"),
            "{}",
            got[0].1
        );
    }

    #[test]
    fn rules_that_differ_in_specificity_or_block_do_not_conflict() {
        let text = [
            block(
                WEB,
                &[
                    rule("ports", NET, "\"80-89\"", "tcp", "allow"),
                    // Narrower ports.
                    rule("narrow", NET, "\"85-86\"", "tcp", "deny"),
                    // Another protocol, and `any`.
                    rule("udp", NET, "\"80-89\"", "udp", "deny"),
                    rule("both", NET, "\"84-93\"", "any", "deny"),
                    // A longer prefix.
                    rule("longer", "\"10.0.0.0/9\"", "\"80-89\"", "tcp", "deny"),
                    // Same action, partly overlapping.
                    rule("same", NET, "\"85-94\"", "tcp", "allow"),
                ],
            ),
            block(
                "spiffe://example.org/*",
                &[rule("pattern", NET, "\"80-89\"", "tcp", "deny")],
            ),
        ]
        .concat();
        let dir = crate::policy::testing::PolicyDir::new(&[("p.toml", &text)]);
        dir.load(&[]).unwrap_or_else(|e| panic!("{e}"));
    }
}
