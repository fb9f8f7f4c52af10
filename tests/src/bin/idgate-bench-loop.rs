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
//!
//! Three more ops time how long a new workload waits for its identity
//! (they poll a UDP `connect()` to `ADDR` every [`POLL`] until the kernel
//! allows it; `--seconds` is then the longest wait for one workload):
//! - `bind-create --cgroup PARENT --home DIR`: `--count` times, makes the
//!   cgroup `PARENT/cN`, moves itself into it and polls; then moves back
//!   into `DIR`, removes `PARENT/cN` and waits `--gap-ms`. Prints the
//!   nanoseconds from just before each `mkdir` to the first allowed
//!   connect (`bound_ns`), and to the move into the cgroup (`joined_ns`).
//! - `exec-wait --cgroup DIR --exec PROGRAM`: moves itself into `DIR`,
//!   prints `joined`, waits for one byte on standard input, then reads the
//!   clock and execs `PROGRAM` (a copy of this program) as `bind-probe`.
//! - `bind-probe --since NS`: polls; prints the nanoseconds from `NS`
//!   (`CLOCK_MONOTONIC`) to the first allowed connect (`bound_ns`).
//! - `wait-allowed --cgroup DIR`: moves itself into `DIR` (a bound
//!   workload's cgroup), makes its socket, and its first `connect()` must
//!   be denied (EPERM); prints `denied`, then polls. Prints the
//!   `CLOCK_MONOTONIC` nanoseconds of the first allowed connect
//!   (`allowed_at_ns`): the caller reads the same clock just before it
//!   opens the destination (a grant).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use idgate_tests::monotonic_ns;

/// How often (in operations) the clock is read to enforce `--seconds`.
const CLOCK_EVERY: u64 = 256;
/// Sleep between two polls of a workload waiting for its identity.
const POLL: Duration = Duration::from_micros(50);

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
    home: Option<PathBuf>,
    exec: Option<PathBuf>,
    since: Option<u64>,
    gap_ms: u64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("idgate-bench-loop: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    match args.op.as_str() {
        "bind-create" => return bind_create(&args),
        "exec-wait" => return exec_wait(&args),
        "bind-probe" => return bind_probe(&args),
        "wait-allowed" => return wait_allowed_op(&args),
        _ => {}
    }
    // Before any socket exists: a socket belongs to the cgroup it is
    // created in.
    join(&args.cgroup)?;
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

/// Moves this process into `cgroup`.
fn join(cgroup: &Path) -> Result<(), String> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("joining {}: {e}", cgroup.display()))
}

/// Sleeps as close to [`POLL`] as the kernel allows (the default timer
/// slack would add 50 µs to every sleep).
fn tight_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// Polls a UDP `connect()` to `addr` from a socket made now (so in this
/// process's cgroup now) until the kernel allows it; the polls it took,
/// and the nanoseconds from the first to the last.
fn wait_allowed(addr: SocketAddr, timeout: Duration) -> Result<(u64, u64), String> {
    poll_allowed(&udp_socket(addr)?, addr, timeout)
}

/// An unconnected UDP socket of `addr`'s family, in this process's cgroup
/// now.
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, String> {
    let any_port: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("address"),
    };
    UdpSocket::bind(any_port).map_err(|e| format!("udp socket: {e}"))
}

/// [`wait_allowed`] with a socket made beforehand.
fn poll_allowed(
    socket: &UdpSocket,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(u64, u64), String> {
    let deadline = Instant::now() + timeout;
    let first = Instant::now();
    let mut polls = 0;
    loop {
        polls += 1;
        match socket.connect(addr) {
            Ok(()) => return Ok((polls, first.elapsed().as_nanos() as u64)),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(format!("udp connect {addr}: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "udp connect {addr}: still denied after {timeout:?} ({polls} polls)"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// `bind-create`: see the module documentation.
fn bind_create(args: &Args) -> Result<(), String> {
    tight_timers();
    let home = args.home.as_ref().ok_or("bind-create needs --home")?;
    let timeout = Duration::from_secs_f64(args.seconds);
    let mut bound_ns = Vec::new();
    let mut joined_ns = Vec::new();
    let mut polls = Vec::new();
    let mut polling_ns = Vec::new();
    for i in 0..args.count {
        let dir = args.cgroup.join(format!("c{i}"));
        let t0 = Instant::now();
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        join(&dir)?;
        let joined = t0.elapsed();
        let (n, polling) =
            wait_allowed(args.addr, timeout).map_err(|e| format!("{}: {e}", dir.display()))?;
        let bound = t0.elapsed();
        bound_ns.push(bound.as_nanos() as u64);
        joined_ns.push(joined.as_nanos() as u64);
        polls.push(n);
        polling_ns.push(polling);
        join(home)?;
        remove_cgroup(&dir)?;
        std::thread::sleep(Duration::from_millis(args.gap_ms));
    }
    println!(
        "{}",
        serde_json::json!({
            "bound_ns": bound_ns,
            "joined_ns": joined_ns,
            "polls": polls,
            "polling_ns": polling_ns,
        })
    );
    Ok(())
}

/// Removes an empty cgroup, waiting while the kernel still counts a
/// process that just left it.
fn remove_cgroup(dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("rmdir {}: {e}", dir.display())),
        }
    }
}

/// `exec-wait`: see the module documentation.
fn exec_wait(args: &Args) -> Result<(), String> {
    let program = args.exec.as_ref().ok_or("exec-wait needs --exec")?;
    join(&args.cgroup)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "joined")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let mut go = [0u8];
    match std::io::stdin().read(&mut go) {
        Ok(1) => {}
        // Standard input closed: the benchmark is over.
        Ok(_) => return Ok(()),
        Err(e) => return Err(format!("stdin: {e}")),
    }
    let since = monotonic_ns();
    let e = std::process::Command::new(program)
        .args(["--op", "bind-probe", "--since", &since.to_string()])
        .args(["--addr", &args.addr.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .exec();
    Err(format!("exec {}: {e}", program.display()))
}

/// `bind-probe`: see the module documentation.
fn bind_probe(args: &Args) -> Result<(), String> {
    tight_timers();
    let since = args.since.ok_or("bind-probe needs --since")?;
    let (polls, polling) = wait_allowed(args.addr, Duration::from_secs_f64(args.seconds))?;
    let bound = monotonic_ns().saturating_sub(since);
    println!(
        "{}",
        serde_json::json!({ "bound_ns": bound, "polls": polls, "polling_ns": polling })
    );
    Ok(())
}

/// `wait-allowed`: see the module documentation.
fn wait_allowed_op(args: &Args) -> Result<(), String> {
    tight_timers();
    join(&args.cgroup)?;
    let socket = udp_socket(args.addr)?;
    match socket.connect(args.addr) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Ok(()) => return Err(format!("udp connect {}: allowed already", args.addr)),
        Err(e) => return Err(format!("udp connect {}: {e}", args.addr)),
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "denied")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let (polls, polling) = poll_allowed(&socket, args.addr, Duration::from_secs_f64(args.seconds))?;
    let allowed_at = monotonic_ns();
    println!(
        "{}",
        serde_json::json!({ "allowed_at_ns": allowed_at, "polls": polls, "polling_ns": polling })
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
    let mut home = None;
    let mut exec = None;
    let mut since = None;
    let mut gap_ms = 0;
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
            "--home" => home = Some(PathBuf::from(&value)),
            "--exec" => exec = Some(PathBuf::from(&value)),
            "--since" => since = Some(value.parse().map_err(|e| bad(&e))?),
            "--gap-ms" => gap_ms = value.parse().map_err(|e| bad(&e))?,
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
    let op: String = op.ok_or("--op is required")?;
    Ok(Args {
        // bind-probe runs where exec-wait left it.
        cgroup: match cgroup {
            Some(c) => c,
            None if op == "bind-probe" => PathBuf::new(),
            None => return Err("--cgroup is required".into()),
        },
        op,
        addr: addr.ok_or("--addr is required")?,
        count,
        seconds,
        warmup,
        expect,
        home,
        exec,
        since,
        gap_ms,
    })
}
