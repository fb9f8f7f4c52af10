//! Ports as operators write them (`443`, `"8000-8080"`), and port ranges
//! as the prefix blocks that the kernel's port trie matches.

/// Why a text is not a destination port or an inclusive range of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port 0 is not a destination port; ports are 1-65535")]
    Zero,
    #[error("port {0} is out of range: ports are 1-65535")]
    OutOfRange(i64),
    #[error("{0:?} is not a port number (1-65535) or a range like \"8000-8080\"")]
    NotANumber(String),
    #[error("port range \"{0}-{1}\" is reversed; write \"{1}-{0}\"")]
    Reversed(u16, u16),
}

/// One port, written in `digits` of `radix`.
pub fn port(digits: &str, radix: u32) -> Result<u16, PortError> {
    match i64::from_str_radix(digits, radix) {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(0) => Err(PortError::Zero),
        Ok(p) => Err(PortError::OutOfRange(p)),
        Err(_) => Err(PortError::NotANumber(digits.to_owned())),
    }
}

/// A port (`443`) or an inclusive range (`8000-8080`), as `(first, last)`.
pub fn range(text: &str) -> Result<(u16, u16), PortError> {
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a.trim(), 10)?, port(b.trim(), 10)?),
        None => {
            let p = port(text.trim(), 10)?;
            (p, p)
        }
    };
    if first > last {
        return Err(PortError::Reversed(first, last));
    }
    Ok((first, last))
}

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

    #[test]
    fn ports_and_ranges_are_read_with_errors_that_say_what_is_wrong() {
        assert_eq!(range("443"), Ok((443, 443)));
        assert_eq!(range(" 8000 - 8080 "), Ok((8000, 8080)));
        assert_eq!(range("0"), Err(PortError::Zero));
        assert_eq!(range("1-70000"), Err(PortError::OutOfRange(70000)));
        assert_eq!(range("https"), Err(PortError::NotANumber("https".into())));
        assert_eq!(range("90-80"), Err(PortError::Reversed(90, 80)));
        assert_eq!(port("1bb", 16), Ok(443));
        assert_eq!(
            range("90-80").unwrap_err().to_string(),
            "port range \"90-80\" is reversed; write \"80-90\""
        );
    }

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
