//! Real DNS servers and clients for the DNS-path tests.
//!
//! - [`DnsServer`]: Debian's `dnsmasq` serving a test [`Zone`] on an
//!   address the test picks (loopback, or inside a [`NetNs`]), with its
//!   query log readable ([`DnsServer::queries`]).
//! - [`Resolver`]: runs a real client with a `/etc/resolv.conf` of the
//!   test's, bind-mounted over the host's in a private mount namespace
//!   (`unshare --mount`), so the host's file is never touched; optionally
//!   in a network namespace and in a cgroup. Clients: `dig`, glibc's
//!   getaddrinfo (`getent ahosts`), musl's (tests/c/musl_lookup.c,
//!   built with `musl-gcc -static`) and c-ares's (tests/python/cares_lookup.py,
//!   through `pycares` in the tests' venv, [`crate::python`]).
//! - [`RcodeServer`]: a small UDP front (hickory-proto messages) that
//!   answers a chosen rcode for names under chosen suffixes and relays
//!   every other query to an upstream (a [`DnsServer`]): how the tests
//!   learn which rcode makes each client try its next search domain.
//! - [`NetNs`]: a network namespace joined to the host by a veth pair.
//!
//! Every guard removes what it made on drop (processes killed and reaped,
//! temporary files, namespaces), also when the test fails; every child is
//! killed after a bounded time.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// DNS response codes, for [`RcodeServer`].
pub use hickory_proto::op::ResponseCode;
use hickory_proto::op::{Message, MessageType};

/// The programs these helpers run (for `require_tools!`).
pub const DNS_TOOLS: [&str; 6] = ["dnsmasq", "dig", "getent", "musl-gcc", "unshare", "ip"];

/// How long a client may run before it is killed.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The name [`DnsServer`] polls for until it answers (left out of
/// [`DnsServer::queries`]).
const READY_NAME: &str = "idgate-ready.invalid";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique in this process.
fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A loopback address, unique to this test process and call, for a
/// server that must listen on port 53 (glibc and musl reach nameservers
/// only there): `127.54.P.N` (127.53.0.0/16 is the agent's reserved range by default), P from the pid, N counting from 1.
pub fn loopback_ip() -> IpAddr {
    let n = next();
    assert!(
        n < 250,
        "more than 250 loopback DNS addresses in one test run"
    );
    IpAddr::V4(Ipv4Addr::new(
        127,
        54,
        (std::process::id() % 256) as u8,
        n as u8 + 1,
    ))
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "idgate-dns-{tag}-{}-{}",
            std::process::id(),
            next()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test zone for [`DnsServer`], as dnsmasq options. Names are
/// answered from dnsmasq's own configuration ("config" in its log); a
/// name it has no record for is answered REFUSED (dnsmasq has no
/// upstream), unless under a domain given to [`Zone::nxdomain`].
#[derive(Clone, Debug, Default)]
pub struct Zone {
    args: Vec<String>,
}

impl Zone {
    pub fn new() -> Self {
        Self::default()
    }

    /// A and AAAA records for `name`: every address in `addrs` (any mix
    /// of IPv4 and IPv6, as many as wanted), with `ttl` (0 allowed). One
    /// `--host-record=name,addr,ttl` per address: dnsmasq keeps one
    /// address per family of each.
    pub fn host(mut self, name: &str, addrs: &[IpAddr], ttl: u32) -> Self {
        assert!(!addrs.is_empty(), "a host record needs an address");
        for a in addrs {
            self.args.push(format!("--host-record={name},{a},{ttl}"));
        }
        self
    }

    /// `alias` is a CNAME for `target` with `ttl`
    /// (`--cname=alias,target,ttl`). Chains are CNAMEs of CNAMEs; the
    /// target must be a name of this zone (dnsmasq answers the whole
    /// chain at once).
    pub fn cname(mut self, alias: &str, target: &str, ttl: u32) -> Self {
        self.args.push(format!("--cname={alias},{target},{ttl}"));
        self
    }

    /// Every name at or under `domain` without a record is NXDOMAIN
    /// (`--address=/domain/`).
    pub fn nxdomain(mut self, domain: &str) -> Self {
        self.args.push(format!("--address=/{domain}/"));
        self
    }

    /// Any further dnsmasq option.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }
}

/// One query dnsmasq logged: its type (`A`, `AAAA`, ...), name and
/// where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedQuery {
    pub qtype: String,
    pub name: String,
    pub from: String,
}

/// Debian's `dnsmasq` serving a [`Zone`] at one address, until dropped
/// (then killed and reaped).
pub struct DnsServer {
    child: Option<Child>,
    addr: SocketAddr,
    netns: Option<String>,
    dir: TempDir,
}

impl DnsServer {
    /// Starts dnsmasq on `addr` (in the test's network namespace) and
    /// waits until it answers.
    pub fn start(addr: SocketAddr, zone: &Zone) -> Self {
        Self::start_in(None, addr, zone)
    }

    /// Starts dnsmasq on `addr` in the network namespace `netns`
    /// (`ip netns exec NETNS dnsmasq ...`), and waits until it answers.
    pub fn start_in_netns(netns: &str, addr: SocketAddr, zone: &Zone) -> Self {
        Self::start_in(Some(netns), addr, zone)
    }

    fn start_in(netns: Option<&str>, addr: SocketAddr, zone: &Zone) -> Self {
        let dir = TempDir::new("dnsmasq");
        let log = dir.0.join("queries.log");
        let stderr = std::fs::File::create(dir.0.join("stderr")).expect("dnsmasq stderr file");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "dnsmasq"]);
                c
            }
            None => Command::new("dnsmasq"),
        };
        cmd.args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--log-queries=extra",
        ])
        .arg(format!("--log-facility={}", log.display()))
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        // Run as root, so it can read the test's files and nothing needs
        // chowning; no pid file to clean.
        .args(["--user=root", "--pid-file"])
        .args(&zone.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
        let child = cmd.spawn().expect("spawn dnsmasq");
        let mut server = Self {
            child: Some(child),
            addr,
            netns: netns.map(str::to_owned),
            dir,
        };
        server.wait_answering();
        server
    }

    /// Polls with `dig` (at most 100 times, 10 s) until any answer comes.
    fn wait_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..100 {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("dnsmasq exited with {status}:\n{}", self.stderr());
            }
            let mut dig = Resolver::with_conf("");
            if let Some(ns) = &self.netns {
                dig = dig.in_netns(ns);
            }
            let q = DigQuery::new(READY_NAME).server(self.addr).arg("+time=1");
            if dig.dig(&q).status.is_some() {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "dnsmasq on {} did not answer within 10 s:\n{}",
            self.addr,
            self.stderr()
        );
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("dnsmasq running").id()
    }

    /// What it wrote to stderr (startup errors).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stderr")).unwrap_or_default()
    }

    /// Its query log (`--log-queries=extra`) as written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("queries.log")).unwrap_or_default()
    }

    /// Every query that reached it so far, in order.
    pub fn queries(&self) -> Vec<LoggedQuery> {
        // `... dnsmasq[PID]: 3 127.0.0.1/41744 query[A] web.test from 127.0.0.1`
        self.log()
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once(" query[")?;
                let (qtype, rest) = rest.split_once("] ")?;
                let (name, from) = rest.split_once(" from ")?;
                // Not the readiness probe of `wait_answering`.
                (name != READY_NAME).then_some(())?;
                Some(LoggedQuery {
                    qtype: qtype.to_owned(),
                    name: name.to_owned(),
                    from: from.trim().to_owned(),
                })
            })
            .collect()
    }

    /// The names queried so far, as `TYPE name` (e.g. `A web.test`).
    pub fn queried(&self) -> Vec<String> {
        self.queries()
            .into_iter()
            .map(|q| format!("{} {}", q.qtype, q.name))
            .collect()
    }

    /// Whether `name` (any type) has been queried.
    pub fn was_queried(&self, name: &str) -> bool {
        self.queries()
            .iter()
            .any(|q| q.name.eq_ignore_ascii_case(name))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "dnsmasq on {} stderr:\n{}\nquery log:\n{}",
                self.addr,
                self.stderr(),
                self.log()
            );
        }
    }
}

/// What a client run returned.
#[derive(Clone, Debug)]
pub struct Run {
    /// `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// One `dig` query: `dig [@server -p port] NAME TYPE` with
/// `+tries=1 +time=2 +noall +comments +answer` and the options added.
#[derive(Clone, Debug)]
pub struct DigQuery {
    name: String,
    qtype: String,
    server: Option<SocketAddr>,
    args: Vec<String>,
}

impl DigQuery {
    /// An `A` query for `name`, to the nameservers of resolv.conf.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            qtype: "A".into(),
            server: None,
            args: Vec::new(),
        }
    }

    /// The record type (`A`, `AAAA`, `CNAME`, ...).
    pub fn qtype(mut self, qtype: &str) -> Self {
        self.qtype = qtype.to_owned();
        self
    }

    /// Asks `server` (`@addr -p port`) instead of resolv.conf's.
    pub fn server(mut self, server: SocketAddr) -> Self {
        self.server = Some(server);
        self
    }

    /// Over TCP (`+tcp`).
    pub fn tcp(self) -> Self {
        self.arg("+tcp")
    }

    /// Through resolv.conf's search list and ndots (`+search`).
    pub fn search(self) -> Self {
        self.arg("+search")
    }

    /// Any further dig option (later ones win, e.g. `+time=1`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(s) = self.server {
            v.push(format!("@{}", s.ip()));
            v.push("-p".into());
            v.push(s.port().to_string());
        }
        v.extend([
            self.name.clone(),
            self.qtype.clone(),
            "+tries=1".into(),
            "+time=2".into(),
            "+noall".into(),
            "+comments".into(),
            "+answer".into(),
        ]);
        v.extend(self.args.iter().cloned());
        v
    }
}

/// One answer record as dig printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Fully qualified, with the final dot.
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

/// What `dig` answered.
#[derive(Clone, Debug)]
pub struct DigAnswer {
    /// The header's status (`NOERROR`, `NXDOMAIN`, `REFUSED`,
    /// `SERVFAIL`, ...); `None` when no answer came.
    pub status: Option<String>,
    /// The answer section.
    pub records: Vec<Record>,
    /// The A and AAAA records' addresses, in order.
    pub addrs: Vec<IpAddr>,
    pub run: Run,
}

impl DigAnswer {
    fn parse(run: Run) -> Self {
        // With +search, dig prints every answer it got; the last is final.
        let status = run
            .stdout
            .lines()
            .filter_map(|l| l.split_once("status: "))
            .filter_map(|(_, rest)| rest.split(',').next())
            .map(str::to_owned)
            .next_back();
        let records: Vec<Record> = run
            .stdout
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let name = f.next()?.to_owned();
                let ttl = f.next()?.parse().ok()?;
                let _class = f.next()?;
                let rtype = f.next()?.to_owned();
                let data = f.collect::<Vec<_>>().join(" ");
                Some(Record {
                    name,
                    ttl,
                    rtype,
                    data,
                })
            })
            .collect();
        let addrs = records
            .iter()
            .filter(|r| r.rtype == "A" || r.rtype == "AAAA")
            .filter_map(|r| r.data.parse().ok())
            .collect();
        Self {
            status,
            records,
            addrs,
            run,
        }
    }
}

/// What a getaddrinfo client (glibc's, musl's or c-ares's) returned.
#[derive(Clone, Debug)]
pub struct Lookup {
    /// Each address once, in the order the client gave them.
    pub addrs: Vec<IpAddr>,
    /// The exit code: `getent`: 0 found, 2 not found (any failure);
    /// musl client: 0, or 2 EAI_NONAME, 3 EAI_AGAIN, 4 EAI_FAIL,
    /// 5 EAI_NODATA, 6 EAI_SYSTEM, 1 other; c-ares client: 0, or 2
    /// ARES_ENOTFOUND, 3 ARES_ENODATA, 4 ARES_ESERVFAIL, 5 ARES_EREFUSED,
    /// 6 ARES_ETIMEOUT, 7 ARES_ECONNREFUSED, 8 ARES_EBADRESP or
    /// ARES_EFORMERR, 9 its own 20 s bound, 1 other (see
    /// tests/python/cares_lookup.py). `None` when killed at the timeout.
    pub code: Option<i32>,
    /// The musl client's `EAI_*` name, or the c-ares client's `ARES_*`
    /// name, when it failed.
    pub error: Option<String>,
    pub run: Run,
}

impl Lookup {
    fn parse(run: Run) -> Self {
        let mut addrs: Vec<IpAddr> = Vec::new();
        for line in run.stdout.lines() {
            // getent ahosts: `ADDR  STREAM name`; musl and c-ares
            // clients: `ADDR`.
            if let Some(a) = line.split_whitespace().next().and_then(|w| w.parse().ok())
                && !addrs.contains(&a)
            {
                addrs.push(a);
            }
        }
        let error = run
            .stderr
            .split_whitespace()
            .find(|w| w.starts_with("EAI_") || w.starts_with("ARES_"))
            .map(str::to_owned);
        Self {
            addrs,
            code: run.code(),
            error,
            run,
        }
    }

    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Where and how a client runs: its own `/etc/resolv.conf` (and an
/// `/etc/nsswitch.conf` with `hosts: dns`, so glibc asks DNS only),
/// bind-mounted over the host's in a private mount namespace the client
/// gets from `unshare --mount`; optionally in a network namespace and in
/// a cgroup. The files live in a temporary directory removed on drop.
pub struct Resolver {
    dir: TempDir,
    netns: Option<String>,
    cgroup: Option<PathBuf>,
    timeout: Duration,
}

impl Resolver {
    /// `nameserver` lines for `servers` (port 53: glibc and musl have no
    /// other), `options timeout:2 attempts:1` to keep failures short.
    pub fn new(servers: &[IpAddr]) -> Self {
        Self::with_conf(&format!(
            "{}options timeout:2 attempts:1\n",
            nameservers(servers)
        ))
    }

    /// A Kubernetes pod's resolv.conf (as the kubelet writes it for
    /// `dnsPolicy: ClusterFirst`) in the namespace `namespace`:
    /// `search NS.svc.cluster.local svc.cluster.local cluster.local`,
    /// `options ndots:5`, and, to keep failures short,
    /// `timeout:2 attempts:1`.
    pub fn kubernetes(servers: &[IpAddr], namespace: &str) -> Self {
        Self::with_conf(&kubernetes_conf(servers, namespace))
    }

    /// Exactly `resolv_conf` as the client's `/etc/resolv.conf`.
    pub fn with_conf(resolv_conf: &str) -> Self {
        let dir = TempDir::new("resolver");
        std::fs::write(dir.0.join("resolv.conf"), resolv_conf).expect("write resolv.conf");
        std::fs::write(dir.0.join("nsswitch.conf"), "hosts: dns\n").expect("write nsswitch.conf");
        Self {
            dir,
            netns: None,
            cgroup: None,
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// Clients run in the network namespace `netns` (`ip netns exec`).
    pub fn in_netns(mut self, netns: &str) -> Self {
        self.netns = Some(netns.to_owned());
        self
    }

    /// Clients run in the cgroup at `dir` (they are moved there before
    /// they exec, as the other tests' workloads are).
    pub fn in_cgroup(mut self, dir: &Path) -> Self {
        self.cgroup = Some(dir.to_owned());
        self
    }

    /// Clients are killed after `timeout` (default [`CLIENT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The resolv.conf clients see.
    pub fn resolv_conf(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("resolv.conf")).expect("resolv.conf")
    }

    /// `program ARGS` as it runs here: in the cgroup, the network
    /// namespace, and a private mount namespace with the resolv.conf and
    /// nsswitch.conf bind-mounted; every step execs, so the child's pid
    /// is the client's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c");
        match &self.cgroup {
            Some(dir) => {
                cmd.arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
                    .arg(dir);
            }
            None => {
                cmd.arg("exec \"$@\"").arg("sh");
            }
        }
        if let Some(ns) = &self.netns {
            cmd.args(["ip", "netns", "exec", ns]);
        }
        let conf = self.dir.0.join("resolv.conf");
        let nss = self.dir.0.join("nsswitch.conf");
        cmd.args(["unshare", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c"])
            .arg(
                "mount --bind \"$0\" /etc/resolv.conf && mount --bind \"$1\" /etc/nsswitch.conf \
                 && shift 2 && exec \"$@\"",
            )
            .arg(conf)
            .arg(nss)
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program ARGS` (see [`Resolver::command`]) to its end, or
    /// kills it at the timeout.
    pub fn run(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Run {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_bounded(cmd, self.timeout)
    }

    /// `dig` with `query`.
    pub fn dig(&self, query: &DigQuery) -> DigAnswer {
        let args = query.args();
        DigAnswer::parse(self.run("dig", &as_strs(&args)))
    }

    /// glibc's getaddrinfo: `getent ahosts NAME` (AF_UNSPEC: A and AAAA).
    pub fn getent(&self, name: &str) -> Lookup {
        Lookup::parse(self.run("getent", &["ahosts", name]))
    }

    /// glibc's getaddrinfo for one family: `getent ahostsv4|ahostsv6`.
    pub fn getent_family(&self, name: &str, v6: bool) -> Lookup {
        let db = if v6 { "ahostsv6" } else { "ahostsv4" };
        Lookup::parse(self.run("getent", &[db, name]))
    }

    /// musl's getaddrinfo (AF_UNSPEC): tests/c/musl_lookup.c.
    pub fn musl(&self, name: &str) -> Lookup {
        Lookup::parse(self.run(musl_lookup(), &[name]))
    }

    /// musl's getaddrinfo for one family (`4` or `6`).
    pub fn musl_family(&self, name: &str, v6: bool) -> Lookup {
        Lookup::parse(self.run(musl_lookup(), &[name, if v6 { "6" } else { "4" }]))
    }

    /// c-ares's getaddrinfo (AF_UNSPEC): tests/python/cares_lookup.py,
    /// run by the tests' venv python (a test checks [`crate::python::env`]
    /// first, which skips or fails it where Python or PyPI is missing).
    /// The channel reads the private resolv.conf (search, ndots, timeout,
    /// attempts) and nsswitch.conf.
    pub fn cares(&self, name: &str) -> Lookup {
        let python = crate::python::env().expect("the tests' python venv");
        let script = crate::python::script("cares_lookup.py");
        Lookup::parse(self.run(python, &[&script.to_string_lossy(), name]))
    }
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn nameservers(servers: &[IpAddr]) -> String {
    servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect()
}

/// The resolv.conf of [`Resolver::kubernetes`].
pub fn kubernetes_conf(servers: &[IpAddr], namespace: &str) -> String {
    format!(
        "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n{}options ndots:5 timeout:2 attempts:1\n",
        nameservers(servers)
    )
}

/// Runs `cmd` with its output captured; kills and reaps it after
/// `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let deadline = start + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    Run {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
    }
}

fn reader(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The musl client, built from tests/c/musl_lookup.c with
/// `musl-gcc -static` into the target directory once per content of the
/// source (`musl-lookup-HASH`), and reused while that file exists.
pub fn musl_lookup() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = &*built {
        return p.clone();
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/musl_lookup.c");
    let text = std::fs::read(&source).expect("tests/c/musl_lookup.c");
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = text.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| exe.parent().expect("exe dir"))
        .to_owned();
    let path = dir.join(format!("musl-lookup-{hash:016x}"));
    if !path.is_file() {
        let tmp = dir.join(format!(
            "musl-lookup-{hash:016x}.{}.tmp",
            std::process::id()
        ));
        let out = Command::new("musl-gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&source)
            .output()
            .expect("run musl-gcc (Debian's musl-tools)");
        assert!(
            out.status.success(),
            "musl-gcc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Atomic: another test binary building it too is harmless.
        std::fs::rename(&tmp, &path).expect("rename musl client");
    }
    *built = Some(path.clone());
    path
}

/// A query the [`RcodeServer`] saw, and what it did with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenQuery {
    /// Lower case, without the final dot.
    pub name: String,
    pub qtype: String,
    /// The rcode it answered itself, or `None` when it relayed the query.
    pub answered: Option<ResponseCode>,
}

/// A UDP DNS front for rcode experiments: answers `rcode` (with the
/// question, no records, RA set) for every name at or under one of its
/// suffixes, and relays every other query to `upstream`, relaying the
/// answer back. It runs on a thread of its own until dropped.
pub struct RcodeServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenQuery>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RcodeServer {
    pub fn start(
        addr: SocketAddr,
        upstream: SocketAddr,
        rcode: ResponseCode,
        suffixes: &[&str],
    ) -> Self {
        let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local addr");
        let suffixes: Vec<String> = suffixes
            .iter()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || serve(&socket, upstream, rcode, &suffixes, &seen, &stop))
        };
        Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every query so far, in order.
    pub fn seen(&self) -> Vec<SeenQuery> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RcodeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    socket: &UdpSocket,
    upstream: SocketAddr,
    rcode: ResponseCode,
    suffixes: &[String],
    seen: &Mutex<Vec<SeenQuery>>,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(q) = query.queries().first() else {
            continue;
        };
        let name = q
            .name()
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let matched = suffixes
            .iter()
            .any(|s| name == *s || name.ends_with(&format!(".{s}")));
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(SeenQuery {
                name,
                qtype: q.query_type().to_string(),
                answered: matched.then_some(rcode),
            });
        let reply = if matched {
            let mut m = Message::new();
            m.set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .set_response_code(rcode)
                .add_query(q.clone());
            m.to_vec().ok()
        } else {
            relay(&buf[..n], upstream)
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// Sends `query` to `upstream` and returns its answer (2 s at most).
fn relay(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.send_to(query, upstream).ok()?;
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// A network namespace joined to the test's by a veth pair: the host end
/// has `host_ip`, the namespace end `ns_ip` (a /30 of `10.213.0.0/16`
/// unique to this test process and call), and the namespace routes
/// everything to the host end. Deleted (with the pair) on drop.
pub struct NetNs {
    name: String,
    host_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl NetNs {
    pub fn new() -> Self {
        let n = next();
        let pid = std::process::id();
        let name = format!("idgate-dns-{pid}-{n}");
        // Interface names are at most 15 bytes.
        let tag = format!("{}{}", pid % 100_000, n % 100);
        let host_if = format!("idh{tag}");
        let ns_if = format!("idn{tag}");
        // A /30 per (pid, call): 10.213.X.Y.
        let slot = (pid % 64) * 16 + n % 16;
        let (x, y) = ((slot / 64) as u8, ((slot % 64) * 4) as u8);
        let host_ip = Ipv4Addr::new(10, 213, x, y + 1);
        let ns_ip = Ipv4Addr::new(10, 213, x, y + 2);
        let me = Self {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        ip(&["netns", "add", &me.name]);
        ip(&[
            "link",
            "add",
            &me.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &me.name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &me.host_if]);
        ip(&["link", "set", &me.host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut v = vec!["netns", "exec", &me.name, "ip"];
            v.extend_from_slice(args);
            ip(&v);
        };
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        in_ns(&["link", "set", &ns_if, "up"]);
        in_ns(&["route", "add", "default", "via", &host_ip.to_string()]);
        me
    }

    /// Its name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end's interface name.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `ip ARGS`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The second identity of the DNS tests (`crate::WEB` is the first).
pub const OTHER: &str = "spiffe://example.org/other";

/// A nameserver for the workloads' resolv.conf where nothing listens:
/// every answer a client gets comes from the agent, which never forwards
/// to the server a workload asked.
pub const NOWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53));

/// `[[workload]]` tables binding the cgroups `web` and `other` to
/// [`crate::WEB`] and [`OTHER`].
pub fn web_and_other() -> String {
    format!(
        "[[workload]]\ncgroup = \"web\"\nidentity = \"{}\"\n\
         [[workload]]\ncgroup = \"other\"\nidentity = \"{OTHER}\"\n",
        crate::WEB
    )
}

/// Agent configuration for a DNS test: the audit log at `log` with every
/// allow recorded, and the DNS path forwarding to `upstream` from a port
/// of its own, with a grace of 1 s; `extra` adds `[dns]` keys.
pub fn dns_config(upstream: SocketAddr, log: &Path, extra: &str) -> String {
    format!(
        "[events]\naudit_log = {log:?}\nallow_sample_rate = 1.0\n\
         [dns]\nlisten_port = {}\nupstreams = [\"{upstream}\"]\ngrace = \"1s\"\n{extra}\n",
        crate::free_port()
    )
}

/// What the kernel made of a TCP connect from `cgroup` to `ip`:`port`:
/// `allowed` (it went through: `ok`, or ECONNREFUSED where nothing
/// listens) or the errno (`EPERM`: denied).
pub fn connect(cgroup: &Path, ip: &str, port: u16) -> String {
    let to = match ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{ip}]:{port}"),
        _ => format!("{ip}:{port}"),
    };
    match crate::probe(Some(cgroup), "tcp", &to).as_str() {
        "ok" | "ECONNREFUSED" => "allowed".into(),
        other => other.into(),
    }
}

/// The audit log's records, as far as written.
pub fn audit(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
