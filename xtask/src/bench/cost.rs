//! What a process costs, read from `/proc`: resident memory, CPU time,
//! and the kernel memory of the BPF maps it holds open (and of the maps
//! those hold).

use std::collections::{BTreeMap, BTreeSet};
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

/// One BPF map a process holds (from its descriptor's fdinfo), or every
/// inner map of one of them.
pub struct MapMemory {
    /// The map's name (from `bpftool`); for inner maps, what they are.
    pub name: String,
    pub max_entries: u64,
    /// The `memlock:` bytes the kernel reports (summed over inner maps).
    pub bytes: u64,
    /// Maps counted: 1, or the number of distinct inner maps.
    pub count: usize,
}

/// A map as `bpftool -j map show` lists it.
#[derive(serde::Deserialize)]
struct Shown {
    id: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: String,
    max_entries: u64,
    bytes_memlock: u64,
}

/// Every BPF map `pid` holds open (each once), and for each array of maps
/// among them the maps its entries hold (which no process holds open:
/// the agent's per-identity tries); largest first.
pub fn maps(pid: u32) -> Result<Vec<MapMemory>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()?;
    let shown: Vec<Shown> =
        serde_json::from_slice(&out.stdout).context("parsing bpftool -j map show")?;
    let by_id: BTreeMap<u64, &Shown> = shown.iter().map(|m| (m.id, m)).collect();
    let mut maps = Vec::new();
    for id in held_map_ids(pid)? {
        let Some(m) = by_id.get(&id) else { continue };
        maps.push(MapMemory {
            name: m.name.clone(),
            max_entries: m.max_entries,
            bytes: m.bytes_memlock,
            count: 1,
        });
        if m.kind == "array_of_maps" {
            let inner: Vec<&Shown> = inner_map_ids(id)?
                .iter()
                .filter_map(|i| by_id.get(i).copied())
                .collect();
            if let Some(first) = inner.first() {
                maps.push(MapMemory {
                    name: format!("{}` in `{}", first.name, m.name),
                    max_entries: first.max_entries,
                    bytes: inner.iter().map(|i| i.bytes_memlock).sum(),
                    count: inner.len(),
                });
            }
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.bytes));
    Ok(maps)
}

/// Ids of the BPF maps `pid` has descriptors of, each once.
fn held_map_ids(pid: u32) -> Result<BTreeSet<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// The distinct maps the entries of the array of maps `id` hold.
fn inner_map_ids(id: u64) -> Result<BTreeSet<u64>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        value: Vec<String>,
    }
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()?;
    let entries: Vec<Entry> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing bpftool -j map dump id {id}"))?;
    entries
        .iter()
        .map(|e| {
            // A little-endian u32 map id, as hex bytes.
            let bytes: Vec<u8> = e
                .value
                .iter()
                .map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16))
                .collect::<Result<_, _>>()?;
            let bytes: [u8; 4] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("not a map id"))?;
            Ok(u64::from(u32::from_le_bytes(bytes)))
        })
        .collect()
}
