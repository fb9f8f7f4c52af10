//! Smoke tests of the DNS tests' servers and clients (tests/src/dns.rs),
//! without the agent: Debian's dnsmasq serves a test zone to dig, to
//! glibc's getaddrinfo (`getent ahosts`), to musl's and to c-ares's
//! (pycares), each run with a resolv.conf of the test's in a private
//! mount namespace; and what each
//! client asks, and which rcode sends it on to its next search domain,
//! measured for the agent's DNS path.

use std::net::{IpAddr, SocketAddr};

use idgate_tests::dns::{
    DNS_TOOLS, DigQuery, DnsServer, NetNs, RcodeServer, Resolver, ResponseCode, Zone, loopback_ip,
};
use idgate_tests::{Cgroups, free_loopback_port, python, require_privileges, require_tools};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The zone every test serves.
fn zone() -> Zone {
    let many: Vec<IpAddr> = (1..=12)
        .map(|i| ip(&format!("192.0.2.{}", 100 + i)))
        .collect();
    Zone::new()
        .host("web.test", &[ip("192.0.2.10"), ip("2001:db8::10")], 300)
        .host("many.test", &many, 60)
        .host("zero.test", &[ip("192.0.2.11")], 0)
        .host("private.test", &[ip("10.1.2.3"), ip("192.168.7.8")], 30)
        .cname("alias.test", "hop.test", 120)
        .cname("hop.test", "web.test", 90)
        .nxdomain("nx.test")
}

#[test]
fn dnsmasq_serves_the_zone_to_dig_over_udp_and_tcp() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "unshare");
    let server = DnsServer::start(
        SocketAddr::new(ip("127.0.0.1"), free_loopback_port()),
        &zone(),
    );
    let r = Resolver::new(&[]);
    for tcp in [false, true] {
        let q = |name: &str| {
            let q = DigQuery::new(name).server(server.addr());
            if tcp { q.tcp() } else { q }
        };
        let a = r.dig(&q("web.test"));
        assert_eq!(a.status.as_deref(), Some("NOERROR"), "{a:?}");
        assert_eq!(a.addrs, [ip("192.0.2.10")]);
        assert_eq!(a.records[0].ttl, 300);
        let aaaa = r.dig(&q("web.test").qtype("AAAA"));
        assert_eq!(aaaa.addrs, [ip("2001:db8::10")], "{aaaa:?}");
        let many = r.dig(&q("many.test"));
        assert_eq!(many.addrs.len(), 12, "{many:?}");
        let private = r.dig(&q("private.test"));
        let mut got = private.addrs.clone();
        got.sort();
        assert_eq!(got, [ip("10.1.2.3"), ip("192.168.7.8")]);
        // TTL 0 is served as 0.
        let zero = r.dig(&q("zero.test"));
        assert_eq!(zero.records.len(), 1, "{zero:?}");
        assert_eq!(zero.records[0].ttl, 0);
        // The CNAME chain comes whole in one answer, each with its TTL.
        let chain = r.dig(&q("alias.test"));
        let seen: Vec<(&str, u32, &str, &str)> = chain
            .records
            .iter()
            .map(|r| (r.name.as_str(), r.ttl, r.rtype.as_str(), r.data.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("alias.test.", 120, "CNAME", "hop.test."),
                ("hop.test.", 90, "CNAME", "web.test."),
                ("web.test.", 300, "A", "192.0.2.10"),
            ]
        );
        // Under an --address=/nx.test/ domain: NXDOMAIN; elsewhere
        // (no upstream): REFUSED.
        let nx = r.dig(&q("gone.nx.test"));
        assert_eq!(nx.status.as_deref(), Some("NXDOMAIN"));
        let refused = r.dig(&q("elsewhere.example"));
        assert_eq!(refused.status.as_deref(), Some("REFUSED"));
    }
    assert!(server.was_queried("alias.test"));
    assert!(!server.was_queried("never.test"));
    let q = server.queries();
    assert!(
        q.iter().any(|q| q.qtype == "AAAA" && q.name == "web.test"),
        "{q:?}"
    );
}

#[test]
fn glibc_and_musl_resolve_with_a_private_resolv_conf() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "getent", "musl-gcc", "unshare");
    let host_conf = std::fs::read("/etc/resolv.conf").ok();
    let host_nss = std::fs::read("/etc/nsswitch.conf").ok();
    let server = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone());
    let r = Resolver::new(&[server.addr().ip()]);

    let glibc = r.getent("web.test");
    assert!(glibc.ok(), "{glibc:?}");
    let mut got = glibc.addrs.clone();
    got.sort();
    assert_eq!(got, [ip("192.0.2.10"), ip("2001:db8::10")], "{glibc:?}");
    let musl = r.musl("web.test");
    assert!(musl.ok(), "{musl:?}");
    let mut got = musl.addrs.clone();
    got.sort();
    assert_eq!(got, [ip("192.0.2.10"), ip("2001:db8::10")], "{musl:?}");
    assert_eq!(r.musl_family("many.test", false).addrs.len(), 12);
    assert_eq!(r.getent_family("many.test", false).addrs.len(), 12);
    let chain = r.musl("alias.test");
    assert_eq!(chain.addrs, [ip("192.0.2.10"), ip("2001:db8::10")]);
    // dig without @server reads the private resolv.conf too.
    assert_eq!(r.dig(&DigQuery::new("web.test")).addrs, [ip("192.0.2.10")]);

    // Not found: getent exits 2; musl says EAI_NONAME (NXDOMAIN).
    let nx = r.getent("gone.nx.test");
    assert_eq!(nx.code, Some(2), "{nx:?}");
    let nx = r.musl("gone.nx.test");
    assert_eq!(nx.error.as_deref(), Some("EAI_NONAME"), "{nx:?}");

    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_conf);
    assert_eq!(std::fs::read("/etc/nsswitch.conf").ok(), host_nss);
}

/// The queries each client sends for a fully qualified name of two
/// labels (`web.test`, fewer dots than ndots:5) with a Kubernetes pod's
/// resolv.conf, the search domains answered NXDOMAIN (as a cluster DNS
/// does), as dnsmasq logged them. All three walk the whole search list
/// first, then ask the name as given:
///
/// - glibc 2.36 (`getent ahosts`): for each name A, then AAAA:
///   `web.test.ns.svc.cluster.local`,
///   `web.test.svc.cluster.local`, `web.test.cluster.local`, `web.test`.
/// - musl 1.2.3: the same names in the same order, A and AAAA each.
/// - dig 9.18 `+search`: A only, the same order.
/// - c-ares 1.34.5 (pycares 4.11.0, getaddrinfo AF_UNSPEC): the same
///   names in the same order, A and AAAA each.
///
/// A name with a final dot (`web.test.`) skips the search list (glibc
/// and musl checked).
#[test]
fn a_kubernetes_resolv_conf_walks_the_search_list_before_the_name() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "getent", "musl-gcc", "unshare");
    if python::env().is_none() {
        return;
    }
    let server = DnsServer::start(
        SocketAddr::new(loopback_ip(), 53),
        &zone().nxdomain("cluster.local"),
    );
    let r = Resolver::kubernetes(&[server.addr().ip()], "ns");
    let walk = [
        "web.test.ns.svc.cluster.local",
        "web.test.svc.cluster.local",
        "web.test.cluster.local",
        "web.test",
    ];
    for client in ["glibc", "musl", "dig", "cares"] {
        let before = server.queries().len();
        let addrs = match client {
            "glibc" => r.getent("web.test").addrs,
            "musl" => r.musl("web.test").addrs,
            "cares" => r.cares("web.test").addrs,
            _ => r.dig(&DigQuery::new("web.test").search()).addrs,
        };
        assert!(addrs.contains(&ip("192.0.2.10")), "{client}: {addrs:?}");
        let sent: Vec<_> = server.queries()[before..].to_vec();
        eprintln!(
            "{client}: {:?}",
            sent.iter()
                .map(|q| format!("{} {}", q.qtype, q.name))
                .collect::<Vec<_>>()
        );
        let mut names: Vec<&str> = sent.iter().map(|q| q.name.as_str()).collect();
        names.dedup();
        assert_eq!(names, walk, "{client}");
        let types: Vec<&str> = sent.iter().map(|q| q.qtype.as_str()).collect();
        if client == "dig" {
            assert!(types.iter().all(|t| *t == "A"), "{types:?}");
        } else {
            assert!(types.contains(&"AAAA"), "{client}: {types:?}");
        }
    }
    // The final dot skips the search list.
    let before = server.queries().len();
    assert!(r.getent("web.test.").ok());
    assert!(r.musl("web.test.").ok());
    assert!(r.cares("web.test.").ok());
    let sent = server.queries()[before..].to_vec();
    assert!(sent.iter().all(|q| q.name == "web.test"), "{sent:?}");
}

/// What one client does when its search domains are answered `rcode`.
#[derive(Debug, PartialEq)]
struct Outcome {
    resolved: bool,
    /// The names it asked, in order, each once.
    asked: Vec<String>,
}

/// Which rcode makes each client go on to its next search domain (and
/// finally resolve the name), and which stops it. Measured with the
/// search domains answered `rcode` (no records, RA set, no SOA) by an
/// [`RcodeServer`] in front of dnsmasq, which serves the name itself
/// (one nameserver, `options ndots:5 timeout:2 attempts:1`), for
/// `web.test` (fewer dots than ndots, so the search list comes first):
///
/// | rcode for `*.cluster.local` | glibc 2.36 (`getent ahosts`) | musl 1.2.3 | dig 9.18 `+search` | c-ares 1.34.5 (pycares 4.11.0 getaddrinfo) |
/// |---|---|---|---|---|
/// | NXDOMAIN | next domain ... name as given: resolves | same: resolves | same: resolves | same: resolves |
/// | NOERROR, no records | next domain ... resolves | stops: EAI_NONAME | stops: NOERROR, no address | next domain ... resolves |
/// | SERVFAIL | next domain ... resolves | stops: EAI_AGAIN after its timeout (2 s) | stops: SERVFAIL | stops at once: ARES_ESERVFAIL |
/// | REFUSED | skips the other domains, asks the name as given: resolves | stops: EAI_AGAIN after its timeout (2 s) | stops: REFUSED | stops at once: ARES_EREFUSED |
///
/// So NXDOMAIN is the only answer, for a name policy does not cover,
/// that lets every client go on through its search list to the name.
/// c-ares goes on after NXDOMAIN and after NOERROR without records
/// (ARES_ENOTFOUND and ARES_ENODATA both mean "next domain" to its
/// getaddrinfo), and stops its whole lookup on SERVFAIL or REFUSED for a
/// name of more than one label (it goes on after those only for a
/// single-label name, a case for systemd-resolved): the agent's NXDOMAIN
/// moves it on as it does the others.
/// Musl ignores REFUSED (it waits for another server's answer, then its
/// timeout), and SERVFAIL costs it its timeout too: either stalls a musl
/// client for `timeout` seconds (5 by default) before it fails.
#[test]
fn which_rcode_sends_each_client_to_its_next_search_domain() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "getent", "musl-gcc", "unshare");
    if python::env().is_none() {
        return;
    }
    let upstream = DnsServer::start(
        SocketAddr::new(ip("127.0.0.1"), free_loopback_port()),
        &zone(),
    );
    let cases = [
        ResponseCode::NXDomain,
        ResponseCode::NoError,
        ResponseCode::ServFail,
        ResponseCode::Refused,
    ];
    let mut table = Vec::new();
    for rcode in cases {
        let front = RcodeServer::start(
            SocketAddr::new(loopback_ip(), 53),
            upstream.addr(),
            rcode,
            &["cluster.local"],
        );
        let r = Resolver::kubernetes(&[front.addr().ip()], "ns");
        for client in ["glibc", "musl", "dig", "cares"] {
            let before = front.seen().len();
            let start = std::time::Instant::now();
            // The addresses, and how the client ended.
            let (addrs, end) = match client {
                "glibc" => {
                    let l = r.getent("web.test");
                    (l.addrs, format!("exit {:?}", l.code))
                }
                "musl" => {
                    let l = r.musl("web.test");
                    (l.addrs, format!("{:?}", l.error))
                }
                "cares" => {
                    let l = r.cares("web.test");
                    (l.addrs, format!("{:?} (exit {:?})", l.error, l.code))
                }
                _ => {
                    let d = r.dig(&DigQuery::new("web.test").search());
                    (d.addrs, format!("{:?}", d.status))
                }
            };
            let elapsed = start.elapsed();
            let mut asked: Vec<String> = front.seen()[before..]
                .iter()
                .map(|q| q.name.clone())
                .collect();
            asked.dedup();
            let outcome = Outcome {
                resolved: addrs.contains(&ip("192.0.2.10")),
                asked,
            };
            eprintln!("{rcode:?} {client}: {outcome:?}, {end} in {elapsed:?}");
            table.push((rcode, client, outcome, end, elapsed));
        }
    }
    let all = |n: usize| -> Vec<String> {
        [
            "web.test.ns.svc.cluster.local",
            "web.test.svc.cluster.local",
            "web.test.cluster.local",
            "web.test",
        ][..n]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    };
    let moves_on = Outcome {
        resolved: true,
        asked: all(4),
    };
    let stops = Outcome {
        resolved: false,
        asked: all(1),
    };
    // glibc on REFUSED leaves the search list and asks the name as given.
    let as_given = Outcome {
        resolved: true,
        asked: vec![all(1)[0].clone(), "web.test".into()],
    };
    let expected = |rcode: ResponseCode, client: &str| match (rcode, client) {
        (ResponseCode::NXDomain, _) => &moves_on,
        (ResponseCode::Refused, "glibc") => &as_given,
        (_, "glibc") => &moves_on,
        // c-ares takes an empty NOERROR as "next domain" too.
        (ResponseCode::NoError, "cares") => &moves_on,
        _ => &stops,
    };
    for (rcode, client, outcome, end, elapsed) in &table {
        assert_eq!(outcome, expected(*rcode, client), "{rcode:?} {client}");
        // c-ares stops on SERVFAIL and REFUSED with that error, without
        // waiting for a timeout.
        if *client == "cares" {
            let error = match rcode {
                ResponseCode::ServFail => "Some(\"ARES_ESERVFAIL\") (exit Some(4))",
                ResponseCode::Refused => "Some(\"ARES_EREFUSED\") (exit Some(5))",
                _ => "None (exit Some(0))",
            };
            assert_eq!(end, error, "{rcode:?} cares");
            assert!(
                *elapsed < std::time::Duration::from_secs(1),
                "{rcode:?} cares took {elapsed:?}"
            );
        }
    }
}

#[test]
fn a_client_in_a_network_namespace_resolves_through_dnsmasq_on_the_host() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "getent", "musl-gcc", "unshare", "ip");
    let ns = NetNs::new();
    let server = DnsServer::start(SocketAddr::new(IpAddr::V4(ns.host_ip), 53), &zone());
    let r = Resolver::new(&[IpAddr::V4(ns.host_ip)]).in_netns(ns.name());
    let glibc = r.getent("web.test");
    assert!(glibc.ok(), "{glibc:?}");
    let musl = r.musl("web.test");
    assert!(musl.addrs.contains(&ip("192.0.2.10")), "{musl:?}");
    let dig = r.dig(&DigQuery::new("web.test"));
    assert_eq!(dig.addrs, [ip("192.0.2.10")], "{dig:?}");
    // Each came from the namespace's end of the pair.
    let from = ns.ns_ip.to_string();
    let q = server.queries();
    assert!(!q.is_empty() && q.iter().all(|q| q.from == from), "{q:?}");

    // And dnsmasq inside the namespace, asked from the host.
    let inner = DnsServer::start_in_netns(
        ns.name(),
        SocketAddr::new(IpAddr::V4(ns.ns_ip), 53),
        &zone(),
    );
    let host = Resolver::new(&[]);
    let a = host.dig(&DigQuery::new("zero.test").server(inner.addr()));
    assert_eq!(a.addrs, [ip("192.0.2.11")], "{a:?}");
}

#[test]
fn clients_run_in_the_cgroup_given() {
    require_privileges!();
    require_tools!(DNS_TOOLS[4]);
    let mut cg = Cgroups::new("dns-cg");
    let dir = cg.inside("client");
    let r = Resolver::new(&[]).in_cgroup(&dir);
    let run = r.run("cat", &["/proc/self/cgroup"]);
    let want = format!("0::/{}/client", cg.scope_rel());
    assert!(run.stdout.lines().any(|l| l == want), "{run:?}");
    // And it saw the private resolv.conf.
    let conf = r.run("cat", &["/etc/resolv.conf"]);
    assert_eq!(conf.stdout, r.resolv_conf());
}
