//! The daemon's [`Directory`]: the broker's questions answered from the
//! DNS path's view of the owner's state (who holds a slot, its credential
//! and name rules in the active generation), the DNS path's upstreams,
//! and the SVID authority.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::view::{BoxFuture, Credential, CredentialSource, Directory, DirectoryError};
use crate::dns::{DnsView, HostLookup};
use crate::identity::SpiffeId;
use crate::policy::{CredentialKind, CredentialRule};
use crate::svid::Credentials as Svids;

/// A JWT-SVID is minted again once less than this share of its life is
/// left.
const TOKEN_REFRESH_LEFT: u32 = 2;

/// The broker's view of the daemon.
pub struct AgentDirectory {
    view: watch::Receiver<Arc<DnsView>>,
    lookup: HostLookup,
    svids: Arc<Svids>,
    /// The broker's form of each rule set's credential rules, by the rule
    /// list they were made from (kept, so its address is not reused).
    converted: Mutex<Converted>,
    /// JWT-SVIDs by identity and audience, until half their life is gone.
    tokens: Mutex<HashMap<(SpiffeId, Vec<String>), Token>>,
}

#[derive(Default)]
struct Converted {
    /// The generation they were made for: a new one starts afresh.
    generation: u64,
    lists: HashMap<usize, ConvertedList>,
}

/// A rule set's credential rules, and the broker's form of them.
struct ConvertedList {
    rules: Arc<[CredentialRule]>,
    credentials: Arc<[Credential]>,
}

struct Token {
    jwt: String,
    refresh_at: SystemTime,
}

impl AgentDirectory {
    pub fn new(view: watch::Receiver<Arc<DnsView>>, lookup: HostLookup, svids: Arc<Svids>) -> Self {
        Self {
            view,
            lookup,
            svids,
            converted: Mutex::default(),
            tokens: Mutex::default(),
        }
    }

    /// The broker's form of `rules`, made once per generation.
    fn convert(&self, generation: u64, rules: &Arc<[CredentialRule]>) -> Arc<[Credential]> {
        let mut converted = self.converted.lock().unwrap_or_else(|e| e.into_inner());
        if converted.generation != generation {
            *converted = Converted {
                generation,
                lists: HashMap::new(),
            };
        }
        let key = Arc::as_ptr(rules).cast::<u8>() as usize;
        match converted.lists.get(&key) {
            Some(list) if Arc::ptr_eq(&list.rules, rules) => list.credentials.clone(),
            _ => {
                let credentials: Arc<[Credential]> = rules.iter().filter_map(credential).collect();
                let list = ConvertedList {
                    rules: rules.clone(),
                    credentials: credentials.clone(),
                };
                converted.lists.insert(key, list);
                credentials
            }
        }
    }
}

/// The broker's form of a credential rule; `None` (and an error logged)
/// for one whose header or methods are not HTTP's, which the policy
/// parser refuses, so never: the rule then brokers nothing.
fn credential(rule: &CredentialRule) -> Option<Credential> {
    let source = match &rule.kind {
        CredentialKind::Header {
            header,
            secret_file,
            prefix,
        } => CredentialSource::Header {
            header: http::HeaderName::from_bytes(header.as_bytes()).ok()?,
            secret_file: secret_file.clone(),
            prefix: prefix.clone(),
        },
        CredentialKind::JwtSvid { audience } => CredentialSource::JwtSvid {
            audience: audience.clone(),
        },
        CredentialKind::OAuth(client) => CredentialSource::OAuth(Arc::new(client.clone())),
    };
    let methods = rule
        .methods
        .iter()
        .map(|m| http::Method::from_bytes(m.as_bytes()))
        .collect::<Result<Vec<_>, _>>();
    let Ok(methods) = methods else {
        tracing::error!(rule = %rule.name, "a credential rule's method is not an HTTP method: the rule brokers nothing");
        return None;
    };
    Some(Credential {
        name: rule.name.as_str().into(),
        host: rule.host.as_str().into(),
        source,
        methods,
        paths: rule.paths.clone(),
        http: rule.http,
    })
}

impl Directory for AgentDirectory {
    fn identity(&self, slot: u32) -> Option<(SpiffeId, Arc<[Credential]>)> {
        let view = self.view.borrow().clone();
        let id = view.asker(slot).live_identity()?.clone();
        let credentials = match view.credentials(slot) {
            Some(rules) => self.convert(view.generation, rules),
            None => Arc::from(Vec::new()),
        };
        Some((id, credentials))
    }

    fn may_reach(&self, slot: u32, host: &str, port: u16) -> bool {
        self.view.borrow().name_allows(slot, host, port)
    }

    fn resolve(&self, host: &str) -> BoxFuture<'static, Result<Vec<IpAddr>, DirectoryError>> {
        let lookup = self.lookup.clone();
        let host = host.to_owned();
        Box::pin(async move { Ok(lookup.addresses(&host).await?) })
    }

    fn jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
    ) -> BoxFuture<'static, Result<String, DirectoryError>> {
        let now = SystemTime::now();
        let key = (id.clone(), audience.to_vec());
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, t| t.refresh_at > now);
        let token = match tokens.get(&key) {
            Some(t) => Ok(t.jwt.clone()),
            None => self
                .svids
                .jwt_svid(id, audience, now)
                .map(|(jwt, expiry)| {
                    let life = expiry.duration_since(now).unwrap_or(Duration::ZERO);
                    tokens.insert(
                        key,
                        Token {
                            jwt: jwt.clone(),
                            refresh_at: now + life / TOKEN_REFRESH_LEFT,
                        },
                    );
                    jwt
                })
                .map_err(DirectoryError::from),
        };
        Box::pin(std::future::ready(token))
    }
}
