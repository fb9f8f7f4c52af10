//! `[egress]` in the agent configuration: whether the credential broker
//! runs, the ports of its listeners, the roots it trusts upstream, and the
//! lifetimes of its timeouts and certificates.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// What is wrong in `[egress]`.
#[derive(Debug, thiserror::Error)]
pub enum EgressConfigError {
    #[error("`egress.{name}` must not be 0")]
    PortZero { name: &'static str },
    #[error("`egress.tls_port` and `egress.http_port` must differ (both are {port})")]
    SamePort { port: u16 },
    #[error("`egress.{name}` must be more than 0s")]
    Zero { name: &'static str },
    #[error("`egress.certificate_lifetime` must be at least 1m, got {}", humantime::format_duration(*.got))]
    CertificateTooShort { got: Duration },
    #[error(
        "`egress.ca_lifetime` ({}) must be at least four times `egress.certificate_lifetime` ({}): the CA rotates at half its lifetime and signs for a quarter more",
        humantime::format_duration(*.ca),
        humantime::format_duration(*.leaf)
    )]
    CaTooShort { ca: Duration, leaf: Duration },
    #[error("`egress.extra_roots`: {0}")]
    ExtraRoots(#[from] crate::tls::PemError),
}

/// `[egress]` in the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Run the credential broker and redirect the connects of credential
    /// rules to it. Default false.
    pub enabled: bool,
    /// Port of the listener that takes redirected TLS connects (to port
    /// 443), on the wildcard address on device `lo` of each network
    /// namespace. Default 15443.
    pub tls_port: u16,
    /// Port of the listener that takes redirected plain HTTP connects (to
    /// port 80, for credential rules that allow it). Default 15080.
    pub http_port: u16,
    /// PEM files of roots trusted for upstream servers besides the
    /// system's (e.g. a company or test CA). Default none.
    pub extra_roots: Vec<PathBuf>,
    /// The longest the broker waits for an upstream: to connect, finish
    /// TLS and send a response's head (or, for an `oauth` credential, for
    /// its token endpoint to give a token); past it the workload gets
    /// 504. Default 10s.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub upstream_timeout: Duration,
    /// How long the broker waits for a workload: for its TLS ClientHello
    /// and handshake, and for a request's head on an HTTP/1 connection
    /// (so also between keep-alive requests); and how long an unused
    /// upstream connection stays pooled. Default 90s.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub idle_timeout: Duration,
    /// Validity of the certificates the broker shows workloads for a
    /// credential's host; a new one is issued at half of it. Default 24h.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub certificate_lifetime: Duration,
    /// Validity of the egress CA. A new CA is made at half of it and put in
    /// the trust bundle at once; it signs from three quarters of the old
    /// one's lifetime; the old one stays in the bundle until it expires.
    /// Default 90 days.
    #[serde(deserialize_with = "crate::clock::deserialize_duration")]
    pub ca_lifetime: Duration,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            tls_port: 15443,
            http_port: 15080,
            extra_roots: Vec::new(),
            upstream_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            certificate_lifetime: Duration::from_secs(24 * 3600),
            ca_lifetime: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl EgressConfig {
    /// Checks what serde cannot, reading every `extra_roots` file.
    pub fn check(&self) -> Result<(), EgressConfigError> {
        for (name, port) in [("tls_port", self.tls_port), ("http_port", self.http_port)] {
            if port == 0 {
                return Err(EgressConfigError::PortZero { name });
            }
        }
        if self.tls_port == self.http_port {
            return Err(EgressConfigError::SamePort {
                port: self.tls_port,
            });
        }
        for (name, d) in [
            ("upstream_timeout", self.upstream_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(EgressConfigError::Zero { name });
            }
        }
        if self.certificate_lifetime < Duration::from_secs(60) {
            return Err(EgressConfigError::CertificateTooShort {
                got: self.certificate_lifetime,
            });
        }
        if self.ca_lifetime < self.certificate_lifetime * 4 {
            return Err(EgressConfigError::CaTooShort {
                ca: self.ca_lifetime,
                leaf: self.certificate_lifetime,
            });
        }
        self.extra_root_certs()?;
        Ok(())
    }

    /// The DER certificates of every `extra_roots` file, in order.
    pub fn extra_root_certs(&self) -> Result<Vec<Vec<u8>>, EgressConfigError> {
        let mut out = Vec::new();
        for path in &self.extra_roots {
            out.extend(crate::tls::pem_certs_file(path)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EgressConfig, String> {
        let c: EgressConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, EgressConfig::default());
        assert!(!c.enabled);
        assert_eq!((c.tls_port, c.http_port), (15443, 15080));
        assert!(c.extra_roots.is_empty());
        assert_eq!(c.upstream_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.certificate_lifetime, Duration::from_secs(86400));
        assert_eq!(c.ca_lifetime, Duration::from_secs(90 * 86400));
    }

    #[test]
    fn every_key_is_read() {
        let dir = std::env::temp_dir().join(format!("idgate-egress-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&root, cert.pem()).unwrap();
        let c = parse(&format!(
            r#"
            enabled = true
            tls_port = 8443
            http_port = 8080
            extra_roots = ["{}"]
            upstream_timeout = "3s"
            idle_timeout = "1m"
            certificate_lifetime = "2h"
            ca_lifetime = "30d"
            "#,
            root.display()
        ))
        .unwrap();
        assert!(c.enabled);
        assert_eq!((c.tls_port, c.http_port), (8443, 8080));
        assert_eq!(c.extra_root_certs().unwrap(), vec![cert.der().to_vec()]);
        assert_eq!(c.upstream_timeout, Duration::from_secs(3));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.certificate_lifetime, Duration::from_secs(7200));
        assert_eq!(c.ca_lifetime, Duration::from_secs(30 * 86400));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("tls_port = 0", "egress.tls_port"),
            ("http_port = 0", "egress.http_port"),
            ("http_port = 15443", "egress.tls_port"),
            ("tls_port = 70000", "tls_port"),
            ("upstream_timeout = \"0s\"", "egress.upstream_timeout"),
            ("idle_timeout = \"0s\"", "egress.idle_timeout"),
            ("idle_timeout = \"soon\"", "idle_timeout"),
            (
                "certificate_lifetime = \"10s\"",
                "egress.certificate_lifetime",
            ),
            ("ca_lifetime = \"2d\"", "egress.ca_lifetime"),
            (
                "extra_roots = [\"/nonexistent/root.pem\"]",
                "/nonexistent/root.pem",
            ),
            ("enable = true", "enable"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
