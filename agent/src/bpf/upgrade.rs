//! What an older agent left under the pin directory that this release
//! cannot use as it is. Both kinds are unpinned at start, before the
//! object is loaded: the old programs keep the old maps for as long as
//! they run, and are replaced (see `loader`).
//!
//! - Maps this release no longer has (`IDG_` names not in [`maps::ALL`]):
//!   unpinned, so that their memory is freed.
//! - Arrays of tries whose tries have another layout than this release's
//!   ([`TRIE_LAYOUTS`]): they hold policy only, which the agent writes in
//!   full before it answers, so they are made anew. Until the first write,
//!   the new programs find no trie and deny (`no_policy`): the upgrade
//!   fails closed.

use std::path::Path;

use aya::maps::{Map, MapData, MapError};
use idgate_common::{GENERATIONS, UNKNOWN_SLOT, maps, slot_policy_index};

use super::maps::{Outer, TRIE_LAYOUTS, map_err};
use super::{BpfError, bpffs};

/// Removes pins of maps that an older agent made and this one no longer
/// has.
pub fn remove_retired_maps(pin_dir: &Path) -> Result<(), BpfError> {
    for (name, path) in bpffs::pins(pin_dir)? {
        if name.starts_with("IDG_") && !maps::ALL.contains(&name.as_str()) {
            bpffs::unpin(&path)?;
            tracing::warn!(
                map = name,
                "removed the pin of a map this version no longer has"
            );
        }
    }
    Ok(())
}

/// Removes pins of arrays whose tries are not of this release's layout;
/// true when there was one (then no pinned program may be adopted: a
/// program's tag does not cover the maps it uses).
pub fn remove_changed_tries(pin_dir: &Path) -> Result<bool, BpfError> {
    let mut changed = false;
    for &(name, key_size, value_size) in &TRIE_LAYOUTS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = MapData::from_pin(&path).map_err(map_err(name))?;
        let Some(trie) = any_trie(&Outer::new(name, Map::ArrayOfMaps(pinned))?)? else {
            continue;
        };
        let info = trie.info().map_err(map_err(name))?;
        if (info.key_size(), info.value_size()) != (key_size, value_size) {
            bpffs::unpin(&path)?;
            tracing::warn!(
                map = name,
                old_key_size = info.key_size(),
                old_value_size = info.value_size(),
                key_size,
                value_size,
                "an older version's tries have another layout: the array is made anew"
            );
            changed = true;
        }
    }
    Ok(changed)
}

/// A trie the array holds: the unknown workload's, which every policy
/// write sets, of either generation.
fn any_trie(outer: &Outer) -> Result<Option<MapData>, BpfError> {
    for generation in 0..GENERATIONS {
        match outer.get(slot_policy_index(generation, UNKNOWN_SLOT)) {
            Ok(trie) => return Ok(Some(trie)),
            Err(BpfError::Map {
                source: MapError::KeyNotFound,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
