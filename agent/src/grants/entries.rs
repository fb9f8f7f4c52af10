//! The kernel entries of one slot's grants. An LPM lookup returns the
//! longest prefix only, so the entry of each grant's destination holds
//! every grant of the slot that covers that destination: the prefixes
//! that hold one address are nested, so the longest holds them all.
//!
//! A grant by name has no prefix of its own: each address its identity's
//! lookups of the name were answered is a host entry (a /32 or /128) of
//! it, until the earlier of the grant's end and the answer's TTL, and is
//! counted with the other grants that cover that address.

use std::collections::BTreeMap;
use std::net::IpAddr;

use idgate_common::{
    FAMILY_V4, FAMILY_V6, GRANT_FIXED_BITS, GRANT_INLINE, GrantEntry, GrantKey, GrantValue,
};
use ipnet::IpNet;

use super::model::{Grant, GrantTo};

/// An entry key: the LPM prefix length (fixed bits included) and data.
pub use crate::bpf::GrantEntryKey as EntryKey;

/// The addresses learned for grants by name: by grant id, each address
/// with the end of its answer's TTL on the boot-time clock.
pub type LearnedAddresses = BTreeMap<u32, BTreeMap<IpAddr, u64>>;

/// More grants cover one destination than an entry holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{to} would be covered by {count} grants of this identity (ids {ids}); at most {GRANT_INLINE} may overlap: revoke one first"
)]
pub struct TooManyOverlapping {
    pub to: IpNet,
    pub count: usize,
    pub ids: String,
}

/// The key of `net`'s entry for `slot`.
pub fn key_of(slot: u32, net: IpNet) -> EntryKey {
    let mut key = GrantKey {
        slot,
        ..Default::default()
    };
    match net {
        IpNet::V4(n) => {
            key.family = FAMILY_V4;
            key.addr[..4].copy_from_slice(&n.network().octets());
        }
        IpNet::V6(n) => {
            key.family = FAMILY_V6;
            key.addr = n.network().octets();
        }
    }
    (GRANT_FIXED_BITS + u32::from(net.prefix_len()), key)
}

/// The address of a host entry (a /32 or /128), which is where a grant
/// by name's learned addresses are.
pub fn host_of((len, key): &EntryKey) -> Option<IpAddr> {
    match (key.family, len.checked_sub(GRANT_FIXED_BITS)?) {
        (FAMILY_V4, 32) => Some(IpAddr::from([
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ])),
        (FAMILY_V6, 128) => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

/// One grant as one entry holds it: for a grant by address its own
/// prefix; for a grant by name one address learned for it.
#[derive(Debug, Clone, Copy)]
struct Item {
    to: IpNet,
    entry: GrantEntry,
}

/// The entries of `grants` (all of one slot's identity, none expired)
/// for `slot`, with the addresses `learned` for its grants by name: one
/// per distinct destination, holding every grant that covers it, the
/// most specific first.
pub fn entries<'a>(
    slot: u32,
    grants: impl IntoIterator<Item = &'a Grant>,
    learned: &LearnedAddresses,
) -> Result<BTreeMap<EntryKey, GrantValue>, TooManyOverlapping> {
    let mut by_net: BTreeMap<IpNet, Vec<Item>> = BTreeMap::new();
    for g in grants {
        let entry = |expiry_boot_ns| GrantEntry {
            expiry_boot_ns,
            id: g.id,
            protocols: g.protocol.flags(),
            first: g.ports.first,
            last: g.ports.last,
            _pad: 0,
        };
        match &g.to {
            GrantTo::Net(net) => by_net.entry(*net).or_default().push(Item {
                to: *net,
                entry: entry(g.expiry_boot_ns),
            }),
            GrantTo::Name(_) => {
                for (addr, expiry) in learned.get(&g.id).into_iter().flatten() {
                    let to = IpNet::from(*addr);
                    by_net.entry(to).or_default().push(Item {
                        to,
                        entry: entry(g.expiry_boot_ns.min(*expiry)),
                    });
                }
            }
        }
    }
    // Only a prefix shorter than a host's, or the host itself, can cover
    // one: the many learned host entries are each checked against the
    // few shorter prefixes, not against one another.
    let wider: Vec<(&IpNet, &Vec<Item>)> = by_net
        .iter()
        .filter(|(n, _)| n.prefix_len() < n.max_prefix_len())
        .collect();
    let mut out = BTreeMap::new();
    for (net, here) in &by_net {
        let mut covering: Vec<&Item> = here.iter().collect();
        for (other, items) in &wider {
            if *other != net && other.contains(net) {
                covering.extend(items.iter());
            }
        }
        covering.sort_by_key(|i| (std::cmp::Reverse(i.to.prefix_len()), i.entry.id));
        if covering.len() > GRANT_INLINE {
            let mut ids: Vec<u32> = covering.iter().map(|i| i.entry.id).collect();
            ids.sort_unstable();
            return Err(TooManyOverlapping {
                to: *net,
                count: covering.len(),
                ids: ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut value = GrantValue::default();
        for (entry, item) in value.grants.iter_mut().zip(&covering) {
            *entry = item.entry;
        }
        out.insert(key_of(slot, *net), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::model::{GrantProtocol, Ports};
    use idgate_common::grant_protocols::{TCP, UDP};
    use std::time::SystemTime;

    fn none() -> LearnedAddresses {
        LearnedAddresses::new()
    }

    fn grant(id: u32, to: &str, ports: &str, protocol: GrantProtocol, expiry: u64) -> Grant {
        Grant {
            id,
            identity: "spiffe://example.org/agent".parse().unwrap(),
            to: to.parse().unwrap(),
            ports: Ports::try_from(ports.to_owned()).unwrap(),
            protocol,
            granted_by: 0,
            granted_at: SystemTime::UNIX_EPOCH,
            expiry_boot_ns: expiry,
            reason: None,
        }
    }

    /// What the kernel would find for `addr`: the longest entry covering
    /// it, and the grant of it that allows `port` over `protocol` at `now`.
    fn lookup(
        entries: &BTreeMap<EntryKey, GrantValue>,
        addr: &str,
        protocol: u32,
        port: u16,
        now: u64,
    ) -> Option<u32> {
        let addr: std::net::IpAddr = addr.parse().unwrap();
        let (_, value) = entries
            .iter()
            .filter(|((len, key), _)| {
                let net = match key.family {
                    FAMILY_V4 => IpNet::new(
                        [key.addr[0], key.addr[1], key.addr[2], key.addr[3]].into(),
                        (*len - GRANT_FIXED_BITS) as u8,
                    ),
                    _ => IpNet::new(key.addr.into(), (*len - GRANT_FIXED_BITS) as u8),
                };
                net.unwrap().contains(&addr)
            })
            .max_by_key(|((len, _), _)| *len)?;
        value
            .grants
            .iter()
            .find(|g| {
                g.expiry_boot_ns > now
                    && g.protocols & protocol != 0
                    && g.first <= port
                    && port <= g.last
            })
            .map(|g| g.id)
    }

    #[test]
    fn overlapping_grants_each_hold_as_written() {
        // A /8 on 443 for ten minutes, a /16 inside it on 22 for one.
        let minute = 60_000_000_000;
        let wide = grant(1, "10.0.0.0/8", "443", GrantProtocol::Tcp, 10 * minute);
        let narrow = grant(2, "10.1.0.0/16", "22", GrantProtocol::Tcp, minute);
        let e = entries(7, [&wide, &narrow], &none()).unwrap();
        assert_eq!(e.len(), 2);
        let now = 1;
        assert_eq!(lookup(&e, "10.1.2.3", TCP, 443, now), Some(1));
        assert_eq!(lookup(&e, "10.1.2.3", TCP, 22, now), Some(2));
        assert_eq!(lookup(&e, "10.2.0.1", TCP, 443, now), Some(1));
        assert_eq!(lookup(&e, "10.2.0.1", TCP, 22, now), None);
        assert_eq!(lookup(&e, "10.1.2.3", UDP, 443, now), None);
        assert_eq!(lookup(&e, "11.0.0.1", TCP, 443, now), None);
        // After a minute the /16's grant is over, the /8's still holds,
        // inside the /16 too.
        let later = 2 * minute;
        assert_eq!(lookup(&e, "10.1.2.3", TCP, 22, later), None);
        assert_eq!(lookup(&e, "10.1.2.3", TCP, 443, later), Some(1));
        assert_eq!(lookup(&e, "10.1.2.3", TCP, 443, 11 * minute), None);
        // Every key is the slot's.
        assert!(e.keys().all(|(_, k)| k.slot == 7));
    }

    #[test]
    fn families_and_equal_prefixes_share_entries_as_they_should() {
        let a = grant(1, "192.0.2.0/24", "any", GrantProtocol::Any, 10);
        let b = grant(2, "192.0.2.0/24", "53", GrantProtocol::Udp, 20);
        let c = grant(3, "2001:db8::/32", "443", GrantProtocol::Tcp, 10);
        let e = entries(1, [&a, &b, &c], &none()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(lookup(&e, "192.0.2.9", UDP, 53, 15), Some(2));
        assert_eq!(lookup(&e, "192.0.2.9", TCP, 80, 5), Some(1));
        assert_eq!(lookup(&e, "2001:db8::1", TCP, 443, 5), Some(3));
        assert_eq!(lookup(&e, "2001:db8::1", UDP, 443, 5), None);
    }

    #[test]
    fn more_overlapping_grants_than_an_entry_holds_are_refused() {
        let nets = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.0/25",
            "10.1.2.3/32",
        ];
        let grants: Vec<Grant> = nets
            .iter()
            .enumerate()
            .map(|(i, n)| grant(i as u32 + 1, n, "any", GrantProtocol::Any, 10))
            .collect();
        assert!(entries(1, &grants[..4], &none()).is_ok());
        let e = entries(1, &grants, &none()).unwrap_err();
        assert_eq!(e.count, 5);
        assert!(e.to_string().contains("at most 4 may overlap"), "{e}");
        // Side by side, they do not overlap: any number fits.
        let apart: Vec<Grant> = (0..10)
            .map(|i| {
                grant(
                    i + 1,
                    &format!("10.0.{i}.0/24"),
                    "any",
                    GrantProtocol::Any,
                    10,
                )
            })
            .collect();
        assert_eq!(entries(1, &apart, &none()).unwrap().len(), 10);
    }

    fn learned(pairs: &[(u32, &str, u64)]) -> LearnedAddresses {
        let mut out = LearnedAddresses::new();
        for (id, addr, expiry) in pairs {
            out.entry(*id)
                .or_default()
                .insert(addr.parse().unwrap(), *expiry);
        }
        out
    }

    #[test]
    fn a_name_grant_s_learned_addresses_are_host_entries_until_the_earlier_end() {
        // Grant 5: api.example.com on 443/tcp until 100; its lookups
        // were answered 192.0.2.7 (TTL to 50) and 192.0.2.8 (to 200) and
        // 2001:db8::8 (to 80). Grant 2: the /24 around them on 22 until
        // 300; grant 1: 10.0.0.0/8 on any port.
        let name = grant(5, "api.example.com", "443", GrantProtocol::Tcp, 100);
        let net = grant(2, "192.0.2.0/24", "22", GrantProtocol::Tcp, 300);
        let wide = grant(1, "10.0.0.0/8", "any", GrantProtocol::Any, 300);
        let addrs = learned(&[
            (5, "192.0.2.7", 50),
            (5, "192.0.2.8", 200),
            (5, "2001:db8::8", 80),
        ]);
        let e = entries(3, [&name, &net, &wide], &addrs).unwrap();
        // The /24, the /8, and one host entry per answered address.
        assert_eq!(e.len(), 5);
        assert!(e.contains_key(&key_of(3, "192.0.2.7/32".parse().unwrap())));
        assert!(e.contains_key(&key_of(3, "2001:db8::8/128".parse().unwrap())));
        assert_eq!(lookup(&e, "192.0.2.7", TCP, 443, 10), Some(5));
        // The answer's TTL is over: the name grant no longer opens it,
        // the /24's grant still holds for its own port.
        assert_eq!(lookup(&e, "192.0.2.7", TCP, 443, 60), None);
        assert_eq!(lookup(&e, "192.0.2.7", TCP, 22, 60), Some(2));
        // A TTL past the grant's end ends with the grant.
        assert_eq!(lookup(&e, "192.0.2.8", TCP, 443, 99), Some(5));
        assert_eq!(lookup(&e, "192.0.2.8", TCP, 443, 100), None);
        assert_eq!(lookup(&e, "2001:db8::8", TCP, 443, 10), Some(5));
        // Only its ports and protocol, and only the addresses answered.
        assert_eq!(lookup(&e, "192.0.2.7", TCP, 80, 10), None);
        assert_eq!(lookup(&e, "192.0.2.7", UDP, 443, 10), None);
        assert_eq!(lookup(&e, "192.0.2.9", TCP, 443, 10), None);
        // A name nobody looked up opens nothing.
        assert_eq!(entries(3, [&name], &none()).unwrap().len(), 0);
        // Another grant's addresses are not this grant's.
        assert_eq!(
            entries(3, [&name], &learned(&[(6, "192.0.2.7", 50)]))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn learned_addresses_count_with_the_grants_that_cover_them() {
        let nets = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.0/25"];
        let mut grants: Vec<Grant> = nets
            .iter()
            .enumerate()
            .map(|(i, n)| grant(i as u32 + 1, n, "any", GrantProtocol::Any, 10))
            .collect();
        grants.push(grant(9, "*.example.com", "443", GrantProtocol::Tcp, 10));
        // Outside the four: fits.
        let apart = learned(&[(9, "192.0.2.1", 10)]);
        assert_eq!(entries(1, &grants, &apart).unwrap().len(), 5);
        // Inside all four: a fifth grant covering 10.1.2.3, refused with
        // every id.
        let inside = learned(&[(9, "10.1.2.3", 10)]);
        let e = entries(1, &grants, &inside).unwrap_err();
        assert_eq!(e.count, 5);
        assert_eq!(e.ids, "1, 2, 3, 4, 9");
        assert_eq!(e.to.to_string(), "10.1.2.3/32");
        // Two names of one grant answered the same address: one entry,
        // one grant in it.
        let e = entries(1, &grants[3..], &inside).unwrap();
        let value = e[&key_of(1, "10.1.2.3/32".parse().unwrap())];
        assert_eq!(value.grants.iter().filter(|g| g.id != 0).count(), 2);
    }
}
