//! Runs the load loop (`idgate-bench-loop`) in a cgroup and reads its
//! answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::interrupt;

/// Operations the loop makes before it starts the clock.
pub const WARMUP: u64 = 1_000;
/// Time a loop may take beyond its own limit (warm-up, start, exit)
/// before it is killed.
const GRACE: Duration = Duration::from_secs(30);

/// What the loop repeats.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    UdpConnect,
    UdpSendto,
    TcpConnect,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::UdpConnect, Op::UdpSendto, Op::TcpConnect];

    /// As the loop's `--op` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Op::UdpConnect => "udp-connect",
            Op::UdpSendto => "udp-sendto",
            Op::TcpConnect => "tcp-connect",
        }
    }

    /// Whether a packet leaves for each call (nftables sees nothing
    /// otherwise).
    pub fn sends_packets(self) -> bool {
        self != Op::UdpConnect
    }
}

/// The loop binary and the bounds of every run.
pub struct Loop {
    pub bin: PathBuf,
    /// Most operations per run.
    pub count: u64,
    /// Most seconds per run.
    pub seconds: f64,
}

impl Loop {
    /// Runs `op` on `addr` in `cgroup` to its bounds: nanoseconds per
    /// operation. Every operation must succeed.
    pub fn measure(&self, cgroup: &Path, op: Op, addr: SocketAddr) -> Result<f64> {
        let reply = self.run(cgroup, op, addr, (self.count, self.seconds), WARMUP, "ok")?;
        reply["ns_per_op"]
            .as_f64()
            .with_context(|| format!("no ns_per_op in {reply}"))
    }

    /// One UDP send to `addr` from `cgroup`, which must end as `expect`
    /// says (`ok` or `eperm`): proof that a configuration is in force.
    pub fn check(&self, cgroup: &Path, addr: SocketAddr, expect: &str) -> Result<()> {
        self.run(cgroup, Op::UdpSendto, addr, (1, self.seconds), 0, expect)
            .with_context(|| {
                format!(
                    "checking that a send to {addr} from {} is {expect}",
                    cgroup.display()
                )
            })
            .map(drop)
    }

    /// Runs `op` on `addr` in `cgroup` for `seconds`, with no count limit
    /// and no warm-up: the operations made, and the seconds they took.
    pub fn flood(
        &self,
        cgroup: &Path,
        op: Op,
        addr: SocketAddr,
        seconds: f64,
    ) -> Result<(u64, f64)> {
        let reply = self.run(cgroup, op, addr, (u64::MAX, seconds), 0, "ok")?;
        let iterations = reply["iterations"]
            .as_u64()
            .with_context(|| format!("no iterations in {reply}"))?;
        let elapsed = reply["elapsed_ns"]
            .as_f64()
            .with_context(|| format!("no elapsed_ns in {reply}"))?;
        Ok((iterations, elapsed / 1e9))
    }

    /// One run, to `count` operations or `seconds`, whichever comes first.
    fn run(
        &self,
        cgroup: &Path,
        op: Op,
        addr: SocketAddr,
        (count, seconds): (u64, f64),
        warmup: u64,
        expect: &str,
    ) -> Result<serde_json::Value> {
        interrupt::check()?;
        let mut child = Command::new(&self.bin)
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--op", op.name(), "--addr", &addr.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--warmup", &warmup.to_string(), "--expect", expect])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs_f64(seconds) + GRACE;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} {addr} in {} did not end in time",
                    op.name(),
                    cgroup.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            interrupt::check()?;
            bail!(
                "{} {addr} in {}: {}: {}",
                op.name(),
                cgroup.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("the loop's answer is not JSON")
    }
}
