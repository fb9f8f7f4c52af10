//! What a process costs, read from `/proc`: resident memory, CPU time,
//! and the kernel memory of the BPF maps it holds open.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result};

/// Memory and CPU time of a process at one moment.
#[derive(Clone, Copy)]
pub struct ProcSample {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak resident), KiB.
    pub hwm_kib: u64,
    /// `utime + stime`, seconds.
    pub cpu_seconds: f64,
}

pub fn sample(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name: field 3 (state) onwards; utime and stime
    // are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("malformed stat")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ProcSample {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
        cpu_seconds: (ticks(11)? + ticks(12)?) as f64 / hz,
    })
}

/// One BPF map a process holds, from its descriptor's fdinfo.
pub struct MapMemory {
    /// The map's name from `bpftool` when it is installed, else its id.
    pub name: String,
    pub max_entries: u64,
    /// The `memlock:` bytes the kernel reports for it.
    pub bytes: u64,
}

/// Every BPF map `pid` holds open (each once), largest first.
pub fn maps(pid: u32) -> Result<Vec<MapMemory>> {
    let names = bpftool_names();
    let mut by_id = BTreeMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        by_id.insert(
            id,
            MapMemory {
                name: names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("map {id}")),
                max_entries: field("max_entries:").unwrap_or(0),
                bytes,
            },
        );
    }
    let mut maps: Vec<MapMemory> = by_id.into_values().collect();
    maps.sort_by_key(|m| std::cmp::Reverse(m.bytes));
    Ok(maps)
}

/// Map names by id, from `bpftool -j map show`; empty without bpftool.
fn bpftool_names() -> BTreeMap<u64, String> {
    let Ok(out) = Command::new("bpftool").args(["-j", "map", "show"]).output() else {
        return BTreeMap::new();
    };
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    maps.iter()
        .filter_map(|m| Some((m["id"].as_u64()?, m["name"].as_str()?.to_owned())))
        .collect()
}
