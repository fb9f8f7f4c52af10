//! `cargo xtask setup | build | test | run | bench`: the commands the README shows.
//!
//! `setup` makes a fresh machine able to build the eBPF programs, and is
//! run by the others whenever something is missing: the nightly
//! toolchain's `rust-src` (for `-Z build-std=core`) and `bpf-linker` built
//! from crates.io against the LLVM that the nightly rustc ships. Nothing is
//! downloaded but crates.

mod bench;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs (idempotent).
    Setup,
    /// Build the agent (with its eBPF object) and the test programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Check formatting and lints, then run every test: unit tests and the
    /// privileged end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the agent on the example configuration (needs root).
    Run {
        #[arg(long, default_value = "deploy/examples/agent.toml")]
        config: PathBuf,
    },
    /// Measure what idgate costs (needs root) and write docs/benchmarks.md.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Test { args } => {
            setup::run()?;
            // Without them deploy/validate.sh skips (and says so) the
            // checks that need them; the rest of the run goes on.
            if let Err(e) = setup::test_tools() {
                eprintln!("setup: warning: {e:#}");
            }
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            build(false)?;
            let tests = cargo_test(&[&["test", "--no-fail-fast"][..], &as_strs(&args)].concat());
            // The deployment files are checked with real validators too
            // (a full run only: a filtered one is about one test).
            let deploy = if args.is_empty() {
                setup::run_cmd(Command::new("bash").arg(root.join("deploy/validate.sh")))
            } else {
                Ok(())
            };
            tests.and(deploy)
        }
        Task::Run { config } => {
            setup::run()?;
            build(false)?;
            let status = Command::new(target_dir(&root).join("debug/idgate"))
                .arg("agent")
                .arg("--config")
                .arg(&config)
                .status()
                .context("starting idgate")?;
            if !status.success() {
                bail!("idgate agent exited with {status}");
            }
            Ok(())
        }
        Task::Bench(args) => {
            setup::run()?;
            build(true)?;
            bench::run(*args, &root)
        }
    }
}

fn build(release: bool) -> Result<()> {
    let mut args = vec!["build", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

/// Lazily unmounts every bpffs stacked at `/sys/fs/bpf` (at most 16), then
/// makes sure none is left, in the shell's mount namespace.
const UNMOUNT_BPFFS: &str = r#"i=0
while [ $i -lt 16 ] && umount -l /sys/fs/bpf 2>/dev/null; do i=$((i+1)); done
if awk '$5 == "/sys/fs/bpf" && / - bpf /' /proc/self/mountinfo | grep -q .; then
  echo "xtask: bpffs is still mounted at /sys/fs/bpf in the tests' mount namespace" >&2
  exit 1
fi
exec "$@""#;

/// `cargo ARGS` for the tests. As root, in a mount namespace of their own
/// (`unshare`, private propagation) where no bpffs is mounted at
/// `/sys/fs/bpf`, as on a fresh machine: the suite's agents mount their
/// own bpffs there, and race each other to, as they would at boot; none of
/// the host's mounts is touched (or seen: a bpffs the host has already is
/// what would hide that race). Cgroups and bpf attachments are
/// machine-wide as ever; the pins live as long as the namespace. Not root,
/// or without `unshare` (util-linux): plain `cargo ARGS`, but with
/// `IDGATE_E2E` set that is a failure.
fn cargo_test(args: &[&str]) -> Result<()> {
    if !bench::is_root() {
        return cargo(args);
    }
    if setup::which("unshare").is_none() {
        let reason = "`unshare` (util-linux) is missing: the tests run in the host's mount namespace, where they cannot start from a machine without bpffs";
        if std::env::var_os("IDGATE_E2E").is_some_and(|v| !v.is_empty() && v != "0") {
            bail!("{reason} (IDGATE_E2E is set)");
        }
        eprintln!("xtask: warning: {reason}");
        return cargo(args);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(UNMOUNT_BPFFS)
        .arg("sh")
        .arg(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running {cargo} {} under unshare", args.join(" ")))?;
    if !status.success() {
        bail!(
            "`cargo {}` (in a mount namespace without bpffs) failed ({status})",
            args.join(" ")
        );
    }
    Ok(())
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs cargo (the same one that runs xtask) in the workspace.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Where cargo puts what it builds here: `CARGO_TARGET_DIR` if set (a
/// relative one is below the workspace, where xtask runs cargo), else the
/// workspace's `target`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}
