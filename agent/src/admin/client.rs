//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::AdminError;
use super::protocol::{Envelope, PROTOCOL_VERSION, Reply, Request};

/// Sends one request and returns the daemon's result, or its error as
/// [`AdminError::Refused`].
pub fn request(socket: &Path, request: Request) -> Result<serde_json::Value, AdminError> {
    let io = |source| AdminError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope {
        version: PROTOCOL_VERSION,
        request,
    })
    .map_err(|e| AdminError::BadReply(e.to_string()))?;
    line.push(b'\n');
    // A caller the daemon refuses is answered at once and the connection
    // closed, maybe before the request is written: read the answer anyway.
    let written = stream.write_all(&line);
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        written.map_err(io)?;
    }
    let reply: Reply =
        serde_json::from_str(&reply).map_err(|e| AdminError::BadReply(e.to_string()))?;
    if reply.ok {
        Ok(reply.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(AdminError::Refused(reply.error.unwrap_or_default()))
    }
}
