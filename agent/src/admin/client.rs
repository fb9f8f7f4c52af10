//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::AdminError;
use super::protocol::{Envelope, PROTOCOL_VERSION, Reply, Request};

/// Sends one request and returns the daemon's result, or its error as
/// [`AdminError::Refused`].
pub fn request(socket: &Path, request: Request) -> Result<serde_json::Value, AdminError> {
    let (result, _) = exchange(socket, request)?;
    Ok(result)
}

/// Sends a request whose reply is followed by lines (`events`), and hands
/// each line to `on_line` until the daemon ends the stream or `on_line`
/// returns false.
pub fn request_stream(
    socket: &Path,
    request: Request,
    mut on_line: impl FnMut(&str) -> bool,
) -> Result<serde_json::Value, AdminError> {
    let (result, mut lines) = exchange(socket, request)?;
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => return Ok(result),
            Ok(_) if on_line(line.trim_end()) => {}
            Ok(_) => return Ok(result),
            Err(source) => {
                return Err(AdminError::Io {
                    path: socket.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Sends the request and reads the reply line.
fn exchange(
    socket: &Path,
    request: Request,
) -> Result<(serde_json::Value, BufReader<UnixStream>), AdminError> {
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
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        written.map_err(io)?;
    }
    let reply: Reply =
        serde_json::from_str(&reply).map_err(|e| AdminError::BadReply(e.to_string()))?;
    if reply.ok {
        Ok((reply.result.unwrap_or(serde_json::Value::Null), reader))
    } else {
        Err(AdminError::Refused(reply.error.unwrap_or_default()))
    }
}
