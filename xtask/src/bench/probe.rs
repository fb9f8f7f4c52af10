//! A probe process (`idgate-bench-loop` in one of its waiting ops): it
//! says it is ready with one line, then answers with one JSON object of
//! counts. Killed when dropped, unless it has ended already.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};

use super::interrupt;

pub struct ProbeProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl ProbeProcess {
    /// Spawns `command` (with its stdout and stderr piped) and waits for
    /// its first line, which must be `ready`; `what` names it in errors.
    pub fn start(command: &mut Command, ready: &str, what: &str) -> Result<Self> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut probe = Self { child, stdout };
        let mut line = String::new();
        probe.stdout.read_line(&mut line)?;
        if line.trim() != ready {
            bail!("{what}: {}", probe.stderr_and_status());
        }
        Ok(probe)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its stdin, if piped (once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits for its answer (it ends within its own timeout): the counts
    /// under `keys` of its JSON.
    pub fn answer<const N: usize>(&mut self, what: &str, keys: [&str; N]) -> Result<[u64; N]> {
        let mut text = String::new();
        self.stdout.read_to_string(&mut text)?;
        let status = self.child.wait()?;
        if !status.success() {
            interrupt::check()?;
            bail!("{what}: {}", self.stderr_and_status());
        }
        let reply: serde_json::Value =
            serde_json::from_str(&text).context("the probe's answer is not JSON")?;
        let mut counts = [0; N];
        for (count, key) in counts.iter_mut().zip(keys) {
            *count = reply[key]
                .as_u64()
                .with_context(|| format!("no {key} in {reply}"))?;
        }
        Ok(counts)
    }

    fn stderr_and_status(&mut self) -> String {
        let _ = self.child.kill();
        let status = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        format!("{status:?}: {}", err.trim())
    }
}

impl Drop for ProbeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
