//! What the broker asks of the daemon: the identity bound to a slot and
//! its credential rules, whether it may reach a name, the addresses of a
//! name, and JWT-SVIDs. The daemon fills [`Credential`]s from policy and
//! implements [`Directory`] over its state.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::policy::OAuthClient;

/// A future the [`Directory`] returns: boxed, so the trait is
/// object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a [`Directory`] call failed with (shown to the workload and in
/// records: it must not hold a secret).
pub type DirectoryError = Box<dyn std::error::Error + Send + Sync>;

/// One credential rule of an identity: what the broker adds to requests
/// for `host`, and which requests it may be used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The rule's name, in records and refusals.
    pub name: Arc<str>,
    /// The host name requests go to (lowercase, no trailing dot).
    pub host: Arc<str>,
    pub source: CredentialSource,
    /// The methods it may be used with; empty: any (but CONNECT, never).
    pub methods: Vec<http::Method>,
    /// Path prefixes it may be used for; empty: any. A prefix matches the
    /// path itself and what follows it after a `/` (`/v1` matches `/v1`
    /// and `/v1/messages`, not `/v10`); a prefix ending in `/` matches
    /// what starts with it.
    pub paths: Vec<String>,
    /// Whether plain HTTP to port 80 of `host` is served too.
    pub http: bool,
}

/// Where a credential's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `header: prefix + secret`, the secret read from `secret_file` (an
    /// absolute path; see the `secrets` module).
    Header {
        header: http::HeaderName,
        secret_file: PathBuf,
        prefix: String,
    },
    /// `authorization: Bearer <JWT-SVID>` of the identity, for `audience`.
    JwtSvid { audience: Vec<String> },
    /// `authorization: Bearer <access token>`, the token got from the
    /// client's token endpoint with the identity's JWT-SVID (see the
    /// `tokens` module).
    OAuth(Arc<OAuthClient>),
}

impl CredentialSource {
    /// The request header the credential is carried in.
    pub fn header(&self) -> &http::HeaderName {
        match self {
            Self::Header { header, .. } => header,
            Self::JwtSvid { .. } | Self::OAuth(_) => &http::header::AUTHORIZATION,
        }
    }
}

/// The daemon's side of the broker.
pub trait Directory: Send + Sync + 'static {
    /// The identity bound to `slot` now and its credential rules, or None
    /// (no identity, or revoked).
    fn identity(&self, slot: u32) -> Option<(SpiffeId, Arc<[Credential]>)>;

    /// Whether the identity of `slot` may reach `host` on TCP `port` by its
    /// name rules (a TLS connection with another server name on a shared
    /// address is passed through when it may).
    fn may_reach(&self, slot: u32, host: &str, port: u16) -> bool;

    /// The addresses of `host`, as the agent resolves it.
    fn resolve(&self, host: &str) -> BoxFuture<'static, Result<Vec<IpAddr>, DirectoryError>>;

    /// A JWT-SVID of `id` for `audience`.
    fn jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
    ) -> BoxFuture<'static, Result<String, DirectoryError>>;
}
