//! Operator files that may be one file or a directory of them.

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
