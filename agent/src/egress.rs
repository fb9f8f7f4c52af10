//! The credential broker (zero-secret egress), as a library: workloads
//! call APIs that want a key without holding it; the agent adds it.
//!
//! 1. The kernel redirects a workload's TCP connect to a credential host's
//!    address on port 443 (or 80, where the rule allows plain HTTP) to the
//!    broker's listener at `127.N.(slot >> 8).(slot & 255)` of the
//!    workload's network namespace, port `tls_port` (or `http_port`)
//!    ([`open_listeners`]). The broker reads the slot, so the identity,
//!    from the accepted socket's local address, never from the traffic.
//! 2. On the TLS port it reads the ClientHello (`hello`). No server name:
//!    refused. The host of one of the identity's credentials: TLS is
//!    terminated with a certificate for that name from the egress CA
//!    ([`EgressCa`]), which workloads trust through its bundle. Another
//!    name the identity may reach on 443: the connection is passed
//!    through to it untouched (an address shared by several names). Any
//!    other: refused.
//! 3. Each request (HTTP/1.1 or HTTP/2) must name the server name as its
//!    host (on the plain HTTP port, its host picks a credential that
//!    allows plain HTTP), and pass the credential's method and path rules
//!    (`rules`); CONNECT is refused. The workload's copies of the
//!    credential's header go, the credential goes in (a secret file's
//!    contents, [`SecretFiles`], the identity's JWT-SVID, or an OAuth
//!    access token got with that JWT-SVID, `tokens`), and the
//!    request goes to the host over TLS verified against the system's
//!    roots plus `extra_roots` (`upstream`). Responses stream back as
//!    they come; upgrades (WebSocket) are spliced both ways (`forward`).
//! 4. Every request, and every connection refused or passed through,
//!    leaves a [`BrokerRecord`].
//!
//! The daemon answers the broker's questions through [`Directory`].

mod broker;
mod ca;
mod config;
mod directory;
mod forward;
mod hello;
mod listener;
mod record;
mod rules;
mod secrets;
mod tokens;
mod upstream;
mod view;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

pub use broker::{Broker, Serving};
pub use ca::{BUNDLE, EgressCa, EgressCaError, system_roots};
pub use config::{EgressConfig, EgressConfigError};
pub use directory::AgentDirectory;
pub use listener::open_listeners;
pub use record::{BrokerRecord, Outcome};
pub use secrets::{Secret, SecretError, SecretFiles};
pub use view::{BoxFuture, Credential, CredentialSource, Directory, DirectoryError};

/// The port redirected TLS connects were made to.
const TLS_PORT: u16 = 443;
/// The port redirected plain HTTP connects were made to.
const HTTP_PORT: u16 = 80;

/// Where the broker keeps its CA and trust bundle, in `state_dir`.
pub fn state_subdir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("egress")
}

/// The trust bundle workloads are pointed at (the system's roots and the
/// egress CA), in `state_dir`.
pub fn bundle_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_subdir(state_dir).join(BUNDLE)
}

/// Why the broker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(transparent)]
    Config(#[from] EgressConfigError),
    #[error("`egress.extra_roots`: not a usable root: {0}")]
    ExtraRoot(#[source] rustls::Error),
    #[error("TLS settings: {0}")]
    Tls(#[source] rustls::Error),
    #[error(transparent)]
    Ca(#[from] EgressCaError),
}
