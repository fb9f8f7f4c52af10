//! A workload for the end-to-end tests: moves itself into a cgroup, makes
//! one real connect or send, and prints what the kernel answered: `ok`, or
//! the errno name (`EPERM`, `ECONNREFUSED`, ...).
//!
//! `idgate-probe [--cgroup DIR] tcp|udp-sendto|udp-connect ADDR:PORT`

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cgroup, rest) = match args.as_slice() {
        [flag, dir, rest @ ..] if flag == "--cgroup" => (Some(dir.clone()), rest.to_vec()),
        rest => (None, rest.to_vec()),
    };
    let [op, addr] = rest.as_slice() else {
        eprintln!("usage: idgate-probe [--cgroup DIR] tcp|udp-sendto|udp-connect ADDR:PORT");
        std::process::exit(2);
    };
    if let Some(dir) = cgroup {
        let procs = format!("{dir}/cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("joining {procs}: {e}"));
    }
    let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
    let result = match op.as_str() {
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(drop),
        "udp-sendto" => local_udp(&addr).and_then(|s| s.send_to(b"idgate", addr).map(drop)),
        "udp-connect" => local_udp(&addr).and_then(|s| s.connect(addr)),
        other => panic!("unknown operation {other}"),
    };
    match result {
        Ok(()) => println!("ok"),
        Err(e) => match e.raw_os_error() {
            Some(code) => println!("{:?}", nix::errno::Errno::from_raw(code)),
            None => println!("error {e}"),
        },
    }
}

fn local_udp(dest: &SocketAddr) -> std::io::Result<UdpSocket> {
    match dest {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0"),
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0"),
    }
}
