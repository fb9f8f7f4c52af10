//! `idgate restart`: the agent executes its binary again (the new one,
//! after an upgrade) in the same process, with the same arguments, and
//! the DNS path's sockets open: see `dns::Handover`. The programs, maps
//! and learned addresses are pinned, so enforcement has no gap either.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use super::DaemonError;
use crate::dns::Handover;

/// The argument that names the handed-over sockets.
pub const DNS_LISTENERS: &str = "--dns-listeners";

/// Executes the agent again; returns only when it could not.
pub fn exec(handover: Handover) -> DaemonError {
    if let Err(e) = handover.keep_across_exec() {
        return DaemonError::Restart(e.into());
    }
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // A restart of a restarted agent: the old sockets' numbers go.
    if let Some(at) = args.iter().position(|a| a == DNS_LISTENERS) {
        args.drain(at..(at + 2).min(args.len()));
    }
    args.push(DNS_LISTENERS.into());
    args.push(handover.to_string().into());
    tracing::info!(?args, "executing the agent again");
    let e = std::process::Command::new("/proc/self/exe")
        .args(&args)
        .exec();
    DaemonError::Restart(e)
}
