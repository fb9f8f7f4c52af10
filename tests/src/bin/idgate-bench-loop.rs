//! The load loop of `cargo xtask bench`: moves itself into a cgroup, then
//! repeats one socket operation in a tight loop and prints one JSON line
//! with the time it took.
//!
//! ```text
//! idgate-bench-loop --cgroup DIR --op OP --addr IP:PORT
//!                   [--count N] [--seconds S] [--warmup N] [--expect ok|eperm]
//! ```
//!
//! `OP` is one of:
//! - `udp-connect`: `connect()` of one UDP socket to `ADDR`, again and again;
//! - `udp-sendto`: `sendto()` of one byte to `ADDR`, where a socket of this
//!   process is bound (it is never read: once its buffer is full the
//!   kernel drops what arrives, after every hook has run);
//! - `tcp-connect`: a new socket, `connect()` to a listener of this process
//!   at `ADDR`, `accept()`, and both closed (the client with a zero linger,
//!   so no port is left in TIME_WAIT).
//!
//! The loop stops after `--count` operations or `--seconds`, whichever
//! comes first. Every operation must end as `--expect` says (default: it
//! succeeds); the first that does not ends the program with an error.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often (in operations) the clock is read to enforce `--seconds`.
const CLOCK_EVERY: u64 = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ok,
    Eperm,
}

struct Args {
    cgroup: PathBuf,
    op: String,
    addr: SocketAddr,
    count: u64,
    seconds: f64,
    warmup: u64,
    expect: Expect,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("idgate-bench-loop: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    // Before any socket exists: a socket belongs to the cgroup it is
    // created in.
    std::fs::write(
        args.cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .map_err(|e| format!("joining {}: {e}", args.cgroup.display()))?;
    let mut op = operation(&args.op, args.addr)?;
    let check = |result: std::io::Result<()>| -> Result<(), String> {
        match (result, args.expect) {
            (Ok(()), Expect::Ok) => Ok(()),
            (Err(e), Expect::Eperm) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
            (Ok(()), Expect::Eperm) => Err(format!(
                "{} {}: allowed, expected EPERM",
                args.op, args.addr
            )),
            (Err(e), _) => Err(format!("{} {}: {e}", args.op, args.addr)),
        }
    };
    for _ in 0..args.warmup {
        check(op())?;
    }
    let limit = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut done = 0u64;
    while done < args.count {
        check(op())?;
        done += 1;
        if done.is_multiple_of(CLOCK_EVERY) && start.elapsed() >= limit {
            break;
        }
    }
    let elapsed = start.elapsed().as_nanos();
    println!(
        "{}",
        serde_json::json!({
            "op": args.op,
            "addr": args.addr.to_string(),
            "iterations": done,
            "elapsed_ns": elapsed as u64,
            "ns_per_op": elapsed as f64 / done.max(1) as f64,
        })
    );
    Ok(())
}

type Operation = Box<dyn FnMut() -> std::io::Result<()>>;

/// The operation to repeat, with the sockets it needs made beforehand.
fn operation(name: &str, addr: SocketAddr) -> Result<Operation, String> {
    let local = |e: std::io::Error| format!("setting up {name} {addr}: {e}");
    let any_port: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("address"),
    };
    Ok(match name {
        "udp-connect" => {
            let socket = UdpSocket::bind(any_port).map_err(local)?;
            Box::new(move || socket.connect(addr))
        }
        "udp-sendto" => {
            let sink = UdpSocket::bind(addr).map_err(local)?;
            let socket = UdpSocket::bind(any_port).map_err(local)?;
            Box::new(move || {
                let _keep = &sink;
                socket.send_to(&[0], addr).map(drop)
            })
        }
        "tcp-connect" => {
            let listener = TcpListener::bind(addr).map_err(local)?;
            Box::new(move || {
                let client = TcpStream::connect(addr)?;
                let (server, _) = listener.accept()?;
                nix::sys::socket::setsockopt(
                    &client,
                    nix::sys::socket::sockopt::Linger,
                    &libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                )?;
                drop(client);
                drop(server);
                Ok(())
            })
        }
        other => return Err(format!("unknown --op {other:?}")),
    })
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut cgroup = None;
    let mut op = None;
    let mut addr = None;
    let mut count = 100_000;
    let mut seconds = 2.0;
    let mut warmup = 1_000;
    let mut expect = Expect::Ok;
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--cgroup" => cgroup = Some(PathBuf::from(&value)),
            "--op" => op = Some(value),
            "--addr" => addr = Some(value.parse().map_err(|e| bad(&e))?),
            "--count" => count = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => seconds = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => warmup = value.parse().map_err(|e| bad(&e))?,
            "--expect" => {
                expect = match value.as_str() {
                    "ok" => Expect::Ok,
                    "eperm" => Expect::Eperm,
                    _ => return Err(bad(&"expected ok or eperm")),
                }
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Args {
        cgroup: cgroup.ok_or("--cgroup is required")?,
        op: op.ok_or("--op is required")?,
        addr: addr.ok_or("--addr is required")?,
        count,
        seconds,
        warmup,
        expect,
    })
}
