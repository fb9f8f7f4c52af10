//! Toolchain bootstrap for building eBPF with aya on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The bpf-linker release built here; it links against LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs `rust-src` for nightly and `bpf-linker`, each only if missing.
pub fn run() -> Result<()> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context(
        "the nightly toolchain is needed to build eBPF (rustup toolchain install nightly)",
    )?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let llvm_major = llvm_major()?;
    if bpf_linker_ok(llvm_major) {
        return Ok(());
    }
    install_bpf_linker(&sysroot, llvm_major)
}

/// Debian packages the test run uses: the deployment checks' `kubectl`
/// (kustomize rendering) and `systemd` (`systemd-analyze verify`),
/// `strace` (tests/tests/bpffs.rs slows the agents' statfs(2) with it),
/// and the DNS tests' real server and clients (tests/src/dns.rs):
/// `dnsmasq` (`dnsmasq-base`: the binary without the system service),
/// `dig` (`bind9-dnsutils`) and `musl-gcc` (`musl-tools`, which builds
/// the musl getaddrinfo client tests/c/musl_lookup.c); the credential
/// broker's tests' client `curl`, and `python3` with its venv module
/// (`python3-venv`), which runs the tests' HTTPS servers and makes the
/// venv the PyPI clients are installed into (tests/src/python.rs).
const TEST_PACKAGES: [(&str, &str); 8] = [
    ("kubectl", "kubectl"),
    ("systemd-analyze", "systemd"),
    ("strace", "strace"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("musl-gcc", "musl-tools"),
    ("curl", "curl"),
    ("python3", "python3-venv"),
];

/// Installs the test run's Debian packages that are missing (as root).
pub fn test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(command, _)| which(command).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} from Debian's packages",
        missing.join(" ")
    );
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// A command's path on `PATH`, if there is one.
pub fn which(command: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(command))
            .find(|p| p.is_file())
    })
}

/// The LLVM major version the nightly rustc is built with.
fn llvm_major() -> Result<u32> {
    let vv = output("rustc", &["+nightly", "-vV"])?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM version {version:?}"))
}

/// bpf-linker is installed at the pinned version, built by this setup for
/// this LLVM (it does not print which LLVM it links, so a marker file says).
fn bpf_linker_ok(llvm_major: u32) -> bool {
    output("bpf-linker", &["--version"]).is_ok_and(|out| out.contains(BPF_LINKER_VERSION))
        && marker(llvm_major).is_file()
}

/// Records which LLVM the installed bpf-linker was built against.
fn marker(llvm_major: u32) -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join(format!(
        ".idgate-bpf-linker-{BPF_LINKER_VERSION}-llvm{llvm_major}"
    ))
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM: a prefix
/// directory whose `lib/` links `libLLVM.so` (and the file's own name) to
/// the toolchain's `libLLVM.so.<major>...` file.
fn install_bpf_linker(sysroot: &Path, llvm_major: u32) -> Result<()> {
    let lib = sysroot.join("lib");
    let wanted = format!("libLLVM.so.{llvm_major}");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&wanted))
        })
        .with_context(|| format!("no {wanted}* in {}", lib.display()))?;
    let prefix = std::env::temp_dir().join(format!("idgate-llvm-prefix-{llvm_major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let file_name = llvm.file_name().expect("file name");
    for name in [Path::new("libLLVM.so"), Path::new(file_name)] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        llvm.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    std::fs::write(marker(llvm_major), llvm.display().to_string())?;
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command; its failure is an error naming it.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
