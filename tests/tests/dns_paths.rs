//! The DNS path's bypasses and edge cases, end to end: the real agent
//! with a real upstream (Debian's dnsmasq), real clients (dig, glibc's
//! getaddrinfo, a musl-built client, c-ares through pycares, small Python
//! senders) in real
//! cgroups, and real connects by the probe. Each test has its own scope,
//! agent and upstream, and proves one thing (said above it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idgate_tests::dns::{
    CLIENT_TIMEOUT, DigQuery, DnsServer, NOWHERE, NetNs, OTHER, Resolver, Run, Zone, audit,
    connect, dns_config, loopback_ip, run_bounded, web_and_other,
};
use idgate_tests::{
    Agent, Cgroups, Listeners, WEB, probe, python, require_privileges, require_tools, target_bin,
    wait_for,
};
use nix::sys::signal::Signal;

/// The tools every test here runs.
macro_rules! require_dns_tools {
    () => {
        require_privileges!();
        require_tools!(
            "dnsmasq", "dig", "getent", "musl-gcc", "unshare", "ip", "python3"
        );
    };
}

/// Policy: WEB may reach `api.test.example` and names under
/// `svc.test.example` on the TCP port, and is denied 198.51.100.0/24
/// outright; OTHER may reach `api.test.example` only. `web_extra` goes
/// into WEB's block (e.g. `audit = true`).
fn policy(tcp_port: u16, web_extra: &str) -> String {
    format!(
        r#"
[[identity]]
id = "{WEB}"
{web_extra}
[[identity.egress]]
name = "api"
to = ["api.test.example", "*.svc.test.example"]
ports = [{tcp_port}]
protocol = "tcp"
action = "allow"
[[identity.egress]]
name = "no-net"
to = ["198.51.100.0/24"]
action = "deny"

[[identity]]
id = "{OTHER}"
default = "deny"
[[identity.egress]]
name = "api"
to = ["api.test.example"]
ports = [{tcp_port}]
protocol = "tcp"
action = "allow"
"#
    )
}

fn lo(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

fn zone() -> Zone {
    Zone::new()
        .host("api.test.example", &[lo(1)], 300)
        .host("other.svc.test.example", &[lo(11)], 300)
        .host("two.svc.test.example", &[lo(21), lo(22)], 300)
        .host(
            "four.svc.test.example",
            &[lo(31), lo(32), lo(33), lo(34)],
            300,
        )
        .host("one.svc.test.example", &[lo(41)], 300)
        .host("denied.svc.test.example", &[ip("198.51.100.7")], 300)
        .host(
            "mixed.svc.test.example",
            &[ip("203.0.113.5"), ip("10.1.2.3")],
            300,
        )
        .host("private.svc.test.example", &[ip("10.1.2.3")], 300)
        .host("local.svc.test.example", &[lo(1)], 300)
        .host("secret.test.example", &[lo(9)], 300)
        .nxdomain("test.example")
        .nxdomain("cluster.local")
}

/// One test's world: its cgroups (`web`, `other`), upstream, audit log
/// and agent. Dropped in reverse order of fields: agent first.
struct World {
    agent: Agent,
    upstream: DnsServer,
    log: std::path::PathBuf,
    web: std::path::PathBuf,
    other: std::path::PathBuf,
    listeners: Listeners,
    cg: Cgroups,
}

impl World {
    /// The agent of `policy(port, web_extra)` with the config's
    /// `private_answers` and `extra` `[dns]` keys.
    fn start(tag: &str, web_extra: &str, private: &str, extra: &str) -> Self {
        let listeners = Listeners::new();
        let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone());
        let mut cg = Cgroups::new(tag);
        let web = cg.inside("web");
        let other = cg.inside("other");
        let log = std::env::temp_dir().join(format!("{}-audit.jsonl", cg.name()));
        let _ = std::fs::remove_file(&log);
        let agent = Agent::start(
            &cg,
            &policy(listeners.tcp_port, web_extra),
            &format!(
                "{}{}",
                web_and_other(),
                dns_config(
                    upstream.addr(),
                    &log,
                    &format!("private_answers = \"{private}\"\n{extra}")
                )
            ),
        );
        Self {
            agent,
            upstream,
            log,
            web,
            other,
            listeners,
            cg,
        }
    }

    fn port(&self) -> u16 {
        self.listeners.tcp_port
    }

    /// A client in `cgroup` with a resolv.conf naming NOWHERE.
    fn asks(&self, cgroup: &Path) -> Resolver {
        Resolver::new(&[NOWHERE]).in_cgroup(cgroup)
    }

    /// What the kernel made of a TCP connect from `cgroup` to `ip` on the
    /// policy's port (see [`connect`]).
    fn tcp(&self, cgroup: &Path, ip: &str) -> String {
        connect(cgroup, ip, self.port())
    }

    /// The first audit-log record for which `pred` holds (waits 10 s).
    fn record(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_for(what, Duration::from_secs(10), || {
            audit(&self.log).into_iter().find(|e| pred(e))
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A DNS-path record of `identity` (or of no identity) for `name` with
/// `reason`.
fn dns_record(e: &serde_json::Value, name: &str, reason: &str) -> bool {
    e["hook"] == "dns" && e["dst_name"] == name && e["reason"] == reason
}

/// Python helpers for the senders run in a cgroup: `query(name, id)`
/// builds an A query by hand; `ask(payload)` sends it over UDP to
/// `server`:53 and says what came back (`none`, `send EPERM`, or
/// `rcode=N an=N from=ADDR`).
const PY_DNS: &str = r#"
import errno, socket, struct, sys
def query(name, qid):
    b = struct.pack('>HHHHHH', qid, 0x0100, 1, 0, 0, 0)
    for label in name.split('.'):
        b += bytes([len(label)]) + label.encode()
    return b + b'\x00' + struct.pack('>HH', 1, 1)
def describe(data, src):
    if len(data) < 12:
        return 'short'
    return 'rcode=%d an=%d from=%s' % (data[3] & 15, struct.unpack('>H', data[6:8])[0], src)
def ask(payload, family=socket.AF_INET, to=None):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(1.0)
    try:
        s.sendto(payload, (to or server, 53))
    except OSError as e:
        return 'send ' + errno.errorcode.get(e.errno, str(e.errno))
    try:
        data, src = s.recvfrom(4096)
    except socket.timeout:
        return 'none'
    return describe(data, src[0])
server = sys.argv[1]
"#;

/// Runs `python3 -c PY_DNS+script server args...` in `cgroup` (moved
/// there before it execs), bounded by the clients' timeout.
fn python(cgroup: &Path, script: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(cgroup)
        .arg("python3")
        .arg("-c")
        .arg(format!("{PY_DNS}{script}"))
        .args(args);
    run_bounded(cmd, CLIENT_TIMEOUT)
}

/// A child killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// 1. An allowed name's address is closed until the identity itself looks
// the name up: a connect by address alone is EPERM, and another
// identity's lookup of the same name opens nothing for it.
#[test]
fn an_allowed_name_s_address_is_closed_without_the_identity_s_own_lookup() {
    require_dns_tools!();
    let w = World::start("dnsp-nolookup", "", "allow", "");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
    let theirs = w.asks(&w.other).dig(&DigQuery::new("api.test.example"));
    assert_eq!(theirs.addrs, [lo(1)], "{theirs:?}");
    assert_eq!(w.tcp(&w.other, "127.0.0.1"), "allowed");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
    // And the other way: the kernel decided by the learned entry of OTHER
    // only, and its record names the name.
    w.record("OTHER's connect by name", |e| {
        e["identity"] == OTHER && e["verdict"] == "allow" && e["dst_name"] == "api.test.example"
    });
    w.record("WEB's denied connect", |e| {
        e["identity"] == WEB && e["verdict"] == "deny" && e["dst_addr"] == "127.0.0.1"
    });
}

// 2. Asking another resolver directly (`dig @server`, a real dnsmasq
// with other answers on a loopback :53) is answered by the agent from
// its own upstream: the other server never sees the query.
#[test]
fn asking_another_resolver_directly_is_answered_from_the_agent_s_upstream() {
    require_dns_tools!();
    let w = World::start("dnsp-direct", "", "allow", "");
    let rogue = DnsServer::start(
        SocketAddr::new(loopback_ip(), 53),
        &Zone::new().host("api.test.example", &[lo(99)], 300),
    );
    let a = w
        .asks(&w.web)
        .dig(&DigQuery::new("api.test.example").server(rogue.addr()));
    assert_eq!(a.status.as_deref(), Some("NOERROR"), "{a:?}");
    assert_eq!(a.addrs, [lo(1)], "the agent's upstream's answer: {a:?}");
    // dig took the answer as from the server it asked (the kernel put the
    // source back).
    assert!(a.run.stdout.contains("NOERROR"), "{a:?}");
    let tcp_a = w
        .asks(&w.web)
        .dig(&DigQuery::new("api.test.example").server(rogue.addr()).tcp());
    assert_eq!(tcp_a.addrs, [lo(1)], "{tcp_a:?}");
    assert!(w.upstream.was_queried("api.test.example"));
    assert!(rogue.queries().is_empty(), "{:?}", rogue.queried());
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");
    assert_eq!(w.tcp(&w.web, "127.0.0.99"), "EPERM");
}

// 3. DNS over TCP learns as UDP does: the address of a `dig +tcp`
// answer is open, and the record says tcp.
#[test]
fn a_lookup_over_tcp_learns_as_over_udp() {
    require_dns_tools!();
    let w = World::start("dnsp-tcp", "", "allow", "");
    let a = w
        .asks(&w.web)
        .dig(&DigQuery::new("other.svc.test.example").tcp());
    assert_eq!(a.status.as_deref(), Some("NOERROR"), "{a:?}");
    assert_eq!(a.addrs, [lo(11)], "{a:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.11"), "allowed");
    let r = w.record("the TCP lookup's record", |e| {
        dns_record(e, "other.svc.test.example", "answered")
    });
    assert_eq!(r["protocol"], "tcp", "{r}");
    assert!(
        r["dns"]["learned"][0]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.11 ")),
        "{r}"
    );
}

// 4. musl with two nameservers sends each query to both from one
// unconnected socket: it resolves (the answers come back from a server
// it asked), and the address is learned.
#[test]
fn musl_with_two_nameservers_resolves_and_learns() {
    require_dns_tools!();
    let w = World::start("dnsp-musl2", "", "allow", "");
    let r = Resolver::new(&[NOWHERE, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 54))]).in_cgroup(&w.web);
    let musl = r.musl("other.svc.test.example");
    assert!(musl.ok(), "{musl:?}");
    assert_eq!(musl.addrs, [lo(11)], "{musl:?}");
    assert!(
        musl.run.elapsed < Duration::from_secs(1),
        "musl waited: {musl:?}"
    );
    assert_eq!(w.tcp(&w.web, "127.0.0.11"), "allowed");
    // glibc with the same resolv.conf, for comparison.
    let glibc = r.getent("two.svc.test.example");
    assert!(glibc.ok(), "{glibc:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.21"), "allowed");
}

// 5. A Kubernetes pod's resolv.conf (search list, ndots:5): the search
// expansions no rule covers are answered NXDOMAIN by the agent without
// asking the upstream, so glibc, musl, dig and c-ares go on to the name
// as given and resolve it quickly.
#[test]
fn a_kubernetes_search_list_reaches_the_allowed_name_quickly() {
    require_dns_tools!();
    if python::env().is_none() {
        return;
    }
    let w = World::start("dnsp-k8s", "", "allow", "");
    let r = Resolver::kubernetes(&[NOWHERE], "ns").in_cgroup(&w.web);
    let quick = Duration::from_millis(1500);
    let glibc = r.getent("api.test.example");
    assert!(glibc.ok() && glibc.addrs.contains(&lo(1)), "{glibc:?}");
    assert!(glibc.run.elapsed < quick, "{glibc:?}");
    let musl = r.musl("other.svc.test.example");
    assert!(musl.ok() && musl.addrs.contains(&lo(11)), "{musl:?}");
    assert!(musl.run.elapsed < quick, "{musl:?}");
    let dig = r.dig(&DigQuery::new("two.svc.test.example").search());
    assert_eq!(dig.status.as_deref(), Some("NOERROR"), "{dig:?}");
    assert!(dig.run.elapsed < quick, "{dig:?}");
    // c-ares (pycares' getaddrinfo, A and AAAA) walks the same search list
    // and takes the agent's NXDOMAIN as "next domain" too; its name's
    // address is closed until its own lookup opens it.
    assert_ne!(w.tcp(&w.web, "127.0.0.41"), "allowed");
    let cares = r.cares("one.svc.test.example");
    assert!(cares.ok() && cares.addrs == [lo(41)], "{cares:?}");
    assert!(cares.run.elapsed < quick, "{cares:?}");
    for ip in ["127.0.0.1", "127.0.0.11", "127.0.0.21", "127.0.0.41"] {
        assert_eq!(w.tcp(&w.web, ip), "allowed", "{ip}");
    }
    // The expansions never reached the upstream, and were recorded.
    let asked = w.upstream.queried();
    assert!(
        !asked.iter().any(|q| q.contains("cluster.local")),
        "{asked:?}"
    );
    w.record("an expansion's record", |e| {
        dns_record(
            e,
            "api.test.example.ns.svc.cluster.local",
            "name_not_in_policy",
        )
    });
}

// 6. DNS over TLS or HTTPS to a resolver policy does not name: the
// connect is EPERM, at once (the kernel denies it before any packet).
#[test]
fn dot_and_doh_to_addresses_policy_does_not_allow_are_denied() {
    require_dns_tools!();
    let w = World::start("dnsp-dot", "", "allow", "");
    for to in [
        "1.1.1.1:853",
        "1.1.1.1:443",
        "8.8.8.8:443",
        "9.9.9.9:853",
        "[2606:4700:4700::1111]:853",
        "[2001:4860:4860::8888]:443",
    ] {
        let start = std::time::Instant::now();
        assert_eq!(probe(Some(&w.web), "tcp", to), "EPERM", "{to}");
        assert!(start.elapsed() < Duration::from_secs(1), "{to}");
    }
    // dig's own DoT client, through the resolv.conf-less @server form.
    let dot = w.asks(&w.web).dig(
        &DigQuery::new("api.test.example")
            .server("1.1.1.1:853".parse().unwrap())
            .arg("+tls"),
    );
    assert!(dot.status.is_none() && dot.addrs.is_empty(), "{dot:?}");
    assert!(dot.run.elapsed < Duration::from_secs(2), "{dot:?}");
    w.record("the DoT connect's denial", |e| {
        e["identity"] == WEB
            && e["verdict"] == "deny"
            && e["dst_addr"] == "1.1.1.1"
            && e["dst_port"] == 853
    });
}

// 7. What an answer may open: an address a deny rule covers stays
// closed though learned; with `private_answers = "deny"` private and
// loopback addresses are removed from the answer, recorded in
// `dns.dropped` with why, and stay closed.
#[test]
fn denied_and_private_answers_open_nothing() {
    require_dns_tools!();
    let w = World::start("dnsp-private", "", "deny", "");
    let web = w.asks(&w.web);

    let denied = web.dig(&DigQuery::new("denied.svc.test.example"));
    assert_eq!(denied.addrs, [ip("198.51.100.7")], "{denied:?}");
    assert_eq!(w.tcp(&w.web, "198.51.100.7"), "EPERM");
    w.record("the deny rule's decision", |e| {
        e["verdict"] == "deny" && e["dst_addr"] == "198.51.100.7" && e["rule"] == "no-net"
    });

    let mixed = web.dig(&DigQuery::new("mixed.svc.test.example"));
    assert_eq!(mixed.status.as_deref(), Some("NOERROR"), "{mixed:?}");
    assert_eq!(mixed.addrs, [ip("203.0.113.5")], "{mixed:?}");
    let private = web.dig(&DigQuery::new("private.svc.test.example"));
    assert!(private.addrs.is_empty(), "{private:?}");
    let local = web.dig(&DigQuery::new("local.svc.test.example"));
    assert!(local.addrs.is_empty(), "{local:?}");
    // 127.0.0.1 has a listener: only the policy stands between.
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
    assert_eq!(w.tcp(&w.web, "10.1.2.3"), "EPERM");

    let r = w.record("the mixed answer's record", |e| {
        dns_record(e, "mixed.svc.test.example", "answered")
    });
    assert_eq!(
        r["dns"]["dropped"],
        serde_json::json!(["10.1.2.3 (private)"]),
        "{r}"
    );
    assert!(
        r["dns"]["learned"][0]
            .as_str()
            .is_some_and(|l| l.starts_with("203.0.113.5 ")),
        "{r}"
    );
    let r = w.record("the loopback answer's record", |e| {
        dns_record(e, "local.svc.test.example", "answered")
    });
    assert_eq!(
        r["dns"]["dropped"],
        serde_json::json!(["127.0.0.1 (loopback)"]),
        "{r}"
    );
}

// 8. The bound of learned addresses: with `max_addresses_per_identity =
// 2`, an answer of four addresses gets SERVFAIL and a `not_learned`
// record, and none of its addresses opens; an answer of two is learned
// whole, and then a further address is refused the same way.
#[test]
fn an_answer_past_the_identity_s_bound_is_servfail_and_learns_nothing() {
    require_dns_tools!();
    let w = World::start("dnsp-bound", "", "allow", "max_addresses_per_identity = 2");
    let web = w.asks(&w.web);
    let four = web.dig(&DigQuery::new("four.svc.test.example"));
    assert_eq!(four.status.as_deref(), Some("SERVFAIL"), "{four:?}");
    for ip in ["127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34"] {
        assert_eq!(w.tcp(&w.web, ip), "EPERM", "{ip}");
    }
    let r = w.record("the not_learned record", |e| {
        dns_record(e, "four.svc.test.example", "not_learned")
    });
    assert!(
        r["dns"]["learned"].as_array().is_some_and(Vec::is_empty),
        "{r}"
    );
    assert!(r["dns"]["detail"].is_string(), "{r}");

    let two = web.dig(&DigQuery::new("two.svc.test.example"));
    assert_eq!(two.addrs.len(), 2, "{two:?}");
    for ip in ["127.0.0.21", "127.0.0.22"] {
        assert_eq!(w.tcp(&w.web, ip), "allowed", "{ip}");
    }
    let one = web.dig(&DigQuery::new("one.svc.test.example"));
    assert_eq!(one.status.as_deref(), Some("SERVFAIL"), "{one:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.41"), "EPERM");
    // Another identity has a bound of its own.
    let theirs = w.asks(&w.other).dig(&DigQuery::new("api.test.example"));
    assert_eq!(theirs.addrs, [lo(1)], "{theirs:?}");
}

// 9. Who may not ask: a revoked identity's queries are REFUSED and
// recorded `revoked`; a cgroup of the scope with no binding gets
// NXDOMAIN and a record `unknown_workload`; neither reaches the upstream.
#[test]
fn revoked_and_unknown_workloads_get_no_answers() {
    require_dns_tools!();
    let mut w = World::start("dnsp-revoked", "", "allow", "");
    let stranger = w.cg.inside("stranger");
    let unknown = w.asks(&stranger).dig(&DigQuery::new("api.test.example"));
    assert_eq!(unknown.status.as_deref(), Some("NXDOMAIN"), "{unknown:?}");
    w.record("the unknown workload's record", |e| {
        dns_record(e, "api.test.example", "unknown_workload") && e["identity"].is_null()
    });

    w.agent.try_cli(&["revoke", WEB]).expect("revoke");
    let revoked = w.asks(&w.web).dig(&DigQuery::new("api.test.example"));
    assert_eq!(revoked.status.as_deref(), Some("REFUSED"), "{revoked:?}");
    assert!(revoked.addrs.is_empty());
    w.record("the revoked identity's record", |e| {
        dns_record(e, "api.test.example", "revoked") && e["identity"] == WEB
    });
    assert!(
        !w.upstream.was_queried("api.test.example"),
        "{:?}",
        w.upstream.queried()
    );
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
}

// 10. Audit mode: for an identity with `audit = true`, a name no rule
// covers is forwarded and answered, and recorded `audit_allowed`; an
// enforced identity's same query is still NXDOMAIN.
#[test]
fn audit_mode_forwards_names_no_rule_covers_and_records_them() {
    require_dns_tools!();
    let w = World::start("dnsp-audit", "audit = true", "allow", "");
    let a = w.asks(&w.web).dig(&DigQuery::new("secret.test.example"));
    assert_eq!(a.status.as_deref(), Some("NOERROR"), "{a:?}");
    assert_eq!(a.addrs, [lo(9)], "{a:?}");
    assert!(w.upstream.was_queried("secret.test.example"));
    let r = w.record("the audit_allowed record", |e| {
        dns_record(e, "secret.test.example", "audit_allowed")
    });
    assert_eq!(r["identity"], WEB, "{r}");
    assert_eq!(r["verdict"], "allow", "{r}");
    // What the answer gave, for `policy suggest`; nothing learned.
    assert_eq!(
        r["dns"]["answered"],
        serde_json::json!([{"addr": "127.0.0.9", "ttl": 300}]),
        "{r}"
    );
    assert_eq!(r["dns"]["learned"], serde_json::json!([]), "{r}");
    let enforced = w.asks(&w.other).dig(&DigQuery::new("secret.test.example"));
    assert_eq!(enforced.status.as_deref(), Some("NXDOMAIN"), "{enforced:?}");
}

// 11. Reloads: one that keeps the name keeps its learned addresses open;
// one that drops the name closes them at once; the name's lookup is then
// refused.
#[test]
fn a_reload_that_drops_a_name_closes_its_addresses() {
    require_dns_tools!();
    let w = World::start("dnsp-reload", "", "allow", "");
    let a = w.asks(&w.web).dig(&DigQuery::new("api.test.example"));
    assert_eq!(a.addrs, [lo(1)], "{a:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");

    // Kept: a new generation (another identity added) that names it still.
    let kept = format!(
        "{}\n[[identity]]\nid = \"spiffe://example.org/third\"\ndefault = \"deny\"\n",
        policy(w.port(), "")
    );
    w.agent.write_policy(&kept);
    w.agent.try_cli(&["policy", "reload"]).expect("reload");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");

    // Moved to another port: the learned address follows at once (its
    // entry's own copy of the class's tables is of the old generation, so
    // the programs look the class up until the agent stamps it again),
    // and still after a sweep has passed.
    let moved_port = w.port() + 1;
    let moved = policy(w.port(), "").replacen(
        &format!("ports = [{}]", w.port()),
        &format!("ports = [{moved_port}]"),
        1,
    );
    w.agent.write_policy(&moved);
    w.agent.try_cli(&["policy", "reload"]).expect("reload");
    for pass in 0..2 {
        if pass == 1 {
            std::thread::sleep(Duration::from_secs(6));
        }
        assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM", "pass {pass}");
        assert_eq!(connect(&w.web, "127.0.0.1", moved_port), "allowed");
    }
    w.agent.write_policy(&kept);
    w.agent.try_cli(&["policy", "reload"]).expect("reload");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");
    assert_eq!(connect(&w.web, "127.0.0.1", moved_port), "EPERM");

    // Dropped: WEB keeps only the wildcard.
    let dropped = policy(w.port(), "").replacen(
        "to = [\"api.test.example\", \"*.svc.test.example\"]",
        "to = [\"*.svc.test.example\"]",
        1,
    );
    assert_ne!(dropped, policy(w.port(), ""));
    w.agent.write_policy(&dropped);
    w.agent.try_cli(&["policy", "reload"]).expect("reload");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
    let refused = w.asks(&w.web).dig(&DigQuery::new("api.test.example"));
    assert_eq!(refused.status.as_deref(), Some("NXDOMAIN"), "{refused:?}");
}

// 12. Learned addresses live in the kernel on the kernel's clock: they
// stay open while the agent is stopped (SIGTERM; programs and maps stay
// pinned) and after it starts again, and lookups work again once it is
// back.
#[test]
fn learned_addresses_survive_an_agent_restart() {
    require_dns_tools!();
    let mut w = World::start("dnsp-restart", "", "allow", "");
    let a = w.asks(&w.web).dig(&DigQuery::new("api.test.example"));
    assert_eq!(a.addrs, [lo(1)], "{a:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");

    w.agent.stop(Signal::SIGTERM);
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");
    assert_eq!(w.tcp(&w.web, "127.0.0.11"), "EPERM");
    // While it is down, a lookup fails at once (EPERM: no listener, so
    // the kernel does not redirect), not after the client's timeout.
    let down = w.asks(&w.web).dig(&DigQuery::new("other.svc.test.example"));
    assert!(down.addrs.is_empty(), "{down:?}");
    assert!(
        down.run.stdout.contains("permission denied") && down.run.elapsed < Duration::from_secs(1),
        "{down:?}"
    );

    w.agent.spawn();
    w.agent.wait_ready();
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");
    let back = wait_for(
        "a lookup after the restart",
        Duration::from_secs(10),
        || {
            let d = w.asks(&w.web).dig(&DigQuery::new("other.svc.test.example"));
            (d.status.as_deref() == Some("NOERROR")).then_some(d)
        },
    );
    assert_eq!(back.addrs, [lo(11)], "{back:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.11"), "allowed");
    // The restarted agent still names the name learned before it.
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");
    w.record("a connect by the name learned before the restart", |e| {
        e["verdict"] == "allow" && e["dst_name"] == "api.test.example" && e["hook"] != "dns"
    });
}

// 13. Malformed input through the redirect (garbage, empty, truncated,
// a response, TCP cut short) from a workload: no answer says NOERROR,
// nothing is learned, and the agent answers a good query after.
#[test]
fn malformed_queries_crash_nothing_and_learn_nothing() {
    require_dns_tools!();
    let w = World::start("dnsp-malformed", "", "allow", "");
    let script = r#"
name = sys.argv[2]
q = query(name, 0x4242)
response = bytearray(q)
response[2] |= 0x80
two = bytearray(q)
two[5] = 2
cases = [
    ('garbage', b'\xde\xad\xbe\xef' * 5),
    ('empty', b''),
    ('tiny', b'\x12'),
    ('header-only', q[:12]),
    ('truncated', q[:-3]),
    ('cut-name', q[:18]),
    ('response', bytes(response)),
    ('two-questions', bytes(two)),
    ('huge-label', q[:12] + b'\x3f' + b'a' * 10),
]
for tag, payload in cases:
    print(tag, ask(payload))
for body in [struct.pack('>H', 300) + b'hello', struct.pack('>H', len(q) - 3) + q[:-3], b'\x00']:
    t = socket.create_connection((server, 53), timeout=2)
    t.sendall(body)
    t.shutdown(socket.SHUT_WR)
    t.settimeout(2)
    try:
        got = t.recv(4096)
        print('tcp', len(got))
    except OSError as e:
        print('tcp', e)
    t.close()
"#;
    let run = python(&w.web, script, &["192.0.2.53", "api.test.example"]);
    eprintln!("{}{}", run.stdout, run.stderr);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout.lines().count(), 12, "{run:?}");
    for line in run.stdout.lines() {
        assert!(
            !line.contains("rcode=0 "),
            "answered as a good query: {line}"
        );
        assert!(!line.contains("send "), "the send failed: {line}");
    }
    // Each was FORMERR or unanswered, and nothing was learned.
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
    assert!(w.agent.try_cli(&["status"]).is_ok());
    let good = w.asks(&w.web).dig(&DigQuery::new("other.svc.test.example"));
    assert_eq!(good.addrs, [lo(11)], "{good:?}");
    assert_eq!(w.tcp(&w.web, "127.0.0.11"), "allowed");
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");
}

// 14. IPv6 nameservers: a query to `::1` (where a real server could
// listen) is EPERM at the send and recorded `dns_v6`, and never reaches
// the server; a dual-stack socket sending to an IPv4-mapped nameserver
// goes through the agent and learns.
#[test]
fn an_ipv6_nameserver_is_denied_and_a_mapped_one_works() {
    require_dns_tools!();
    let w = World::start("dnsp-v6", "", "allow", "");
    // A server on [::1]:53 if the port is free: it must see nothing.
    let catcher = std::net::UdpSocket::bind("[::1]:53").ok();
    let dig = w
        .asks(&w.web)
        .dig(&DigQuery::new("api.test.example").server("[::1]:53".parse().unwrap()));
    assert!(dig.status.is_none() && dig.addrs.is_empty(), "{dig:?}");
    assert!(dig.run.elapsed < Duration::from_secs(2), "{dig:?}");
    assert_eq!(probe(Some(&w.web), "udp-sendto", "[::1]:53"), "EPERM");
    assert_eq!(probe(Some(&w.web), "tcp", "[::1]:53"), "EPERM");
    assert_eq!(
        probe(Some(&w.web), "udp-sendto", "[2001:4860:4860::8888]:53"),
        "EPERM"
    );
    w.record("the dns_v6 denial", |e| {
        e["identity"] == WEB && e["reason"] == "dns_v6" && e["dst_addr"] == "::1"
    });
    if let Some(c) = &catcher {
        c.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 512];
        assert!(c.recv_from(&mut buf).is_err(), "a query reached [::1]:53");
    } else {
        eprintln!("[::1]:53 is taken here: not checked that nothing reached it");
    }
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "EPERM");

    // The IPv4-mapped form of an IPv4 nameserver on a dual-stack socket.
    let script = r#"
print(ask(query(sys.argv[2], 0x5151), socket.AF_INET6, '::ffff:' + server))
"#;
    let run = python(&w.web, script, &["192.0.2.53", "api.test.example"]);
    assert_eq!(
        run.stdout.trim(),
        "rcode=0 an=1 from=::ffff:192.0.2.53",
        "{run:?}"
    );
    assert_eq!(w.tcp(&w.web, "127.0.0.1"), "allowed");
}

// 15. A workload in a network namespace of its own (a pod: a long-lived
// process first): the agent opens listeners inside it, so dig and
// getent there resolve through the agent (the upstream on the host
// side); the address opens for that identity only, also inside; the
// listeners close when the namespace's processes are gone.
#[test]
fn a_workload_in_its_own_network_namespace_resolves_through_the_agent() {
    require_dns_tools!();
    let w = World::start("dnsp-netns", "", "allow", "");
    let ns = NetNs::new();
    // The pod's first process, in WEB's cgroup inside the namespace.
    let pause = Reaped(
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$1\" sleep 60")
            .arg(&w.web)
            .arg(ns.name())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sleep"),
    );
    let inside = |cgroup: &Path| {
        Resolver::new(&[NOWHERE])
            .in_netns(ns.name())
            .in_cgroup(cgroup)
    };
    // Until the listeners open, a query fails at once (EPERM); then it is
    // answered.
    let first = wait_for(
        "a lookup inside the namespace",
        Duration::from_secs(10),
        || {
            let d = inside(&w.web).dig(&DigQuery::new("other.svc.test.example").arg("+time=1"));
            (d.status.as_deref() == Some("NOERROR")).then_some(d)
        },
    );
    assert_eq!(first.addrs, [lo(11)], "{first:?}");
    let glibc = inside(&w.web).getent("api.test.example");
    assert!(glibc.ok() && glibc.addrs.contains(&lo(1)), "{glibc:?}");
    let musl = inside(&w.web).musl("two.svc.test.example");
    assert!(musl.ok() && musl.addrs.contains(&lo(21)), "{musl:?}");
    // The upstream was asked from the host's namespace (the agent).
    let from: Vec<String> = w.upstream.queries().into_iter().map(|q| q.from).collect();
    assert!(!from.iter().any(|f| *f == ns.ns_ip.to_string()), "{from:?}");

    // Connects from inside the namespace.
    let probe_in = |cgroup: &Path, to: &str| -> String {
        // `ip netns exec` mounts a sysfs of the namespace's own, without
        // the cgroup mount: the probe joins the cgroup before it.
        let out = Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$@\"")
            .arg(cgroup)
            .arg(ns.name())
            .arg(target_bin("idgate-probe"))
            .args(["tcp", to])
            .output()
            .expect("run idgate-probe");
        assert!(out.status.success(), "{out:?}");
        match String::from_utf8_lossy(&out.stdout).trim() {
            "ok" | "ECONNREFUSED" => "allowed".into(),
            other => other.into(),
        }
    };
    let port = w.port();
    assert_eq!(probe_in(&w.web, &format!("127.0.0.1:{port}")), "allowed");
    assert_eq!(probe_in(&w.web, &format!("127.0.0.11:{port}")), "allowed");
    assert_eq!(probe_in(&w.web, &format!("127.0.0.9:{port}")), "EPERM");
    // Another identity in the same namespace, without a lookup: denied.
    assert_eq!(probe_in(&w.other, &format!("127.0.0.11:{port}")), "EPERM");
    assert_eq!(probe_in(&w.other, &format!("127.0.0.1:{port}")), "EPERM");

    // The pod goes: its namespace's listeners close.
    drop(pause);
    wait_for(
        "the namespace's listeners to close",
        Duration::from_secs(10),
        || {
            w.agent
                .log()
                .contains("DNS listeners closed: no workload left in the network namespace")
                .then_some(())
        },
    );
}
