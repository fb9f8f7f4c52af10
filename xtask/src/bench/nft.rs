//! The benchmark's policy as nftables rules, at nftables' best: one verdict
//! map keyed by cgroup (`socket cgroupv2`) jumps to the identity's chain,
//! which looks the packet up in that identity's sets of `address .
//! protocol . port` (intervals, so prefixes and port ranges are one
//! element each); anything else from the cgroup is dropped. Stateless (no
//! conntrack): TCP is judged on its SYN, as idgate judges the connect, and
//! UDP on every datagram.
//!
//! The base chain on the output hook is added only while the nftables
//! configuration is measured ([`Table::hook`]), so that no other
//! measurement pays for its lookups.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::rules::Identity;

/// `nft` resolves the path of a `cgroupsv2` value below this directory.
const NFT_CGROUP_BASE: &str = "/sys/fs/cgroup";

/// Installs nftables when `nft` is missing; returns `nft --version`.
pub fn ensure_installed() -> Result<String> {
    super::machine::ensure_tool("nft", &["--version"], "nftables")
}

/// The loaded table; deleted on drop.
pub struct Table {
    name: String,
    /// Depth of the workload cgroups below the cgroup v2 root.
    level: usize,
    /// How long `nft -f` took to load it.
    pub load_time: Duration,
}

impl Table {
    /// Loads the table `inet NAME` for `workloads`: each identity with the
    /// directory of its cgroup, every directory at the same depth below
    /// the cgroup v2 `root`.
    pub fn load(name: &str, root: &Path, workloads: &[(&Identity, PathBuf)]) -> Result<Self> {
        let level = match workloads.first() {
            Some((_, dir)) => dir
                .strip_prefix(root)
                .with_context(|| format!("{} is not below {}", dir.display(), root.display()))?
                .components()
                .count(),
            None => bail!("no workloads for nftables"),
        };
        let text = ruleset(name, workloads)?;
        let started = Instant::now();
        nft(&text)?;
        Ok(Self {
            name: name.to_owned(),
            level,
            load_time: started.elapsed(),
        })
    }

    /// Puts the table's base chain on the output hook.
    pub fn hook(&self) -> Result<()> {
        nft(&hook_chain(&self.name, self.level))
    }

    /// Takes the base chain off the hook again.
    pub fn unhook(&self) -> Result<()> {
        nft(&format!(
            "flush chain inet {0} out\ndelete chain inet {0} out\n",
            self.name
        ))
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.name)) {
            eprintln!("bench: warning: {e}");
        }
    }
}

/// The ruleset for the first workload only, with the base chain: what the
/// report shows.
pub fn excerpt(name: &str, root: &Path, workload: (&Identity, PathBuf)) -> Result<String> {
    let level = workload.1.strip_prefix(root)?.components().count();
    Ok(format!(
        "{}{}",
        ruleset(name, &[workload])?,
        hook_chain(name, level)
    ))
}

fn hook_chain(name: &str, level: usize) -> String {
    format!(
        "add chain inet {name} out {{ type filter hook output priority filter; policy accept; }}\n\
         add rule inet {name} out tcp flags & (syn | ack) != syn accept\n\
         add rule inet {name} out socket cgroupv2 level {level} vmap @workloads\n"
    )
}

/// The table without its base chain: the cgroup map, and per identity its
/// sets and chain.
fn ruleset(name: &str, workloads: &[(&Identity, PathBuf)]) -> Result<String> {
    let mut map = Vec::new();
    let mut body = String::new();
    for (n, (identity, dir)) in workloads.iter().enumerate() {
        let path = dir.strip_prefix(NFT_CGROUP_BASE).with_context(|| {
            format!(
                "nft names cgroups by their path below {NFT_CGROUP_BASE}, and {} is not there",
                dir.display()
            )
        })?;
        map.push(format!("\"{}\" : jump id{n}", path.display()));
        let (v4, v6) = elements(identity);
        let mut chain = Vec::new();
        for (family, kind, elements) in [("ip", "ipv4_addr", v4), ("ip6", "ipv6_addr", v6)] {
            if elements.is_empty() {
                continue;
            }
            body.push_str(&format!(
                "  set id{n}_{family} {{ type {kind} . inet_proto . inet_service; flags interval; elements = {{ {} }} }}\n",
                elements.join(", ")
            ));
            chain.push(format!(
                "{family} daddr . meta l4proto . th dport @id{n}_{family} accept"
            ));
        }
        chain.push("drop".into());
        body.push_str(&format!(
            "  chain id{n} {{\n    {}\n  }}\n",
            chain.join("\n    ")
        ));
    }
    Ok(format!(
        "table inet {name} {{\n  map workloads {{ type cgroupsv2 : verdict; elements = {{ {} }} }}\n{body}}}\n",
        map.join(", ")
    ))
}

/// An identity's set elements, IPv4 and IPv6.
fn elements(identity: &Identity) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for rule in &identity.rules {
        for &(addr, prefix) in &rule.to {
            for protocol in rule.protocol.nft_names() {
                for &(first, last) in &rule.ports {
                    let ports = if first == last {
                        first.to_string()
                    } else {
                        format!("{first}-{last}")
                    };
                    let element = format!("{addr}/{prefix} . {protocol} . {ports}");
                    match addr {
                        IpAddr::V4(_) => v4.push(element),
                        IpAddr::V6(_) => v6.push(element),
                    }
                }
            }
        }
    }
    (v4, v6)
}

/// Runs `nft -f -` with `script` on its standard input.
fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let first: String = script
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        bail!(
            "nft -f failed on a script starting {first:?}: {}",
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(2_000)
                .collect::<String>()
        );
    }
    Ok(())
}
