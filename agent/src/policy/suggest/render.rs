//! Writing what a [`Suggester`] collected as a policy: per identity, one
//! allow rule per transport and set of ports, its destinations the
//! addresses (merged only as far as the options allow) and names that
//! were reached on exactly those ports. Everything is sorted, so the same
//! records give the same text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Book, Connect, Dest, Seen, Suggester, Transport, Unusable, merge_into, quote, when};

/// The policy of what `s` collected, its connects as `books` writes them
/// ([`Suggester::resolve`]).
pub(super) fn policy(s: &Suggester, books: &BTreeMap<String, Book>) -> String {
    let mut out = String::new();
    header(s, books, &mut out);
    for (id, book) in books {
        identity(s, id, book, &mut out);
    }
    for (who, connects) in &s.unnamed {
        unnamed(s, who, connects, &mut out);
    }
    // Those whose every connect was one no rule can allow.
    let mut others: Vec<&String> = s
        .unusable
        .keys()
        .map(|(who, _)| who)
        .filter(|who| !books.contains_key(*who) && !s.unnamed.contains_key(*who))
        .collect();
    others.dedup();
    for who in others {
        let _ = writeln!(out, "\n# {who}:");
        unusable_lines(s, who, &mut out);
    }
    out
}

/// What no rule can allow of `who`, one comment line per kind.
fn unusable_lines(s: &Suggester, who: &str, out: &mut String) {
    for ((of, why), n) in &s.unusable {
        if of == who {
            let _ = writeln!(out, "# no rule can allow {n} {}", unusable(why, *n));
        }
    }
}

fn header(s: &Suggester, books: &BTreeMap<String, Book>, out: &mut String) {
    out.push_str("# Suggested by `idgate policy suggest`");
    match s.window {
        Some(w) => {
            let _ = writeln!(
                out,
                " from {} decision {}, {} to {}.",
                w.count,
                plural(w.count, "record", "records"),
                when(w.first),
                when(w.last)
            );
        }
        None => out.push_str(": no decision records.\n"),
    }
    out.push_str(
        "# Each rule allows exactly what its comments list: connects let through\n\
         # only by audit mode, or denied because no rule covered them.\n\
         # Review it before it is loaded.\n",
    );
    if s.missed > 0 {
        let _ = writeln!(
            out,
            "# INCOMPLETE: {} decision {} lost in this window; what they recorded has no rule here.",
            s.missed,
            plural(s.missed, "record was", "records were"),
        );
    }
    if books.is_empty() {
        out.push_str("# No connect of an identity to suggest a rule for.\n");
    }
}

/// Per transport and destination: its ports, and what was seen of it.
type ByDest<'a> = BTreeMap<(Transport, &'a Dest), (BTreeSet<u16>, Option<Seen>)>;
/// Per transport and set of ports: the destinations reached on them.
type ByPorts = BTreeMap<(Transport, Vec<u16>), Vec<(Dest, Seen)>>;

fn identity(s: &Suggester, id: &str, book: &Book, out: &mut String) {
    let mut total = None;
    // Per destination: its ports, and what was seen of it.
    let mut dests: ByDest = BTreeMap::new();
    for ((transport, dest, port), seen) in &book.connects {
        let d = dests.entry((*transport, dest)).or_default();
        d.0.insert(*port);
        merge_into(&mut d.1, *seen);
        merge_into(&mut total, *seen);
    }
    // Destinations reached on the same ports share a rule.
    let mut rules: ByPorts = BTreeMap::new();
    for ((transport, dest), (ports, seen)) in dests {
        let seen = seen.expect("a destination was seen");
        rules
            .entry((transport, ports.into_iter().collect()))
            .or_default()
            .push((dest.clone(), seen));
    }
    let total = total.expect("an identity has connects");
    let _ = writeln!(
        out,
        "\n[[identity]]\nid = {}\n# {}.\ndefault = \"deny\"",
        quote(id),
        seen_text(&total),
    );
    unusable_lines(s, id, out);
    for ((transport, ports), dests) in rules {
        let dests = merge(dests, s.options.prefix_v4, s.options.prefix_v6);
        rule(transport, &ports, &dests, book, out);
    }
}

fn rule(
    transport: Transport,
    ports: &[u16],
    dests: &[(Dest, Seen, usize)],
    book: &Book,
    out: &mut String,
) {
    let mut seen = None;
    for (_, s, _) in dests {
        merge_into(&mut seen, *s);
    }
    let seen = seen.expect("a rule has destinations");
    let ranges = ranges(ports);
    let name: Vec<String> = ranges.iter().map(|r| range_text(*r)).collect();
    let _ = writeln!(
        out,
        "\n[[identity.egress]]\n# {} {}, first {}, last {}:",
        seen.count,
        plural(seen.count, "connect", "connects"),
        when(seen.first),
        when(seen.last),
    );
    for (dest, s, addresses) in dests {
        let merged = if *addresses > 1 {
            format!(" ({addresses} addresses)")
        } else {
            String::new()
        };
        let _ = writeln!(out, "#   {}{merged}: {}", dest_text(dest), seen_text(s),);
        if let Dest::Name(name) = dest {
            via_lines(book, transport, ports, name, out);
        }
    }
    let to: Vec<String> = dests.iter().map(|(d, _, _)| quote(&dest_text(d))).collect();
    let ports: Vec<String> = ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                quote(&range_text((a, b)))
            }
        })
        .collect();
    let _ = writeln!(
        out,
        "name = {}\nto = [{}]\nports = [{}]\nprotocol = \"{}\"\naction = \"allow\"",
        quote(&format!("{}-{}", transport.word(), name.join("_"))),
        to.join(", "),
        ports.join(", "),
        transport.word(),
    );
}

/// For a name chosen from lookups: the addresses it stands for, and the
/// other names whose lookups answered them too.
fn via_lines(
    book: &Book,
    transport: Transport,
    ports: &[u16],
    name: &super::NamePattern,
    out: &mut String,
) {
    let mut addrs: BTreeMap<IpAddr, BTreeSet<&super::NamePattern>> = BTreeMap::new();
    for port in ports {
        for (addr, others) in book
            .via
            .get(&(transport, name.clone(), *port))
            .into_iter()
            .flatten()
        {
            addrs.entry(*addr).or_default().extend(others);
        }
    }
    for (addr, others) in addrs {
        let _ = write!(out, "#     for {addr}, which its lookup answered");
        if !others.is_empty() {
            let others: Vec<&str> = others.iter().map(|n| n.as_str()).collect();
            let _ = write!(
                out,
                " (and lookups of {}: the name of the last lookup before each connect is used)",
                others.join(", ")
            );
        }
        out.push('\n');
    }
}

/// Workloads no rule can be written for: a comment only.
fn unnamed(s: &Suggester, who: &str, connects: &BTreeMap<Connect, Seen>, out: &mut String) {
    let _ = writeln!(
        out,
        "\n# No rule for {who}: an identity's connects only. Seen:"
    );
    for ((transport, dest, port), seen) in connects {
        let _ = writeln!(
            out,
            "#   {} {} port {port}: {}",
            transport.word(),
            dest_text(dest),
            seen_text(seen),
        );
    }
    unusable_lines(s, who, out);
}

fn unusable(why: &Unusable, n: u64) -> String {
    let connects = plural(n, "connect", "connects");
    match why {
        Unusable::Protocol(p) => format!("{connects} over IP protocol {p}"),
        Unusable::PortZero => format!("{connects} to port 0"),
    }
}

/// Addresses of one rule merged: those within one prefix of the
/// options' length become the shortest prefix holding them (never
/// shorter than that length); names stay as they are. Each destination
/// comes with what was seen of it and how many addresses it holds.
fn merge(dests: Vec<(Dest, Seen)>, prefix_v4: u8, prefix_v6: u8) -> Vec<(Dest, Seen, usize)> {
    let mut clusters: BTreeMap<IpNet, Vec<(IpAddr, Seen)>> = BTreeMap::new();
    let mut out = Vec::new();
    for (dest, seen) in dests {
        match dest {
            Dest::Net(net) => {
                let len = match net {
                    IpNet::V4(_) => prefix_v4,
                    IpNet::V6(_) => prefix_v6,
                };
                let key = IpNet::new(net.addr(), len.min(net.max_prefix_len()))
                    .expect("a length no longer than the family's")
                    .trunc();
                clusters.entry(key).or_default().push((net.addr(), seen));
            }
            name @ Dest::Name(_) => out.push((name, seen, 1)),
        }
    }
    let mut nets: Vec<(Dest, Seen, usize)> = clusters
        .into_values()
        .map(|addrs| {
            let lo = addrs.iter().map(|a| a.0).min().expect("a cluster");
            let hi = addrs.iter().map(|a| a.0).max().expect("a cluster");
            let net = IpNet::new(lo, common_prefix(lo, hi))
                .expect("a common prefix is a prefix length")
                .trunc();
            let mut seen = None;
            for (_, s) in &addrs {
                merge_into(&mut seen, *s);
            }
            (Dest::Net(net), seen.expect("a cluster"), addrs.len())
        })
        .collect();
    nets.append(&mut out);
    nets
}

/// The length of the longest prefix two addresses of one family share.
fn common_prefix(a: IpAddr, b: IpAddr) -> u8 {
    let bits = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
        _ => 0,
    };
    bits as u8
}

/// A host prefix as a plain address; any other prefix as a CIDR.
fn dest_text(dest: &Dest) -> String {
    match dest {
        Dest::Net(net) if net.prefix_len() == net.max_prefix_len() => net.addr().to_string(),
        Dest::Net(net) => net.to_string(),
        Dest::Name(name) => name.to_string(),
    }
}

/// Sorted ports as inclusive runs.
fn ranges(ports: &[u16]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some((_, last)) if u32::from(*last) + 1 == u32::from(p) => *last = p,
            _ => out.push((p, p)),
        }
    }
    out
}

fn range_text((a, b): (u16, u16)) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

/// `N connect(s), FIRST to LAST`.
fn seen_text(seen: &Seen) -> String {
    format!(
        "{} {}, {} to {}",
        seen.count,
        plural(seen.count, "connect", "connects"),
        when(seen.first),
        when(seen.last),
    )
}

fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}
