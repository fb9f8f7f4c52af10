//! The broker's listeners in one network namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds the TLS and the plain HTTP listener of the calling thread's
/// network namespace: TCP on the wildcard address and `port_tls` /
/// `port_http`, bound to device `lo` (so they take only the connects the
/// kernel redirected to `127.N.x.y`), non-blocking, backlog 1024.
pub fn open_listeners(port_tls: u16, port_http: u16) -> io::Result<(TcpListener, TcpListener)> {
    Ok((listen(port_tls)?, listen(port_http)?))
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let at = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind_device(Some(b"lo"))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&at.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
