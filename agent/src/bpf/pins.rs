//! Second handles on every pinned map and link, held while the agent runs,
//! so that a pin removed by hand is noticed and put back. (Without the
//! agent's handles, removing a link's pin detaches it; removing a map's
//! pin would make the next agent create a new, empty map.)

use std::path::{Path, PathBuf};

use aya::maps::MapData;
use aya::programs::links::{FdLink, PinnedLink};
use idgate_common::maps;

use super::BpfError;

/// The pins of one agent's maps and links.
pub struct Pins {
    maps: Vec<(PathBuf, MapData)>,
    links: Vec<(PathBuf, Option<PinnedLink>)>,
}

impl Pins {
    /// Opens every map pinned in `pin_dir` and every link in `links`.
    pub fn open(pin_dir: &Path, links: Vec<PathBuf>) -> Result<Self, BpfError> {
        let mut me = Self {
            maps: Vec::new(),
            links: Vec::new(),
        };
        for name in maps::ALL {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| BpfError::Map { name, source })?;
            me.maps.push((path, data));
        }
        for path in links {
            let link = PinnedLink::from_pin(&path).map_err(|e| BpfError::Link {
                path: path.clone(),
                what: "cannot open the pin",
                source: e.into(),
            })?;
            me.links.push((path, Some(link)));
        }
        Ok(me)
    }

    /// Puts back every pin that is gone; returns the paths restored.
    pub fn restore(&mut self) -> Result<Vec<PathBuf>, BpfError> {
        let mut restored = Vec::new();
        for (path, data) in &self.maps {
            if !path.exists() {
                data.pin(path).map_err(|e| BpfError::Link {
                    path: path.clone(),
                    what: "cannot pin the map again",
                    source: e.into(),
                })?;
                restored.push(path.clone());
            }
        }
        for (path, slot) in &mut self.links {
            if !path.exists() {
                let link = FdLink::from(slot.take().expect("a link is held"));
                let pinned = link.pin(&*path).map_err(|e| BpfError::Link {
                    path: path.clone(),
                    what: "cannot pin the link again",
                    source: e.into(),
                })?;
                *slot = Some(pinned);
                restored.push(path.clone());
            }
        }
        Ok(restored)
    }
}
