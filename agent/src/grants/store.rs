//! Grants kept in `state_dir/grants.json`, with the boot they were made
//! in: their expiries are on the boot-time clock, which starts again at
//! every boot. Every change is written atomically (a temporary file,
//! synced, renamed over the old one, and the directory synced) before it
//! takes effect.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::Grant;

/// The file's name under `state_dir`.
pub const FILE: &str = "grants.json";

/// The grants file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("grants file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("grants file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    /// `/proc/sys/kernel/random/boot_id` of the boot the expiries are of.
    pub boot_id: String,
    /// The id the next grant gets: ids are never reused.
    pub next_id: u32,
    pub grants: Vec<Grant>,
}

/// The grants found at start, sorted out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub next_id: u32,
    /// Still running.
    pub live: Vec<Grant>,
    /// Expired while no agent ran.
    pub expired: Vec<Grant>,
    /// Of an earlier boot: their expiries mean nothing now.
    pub other_boot: Vec<Grant>,
}

/// The grants file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    boot_id: String,
}

impl Store {
    pub fn new(state_dir: &Path, boot_id: String) -> Self {
        Self {
            path: state_dir.join(FILE),
            boot_id,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file (none: no grants) and sorts its grants by whether
    /// they still run at `now_boot`.
    pub fn load(&self, now_boot: u64) -> Result<Loaded, StoreError> {
        let saved: Saved = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(source) => return Err(self.io(source)),
        };
        let mut loaded = Loaded {
            next_id: saved.next_id.max(1),
            ..Loaded::default()
        };
        for g in saved.grants {
            if saved.boot_id != self.boot_id {
                loaded.other_boot.push(g);
            } else if g.expiry_boot_ns <= now_boot {
                loaded.expired.push(g);
            } else {
                loaded.live.push(g);
            }
        }
        Ok(loaded)
    }

    /// Replaces the file with `grants`, atomically and durably.
    pub fn save<'a>(
        &self,
        next_id: u32,
        grants: impl IntoIterator<Item = &'a Grant>,
    ) -> Result<(), StoreError> {
        let saved = Saved {
            boot_id: self.boot_id.clone(),
            next_id,
            grants: grants.into_iter().cloned().collect(),
        };
        let text = serde_json::to_vec_pretty(&saved).expect("grants serialise");
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::model::{GrantProtocol, Ports};
    use std::time::SystemTime;

    fn grant(id: u32, expiry: u64) -> Grant {
        Grant {
            id,
            identity: "spiffe://example.org/agent".parse().unwrap(),
            to: "10.0.0.0/8".parse().unwrap(),
            ports: Ports::ALL,
            protocol: GrantProtocol::Tcp,
            granted_by: 1000,
            granted_at: SystemTime::UNIX_EPOCH,
            expiry_boot_ns: expiry,
            reason: Some("ticket 1".into()),
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("idgate-grants-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn live_and_expired_grants_are_told_apart_and_ids_never_come_back() {
        let d = dir("expiry");
        let store = Store::new(&d, "boot-a".into());
        assert_eq!(
            store.load(5).unwrap(),
            Loaded {
                next_id: 1,
                ..Loaded::default()
            }
        );
        store.save(4, &[grant(1, 100), grant(3, 200)]).unwrap();
        // Written whole: no temporary file is left beside it.
        assert!(!d.join("grants.json.tmp").exists());
        let loaded = store.load(150).unwrap();
        assert_eq!(loaded.next_id, 4);
        assert_eq!(loaded.live, vec![grant(3, 200)]);
        assert_eq!(loaded.expired, vec![grant(1, 100)]);
        assert!(loaded.other_boot.is_empty());
        // Exactly at its expiry a grant allows nothing: expired.
        assert_eq!(store.load(200).unwrap().expired.len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn grants_of_another_boot_are_dropped() {
        let d = dir("boot");
        Store::new(&d, "boot-a".into())
            .save(2, &[grant(1, u64::MAX)])
            .unwrap();
        let loaded = Store::new(&d, "boot-b".into()).load(0).unwrap();
        assert_eq!(loaded.other_boot, vec![grant(1, u64::MAX)]);
        assert!(loaded.live.is_empty());
        // The id counter goes on across boots.
        assert_eq!(loaded.next_id, 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_corruption_is_named() {
        let d = dir("atomic");
        let store = Store::new(&d, "boot-a".into());
        store.save(2, &[grant(1, 100)]).unwrap();
        // The temporary file's place is taken by a directory: the write
        // fails, and the file keeps what it held.
        std::fs::create_dir(d.join("grants.json.tmp")).unwrap();
        assert!(store.save(3, &[grant(1, 100), grant(2, 100)]).is_err());
        assert_eq!(store.load(0).unwrap().live, vec![grant(1, 100)]);
        std::fs::remove_dir(d.join("grants.json.tmp")).unwrap();
        std::fs::write(d.join("grants.json"), "{").unwrap();
        let e = store.load(0).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("grants.json"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
