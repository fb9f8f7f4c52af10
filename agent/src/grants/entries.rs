//! The kernel entries of one slot's grants. An LPM lookup returns the
//! longest prefix only, so the entry of each grant's destination holds
//! every grant of the slot that covers that destination: the prefixes
//! that hold one address are nested, so the longest holds them all.

use std::collections::BTreeMap;

use idgate_common::{
    FAMILY_V4, FAMILY_V6, GRANT_FIXED_BITS, GRANT_INLINE, GrantEntry, GrantKey, GrantValue,
};
use ipnet::IpNet;

use super::model::Grant;

/// An entry key: the LPM prefix length (fixed bits included) and data.
pub use crate::bpf::GrantEntryKey as EntryKey;

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

/// The entries of `grants` (all of one slot's identity, none expired)
/// for `slot`: one per distinct destination, holding every grant that
/// covers it, the most specific first.
pub fn entries<'a>(
    slot: u32,
    grants: impl IntoIterator<Item = &'a Grant>,
) -> Result<BTreeMap<EntryKey, GrantValue>, TooManyOverlapping> {
    let mut grants: Vec<&Grant> = grants.into_iter().collect();
    grants.sort_by_key(|g| (std::cmp::Reverse(g.to.prefix_len()), g.id));
    let mut out = BTreeMap::new();
    for g in &grants {
        let key = key_of(slot, g.to);
        if out.contains_key(&key) {
            continue;
        }
        let covering: Vec<&&Grant> = grants.iter().filter(|o| o.to.contains(&g.to)).collect();
        if covering.len() > GRANT_INLINE {
            return Err(TooManyOverlapping {
                to: g.to,
                count: covering.len(),
                ids: covering
                    .iter()
                    .map(|o| o.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut value = GrantValue::default();
        for (entry, o) in value.grants.iter_mut().zip(&covering) {
            *entry = GrantEntry {
                expiry_boot_ns: o.expiry_boot_ns,
                id: o.id,
                protocols: o.protocol.flags(),
                first: o.ports.first,
                last: o.ports.last,
                _pad: 0,
            };
        }
        out.insert(key, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::model::{GrantProtocol, Ports};
    use idgate_common::grant_protocols::{TCP, UDP};
    use std::time::SystemTime;

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
        let e = entries(7, [&wide, &narrow]).unwrap();
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
        let e = entries(1, [&a, &b, &c]).unwrap();
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
        assert!(entries(1, &grants[..4]).is_ok());
        let e = entries(1, &grants).unwrap_err();
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
        assert_eq!(entries(1, &apart).unwrap().len(), 10);
    }
}
