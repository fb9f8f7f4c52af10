//! Checks, before anything is touched, that the agent may do its work.

/// CAP_NET_ADMIN: attach cgroup programs.
const CAP_NET_ADMIN: u32 = 12;
/// CAP_SYS_ADMIN: mount bpffs; stands in for CAP_BPF on older kernels.
const CAP_SYS_ADMIN: u32 = 21;
/// CAP_BPF: create maps and load programs.
const CAP_BPF: u32 = 39;

/// Why the agent may not do its work.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegesError {
    #[error("cannot read /proc/self/status: {0}")]
    Status(#[from] procfs::ProcError),
    #[error("cannot make the agent non-dumpable (prctl PR_SET_DUMPABLE): {0}")]
    Dumpable(std::io::Error),
    #[error(
        "idgate agent needs root or the capabilities {} (and CAP_SYS_ADMIN to mount bpffs); run it as root or from its systemd unit",
        .0.join(", ")
    )]
    Missing(Vec<&'static str>),
}

/// Says plainly which capabilities are missing, if any; then makes the
/// agent non-dumpable: its `/proc/PID/mem`, `environ` and fds are then
/// root's alone, no core file is written, and no process without
/// `CAP_SYS_PTRACE` may attach to it. The agent holds the secrets of
/// credential rules (docs/credentials.md).
pub fn check() -> Result<(), PrivilegesError> {
    missing()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(PrivilegesError::Dumpable(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn missing() -> Result<(), PrivilegesError> {
    let status = procfs::process::Process::myself().and_then(|p| p.status())?;
    let effective = status.capeff;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegesError::Missing(missing))
    }
}
