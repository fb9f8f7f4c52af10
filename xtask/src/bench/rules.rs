//! The benchmark's policy as data: identities, each with its egress
//! rules, generated deterministically, and its rendering as idgate policy
//! files. (`nft.rs` renders the same rules for nftables.)

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Trust domain of every benchmark identity.
pub const TRUST_DOMAIN: &str = "bench.test";
/// Identities per policy file.
pub const PER_FILE: usize = 1_000;
/// The name of [`loopback_rule`]'s rule.
pub const LOOPBACK_RULE: &str = "bench-loopback";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

impl Protocol {
    /// As idgate policy writes it.
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        }
    }

    /// The transport protocols it covers, as nftables names them.
    pub fn nft_names(self) -> &'static [&'static str] {
        match self {
            Protocol::Tcp => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::Any => &["tcp", "udp"],
        }
    }
}

/// One allow rule: destinations (address, prefix length), inclusive port
/// ranges, a protocol.
#[derive(Clone)]
pub struct Rule {
    pub name: String,
    pub to: Vec<(IpAddr, u8)>,
    pub ports: Vec<(u16, u16)>,
    pub protocol: Protocol,
}

/// One identity, the cgroup bound to it (relative to a scope), its rules.
pub struct Identity {
    pub id: String,
    pub cgroup: String,
    pub rules: Vec<Rule>,
}

/// The rule that lets the benchmark's workload reach its loopback ports
/// (TCP and UDP, IPv4 and IPv6).
pub fn loopback_rule(tcp_port: u16, udp_port: u16) -> Rule {
    Rule {
        name: LOOPBACK_RULE.into(),
        to: vec![
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 32),
            (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        ],
        ports: vec![(tcp_port, tcp_port), (udp_port, udp_port)],
        protocol: Protocol::Any,
    }
}

/// `identities` identities sharing `rules` rules as evenly as possible;
/// the first identity's first rule is `first`. The others go to distinct
/// networks per identity and rule (10.R.x.x/16 or fd00:R::/32 blocks, R
/// the rule's index), so no two rules of one identity overlap; about 60%
/// are IPv4; prefixes, ports and protocols vary.
pub fn generate(identities: usize, rules: usize, first: Rule) -> Vec<Identity> {
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut first = Some(first);
    (0..identities)
        .map(|i| {
            let count = rules / identities + usize::from(i < rules % identities);
            let rules = (0..count)
                .map(|r| match (r, first.take()) {
                    (0, Some(rule)) => rule,
                    _ => random_rule(&mut random, i, r),
                })
                .collect();
            Identity {
                id: format!("spiffe://{TRUST_DOMAIN}/id/{i}"),
                cgroup: format!("w{i}"),
                rules,
            }
        })
        .collect()
}

fn random_rule(random: &mut XorShift, identity: usize, index: usize) -> Rule {
    let block = (index % 256) as u8;
    let to = if random.below(10) < 6 {
        let prefix = [32, 32, 24, 16][random.below(4) as usize];
        let low = random.next() as u16;
        let addr = u32::from_be_bytes([10, block, (low >> 8) as u8, low as u8]);
        (IpAddr::V4(Ipv4Addr::from(addr & mask32(prefix))), prefix)
    } else {
        let prefix = [128, 64, 48][random.below(3) as usize];
        let high = 0xfd00_u128 << 112 | u128::from(block) << 96;
        let addr = high | u128::from(random.next()) << 32 | u128::from(random.next() as u32);
        (IpAddr::V6(Ipv6Addr::from(addr & mask128(prefix))), prefix)
    };
    let first = 1 + random.below(60_000) as u16;
    let last = if random.below(10) < 7 {
        first
    } else {
        first + random.below(1_000) as u16
    };
    Rule {
        name: format!("r{identity}-{index}"),
        to: vec![to],
        ports: vec![(first, last)],
        protocol: if random.below(2) == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        },
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// A small deterministic generator: the same policy on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The policy as idgate policy files: (file name, text), the identities
/// in files of [`PER_FILE`]; the first file also holds the global mode
/// and the unknown-workload default.
pub fn idgate_policy(identities: &[Identity]) -> Vec<(String, String)> {
    identities
        .chunks(PER_FILE)
        .enumerate()
        .map(|(n, chunk)| (policy_file_name(n), policy_file(n == 0, chunk)))
        .collect()
}

/// The policy file that holds identity `index`, rendered again (after
/// one of its rules changed): (file name, text).
pub fn idgate_policy_file_of(identities: &[Identity], index: usize) -> (String, String) {
    let n = index / PER_FILE;
    let chunk = &identities[n * PER_FILE..((n + 1) * PER_FILE).min(identities.len())];
    (policy_file_name(n), policy_file(n == 0, chunk))
}

/// A policy file of `identities` alone, without the global settings:
/// one more file beside [`idgate_policy`]'s.
pub fn extra_policy_file(identities: &[Identity]) -> String {
    policy_file(false, identities)
}

fn policy_file_name(n: usize) -> String {
    format!("identities-{n:04}.toml")
}

fn policy_file(global: bool, identities: &[Identity]) -> String {
    let mut text = String::new();
    if global {
        text.push_str("mode = \"enforce\"\n\n[unknown]\ndefault = \"deny\"\n");
    }
    for identity in identities {
        let _ = write!(
            text,
            "\n[[identity]]\nid = \"{}\"\ndefault = \"deny\"\n",
            identity.id
        );
        for rule in &identity.rules {
            let to: Vec<String> = rule
                .to
                .iter()
                .map(|(addr, prefix)| format!("\"{addr}/{prefix}\""))
                .collect();
            let ports: Vec<String> = rule
                .ports
                .iter()
                .map(|&(first, last)| {
                    if first == last {
                        first.to_string()
                    } else {
                        format!("\"{first}-{last}\"")
                    }
                })
                .collect();
            let _ = write!(
                text,
                "\n[[identity.egress]]\nname = \"{}\"\nto = [{}]\nports = [{}]\nprotocol = \"{}\"\naction = \"allow\"\n",
                rule.name,
                to.join(", "),
                ports.join(", "),
                rule.protocol.name()
            );
        }
    }
    text
}

/// The agent configuration's `[[workload]]` tables: each identity's
/// cgroup bound to it.
pub fn workload_bindings(identities: &[Identity]) -> String {
    let mut text = String::new();
    for identity in identities {
        let _ = write!(
            text,
            "\n[[workload]]\ncgroup = \"{}\"\nidentity = \"{}\"\n",
            identity.cgroup, identity.id
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_spread_and_the_first_is_kept() {
        let ids = generate(3, 10, loopback_rule(1, 2));
        let counts: Vec<usize> = ids.iter().map(|i| i.rules.len()).collect();
        assert_eq!(counts, [4, 3, 3]);
        assert_eq!(ids[0].rules[0].name, LOOPBACK_RULE);
        assert!(ids[1].rules.iter().all(|r| r.name != LOOPBACK_RULE));
    }

    #[test]
    fn prefixes_have_no_host_bits() {
        for identity in generate(50, 500, loopback_rule(1, 2)) {
            for rule in identity.rules {
                for (addr, prefix) in rule.to {
                    let kept = match addr {
                        IpAddr::V4(a) => u32::from(a) & mask32(prefix) == u32::from(a),
                        IpAddr::V6(a) => u128::from(a) & mask128(prefix) == u128::from(a),
                    };
                    assert!(kept, "{addr}/{prefix}");
                }
            }
        }
    }

    #[test]
    fn one_file_per_thousand_identities() {
        let ids = generate(2_500, 2_500, loopback_rule(1, 2));
        let files = idgate_policy(&ids);
        assert_eq!(files.len(), 3);
        assert!(files[0].1.starts_with("mode = \"enforce\""));
        assert!(!files[1].1.contains("mode ="));
        assert_eq!(idgate_policy_file_of(&ids, 1_999), files[1].clone());
    }
}
