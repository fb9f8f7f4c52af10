//! The operator control socket: a Unix socket, one JSON request and one
//! JSON reply per line, versioned. The caller is authorised by the kernel's
//! SO_PEERCRED credentials, never by anything it sends.

mod client;
mod protocol;
mod server;

pub use client::{request, request_stream};
pub use protocol::{PROTOCOL_VERSION, Reply, Request};
pub use server::{Authoriser, Peer, Response, serve};

/// Errors on the control socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("control socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon's reply is not understood: {0}")]
    BadReply(String),
    #[error("{0}")]
    Refused(String),
}
