//! `[dns]` in the agent configuration: the upstream resolvers, how answers
//! are filtered, and where the listeners are; and the reader of the host's
//! `/etc/resolv.conf`, the default upstreams.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::identity::{SpiffeId, SpiffeIdError};

/// What is wrong in `[dns]`.
#[derive(Debug, thiserror::Error)]
pub enum DnsConfigError {
    #[error(
        "`dns.reserved_net` must be between 1 and 255 (127.0.0.0/16 holds 127.0.0.1), got {got}"
    )]
    ReservedNet { got: u8 },
    #[error("`dns.listen_port` must not be 0")]
    ListenPort,
    #[error(
        "`dns.upstreams`: {addr} is in 127.{net}.0.0/16, the range reserved for the agent's listeners (`dns.reserved_net`)"
    )]
    UpstreamReserved { addr: SocketAddr, net: u8 },
    #[error("`dns.upstreams`: {addr} has port 0")]
    UpstreamPort { addr: SocketAddr },
    #[error("`dns.{name}` must be at least 1s")]
    TooShort { name: &'static str },
    #[error("`dns.max_ttl` must be at most {}s (a TTL is 31 bits)", MAX_TTL_SECS)]
    MaxTtlTooLong,
    #[error("`dns.max_addresses_per_identity` must be at least 1")]
    MaxAddresses,
    #[error("`dns.direct`: {id:?}: {source}")]
    Direct { id: String, source: SpiffeIdError },
    #[error("`dns.direct`: {id}: trust domain {:?} is not in `trust_domains`", .id.trust_domain())]
    DirectNotLocal { id: SpiffeId },
    #[error("`dns.upstreams` is empty and {0}")]
    ResolvConf(#[from] ResolvConfError),
}

/// Why the host's resolv.conf gives no upstreams.
#[derive(Debug, thiserror::Error)]
pub enum ResolvConfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no usable `nameserver` line")]
    NoNameserver { path: PathBuf },
    #[error(
        "{path}: nameserver {addr} is in 127.{net}.0.0/16, the range reserved for the agent's listeners (`dns.reserved_net`)"
    )]
    Reserved {
        path: PathBuf,
        addr: IpAddr,
        net: u8,
    },
}

/// The longest TTL a DNS record can carry (RFC 2181 section 8: 2^31 - 1).
const MAX_TTL_SECS: u64 = i32::MAX as u64;

/// Where the host's resolvers are listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What to do with an A/AAAA answer in a private, loopback, link-local,
/// unspecified or CGNAT range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivateAnswers {
    /// Remove it from the answer and record it: a public name must not
    /// open a path to the inside (DNS rebinding).
    #[default]
    Deny,
    /// Keep and learn it like any other address.
    Allow,
}

/// `[dns]` in the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Send the workloads' DNS queries to the agent's resolver, and allow
    /// the addresses of names in policy. Default true.
    pub enabled: bool,
    /// The resolvers queries are forwarded to, in order. Default empty:
    /// the nameservers of the host's `/etc/resolv.conf` (port 53), read
    /// again when it changes (see [`ResolvConf`]).
    pub upstreams: Vec<SocketAddr>,
    /// `deny` (default) or `allow` private-range answers.
    pub private_answers: PrivateAnswers,
    /// Port of the listeners (bound to the wildcard address on device `lo`
    /// of each network namespace). Default 15353: not 53, where a host
    /// resolver may listen on 127.0.0.53.
    pub listen_port: u16,
    /// N of the loopback range `127.N.0.0/16` queries are redirected to
    /// (one address per identity slot). Default 53; not 0, since
    /// `127.0.0.0/16` holds 127.0.0.1.
    pub reserved_net: u8,
    /// How much longer a learned address stays allowed than the TTL handed
    /// to the workload. Default 5s: a client that got TTL t may connect
    /// right at its end, and the clocks of agent and client and the
    /// answer's own travel differ; the kernel entry must outlive the TTL
    /// the workload holds.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub grace: Duration,
    /// Answers' TTLs are capped to this. Default 1h.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub max_ttl: Duration,
    /// Addresses one identity may have learned at once; past it a query
    /// gets SERVFAIL. Default 4096.
    pub max_addresses_per_identity: u32,
    /// The longest one exchange with one upstream may take before the next
    /// is tried. Default 2s.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub upstream_timeout: Duration,
    /// SPIFFE IDs whose DNS is not redirected (e.g. a recursive resolver
    /// run in the scope). Default none.
    pub direct: Vec<String>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            upstreams: Vec::new(),
            private_answers: PrivateAnswers::Deny,
            listen_port: 15353,
            reserved_net: 53,
            grace: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            max_addresses_per_identity: 4096,
            upstream_timeout: Duration::from_secs(2),
            direct: Vec::new(),
        }
    }
}

impl DnsConfig {
    /// Checks what serde cannot; `trust_domains` is the agent's list
    /// (empty: any). The host's resolv.conf is not read here: see
    /// [`DnsConfig::upstream_source`].
    pub fn check(&self, trust_domains: &[String]) -> Result<(), DnsConfigError> {
        if self.reserved_net == 0 {
            return Err(DnsConfigError::ReservedNet {
                got: self.reserved_net,
            });
        }
        if self.listen_port == 0 {
            return Err(DnsConfigError::ListenPort);
        }
        for &addr in &self.upstreams {
            if in_reserved(addr.ip(), self.reserved_net) {
                return Err(DnsConfigError::UpstreamReserved {
                    addr,
                    net: self.reserved_net,
                });
            }
            if addr.port() == 0 {
                return Err(DnsConfigError::UpstreamPort { addr });
            }
        }
        for (name, d) in [
            ("max_ttl", self.max_ttl),
            ("upstream_timeout", self.upstream_timeout),
        ] {
            if d < Duration::from_secs(1) {
                return Err(DnsConfigError::TooShort { name });
            }
        }
        if self.max_ttl.as_secs() > MAX_TTL_SECS {
            return Err(DnsConfigError::MaxTtlTooLong);
        }
        if self.max_addresses_per_identity == 0 {
            return Err(DnsConfigError::MaxAddresses);
        }
        self.direct_ids(trust_domains)?;
        Ok(())
    }

    /// The `direct` identities, parsed and checked against the agent's
    /// trust domains (empty: any).
    pub fn direct_ids(&self, trust_domains: &[String]) -> Result<Vec<SpiffeId>, DnsConfigError> {
        self.direct
            .iter()
            .map(|s| {
                let id: SpiffeId = s.parse().map_err(|source| DnsConfigError::Direct {
                    id: s.clone(),
                    source,
                })?;
                if !trust_domains.is_empty()
                    && !trust_domains.iter().any(|t| t == id.trust_domain())
                {
                    return Err(DnsConfigError::DirectNotLocal { id });
                }
                Ok(id)
            })
            .collect()
    }

    /// `max_ttl` in whole seconds, as a TTL.
    pub fn max_ttl_secs(&self) -> u32 {
        u32::try_from(self.max_ttl.as_secs().min(MAX_TTL_SECS)).unwrap_or(i32::MAX as u32)
    }

    /// Where the upstreams come from: the configured list, or the host's
    /// `/etc/resolv.conf`.
    pub fn upstream_source(&self) -> UpstreamSource {
        self.upstream_source_at(Path::new(RESOLV_CONF))
    }

    /// [`DnsConfig::upstream_source`] with another resolv.conf.
    pub fn upstream_source_at(&self, resolv_conf: &Path) -> UpstreamSource {
        if self.upstreams.is_empty() {
            UpstreamSource::ResolvConf(ResolvConf::new(resolv_conf, self.reserved_net))
        } else {
            UpstreamSource::Fixed(self.upstreams.clone())
        }
    }
}

/// Whether `ip` (or the IPv4 address an IPv6 one maps) is in the agent's
/// reserved range `127.net.0.0/16`.
pub fn in_reserved(ip: IpAddr, net: u8) -> bool {
    let v4 = match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => a,
            None => return false,
        },
    };
    let [a, b, ..] = v4.octets();
    a == 127 && b == net
}

/// Where the upstream resolvers come from.
#[derive(Debug)]
pub enum UpstreamSource {
    /// `dns.upstreams` as configured.
    Fixed(Vec<SocketAddr>),
    /// The nameservers of the host's resolv.conf, read again when it
    /// changes.
    ResolvConf(ResolvConf),
}

impl UpstreamSource {
    /// The upstreams now. The wiring calls it at start (an error there is
    /// a configuration error) and then now and then (an error then keeps
    /// the last good list).
    pub fn current(&mut self) -> Result<Vec<SocketAddr>, DnsConfigError> {
        match self {
            Self::Fixed(list) => Ok(list.clone()),
            Self::ResolvConf(r) => Ok(r.current()?),
        }
    }
}

/// The nameservers of a resolv.conf, read again when asked and the file
/// changed (its modification time, size, inode, or contents).
#[derive(Debug)]
pub struct ResolvConf {
    path: PathBuf,
    reserved_net: u8,
    /// The file's stamp and contents when last read, and what they gave.
    last: Option<(Stamp, String, Vec<SocketAddr>)>,
}

/// What tells a file changed without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl ResolvConf {
    /// A reader of `path`, refusing nameservers in `127.reserved_net.0.0/16`.
    pub fn new(path: &Path, reserved_net: u8) -> Self {
        Self {
            path: path.to_owned(),
            reserved_net,
            last: None,
        }
    }

    /// The nameservers (port 53) the file lists now. The file is read
    /// again only when its stamp changed; the list is parsed again only
    /// when its contents changed.
    pub fn current(&mut self) -> Result<Vec<SocketAddr>, ResolvConfError> {
        use std::os::unix::fs::MetadataExt;
        let read_err = |source| ResolvConfError::Read {
            path: self.path.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.path).map_err(read_err)?;
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            ino: meta.ino(),
        };
        if let Some((s, _, list)) = &self.last
            && *s == stamp
        {
            return Ok(list.clone());
        }
        let text = std::fs::read_to_string(&self.path).map_err(read_err)?;
        if let Some((s, t, list)) = &mut self.last
            && *t == text
        {
            *s = stamp;
            return Ok(list.clone());
        }
        let list = self.servers_of(&text)?;
        self.last = Some((stamp, text, list.clone()));
        Ok(list)
    }

    fn servers_of(&self, text: &str) -> Result<Vec<SocketAddr>, ResolvConfError> {
        let ips = parse_resolv_conf(text);
        if let Some(&addr) = ips.iter().find(|ip| in_reserved(**ip, self.reserved_net)) {
            return Err(ResolvConfError::Reserved {
                path: self.path.clone(),
                addr,
                net: self.reserved_net,
            });
        }
        if ips.is_empty() {
            return Err(ResolvConfError::NoNameserver {
                path: self.path.clone(),
            });
        }
        Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, 53)).collect())
    }
}

/// The addresses of a resolv.conf's `nameserver` lines, in order. Comments
/// (`#` or `;` to the end of the line) are ignored, and so are lines whose
/// address does not parse (e.g. an IPv6 address with a zone).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DnsConfig, String> {
        let c: DnsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check(&["example.org".to_owned()])
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, DnsConfig::default());
        assert!(c.enabled);
        assert!(c.upstreams.is_empty());
        assert_eq!(c.private_answers, PrivateAnswers::Deny);
        assert_eq!(c.listen_port, 15353);
        assert_eq!(c.reserved_net, 53);
        assert_eq!(c.grace, Duration::from_secs(5));
        assert_eq!(c.max_ttl, Duration::from_secs(3600));
        assert_eq!(c.max_ttl_secs(), 3600);
        assert_eq!(c.max_addresses_per_identity, 4096);
        assert_eq!(c.upstream_timeout, Duration::from_secs(2));
        assert!(c.direct.is_empty());
        assert!(matches!(c.upstream_source(), UpstreamSource::ResolvConf(_)));
    }

    #[test]
    fn every_key_is_read() {
        let every_key = |timeout: &str| {
            parse(&format!(
                r#"
                enabled = false
                upstreams = ["10.96.0.10:53", "[2001:db8::1]:5353"]
                private_answers = "allow"
                listen_port = 5300
                reserved_net = 54
                grace = "10s"
                max_ttl = "5m"
                max_addresses_per_identity = 10
                upstream_timeout = "{timeout}"
                direct = ["spiffe://example.org/resolver"]
                "#
            ))
        };
        // upstream_timeout below 1s is refused.
        assert!(
            every_key("500ms")
                .unwrap_err()
                .contains("dns.upstream_timeout")
        );
        let c = every_key("3s").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.private_answers, PrivateAnswers::Allow);
        assert_eq!((c.listen_port, c.reserved_net), (5300, 54));
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.max_ttl_secs(), 300);
        assert_eq!(c.max_addresses_per_identity, 10);
        assert_eq!(c.upstream_timeout, Duration::from_secs(3));
        let ids = c.direct_ids(&[]).unwrap();
        assert_eq!(ids[0].to_string(), "spiffe://example.org/resolver");
        let mut source = c.upstream_source();
        assert_eq!(
            source.current().unwrap(),
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[2001:db8::1]:5353".parse().unwrap()
            ]
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("reserved_net = 0", "dns.reserved_net"),
            ("reserved_net = 256", "reserved_net"),
            ("listen_port = 0", "dns.listen_port"),
            ("listen_port = 70000", "listen_port"),
            ("upstreams = [\"127.53.0.1:53\"]", "dns.upstreams"),
            ("upstreams = [\"[::ffff:127.53.1.1]:53\"]", "dns.upstreams"),
            ("upstreams = [\"10.0.0.1:0\"]", "dns.upstreams"),
            ("upstreams = [\"10.0.0.1\"]", "upstreams"),
            ("private_answers = \"maybe\"", "private_answers"),
            ("grace = \"soon\"", "grace"),
            ("max_ttl = \"0s\"", "dns.max_ttl"),
            ("max_ttl = \"100y\"", "dns.max_ttl"),
            ("upstream_timeout = \"0s\"", "dns.upstream_timeout"),
            (
                "max_addresses_per_identity = 0",
                "dns.max_addresses_per_identity",
            ),
            ("direct = [\"not-an-id\"]", "dns.direct"),
            ("direct = [\"spiffe://other.org/x\"]", "dns.direct"),
            ("enable = true", "enable"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
        // Another reserved range makes 127.53/16 a fine upstream.
        parse("reserved_net = 54\nupstreams = [\"127.53.0.1:53\"]").unwrap();
    }

    #[test]
    fn resolv_conf_lines() {
        let text = "# generated\n\
            search example.org\n\
            nameserver 10.0.0.2 # the router\n\
            nameserver\t2001:db8::53\n\
            ; nameserver 10.9.9.9\n\
            #nameserver 10.9.9.8\n\
            nameserver fe80::1%eth0\n\
            nameserver not-an-address\n\
            nameservers 10.9.9.7\n\
            options ndots:5\n\
            nameserver 127.0.0.53\n";
        assert_eq!(
            parse_resolv_conf(text),
            ["10.0.0.2", "2001:db8::53", "127.0.0.53"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
    }

    #[test]
    fn resolv_conf_is_read_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("idgate-dns-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        let c = DnsConfig::default();
        let mut source = c.upstream_source_at(&path);
        assert!(matches!(
            source.current(),
            Err(DnsConfigError::ResolvConf(ResolvConfError::Read { .. }))
        ));
        std::fs::write(&path, "nameserver 10.0.0.2\n").unwrap();
        assert_eq!(source.current().unwrap(), ["10.0.0.2:53".parse().unwrap()]);
        std::fs::write(&path, "nameserver 10.0.0.3\nnameserver ::1\n").unwrap();
        assert_eq!(
            source.current().unwrap(),
            ["10.0.0.3:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
        std::fs::write(&path, "# nothing\n").unwrap();
        let e = source.current().unwrap_err().to_string();
        assert!(
            e.contains("dns.upstreams") && e.contains("nameserver"),
            "{e}"
        );
        std::fs::write(&path, "nameserver 127.53.0.9\n").unwrap();
        let e = source.current().unwrap_err().to_string();
        assert!(e.contains("127.53.0.9"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reserved_range() {
        assert!(in_reserved("127.53.1.2".parse().unwrap(), 53));
        assert!(in_reserved("::ffff:127.53.1.2".parse().unwrap(), 53));
        assert!(!in_reserved("127.0.0.53".parse().unwrap(), 53));
        assert!(!in_reserved("::1".parse().unwrap(), 53));
    }
}
