//! The client of the upstream resolvers: a workload's query forwarded with
//! a fresh random id, over UDP from a fresh connected socket, and over TCP
//! when the reply is truncated or the workload asked over TCP; the next
//! upstream on a timeout or an error.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::ProtoError;
use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::message::{AnswerError, MAX_MESSAGE, Query, check_answers};

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver is configured")]
    NoServers,
    #[error("no upstream answered: {}", list(.0))]
    AllFailed(Vec<(SocketAddr, ExchangeError)>),
}

fn list(errors: &[(SocketAddr, ExchangeError)]) -> String {
    errors
        .iter()
        .map(|(s, e)| format!("{s}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one upstream did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the system's random source failed")]
    Random,
    #[error("cannot encode: {0}")]
    Encode(#[source] ProtoError),
    #[error("malformed reply over TCP: {0}")]
    Malformed(#[source] ProtoError),
    #[error("reply over TCP has id {got}, sent {sent}")]
    Id { got: u16, sent: u16 },
    #[error(transparent)]
    Mismatch(#[from] AnswerError),
}

/// The upstream resolvers, tried in order.
#[derive(Debug)]
pub struct Upstream {
    servers: RwLock<Arc<[SocketAddr]>>,
    timeout: Duration,
    rng: ring::rand::SystemRandom,
}

impl Upstream {
    /// A client of `servers`, each exchange (UDP, then TCP) bounded by
    /// `timeout` (`dns.upstream_timeout`).
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            servers: RwLock::new(servers.into()),
            timeout,
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// The upstreams now.
    pub fn servers(&self) -> Arc<[SocketAddr]> {
        self.servers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the upstreams (the host's resolv.conf changed); exchanges
    /// under way keep the list they started with.
    pub fn set_servers(&self, servers: Vec<SocketAddr>) {
        *self.servers.write().unwrap_or_else(|e| e.into_inner()) = servers.into();
    }

    /// Forwards `query` to the upstreams in order and gives back the first
    /// reply that answers it, with the workload's id. Over UDP unless
    /// `over_tcp`; a truncated UDP reply is asked again over TCP of the
    /// same upstream.
    pub async fn exchange(&self, query: &Query, over_tcp: bool) -> Result<Vec<u8>, UpstreamError> {
        let servers = self.servers();
        if servers.is_empty() {
            return Err(UpstreamError::NoServers);
        }
        let mut errors = Vec::new();
        for &server in servers.iter() {
            match self.ask(server, query, over_tcp).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => {
                    tracing::debug!(%server, error = %e, name = query.name(), "upstream failed");
                    errors.push((server, e));
                }
            }
        }
        Err(UpstreamError::AllFailed(errors))
    }

    async fn ask(
        &self,
        server: SocketAddr,
        query: &Query,
        over_tcp: bool,
    ) -> Result<Vec<u8>, ExchangeError> {
        let id = u16::from_ne_bytes(
            ring::rand::generate::<[u8; 2]>(&self.rng)
                .map_err(|_| ExchangeError::Random)?
                .expose(),
        );
        let mut message = query.message().clone();
        message.set_id(id);
        let bytes = message.to_vec().map_err(ExchangeError::Encode)?;
        let late = |_| ExchangeError::Timeout(self.timeout);
        let mut reply = None;
        if !over_tcp {
            let r = tokio::time::timeout(self.timeout, udp(server, &bytes, id, query))
                .await
                .map_err(late)??;
            if !r.truncated() {
                reply = Some(r);
            }
        }
        let mut reply = match reply {
            Some(r) => r,
            None => tokio::time::timeout(self.timeout, tcp(server, &bytes, id, query))
                .await
                .map_err(late)??,
        };
        reply.set_id(query.id());
        reply.to_vec().map_err(ExchangeError::Encode)
    }
}

/// One UDP exchange from a fresh socket connected to `server`, so only its
/// datagrams are read; replies with another id or question are ignored.
async fn udp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, ExchangeError> {
    {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        socket.send(bytes).await?;
        let mut buf = vec![0; MAX_MESSAGE];
        loop {
            let n = socket.recv(&mut buf).await?;
            let Ok(reply) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if reply.id() == id && check_answers(query, &reply).is_ok() {
                return Ok(reply);
            }
        }
    }
}

/// One TCP exchange (RFC 1035 4.2.2: a two-byte length before each
/// message).
async fn tcp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, ExchangeError> {
    {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(bytes.len())
            .map_err(|_| std::io::Error::other("query longer than 65535 bytes"))?;
        let mut framed = Vec::with_capacity(2 + bytes.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(bytes);
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut buf = vec![0; usize::from(len)];
        stream.read_exact(&mut buf).await?;
        let reply = Message::from_vec(&buf).map_err(ExchangeError::Malformed)?;
        if reply.id() != id {
            return Err(ExchangeError::Id {
                got: reply.id(),
                sent: id,
            });
        }
        check_answers(query, &reply)?;
        Ok(reply)
    }
}
