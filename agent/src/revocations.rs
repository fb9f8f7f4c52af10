//! The revoked identities, kept in a file so a revocation holds across
//! agent restarts and reboots (the kernel holds it meanwhile in the pinned
//! slot state), until an operator lifts it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::identity::SpiffeId;

/// Errors reading or writing the revocation file.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("revocation file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("revocation file {path} is corrupt: {id:?}: {source}")]
    Id {
        path: PathBuf,
        id: String,
        source: crate::identity::SpiffeIdError,
    },
}

/// The set of revoked SPIFFE IDs and where it is kept.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    ids: BTreeSet<SpiffeId>,
}

impl Revocations {
    /// Reads `state_dir/revoked.json` (no file: nothing revoked).
    pub fn load(state_dir: &Path) -> Result<Self, RevocationError> {
        let path = state_dir.join("revoked.json");
        let ids = match std::fs::read(&path) {
            Ok(bytes) => {
                let raw: Vec<String> =
                    serde_json::from_slice(&bytes).map_err(|source| RevocationError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                raw.into_iter()
                    .map(|id| {
                        id.parse().map_err(|source| RevocationError::Id {
                            path: path.clone(),
                            id,
                            source,
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => return Err(RevocationError::Io { path, source }),
        };
        Ok(Self { path, ids })
    }

    pub fn ids(&self) -> &BTreeSet<SpiffeId> {
        &self.ids
    }

    pub fn contains(&self, id: &SpiffeId) -> bool {
        self.ids.contains(id)
    }

    /// Adds or removes an id and writes the file (atomically, by rename)
    /// before the change takes effect. Returns whether anything changed.
    pub fn set(&mut self, id: &SpiffeId, revoked: bool) -> Result<bool, RevocationError> {
        let mut next = self.ids.clone();
        let changed = if revoked {
            next.insert(id.clone())
        } else {
            next.remove(id)
        };
        if changed {
            self.write(&next)?;
            self.ids = next;
        }
        Ok(changed)
    }

    fn write(&self, ids: &BTreeSet<SpiffeId>) -> Result<(), RevocationError> {
        let io = |source| RevocationError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let list: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
        let text = serde_json::to_vec_pretty(&list).expect("strings serialise");
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_from_disk_and_rejects_corruption() {
        let dir = std::env::temp_dir().join(format!("idgate-revoked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id: SpiffeId = "spiffe://example.org/agent".parse().unwrap();
        let mut r = Revocations::load(&dir).unwrap();
        assert!(r.set(&id, true).unwrap());
        assert!(!r.set(&id, true).unwrap());
        assert!(Revocations::load(&dir).unwrap().contains(&id));
        assert!(r.set(&id, false).unwrap());
        assert!(!Revocations::load(&dir).unwrap().contains(&id));
        std::fs::write(dir.join("revoked.json"), "[\"http://x\"]").unwrap();
        let e = Revocations::load(&dir).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("http://x"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
