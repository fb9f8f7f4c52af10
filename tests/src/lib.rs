//! Harness for idgate's privileged end-to-end tests: real cgroups, the
//! real agent binary, and a probe process that makes real connects.
//!
//! Every resource a test makes is owned by a guard whose `Drop` removes it
//! (agent killed, pins removed, cgroups emptied and removed, files
//! deleted), so a failing test cleans up too. Each test uses its own scope,
//! pin directory and socket, so tests run in parallel.

pub mod dns;
pub mod pki;
pub mod python;
pub mod raw_h2;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod fixture;
pub use fixture::{Fixture, WEB};

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes)".into());
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup v2 mount on this kernel".into());
    }
    None
}

/// Whether a test that cannot run here fails instead of skipping: when
/// `IDGATE_E2E` is set (to anything but empty or `0`), as CI (`.ci/run`)
/// sets it, a missing privilege, kernel feature or tool is a failure.
pub fn must_run() -> bool {
    std::env::var_os("IDGATE_E2E").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The one rule for a test that cannot run here, for `reason`: with
/// `IDGATE_E2E` set it fails (panics); without, it prints `skipped:
/// REASON` and the caller returns (cargo shows that as a pass, and hides
/// the line unless run with `--nocapture`).
#[track_caller]
pub fn cannot_run(reason: &str) {
    assert!(
        !must_run(),
        "this test cannot run here: {reason} (IDGATE_E2E is set, so that fails the test instead of skipping it)"
    );
    eprintln!("skipped: {reason}");
}

/// Skips (or, with `IDGATE_E2E` set, fails) the calling test when the
/// machine lacks what these tests need: root and cgroup v2. Everything
/// else is a hard failure.
#[macro_export]
macro_rules! require_privileges {
    () => {
        if let Some(reason) = $crate::skip_reason() {
            $crate::cannot_run(&reason);
            return;
        }
    };
}

/// Skips (or, with `IDGATE_E2E` set, fails) the calling test when one of
/// the programs it runs is not on `PATH`.
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        if let Some(reason) = $crate::missing_tools(&[$($tool),+]) {
            $crate::cannot_run(&reason);
            return;
        }
    };
}

/// Which of `tools` are not found on `PATH`, as a reason to give.
pub fn missing_tools(tools: &[&str]) -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect();
    (!missing.is_empty()).then(|| format!("needs {} on PATH", missing.join(", ")))
}

/// The cgroup v2 mount point, from the kernel's mount table.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| PathBuf::from(pre.split(' ').nth(4).expect("mount point")))
    })
}

/// A unique tag for this test's resources.
fn unique(tag: &str) -> String {
    format!("idgate-test-{tag}-{}", std::process::id())
}

/// A path next to the test binaries: `target/<profile>/NAME`.
pub fn target_bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .ancestors()
        .find(|d| d.join(name).is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}: run `cargo xtask test`",
                exe.display()
            )
        });
    dir.join(name)
}

/// A test's cgroups: a scope for the agent, and cgroups inside or outside
/// it. All are emptied and removed on drop, deepest first.
pub struct Cgroups {
    root: PathBuf,
    scope: String,
    /// Unique to this test: names the agent's files and pins.
    name: String,
    made: Vec<PathBuf>,
}

impl Cgroups {
    /// Makes the scope `<cgroup2>/idgate-test-<tag>-<pid>`.
    pub fn new(tag: &str) -> Self {
        let root = cgroup2_root().expect("cgroup v2");
        let mut me = Self {
            root,
            scope: unique(tag),
            name: unique(tag),
            made: Vec::new(),
        };
        let scope = me.root.join(&me.scope);
        me.mkdir(scope);
        me
    }

    /// Makes the scope at a fixed path below the cgroup v2 root, for
    /// attestation that reads the path (e.g. the kubelet's
    /// `kubepods.slice`). Panics when it exists already: a real one (or
    /// another test's) is never taken over.
    pub fn at(scope: &str, tag: &str) -> Self {
        let root = cgroup2_root().expect("cgroup v2");
        let dir = root.join(scope);
        assert!(
            !dir.exists(),
            "{} exists already: this test makes and removes it, so it runs only where nothing else uses it",
            dir.display()
        );
        let mut me = Self {
            root,
            scope: scope.to_owned(),
            name: unique(tag),
            made: Vec::new(),
        };
        me.mkdir(dir);
        me
    }

    /// A name unique to this test, for files and pins beside the scope.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scope, relative to the cgroup v2 root (as the agent config has it).
    pub fn scope_rel(&self) -> &str {
        &self.scope
    }

    pub fn scope_dir(&self) -> PathBuf {
        self.root.join(&self.scope)
    }

    /// Makes (or returns) a cgroup inside the scope.
    pub fn inside(&mut self, rel: &str) -> PathBuf {
        let dir = self.scope_dir().join(rel);
        self.mkdir(dir.clone());
        dir
    }

    /// Makes a cgroup outside the scope.
    pub fn outside(&mut self, name: &str) -> PathBuf {
        let dir = self.root.join(format!("{}-{name}", self.scope));
        self.mkdir(dir.clone());
        dir
    }

    fn mkdir(&mut self, dir: PathBuf) {
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        if !self.made.contains(&dir) {
            self.made.push(dir);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let mut dirs = self.made.clone();
        // Agents may have made more cgroups below ours: take them too.
        for d in &self.made {
            collect_subdirs(d, &mut dirs);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        dirs.dedup();
        for dir in dirs {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(&dir).is_err() && dir.exists() {
                if Instant::now() > deadline {
                    eprintln!("warning: could not remove cgroup {}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn collect_subdirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
            collect_subdirs(&entry.path(), out);
        }
    }
}

/// A mount namespace of a test's own, as on a fresh machine: no bpffs at
/// `/sys/fs/bpf` (each one there, stacked or not, is lazily unmounted
/// inside it; the host's mounts are not touched). Every other mount is the
/// host's, and cgroups and bpf attachments are machine-wide as ever.
/// Processes join it with `nsenter` ([`MountNs::command`]). It lives as
/// long as its holder, a shell `unshare` starts that waits for its stdin
/// to close: on drop, or when the test process dies however it dies.
pub struct MountNs {
    holder: Child,
}

/// Shell words that lazily unmount every bpffs stacked at `/sys/fs/bpf`
/// (at most 16) in the calling shell's mount namespace.
pub const UNMOUNT_BPFFS: &str =
    "i=0; while [ $i -lt 16 ] && umount -l /sys/fs/bpf 2>/dev/null; do i=$((i+1)); done";

impl MountNs {
    /// Makes the namespace (needs root, `unshare` and `nsenter`).
    pub fn fresh() -> Self {
        use std::io::BufRead;
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{UNMOUNT_BPFFS}; echo ready; read _"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn unshare");
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read from unshare");
        let ns = Self { holder };
        assert_eq!(line.trim(), "ready", "unshare did not make the namespace");
        let left = ns.bpffs_mounts(ns.pid());
        assert!(left.is_empty(), "bpffs still mounted inside: {left:?}");
        ns
    }

    /// The holder's pid: `/proc/PID/ns/mnt` is the namespace.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        nsenter(self.pid(), program)
    }

    /// Where `path`, as the namespace sees it, is reached from outside.
    pub fn path(&self, path: &Path) -> PathBuf {
        path_in(self.pid(), path)
    }

    /// The bpffs mounts at `/sys/fs/bpf` that the process `pid` sees (its
    /// mountinfo lines), bottom first.
    pub fn bpffs_mounts(&self, pid: u32) -> Vec<String> {
        let path = format!("/proc/{pid}/mountinfo");
        let table =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        table
            .lines()
            .filter(|line| {
                let Some((pre, post)) = line.split_once(" - ") else {
                    return false;
                };
                pre.split(' ').nth(4) == Some("/sys/fs/bpf") && post.starts_with("bpf ")
            })
            .map(str::to_owned)
            .collect()
    }
}

/// `program` run (by `nsenter`, which execs it: same pid) in the mount
/// namespace of the process `holder`.
fn nsenter(holder: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--mount=/proc/{holder}/ns/mnt"))
        .arg("--")
        .arg(program);
    cmd
}

/// Where `path`, as the process `holder` sees it, is reached from any
/// mount namespace.
fn path_in(holder: u32, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{holder}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

impl Drop for MountNs {
    fn drop(&mut self) {
        // Closing its stdin ends the holder; a kill makes sure.
        drop(self.holder.stdin.take());
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A running agent with its own config, policy, pin dir and socket. On
/// drop it is killed and its pins and files are removed.
pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    log: PathBuf,
    /// The holder of the mount namespace it runs in (see [`MountNs`]), if
    /// not the test's.
    mount_ns: Option<u32>,
    /// A program (and its arguments) that runs the agent, e.g. under
    /// `strace`; it must exec the agent in the process it is started as.
    wrapper: Vec<String>,
}

/// Links an agent pins: one per program that enforces without it.
pub const PINNED_LINKS: usize = idgate_common::programs::PINNED.len();

/// A port free for both UDP and TCP on every address now, below the
/// kernel's ephemeral range: a port an agent listens on again after a
/// restart must not be handed meanwhile to some client's socket.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral.saturating_sub(10_000).max(1));
    for _ in 0..256 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (std::process::id() * 7919 + n * 104_729) % span) as u16;
        if std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no port below {ephemeral} free for both UDP and TCP in 256 tries");
}

impl Agent {
    /// Writes the files for an agent on `cgroups`' scope, without starting it.
    pub fn prepare(cgroups: &Cgroups, policy: &str, extra_config: &str) -> Self {
        let name = cgroups.name().to_owned();
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policy")).expect("temp dir");
        std::fs::create_dir_all(dir.join("entries")).expect("temp dir");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        let socket = dir.join("control.sock");
        let config = dir.join("agent.toml");
        std::fs::write(dir.join("policy/policy.toml"), policy).expect("policy");
        // Agents of tests that run at once share the host's network
        // namespace: each one's DNS listeners get a port of their own.
        let dns = if extra_config.contains("[dns]") {
            String::new()
        } else {
            format!("[dns]\nlisten_port = {}\n", free_port())
        };
        std::fs::write(
            &config,
            format!(
                "scope = {:?}\npin_dir = {:?}\ncontrol_socket = {:?}\npolicy = \"policy\"\nentries = \"entries\"\nstate_dir = \"state\"\n{extra_config}\n{dns}",
                cgroups.scope_rel(),
                pin_dir,
                socket,
            ),
        )
        .expect("config");
        Self {
            child: None,
            log: dir.join("agent.log"),
            dir,
            config,
            socket,
            pin_dir,
            mount_ns: None,
            wrapper: Vec::new(),
        }
    }

    /// Makes `wrapper` (a program and its arguments, ending where the
    /// agent's command starts) run the agent from now on. It must become
    /// the agent in the process it is started as, as `strace -D` does, so
    /// the agent's pid is the one the test holds.
    pub fn wrap_with(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|w| (*w).to_owned()).collect();
    }

    /// Makes the agent, and its `uninstall`, run in `ns` from now on (`ns`
    /// must outlive it: make it first).
    pub fn run_in(&mut self, ns: &MountNs) {
        assert!(self.child.is_none(), "agent already running");
        self.mount_ns = Some(ns.pid());
    }

    /// The running agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// `idgate` run where the agent runs: in its mount namespace, if it has
    /// one of its own (through `nsenter`, which becomes `idgate`).
    fn idgate(&self) -> Command {
        match self.mount_ns {
            Some(holder) => nsenter(holder, target_bin("idgate")),
            None => Command::new(target_bin("idgate")),
        }
    }

    /// The pin directory as the test reaches it.
    pub fn pin_path(&self) -> PathBuf {
        match self.mount_ns {
            Some(holder) => path_in(holder, &self.pin_dir),
            None => self.pin_dir.clone(),
        }
    }

    /// Prepares and starts an agent, and waits until it serves its socket.
    pub fn start(cgroups: &Cgroups, policy: &str, extra_config: &str) -> Self {
        let mut agent = Self::prepare(cgroups, policy, extra_config);
        agent.spawn();
        agent.wait_ready();
        agent
    }

    /// Starts the agent process (again).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match (self.wrapper.split_first(), self.mount_ns) {
            (None, _) => self.idgate(),
            (Some((program, args)), Some(holder)) => {
                let mut cmd = nsenter(holder, program);
                cmd.args(args).arg(target_bin("idgate"));
                cmd
            }
            (Some((program, args)), None) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(target_bin("idgate"));
                cmd
            }
        };
        let child = cmd
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn idgate agent");
        self.child = Some(child);
    }

    /// Waits (at most 60 s) until `idgate status` answers; panics with the
    /// agent's log if it exits or never answers.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "agent exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if self.socket.exists() && self.try_cli(&["status"]).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the agent to completion (for configurations that must fail) and
    /// returns its exit success and its log.
    pub fn run_to_exit(&mut self) -> (bool, String) {
        self.spawn();
        let status = self.child.take().expect("child").wait().expect("wait");
        (status.success(), self.log())
    }

    /// Sends a signal to the agent and waits for it to exit.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("kill agent");
        child.wait().expect("wait agent")
    }

    /// Runs an `idgate` subcommand against this agent's socket.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        // `--socket` goes before a `--` that starts a command's arguments.
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let out = Command::new(target_bin("idgate"))
            .args(&args[..split])
            .arg("--socket")
            .arg(&self.socket)
            .args(&args[split..])
            .output()
            .expect("run idgate");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{stderr}"))
        }
    }

    /// `idgate status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.try_cli(&["status", "--json"]).expect("idgate status");
        serde_json::from_str(&out).expect("status is JSON")
    }

    /// Link pins currently in the pin directory.
    pub fn pinned_links(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.pin_path())
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains('@'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `idgate uninstall` for this agent's config.
    pub fn uninstall(&self) -> Result<String, String> {
        let out = self
            .idgate()
            .args(["uninstall", "--config"])
            .arg(&self.config)
            .output()
            .expect("run idgate uninstall");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = self.uninstall() {
            eprintln!("warning: uninstall failed: {e}");
        }
        let _ = std::fs::remove_dir_all(self.pin_path());
        if std::thread::panicking() {
            eprintln!("agent log ({}):\n{}", self.log.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the probe in `cgroup` (or where the test runs) and returns what the
/// kernel answered: `ok` or an errno name.
pub fn probe(cgroup: Option<&Path>, op: &str, addr: &str) -> String {
    let mut cmd = Command::new(target_bin("idgate-probe"));
    if let Some(dir) = cgroup {
        cmd.arg("--cgroup").arg(dir);
    }
    let out = cmd.args([op, addr]).output().expect("run idgate-probe");
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts the probe making `count` calls in `cgroup` without waiting for
/// it; [`repeat_counts`] collects its answer counts.
pub fn spawn_repeat(cgroup: &Path, count: u32, op: &str, addr: &str) -> Child {
    Command::new(target_bin("idgate-probe"))
        .arg("--cgroup")
        .arg(cgroup)
        .args(["repeat", &count.to_string(), op, addr])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn idgate-probe")
}

/// The answer counts of a probe started by [`spawn_repeat`].
pub fn repeat_counts(child: Child) -> std::collections::BTreeMap<String, u32> {
    let out = child.wait_with_output().expect("probe output");
    assert!(out.status.success(), "probe failed");
    serde_json::from_slice(&out.stdout).expect("counts JSON")
}

impl Agent {
    /// Replaces the agent's policy file (the agent sees it on reload).
    pub fn write_policy(&self, policy: &str) {
        std::fs::write(self.dir.join("policy/policy.toml"), policy).expect("write policy");
    }
}

impl Agent {
    /// Sends a signal to the running agent without waiting for it (e.g.
    /// SIGSTOP and SIGCONT to stall its reader).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("agent running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal agent");
    }
}

/// Runs the probe once in `cgroup` and returns its pid and what the kernel
/// answered.
pub fn probe_with_pid(cgroup: &Path, op: &str, addr: &str) -> (u32, String) {
    let child = Command::new(target_bin("idgate-probe"))
        .arg("--cgroup")
        .arg(cgroup)
        .args([op, addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idgate-probe");
    let pid = child.id();
    let out = child.wait_with_output().expect("probe output");
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Listeners a test's workloads connect to: TCP on 127.0.0.1 and ::1 at
/// one port, UDP on 127.0.0.1 at another; they listen while this lives.
pub struct Listeners {
    _tcp4: std::net::TcpListener,
    _tcp6: std::net::TcpListener,
    _udp: std::net::UdpSocket,
    pub tcp_port: u16,
    pub udp_port: u16,
}

impl Listeners {
    pub fn new() -> Self {
        let tcp4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp4");
        let tcp_port = tcp4.local_addr().expect("local addr").port();
        let tcp6 = std::net::TcpListener::bind(("::1", tcp_port)).expect("bind tcp6");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let udp_port = udp.local_addr().expect("local addr").port();
        Self {
            _tcp4: tcp4,
            _tcp6: tcp6,
            _udp: udp,
            tcp_port,
            udp_port,
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Self::new()
    }
}

/// A loopback TCP port nobody listens on at the moment.
pub fn free_loopback_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}

/// Every JSON line of a file (none when it does not exist yet).
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Polls `check` every 20 ms until it returns `Some`, for at most
/// `timeout`; panics naming `what` when it never does.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` from a loopback endpoint: the body.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read metrics");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of one sample of a scraped metric, by its name and its
/// labels as written (`identity="...",verdict="deny"`, in that order);
/// `None` when there is no such sample.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().find_map(|line| {
        let (k, v) = line.rsplit_once(' ')?;
        (k == key).then(|| v.parse().expect("a number"))
    })
}

/// A long-running workload: the probe in `serve` mode, steered line by
/// line. Killed on drop.
pub struct Workload {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Workload {
    /// Starts the probe in `serve` mode, as `uid` when given, in the
    /// cgroup of the test (move it with [`Workload::join`] or
    /// [`Workload::move_to`]).
    pub fn start(uid: Option<u32>) -> Self {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(target_bin("idgate-probe"));
        cmd.arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().expect("spawn idgate-probe serve");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command and returns its answer.
    pub fn ask(&mut self, command: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{command}").expect("probe stdin");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("probe stdout");
        assert!(!line.is_empty(), "the probe ended");
        line.trim().to_owned()
    }

    /// One connect or send from the workload.
    pub fn call(&mut self, op: &str, addr: &str) -> String {
        self.ask(&format!("{op} {addr}"))
    }

    /// The workload moves itself into `dir` (it needs the right to).
    pub fn join(&mut self, dir: &Path) -> String {
        self.ask(&format!("join {}", dir.display()))
    }

    /// The test (root) moves the workload into `dir`.
    pub fn move_to(&self, dir: &Path) {
        std::fs::write(dir.join("cgroup.procs"), self.pid().to_string())
            .unwrap_or_else(|e| panic!("moving {} into {}: {e}", self.pid(), dir.display()));
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Writes the agent's registration entries (seen at start and on
    /// reload).
    pub fn write_entries(&self, entries: &str) {
        std::fs::write(self.dir.join("entries/entries.toml"), entries).expect("write entries");
    }

    /// `idgate workloads --json`: the workloads array.
    pub fn workloads(&self) -> Vec<serde_json::Value> {
        let out = self
            .try_cli(&["workloads", "--json"])
            .expect("idgate workloads");
        let v: serde_json::Value = serde_json::from_str(&out).expect("workloads JSON");
        v["workloads"].as_array().expect("workloads array").clone()
    }

    /// The workload-table row of the cgroup at `dir`, once `pred` holds
    /// for it (waits at most 10 s).
    pub fn wait_workload(
        &self,
        dir: &Path,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let rel = format!(
            "/{}",
            dir.strip_prefix(cgroup2_root().expect("cgroup2"))
                .expect("under cgroup2")
                .display()
        );
        wait_for(what, Duration::from_secs(10), || {
            self.workloads()
                .into_iter()
                .find(|w| w["path"] == rel.as_str() && pred(w))
        })
    }
}

/// The audit log's JSON Schema (`docs/events.schema.json`), formats
/// checked.
pub fn events_schema() -> jsonschema::Validator {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the schema")).expect("JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid JSON schema")
}

/// Panics with every way `event` breaks the schema.
pub fn assert_schema(validator: &jsonschema::Validator, event: &serde_json::Value) {
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{event}\ndoes not follow the schema: {errors:#?}"
    );
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process (the
/// benchmark's clients and servers stamp with it).
pub use idgate::clock::monotonic_ns;
