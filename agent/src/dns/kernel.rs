//! The DNS path's pinned maps: the settings the programs read, the
//! namespaces where the listeners are open, the learned addresses and the
//! names they were learned for; and the egress broker's, whose listeners
//! share the DNS path's namespaces and address range.

use std::path::Path;

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, HashMap, Map, MapData, MapError, SockHash};
use idgate_common::{DnsSettings, EgressSettings, LearnedKey, LearnedValue, NameText, maps};

use crate::bpf::key_was_missing;

/// A pinned map that cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[error("map {name}: {source}")]
pub struct KernelError {
    pub name: &'static str,
    #[source]
    pub source: MapError,
}

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, KernelError> {
    let err = |source| KernelError { name, source };
    Map::from_map_data(MapData::from_pin(pin_dir.join(name)).map_err(err)?).map_err(err)
}

fn err(name: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError { name, source }
}

/// `IDG_DNS_SETTINGS` and `IDG_DNS_NETNS`: where queries are sent.
pub struct RedirectMaps {
    settings: Array<MapData, DnsSettings>,
    netns: SockHash<MapData, u64>,
}

impl RedirectMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            settings: Array::try_from(open(pin_dir, maps::DNS_SETTINGS)?)
                .map_err(err(maps::DNS_SETTINGS))?,
            netns: SockHash::try_from(open(pin_dir, maps::DNS_NETNS)?)
                .map_err(err(maps::DNS_NETNS))?,
        })
    }

    /// Turns the redirect on (with the listeners' range and port) or off.
    pub fn set(&mut self, settings: DnsSettings) -> Result<(), KernelError> {
        self.settings
            .set(0, settings, 0)
            .map_err(err(maps::DNS_SETTINGS))
    }

    /// Queries from the namespace with `cookie` go to its listeners now,
    /// for as long as `udp` is open.
    pub fn listening(&mut self, cookie: u64, udp: &impl AsRawFd) -> Result<(), KernelError> {
        self.netns
            .insert(cookie, udp.as_raw_fd(), 0)
            .map_err(err(maps::DNS_NETNS))
    }

    /// The namespace's listeners are closed: its queries fail at once.
    pub fn closed(&mut self, cookie: u64) -> Result<(), KernelError> {
        match self.netns.remove(&cookie) {
            Err(e) if !key_was_missing(&e) => Err(err(maps::DNS_NETNS)(e)),
            _ => Ok(()),
        }
    }
}

/// `IDG_EGRESS_SETTINGS` and `IDG_EGRESS_NETNS`: where connects of
/// credential rules are sent.
pub struct EgressMaps {
    settings: Array<MapData, EgressSettings>,
    netns: SockHash<MapData, u64>,
}

impl EgressMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            settings: Array::try_from(open(pin_dir, maps::EGRESS_SETTINGS)?)
                .map_err(err(maps::EGRESS_SETTINGS))?,
            netns: SockHash::try_from(open(pin_dir, maps::EGRESS_NETNS)?)
                .map_err(err(maps::EGRESS_NETNS))?,
        })
    }

    /// Turns the redirect on (with the broker's ports) or off.
    pub fn set(&mut self, settings: EgressSettings) -> Result<(), KernelError> {
        self.settings
            .set(0, settings, 0)
            .map_err(err(maps::EGRESS_SETTINGS))
    }

    /// Brokered connects from the namespace with `cookie` go to the
    /// broker there now, for as long as `listener` (its listening TCP
    /// socket) is open.
    pub fn listening(&mut self, cookie: u64, listener: &impl AsFd) -> Result<(), KernelError> {
        self.netns
            .insert(cookie, listener.as_fd().as_raw_fd(), 0)
            .map_err(err(maps::EGRESS_NETNS))
    }

    /// The namespace's broker listener is closed: its brokered connects
    /// are denied at once.
    pub fn closed(&mut self, cookie: u64) -> Result<(), KernelError> {
        match self.netns.remove(&cookie) {
            Err(e) if !key_was_missing(&e) => Err(err(maps::EGRESS_NETNS)(e)),
            _ => Ok(()),
        }
    }
}

/// What the maps hold.
pub struct Remembered {
    pub learned: Vec<(LearnedKey, LearnedValue)>,
    pub names: Vec<(u32, NameText)>,
}

/// `IDG_LEARNED` and `IDG_NAMES`.
pub struct LearnedMaps {
    learned: HashMap<MapData, LearnedKey, LearnedValue>,
    names: HashMap<MapData, u32, NameText>,
}

impl LearnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            learned: HashMap::try_from(open(pin_dir, maps::LEARNED)?)
                .map_err(err(maps::LEARNED))?,
            names: HashMap::try_from(open(pin_dir, maps::NAMES)?).map_err(err(maps::NAMES))?,
        })
    }

    /// Every learned entry and every name, as an earlier agent left them.
    pub fn read(&self) -> Result<Remembered, KernelError> {
        let learned = self
            .learned
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(maps::LEARNED))?;
        let names = self
            .names
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(maps::NAMES))?;
        Ok(Remembered { learned, names })
    }

    pub fn put(&mut self, key: &LearnedKey, value: &LearnedValue) -> Result<(), KernelError> {
        self.learned
            .insert(key, value, 0)
            .map_err(err(maps::LEARNED))
    }

    pub fn remove(&mut self, key: &LearnedKey) -> Result<(), KernelError> {
        match self.learned.remove(key) {
            Err(e) if !key_was_missing(&e) => Err(err(maps::LEARNED)(e)),
            _ => Ok(()),
        }
    }

    pub fn put_name(&mut self, id: u32, text: &NameText) -> Result<(), KernelError> {
        self.names.insert(id, text, 0).map_err(err(maps::NAMES))
    }

    pub fn remove_name(&mut self, id: u32) -> Result<(), KernelError> {
        match self.names.remove(&id) {
            Err(e) if !key_was_missing(&e) => Err(err(maps::NAMES)(e)),
            _ => Ok(()),
        }
    }
}
