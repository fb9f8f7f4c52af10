//! `idgate run --identity ID [--ttl D] -- CMD ARGS`: runs a command in a
//! cgroup of its own, bound to an identity by the agent.
//!
//! The command is forked first and waits; the agent checks the caller is
//! an operator and the waiting process is the caller's child, makes the
//! cgroup, binds it and moves the process in; only then does the process
//! exec the command, so its first connect is already judged by the
//! identity. The agent removes the cgroup once the command has exited.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use anyhow::{Context, bail};
use idgate::admin::{Request, Started};
use idgate::identity::SpiffeId;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, execvp, fork, pipe, read};

use super::Connection;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The SPIFFE ID the command runs as.
    #[arg(long)]
    identity: SpiffeId,
    /// The binding expires after this long (e.g. `90s`, `30m`, `2h`); the
    /// command is denied every connect from then on.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    #[command(flatten)]
    conn: Connection,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let argv: Vec<CString> = args
        .command
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .context("the command has a NUL byte")?;
    let (gate_read, gate_write) = pipe().context("pipe")?;
    // SAFETY: the CLI is single-threaded here; the child only reads a pipe
    // and execs (or exits).
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(gate_write);
            child(gate_read, &argv)
        }
        ForkResult::Parent { child } => {
            drop(gate_read);
            let started = args.conn.request::<Started>(Request::Run {
                identity: args.identity,
                ttl_seconds: args.ttl.map(|t| t.as_secs().max(1)),
                pid: child.as_raw() as u32,
            });
            let started = match started {
                Ok(started) => started,
                Err(e) => {
                    // Closing the gate unsent makes the child exit.
                    drop(gate_write);
                    let _ = waitpid(child, None);
                    return Err(e);
                }
            };
            if !args.conn.json {
                eprintln!(
                    "idgate: running as {} in {}",
                    started.identity, started.cgroup
                );
            }
            let mut gate = b"go".to_vec();
            if let Some(bundle) = &started.egress_bundle {
                gate.extend_from_slice(bundle.as_bytes());
            }
            std::fs::File::from(gate_write)
                .write_all(&gate)
                .context("starting the command")?;
            match waitpid(child, None).context("waiting for the command")? {
                WaitStatus::Exited(_, 0) => Ok(()),
                WaitStatus::Exited(_, code) => std::process::exit(code),
                WaitStatus::Signaled(_, sig, _) => bail!("the command was killed by {sig}"),
                other => bail!("the command ended: {other:?}"),
            }
        }
    }
}

/// The variables through which TLS clients take a trust bundle: OpenSSL
/// (and Python's `ssl`, httpx), Python `requests`, Node.js, curl.
const BUNDLE_VARIABLES: [&str; 4] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
];

/// In the forked child: wait for the agent's go (`go`, then the egress
/// trust bundle's path when there is one), point TLS clients at the
/// bundle, then exec.
fn child(gate: OwnedFd, argv: &[CString]) -> ! {
    let mut said = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match read(gate.as_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::process::exit(126),
        }
    }
    let Some(bundle) = said.strip_prefix(b"go") else {
        std::process::exit(126);
    };
    drop(gate);
    if !bundle.is_empty() {
        let bundle = std::ffi::OsStr::from_bytes(bundle);
        for name in BUNDLE_VARIABLES {
            // SAFETY: the forked child has one thread.
            unsafe { std::env::set_var(name, bundle) };
        }
    }
    let e = execvp(&argv[0], argv).unwrap_err();
    eprintln!("idgate run: cannot run {:?}: {e}", argv[0]);
    std::process::exit(127);
}
