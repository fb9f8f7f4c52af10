//! A workload for the end-to-end tests: moves itself into a cgroup, makes
//! one real connect or send, and prints what the kernel answered: `ok`, or
//! the errno name (`EPERM`, `ECONNREFUSED`, ...).
//!
//! `idgate-probe [--cgroup DIR] tcp|udp-sendto|udp-connect ADDR:PORT`
//!
//! With `serve` it stays, reading commands from standard input, one a
//! line, each answered with one line (`ok` or the errno name): `OP ARG` as
//! above; `join DIR` (moves itself into a cgroup); `hold ADDR:PORT` (makes
//! a TCP socket and keeps it), `connect-held ADDR:PORT`; `listen-fd PATH`,
//! `accept-fd` (receives a socket over SCM_RIGHTS and keeps it),
//! `send-held PATH` (passes the kept socket). It ends at end of input.
//!
//! With `repeat N OP ADDR:PORT` it makes the call N times (bounded by N and
//! by 60 s) and prints the count of each answer as JSON, e.g.
//! `{"ok": 12, "EPERM": 30}`.

mod bypass;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cgroup, rest) = match args.as_slice() {
        [flag, dir, rest @ ..] if flag == "--cgroup" => (Some(dir.clone()), rest.to_vec()),
        rest => (None, rest.to_vec()),
    };
    if let Some(dir) = cgroup {
        let procs = format!("{dir}/cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("joining {procs}: {e}"));
    }
    match rest.as_slice() {
        [serve] if serve == "serve" => {
            use std::io::{BufRead, Write};
            let mut held = bypass::Held::default();
            for line in std::io::stdin().lock().lines() {
                let line = line.expect("stdin");
                let answer = match line.split_once(' ').unwrap_or((line.as_str(), "")) {
                    ("join", dir) => join(dir),
                    ("hold", addr) => answer(held.make(&addr.parse().expect("ADDR:PORT"))),
                    ("connect-held", addr) => {
                        answer(held.connect(&addr.parse().expect("ADDR:PORT")))
                    }
                    ("listen-fd", path) => answer(held.listen(path)),
                    ("accept-fd", _) => answer(held.accept()),
                    ("send-held", path) => answer(held.send(path)),
                    (op, arg) => once(op, arg),
                };
                let mut out = std::io::stdout().lock();
                writeln!(out, "{answer}")
                    .and_then(|()| out.flush())
                    .expect("stdout");
            }
        }
        [op, arg] => println!("{}", once(op, arg)),
        [repeat, n, op, addr] if repeat == "repeat" => {
            let n: u32 = n.parse().expect("repeat count");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut counts = std::collections::BTreeMap::<String, u32>::new();
            for _ in 0..n {
                if std::time::Instant::now() > deadline {
                    break;
                }
                *counts.entry(once(op, addr)).or_default() += 1;
            }
            println!("{}", serde_json::to_string(&counts).expect("counts"));
        }
        _ => {
            eprintln!(
                "usage: idgate-probe [--cgroup DIR] [repeat N] tcp|udp-sendto|udp-connect ADDR:PORT"
            );
            std::process::exit(2);
        }
    }
}

/// Moves this process into the cgroup at `dir`.
fn join(dir: &str) -> String {
    answer(std::fs::write(
        format!("{dir}/cgroup.procs"),
        std::process::id().to_string(),
    ))
}

/// `ok`, or the errno name of the failure.
fn answer(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
            None => format!("error {e}"),
        },
    }
}

/// One call: `ok` or the errno name. `arg` is `ADDR:PORT`, but a pin path
/// for `detach-link` and ignored by `raw4` and `packet`.
fn once(op: &str, arg: &str) -> String {
    let addr = || -> SocketAddr { arg.parse().expect("ADDR:PORT") };
    let result = match op {
        "tcp" => TcpStream::connect_timeout(&addr(), Duration::from_secs(3)).map(drop),
        "udp-sendto" => {
            let addr = addr();
            local_udp(&addr).and_then(|s| s.send_to(b"idgate", addr).map(drop))
        }
        "udp-connect" => {
            let addr = addr();
            local_udp(&addr).and_then(|s| s.connect(addr))
        }
        "udp-connect-send" => bypass::udp_connect_send(&addr()),
        "tfo-sendto" => bypass::tfo_sendto(&addr()),
        "tfo-connect" => bypass::tfo_connect(&addr()),
        "mptcp" => bypass::mptcp(&addr()),
        "uring-connect" => bypass::uring_connect(&addr()),
        "raw4" => bypass::raw4(),
        "packet" => bypass::packet(),
        "detach-link" => bypass::detach_pinned_link(arg),
        other => panic!("unknown operation {other}"),
    };
    answer(result)
}

fn local_udp(dest: &SocketAddr) -> std::io::Result<UdpSocket> {
    match dest {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0"),
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0"),
    }
}
