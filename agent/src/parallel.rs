//! Work spread over the CPUs for the few steps that are large and split
//! cleanly: reading a policy's files, and building a full reload's tries.

/// `work` over `items` on up to as many threads as there are CPUs, each
/// thread with scratch state of its own (`S::default()`, e.g. a buffer);
/// the results in the items' order. Items are dealt out in turn, so large
/// and small ones mix. A panic in `work` is raised again here.
pub fn map<T: Send, R: Send, S: Default>(
    items: Vec<T>,
    work: impl Fn(T, &mut S) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(items.len());
    if threads <= 1 {
        let mut scratch = S::default();
        return items.into_iter().map(|i| work(i, &mut scratch)).collect();
    }
    let mut shares: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        shares[i % threads].push((i, item));
    }
    let work = &work;
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let running: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || {
                    let mut scratch = S::default();
                    share
                        .into_iter()
                        .map(|(i, item)| (i, work(item, &mut scratch)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        running
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_come_in_the_items_order_with_scratch_per_thread() {
        let items: Vec<u32> = (0..1000).collect();
        let out = super::map(items, |i, seen: &mut Vec<u32>| {
            seen.push(i);
            (i * 2, seen.len())
        });
        assert_eq!(out.len(), 1000);
        assert!(out.iter().enumerate().all(|(i, (d, _))| *d == 2 * i as u32));
        // Each thread's scratch grows with its own share only.
        assert!(out.iter().all(|(_, n)| *n <= 1000));
        assert!(super::map(Vec::<u32>::new(), |i, _: &mut ()| i).is_empty());
    }
}
