//! The DNS path end to end: the real agent redirects real clients'
//! lookups (dig, glibc's getaddrinfo, a musl-built client, c-ares through
//! pycares) to its
//! resolver, which forwards them to Debian's dnsmasq and puts the answers'
//! addresses in the kernel for the asking identity only; connects by real
//! processes in real cgroups show what that opens, and for whom.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use idgate_tests::WEB;
use idgate_tests::dns::{
    DigQuery, DnsServer, NOWHERE, OTHER, Resolver, Zone, audit, connect, dns_config, loopback_ip,
    web_and_other,
};
use idgate_tests::{
    Agent, Cgroups, Listeners, assert_schema, events_schema, free_port, metric, probe, python,
    require_privileges, require_tools, scrape, wait_for,
};

/// Policy: WEB may reach `api.test.example` and names under
/// `svc.test.example` on the TCP port, and is denied 127.0.0.3 outright;
/// OTHER may reach nothing.
/// The test zone answers with loopback addresses, which the DNS path
/// learns only when told to.
const ALLOW_PRIVATE: &str = "private_answers = \"allow\"";

fn policy(tcp_port: u16) -> String {
    format!(
        r#"
[[identity]]
id = "{WEB}"
[[identity.egress]]
name = "api"
to = ["api.test.example", "*.svc.test.example"]
ports = [{tcp_port}]
protocol = "tcp"
action = "allow"
[[identity.egress]]
name = "no-db"
to = ["127.0.0.3/32"]
action = "deny"

[[identity]]
id = "{OTHER}"
default = "deny"
"#
    )
}

/// Forty addresses: an answer over 512 bytes, more than a client without
/// EDNS takes over UDP.
fn big() -> Vec<IpAddr> {
    (0..40)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
        .collect()
}

fn zone() -> Zone {
    let lo = |d: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, d));
    Zone::new()
        .host("api.test.example", &[lo(1)], 300)
        .host("many.svc.test.example", &[lo(1), lo(4), lo(5), lo(6)], 300)
        .host("db.svc.test.example", &[lo(3)], 300)
        .host("blink.svc.test.example", &[lo(7)], 0)
        .host("target.elsewhere.example", &[lo(8)], 300)
        .cname("alias.svc.test.example", "target.elsewhere.example", 300)
        .host("secret.test.example", &[lo(9)], 300)
        .host("big.svc.test.example", &big(), 300)
        .nxdomain("test.example")
}

#[test]
fn a_name_opens_its_addresses_for_the_asking_identity_only() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "getent", "musl-gcc", "unshare");
    if python::env().is_none() {
        return;
    }
    let listeners = Listeners::new();
    let port = listeners.tcp_port;
    let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone());
    let mut cg = Cgroups::new("dns-names");
    let web = cg.inside("web");
    let other = cg.inside("other");
    let log = std::env::temp_dir().join(format!("{}-audit.jsonl", cg.name()));
    let _ = std::fs::remove_file(&log);
    let metrics_port = free_port();
    let agent = Agent::start(
        &cg,
        &policy(port),
        &format!(
            "{}{}[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n",
            web_and_other(),
            dns_config(upstream.addr(), &log, ALLOW_PRIVATE)
        ),
    );
    // A resolv.conf naming NOWHERE, for a client in a cgroup.
    let asks = |cgroup: &Path| Resolver::new(&[NOWHERE]).in_cgroup(cgroup);

    // Nothing is open before a lookup, not even the name's address.
    assert_eq!(connect(&web, "127.0.0.1", port), "EPERM");

    // dig, as WEB: the agent answers (the server asked, 192.0.2.53, has
    // nothing listening), and then the address is open for WEB.
    let a = asks(&web).dig(&DigQuery::new("api.test.example"));
    assert_eq!(a.status.as_deref(), Some("NOERROR"), "{a:?}");
    assert_eq!(a.addrs, vec![IpAddr::from([127, 0, 0, 1])]);
    assert_eq!(connect(&web, "127.0.0.1", port), "allowed");
    assert!(upstream.was_queried("api.test.example"));

    // Another identity's connect stays denied: WEB's lookup opened
    // nothing for it. Its own lookup of a name its policy does not name
    // is refused, and dnsmasq never sees it.
    assert_eq!(connect(&other, "127.0.0.1", port), "EPERM");
    let refused = asks(&other).dig(&DigQuery::new("api.test.example"));
    assert_eq!(refused.status.as_deref(), Some("NXDOMAIN"), "{refused:?}");
    let secret = asks(&web).dig(&DigQuery::new("secret.test.example"));
    assert_eq!(secret.status.as_deref(), Some("NXDOMAIN"), "{secret:?}");
    assert!(!upstream.was_queried("secret.test.example"));
    assert_eq!(connect(&web, "127.0.0.9", port), "EPERM");

    // Case and a final dot are the same name; over TCP too.
    let upper = asks(&web).dig(&DigQuery::new("API.Test.Example.").tcp());
    assert_eq!(upper.status.as_deref(), Some("NOERROR"), "{upper:?}");

    // A wildcard, many addresses in one answer: every one is open.
    let many = asks(&web).dig(&DigQuery::new("many.svc.test.example"));
    assert_eq!(many.addrs.len(), 4, "{many:?}");
    for ip in ["127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        assert_eq!(connect(&web, ip, port), "allowed", "{ip}");
    }
    // Another port of a learned address is not in the rule.
    assert_eq!(connect(&web, "127.0.0.4", port + 1), "EPERM");

    // A CNAME chain out of the policy's names: the address the question
    // reaches is learned under the name asked.
    let alias = asks(&web).dig(&DigQuery::new("alias.svc.test.example"));
    assert_eq!(alias.addrs, vec![IpAddr::from([127, 0, 0, 8])], "{alias:?}");
    assert_eq!(connect(&web, "127.0.0.8", port), "allowed");

    // A deny rule for the address beats the name.
    let db = asks(&web).dig(&DigQuery::new("db.svc.test.example"));
    assert_eq!(db.addrs, vec![IpAddr::from([127, 0, 0, 3])], "{db:?}");
    assert_eq!(connect(&web, "127.0.0.3", port), "EPERM");

    // TTL 0: open for the grace (1 s) only, and closed by the kernel's
    // clock whatever the agent does.
    let blink = asks(&web).dig(&DigQuery::new("blink.svc.test.example"));
    assert_eq!(blink.addrs, vec![IpAddr::from([127, 0, 0, 7])], "{blink:?}");
    assert_eq!(blink.records.iter().map(|r| r.ttl).max(), Some(0));
    wait_for(
        "the TTL-0 address to close",
        Duration::from_secs(10),
        || (connect(&web, "127.0.0.7", port) == "EPERM").then_some(()),
    );

    // Asking another resolver directly is the same: the query goes to the
    // agent, not to 127.0.0.53.
    let direct = asks(&web)
        .dig(&DigQuery::new("api.test.example").server(SocketAddr::from(([127, 0, 0, 53], 53))));
    assert_eq!(direct.status.as_deref(), Some("NOERROR"), "{direct:?}");

    // An answer too large for UDP comes back truncated; the client asks
    // again over TCP (sent to the resolver too) and gets every address,
    // each open.
    let large = asks(&web).dig(&DigQuery::new("big.svc.test.example").arg("+noedns"));
    assert_eq!(large.addrs.len(), 40, "{large:?}");
    let large = asks(&web).getent("big.svc.test.example");
    assert!(large.ok() && large.addrs.len() >= 40, "{large:?}");
    assert_eq!(connect(&web, "127.0.1.39", port), "allowed");

    // glibc's getaddrinfo, a musl client and c-ares's getaddrinfo, through
    // the same path.
    let glibc = asks(&web).getent("api.test.example");
    assert!(
        glibc.ok() && glibc.addrs.contains(&IpAddr::from([127, 0, 0, 1])),
        "{glibc:?}"
    );
    let musl = asks(&web).musl("api.test.example");
    assert!(
        musl.ok() && musl.addrs.contains(&IpAddr::from([127, 0, 0, 1])),
        "{musl:?}"
    );
    let cares = asks(&web).cares("api.test.example");
    assert!(
        cares.ok() && cares.addrs == [IpAddr::from([127, 0, 0, 1])],
        "{cares:?}"
    );
    assert_eq!(connect(&web, "127.0.0.1", port), "allowed");

    // Workloads may not send to the resolver's range themselves.
    let reserved = probe(Some(&web), "udp-sendto", "127.53.0.1:53");
    assert_eq!(reserved, "EPERM");

    // `status` counts what WEB learned; `explain` answers for the name.
    let status = agent.status();
    let row = status["dns"]["identities"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["identity"] == WEB).cloned())
        .unwrap_or_else(|| panic!("no DNS row for {WEB}: {status}"));
    assert!(row["addresses"].as_u64() >= Some(6), "{row}");
    assert!(
        row["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "api.test.example")),
        "{row}"
    );
    let explained: serde_json::Value = serde_json::from_str(
        &agent
            .try_cli(&[
                "explain",
                "--identity",
                WEB,
                "--to",
                &format!("API.test.example:{port}"),
                "--json",
            ])
            .expect("explain a name"),
    )
    .expect("JSON");
    assert_eq!(explained["pattern"], "api.test.example", "{explained}");
    assert_eq!(explained["verdict"], "allow", "{explained}");
    assert_eq!(explained["learned"][0]["addr"], "127.0.0.1", "{explained}");
    assert_eq!(explained["learned"][0]["rule"], "api", "{explained}");
    let other_port: serde_json::Value = serde_json::from_str(
        &agent
            .try_cli(&[
                "explain",
                "--identity",
                WEB,
                "--to",
                &format!("127.0.0.1:{}", port + 1),
                "--json",
            ])
            .expect("explain an address"),
    )
    .expect("JSON");
    assert_eq!(other_port["verdict"], "deny", "{other_port}");

    // Metrics: the table and WEB's share of it (brought up to date with
    // every sweep, 5 s apart), and the queries among the decisions.
    let text = wait_for("the DNS metrics", Duration::from_secs(15), || {
        let text = scrape(metrics_port);
        let web = metric(
            &text,
            "idgate_dns_identity_learned_addresses",
            &format!("identity=\"{WEB}\""),
        )?;
        (web >= 6.0).then_some(text)
    });
    assert!(
        metric(&text, "idgate_dns_learned_addresses", "") >= Some(6.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "idgate_dns_learned_capacity", ""),
        Some(262_144.0)
    );
    assert!(text.contains("idgate_dns_learn_seconds_count"), "{text}");

    // Records: the refused query and the connect by name.
    let events = wait_for("the decision records", Duration::from_secs(10), || {
        let e = audit(&log);
        let refused = e.iter().any(|e| {
            e["hook"] == "dns"
                && e["reason"] == "name_not_in_policy"
                && e["dst_name"] == "secret.test.example"
        });
        let by_name = e.iter().any(|e| {
            e["verdict"] == "allow" && e["dst_name"] == "api.test.example" && e["rule"] == "api"
        });
        (refused && by_name).then_some(e)
    });
    assert!(
        events
            .iter()
            .any(|e| e["identity"] == OTHER && e["reason"] == "name_not_in_policy")
    );
    // Every record, the DNS path's among them, follows the documented schema.
    let schema = events_schema();
    for e in &events {
        assert_schema(&schema, e);
    }
}

/// A planned restart (`idgate restart`) hands the resolver's sockets to
/// the new agent: lookups made all through it succeed. A crash closes
/// them: a lookup then fails at once (EPERM, not a timeout), and works
/// again once an agent is back. Learned addresses stay open throughout.
#[test]
fn restarts_keep_lookups_working_and_a_crash_fails_them_fast() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "musl-gcc", "unshare");
    let listeners = Listeners::new();
    let port = listeners.tcp_port;
    let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone());
    let mut cg = Cgroups::new("dns-restart");
    let web = cg.inside("web");
    cg.inside("other");
    let log = std::env::temp_dir().join(format!("{}-audit.jsonl", cg.name()));
    let mut agent = Agent::start(
        &cg,
        &policy(port),
        &format!(
            "{}{}",
            web_and_other(),
            dns_config(upstream.addr(), &log, ALLOW_PRIVATE)
        ),
    );
    let asks = |cgroup: &Path| Resolver::new(&[NOWHERE]).in_cgroup(cgroup);
    let first = asks(&web).dig(&DigQuery::new("api.test.example"));
    assert_eq!(first.status.as_deref(), Some("NOERROR"), "{first:?}");

    // Lookups while the agent executes itself again: every one answered.
    let looking = {
        let web = web.clone();
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            let started = std::time::Instant::now();
            let mut n = 0;
            while n < 60 && started.elapsed() < Duration::from_secs(30) {
                let a = Resolver::new(&[NOWHERE])
                    .in_cgroup(&web)
                    .dig(&DigQuery::new("api.test.example"));
                if a.status.as_deref() != Some("NOERROR") {
                    failed.push(format!("{a:?}"));
                }
                n += 1;
            }
            (n, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let restarted = agent.try_cli(&["restart"]).expect("idgate restart");
    assert!(restarted.contains("restarted"), "{restarted}");
    let (made, failed) = looking.join().expect("lookups");
    assert!(made >= 10, "only {made} lookups made");
    assert!(
        failed.is_empty(),
        "{} of {made} lookups failed over the restart: {failed:?}",
        failed.len()
    );
    assert!(
        agent.log().contains("taken over from the previous agent"),
        "{}",
        agent.log()
    );
    assert_eq!(connect(&web, "127.0.0.1", port), "allowed");

    // A crash: the sockets close with the process, and the kernel's socket
    // hash with them, so the send fails (EPERM) and glibc gives up at
    // once. (musl ignores a failed send and waits out its timeout.) The
    // learned address stays open meanwhile.
    agent.stop(nix::sys::signal::Signal::SIGKILL);
    let down = asks(&web).getent("api.test.example");
    assert!(!down.ok(), "{down:?}");
    assert!(
        down.run.elapsed < Duration::from_secs(1),
        "the lookup waited {:?}: {down:?}",
        down.run.elapsed
    );
    assert_eq!(connect(&web, "127.0.0.1", port), "allowed");
    agent.spawn();
    agent.wait_ready();
    let back = asks(&web).musl("api.test.example");
    assert!(back.ok(), "{back:?}");
}

/// `[dns] direct`: a resolver run in the scope keeps its own DNS. Its
/// queries are not sent to the agent; its address rules judge them like
/// any other send.
#[test]
fn a_direct_identity_s_dns_is_judged_by_its_address_rules() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "unshare");
    let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone());
    let mut cg = Cgroups::new("dns-direct");
    cg.inside("web");
    let other = cg.inside("other");
    let log = std::env::temp_dir().join(format!("{}-audit.jsonl", cg.name()));
    let policy = format!(
        "{}\n[[identity.egress]]\nname = \"own-dns\"\nto = [\"{}/32\"]\nports = [53]\nprotocol = \"udp\"\naction = \"allow\"\n",
        policy(9),
        upstream.addr().ip()
    );
    let _agent = Agent::start(
        &cg,
        &policy,
        &format!(
            "{}{}",
            web_and_other(),
            dns_config(
                upstream.addr(),
                &log,
                &format!("{ALLOW_PRIVATE}\ndirect = [\"{OTHER}\"]")
            )
        ),
    );
    // Its own resolver, by its address rule: answered by dnsmasq itself.
    let own = Resolver::new(&[upstream.addr().ip()])
        .in_cgroup(&other)
        .dig(&DigQuery::new("secret.test.example"));
    assert_eq!(own.status.as_deref(), Some("NOERROR"), "{own:?}");
    assert!(upstream.was_queried("secret.test.example"));
    // Any other server: denied in the kernel, not answered by the agent.
    let elsewhere = Resolver::new(&[NOWHERE])
        .in_cgroup(&other)
        .dig(&DigQuery::new("api.test.example"));
    assert_eq!(elsewhere.status, None, "{elsewhere:?}");
    assert!(!upstream.was_queried("api.test.example"));
}
