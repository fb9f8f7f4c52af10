//! The policy generation as operators see it: a number that grows with
//! every switch of the kernel's generation, across agent restarts (kept in
//! `state_dir`). The kernel itself only flips between two buffers (0 and
//! 1), which means nothing to a reader of logs.

use std::path::{Path, PathBuf};

/// Errors reading the number's file.
#[derive(Debug, thiserror::Error)]
pub enum GenerationNumberError {
    #[error("generation file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generation file {path} does not hold a number: {text:?}")]
    Corrupt { path: PathBuf, text: String },
}

/// The last number given, and where it is kept.
#[derive(Debug)]
pub struct GenerationNumber {
    path: PathBuf,
    last: u64,
}

impl GenerationNumber {
    /// Reads `state_dir/generation` (no file: no generation yet).
    pub fn load(state_dir: &Path) -> Result<Self, GenerationNumberError> {
        let path = state_dir.join("generation");
        let last = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| GenerationNumberError::Corrupt {
                    path: path.clone(),
                    text,
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(GenerationNumberError::Io { path, source }),
        };
        Ok(Self { path, last })
    }

    /// The number of the generation now active (0 before the first).
    pub fn current(&self) -> u64 {
        self.last
    }

    /// The next number, recorded. A file that cannot be written is
    /// logged, not fatal: the kernel has switched already, and the number
    /// only names generations for people.
    pub fn advance(&mut self) -> u64 {
        self.last += 1;
        let tmp = self.path.with_extension("tmp");
        let written = self
            .path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, format!("{}\n", self.last)))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record the policy generation number; after a restart numbers may repeat");
        }
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_across_loads_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("idgate-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = GenerationNumber::load(&dir).unwrap();
        assert_eq!(n.current(), 0);
        assert_eq!(n.advance(), 1);
        assert_eq!(n.advance(), 2);
        let mut again = GenerationNumber::load(&dir).unwrap();
        assert_eq!(again.current(), 2);
        assert_eq!(again.advance(), 3);
        std::fs::write(dir.join("generation"), "x").unwrap();
        let e = GenerationNumber::load(&dir).unwrap_err();
        assert!(e.to_string().contains("does not hold a number"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
