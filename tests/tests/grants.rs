//! Operators' grants end to end: the real agent, real cgroups, real
//! connects. A grant opens what the identity's default denies, for that
//! identity only, until its expiry on the kernel's boot-time clock, with
//! or without the agent; a deny rule or a revocation beats it.
//!
//! "Allowed" is `ECONNREFUSED` (nothing listens on 127.1.x.y: the kernel
//! let the connect through), "denied" is `EPERM`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use idgate_tests::dns::{
    DigAnswer, DigQuery, DnsServer, NOWHERE, Resolver, Zone, audit, connect, dns_config,
    loopback_ip,
};
use idgate_tests::require_tools;
use idgate_tests::{
    Agent, Cgroups, Fixture, WEB, assert_schema, events_schema, free_loopback_port, json_lines,
    metric, probe, require_privileges, scrape, wait_for,
};
use nix::sys::signal::Signal;

const ALLOWED: &str = "ECONNREFUSED";
const DENIED: &str = "EPERM";

/// An agent whose `web` cgroup holds the fixture's `web` identity, with
/// `more` in its policy and `config` in its configuration, and an audit
/// log (allowed connects are not sampled: only denials and grants'
/// allows are recorded).
struct World {
    _f: Fixture,
    _cg: Cgroups,
    web: PathBuf,
    agent: Agent,
}

impl World {
    fn start(tag: &str, more: &str, config: &str) -> Self {
        let f = Fixture::new();
        let mut cg = Cgroups::new(tag);
        let web = cg.inside("web");
        let agent = Agent::start(
            &cg,
            &f.policy(more),
            &format!(
                "[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n\
                 [events]\naudit_log = \"audit.log\"\n{config}\n"
            ),
        );
        Self {
            _f: f,
            _cg: cg,
            web,
            agent,
        }
    }

    fn probe(&self, op: &str, addr: &str) -> String {
        probe(Some(&self.web), op, addr)
    }

    fn tcp(&self, addr: &str) -> String {
        self.probe("tcp", addr)
    }

    fn grant(&self, args: &[&str]) -> u32 {
        grant(&self.agent, args)
    }

    fn grants(&self) -> Vec<serde_json::Value> {
        grants(&self.agent)
    }

    fn audit_log(&self) -> PathBuf {
        self.agent.dir.join("audit.log")
    }

    /// Waits for the audit log's record of `action` on grant `id`, and
    /// checks it against the schema.
    fn wait_grant_record(&self, action: &str, id: u32) -> serde_json::Value {
        let log = self.audit_log();
        let record = wait_for(
            &format!("a `{action}` record of grant {id}"),
            Duration::from_secs(10),
            || {
                json_lines(&log)
                    .into_iter()
                    .find(|r| r["kind"] == "grant" && r["action"] == action && r["grant_id"] == id)
            },
        );
        assert_schema(&events_schema(), &record);
        record
    }
}

/// `idgate grant ARGS --json` on `agent`: the grant's id.
fn grant(agent: &Agent, args: &[&str]) -> u32 {
    let mut all = vec!["grant"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = agent
        .try_cli(&all)
        .unwrap_or_else(|e| panic!("idgate {all:?}: {e}"));
    let reply: serde_json::Value = serde_json::from_str(&out).expect("grant reply is JSON");
    reply["grant"]["id"].as_u64().expect("grant id") as u32
}

/// `idgate grants --json` on `agent`: the running grants.
fn grants(agent: &Agent) -> Vec<serde_json::Value> {
    let out = agent.try_cli(&["grants", "--json"]).expect("idgate grants");
    let list: serde_json::Value = serde_json::from_str(&out).expect("grants is JSON");
    list["grants"].as_array().expect("grants").clone()
}

/// An agent whose `web` cgroup holds the `web` identity (no rules,
/// default deny), with its DNS path forwarding to a dnsmasq serving
/// `zone` (loopback answers allowed), and an audit log that is removed
/// with it, whatever the test's outcome.
struct NameWorld {
    agent: Agent,
    web: PathBuf,
    log: PathBuf,
    _cg: Cgroups,
    upstream: DnsServer,
}

impl NameWorld {
    fn start(tag: &str, zone: &Zone) -> Self {
        let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), zone);
        let mut cg = Cgroups::new(tag);
        let web = cg.inside("web");
        let log = std::env::temp_dir().join(format!("{}-audit.jsonl", cg.name()));
        let _ = std::fs::remove_file(&log);
        let policy = format!("[[identity]]\nid = \"{WEB}\"\ndefault = \"deny\"\n");
        let agent = Agent::start(
            &cg,
            &policy,
            &format!(
                "[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n{}",
                dns_config(upstream.addr(), &log, "private_answers = \"allow\"")
            ),
        );
        Self {
            agent,
            web,
            log,
            _cg: cg,
            upstream,
        }
    }

    /// `dig NAME` from the `web` cgroup, at a server that does not exist:
    /// the kernel sends it to the agent.
    fn dig(&self, name: &str) -> DigAnswer {
        Resolver::new(&[NOWHERE])
            .in_cgroup(&self.web)
            .dig(&DigQuery::new(name))
    }
}

impl Drop for NameWorld {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Sleeps until `at`.
fn sleep_until(at: Instant) {
    if let Some(left) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

/// The grants file of a stopped agent, with its boot id replaced.
fn set_boot_id(state_dir: &Path, boot_id: &str) {
    let path = state_dir.join("grants.json");
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("grants file")).expect("JSON");
    saved["boot_id"] = boot_id.into();
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).expect("write grants file");
}

#[test]
fn a_grant_opens_what_the_default_denies_and_ends_on_time_with_the_agent_killed() {
    require_privileges!();
    let mut w = World::start("grant-expiry", "", "");
    let to = "127.1.2.3:4443";
    assert_eq!(w.tcp(to), DENIED);

    let granted = Instant::now();
    let id = w.grant(&[
        "--identity",
        WEB,
        "--to",
        "127.1.0.0/16",
        "--ports",
        "4443",
        "--protocol",
        "tcp",
        "--for",
        "4s",
        "--reason",
        "e2e",
    ]);
    assert_eq!(w.tcp(to), ALLOWED);
    // Only what was granted: not another port, protocol or network.
    assert_eq!(w.tcp("127.1.2.3:4444"), DENIED);
    assert_eq!(w.probe("udp-sendto", to), DENIED);
    assert_eq!(w.tcp("127.2.0.1:4443"), DENIED);
    // The decision names the grant.
    let log = w.audit_log();
    let decision = wait_for("the grant's decision", Duration::from_secs(10), || {
        json_lines(&log)
            .into_iter()
            .find(|e| e["reason"] == "grant" && e["dst_port"] == 4443)
    });
    assert_schema(&events_schema(), &decision);
    assert_eq!(decision["rule"], format!("grant:{id}"));
    assert_eq!(decision["verdict"], "allow");
    let shown = w.agent.try_cli(&["events"]).expect("idgate events");
    assert!(
        shown.contains(&format!("reason=grant rule=grant:{id}")),
        "{shown}"
    );
    let record = w.wait_grant_record("granted", id);
    assert_eq!(record["uid"], 0);
    assert_eq!(record["reason"], "e2e");
    let listed = w.grants();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["granted_by"], 0);
    assert!(listed[0]["seconds_left"].as_u64().unwrap() <= 4);

    // No agent: the kernel ends the grant on its own clock.
    w.agent.stop(Signal::SIGKILL);
    assert_eq!(w.tcp(to), ALLOWED, "the grant holds until its expiry");
    sleep_until(granted + Duration::from_millis(4500));
    assert_eq!(w.tcp(to), DENIED);

    // The agent back: the expiry is audited, with the kernel's time, and
    // the grant is gone for good.
    w.agent.spawn();
    w.agent.wait_ready();
    let expired = w.wait_grant_record("expired", id);
    assert!(expired["uid"].is_null());
    assert!(w.grants().is_empty());
    assert_eq!(w.tcp(to), DENIED);
}

#[test]
fn a_deny_rule_and_a_revocation_beat_a_grant() {
    require_privileges!();
    let w = World::start(
        "grant-precedence",
        r#"
        [[identity.egress]]
        name = "no-5555"
        to = ["127.1.0.0/16"]
        ports = [5555]
        action = "deny"
        "#,
        "",
    );
    w.grant(&["--identity", WEB, "--to", "127.0.0.0/8", "--for", "60s"]);
    assert_eq!(w.tcp("127.1.2.3:5555"), DENIED, "the deny rule decides");
    assert_eq!(w.tcp("127.1.2.3:5556"), ALLOWED);
    assert_eq!(w.probe("udp-sendto", "127.1.2.3:5556"), "ok");

    w.agent.try_cli(&["revoke", WEB]).expect("revoke");
    assert_eq!(w.tcp("127.1.2.3:5556"), DENIED, "a revoked identity");
    w.agent.try_cli(&["unrevoke", WEB]).expect("unrevoke");
    assert_eq!(w.tcp("127.1.2.3:5556"), ALLOWED);

    // Workloads without an identity get nothing from it.
    let stranger = w.web.parent().unwrap().join("stranger");
    std::fs::create_dir(&stranger).expect("stranger cgroup");
    let answer = probe(Some(&stranger), "tcp", "127.1.2.3:5556");
    let _ = std::fs::remove_dir(&stranger);
    assert_eq!(answer, DENIED);
}

#[test]
fn overlapping_grants_each_hold_as_written() {
    require_privileges!();
    let w = World::start("grant-overlap", "", "");
    // A /8 on one port for ten minutes; a /16 inside it on another port
    // for a few seconds.
    w.grant(&[
        "--identity",
        WEB,
        "--to",
        "127.0.0.0/8",
        "--ports",
        "6443",
        "--protocol",
        "tcp",
        "--for",
        "10m",
    ]);
    let short = Instant::now();
    let short_id = w.grant(&[
        "--identity",
        WEB,
        "--to",
        "127.1.0.0/16",
        "--ports",
        "6022",
        "--protocol",
        "tcp",
        "--for",
        "3s",
    ]);
    assert_eq!(w.tcp("127.1.2.3:6443"), ALLOWED);
    assert_eq!(w.tcp("127.1.2.3:6022"), ALLOWED);
    assert_eq!(w.tcp("127.2.0.1:6443"), ALLOWED);
    assert_eq!(w.tcp("127.2.0.1:6022"), DENIED);
    sleep_until(short + Duration::from_millis(3500));
    assert_eq!(w.tcp("127.1.2.3:6022"), DENIED);
    assert_eq!(w.tcp("127.1.2.3:6443"), ALLOWED);
    assert_eq!(w.tcp("127.2.0.1:6443"), ALLOWED);
    // The agent's tick removes it from the map and the file, and audits
    // its expiry.
    w.wait_grant_record("expired", short_id);
    assert_eq!(w.grants().len(), 1);
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.agent.dir.join("state/grants.json")).expect("grants file"),
    )
    .expect("JSON");
    let ids: Vec<u64> = saved["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&u64::from(short_id)), "{saved}");
    assert_eq!(ids.len(), 1);
}

#[test]
fn a_grant_can_be_extended_and_revoked() {
    require_privileges!();
    let port = free_loopback_port();
    let w = World::start(
        "grant-extend",
        "",
        &format!("[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
    );
    let live = || metric(&scrape(port), "idgate_grants", "");
    assert_eq!(live(), Some(0.0));
    let to = "127.1.2.3:6100";
    let granted = Instant::now();
    let id = w.grant(&["--identity", WEB, "--to", "127.1.2.3", "--for", "3s"]);
    w.grant(&["--extend", &id.to_string(), "--for", "10m"]);
    sleep_until(granted + Duration::from_millis(3500));
    assert_eq!(w.tcp(to), ALLOWED, "extended past its first expiry");
    let listed = w.grants();
    assert_eq!(listed.len(), 1);
    assert!(listed[0]["seconds_left"].as_u64().unwrap() > 500);
    assert_eq!(live(), Some(1.0));
    assert_eq!(w.agent.status()["grants"], 1);
    let entries = metric(&scrape(port), "idgate_map_entries", "map=\"IDG_GRANTS\"");
    assert_eq!(entries, Some(1.0));

    w.grant(&["--revoke", &id.to_string()]);
    assert_eq!(w.tcp(to), DENIED);
    assert!(w.grants().is_empty());
    assert_eq!(live(), Some(0.0));
    assert_eq!(w.agent.status()["grants"], 0);
    for action in ["granted", "extended", "revoked"] {
        assert_eq!(w.wait_grant_record(action, id)["uid"], 0, "{action}");
    }
    let e = w
        .agent
        .try_cli(&["grant", "--revoke", &id.to_string()])
        .unwrap_err();
    assert!(e.contains(&format!("no grant {id} runs")), "{e}");
}

#[test]
fn grants_survive_a_restart_but_not_another_boot() {
    require_privileges!();
    let mut w = World::start("grant-restart", "", "");
    let to = "127.1.2.3:6200";
    let id = w.grant(&["--identity", WEB, "--to", "127.1.0.0/16", "--for", "10m"]);
    assert_eq!(w.tcp(to), ALLOWED);

    assert!(w.agent.stop(Signal::SIGTERM).success());
    assert_eq!(w.tcp(to), ALLOWED, "pinned: no agent needed");
    w.agent.spawn();
    w.agent.wait_ready();
    assert_eq!(w.tcp(to), ALLOWED);
    assert_eq!(w.grants()[0]["id"], id);
    // Ids are never given twice.
    let second = w.grant(&["--identity", WEB, "--to", "127.3.0.0/16", "--for", "10m"]);
    assert!(second > id);

    // Grants of another boot mean nothing: dropped, audited, and out of
    // the kernel.
    assert!(w.agent.stop(Signal::SIGTERM).success());
    set_boot_id(
        &w.agent.dir.join("state"),
        "00000000-0000-0000-0000-000000000000",
    );
    w.agent.spawn();
    w.agent.wait_ready();
    assert!(w.grants().is_empty());
    assert_eq!(w.tcp(to), DENIED);
    assert_eq!(w.tcp("127.3.0.1:6200"), DENIED);
    w.wait_grant_record("dropped", id);
    w.wait_grant_record("dropped", second);
}

#[test]
fn a_grant_for_an_identity_without_a_slot_waits_for_one() {
    require_privileges!();
    let later = "spiffe://example.org/later";
    let w = World::start("grant-later", "", "");
    w.grant(&["--identity", later, "--to", "127.1.0.0/16", "--for", "10m"]);
    let listed = w.grants();
    assert!(listed[0]["slot"].is_null(), "{listed:?}");
    // `idgate run` gives the identity a slot: the grant is in force there.
    let probe = idgate_tests::target_bin("idgate-probe");
    let run = |addr: &str| {
        w.agent
            .try_cli(&[
                "run",
                "--identity",
                later,
                "--",
                probe.to_str().unwrap(),
                "tcp",
                addr,
            ])
            .expect("idgate run")
            .trim()
            .to_owned()
    };
    assert_eq!(run("127.1.2.3:6300"), ALLOWED);
    assert_eq!(run("127.2.0.1:6300"), DENIED);
    // Only for that identity.
    assert_eq!(w.tcp("127.1.2.3:6300"), DENIED);
}

#[test]
fn bad_grants_are_refused_with_what_is_wrong_and_change_nothing() {
    require_privileges!();
    let w = World::start(
        "grant-bad",
        "",
        "[grants]\nmax_duration = \"1h\"\nmax_live = 6\n",
    );
    let grant = |args: &[&str]| {
        let mut all = vec!["grant"];
        all.extend_from_slice(args);
        w.agent.try_cli(&all)
    };
    for (args, want) in [
        (
            vec![
                "--identity",
                "spiffe://example.org/*",
                "--to",
                "10.0.0.0/8",
                "--for",
                "1m",
            ],
            "not a pattern",
        ),
        (
            vec!["--identity", "unknown", "--to", "10.0.0.0/8", "--for", "1m"],
            "cannot be granted",
        ),
        (
            vec!["--identity", WEB, "--to", "api..example.com", "--for", "1m"],
            "is not a DNS name: it has an empty label",
        ),
        (
            vec!["--identity", WEB, "--to", "10.0.0.1/8", "--for", "1m"],
            "did you mean 10.0.0.0/8",
        ),
        (
            vec!["--identity", WEB, "--to", "10.0.0.0/8", "--for", "2h"],
            "max_duration",
        ),
        (
            vec![
                "--identity",
                WEB,
                "--to",
                "10.0.0.0/8",
                "--ports",
                "0",
                "--for",
                "1m",
            ],
            "ports",
        ),
        (vec!["--extend", "99", "--for", "1m"], "no grant 99 runs"),
    ] {
        let e = grant(&args).unwrap_err();
        assert!(e.contains(want), "{args:?}: {want:?} not in {e}");
    }
    assert!(w.grants().is_empty());

    // Nested grants: four fit one destination, a fifth is refused.
    for net in [
        "127.0.0.0/8",
        "127.1.0.0/16",
        "127.1.2.0/24",
        "127.1.2.0/25",
    ] {
        w.grant(&["--identity", WEB, "--to", net, "--for", "1m"]);
    }
    let e = grant(&["--identity", WEB, "--to", "127.1.2.3", "--for", "1m"]).unwrap_err();
    assert!(e.contains("at most 4 may overlap"), "{e}");
    assert_eq!(w.grants().len(), 4);
    // Beside them, more fit, up to max_live.
    w.grant(&["--identity", WEB, "--to", "10.9.0.0/16", "--for", "1m"]);
    w.grant(&["--identity", WEB, "--to", "10.8.0.0/16", "--for", "1m"]);
    let e = grant(&["--identity", WEB, "--to", "10.7.0.0/16", "--for", "1m"]).unwrap_err();
    assert!(e.contains("max_live"), "{e}");
    assert_eq!(w.grants().len(), 6);
}

#[test]
fn a_corrupt_grants_file_stops_the_agent_before_anything_is_attached() {
    require_privileges!();
    let cg = Cgroups::new("grant-corrupt");
    let mut agent = Agent::prepare(&cg, "", "");
    std::fs::create_dir_all(agent.dir.join("state")).unwrap();
    std::fs::write(agent.dir.join("state/grants.json"), "{").unwrap();
    let (ok, log) = agent.run_to_exit();
    assert!(!ok, "agent accepted a corrupt grants file:\n{log}");
    assert!(log.contains("grants.json is corrupt"), "{log}");
    assert!(agent.pinned_links().is_empty(), "something was attached");
    assert!(!agent.pin_dir.exists(), "pin dir was created");
}

/// A grant by name: before it, the name's lookups get NXDOMAIN and its
/// address is denied; while it runs, lookups of the name (and of names
/// under a wildcard) are answered, and the answered addresses are open on
/// the grant's port only, in the kernel before the answer arrives; when
/// it ends, the kernel denies again and the lookups get NXDOMAIN.
#[test]
fn a_grant_by_name_answers_its_lookups_and_opens_their_addresses_until_it_ends() {
    require_privileges!();
    require_tools!("dnsmasq", "dig");
    let lo = |d: u8| IpAddr::from([127, 0, 0, d]);
    let zone = Zone::new()
        .host("granted.test.example", &[lo(21)], 300)
        .host("a.wild.test.example", &[lo(23)], 300)
        .host("other.test.example", &[lo(22)], 300)
        .nxdomain("test.example");
    let w = NameWorld::start("grant-name", &zone);
    let (web, log, upstream) = (&w.web, &w.log, &w.upstream);
    let dig = |name: &str| w.dig(name);
    let port = free_loopback_port();
    let ip = "127.0.0.21";

    // No rule names it: NXDOMAIN, never forwarded, and the address is
    // denied.
    let before = dig("granted.test.example");
    assert_eq!(before.status.as_deref(), Some("NXDOMAIN"), "{before:?}");
    assert!(!upstream.was_queried("granted.test.example"));
    assert_eq!(connect(web, ip, port), "EPERM");

    let granted = Instant::now();
    let grant = |to: &str| {
        grant(
            &w.agent,
            &[
                "--identity",
                WEB,
                "--to",
                to,
                "--ports",
                &port.to_string(),
                "--protocol",
                "tcp",
                "--for",
                "3s",
            ],
        )
    };
    let id = grant("granted.test.example");
    let wild = grant("*.wild.test.example");
    let returned = Instant::now();

    // Answered, with a TTL no longer than the grant has left; a connect
    // at once after the answer is allowed on the grant's port only, and
    // only to the address answered.
    let during = dig("granted.test.example");
    assert_eq!(during.status.as_deref(), Some("NOERROR"), "{during:?}");
    assert_eq!(during.addrs, vec![lo(21)], "{during:?}");
    assert!(during.records.iter().all(|r| r.ttl <= 3), "{during:?}");
    assert_eq!(connect(web, ip, port), "allowed");
    assert_eq!(connect(web, ip, port + 1), "EPERM");
    assert_eq!(connect(web, "127.0.0.22", port), "EPERM");
    // A wildcard grant answers the names under its domain.
    let under = dig("a.wild.test.example");
    assert_eq!(under.addrs, vec![lo(23)], "{under:?}");
    assert_eq!(connect(web, "127.0.0.23", port), "allowed");
    // A name no grant covers stays NXDOMAIN.
    let other = dig("other.test.example");
    assert_eq!(other.status.as_deref(), Some("NXDOMAIN"), "{other:?}");
    assert!(
        Instant::now() < granted + Duration::from_secs(3),
        "the checks while the grant runs took too long to mean anything"
    );

    // `idgate grants` lists them by name, with the addresses they opened.
    let shown = grants(&w.agent)
        .into_iter()
        .find(|g| g["id"] == id)
        .expect("the grant listed");
    assert_eq!(shown["to"], "granted.test.example");
    assert_eq!(shown["learned_addresses"], 1);

    // After its end: the kernel denies (with or without the agent's
    // sweep), and the lookups get NXDOMAIN again.
    sleep_until(returned + Duration::from_secs(3) + Duration::from_millis(50));
    assert_eq!(connect(web, ip, port), "EPERM");
    assert_eq!(connect(web, "127.0.0.23", port), "EPERM");
    let after = dig("granted.test.example");
    assert_eq!(after.status.as_deref(), Some("NXDOMAIN"), "{after:?}");

    // The DNS records name the grant, and the grants' expiries are
    // audited.
    let schema = events_schema();
    let answered = wait_for(
        "the DNS record of the granted lookup",
        Duration::from_secs(10),
        || {
            audit(log).into_iter().find(|r| {
                r["hook"] == "dns"
                    && r["dst_name"] == "granted.test.example"
                    && r["reason"] == "answered"
            })
        },
    );
    assert_schema(&schema, &answered);
    assert_eq!(answered["rule"], format!("grant:{id}"));
    assert_eq!(answered["dns"]["grants"][0], format!("grant:{id}"));
    for g in [id, wild] {
        let expired = wait_for("the grant's expiry record", Duration::from_secs(10), || {
            audit(log)
                .into_iter()
                .find(|r| r["kind"] == "grant" && r["action"] == "expired" && r["grant_id"] == g)
        });
        assert_schema(&schema, &expired);
    }
}

/// A grant by name survives a restart (the file), and so do the addresses
/// its lookups opened (the pinned map), which the new agent takes back
/// without extending them; a revocation closes them and its lookups get
/// NXDOMAIN again.
#[test]
fn a_grant_by_name_survives_a_restart_and_a_revocation_ends_it() {
    require_privileges!();
    require_tools!("dnsmasq", "dig");
    let zone = Zone::new()
        .host("kept.test.example", &[IpAddr::from([127, 0, 0, 31])], 300)
        .nxdomain("test.example");
    let mut w = NameWorld::start("grant-name-restart", &zone);
    let port = free_loopback_port();
    let ip = "127.0.0.31";
    let id = grant(
        &w.agent,
        &[
            "--identity",
            WEB,
            "--to",
            "kept.test.example",
            "--ports",
            &port.to_string(),
            "--for",
            "10m",
        ],
    );
    let web = w.web.clone();
    assert_eq!(
        w.dig("kept.test.example").addrs,
        vec![IpAddr::from([127, 0, 0, 31])]
    );
    assert_eq!(connect(&web, ip, port), "allowed");

    assert!(w.agent.stop(Signal::SIGTERM).success());
    assert_eq!(
        connect(&web, ip, port),
        "allowed",
        "pinned: no agent needed"
    );
    w.agent.spawn();
    w.agent.wait_ready();
    assert_eq!(connect(&web, ip, port), "allowed");
    let listed = grants(&w.agent);
    let shown = &listed[0];
    assert_eq!(shown["id"], id);
    assert_eq!(shown["to"], "kept.test.example");
    assert_eq!(shown["learned_addresses"], 1, "taken back from the map");
    let again = w.dig("kept.test.example");
    assert_eq!(again.status.as_deref(), Some("NOERROR"), "{again:?}");

    w.agent
        .try_cli(&["grant", "--revoke", &id.to_string()])
        .expect("idgate grant --revoke");
    assert_eq!(connect(&web, ip, port), "EPERM");
    let after = w.dig("kept.test.example");
    assert_eq!(after.status.as_deref(), Some("NXDOMAIN"), "{after:?}");
}
