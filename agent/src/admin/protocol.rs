//! The control socket's messages.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a request with another version
/// is answered with an error.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest request line accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request, tagged by `command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// What the agent enforces now.
    Status,
    /// Re-read, check and atomically apply the policy path.
    PolicyReload,
    /// The running policy and its generation.
    PolicyShow,
    /// Which rule of the running policy decides a connect.
    Explain {
        /// A SPIFFE ID, or `unknown`.
        identity: String,
        /// `ADDR:PORT`.
        to: String,
        /// `tcp` or `udp`.
        protocol: String,
    },
    /// Deny every cgroup bound to an identity until `unrevoke`.
    Revoke { identity: String },
    /// Lift a revocation.
    Unrevoke { identity: String },
    /// Every cgroup under the scope and how it stands.
    Workloads,
    /// Recent decision events, and with `follow` every new one until the
    /// caller goes away: the reply, then one event (JSON) per line.
    Events {
        #[serde(default)]
        follow: bool,
        /// Only events of this SPIFFE ID (`unknown` for unknown workloads).
        identity: Option<String>,
        /// Only `allow` or `deny` events.
        verdict: Option<String>,
    },
    /// Make a cgroup under the scope bound to `identity` and move `pid`
    /// (a child of the caller, waiting to exec the command) into it.
    Run {
        identity: String,
        /// The binding expires after this many seconds.
        ttl_seconds: Option<u64>,
        pid: u32,
    },
}

/// A request on the wire: `{"version": 1, "command": ..., ...}`.
#[derive(Debug, Serialize)]
pub struct Envelope {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// A reply: `ok` with a result, or an error message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// Parses one request line; every failure is a message for the caller.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    match object.remove("version").map(|v| v.as_u64()) {
        Some(Some(v)) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(Some(other)) => {
            return Err(format!(
                "protocol version {other} is not supported (this agent speaks {PROTOCOL_VERSION})"
            ));
        }
        Some(None) => return Err("`version` is not a number".into()),
        None => return Err("request has no `version`".into()),
    }
    serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            parse(br#"{"version":1,"command":"status"}"#),
            Ok(Request::Status)
        );
        for (line, want) in [
            (&br#"{"version":2,"command":"status"}"#[..], "version 2"),
            (br#"{"command":"status"}"#, "no `version`"),
            (br#"{"version":1,"command":"launch"}"#, "launch"),
            (br#"{"version":1,"#, "malformed"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
