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

use super::BpfError;

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
            return Err(fault("not an array"));
        };
        let info = data.info().map_err(|source| BpfError::Map {
            name: maps::IDENTITY_INDEX,
            source,
        })?;
        if (info.value_size(), info.max_entries()) != (8, identity_index::ENTRIES) {
            return Err(fault(&format!(
                "{} entries of {} bytes, not {LEN} of 8",
                info.max_entries(),
                info.value_size()
            )));
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
        .map_err(|e| fault(&format!("mmap: {e}")))?;
        Ok(Self {
            entries: mapped.cast(),
            _map: data,
        })
    }

    fn entries(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds LEN page-aligned u64s for as long as
        // `self` lives.
        unsafe { std::slice::from_raw_parts(self.entries.as_ptr(), LEN) }
    }

    fn at(&self, cgroup: u64) -> &AtomicU64 {
        &self.entries()[identity_index::position(cgroup) as usize]
    }

    /// Holds `cgroup`'s binding to `slot` when its entry is free or its
    /// own (call after the hash has it); otherwise the hash alone does.
    pub fn bind(&self, cgroup: u64, slot: u32) {
        let Some(new) = identity_index::entry(cgroup, slot) else {
            return;
        };
        let at = self.at(cgroup);
        let old = at.load(Ordering::Acquire);
        let position = identity_index::position(cgroup);
        if old == 0 || identity_index::cgroup(old, position) == Some(cgroup) {
            at.store(new, Ordering::Release);
        }
    }

    /// Drops `cgroup`'s entry, if it has one (call before the hash drops
    /// the binding).
    pub fn unbind(&self, cgroup: u64) {
        let at = self.at(cgroup);
        let old = at.load(Ordering::Acquire);
        if identity_index::cgroup(old, identity_index::position(cgroup)) == Some(cgroup) {
            at.store(0, Ordering::Release);
        }
    }

    /// Makes every entry a binding of `bindings` (the hash's): an entry
    /// that is not is cleared, and bindings go where entries are free.
    pub fn rebuild(&self, bindings: &BTreeMap<u64, u32>) {
        for (position, at) in (0..).zip(self.entries()) {
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

fn fault(message: &str) -> BpfError {
    BpfError::Unusable {
        name: maps::IDENTITY_INDEX,
        message: message.to_owned(),
    }
}
