//! The control socket's messages: one JSON request per line, answered by
//! one JSON reply line (and, for `events`, event lines after it). Both
//! ends use these types, so a field one side renames is an error the
//! other side names, never a silent `null`.

mod reply;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

pub use crate::events::Verdict;
pub use crate::grants::Ports;
pub use crate::workloads::Binding;
pub use reply::{
    Answer, DnsIdentity, DnsStatus, EventLine, EventsOpened, Explained, GrantChanged, GrantShown,
    GrantsList, KubeletHealth, KubeletStatus, LearnedOpen, PolicyReloaded, PolicyShown, Programs,
    Restarting, Revocation, RootWorkload, Started, Status, WorkloadRow, WorkloadsList,
};

/// The protocol version this build speaks. A request of another version is
/// answered with an error, and the CLI refuses a reply of another version:
/// an agent and a CLI of different releases say so instead of misreading
/// each other.
///
/// 2: typed replies; `generation` only grows (it was the kernel's buffer
/// index, 0 or 1); `status` says `reloading`; `explain` says `revoked` and
/// `audit_allowed` beside a plain `allow`/`deny` verdict.
///
/// 3: grants (`grant`, `grants`, `grant_revoke`, `grant_extend`).
pub const PROTOCOL_VERSION: u32 = 3;

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
        identity: Identity,
        /// The destination: an address, or a name (its learned addresses).
        to: Target,
        protocol: Protocol,
    },
    /// Deny every cgroup bound to an identity until `unrevoke`.
    Revoke { identity: SpiffeId },
    /// Lift a revocation.
    Unrevoke { identity: SpiffeId },
    /// Every cgroup under the scope and how it stands.
    Workloads,
    /// Execute the agent again in the same process (after an upgrade),
    /// handing the DNS path's sockets over, so no lookup fails.
    Restart,
    /// Recent decision events, and with `follow` every new one until the
    /// caller goes away: the reply, then one [`EventLine`] per line.
    Events {
        #[serde(default)]
        follow: bool,
        /// Only events of this identity.
        identity: Option<Identity>,
        /// Only events of this verdict.
        verdict: Option<Verdict>,
    },
    /// Make a cgroup under the scope bound to `identity` and move `pid`
    /// (a child of the caller, waiting to exec the command) into it.
    Run {
        identity: SpiffeId,
        /// The binding expires after this many seconds.
        ttl_seconds: Option<u64>,
        pid: u32,
    },
    /// Allow `identity` to reach `to` for `duration_seconds`, on top of
    /// its policy (see docs/policy.md, Grants). `identity` is one SPIFFE
    /// ID (not a pattern, not `unknown`); `to` an address or a CIDR.
    Grant {
        identity: String,
        to: String,
        /// A port or an inclusive range (`"8000-8080"`); every port when
        /// left out.
        ports: Option<Ports>,
        /// TCP and UDP when left out.
        protocol: Option<Protocol>,
        duration_seconds: u64,
        reason: Option<String>,
    },
    /// The running grants.
    Grants,
    /// End a grant now.
    GrantRevoke { id: u32 },
    /// Make a grant run until `duration_seconds` from now.
    GrantExtend { id: u32, duration_seconds: u64 },
}

/// An identity a question is about: a SPIFFE ID, or `unknown` for a
/// workload without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Identity {
    Unknown,
    Id(SpiffeId),
}

impl FromStr for Identity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unknown" => Ok(Self::Unknown),
            id => id
                .parse()
                .map(Self::Id)
                .map_err(|e| format!("identity {id:?}: {e}")),
        }
    }
}

impl TryFrom<String> for Identity {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(identity: Identity) -> Self {
        identity.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown"),
            Self::Id(id) => id.fmt(f),
        }
    }
}

/// A destination `explain` is asked about: `ADDR:PORT` (IPv6 in
/// brackets), or `NAME:PORT` for the addresses a name's lookups opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    Addr(SocketAddr),
    /// A name as a rule writes it (lowercase, without a final dot), and a
    /// port.
    Name {
        name: String,
        port: u16,
    },
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse() {
            return Ok(Self::Addr(addr));
        }
        let bad = || {
            format!(
                "destination {s:?} is not ADDR:PORT or NAME:PORT (like 10.0.0.1:443, [::1]:53 or api.example.com:443)"
            )
        };
        let (name, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        let pattern: crate::policy::NamePattern = name
            .parse()
            .map_err(|e| format!("destination {s:?}: {e}"))?;
        if pattern.is_wildcard() {
            return Err(format!(
                "destination {s:?}: ask about one name, not a wildcard"
            ));
        }
        Ok(Self::Name {
            name: pattern.as_str().to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for Target {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Target> for String {
    fn from(t: Target) -> Self {
        t.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => a.fmt(f),
            Self::Name { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// The transport protocol of a connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(format!("protocol {other:?} is not tcp or udp")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A request on the wire: `{"version": 3, "command": ..., ...}`.
#[derive(Debug, Serialize)]
pub struct Envelope {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// A reply: `ok` with a result, or an error message. The agent sends
/// `Reply<Answer>`; the CLI reads the envelope first and then the result
/// as the reply type of the command it sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply<T = Answer> {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(result: impl Into<Answer>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            ok: true,
            result: Some(result.into()),
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
                "the CLI speaks control protocol version {other} and this agent \
                 speaks version {PROTOCOL_VERSION}: use the idgate CLI of the agent's release"
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
            parse(br#"{"version":3,"command":"status"}"#),
            Ok(Request::Status)
        );
        for (line, want) in [
            (
                &br#"{"version":1,"command":"status"}"#[..],
                "CLI speaks control protocol version 1 and this agent speaks version 3",
            ),
            (br#"{"command":"status"}"#, "no `version`"),
            (br#"{"version":3,"command":"launch"}"#, "launch"),
            (br#"{"version":3,"#, "malformed"),
            (
                br#"{"version":3,"command":"explain","identity":"unknown","to":"10.0.0.1:443","protocol":"sctp"}"#,
                "unknown variant `sctp`, expected `tcp` or `udp`",
            ),
            (
                br#"{"version":3,"command":"events","verdict":"maybe"}"#,
                "unknown variant `maybe`, expected `allow` or `deny`",
            ),
            (
                br#"{"version":3,"command":"revoke","identity":"spiffe://Example.org/x"}"#,
                "bad request",
            ),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn requests_round_trip() {
        let web: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        for request in [
            Request::Status,
            Request::Explain {
                identity: Identity::Unknown,
                to: "[::1]:53".parse().unwrap(),
                protocol: Protocol::Udp,
            },
            Request::Explain {
                identity: Identity::Id(web.clone()),
                to: "10.0.0.1:443".parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            Request::Events {
                follow: true,
                identity: Some(Identity::Unknown),
                verdict: Some(Verdict::Deny),
            },
            Request::Run {
                identity: web,
                ttl_seconds: Some(5),
                pid: 7,
            },
            Request::Grant {
                identity: "spiffe://example.org/agents/coder".into(),
                to: "10.0.0.0/8".into(),
                ports: Some("443".parse().unwrap()),
                protocol: Some(Protocol::Tcp),
                duration_seconds: 600,
                reason: Some("ticket 7".into()),
            },
            Request::Grants,
            Request::GrantRevoke { id: 3 },
            Request::GrantExtend {
                id: 3,
                duration_seconds: 60,
            },
        ] {
            let line = serde_json::to_vec(&Envelope {
                version: PROTOCOL_VERSION,
                request: request.clone(),
            })
            .unwrap();
            assert_eq!(parse(&line), Ok(request));
        }
    }

    #[test]
    fn identities_and_protocols_parse_with_clear_errors() {
        assert_eq!("unknown".parse::<Identity>(), Ok(Identity::Unknown));
        let e = "spiffe://x/../y".parse::<Identity>().unwrap_err();
        assert!(e.starts_with("identity \"spiffe://x/../y\": "), "{e}");
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!(
            "icmp".parse::<Protocol>().unwrap_err(),
            "protocol \"icmp\" is not tcp or udp"
        );
    }
}
