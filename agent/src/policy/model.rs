//! The policy as checked and merged from its files. See `docs/policy.md`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::diagnostic::{Diagnostic, Location};
use super::names::NamePattern;
use super::subject::Subject;

/// The whole policy: every file of a policy directory, merged.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub mode: Mode,
    /// The policy of workloads that have no identity.
    pub unknown: IdentityPolicy,
    /// Identity blocks, exact and patterns, in file order. Shared with
    /// the reader's cache of unchanged files and with later policies read
    /// from them.
    pub identities: Vec<Arc<IdentityBlock>>,
    /// What the checks found worth saying that does not refuse the
    /// policy, sorted by file and position.
    pub warnings: Vec<Diagnostic>,
}

impl PolicySet {
    /// The host of every credential rule, across every block: what the
    /// egress CA is constrained to.
    pub fn credential_hosts(&self) -> BTreeSet<String> {
        std::iter::once(&self.unknown)
            .chain(self.identities.iter().map(|b| &b.policy))
            .flat_map(|p| &p.credentials)
            .map(|c| c.host.as_str().to_owned())
            .collect()
    }
}

/// The rules for one SPIFFE ID or ID pattern.
#[derive(Debug, Clone)]
pub struct IdentityBlock {
    pub subject: Subject,
    /// Where its `id` is written.
    pub at: Location,
    pub policy: IdentityPolicy,
    /// Names this block as parsed: blocks with the same serial are one
    /// parse of the same text, so what was derived from one (its
    /// compiled entries, its checks) holds for the other.
    pub serial: Serial,
}

impl IdentityBlock {
    /// Whether it says the same as `other`, in the same place: the same
    /// block, whether or not the same parse.
    pub fn same_as(&self, other: &IdentityBlock) -> bool {
        self.subject == other.subject && self.at == other.at && self.policy == other.policy
    }
}

/// A number given to each parsed block, never given again in the
/// process's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(u64);

impl Serial {
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What one block (or the unknown workload) says. Unset settings come from
/// a less specific block, or else the defaults: `deny`, the global mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// The verdict when no rule matches.
    pub default: Option<Action>,
    /// Overrides the global mode: `true` reports denials but lets them
    /// through; `false` enforces even in audit mode.
    pub audit: Option<bool>,
    /// Lets the identity make raw IPv4 and IPv6 sockets, which no egress
    /// rule can judge. Only in identity blocks; unset, `false`.
    pub raw_sockets: Option<bool>,
    pub egress: Vec<EgressRule>,
    /// Credentials the agent adds to this identity's requests to a host.
    /// Only in identity blocks.
    pub credentials: Vec<CredentialRule>,
}

/// One credential rule: the identity's TCP connects to `host` (port 443,
/// and 80 with `http`) go to the agent's egress broker, which adds the
/// credential to each request it lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRule {
    /// Names the rule in records, as an egress rule's name does.
    pub name: String,
    /// One exact DNS name, canonical (never a wildcard).
    pub host: NamePattern,
    pub kind: CredentialKind,
    /// HTTP methods allowed, uppercase; empty allows any.
    pub methods: Vec<String>,
    /// Path prefixes allowed, each starting with `/`; empty allows any.
    pub paths: Vec<String>,
    /// Plain HTTP on port 80 is brokered too, not only port 443.
    pub http: bool,
    /// Where the rule's table starts.
    pub at: Location,
}

impl CredentialRule {
    /// The ports whose TCP connects to the host it sends to the broker:
    /// 443, and 80 with `http`.
    pub fn ports(&self) -> Vec<(u16, u16)> {
        let mut ports = vec![(HTTPS, HTTPS)];
        if self.http {
            ports.insert(0, (HTTP, HTTP));
        }
        ports
    }
}

/// The port of HTTPS, which every credential rule brokers.
pub const HTTPS: u16 = 443;
/// The port of plain HTTP, brokered where a rule says `http = true`.
pub const HTTP: u16 = 80;

/// What a credential rule adds to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// A header whose value is `prefix` and the text of `secret_file`.
    Header {
        /// Lowercase.
        header: String,
        secret_file: PathBuf,
        prefix: String,
    },
    /// `authorization: Bearer` and a JWT-SVID of the identity for
    /// `audience`.
    JwtSvid { audience: Vec<String> },
    /// `authorization: Bearer` and an OAuth 2.0 access token the agent
    /// gets from a token endpoint with the identity's JWT-SVID.
    OAuth(OAuthClient),
}

impl CredentialKind {
    /// The header it sets, lowercase.
    pub fn header(&self) -> &str {
        match self {
            Self::Header { header, .. } => header,
            Self::JwtSvid { .. } | Self::OAuth(_) => "authorization",
        }
    }
}

/// How the agent, as an OAuth 2.0 client, gets an access token for an
/// identity: a POST to `token_endpoint` that presents the identity's
/// JWT-SVID for `audience` as `grant` says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OAuthClient {
    /// An `https` URL (`http` only for a loopback host), with no fragment
    /// or user name.
    pub token_endpoint: http::Uri,
    pub grant: OAuthGrant,
    /// The JWT-SVID's audiences (normally the token endpoint's issuer).
    pub audience: Vec<String>,
    /// The `scope` parameter, sent when set.
    pub scope: Option<String>,
    /// The `resource` parameter (RFC 8707, RFC 8693): an absolute URI,
    /// sent when set.
    pub resource: Option<String>,
    /// The `audience` parameter of the request (RFC 8693): where the
    /// access token is meant to be used, sent when set. (Not the
    /// JWT-SVID's `audience`.)
    pub token_audience: Option<String>,
    /// The `client_id` parameter, sent when set.
    pub client_id: Option<String>,
}

/// How the JWT-SVID is presented to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OAuthGrant {
    /// RFC 8693 token exchange: the JWT-SVID is the `subject_token`.
    TokenExchange,
    /// The client credentials grant, the client authenticating with the
    /// JWT-SVID as its `client_assertion` (RFC 7523).
    ClientCredentials,
}

impl Keyword for OAuthGrant {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("token_exchange", Self::TokenExchange),
        ("client_credentials", Self::ClientCredentials),
    ];
}

/// One egress rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub name: String,
    pub to: Vec<Destination>,
    /// Single ports and ranges; none means every port.
    pub ports: Vec<PortSpec>,
    pub protocol: Protocol,
    pub action: Action,
    /// Where the rule's table starts.
    pub at: Location,
}

impl EgressRule {
    /// The inclusive port ranges it covers.
    pub fn port_ranges(&self) -> Vec<(u16, u16)> {
        if self.ports.is_empty() {
            vec![(0, u16::MAX)]
        } else {
            self.ports.iter().map(|p| (p.first, p.last)).collect()
        }
    }

    /// The networks it covers (`any` is both address families).
    pub fn nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.to.iter().flat_map(|d| match d {
            Destination::Any => vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
            Destination::Net(n) => vec![*n],
            Destination::Name(_) => vec![],
        })
    }

    /// The DNS names it covers.
    pub fn names(&self) -> impl Iterator<Item = &NamePattern> + '_ {
        self.to.iter().filter_map(|d| match d {
            Destination::Name(n) => Some(n),
            Destination::Any | Destination::Net(_) => None,
        })
    }
}

/// A destination: a network, or the addresses a DNS name had when the
/// identity looked it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Any,
    Net(IpNet),
    Name(NamePattern),
}

/// Ports as written: `443` or `"8000-8080"`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub first: u16,
    pub last: u16,
}

/// A setting with a fixed set of values, each written as a word.
pub trait Keyword: Copy + PartialEq + 'static {
    /// Every value and its word.
    const WORDS: &'static [(&'static str, Self)];

    fn word(self) -> &'static str {
        Self::WORDS
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(w, _)| *w)
            .expect("every value has a word")
    }
}

/// `enforce` denies what policy does not allow; `audit` lets it through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Keyword for Mode {
    const WORDS: &'static [(&'static str, Self)] =
        &[("enforce", Self::Enforce), ("audit", Self::Audit)];
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Keyword for Action {
    const WORDS: &'static [(&'static str, Self)] = &[("allow", Self::Allow), ("deny", Self::Deny)];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

impl Keyword for Protocol {
    const WORDS: &'static [(&'static str, Self)] =
        &[("tcp", Self::Tcp), ("udp", Self::Udp), ("any", Self::Any)];
}

impl Protocol {
    /// Whether a rule for `self` applies to connects over `transport`
    /// (`Tcp` or `Udp`).
    pub fn covers(self, transport: Protocol) -> bool {
        self == transport || self == Protocol::Any
    }
}
