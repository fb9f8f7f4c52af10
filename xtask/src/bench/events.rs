//! The event path: how many decision records per second an agent takes
//! from the kernel's ring buffer to its audit log, and how many the
//! kernel drops when the ring buffer is full.
//!
//! An agent of its own records every allowed connect
//! (`allow_sample_rate = 1`) and writes an audit log file (rotated at
//! [`ROTATE_BYTES`], enough files kept that none is deleted); the load
//! loop makes UDP `connect()`s flat out in its bound cgroup (one record
//! each, no packet). Then the agent is given time to write everything
//! out, and the audit log's lines and the agent's metrics are read.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::agent::Agent;
use super::cost;
use super::interrupt;
use super::loops::{Loop, Op};

/// The audit log is rotated at this size ...
pub const ROTATE_BYTES: u64 = 256 * 1024 * 1024;
/// ... and this many rotated files are kept.
const KEEP: u32 = 1_000;
/// The audit log is complete once it has not grown for this long (above
/// the agent's 1 s tick, on which it also reads the drop count).
const QUIET: Duration = Duration::from_secs(3);
/// How often the audit log's size is read while it grows.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// The longest the agent may take to write out what it has read.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// The `[events]` and `[metrics]` tables of the agent's configuration.
pub fn agent_tables(metrics: SocketAddr) -> String {
    format!(
        "[events]\naudit_log = \"audit.log\"\naudit_log_max_bytes = {ROTATE_BYTES}\n\
         audit_log_keep = {KEEP}\nallow_sample_rate = 1.0\n\n\
         [metrics]\naddress = \"{metrics}\"\n"
    )
}

/// A free loopback port for the metrics endpoint.
pub fn free_metrics_address() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub struct EventPath {
    /// Connects the loop made, and the seconds it took.
    pub ops: u64,
    pub loop_seconds: f64,
    /// From starting the loop to the audit log's last growth.
    pub written_in: Duration,
    /// Lines in the audit log (all its files) after the run.
    pub lines: u64,
    /// Bytes of them.
    pub bytes: u64,
    /// Files the log took (the written one and the rotated ones).
    pub files: usize,
    /// From the agent's metrics, over the run: records the agent read,
    /// records the kernel dropped (ring buffer full), records the agent
    /// could not write.
    pub read: u64,
    pub drops: u64,
    pub lost: u64,
    /// The agent's CPU time over `written_in`, seconds.
    pub agent_cpu: f64,
}

pub fn measure(
    agent: &Agent,
    metrics: SocketAddr,
    lp: &Loop,
    cgroup: &Path,
    addr: SocketAddr,
    seconds: f64,
) -> Result<EventPath> {
    let log = agent.file("audit.log");
    let before = Metrics::read(metrics)?;
    let (lines_before, _, _) = count_lines(&log)?;
    let cpu_before = cost::sample(agent.pid())?.cpu_seconds;
    eprintln!("bench: event path: UDP connects flat out for {seconds} s");
    let started = Instant::now();
    let (ops, loop_seconds) = lp.flood(cgroup, Op::UdpConnect, addr, seconds)?;
    eprintln!("bench: event path: waiting for the audit log to be written out");
    let mut size = log_size(&log);
    let mut grew = Instant::now();
    let mut written_in = started.elapsed();
    while grew.elapsed() < QUIET {
        interrupt::check()?;
        if started.elapsed() > Duration::from_secs_f64(seconds) + DRAIN_TIMEOUT {
            bail!("the audit log still grows {DRAIN_TIMEOUT:?} after the loop ended");
        }
        std::thread::sleep(WATCH_EVERY);
        let now = log_size(&log);
        if now != size {
            size = now;
            grew = Instant::now();
            written_in = started.elapsed();
        }
    }
    let cpu_after = cost::sample(agent.pid())?.cpu_seconds;
    let after = Metrics::read(metrics)?;
    let (lines, bytes, files) = count_lines(&log)?;
    Ok(EventPath {
        ops,
        loop_seconds,
        written_in,
        lines: lines - lines_before,
        bytes,
        files,
        read: after.read - before.read,
        drops: after.drops - before.drops,
        lost: after.lost - before.lost,
        agent_cpu: cpu_after - cpu_before,
    })
}

/// The audit log and its rotated files (`audit.log.N`), each with its
/// path.
fn log_files(log: &Path) -> Vec<std::path::PathBuf> {
    let mut files = vec![log.to_owned()];
    let name = log.file_name().expect("a file").to_string_lossy();
    for n in 1.. {
        let rotated = log.with_file_name(format!("{name}.{n}"));
        if !rotated.exists() {
            break;
        }
        files.push(rotated);
    }
    files
}

fn log_size(log: &Path) -> u64 {
    log_files(log)
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Lines and bytes in the audit log's files, and how many files.
fn count_lines(log: &Path) -> Result<(u64, u64, usize)> {
    let mut lines = 0;
    let mut bytes = 0;
    let files = log_files(log);
    let mut buf = vec![0u8; 1 << 20];
    for file in &files {
        let mut f = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    Ok((lines, bytes, files.len()))
}

/// The agent's event counters, from its metrics endpoint.
struct Metrics {
    /// `idgate_decision_events_total`, over every label set.
    read: u64,
    /// `idgate_event_ring_drops_total`.
    drops: u64,
    /// `idgate_audit_log_lost_records_total`.
    lost: u64,
}

impl Metrics {
    fn read(address: SocketAddr) -> Result<Self> {
        let text = get_metrics(address)?;
        let sum = |name: &str| -> Result<u64> {
            let mut found = false;
            let mut total = 0;
            for line in text.lines() {
                let Some(rest) = line.strip_prefix(name) else {
                    continue;
                };
                if !(rest.starts_with(' ') || rest.starts_with('{')) {
                    continue;
                }
                let value = rest.rsplit(' ').next().unwrap_or("");
                total += value
                    .parse::<f64>()
                    .with_context(|| format!("metric line {line:?}"))?
                    as u64;
                found = true;
            }
            if !found && name != "idgate_decision_events_total" {
                bail!("no {name} on the agent's metrics endpoint");
            }
            Ok(total)
        };
        Ok(Self {
            read: sum("idgate_decision_events_total")?,
            drops: sum("idgate_event_ring_drops_total")?,
            lost: sum("idgate_audit_log_lost_records_total")?,
        })
    }
}

/// `GET /metrics` over plain HTTP/1.1; the body.
pub fn get_metrics(address: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("connecting to the metrics endpoint {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {}", status.trim());
    }
    let mut text = String::new();
    reader.read_to_string(&mut text)?;
    Ok(text)
}
