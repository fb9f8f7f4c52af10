//! What a grant is, and how an operator's words become one: the identity,
//! the destination (an address, a CIDR or a name, as a rule's `to`),
//! ports and protocol, checked with errors that name what is wrong.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::policy::{NameError, NamePattern};
use crate::policy::{PortError, port_range};

/// An operator's input that cannot be a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error(
        "identity {0:?}: `unknown` (workloads without an identity) cannot be granted anything; give the workload an identity"
    )]
    Unknown(String),
    #[error(
        "identity {0:?}: a grant is for one identity, not a pattern; grant each identity the pattern stands for"
    )]
    Pattern(String),
    #[error("identity {id:?}: {error}")]
    Identity { id: String, error: String },
    #[error("destination {given:?} is not a DNS name: {error}")]
    Name { given: String, error: NameError },
    #[error(
        "destination {0:?} is not an address, a CIDR or a DNS name (like 192.0.2.10, 10.0.0.0/8 or api.example.com)"
    )]
    Destination(String),
    #[error(
        "destination {given:?} has host bits set beyond its /{len} prefix; did you mean {net}?"
    )]
    HostBits { given: String, len: u8, net: IpNet },
    #[error(
        "destination {0:?} is an IPv4-mapped IPv6 network; write it as IPv4 (connects to mapped addresses are judged as IPv4)"
    )]
    Mapped(String),
    #[error("ports {given:?}: {error}")]
    Ports { given: String, error: PortError },
}

/// Inclusive ports of a grant, host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    /// Every port.
    pub const ALL: Ports = Ports {
        first: 0,
        last: u16::MAX,
    };
}

impl FromStr for Ports {
    type Err = InputError;

    fn from_str(s: &str) -> Result<Self, InputError> {
        let (first, last) = port_range(s).map_err(|error| InputError::Ports {
            given: s.to_owned(),
            error,
        })?;
        Ok(Self { first, last })
    }
}

impl TryFrom<String> for Ports {
    type Error = InputError;

    fn try_from(s: String) -> Result<Self, InputError> {
        if s == "any" {
            return Ok(Self::ALL);
        }
        s.parse()
    }
}

impl From<Ports> for String {
    fn from(p: Ports) -> Self {
        p.to_string()
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (0, u16::MAX) => f.write_str("any"),
            (a, b) if a == b => write!(f, "{a}"),
            (a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// The transport a grant opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantProtocol {
    Tcp,
    Udp,
    /// TCP and UDP.
    Any,
}

impl GrantProtocol {
    /// The kernel's [`grant_protocols`](idgate_common::grant_protocols)
    /// flags.
    pub fn flags(self) -> u32 {
        use idgate_common::grant_protocols::{TCP, UDP};
        match self {
            Self::Tcp => TCP,
            Self::Udp => UDP,
            Self::Any => TCP | UDP,
        }
    }
}

impl fmt::Display for GrantProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Any => "any",
        })
    }
}

/// The identity a grant is for: one SPIFFE ID. `unknown` and patterns are
/// refused, each with its own reason.
pub fn grant_identity(s: &str) -> Result<SpiffeId, InputError> {
    if s == "unknown" {
        return Err(InputError::Unknown(s.to_owned()));
    }
    if s.contains('*') {
        return Err(InputError::Pattern(s.to_owned()));
    }
    s.parse()
        .map_err(|e: crate::identity::SpiffeIdError| InputError::Identity {
            id: s.to_owned(),
            error: e.to_string(),
        })
}

/// What a grant opens: what a rule's `to` takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GrantTo {
    /// An address (a /32 or /128) or a CIDR.
    Net(IpNet),
    /// A name or `*.` and a domain: the addresses the identity's own
    /// lookups of it are answered, each for its TTL.
    Name(NamePattern),
}

impl GrantTo {
    /// The network, for a grant by address.
    pub fn net(&self) -> Option<IpNet> {
        match self {
            Self::Net(n) => Some(*n),
            Self::Name(_) => None,
        }
    }

    /// The name pattern, for a grant by name.
    pub fn name(&self) -> Option<&NamePattern> {
        match self {
            Self::Net(_) => None,
            Self::Name(n) => Some(n),
        }
    }
}

impl FromStr for GrantTo {
    type Err = InputError;

    fn from_str(s: &str) -> Result<Self, InputError> {
        grant_destination(s)
    }
}

impl TryFrom<String> for GrantTo {
    type Error = InputError;

    fn try_from(s: String) -> Result<Self, InputError> {
        grant_destination(&s)
    }
}

impl From<GrantTo> for String {
    fn from(t: GrantTo) -> Self {
        t.to_string()
    }
}

impl From<IpNet> for GrantTo {
    fn from(n: IpNet) -> Self {
        Self::Net(n)
    }
}

impl fmt::Display for GrantTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(n) => n.fmt(f),
            Self::Name(n) => n.fmt(f),
        }
    }
}

/// A grant's destination, read as the policy reads a rule's `to`: an
/// address (a /32 or /128) or a CIDR without host bits; else, when it does
/// not look like an address, a DNS name checked by the policy's own name
/// syntax ([`NamePattern`]).
pub fn grant_destination(s: &str) -> Result<GrantTo, InputError> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) if !crate::policy::looks_like_an_address(s) => {
                return s
                    .parse::<NamePattern>()
                    .map(GrantTo::Name)
                    .map_err(|error| InputError::Name {
                        given: s.to_owned(),
                        error,
                    });
            }
            Err(_) => return Err(InputError::Destination(s.to_owned())),
        },
    };
    if net.trunc() != net {
        return Err(InputError::HostBits {
            given: s.to_owned(),
            len: net.prefix_len(),
            net: net.trunc(),
        });
    }
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && v6.network().to_ipv4_mapped().is_some()
    {
        return Err(InputError::Mapped(s.to_owned()));
    }
    Ok(GrantTo::Net(net))
}

/// One grant, as kept in `state_dir` and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u32,
    pub identity: SpiffeId,
    pub to: GrantTo,
    pub ports: Ports,
    pub protocol: GrantProtocol,
    /// The operator who granted it (SO_PEERCRED).
    pub granted_by: u32,
    pub granted_at: SystemTime,
    /// `CLOCK_BOOTTIME` nanoseconds from which it allows nothing.
    pub expiry_boot_ns: u64,
    pub reason: Option<String>,
}

/// What an operator asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    pub identity: SpiffeId,
    pub to: GrantTo,
    pub ports: Ports,
    pub protocol: GrantProtocol,
    pub duration: std::time::Duration,
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_destinations_and_ports_are_checked_with_clear_errors() {
        assert!(grant_identity("spiffe://example.org/agents/coder").is_ok());
        let e = grant_identity("spiffe://example.org/agents/*").unwrap_err();
        assert!(matches!(e, InputError::Pattern(_)), "{e}");
        assert!(e.to_string().contains("not a pattern"));
        assert!(matches!(
            grant_identity("unknown"),
            Err(InputError::Unknown(_))
        ));
        assert!(matches!(
            grant_identity("spiffe://Example.org/x"),
            Err(InputError::Identity { .. })
        ));

        assert_eq!(
            grant_destination("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            grant_destination("192.0.2.1").unwrap().to_string(),
            "192.0.2.1/32"
        );
        assert_eq!(
            grant_destination("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        // Names, exactly as a rule's `to` takes them.
        assert_eq!(
            grant_destination("API.Example.com.").unwrap(),
            GrantTo::Name("api.example.com".parse().unwrap())
        );
        let wild = grant_destination("*.example.com").unwrap();
        assert_eq!(wild.to_string(), "*.example.com");
        assert!(wild.name().unwrap().is_wildcard() && wild.net().is_none());
        let e = grant_destination("a..example.com").unwrap_err();
        assert!(
            matches!(
                &e,
                InputError::Name {
                    error: NameError::EmptyLabel,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("is not a DNS name") && e.to_string().contains("empty label"),
            "{e}"
        );
        let e = grant_destination("api.*.example.com").unwrap_err();
        assert!(e.to_string().contains("`*` may only be"), "{e}");
        let e = grant_destination("bücher.de").unwrap_err();
        assert!(e.to_string().contains("xn--bcher-kva.de"), "{e}");
        // An address's typo is an address error, not a name one.
        assert!(matches!(
            grant_destination("10.0.0"),
            Err(InputError::Destination(_))
        ));
        // Kept in the file as its text, and read back the same.
        for to in ["10.0.0.0/8", "*.example.com", "api.example.com"] {
            let parsed = grant_destination(to).unwrap();
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(json, format!("{to:?}"));
            assert_eq!(serde_json::from_str::<GrantTo>(&json).unwrap(), parsed);
        }
        assert!(matches!(
            grant_destination("10.0.0.1/8"),
            Err(InputError::HostBits { .. })
        ));
        assert!(matches!(
            grant_destination("10.0.0.300"),
            Err(InputError::Destination(_))
        ));
        assert!(matches!(
            grant_destination("::ffff:10.0.0.1"),
            Err(InputError::Mapped(_))
        ));

        assert_eq!(
            "443".parse::<Ports>().unwrap(),
            Ports {
                first: 443,
                last: 443
            }
        );
        assert_eq!(
            "8000-8080".parse::<Ports>().unwrap().to_string(),
            "8000-8080"
        );
        for bad in ["0", "9-8", "x", "70000", "1-"] {
            assert!(bad.parse::<Ports>().is_err(), "{bad}");
        }
        assert_eq!(Ports::try_from("any".to_owned()).unwrap(), Ports::ALL);
    }
}
