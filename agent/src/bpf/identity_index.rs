//! The agent's side of `IDG_IDENTITY_INDEX` (see `idgate_common::identity_index`):
//! the array is mapped into this process and each entry is changed with
//! one aligned 8-byte atomic store, so a program reads an entry as it was
//! before a change or after it, never half of each.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Map, MapData};
use idgate_common::{identity_index, maps};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::{BpfError, MapProblem};

const LEN: usize = identity_index::ENTRIES as usize;
const BYTES: usize = LEN * size_of::<u64>();

pub struct IdentityIndex {
    entries: NonNull<AtomicU64>,
    /// The map; the mapping keeps it alive too.
    _map: MapData,
}

// SAFETY: the mapping is shared memory of atomics; every access goes
// through `&AtomicU64`.
unsafe impl Send for IdentityIndex {}
unsafe impl Sync for IdentityIndex {}

impl IdentityIndex {
    /// Maps the array `map` (made with `BPF_F_MMAPABLE`) into this process.
    pub fn new(map: Map) -> Result<Self, BpfError> {
        let Map::Array(data) = map else {
            return Err(fault(MapProblem::NotArray));
        };
        let info = data.info().map_err(|source| BpfError::Map {
            name: maps::IDENTITY_INDEX,
            source,
        })?;
        if (info.value_size(), info.max_entries()) != (8, identity_index::ENTRIES) {
            return Err(fault(MapProblem::Shape {
                entries: info.max_entries(),
                value_size: info.value_size(),
                want: LEN,
            }));
        }
        // SAFETY: a new shared mapping of the map's whole value area, which
        // nothing else in this process maps; it is unmapped on drop.
        let mapped = unsafe {
            mmap(
                None,
                NonZeroUsize::new(BYTES).expect("not zero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| fault(MapProblem::Mmap(e)))?;
        Ok(Self {
            entries: mapped.cast(),
            _map: data,
        })
    }

    fn entries(&self) -> Entries<'_> {
        // SAFETY: the mapping holds LEN page-aligned u64s for as long as
        // `self` lives.
        Entries(unsafe { std::slice::from_raw_parts(self.entries.as_ptr(), LEN) })
    }

    /// Holds `cgroup`'s binding to `slot` when its entry is free or its
    /// own (call after the hash has it); otherwise the hash alone does.
    pub fn bind(&self, cgroup: u64, slot: u32) {
        self.entries().bind(cgroup, slot);
    }

    /// Drops `cgroup`'s entry, if it has one (call before the hash drops
    /// the binding).
    pub fn unbind(&self, cgroup: u64) {
        self.entries().unbind(cgroup);
    }

    /// Makes every entry a binding of `bindings` (the hash's): an entry
    /// that is not is cleared, and bindings go where entries are free.
    pub fn rebuild(&self, bindings: &BTreeMap<u64, u32>) {
        self.entries().rebuild(bindings);
    }
}

/// The index's rules over its entries, wherever they are.
struct Entries<'a>(&'a [AtomicU64]);

impl Entries<'_> {
    fn at(&self, cgroup: u64) -> &AtomicU64 {
        &self.0[identity_index::position(cgroup) as usize]
    }

    fn bind(&self, cgroup: u64, slot: u32) {
        let Some(new) = identity_index::entry(cgroup, slot) else {
            return;
        };
        let at = self.at(cgroup);
        let old = at.load(Ordering::Acquire);
        if old == 0 || identity_index::cgroup(old, identity_index::position(cgroup)) == Some(cgroup)
        {
            at.store(new, Ordering::Release);
        }
    }

    fn unbind(&self, cgroup: u64) {
        let at = self.at(cgroup);
        let old = at.load(Ordering::Acquire);
        if identity_index::cgroup(old, identity_index::position(cgroup)) == Some(cgroup) {
            at.store(0, Ordering::Release);
        }
    }

    fn rebuild(&self, bindings: &BTreeMap<u64, u32>) {
        for (position, at) in (0..).zip(self.0) {
            let old = at.load(Ordering::Acquire);
            let kept = identity_index::cgroup(old, position).is_some_and(|cgroup| {
                bindings
                    .get(&cgroup)
                    .and_then(|&slot| identity_index::entry(cgroup, slot))
                    == Some(old)
            });
            if old != 0 && !kept {
                at.store(0, Ordering::Release);
            }
        }
        for (&cgroup, &slot) in bindings {
            self.bind(cgroup, slot);
        }
    }
}

impl Drop for IdentityIndex {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer borrowed.
        if let Err(e) = unsafe { munmap(self.entries.cast(), BYTES) } {
            tracing::warn!(error = %e, "unmapping the identity index");
        }
    }
}

fn fault(source: MapProblem) -> BpfError {
    BpfError::Unusable {
        name: maps::IDENTITY_INDEX,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot a program would find for `cgroup` in the index alone.
    fn found(entries: &Entries<'_>, cgroup: u64) -> Option<u32> {
        identity_index::slot(entries.at(cgroup).load(Ordering::Acquire), cgroup)
    }

    #[test]
    fn a_taken_entry_is_left_to_its_cgroup_and_the_other_goes_to_the_hash() {
        let memory: Vec<AtomicU64> = (0..LEN).map(|_| AtomicU64::new(0)).collect();
        let entries = Entries(&memory);
        let (a, b) = (0x1_0000_2345, 0x1_0001_2345);
        entries.bind(a, 7);
        entries.bind(b, 9);
        assert_eq!((found(&entries, a), found(&entries, b)), (Some(7), None));
        // Another cgroup's unbind leaves the entry; a rebind moves it.
        entries.unbind(b);
        entries.bind(a, 8);
        assert_eq!(found(&entries, a), Some(8));
        entries.unbind(a);
        assert_eq!(found(&entries, a), None);
        assert!(memory.iter().all(|e| e.load(Ordering::Acquire) == 0));
        // Once free, the entry takes the next cgroup bound there.
        entries.bind(b, 9);
        assert_eq!(found(&entries, b), Some(9));
    }

    #[test]
    fn a_rebuild_keeps_only_what_the_hash_holds() {
        let memory: Vec<AtomicU64> = (0..LEN).map(|_| AtomicU64::new(0)).collect();
        let entries = Entries(&memory);
        let (kept, moved, gone, missing) = (0x10, 0x20, 0x30, 0x40);
        for cgroup in [kept, moved, gone] {
            entries.bind(cgroup, 1);
        }
        let hash = BTreeMap::from([(kept, 1), (moved, 2), (missing, 3)]);
        entries.rebuild(&hash);
        assert_eq!(found(&entries, kept), Some(1));
        assert_eq!(found(&entries, moved), Some(2));
        assert_eq!(found(&entries, gone), None);
        assert_eq!(found(&entries, missing), Some(3));
        let held = memory
            .iter()
            .filter(|e| e.load(Ordering::Acquire) != 0)
            .count();
        assert_eq!(held, 3);
    }
}
