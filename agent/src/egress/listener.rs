//! The broker's listeners in one network namespace.

use std::io;
use std::net::TcpListener;

use crate::dns::tcp_on_loopback;

/// Binds the TLS and the plain HTTP listener of the calling thread's
/// network namespace: TCP on the wildcard address and `port_tls` /
/// `port_http`, bound to device `lo` (so they take only the connects the
/// kernel redirected to `127.N.x.y`), non-blocking, backlog 1024.
pub fn open_listeners(port_tls: u16, port_http: u16) -> io::Result<(TcpListener, TcpListener)> {
    Ok((tcp_on_loopback(port_tls)?, tcp_on_loopback(port_http)?))
}
