//! The foundation's end-to-end tests: the real agent loads the real
//! programs onto a real scope cgroup; a real process in a real cgroup makes
//! real connects and sends, and the test asserts what the kernel answered.
//!
//! "Allowed" is shown by `ok` (a listener accepted) or `ECONNREFUSED` (the
//! kernel let the connect through to a closed port); "denied" by `EPERM`.

use idgate_tests::{Agent, Cgroups, Fixture, PINNED_LINKS, WEB, probe, require_privileges};
use nix::sys::signal::Signal;

/// The shared fixture's policy, and UDP to 127.0.0.1 at the UDP port.
fn policy(f: &Fixture) -> String {
    f.policy(&format!(
        r#"
        [[identity.egress]]
        name = "udp-local"
        to = ["127.0.0.1/32"]
        ports = [{}]
        protocol = "udp"
        action = "allow"
        "#,
        f.udp_port
    ))
}

fn web_binding() -> String {
    format!("[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n")
}

#[test]
fn tcp_and_udp_over_v4_v6_and_mapped_v6_are_judged_by_policy() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("families");
    let web = cg.inside("web");
    let _agent = Agent::start(&cg, &policy(&f), &web_binding());
    let (t, u) = (f.tcp_port, f.udp_port);
    let web = Some(web.as_path());

    // TCP, IPv4: the allowed address and port connect; another port or
    // another loopback address is denied.
    assert_eq!(probe(web, "tcp", &f.tcp4()), "ok");
    assert_eq!(probe(web, "tcp", &format!("127.0.0.1:{}", t + 1)), "EPERM");
    assert_eq!(probe(web, "tcp", &format!("127.0.0.2:{t}")), "EPERM");
    // TCP, IPv6.
    assert_eq!(probe(web, "tcp", &format!("[::1]:{t}")), "ok");
    assert_eq!(probe(web, "tcp", &format!("[::1]:{}", t + 1)), "EPERM");
    // IPv4-mapped IPv6 on an AF_INET6 socket is judged by the IPv4 rules.
    assert_eq!(probe(web, "tcp", &format!("[::ffff:127.0.0.1]:{t}")), "ok");
    assert_eq!(
        probe(web, "tcp", &format!("[::ffff:127.0.0.2]:{t}")),
        "EPERM"
    );
    // UDP without connect (sendmsg hook) and with connect (connect hook).
    assert_eq!(probe(web, "udp-sendto", &format!("127.0.0.1:{u}")), "ok");
    assert_eq!(
        probe(web, "udp-sendto", &format!("127.0.0.1:{}", u + 1)),
        "EPERM"
    );
    assert_eq!(probe(web, "udp-connect", &format!("127.0.0.1:{u}")), "ok");
    assert_eq!(
        probe(web, "udp-connect", &format!("127.0.0.2:{u}")),
        "EPERM"
    );
    // TCP rules do not open UDP, and the other way round.
    assert_eq!(probe(web, "udp-sendto", &f.tcp4()), "EPERM");
    assert_eq!(probe(web, "tcp", &format!("127.0.0.1:{u}")), "EPERM");
    assert_eq!(
        probe(web, "udp-sendto", &format!("[::ffff:127.0.0.1]:{u}")),
        "ok"
    );
    assert_eq!(probe(web, "udp-sendto", &format!("[::1]:{u}")), "EPERM");
}

#[test]
fn mapped_v6_is_never_let_through_by_v6_rules() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("mapped");
    let web = cg.inside("web");
    // Everything over IPv6 is allowed, nothing over IPv4.
    let policy = format!(
        "[[identity]]\nid = \"{WEB}\"\n[[identity.egress]]\nname = \"v6\"\nto = [\"::/0\"]\naction = \"allow\"\n"
    );
    let _agent = Agent::start(&cg, &policy, &web_binding());
    let web = Some(web.as_path());
    assert_eq!(probe(web, "tcp", &format!("[::1]:{}", f.tcp_port)), "ok");
    assert_eq!(
        probe(web, "tcp", &format!("[::ffff:127.0.0.1]:{}", f.tcp_port)),
        "EPERM"
    );
    assert_eq!(probe(web, "tcp", &f.tcp4()), "EPERM");
}

#[test]
fn unknown_cgroups_are_denied_and_cgroups_outside_the_scope_are_untouched() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("unknown");
    cg.inside("web");
    let stranger = cg.inside("stranger");
    let outside = cg.outside("outside");
    let scope = cg.scope_dir();
    let _agent = Agent::start(&cg, &policy(&f), &web_binding());
    for dir in [stranger.as_path(), scope.as_path()] {
        assert_eq!(
            probe(Some(dir), "tcp", &f.tcp4()),
            "EPERM",
            "{}",
            dir.display()
        );
        assert_eq!(
            probe(
                Some(dir),
                "udp-sendto",
                &format!("127.0.0.1:{}", f.udp_port)
            ),
            "EPERM"
        );
    }
    // Outside the scope no program runs: even a destination no policy
    // allows is reached.
    assert_eq!(probe(Some(&outside), "tcp", &f.tcp4()), "ok");
    assert_eq!(
        probe(Some(&outside), "tcp", &format!("127.0.0.2:{}", f.tcp_port)),
        "ECONNREFUSED"
    );
}

/// A destination entry holds a port list of up to four ranges itself
/// (`INLINE_RANGES` in idgate-common); a longer list is looked up in the
/// port trie. Both must judge every port alike: allowed exactly in the
/// list, whatever its length and whichever of its ranges the port is in.
#[test]
fn short_and_long_port_lists_judge_every_port_alike() {
    require_privileges!();
    let f = Fixture::new();
    let base = f.udp_port.min(u16::MAX - 16);
    let (short, long) = (
        [base, base + 2, base + 4, base + 6],
        [base, base + 2, base + 4, base + 6, base + 8],
    );
    // (address, ports): the last port starts a range of two.
    let lists = [("127.0.0.2", &short[..]), ("127.0.0.3", &long[..])];
    let mut policy = format!("[[identity]]\nid = \"{WEB}\"\n");
    for (addr, ports) in lists {
        let (last, singles) = ports.split_last().unwrap();
        let mut items: Vec<String> = singles.iter().map(u16::to_string).collect();
        items.push(format!("\"{last}-{}\"", last + 1));
        policy.push_str(&format!(
            "[[identity.egress]]\nname = \"to-{addr}\"\nto = [\"{addr}/32\"]\nports = [{}]\nprotocol = \"udp\"\naction = \"allow\"\n",
            items.join(", ")
        ));
    }
    let mut cg = Cgroups::new("port-lists");
    let web = cg.inside("web");
    let _agent = Agent::start(&cg, &policy, &web_binding());
    for (addr, ports) in lists {
        let last = ports[ports.len() - 1];
        for port in base..=base + 10 {
            let allowed = ports.contains(&port) || port == last + 1;
            let answer = probe(Some(&web), "udp-sendto", &format!("{addr}:{port}"));
            let expected = if allowed { "ok" } else { "EPERM" };
            assert_eq!(answer, expected, "{addr}:{port}");
        }
    }
}

#[test]
fn enforcement_outlives_a_killed_agent_and_a_restart_adopts_the_pins() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("lifetime");
    let web = cg.inside("web");
    let web = Some(web.as_path());
    let denied = f.next_tcp4();
    let mut agent = Agent::start(&cg, &policy(&f), &web_binding());
    let first = agent.status();
    assert_eq!(
        first["programs"]["attached"].as_array().unwrap().len(),
        PINNED_LINKS
    );
    let links = agent.pinned_links();
    assert_eq!(links.len(), PINNED_LINKS, "{links:?}");

    // SIGKILL: nothing runs in user space, the kernel still judges.
    agent.stop(Signal::SIGKILL);
    assert_eq!(probe(web, "tcp", &denied), "EPERM");
    assert_eq!(probe(web, "tcp", &f.tcp4()), "ok");

    // A new agent adopts the pinned links instead of attaching anew.
    agent.spawn();
    agent.wait_ready();
    let second = agent.status();
    assert_eq!(
        second["programs"]["adopted"].as_array().unwrap().len(),
        PINNED_LINKS
    );
    assert!(
        second["programs"]["attached"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(agent.pinned_links(), links);
    assert_eq!(probe(web, "tcp", &denied), "EPERM");
    assert_eq!(probe(web, "tcp", &f.tcp4()), "ok");

    // SIGTERM stops cleanly and leaves the pins.
    assert!(agent.stop(Signal::SIGTERM).success());
    assert_eq!(agent.pinned_links(), links);
    assert_eq!(probe(web, "tcp", &denied), "EPERM");

    // Uninstall removes them, and with them enforcement.
    let out = agent.uninstall().expect("uninstall");
    assert!(out.contains("uninstalled"), "{out}");
    assert!(agent.pinned_links().is_empty());
    assert!(!agent.pin_dir.exists());
    assert_eq!(probe(web, "tcp", &denied), "ECONNREFUSED");
}

/// The scope cgroup removed under stopped agent (its links are then
/// defunct): uninstall still removes every pin.
#[test]
fn uninstall_after_the_scope_is_gone_removes_every_pin() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("gone");
    let web = cg.inside("web");
    let mut agent = Agent::start(&cg, &policy(&f), &web_binding());
    assert_eq!(agent.pinned_links().len(), PINNED_LINKS);
    assert!(agent.stop(Signal::SIGTERM).success());
    for dir in [web, cg.scope_dir()] {
        std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("rmdir {}: {e}", dir.display()));
    }
    let out = agent.uninstall().expect("uninstall");
    assert!(out.contains("uninstalled"), "{out}");
    assert!(!agent.pin_dir.exists());
}

#[test]
fn a_bad_config_or_policy_stops_the_agent_before_anything_is_attached() {
    require_privileges!();
    let cg = Cgroups::new("badinput");
    for (policy, extra, want) in [
        ("", "scop = 1\n", "unknown field `scop`"),
        (
            "",
            "[[workload]]\ncgroup = \"w\"\nidentity = \"spiffe://Bad/x\"\n",
            "workload[0].identity",
        ),
        (
            "[[identity]]\nid = \"spiffe://e.org/a\"\n[[identity.egress]]\nname = \"x\"\nto = [\"10.0.0.0/40\"]\naction = \"allow\"\n",
            "",
            "10.0.0.0/40",
        ),
    ] {
        let mut agent = Agent::prepare(&cg, policy, extra);
        let (ok, log) = agent.run_to_exit();
        assert!(!ok, "agent accepted bad input:\n{log}");
        assert!(log.contains(want), "{want:?} not in:\n{log}");
        assert!(agent.pinned_links().is_empty(), "something was attached");
        assert!(!agent.pin_dir.exists(), "pin dir was created");
    }
    // A missing config file is named.
    let mut agent = Agent::prepare(&cg, "", "");
    std::fs::remove_file(&agent.config).unwrap();
    let (ok, log) = agent.run_to_exit();
    assert!(!ok);
    assert!(
        log.contains("agent.toml") && log.contains("No such file"),
        "{log}"
    );
}
