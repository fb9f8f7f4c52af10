//! The machine, kernel and tree a benchmark ran on, as the report names
//! them.

use std::process::Command;

use anyhow::{Context, Result, bail};

pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
    pub commit: String,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |key: &str| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_owned())
            })
        };
        let mut cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
        if let (Some(family), Some(model)) = (field("cpu family"), field("model")) {
            cpu.push_str(&format!(" (family {family}, model {model})"));
        }
        if field("flags").is_some_and(|f| f.split(' ').any(|x| x == "hypervisor")) {
            cpu.push_str(", virtual machine");
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let dirty = !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel,
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: format!(
                "{}{}",
                output("git", &["rev-parse", "--short", "HEAD"]),
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// A command's standard output, trimmed; empty when it fails.
fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs `tool args` and returns what it printed; when that fails (the tool
/// is missing), installs the Debian `package` with apt first.
pub fn ensure_tool(tool: &str, args: &[&str], package: &str) -> Result<String> {
    let version = || -> Result<String> {
        let out = Command::new(tool).args(args).output()?;
        if !out.status.success() {
            bail!("{tool} {} failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if let Ok(v) = version() {
        return Ok(v);
    }
    eprintln!("bench: {tool} is missing: apt-get install -y {package}");
    let status = Command::new("apt-get")
        .args(["install", "-y", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install -y {package} failed ({status})");
    }
    version()
}
