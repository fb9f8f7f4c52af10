//! The policy file format (TOML). See `docs/policy.md`.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::PolicyError;
use crate::identity::SpiffeId;

/// The whole policy: every file of a policy directory, merged.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub mode: Mode,
    pub unknown: IdentityPolicy,
    pub identities: Vec<(SpiffeId, IdentityPolicy)>,
}

/// `enforce` denies what policy does not allow; `audit` lets it through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    #[default]
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    #[default]
    Any,
}

/// One policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    mode: Option<Mode>,
    unknown: Option<IdentityPolicy>,
    #[serde(default, rename = "identity")]
    identities: Vec<IdentityBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityBlock {
    id: String,
    #[serde(flatten)]
    policy: IdentityPolicy,
}

/// What one identity (or the unknown workload) may reach.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityPolicy {
    /// The verdict when no rule matches. Default `deny`.
    #[serde(default)]
    pub default: Action,
    /// Overrides the global mode for this identity: `true` reports denials
    /// but lets them through.
    pub audit: Option<bool>,
    #[serde(default)]
    pub egress: Vec<EgressRule>,
}

/// One egress rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    pub name: String,
    /// CIDRs (v4 or v6), or `any`.
    pub to: Vec<Destination>,
    /// Single ports and `"lo-hi"` ranges; none means every port.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub protocol: Protocol,
    pub action: Action,
}

/// A destination network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Any,
    Net(IpNet),
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "any" {
            return Ok(Self::Any);
        }
        let net: IpNet = s
            .parse()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8), an address, or \"any\""
                ))
            })?;
        if net.trunc() != net {
            return Err(serde::de::Error::custom(format!(
                "{s:?} has host bits set beyond its prefix; did you mean {}?",
                net.trunc()
            )));
        }
        Ok(Self::Net(net))
    }
}

/// Ports as written: `443` or `"8000-8080"`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub first: u16,
    pub last: u16,
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(i64),
            Range(String),
        }
        let port = |v: i64| -> Result<u16, D::Error> {
            match u16::try_from(v) {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(Error::custom(format!("port {v} is not in 1-65535"))),
            }
        };
        match Raw::deserialize(d)? {
            Raw::One(p) => {
                let p = port(p)?;
                Ok(Self { first: p, last: p })
            }
            Raw::Range(s) => {
                let (a, b) = s.split_once('-').ok_or_else(|| {
                    Error::custom(format!("{s:?} is not a port range like \"8000-8080\""))
                })?;
                let parse = |x: &str| {
                    x.trim()
                        .parse::<i64>()
                        .map_err(|_| Error::custom(format!("{s:?}: {x:?} is not a port")))
                        .and_then(port)
                };
                let (first, last) = (parse(a)?, parse(b)?);
                if first > last {
                    return Err(Error::custom(format!("port range {s:?} is reversed")));
                }
                Ok(Self { first, last })
            }
        }
    }
}

/// Reads a policy file, or every `*.toml` file of a directory (in name
/// order), and checks it.
pub fn load(path: &Path, trust_domains: &[String]) -> Result<PolicySet, PolicyError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PolicyError::Read { path, source }
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(read_err(path))? {
            let p = entry.map_err(read_err(path))?.path();
            if p.extension().is_some_and(|e| e == "toml") {
                files.push(p);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut set = PolicySet::default();
    let mut mode_from: Option<PathBuf> = None;
    let mut unknown_from: Option<PathBuf> = None;
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(read_err(&file))?;
        let invalid = |message: String| PolicyError::Invalid {
            path: file.clone(),
            message,
        };
        let parsed: PolicyFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some(mode) = parsed.mode {
            if let Some(first) = &mode_from {
                return Err(invalid(format!(
                    "`mode` is already set in {}",
                    first.display()
                )));
            }
            set.mode = mode;
            mode_from = Some(file.clone());
        }
        if let Some(unknown) = parsed.unknown {
            if let Some(first) = &unknown_from {
                return Err(invalid(format!(
                    "`[unknown]` is already set in {}",
                    first.display()
                )));
            }
            set.unknown = unknown;
            unknown_from = Some(file.clone());
        }
        for block in parsed.identities {
            let id: SpiffeId = block
                .id
                .parse()
                .map_err(|e| invalid(format!("identity {:?}: {e}", block.id)))?;
            if !trust_domains.is_empty() && !trust_domains.iter().any(|t| t == id.trust_domain()) {
                return Err(invalid(format!(
                    "identity {id}: trust domain {:?} is not one this agent is configured for",
                    id.trust_domain()
                )));
            }
            if set.identities.iter().any(|(other, _)| *other == id) {
                return Err(invalid(format!("identity {id} is defined twice")));
            }
            set.identities.push((id, block.policy));
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PolicyFile, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_a_rule() {
        let f = parse(
            r#"
            mode = "audit"
            [[identity]]
            id = "spiffe://example.org/web"
            [[identity.egress]]
            name = "api"
            to = ["127.0.0.1/32", "::1", "any"]
            ports = [443, "8000-8080"]
            protocol = "tcp"
            action = "allow"
            "#,
        )
        .unwrap();
        assert_eq!(f.mode, Some(Mode::Audit));
        let rule = &f.identities[0].policy.egress[0];
        assert_eq!(rule.to.len(), 3);
        assert_eq!(rule.to[2], Destination::Any);
        assert_eq!(rule.ports[1], PortSpec { first: 8000, last: 8080 });
    }

    #[test]
    fn rejects_bad_values_with_their_line() {
        let base = "[[identity]]\nid = \"spiffe://e.org/a\"\n[[identity.egress]]\nname = \"r\"\naction = \"allow\"\n";
        for (extra, want) in [
            ("to = [\"10.0.0.0/33\"]\n", "not a CIDR"),
            ("to = [\"10.0.0.1/8\"]\n", "host bits"),
            ("to = [\"any\"]\nports = [0]\n", "not in 1-65535"),
            ("to = [\"any\"]\nports = [70000]\n", "not in 1-65535"),
            ("to = [\"any\"]\nports = [\"90-80\"]\n", "reversed"),
            ("to = [\"any\"]\nprotocol = \"icmp\"\n", "icmp"),
            ("to = [\"any\"]\ncolour = 1\n", "colour"),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
            assert!(e.contains("line 6") || e.contains("line 7"), "{extra}: {e}");
        }
    }
}
