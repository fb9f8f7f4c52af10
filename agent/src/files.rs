//! Files and sockets: operator files that may be one file or a directory
//! of them, and the Unix sockets the agent serves.

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
