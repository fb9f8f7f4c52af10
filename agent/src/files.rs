//! Files and sockets: operator files that may be one file or a directory
//! of them, private files (keys, secrets), and the Unix sockets the agent
//! serves.

use std::path::{Path, PathBuf};

/// `path` itself when it is a file, or every `*.toml` file directly in it
/// when it is a directory, in name order.
pub fn toml_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        // Reading it later reports a missing or unreadable file by name.
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A file's device, inode, size and change times: while they stay the
/// same, its text does (the kernel sets the change time on every write,
/// and it cannot be set back from user space). A stamp is taken only of
/// a file whose last change was at least [`SETTLED`] before: a write in
/// the same clock tick as a read before it would leave the times as they
/// were (git's "racy" files). A file replaced by a rename, or a symlink
/// pointed elsewhere (a Kubernetes ConfigMap update), has another inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long ago a file's last change must be for it to be stamped.
pub const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

impl FileStamp {
    /// The stamp of `meta` (take it from the opened file: an open makes
    /// NFS revalidate its cached attributes), now, if the file has
    /// settled; `None`: read it again next time.
    pub fn settled(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let changed = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(meta.ctime()).ok()?,
                u32::try_from(meta.ctime_nsec()).ok()?,
            );
        let age = std::time::SystemTime::now().duration_since(changed).ok()?;
        (age >= SETTLED).then(|| Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// Why a file may not hold a key or a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotPrivate {
    #[error("is not a regular file (it is {0})")]
    NotRegular(&'static str),
    #[error(
        "has mode {0:04o}: its group or others have access to it; make it its owner's only (chmod 600)"
    )]
    Mode(u32),
}

/// Checks that a file (by its metadata) may hold a key or a secret: a
/// regular file that neither its group nor others may read, write or run.
pub fn check_private(meta: &std::fs::Metadata) -> Result<(), NotPrivate> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let t = meta.file_type();
    if !t.is_file() {
        return Err(NotPrivate::NotRegular(if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a file"
        }));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(NotPrivate::Mode(mode));
    }
    Ok(())
}

/// Binds a Unix socket at `path` with `mode`, making its directory and
/// replacing a stale socket file an earlier agent left. Non-blocking, for
/// the async runtime.
pub fn bind_unix_socket(
    path: &Path,
    mode: u32,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
