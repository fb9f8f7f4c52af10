//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::AdminError;
use super::protocol::{Envelope, PROTOCOL_VERSION, Reply, Request};

/// Sends one request and returns the daemon's result as `T`, the reply
/// type of the request's command; the daemon's error comes back as
/// [`AdminError::Refused`].
pub fn request<T: DeserializeOwned>(socket: &Path, request: Request) -> Result<T, AdminError> {
    let (result, _) = exchange(socket, request)?;
    Ok(result)
}

/// Sends a request whose reply is followed by lines (`events`), and hands
/// each line to `on_line` until the daemon ends the stream or `on_line`
/// returns false.
pub fn request_stream<T: DeserializeOwned>(
    socket: &Path,
    request: Request,
    mut on_line: impl FnMut(&str) -> bool,
) -> Result<T, AdminError> {
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
fn exchange<T: DeserializeOwned>(
    socket: &Path,
    request: Request,
) -> Result<(T, BufReader<UnixStream>), AdminError> {
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
        return Err(AdminError::NoReply {
            path: socket.to_owned(),
        });
    }
    Ok((read_reply(&reply)?, reader))
}

/// The result of a reply line, once its version is this CLI's.
fn read_reply<T: DeserializeOwned>(line: &str) -> Result<T, AdminError> {
    let bad = |e: serde_json::Error| AdminError::BadReply(e.to_string());
    let reply: Reply<serde_json::Value> = serde_json::from_str(line).map_err(bad)?;
    if reply.version != PROTOCOL_VERSION {
        return Err(AdminError::Version {
            agent: reply.version,
        });
    }
    if !reply.ok {
        return Err(AdminError::Refused(reply.error.unwrap_or_default()));
    }
    let result = reply
        .result
        .ok_or_else(|| AdminError::BadReply("no `result`".into()))?;
    serde_json::from_value(result).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{EventsOpened, PolicyShown, Status};

    #[test]
    fn a_reply_of_another_version_is_refused_with_both_versions() {
        let old = r#"{"version":1,"ok":false,"error":"protocol version 2 is not supported"}"#;
        let e = read_reply::<Status>(old).unwrap_err().to_string();
        assert!(
            e.contains("agent speaks control protocol version 1")
                && e.contains(&format!("CLI speaks version {PROTOCOL_VERSION}")),
            "{e}"
        );
    }

    #[test]
    fn a_missing_or_renamed_field_is_named() {
        let line = |result: &str| {
            format!(r#"{{"version":{PROTOCOL_VERSION},"ok":true,"result":{result}}}"#)
        };
        let shown = r#"{"generation":3,"policy_path":"/etc/idgate/policy","summary":"x"}"#;
        assert_eq!(
            read_reply::<PolicyShown>(&line(shown)).unwrap().generation,
            3
        );
        let renamed = r#"{"gen":3,"policy_path":"/etc/idgate/policy","summary":"x"}"#;
        let e = read_reply::<PolicyShown>(&line(renamed))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `generation`"), "{e}");
        let e = read_reply::<EventsOpened>(&line(r#"{"follow":"yes"}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn the_agents_error_comes_back_as_it_is() {
        let line =
            format!(r#"{{"version":{PROTOCOL_VERSION},"ok":false,"error":"no such thing"}}"#);
        assert!(matches!(
            read_reply::<Status>(&line),
            Err(AdminError::Refused(e)) if e == "no such thing"
        ));
    }
}
