//! The pinned event maps: the ring buffer, the settings the programs read,
//! and the per-CPU count of records that did not fit.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use idgate_common::{EventSettings, SAMPLE_ALL, maps};

use super::EventsError;

/// Handles on the event maps of the programs pinned in a pin directory.
pub struct EventMaps {
    pub ring: RingBuf<MapData>,
    settings: Array<MapData, EventSettings>,
    drops: PerCpuArray<MapData, u64>,
}

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, EventsError> {
    let err = |source| EventsError::Map { name, source };
    Map::from_map_data(MapData::from_pin(pin_dir.join(name)).map_err(err)?).map_err(err)
}

impl EventMaps {
    /// Opens the maps by their pins (put there by `bpf::install`).
    pub fn open(pin_dir: &Path) -> Result<Self, EventsError> {
        let err = |name| move |source| EventsError::Map { name, source };
        Ok(Self {
            ring: RingBuf::try_from(open(pin_dir, maps::EVENTS)?).map_err(err(maps::EVENTS))?,
            settings: Array::try_from(open(pin_dir, maps::EVENT_SETTINGS)?)
                .map_err(err(maps::EVENT_SETTINGS))?,
            drops: PerCpuArray::try_from(open(pin_dir, maps::EVENT_DROPS)?)
                .map_err(err(maps::EVENT_DROPS))?,
        })
    }

    /// Records allow decisions at `rate` (0 none, 1 all; checked by the
    /// configuration).
    pub fn set_allow_sample_rate(&mut self, rate: f64) -> Result<(), EventsError> {
        let settings = EventSettings {
            allow_sample: allow_sample_threshold(rate),
        };
        self.settings
            .set(0, settings, 0)
            .map_err(|source| EventsError::Map {
                name: maps::EVENT_SETTINGS,
                source,
            })
    }

    /// Records dropped since the maps were made, over all CPUs.
    pub fn drops(&self) -> Result<u64, EventsError> {
        let per_cpu = self.drops.get(&0, 0).map_err(|source| EventsError::Map {
            name: maps::EVENT_DROPS,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }
}

/// Readable when the ring buffer has records.
impl AsRawFd for EventMaps {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// The threshold the programs compare a random `u32` with.
fn allow_sample_threshold(rate: f64) -> u64 {
    // Exact at both ends: 0 records none, 1 every one.
    (rate.clamp(0.0, 1.0) * SAMPLE_ALL as f64).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_threshold_is_exact_at_the_ends() {
        assert_eq!(allow_sample_threshold(0.0), 0);
        assert_eq!(allow_sample_threshold(1.0), SAMPLE_ALL);
        assert!(allow_sample_threshold(1.0) > u64::from(u32::MAX));
        assert_eq!(allow_sample_threshold(0.5), SAMPLE_ALL / 2);
        // The smallest positive rate still records something.
        assert!(allow_sample_threshold(1e-9) > 0);
    }
}
