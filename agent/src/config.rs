//! The agent's configuration file (TOML).
//!
//! Every key has a documented default; unknown keys are errors. Relative
//! paths are taken relative to the directory of the configuration file, so
//! an example configuration can sit beside its policy.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::SpiffeId;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

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
    /// identities). Default `/var/lib/idgate`.
    pub state_dir: PathBuf,
    /// Trust domains this agent issues and enforces identities for.
    pub trust_domains: Vec<String>,
    /// Static bindings of cgroups (relative to the scope) to identities.
    #[serde(rename = "workload")]
    pub workloads: Vec<WorkloadBinding>,
}

/// A cgroup under the scope bound to an identity by configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadBinding {
    /// Cgroup path relative to the scope.
    pub cgroup: PathBuf,
    /// The SPIFFE ID the cgroup's workloads get.
    pub identity: String,
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
            trust_domains: Vec::new(),
            workloads: Vec::new(),
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
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.policy,
            &mut config.control_socket,
            &mut config.state_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.check().map_err(invalid)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        check_relative("scope", &self.scope)?;
        if self.scope.as_os_str().is_empty() {
            return Err("`scope` must name a cgroup below the cgroup v2 root".into());
        }
        if !self.pin_dir.is_absolute() {
            return Err(format!(
                "`pin_dir` must be absolute, got {}",
                self.pin_dir.display()
            ));
        }
        for (i, w) in self.workloads.iter().enumerate() {
            check_relative(&format!("workload[{i}].cgroup"), &w.cgroup)?;
            let id: SpiffeId = w
                .identity
                .parse()
                .map_err(|e| format!("workload[{i}].identity: {e}"))?;
            if !self.trust_domains.is_empty()
                && !self.trust_domains.iter().any(|t| t == id.trust_domain())
            {
                return Err(format!(
                    "workload[{i}].identity {id}: trust domain {:?} is not in `trust_domains`",
                    id.trust_domain()
                ));
            }
        }
        Ok(())
    }

    /// The identity of each statically bound cgroup.
    pub fn bindings(&self) -> Vec<(PathBuf, SpiffeId)> {
        self.workloads
            .iter()
            .map(|w| {
                let id = w.identity.parse().expect("checked in Config::load");
                (w.cgroup.clone(), id)
            })
            .collect()
    }
}

/// A cgroup path must stay below where it is anchored.
fn check_relative(what: &str, path: &Path) -> Result<(), String> {
    use std::path::Component;
    if path.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(format!(
            "`{what}` must be a relative path without `..`, got {:?}",
            path.display().to_string()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("idgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{:x}.toml",
            text.len() * 31 + text.as_bytes()[0] as usize
        ));
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
    fn bad_identity_is_named() {
        let e = load_str("[[workload]]\ncgroup = \"a\"\nidentity = \"http://x/y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workload[0].identity"), "{e}");
    }
}
