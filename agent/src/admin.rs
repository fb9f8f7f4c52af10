//! The operator control socket: a Unix socket, one JSON request and one
//! JSON reply per line, versioned. The caller is authorised by the kernel's
//! SO_PEERCRED credentials, never by anything it sends.

mod client;
mod protocol;
mod server;

pub use client::{request, request_stream};
pub use protocol::{
    Answer, Binding, DnsIdentity, DnsStatus, EventLine, EventsOpened, Explained, GrantChanged,
    GrantShown, GrantsList, Identity, KubeletHealth, KubeletStatus, LearnedOpen, PROTOCOL_VERSION,
    PolicyReloaded, PolicyShown, Ports, Programs, Protocol, Reply, Request, Restarting, Revocation,
    RootWorkload, Started, Status, Target, Verdict, WorkloadRow, WorkloadsList,
};
pub use server::{Authoriser, Peer, Response, Role, serve};

/// Errors on the control socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("control socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "control socket {path}: the daemon closed the connection without a reply (it stopped, or was stopped, before it answered)"
    )]
    NoReply { path: std::path::PathBuf },
    #[error("the daemon's reply is not understood: {0}")]
    BadReply(String),
    #[error(
        "the agent speaks control protocol version {agent} and this idgate CLI speaks \
         version {PROTOCOL_VERSION}: use the idgate CLI of the agent's release"
    )]
    Version { agent: u32 },
    #[error("{0}")]
    Refused(String),
}
