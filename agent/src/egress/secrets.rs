//! The secrets of `Header` credentials, read from their files: only a
//! regular file that neither group nor others may read, read again when it
//! changed. A secret's value is never formatted: [`Secret`] prints as
//! `Secret(..)`, and errors name the file, never what it holds.
//!
//! A secret file's path is absolute. Under systemd, `LoadCredential=NAME:PATH`
//! in the agent's unit puts it at `/run/credentials/<unit>/NAME`, which no
//! other unit can read; point `secret_file` there.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http::HeaderValue;

use crate::files::FileStamp;

/// The most a secret file may hold.
const MAX_SECRET: u64 = 64 * 1024;

/// Why a secret cannot be used. Never holds the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} {problem}")]
    NotPrivate {
        path: PathBuf,
        problem: crate::files::NotPrivate,
    },
    #[error("secret file {path} is larger than {MAX_SECRET} bytes")]
    TooLarge { path: PathBuf },
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
    #[error("the secret of {path} cannot be an HTTP header value (control characters in it?)")]
    NotHeaderValue { path: PathBuf },
}

/// A secret's bytes. Its `Debug` prints `Secret(..)`; it has no `Display`.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// `prefix` then the secret, as a header value marked sensitive (never
    /// indexed by HPACK, printed as `Sensitive`). `path` is named in the
    /// error.
    pub fn header_value(&self, prefix: &str, path: &Path) -> Result<HeaderValue, SecretError> {
        let mut bytes = Vec::with_capacity(prefix.len() + self.0.len());
        bytes.extend_from_slice(prefix.as_bytes());
        bytes.extend_from_slice(&self.0);
        let mut value =
            HeaderValue::from_bytes(&bytes).map_err(|_| SecretError::NotHeaderValue {
                path: path.to_owned(),
            })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// The secret files read so far, each with the stamp it had then.
#[derive(Default)]
pub struct SecretFiles {
    read: Mutex<HashMap<PathBuf, (FileStamp, Secret)>>,
}

impl SecretFiles {
    /// The secret `path` holds now, less one trailing newline. The file is
    /// opened and checked every time (a file whose mode was widened is
    /// refused at once) and read again unless its stamp is the one it had
    /// when it was read (see [`FileStamp`]).
    pub fn get(&self, path: &Path) -> Result<Secret, SecretError> {
        let (file, meta) = open_private(path)?;
        let stamp = FileStamp::settled(&meta);
        if let Some(stamp) = stamp
            && let Some((s, secret)) = self.lock().get(path)
            && *s == stamp
        {
            return Ok(secret.clone());
        }
        let mut bytes = read_all(file, &meta, path)?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(SecretError::Empty {
                path: path.to_owned(),
            });
        }
        let secret = Secret(bytes.into());
        match stamp {
            Some(stamp) => self.lock().insert(path.to_owned(), (stamp, secret.clone())),
            None => self.lock().remove(path),
        };
        Ok(secret)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (FileStamp, Secret)>> {
        self.read.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The whole of a private file (a regular file neither group nor others
/// may read), such as a key.
pub(super) fn read_private(path: &Path) -> Result<Vec<u8>, SecretError> {
    let (file, meta) = open_private(path)?;
    read_all(file, &meta, path)
}

/// Opens `path` and checks that it is a private file.
fn open_private(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), SecretError> {
    let err = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    // Non-blocking, so that a FIFO put there does not hang the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    crate::files::check_private(&meta).map_err(|problem| SecretError::NotPrivate {
        path: path.to_owned(),
        problem,
    })?;
    Ok((file, meta))
}

/// Reads an opened private file, at most [`MAX_SECRET`] bytes.
fn read_all(
    file: std::fs::File,
    meta: &std::fs::Metadata,
    path: &Path,
) -> Result<Vec<u8>, SecretError> {
    let too_large = || SecretError::TooLarge {
        path: path.to_owned(),
    };
    if meta.len() > MAX_SECRET {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECRET + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_SECRET {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("idgate-secrets-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, bytes: &[u8], mode: u32) {
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn value(s: &Secret) -> Vec<u8> {
        s.header_value("", Path::new("x"))
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn reads_trims_and_rereads() {
        let d = dir("reread");
        let path = d.join("key");
        write(&path, b"sk-one\n", 0o600);
        let files = SecretFiles::default();
        let s = files.get(&path).unwrap();
        assert_eq!(value(&s), b"sk-one");
        assert_eq!(format!("{s:?}"), "Secret(..)");
        let v = s.header_value("Bearer ", &path).unwrap();
        assert_eq!(v.as_bytes(), b"Bearer sk-one");
        assert!(v.is_sensitive());
        // Replaced (another inode): read again.
        let tmp = d.join("key.new");
        write(&tmp, b"sk-two\r\n", 0o600);
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(value(&files.get(&path).unwrap()), b"sk-two");
        // Only one newline is trimmed: the other stays, and is no header
        // value.
        write(&path, b"sk-three\n\n", 0o600);
        let e = files.get(&path).unwrap().header_value("", &path);
        assert!(
            matches!(e, Err(SecretError::NotHeaderValue { .. })),
            "{e:?}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_what_others_may_read_or_is_no_file() {
        let d = dir("refuse");
        let path = d.join("key");
        write(&path, b"sk-secret-value\n", 0o600);
        let files = SecretFiles::default();
        files.get(&path).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = files.get(&path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(&format!("{mode:04o}")),
                "{e}"
            );
            assert!(!e.contains("sk-secret-value"), "{e}");
        }
        let e = files.get(&d).unwrap_err();
        assert!(matches!(e, SecretError::NotPrivate { .. }), "{e}");
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = files.get(&fifo).unwrap_err();
        assert!(matches!(e, SecretError::NotPrivate { .. }), "{e}");
        let e = files.get(&d.join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        write(&path, b"\n", 0o600);
        assert!(matches!(files.get(&path), Err(SecretError::Empty { .. })));
        write(&path, b"two\nlines\n", 0o600);
        let e = files
            .get(&path)
            .unwrap()
            .header_value("", &path)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("lines"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
