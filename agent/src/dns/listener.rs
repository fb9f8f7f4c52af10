//! The resolver's sockets in one network namespace: a UDP socket and a TCP
//! listener on the wildcard address and the configured port, bound to the
//! loopback device, so that they take exactly the queries the kernel sent
//! to `127.N.x.y` in that namespace. The asker's slot is read from the
//! destination the kernel wrote: `IP_PKTINFO` for UDP, the accepted
//! socket's local address for TCP.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use idgate_common::dns_address;
use socket2::{Domain, Protocol, Socket, Type};

/// `SO_NETNS_COOKIE` (Linux 5.14): the socket's network namespace cookie,
/// the one `bpf_get_netns_cookie` gives the programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The open sockets of one namespace.
pub struct Listeners {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    /// The namespace's cookie, for `IDG_DNS_NETNS`.
    pub cookie: u64,
}

/// Runs `open` in the network namespace `netns` (an open
/// `/proc/PID/ns/net`), or in the agent's own with `None`. A namespace is
/// entered on a thread of its own, which ends there; sockets made there
/// stay in that namespace.
pub fn in_namespace<T: Send + 'static>(
    netns: Option<OwnedFd>,
    open: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let Some(ns) = netns else {
        return Ok(open());
    };
    std::thread::Builder::new()
        .name("idgate-netns".into())
        .spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            Ok(open())
        })?
        .join()
        .map_err(|_| io::Error::other("the thread opening the listeners panicked"))?
}

/// Opens the DNS listeners on `port` in the calling thread's namespace.
pub fn open_here(port: u16) -> io::Result<Listeners> {
    let at = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    udp.bind_device(Some(b"lo"))?;
    nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
        .map_err(io::Error::from)?;
    udp.set_nonblocking(true)?;
    udp.bind(&at.into())?;
    let tcp = tcp_on_loopback(port)?;
    let cookie = netns_cookie(&udp)?;
    Ok(Listeners {
        udp: udp.into(),
        tcp,
        cookie,
    })
}

/// A TCP listener of the calling thread's namespace on the wildcard
/// address and `port`, bound to device `lo` (so it takes only what the
/// kernel redirected to `127.N.x.y`), non-blocking, backlog 1024.
pub fn tcp_on_loopback(port: u16) -> io::Result<TcpListener> {
    let at = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    tcp.bind_device(Some(b"lo"))?;
    tcp.set_reuse_address(true)?;
    tcp.set_nonblocking(true)?;
    tcp.bind(&at.into())?;
    tcp.listen(1024)?;
    Ok(tcp.into())
}

/// The listeners of a namespace handed over by an earlier agent.
pub fn adopt(udp: OwnedFd, tcp: OwnedFd) -> io::Result<Listeners> {
    let udp = UdpSocket::from(udp);
    let tcp = TcpListener::from(tcp);
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let cookie = netns_cookie(&udp)?;
    Ok(Listeners { udp, tcp, cookie })
}

fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `len` says so.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The slot a query sent to `to` was asked by, when `to` is an address
/// of the reserved range and the listeners' port.
pub fn slot_of(net: u8, to: Ipv4Addr) -> Option<u32> {
    dns_address::slot(net.into(), to.octets())
}
