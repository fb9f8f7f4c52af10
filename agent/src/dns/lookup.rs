//! The agent's own lookups of a name (the credential broker connects to
//! a host as the agent resolves it, never to an address the workload
//! chose): asked of the DNS path's upstreams, the answer filtered as a
//! workload's would be (its CNAME chain, `private_answers`).

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, Query as Question};
use hickory_proto::rr::{Name, RecordType};

use super::message::{AnswerError, FilterOptions, QueryError, filter_answer, parse_query};
use super::resolver::Resolver;
use super::upstream::{Upstream, UpstreamError};

/// Looks names up for the agent itself, as the DNS path's resolver
/// forwards workloads' queries: the same upstreams, the same filter.
#[derive(Clone)]
pub struct HostLookup {
    pub(super) resolver: Arc<Resolver>,
}

impl HostLookup {
    /// The addresses of `host` (see [`addresses`]).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        addresses(&self.resolver.upstream, self.resolver.filter, host).await
    }
}

/// Why a name has no address for the agent.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{name:?} is not a DNS name: {source}")]
    Name {
        name: String,
        source: hickory_proto::ProtoError,
    },
    #[error("cannot make the query for {name:?}: {source}")]
    Query { name: String, source: QueryError },
    #[error("looking up {name:?}: {source}")]
    Upstream { name: String, source: UpstreamError },
    #[error("looking up {name:?}: {source}")]
    Answer { name: String, source: AnswerError },
    #[error("{name:?} has no address")]
    NoAddress { name: String },
}

/// The IPv4 and then the IPv6 addresses of `host`, as the upstreams
/// answer now; at least one, or an error.
async fn addresses(
    upstream: &Upstream,
    options: FilterOptions,
    host: &str,
) -> Result<Vec<IpAddr>, LookupError> {
    let name = Name::from_ascii(host).map_err(|source| LookupError::Name {
        name: host.to_owned(),
        source,
    })?;
    let mut found = Vec::new();
    for qtype in [RecordType::A, RecordType::AAAA] {
        let mut message = Message::new();
        message
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Question::query(name.clone(), qtype));
        let bytes = message.to_vec().map_err(|source| LookupError::Name {
            name: host.to_owned(),
            source,
        })?;
        let query = parse_query(&bytes).map_err(|source| LookupError::Query {
            name: host.to_owned(),
            source,
        })?;
        let reply =
            upstream
                .exchange(&query, false)
                .await
                .map_err(|source| LookupError::Upstream {
                    name: host.to_owned(),
                    source,
                })?;
        let filtered =
            filter_answer(&query, &reply, options).map_err(|source| LookupError::Answer {
                name: host.to_owned(),
                source,
            })?;
        found.extend(filtered.learned.into_iter().map(|(addr, _)| addr));
    }
    if found.is_empty() {
        return Err(LookupError::NoAddress {
            name: host.to_owned(),
        });
    }
    Ok(found)
}
