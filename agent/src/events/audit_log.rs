//! The JSON-lines audit log, rotated by size: `audit.log` is written,
//! `audit.log.1` is the newest full file, up to `audit.log.<keep>`.
//! Rotation happens between lines, so no line is split across files, and no
//! file grows past the limit unless a single line is longer than it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A write or rotation that failed; the log goes on.
#[derive(Debug, thiserror::Error)]
pub enum AuditLogError {
    #[error("audit log {path}: {source}; {lost} records not written")]
    Write {
        path: PathBuf,
        lost: u64,
        source: std::io::Error,
    },
    #[error("audit log {path}: cannot rotate ({source}); writing on to the same file")]
    Rotate {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuditLogError {
    /// Records this error cost.
    pub fn lost(&self) -> u64 {
        match self {
            Self::Write { lost, .. } => *lost,
            Self::Rotate { .. } => 0,
        }
    }
}

/// An open audit log. Lines are queued by [`AuditLog::push`] and written
/// by [`AuditLog::flush`], one write per batch.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Only a regular file is rotated: not `/dev/stdout`, a pipe or a device.
    rotates: bool,
    pending: Vec<u8>,
    pending_lines: u64,
}

fn open_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl AuditLog {
    /// Opens (or creates, with its directory) the log for appending.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_file(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            keep,
            file,
            size: meta.len(),
            rotates: meta.is_file(),
            pending: Vec::new(),
            pending_lines: 0,
        })
    }

    /// Queues one line (with its newline). When the line would take the
    /// file past the limit, what is queued is written and the file rotated
    /// first; an error doing so is returned, and the line is queued anyway.
    pub fn push(&mut self, line: &[u8]) -> Result<(), AuditLogError> {
        let queued = self.size + self.pending.len() as u64;
        let mut result = Ok(());
        if self.rotates && queued > 0 && queued + line.len() as u64 > self.max_bytes {
            result = self.flush().and_then(|()| self.rotate());
        }
        self.pending.extend_from_slice(line);
        self.pending_lines += 1;
        result
    }

    /// Writes every queued line. On an error they are dropped and counted.
    pub fn flush(&mut self) -> Result<(), AuditLogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        let lost = std::mem::take(&mut self.pending_lines);
        let written = self.pending.len() as u64;
        self.pending.clear();
        match result {
            Ok(()) => {
                self.size += written;
                Ok(())
            }
            Err(source) => Err(AuditLogError::Write {
                path: self.path.clone(),
                lost,
                source,
            }),
        }
    }

    /// `audit.log.<n-1>` becomes `.<n>` down to the live file becoming
    /// `.1`; the oldest beyond `keep` is overwritten. When this fails the
    /// same file is written on, and rotation is tried again after another
    /// `max_bytes`.
    fn rotate(&mut self) -> Result<(), AuditLogError> {
        let result = (|| {
            for n in (1..self.keep).rev() {
                rename_if_there(&numbered(&self.path, n), &numbered(&self.path, n + 1))?;
            }
            if self.keep > 0 {
                rename_if_there(&self.path, &numbered(&self.path, 1))?;
            } else {
                std::fs::remove_file(&self.path)?;
            }
            self.file = open_file(&self.path)?;
            Ok(())
        })();
        self.size = 0;
        result.map_err(|source| AuditLogError::Rotate {
            path: self.path.clone(),
            source,
        })
    }
}

/// The files of the log at `path` that exist, oldest first: the rotated
/// `audit.log.<n>` down to `audit.log.1`, then `audit.log`.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..)
        .map(|n| numbered(path, n))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    if path.exists() {
        files.push(path.to_owned());
    }
    files
}

/// `audit.log` -> `audit.log.<n>`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rename_if_there(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("idgate-audit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn line(i: u32) -> Vec<u8> {
        format!("{{\"n\":{i:04}}}\n").into_bytes() // 11 bytes
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotates_between_lines_and_keeps_the_newest_files() {
        let dir = TempDir::new("rotate");
        let path = dir.0.join("sub/audit.log");
        // Three lines per file.
        let mut log = AuditLog::open(&path, 33, 2).unwrap();
        for i in 0..10 {
            log.push(&line(i)).unwrap();
            if i % 4 == 0 {
                log.flush().unwrap();
            }
        }
        log.flush().unwrap();
        // Files of lines 0-2, 3-5, 6-8, 9: the oldest has gone.
        assert_eq!(read(&path), "{\"n\":0009}\n");
        assert_eq!(read(&numbered(&path, 1)).lines().count(), 3);
        assert!(read(&numbered(&path, 1)).starts_with("{\"n\":0006}"));
        assert!(read(&numbered(&path, 2)).starts_with("{\"n\":0003}"));
        assert!(!numbered(&path, 3).exists());
        for n in 1..=2 {
            assert!(std::fs::metadata(numbered(&path, n)).unwrap().len() <= 33);
        }
    }

    #[test]
    fn lists_the_files_oldest_first() {
        let dir = TempDir::new("files");
        let path = dir.0.join("audit.log");
        assert!(files(&path).is_empty());
        let mut log = AuditLog::open(&path, 11, 3).unwrap();
        for i in 0..3 {
            log.push(&line(i)).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(
            files(&path),
            [numbered(&path, 2), numbered(&path, 1), path.clone()]
        );
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_its_size() {
        let dir = TempDir::new("append");
        let path = dir.0.join("audit.log");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(&path, line(0).repeat(2)).unwrap();
        let mut log = AuditLog::open(&path, 33, 1).unwrap();
        log.push(&line(1)).unwrap();
        log.push(&line(2)).unwrap();
        log.flush().unwrap();
        assert_eq!(read(&path), "{\"n\":0002}\n");
        assert_eq!(read(&numbered(&path, 1)).lines().count(), 3);
    }

    #[test]
    fn keep_zero_only_truncates() {
        let dir = TempDir::new("keep0");
        let path = dir.0.join("audit.log");
        let mut log = AuditLog::open(&path, 11, 0).unwrap();
        for i in 0..3 {
            log.push(&line(i)).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(read(&path), "{\"n\":0002}\n");
        assert!(!numbered(&path, 1).exists());
    }

    #[test]
    fn a_full_device_loses_lines_counted_and_is_never_rotated() {
        let mut log = AuditLog::open(Path::new("/dev/full"), 1, 3).unwrap();
        log.push(&line(0)).unwrap();
        log.push(&line(1)).unwrap();
        let e = log.flush().unwrap_err();
        assert_eq!(e.lost(), 2);
        assert!(e.to_string().contains("/dev/full"), "{e}");
        // The next batch is tried again, and counted alone.
        log.push(&line(2)).unwrap();
        assert_eq!(log.flush().unwrap_err().lost(), 1);
    }

    #[test]
    fn an_unwritable_path_fails_at_open() {
        assert!(AuditLog::open(Path::new("/proc/idgate-no/audit.log"), 10, 1).is_err());
    }
}
