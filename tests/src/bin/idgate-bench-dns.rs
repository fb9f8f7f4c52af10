//! The DNS client of `cargo xtask bench`: moves itself into a cgroup (or
//! stays outside every scope without `--cgroup`), asks a server for names
//! of the benchmark's zone over UDP, and prints one JSON line.
//!
//! ```text
//! idgate-bench-dns --op OP --server IP:PORT [--cgroup DIR]
//!                  [--zone SUFFIX] [--names Z] [--start S]
//!                  [--count N] [--seconds S] [--timeout-ms MS]
//!                  [--connect-port P] [--threads T] [--window W] [--name NAME]
//! ```
//!
//! The zone's names are `h0.SUFFIX` to `h{Z-1}.SUFFIX`, type A. `OP` is
//! one of:
//! - `sequential`: one query at a time, for `h{(S + i) % Z}`, i from 0,
//!   until `--count` queries or `--seconds`. Each is timed from just
//!   before its send to its answer's arrival; the answer is read after
//!   the clock stops. With `--connect-port P`, right after each answer a
//!   UDP `connect()` to its first address, port P, from a socket made in
//!   the cgroup: allowed or EPERM, counted (the first-connect race).
//! - `flood`: `--threads` threads, each with `--window` queries
//!   outstanding on a socket of its own, cycling through the names, for
//!   `--seconds` (and at most `--count` answers in all); a query
//!   unanswered after `--timeout-ms` counts as a timeout and is replaced.
//! - `resolve`: A and AAAA of `--name`, once each; the addresses.
//! - `gaps`: as `sequential` (no connects), but a failed send is
//!   counted, not fatal: the client sleeps `--retry-ms` and asks again.
//!   Every lookup is given as `[start, duration, outcome]`, its start on
//!   `CLOCK_MONOTONIC` (ns), outcome 0 answered with an address, 1 timed
//!   out, 2 send failed with EPERM, 3 send or receive failed otherwise
//!   (each error counted by its text), 4 another answer. It stops at `--count`, `--seconds`, once `--stop-file`
//!   exists, or `--stop-ms-after-recovery` after the first answer that
//!   follows a failure.
//!
//! Every query is made with hickory-proto; answers are read with it too.
//! A query that gets no answer within `--timeout-ms` is counted, never
//! waited for longer.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use idgate_tests::monotonic_ns;

/// How often a flood thread looks for queries past their timeout.
const TICK: Duration = Duration::from_millis(10);

struct Args {
    op: String,
    server: SocketAddr,
    cgroup: Option<PathBuf>,
    zone: String,
    names: u64,
    start: u64,
    count: u64,
    seconds: f64,
    timeout: Duration,
    connect_port: Option<u16>,
    threads: usize,
    window: usize,
    name: Option<String>,
    retry: Duration,
    stop_file: Option<PathBuf>,
    stop_after_recovery: Option<Duration>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("idgate-bench-dns: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    // Before any socket exists: a socket belongs to the cgroup it is
    // created in.
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", cgroup.display()))?;
    }
    let out = match args.op.as_str() {
        "sequential" => sequential(&args)?,
        "flood" => flood(&args)?,
        "resolve" => resolve(&args)?,
        "gaps" => gaps(&args)?,
        other => return Err(format!("unknown --op {other:?}")),
    };
    println!("{out}");
    Ok(())
}

/// The zone's name number `i`.
fn zone_name(args: &Args, i: u64) -> String {
    format!("h{}.{}", i % args.names.max(1), args.zone)
}

/// A recursive query for `name` of type `rtype`, with `id`.
fn query(name: &str, rtype: RecordType, id: u16) -> Result<Vec<u8>, String> {
    let name = Name::from_str(name).map_err(|e| format!("name {name:?}: {e}"))?;
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, rtype));
    m.to_vec().map_err(|e| format!("encoding a query: {e}"))
}

fn socket(args: &Args) -> Result<UdpSocket, String> {
    let any: SocketAddr = match args.server {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("address"),
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("udp socket: {e}"))?;
    s.connect(args.server)
        .map_err(|e| format!("connect {}: {e}", args.server))?;
    Ok(s)
}

/// Waits for the answer to `id` until `deadline`: its bytes, or `None`
/// at the deadline. Answers to other ids (late ones) are skipped.
fn wait_answer(
    s: &UdpSocket,
    id: u16,
    deadline: Instant,
    buf: &mut [u8],
) -> Result<Option<usize>, String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| format!("timeout: {e}"))?;
        match s.recv(buf) {
            Ok(n) => {
                if Header::from_bytes(&buf[..n]).is_ok_and(|h| h.id() == id) {
                    return Ok(Some(n));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(format!("recv from {}: {e}", s_peer(s))),
        }
    }
}

fn s_peer(s: &UdpSocket) -> String {
    s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// The addresses of an answer's A and AAAA records.
fn addresses(answer: &Message) -> Vec<IpAddr> {
    answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn rcode_name(rcode: ResponseCode) -> String {
    format!("{rcode:?}")
}

fn sequential(args: &Args) -> Result<serde_json::Value, String> {
    let s = socket(args)?;
    let probe = match args.connect_port {
        Some(_) => Some(UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp socket: {e}"))?),
        None => None,
    };
    let limit = Duration::from_secs_f64(args.seconds);
    let mut buf = vec![0u8; 4096];
    let mut latency_ns = Vec::new();
    let mut timeouts = 0u64;
    let mut rcodes: BTreeMap<String, u64> = BTreeMap::new();
    let mut no_address = 0u64;
    let (mut allowed, mut denied) = (0u64, 0u64);
    let mut first_denied: Option<String> = None;
    let started = Instant::now();
    let mut i = 0;
    while i < args.count && started.elapsed() < limit {
        let name = zone_name(args, args.start + i);
        let id = i as u16;
        let bytes = query(&name, RecordType::A, id)?;
        let t0 = Instant::now();
        s.send(&bytes)
            .map_err(|e| format!("send to {}: {e}", args.server))?;
        let got = wait_answer(&s, id, t0 + args.timeout, &mut buf)?;
        let took = t0.elapsed();
        i += 1;
        let Some(n) = got else {
            timeouts += 1;
            continue;
        };
        let answer = Message::from_vec(&buf[..n]).map_err(|e| format!("answer: {e}"))?;
        if answer.response_code() != ResponseCode::NoError {
            *rcodes
                .entry(rcode_name(answer.response_code()))
                .or_default() += 1;
            continue;
        }
        let Some(addr) = addresses(&answer).first().copied() else {
            no_address += 1;
            continue;
        };
        latency_ns.push(took.as_nanos() as u64);
        if let (Some(probe), Some(port)) = (&probe, args.connect_port) {
            match probe.connect(SocketAddr::new(addr, port)) {
                Ok(()) => allowed += 1,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    denied += 1;
                    first_denied.get_or_insert(name);
                }
                Err(e) => return Err(format!("udp connect {addr}:{port}: {e}")),
            }
        }
    }
    Ok(serde_json::json!({
        "queries": i,
        "latency_ns": latency_ns,
        "timeouts": timeouts,
        "rcodes": rcodes,
        "no_address": no_address,
        "connects_allowed": allowed,
        "connects_denied": denied,
        "first_denied": first_denied,
        "elapsed_ns": started.elapsed().as_nanos() as u64,
    }))
}

fn gaps(args: &Args) -> Result<serde_json::Value, String> {
    let s = socket(args)?;
    let limit = Duration::from_secs_f64(args.seconds);
    let mut buf = vec![0u8; 4096];
    let mut lookups: Vec<[u64; 3]> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed_since_answer = false;
    let mut recovered: Option<Instant> = None;
    let started = Instant::now();
    let mut i = 0;
    while i < args.count && started.elapsed() < limit {
        if args.stop_file.as_deref().is_some_and(|f| f.exists()) {
            break;
        }
        if let (Some(at), Some(after)) = (recovered, args.stop_after_recovery)
            && at.elapsed() >= after
        {
            break;
        }
        let name = zone_name(args, args.start + i);
        let id = i as u16;
        let bytes = query(&name, RecordType::A, id)?;
        let start = monotonic_ns();
        let t0 = Instant::now();
        i += 1;
        let outcome = match s.send(&bytes) {
            Err(e) => {
                let took = t0.elapsed();
                let code = if e.raw_os_error() == Some(libc::EPERM) {
                    2
                } else {
                    3
                };
                *errors.entry(format!("send: {e}")).or_default() += 1;
                lookups.push([start, took.as_nanos() as u64, code]);
                failed_since_answer = true;
                std::thread::sleep(args.retry);
                continue;
            }
            Ok(_) => match wait_answer(&s, id, t0 + args.timeout, &mut buf) {
                // A refused port (no listener) is a failure as well.
                Err(e) => {
                    *errors.entry(e).or_default() += 1;
                    3
                }
                Ok(None) => 1,
                Ok(Some(n)) => match Message::from_vec(&buf[..n]) {
                    Ok(a)
                        if a.response_code() == ResponseCode::NoError
                            && !addresses(&a).is_empty() =>
                    {
                        0
                    }
                    _ => 4,
                },
            },
        };
        lookups.push([start, t0.elapsed().as_nanos() as u64, outcome]);
        if outcome == 0 {
            if failed_since_answer && recovered.is_none() {
                recovered = Some(Instant::now());
            }
        } else {
            failed_since_answer = true;
            if outcome == 3 {
                std::thread::sleep(args.retry);
            }
        }
    }
    Ok(serde_json::json!({
        "lookups": lookups,
        "errors": errors,
        "elapsed_ns": started.elapsed().as_nanos() as u64,
    }))
}

/// What one flood thread counted.
#[derive(Default)]
struct Counts {
    sent: u64,
    answered: u64,
    timeouts: u64,
    rcodes: BTreeMap<String, u64>,
}

fn flood(args: &Args) -> Result<serde_json::Value, String> {
    if args.threads == 0 || args.window == 0 || args.window > 4096 {
        return Err("--threads must be above 0 and --window from 1 to 4096".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.seconds);
    let results: Vec<Result<Counts, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..args.threads)
            .map(|t| {
                let stop = stop.clone();
                let answered = answered.clone();
                scope.spawn(move || flood_thread(args, t as u64, end, &stop, &answered))
            })
            .collect();
        threads
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut total = Counts::default();
    for r in results {
        let c = r?;
        total.sent += c.sent;
        total.answered += c.answered;
        total.timeouts += c.timeouts;
        for (k, v) in c.rcodes {
            *total.rcodes.entry(k).or_default() += v;
        }
    }
    Ok(serde_json::json!({
        "sent": total.sent,
        "answered": total.answered,
        "timeouts": total.timeouts,
        "rcodes": total.rcodes,
        "elapsed_ns": elapsed.as_nanos() as u64,
    }))
}

fn flood_thread(
    args: &Args,
    thread: u64,
    end: Instant,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> Result<Counts, String> {
    let s = socket(args)?;
    s.set_read_timeout(Some(TICK))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut counts = Counts::default();
    let mut outstanding: HashMap<u16, Instant> = HashMap::new();
    let mut next: u64 = 0;
    // Each thread starts elsewhere in the zone.
    let offset = thread * args.names.max(1) / args.threads as u64;
    let mut buf = vec![0u8; 4096];
    let mut send = |outstanding: &mut HashMap<u16, Instant>, counts: &mut Counts| {
        // Ids in use are skipped; the window is far below 65,536.
        let mut id = next as u16;
        while outstanding.contains_key(&id) {
            next += 1;
            id = next as u16;
        }
        let bytes = query(&zone_name(args, offset + next), RecordType::A, id)?;
        next += 1;
        s.send(&bytes)
            .map_err(|e| format!("send to {}: {e}", args.server))?;
        outstanding.insert(id, Instant::now());
        counts.sent += 1;
        Ok::<(), String>(())
    };
    for _ in 0..args.window {
        send(&mut outstanding, &mut counts)?;
    }
    let mut stopping = false;
    while !outstanding.is_empty() {
        if !stopping
            && (Instant::now() >= end
                || stop.load(Ordering::Relaxed)
                || answered.load(Ordering::Relaxed) >= args.count)
        {
            stop.store(true, Ordering::Relaxed);
            stopping = true;
        }
        match s.recv(&mut buf) {
            Ok(n) => {
                let Ok(header) = Header::from_bytes(&buf[..n]) else {
                    continue;
                };
                if outstanding.remove(&header.id()).is_none() {
                    continue;
                }
                if header.response_code() == ResponseCode::NoError {
                    counts.answered += 1;
                    answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    *counts
                        .rcodes
                        .entry(rcode_name(header.response_code()))
                        .or_default() += 1;
                }
                if !stopping {
                    send(&mut outstanding, &mut counts)?;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("recv from {}: {e}", args.server)),
        }
        let now = Instant::now();
        let expired: Vec<u16> = outstanding
            .iter()
            .filter(|(_, sent)| now.duration_since(**sent) >= args.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            outstanding.remove(&id);
            counts.timeouts += 1;
            if !stopping {
                send(&mut outstanding, &mut counts)?;
            }
        }
    }
    Ok(counts)
}

fn resolve(args: &Args) -> Result<serde_json::Value, String> {
    let name = args.name.as_deref().ok_or("resolve needs --name")?;
    let s = socket(args)?;
    let mut buf = vec![0u8; 4096];
    let mut addrs = Vec::new();
    for (id, rtype) in [(1u16, RecordType::A), (2, RecordType::AAAA)] {
        s.send(&query(name, rtype, id)?)
            .map_err(|e| format!("send to {}: {e}", args.server))?;
        let n = wait_answer(&s, id, Instant::now() + args.timeout, &mut buf)?
            .ok_or_else(|| format!("{rtype} {name}: no answer within {:?}", args.timeout))?;
        let answer = Message::from_vec(&buf[..n]).map_err(|e| format!("answer: {e}"))?;
        if answer.response_code() != ResponseCode::NoError {
            return Err(format!("{rtype} {name}: {}", answer.response_code()));
        }
        addrs.extend(addresses(&answer).iter().map(|a| a.to_string()));
    }
    Ok(serde_json::json!({ "addrs": addrs }))
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        op: String::new(),
        server: "127.0.0.1:53".parse().expect("address"),
        cgroup: None,
        zone: String::new(),
        names: 1,
        start: 0,
        count: 1,
        seconds: 1.0,
        timeout: Duration::from_secs(1),
        connect_port: None,
        threads: 1,
        window: 1,
        name: None,
        retry: Duration::from_millis(1),
        stop_file: None,
        stop_after_recovery: None,
    };
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--op" => args.op = value,
            "--server" => args.server = value.parse().map_err(|e| bad(&e))?,
            "--cgroup" => args.cgroup = Some(PathBuf::from(&value)),
            "--zone" => args.zone = value,
            "--names" => args.names = value.parse().map_err(|e| bad(&e))?,
            "--start" => args.start = value.parse().map_err(|e| bad(&e))?,
            "--count" => args.count = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => args.seconds = value.parse().map_err(|e| bad(&e))?,
            "--timeout-ms" => {
                args.timeout = Duration::from_millis(value.parse().map_err(|e| bad(&e))?)
            }
            "--connect-port" => args.connect_port = Some(value.parse().map_err(|e| bad(&e))?),
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            "--window" => args.window = value.parse().map_err(|e| bad(&e))?,
            "--name" => args.name = Some(value),
            "--retry-ms" => args.retry = Duration::from_millis(value.parse().map_err(|e| bad(&e))?),
            "--stop-file" => args.stop_file = Some(PathBuf::from(&value)),
            "--stop-ms-after-recovery" => {
                args.stop_after_recovery =
                    Some(Duration::from_millis(value.parse().map_err(|e| bad(&e))?))
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    if args.op.is_empty() {
        return Err("--op is required".into());
    }
    Ok(args)
}
