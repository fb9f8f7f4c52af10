//! `IDG_GRANTS`: the operators' grants per slot (see idgate-common, step
//! 8 of the lookup). Its entries are computed by `grants`; this only reads
//! and writes them.

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};
use idgate_common::{GrantKey, GrantValue, maps};

use super::BpfError;
use super::maps::{map_err, removed};

/// An entry's key: the LPM prefix length (fixed bits included) and data.
pub type GrantEntryKey = (u32, GrantKey);

/// The pinned grants trie.
pub struct GrantMap {
    trie: LpmTrie<MapData, GrantKey, GrantValue>,
}

impl GrantMap {
    /// Opens the map pinned in `pin_dir` (the programs are in place).
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        let err = map_err(maps::GRANTS);
        let data = MapData::from_pin(pin_dir.join(maps::GRANTS)).map_err(&err)?;
        let map = Map::from_map_data(data).map_err(&err)?;
        Ok(Self {
            trie: LpmTrie::try_from(map).map_err(&err)?,
        })
    }

    /// Every entry, as an earlier agent (or this one) left them.
    pub fn read(&self) -> Result<BTreeMap<GrantEntryKey, GrantValue>, BpfError> {
        self.trie
            .iter()
            .map(|r| {
                r.map(|(k, v)| ((k.prefix_len(), k.data()), v))
                    .map_err(map_err(maps::GRANTS))
            })
            .collect()
    }

    pub fn put(&mut self, key: &GrantEntryKey, value: &GrantValue) -> Result<(), BpfError> {
        self.trie
            .insert(&Key::new(key.0, key.1), value, 0)
            .map_err(map_err(maps::GRANTS))
    }

    pub fn remove(&mut self, key: &GrantEntryKey) -> Result<(), BpfError> {
        removed(maps::GRANTS, self.trie.remove(&Key::new(key.0, key.1)))
    }
}
