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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use hickory_proto::op::MessageType;
    use hickory_proto::rr::{RData, RecordType};

    use super::*;
    use crate::dns::message::tests::{a, query, response};
    use crate::dns::parse_query;

    /// A UDP server on 127.0.0.1 that answers each query with what
    /// `answer` makes of it (any number of datagrams).
    async fn udp_server(
        answer: impl Fn(&Message) -> Vec<Message> + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0; 65535];
            loop {
                let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
                let asked = Message::from_vec(&buf[..n]).unwrap();
                for m in answer(&asked) {
                    socket.send_to(&m.to_vec().unwrap(), peer).await.unwrap();
                }
            }
        });
        (addr, task)
    }

    /// A TCP server on `addr` that answers each query with `answer`.
    async fn tcp_server(
        addr: SocketAddr,
        answer: impl Fn(&Message) -> Message + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let len = s.read_u16().await.unwrap();
                let mut buf = vec![0; usize::from(len)];
                s.read_exact(&mut buf).await.unwrap();
                let reply = answer(&Message::from_vec(&buf).unwrap()).to_vec().unwrap();
                s.write_all(&(reply.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                s.write_all(&reply).await.unwrap();
            }
        });
        (addr, task)
    }

    /// The answer `asked` should get: its id and question, one A record.
    fn answer_with(asked: &Message, ip: &str) -> Message {
        let q = parse_query(&asked.to_vec().unwrap()).unwrap();
        response(&q, asked.id(), vec![a("www.example.com.", ip, 60)])
    }

    fn addresses(bytes: &[u8]) -> (u16, Vec<IpAddr>) {
        let m = Message::from_vec(bytes).unwrap();
        assert_eq!(m.message_type(), MessageType::Response);
        let ips = m
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        (m.id(), ips)
    }

    const TIMEOUT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_udp_answer_comes_back_with_the_workload_s_id() {
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let (server, task) = udp_server(move |asked| {
            seen_tx.send(asked.id()).unwrap();
            vec![answer_with(asked, "8.8.8.8")]
        })
        .await;
        let up = Upstream::new(vec![server], TIMEOUT);
        let q = query("www.example.com", RecordType::A);
        let got = up.exchange(&q, false).await.unwrap();
        assert_eq!(addresses(&got), (0x1234, vec!["8.8.8.8".parse().unwrap()]));
        // A fresh id each time.
        up.exchange(&q, false).await.unwrap();
        let (first, second) = (seen.recv().await.unwrap(), seen.recv().await.unwrap());
        assert!(first != second || first != 0x1234, "{first} {second}");
        task.abort();
    }

    #[tokio::test]
    async fn replies_with_another_id_or_question_are_ignored() {
        let (server, task) = udp_server(|asked| {
            let mut wrong_id = answer_with(asked, "6.6.6.6");
            wrong_id.set_id(asked.id().wrapping_add(1));
            let mut wrong_question = answer_with(asked, "6.6.6.7");
            wrong_question.queries_mut()[0].set_query_type(RecordType::AAAA);
            let garbage = Message::new();
            vec![
                wrong_id,
                wrong_question,
                garbage,
                answer_with(asked, "8.8.8.8"),
            ]
        })
        .await;
        let up = Upstream::new(vec![server], TIMEOUT);
        let q = query("www.example.com", RecordType::A);
        let got = up.exchange(&q, false).await.unwrap();
        assert_eq!(
            addresses(&got).1,
            vec!["8.8.8.8".parse::<IpAddr>().unwrap()]
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_truncated_reply_is_asked_again_over_tcp() {
        let (server, udp) = udp_server(|asked| {
            let mut tc = answer_with(asked, "6.6.6.6").truncate();
            tc.set_truncated(true);
            vec![tc]
        })
        .await;
        let (_, tcp) = tcp_server(server, |asked| answer_with(asked, "8.8.8.8")).await;
        let up = Upstream::new(vec![server], TIMEOUT);
        let q = query("www.example.com", RecordType::A);
        let got = up.exchange(&q, false).await.unwrap();
        let m = Message::from_vec(&got).unwrap();
        assert!(!m.truncated());
        assert_eq!(addresses(&got), (0x1234, vec!["8.8.8.8".parse().unwrap()]));
        udp.abort();
        tcp.abort();
    }

    #[tokio::test]
    async fn over_tcp_when_asked() {
        let (server, tcp) = tcp_server("127.0.0.1:0".parse().unwrap(), |asked| {
            answer_with(asked, "8.8.4.4")
        })
        .await;
        let up = Upstream::new(vec![server], TIMEOUT);
        let q = query("www.example.com", RecordType::A);
        let got = up.exchange(&q, true).await.unwrap();
        assert_eq!(addresses(&got), (0x1234, vec!["8.8.4.4".parse().unwrap()]));
        tcp.abort();

        // A TCP reply with another id is an error.
        let (server, tcp) = tcp_server("127.0.0.1:0".parse().unwrap(), |asked| {
            let mut m = answer_with(asked, "8.8.4.4");
            m.set_id(asked.id().wrapping_add(1));
            m
        })
        .await;
        let up = Upstream::new(vec![server], TIMEOUT);
        let e = up.exchange(&q, true).await.unwrap_err();
        assert!(
            matches!(&e, UpstreamError::AllFailed(v) if matches!(v[0].1, ExchangeError::Id { .. })),
            "{e}"
        );
        tcp.abort();
    }

    #[tokio::test]
    async fn a_silent_upstream_is_passed_over() {
        let (silent, s) = udp_server(|_| vec![]).await;
        let (good, g) = udp_server(|asked| vec![answer_with(asked, "8.8.8.8")]).await;
        let up = Upstream::new(vec![silent, good], TIMEOUT);
        let q = query("www.example.com", RecordType::A);
        let got = up.exchange(&q, false).await.unwrap();
        assert_eq!(
            addresses(&got).1,
            vec!["8.8.8.8".parse::<IpAddr>().unwrap()]
        );
        s.abort();
        g.abort();
    }

    #[tokio::test]
    async fn when_all_fail_every_error_is_told() {
        let q = query("www.example.com", RecordType::A);
        let up = Upstream::new(vec![], TIMEOUT);
        assert!(matches!(
            up.exchange(&q, false).await,
            Err(UpstreamError::NoServers)
        ));

        let (silent, s) = udp_server(|_| vec![]).await;
        // A port nobody listens on: refused at once (ICMP), or silent.
        let closed = {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap()
        };
        up.set_servers(vec![silent, closed]);
        assert_eq!(&*up.servers(), &[silent, closed]);
        let e = up.exchange(&q, false).await.unwrap_err();
        let UpstreamError::AllFailed(errors) = &e else {
            panic!("{e}")
        };
        assert_eq!(errors.len(), 2);
        assert!(matches!(errors[0], (a, ExchangeError::Timeout(_)) if a == silent));
        assert_eq!(errors[1].0, closed);
        let text = e.to_string();
        assert!(
            text.contains(&silent.to_string()) && text.contains(&closed.to_string()),
            "{text}"
        );
        s.abort();
    }
}
