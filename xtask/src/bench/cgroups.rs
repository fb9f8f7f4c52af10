//! The benchmark's cgroups: one tree below the cgroup v2 root, emptied and
//! removed in full when dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The cgroup v2 mount point, from the kernel's mount table.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            post.starts_with("cgroup2 ")
                .then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// A cgroup directory and everything that is made below it.
pub struct Tree {
    top: PathBuf,
}

impl Tree {
    /// Makes `root/name`, which must not exist yet.
    pub fn new(root: &Path, name: &str) -> Result<Self> {
        let top = root.join(name);
        if top.exists() {
            bail!("{} exists already", top.display());
        }
        std::fs::create_dir(&top).with_context(|| format!("mkdir {}", top.display()))?;
        Ok(Self { top })
    }

    /// Makes `rel` below the top (and its parents); returns its path.
    pub fn make(&self, rel: &str) -> Result<PathBuf> {
        let dir = self.top.join(rel);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    }

    /// The path of `rel` below the top.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.top.join(rel)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // Kills every process of the whole tree at once.
        let _ = std::fs::write(self.top.join("cgroup.kill"), "1");
        let mut dirs = vec![self.top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(read) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    read.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        // Breadth first: children after parents, so remove from the end.
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in dirs.iter().rev() {
            while let Err(e) = std::fs::remove_dir(dir) {
                if !dir.exists() {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "bench: warning: cannot remove cgroup {}: {e}",
                        dir.display()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
