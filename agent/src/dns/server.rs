//! Serving the listeners of one namespace: every datagram and TCP
//! connection is answered on a task of its own, at most
//! [`IN_FLIGHT`] at once; past that, UDP queries are dropped (the client
//! asks again) and TCP connections wait.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::listener::slot_of;
use super::resolver::Resolver;

/// Queries answered at once, over all namespaces.
pub const IN_FLIGHT: usize = 1024;
/// A TCP connection with no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries answered on one TCP connection.
const TCP_QUERIES: usize = 256;
/// The largest UDP query read (EDNS allows 4096 and more; a query is
/// small).
const UDP_MAX: usize = 4096;

/// The tasks serving one namespace; aborted when dropped.
pub struct Serving(Vec<JoinHandle<()>>);

impl Drop for Serving {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Serves `udp` and `tcp` with `resolver` until dropped.
pub fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    resolver: Arc<Resolver>,
    limit: Arc<Semaphore>,
    net: u8,
) -> io::Result<Serving> {
    // SAFETY: the socket is owned by the `AsyncFd` from now on, which
    // never replaces or closes its descriptor before deregistering it.
    let udp = Arc::new(unsafe { AsyncFd::register(udp) }.map_err(|e| e.into_parts().1)?);
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let udp_task = tokio::spawn(serve_udp(udp, resolver.clone(), limit.clone(), net));
    let tcp_task = tokio::spawn(serve_tcp(tcp, resolver, limit, net));
    Ok(Serving(vec![udp_task, tcp_task]))
}

/// One datagram: its bytes, who sent it and where to.
struct Datagram {
    bytes: Vec<u8>,
    from: SockaddrIn,
    to: Ipv4Addr,
}

fn receive(socket: &UdpSocket) -> io::Result<Datagram> {
    let mut buf = vec![0u8; UDP_MAX];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let (len, from, to) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<SockaddrIn>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_TRUNC,
        )
        .map_err(io::Error::from)?;
        let to = msg.cmsgs().map_err(io::Error::from)?.find_map(|c| match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)))
            }
            _ => None,
        });
        (msg.bytes, msg.address, to)
    };
    let (Some(from), Some(to)) = (from, to) else {
        return Err(io::Error::other("a datagram without its addresses"));
    };
    if len > UDP_MAX {
        return Err(io::Error::other("a datagram larger than any query"));
    }
    buf.truncate(len);
    Ok(Datagram {
        bytes: buf,
        from,
        to,
    })
}

fn reply(socket: &UdpSocket, bytes: &[u8], to: SockaddrIn, from: Ipv4Addr) -> io::Result<()> {
    // SAFETY: in_pktinfo is plain data; all zero is a valid value.
    let mut info: libc::in_pktinfo = unsafe { std::mem::zeroed() };
    info.ipi_spec_dst.s_addr = u32::from(from).to_be();
    sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&to),
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

async fn serve_udp(
    socket: Arc<AsyncFd<UdpSocket>>,
    resolver: Arc<Resolver>,
    limit: Arc<Semaphore>,
    net: u8,
) {
    loop {
        let datagram = match socket
            .async_io(tokio::io::Interest::READABLE, receive)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "DNS listener: datagram not read");
                continue;
            }
        };
        let port = socket.get_ref().local_addr().map_or(0, |a| a.port());
        let Some(slot) = slot_of(net, datagram.to) else {
            // Not sent by the kernel's redirect (another loopback
            // address): not a query of any workload.
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(slot, "DNS query dropped: too many in flight");
            continue;
        };
        let (socket, resolver) = (socket.clone(), resolver.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let server = SocketAddrV4::new(datagram.to, port).into();
            let Some(answer) = resolver.answer(slot, server, &datagram.bytes, false).await else {
                return;
            };
            let sent = socket
                .async_io(tokio::io::Interest::WRITABLE, |s| {
                    reply(s, &answer, datagram.from, datagram.to)
                })
                .await;
            if let Err(e) = sent {
                tracing::debug!(slot, error = %e, "DNS answer not sent");
            }
        });
    }
}

async fn serve_tcp(
    listener: tokio::net::TcpListener,
    resolver: Arc<Resolver>,
    limit: Arc<Semaphore>,
    net: u8,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "DNS listener: connection not accepted");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(std::net::SocketAddr::V4(server)) = stream.local_addr() else {
            continue;
        };
        let Some(slot) = slot_of(net, *server.ip()) else {
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, slot, server, &resolver).await {
                tracing::debug!(slot, error = %e, "DNS over TCP: connection ended");
            }
        });
    }
}

async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    slot: u32,
    server: SocketAddrV4,
    resolver: &Resolver,
) -> io::Result<()> {
    for _ in 0..TCP_QUERIES {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let mut query = vec![0u8; u16::from_be_bytes(len).into()];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::other("a query cut short"))??;
        let Some(answer) = resolver.answer(slot, server.into(), &query, true).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return Err(io::Error::other("an answer larger than TCP DNS can carry"));
        };
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(&answer).await?;
    }
    Ok(())
}
