//! One idgate agent for the benchmark, run from the release binary with
//! its own scope, pin directory, socket and files; on drop it is killed,
//! `idgate uninstall` removes what it pinned, and its files are deleted.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::interrupt;
use super::rules::{self, Identity};

/// How long an agent may take to serve its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Agent {
    idgate: PathBuf,
    dir: PathBuf,
    /// The scope, relative to the cgroup v2 root.
    pub scope: String,
    pin_dir: PathBuf,
    child: Option<Child>,
    /// Whether it was ever spawned: then its pins are uninstalled on drop,
    /// even when it is not running (killed, not started again).
    spawned: bool,
    /// From spawn to the first answer on the control socket.
    pub start_time: Duration,
}

impl Agent {
    /// Writes the configuration (scope, pins and socket of its own, every
    /// identity's cgroup bound by a `[[workload]]` table, then `tables`,
    /// TOML tables such as `[events]`) and the policy into `dir`, starts
    /// the agent and waits until it answers.
    pub fn start(
        idgate: &Path,
        dir: PathBuf,
        scope: &str,
        pin_dir: PathBuf,
        identities: &[Identity],
        tables: &str,
    ) -> Result<Self> {
        Self::start_with_policy(idgate, dir, scope, pin_dir, identities, tables, &[])
    }

    /// [`Agent::start`] with more policy files beside the identities'
    /// ones: (file name, text), for identities `identities` cannot
    /// express (rules by name).
    pub fn start_with_policy(
        idgate: &Path,
        dir: PathBuf,
        scope: &str,
        pin_dir: PathBuf,
        identities: &[Identity],
        tables: &str,
        extra_policy: &[(String, String)],
    ) -> Result<Self> {
        if dir.exists() || pin_dir.exists() {
            bail!("{} or {} exists already", dir.display(), pin_dir.display());
        }
        let mut agent = Self {
            idgate: idgate.to_owned(),
            dir,
            scope: scope.to_owned(),
            pin_dir,
            child: None,
            spawned: false,
            start_time: Duration::ZERO,
        };
        for sub in ["policy", "entries", "state"] {
            std::fs::create_dir_all(agent.dir.join(sub))?;
        }
        for (name, text) in rules::idgate_policy(identities).iter().chain(extra_policy) {
            agent.write_policy(name, text)?;
        }
        let config = format!(
            "scope = {scope:?}\npin_dir = {:?}\ncontrol_socket = \"control.sock\"\npolicy = \"policy\"\nentries = \"entries\"\nstate_dir = \"state\"\n{}\n{tables}",
            agent.pin_dir,
            rules::workload_bindings(identities)
        );
        std::fs::write(agent.config(), config)?;
        std::fs::File::create(agent.log())?;
        agent.start_time = agent.respawn()?;
        Ok(agent)
    }

    /// Starts the agent process (again, after [`Agent::kill`]) with its
    /// configuration, its log appended to; waits until it answers. The
    /// time from spawn to the first answer.
    pub fn respawn(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("the agent runs already");
        }
        let log = std::fs::OpenOptions::new().append(true).open(self.log())?;
        let started = Instant::now();
        self.spawned = true;
        self.child = Some(
            Command::new(&self.idgate)
                .args(["agent", "--config"])
                .arg(self.config())
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting idgate agent")?,
        );
        self.wait_ready()?;
        Ok(started.elapsed())
    }

    /// SIGKILL, and reaped: a crash. Its pins stay (and are still
    /// uninstalled on drop); [`Agent::respawn`] starts it again.
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("the agent does not run")?;
        child.kill().context("killing the agent")?;
        child.wait()?;
        Ok(())
    }

    /// Whether the agent's process is still there (an agent that executed
    /// itself again keeps its pid); its exit status is reaped if not.
    pub fn check_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("the agent does not run")?;
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "the agent exited with {status}; its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn config(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    /// Replaces (or adds) one file of the agent's policy directory.
    pub fn write_policy(&self, name: &str, text: &str) -> Result<()> {
        Ok(std::fs::write(self.dir.join("policy").join(name), text)?)
    }

    /// Replaces (or adds) one file of the agent's entries directory.
    pub fn write_entries(&self, name: &str, text: &str) -> Result<()> {
        Ok(std::fs::write(self.dir.join("entries").join(name), text)?)
    }

    /// A path in the agent's own directory (removed with it).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs an `idgate` operator command against this agent; its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let socket = self.dir.join("control.sock");
        self.idgate(
            Command::new(&self.idgate)
                .args(args)
                .arg("--socket")
                .arg(socket),
        )
    }

    /// `idgate svid --json` through this agent's Workload API (on by
    /// default, its socket beside the control socket), run as a process
    /// of `cgroup`: it moves itself there between fork and exec, so it
    /// asks as a workload of that cgroup. Its output: the first message
    /// of a new `FetchX509SVID` stream.
    pub fn svid_in(&self, cgroup: &Path) -> Result<String> {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
        let fd = procs.as_raw_fd();
        let mut command = Command::new(&self.idgate);
        command
            .args(["svid", "--json", "--socket"])
            .arg(self.dir.join("workload.sock"));
        // SAFETY: between fork and exec the child only calls write(2),
        // which is async-signal-safe, on a descriptor `procs` keeps open
        // until the child has been spawned ("0": the writing process).
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let out = self.idgate(&mut command);
        drop(procs);
        out
    }

    /// `idgate policy check` of this agent's policy files: read and
    /// validated offline, by the CLI alone.
    pub fn check_policy(&self) -> Result<String> {
        self.idgate(
            Command::new(&self.idgate)
                .args(["policy", "check"])
                .arg(self.dir.join("policy"))
                .args(["--trust-domain", rules::TRUST_DOMAIN]),
        )
    }

    fn idgate(&self, command: &mut Command) -> Result<String> {
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args = args.join(" ");
        let out = command
            .output()
            .with_context(|| format!("running idgate {args}"))?;
        if !out.status.success() {
            bail!(
                "idgate {args} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            interrupt::check()?;
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait()? {
                bail!(
                    "idgate agent exited with {status} before it was ready; its log:\n{}",
                    self.log_tail()
                );
            }
            if self.cli(&["status"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "idgate agent not ready after {READY_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.spawned {
            self.uninstall();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    /// The name and id of each program the agent's pinned links hold.
    pub fn program_ids(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.pin_dir)? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let Some((program, _)) = name.as_deref().and_then(|n| n.split_once('@')) else {
                continue;
            };
            let shown = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&path)
                .output()?;
            let link: serde_json::Value = serde_json::from_slice(&shown.stdout)
                .with_context(|| format!("bpftool link show pinned {}", path.display()))?;
            let id = link["prog_id"]
                .as_u64()
                .with_context(|| format!("no prog_id for {}", path.display()))?;
            out.push((program.to_owned(), id));
        }
        Ok(out)
    }

    /// `idgate uninstall`: the pinned links and maps go.
    fn uninstall(&self) {
        let uninstall = Command::new(&self.idgate)
            .args(["uninstall", "--config"])
            .arg(self.config())
            .output();
        match uninstall {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "bench: warning: idgate uninstall: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("bench: warning: idgate uninstall: {e}"),
        }
    }
}
