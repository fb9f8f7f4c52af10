//! Debian's dnsmasq as the benchmark's DNS upstream: one address, the
//! records a section gives it, no other source of answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// dnsmasq serving a section's records; killed on drop and its directory
/// removed.
pub struct Dnsmasq {
    child: Child,
    dir: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq on `addr` with `conf` (dnsmasq configuration lines,
    /// such as `host-record=`), its files in `dir` (which must not exist).
    pub fn start(dir: &Path, addr: SocketAddr, conf: &str) -> Result<Self> {
        if dir.exists() {
            bail!("{} exists already", dir.display());
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join("zone.conf");
        std::fs::write(&path, conf)?;
        let stderr = std::fs::File::create(dir.join("stderr"))?;
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file",
            ])
            .arg(format!("--conf-file={}", path.display()))
            .arg(format!("--listen-address={}", addr.ip()))
            .arg(format!("--port={}", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting dnsmasq")?;
        Ok(Self {
            child,
            dir: dir.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// dnsmasq's version line (`Dnsmasq version 2.90`), installing
    /// `dnsmasq-base` if it is missing.
    pub fn version() -> Result<String> {
        let version = super::machine::ensure_tool("dnsmasq", &["--version"], "dnsmasq-base")?;
        // "Dnsmasq version 2.90  Copyright (c) ..."
        let first_line = version.lines().next().unwrap_or_default();
        Ok(first_line
            .split_once("  ")
            .map_or(first_line, |(v, _)| v)
            .to_owned())
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
