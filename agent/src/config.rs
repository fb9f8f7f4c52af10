//! The agent's configuration file (TOML).
//!
//! Every key has a documented default; unknown keys are errors. Relative
//! paths are taken relative to the directory of the configuration file, so
//! an example configuration can sit beside its policy.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::{Entry, GLOB_CHARS, Origin};
use crate::line_index::LineIndex;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Invalid { path: PathBuf, source: Invalid },
}

/// What is wrong in a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("`{what}` must be a relative path without `..`, got {path:?}")]
    NotRelative { what: String, path: PathBuf },
    #[error("`scope` must name a cgroup below the cgroup v2 root")]
    EmptyScope,
    #[error("`pin_dir` must be absolute, got {}", .0.display())]
    PinDir(PathBuf),
    #[error("`resync_seconds` must be at least 1")]
    Resync,
    #[error("`max_workloads` must be between 1 and {MAX_WORKLOADS}, got {got}")]
    MaxWorkloads { got: u32 },
    #[error("trust_domains: {0}")]
    TrustDomain(#[from] crate::svid::TrustDomainError),
    #[error("{what} {cgroup:?} has glob characters")]
    Glob { what: String, cgroup: String },
    #[error("{what}: {source}")]
    Identity {
        what: String,
        source: crate::identity::SpiffeIdError,
    },
    #[error("{what} {id}: trust domain {:?} is not in `trust_domains`", .id.trust_domain())]
    NotLocal {
        what: String,
        id: crate::identity::SpiffeId,
    },
    #[error("{what}: {source}")]
    Selector {
        what: String,
        source: crate::identity::SelectorError,
    },
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Kubelet(#[from] crate::identity::k8s::KubeletError),
    #[error(transparent)]
    Svid(#[from] crate::svid::SvidConfigError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsConfigError),
    #[error(transparent)]
    Grants(#[from] crate::grants::GrantsConfigError),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressConfigError),
    #[error(
        "`egress.enabled` needs the DNS path (`dns.enabled`): the broker takes the connects to the addresses that name lookups learned"
    )]
    EgressWithoutDns,
    #[error(
        "`egress.{what}` ({port}) is `dns.listen_port` too: the listeners of one namespace need ports of their own"
    )]
    EgressPortTaken { what: &'static str, port: u16 },
}

/// The most cgroups `max_workloads` may ask room for.
const MAX_WORKLOADS: u32 = 1 << 20;

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The managed scope: a cgroup v2 directory, relative to the cgroup v2
    /// root, whose every descendant is judged. Default `idgate.slice`.
    pub scope: PathBuf,
    /// Where the maps and links are pinned. Default `/sys/fs/bpf/idgate`.
    pub pin_dir: PathBuf,
    /// The operator control socket. Default `/run/idgate/control.sock`.
    pub control_socket: PathBuf,
    /// Users allowed on the control socket, besides root.
    pub operator_uids: Vec<u32>,
    /// Groups allowed on the control socket.
    pub operator_gids: Vec<u32>,
    /// A policy file, or a directory whose `*.toml` files together are the
    /// policy. Default `/etc/idgate/policy`.
    pub policy: PathBuf,
    /// Where the agent keeps state that must outlive it (the revoked
    /// identities, the grants). Default `/var/lib/idgate`.
    pub state_dir: PathBuf,
    /// The registration entries: a file, or a directory whose `*.toml`
    /// files together hold the `[[entry]]` tables that map selectors to
    /// SPIFFE IDs. Default `/etc/idgate/entries`.
    pub entries: PathBuf,
    /// Trust domains this agent issues and enforces identities for; empty
    /// means any.
    pub trust_domains: Vec<String>,
    /// Seconds between full re-attestations of the scope, on top of the
    /// events that trigger one at once. Default 10.
    pub resync_seconds: u64,
    /// Cgroups that can be bound at once (the size of the kernel's
    /// identities map, fixed when it is first made). A workload beyond it
    /// is denied and reported; none is evicted. Default 65536.
    pub max_workloads: u32,
    /// Shorthand registration entries: `[[workload]]` tables binding a
    /// cgroup (relative to the scope, made if missing) to an identity.
    /// Each is the entry `{ id = IDENTITY, selectors =
    /// ["cgroup:path:/SCOPE/CGROUP"] }`.
    #[serde(rename = "workload")]
    pub workloads: Vec<WorkloadBinding>,
    /// The entries the `[[workload]]` tables stand for.
    #[serde(skip)]
    pub workload_entries: Vec<Entry>,
    /// `[events]`: audit log, standard output echo, allow sampling; see
    /// `events::EventsConfig` for each key and its default.
    pub events: crate::events::EventsConfig,
    /// `[metrics]`: the Prometheus endpoint's loopback `address`; none by
    /// default.
    pub metrics: crate::metrics::MetricsConfig,
    /// `[svid]`: the Workload API, SVID lifetimes, the CAs, the bundle
    /// endpoint and federation; see `svid::SvidConfig` for each key and
    /// its default.
    pub svid: crate::svid::SvidConfig,
    /// `[kubernetes]`: fetch the kubelet's pod list for `k8s:` selectors;
    /// off when absent. See `identity::k8s::KubeletConfig` for each key
    /// and its default.
    pub kubernetes: Option<crate::identity::k8s::KubeletConfig>,
    /// `[dns]`: the DNS path (names in policy): upstreams, answer
    /// filtering, the listeners; see `dns::DnsConfig` for each key and its
    /// default.
    #[serde(default)]
    pub dns: crate::dns::DnsConfig,
    /// `[grants]`: the longest grant and the most that run at once; see
    /// `grants::GrantsConfig` for each key and its default.
    pub grants: crate::grants::GrantsConfig,
    /// `[egress]`: the credential broker (credential rules in policy); off
    /// by default. See `egress::EgressConfig` for each key and its
    /// default.
    pub egress: crate::egress::EgressConfig,
}

/// A cgroup under the scope bound to an identity by the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadBinding {
    /// Cgroup path relative to the scope.
    pub cgroup: PathBuf,
    /// The SPIFFE ID the cgroup's workloads get.
    pub identity: toml::Spanned<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scope: PathBuf::from("idgate.slice"),
            pin_dir: PathBuf::from("/sys/fs/bpf/idgate"),
            control_socket: PathBuf::from("/run/idgate/control.sock"),
            operator_uids: Vec::new(),
            operator_gids: Vec::new(),
            policy: PathBuf::from("/etc/idgate/policy"),
            state_dir: PathBuf::from("/var/lib/idgate"),
            entries: PathBuf::from("/etc/idgate/entries"),
            trust_domains: Vec::new(),
            resync_seconds: 10,
            max_workloads: idgate_common::MAX_BOUND_CGROUPS,
            workloads: Vec::new(),
            workload_entries: Vec::new(),
            events: Default::default(),
            metrics: Default::default(),
            svid: Default::default(),
            kubernetes: None,
            dns: Default::default(),
            grants: Default::default(),
            egress: Default::default(),
        }
    }
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |source: Invalid| ConfigError::Invalid {
            path: path.to_owned(),
            source,
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| invalid(e.into()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.policy,
            &mut config.control_socket,
            &mut config.state_dir,
            &mut config.entries,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for root in &mut config.egress.extra_roots {
            if root.is_relative() {
                *root = base.join(&*root);
            }
        }
        config.events.resolve(base);
        config.svid.resolve(base, &config.control_socket);
        if let Some(k) = &mut config.kubernetes {
            k.resolve(base);
        }
        config.check().map_err(&invalid)?;
        config.workload_entries = config.entries_of_workloads(path, &text).map_err(invalid)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), Invalid> {
        check_relative("scope", &self.scope)?;
        if self.scope.as_os_str().is_empty() {
            return Err(Invalid::EmptyScope);
        }
        if !self.pin_dir.is_absolute() {
            return Err(Invalid::PinDir(self.pin_dir.clone()));
        }
        if self.resync_seconds == 0 {
            return Err(Invalid::Resync);
        }
        if !(1..=MAX_WORKLOADS).contains(&self.max_workloads) {
            return Err(Invalid::MaxWorkloads {
                got: self.max_workloads,
            });
        }
        for td in &self.trust_domains {
            crate::svid::check_trust_domain(td)?;
        }
        self.events.check()?;
        self.metrics.check()?;
        if let Some(k) = &self.kubernetes {
            k.check()?;
        }
        self.dns.check(&self.trust_domains)?;
        self.grants.check()?;
        self.check_egress()?;
        Ok(self.svid.check(&self.trust_domains)?)
    }

    fn check_egress(&self) -> Result<(), Invalid> {
        if !self.egress.enabled {
            return Ok(());
        }
        if !self.dns.enabled {
            return Err(Invalid::EgressWithoutDns);
        }
        self.egress.check()?;
        for (what, port) in [
            ("tls_port", self.egress.tls_port),
            ("http_port", self.egress.http_port),
        ] {
            if port == self.dns.listen_port {
                return Err(Invalid::EgressPortTaken { what, port });
            }
        }
        Ok(())
    }
}

impl Config {
    /// The registration entries that the `[[workload]]` tables stand for.
    fn entries_of_workloads(&self, path: &Path, text: &str) -> Result<Vec<Entry>, Invalid> {
        let lines = LineIndex::new(text);
        let mut out = Vec::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let what = format!("workload[{i}]");
            check_relative(&format!("{what}.cgroup"), &w.cgroup)?;
            let cgroup = format!("/{}/{}", self.scope.display(), w.cgroup.display());
            if cgroup.contains(GLOB_CHARS) {
                return Err(Invalid::Glob {
                    what: format!("{what}.cgroup"),
                    cgroup,
                });
            }
            let id: crate::identity::SpiffeId =
                w.identity
                    .get_ref()
                    .parse()
                    .map_err(|source| Invalid::Identity {
                        what: format!("{what}.identity"),
                        source,
                    })?;
            if !self.trust_domains.is_empty()
                && !self.trust_domains.iter().any(|t| t == id.trust_domain())
            {
                return Err(Invalid::NotLocal {
                    what: format!("{what}.identity"),
                    id,
                });
            }
            let selector =
                format!("cgroup:path:{cgroup}")
                    .parse()
                    .map_err(|source| Invalid::Selector {
                        what: format!("{what}.cgroup"),
                        source,
                    })?;
            out.push(Entry {
                id,
                selectors: vec![selector],
                ttl: None,
                origin: Origin::at(path, &lines, text, w.identity.span().start),
            });
        }
        Ok(out)
    }
}

/// A cgroup path must stay below where it is anchored.
fn check_relative(what: &str, path: &Path) -> Result<(), Invalid> {
    use std::path::Component;
    if path.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(Invalid::NotRelative {
            what: what.to_owned(),
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        // Tests run in parallel: every call gets a file of its own.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("idgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{call}.toml"));
        std::fs::write(&path, text).unwrap();
        let r = Config::load(&path);
        std::fs::remove_file(&path).unwrap();
        r
    }

    #[test]
    fn defaults_and_relative_policy_path() {
        let c = load_str("policy = \"pol\"\n").unwrap();
        assert_eq!(c.scope, PathBuf::from("idgate.slice"));
        assert!(c.policy.is_absolute() && c.policy.ends_with("pol"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load_str("scop = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("scop"), "{e}");
    }

    #[test]
    fn scope_may_not_escape() {
        let e = load_str("scope = \"../etc\"\n").unwrap_err().to_string();
        assert!(e.contains("scope"), "{e}");
    }

    #[test]
    fn kubernetes_is_off_unless_configured() {
        assert!(load_str("policy = \"pol\"\n").unwrap().kubernetes.is_none());
        let c =
            load_str("[kubernetes]\nkubelet_ca_path = \"ca.crt\"\nrefresh = \"30s\"\n").unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.kubelet_url, "https://127.0.0.1:10250");
        assert!(k.kubelet_ca_path.is_absolute() && k.kubelet_ca_path.ends_with("ca.crt"));
        assert_eq!(
            k.token_path,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert_eq!(k.refresh, std::time::Duration::from_secs(30));
        assert!(!k.skip_kubelet_verification);
    }

    #[test]
    fn kubernetes_keys_are_checked() {
        let e = load_str("[kubernetes]\nkubelet_urll = \"https://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kubelet_urll") && e.contains("line 2"), "{e}");
        let e = load_str("[kubernetes]\nkubelet_url = \"http://127.0.0.1:10255\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kubelet_url") && e.contains("https"), "{e}");
    }

    #[test]
    fn dns_table_is_read_and_checked() {
        let c = load_str("policy = \"pol\"\n").unwrap();
        assert!(c.dns.enabled && c.dns.upstreams.is_empty());
        let c = load_str("[dns]\nupstreams = [\"10.96.0.10:53\"]\n").unwrap();
        assert_eq!(c.dns.upstreams, ["10.96.0.10:53".parse().unwrap()]);
        let e = load_str("[dns]\nreserved_net = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dns.reserved_net"), "{e}");
        let e = load_str("[dns]\nlisten_prt = 1\n").unwrap_err().to_string();
        assert!(e.contains("listen_prt") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_trust_domain_is_named() {
        let e = load_str("trust_domains = [\"Example.org\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("trust_domains") && e.contains("Example.org"),
            "{e}"
        );
    }
}
