//! Port ranges as the prefix blocks that the kernel's port trie matches.

/// Splits an inclusive port range into the fewest aligned blocks
/// `(first_port, prefix_len)`, where a block of prefix length `n` covers
/// `2^(16 - n)` ports. At most 30 blocks for any range.
pub fn blocks(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays in range.
        let mut size_bits = lo.trailing_zeros().min(16);
        while lo + (1 << size_bits) - 1 > hi {
            size_bits -= 1;
        }
        out.push((lo as u16, 16 - size_bits));
        lo += 1 << size_bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(b: &[(u16, u32)]) -> Vec<u32> {
        b.iter()
            .flat_map(|&(p, len)| {
                let p = u32::from(p);
                p..p + (1 << (16 - len))
            })
            .collect()
    }

    #[test]
    fn single_port_and_whole_space() {
        assert_eq!(blocks(443, 443), vec![(443, 16)]);
        assert_eq!(blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(blocks(1, 65535).len(), 16);
    }

    #[test]
    fn blocks_cover_exactly_the_range() {
        for (a, b) in [
            (1, 1),
            (8000, 8080),
            (1000, 2000),
            (1, 65535),
            (65535, 65535),
            (3, 17),
        ] {
            let bl = blocks(a, b);
            assert!(bl.len() <= 30);
            assert_eq!(
                covered(&bl),
                (u32::from(a)..=u32::from(b)).collect::<Vec<_>>()
            );
        }
    }
}
