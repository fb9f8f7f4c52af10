//! Decision events end to end: real connects judged by the real programs
//! come out of the agent's audit log and metrics, field by field, counted
//! one by one; a full ring buffer is counted, never silent.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use idgate_tests::{
    Agent, Cgroups, Fixture, WEB, assert_schema, events_schema, free_loopback_port, json_lines,
    metric, probe, probe_with_pid, repeat_counts, require_privileges, scrape, spawn_repeat,
    wait_for,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const AUDITED: &str = "spiffe://example.org/audited";

/// The shared fixture's policy (`web` may reach TCP `tcp_port` on
/// 127.0.0.1 and ::1), where the rule `no-db` denies TCP `tcp_port + 1`
/// and anything else falls to the deny default; `audited` is in audit
/// mode with the same default.
fn policy(f: &Fixture) -> String {
    f.policy(&format!(
        r#"
        [[identity.egress]]
        name = "no-db"
        to = ["127.0.0.1/32"]
        ports = [{db}]
        protocol = "tcp"
        action = "deny"

        [[identity]]
        id = "{AUDITED}"
        default = "deny"
        audit = true
        "#,
        db = f.tcp_port + 1,
    ))
}

/// Config for an agent with the web and audited cgroups bound, an audit
/// log, and `extra` in `[events]`.
fn config(log: &Path, events: &str, metrics_port: Option<u16>) -> String {
    let mut c = format!(
        "[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n\
         [[workload]]\ncgroup = \"audited\"\nidentity = \"{AUDITED}\"\n\
         [events]\naudit_log = {log:?}\naudit_log_max_bytes = 1000000000\n{events}\n"
    );
    if let Some(port) = metrics_port {
        c.push_str(&format!("[metrics]\naddress = \"127.0.0.1:{port}\"\n"));
    }
    c
}

fn audit_log(cg: &Cgroups) -> PathBuf {
    std::env::temp_dir().join(format!("{}-audit/audit.log", cg.scope_rel()))
}

/// Removes the audit log's directory when the test ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until the log has `n` events, then a little longer to show that
/// no more come; returns them.
fn events(log: &Path, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} events in {}", log.display()),
        Duration::from_secs(10),
        || (json_lines(log).len() >= n).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    json_lines(log)
}

/// Decision records in the log: its lines but those of other kinds.
fn decision_lines(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("\"kind\":"))
        .count() as u64
}

fn cgroup_id(dir: &Path) -> u64 {
    std::fs::metadata(dir).unwrap().ino()
}

#[test]
fn a_denied_connect_is_one_record_with_every_field() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-deny");
    let web = cg.inside("web");
    let log = audit_log(&cg);
    let _cleanup = Cleanup(log.clone());
    let _agent = Agent::start(&cg, &policy(&f), &config(&log, "", None));

    let (pid, answer) = probe_with_pid(&web, "tcp", &f.next_tcp4());
    assert_eq!(answer, "EPERM");
    let got = events(&log, 1);
    assert_eq!(got.len(), 1, "{got:#?}");
    let e = &got[0];
    assert_schema(&events_schema(), e);
    assert_eq!(e["version"], 1);
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["reason"], "rule");
    assert_eq!(e["rule"], "no-db");
    assert!(e["rule_id"].as_u64().unwrap() > 0);
    assert_eq!(e["identity"], WEB);
    // Slots are handed out lowest first, in the order of the IDs.
    assert_eq!(e["slot"], 2);
    assert_eq!(e["pid"], pid);
    assert_eq!(e["tid"], pid);
    assert_eq!(e["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(e["gid"], nix::unistd::getgid().as_raw());
    assert_eq!(e["comm"], "idgate-probe");
    assert_eq!(e["hook"], "connect4");
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["dst_addr"], "127.0.0.1");
    assert_eq!(e["dst_port"], f.tcp_port + 1);
    assert_eq!(e["v4_mapped"], false);
    assert_eq!(e["cgroup_id"], cgroup_id(&web));
    // The probe has exited by now, most likely: the executable is named
    // only while it runs, and the event says it exited otherwise.
    assert!(
        (e["exe"].is_null() && e["exe_unknown"] == "exited")
            || (e["exe"].as_str().unwrap().ends_with("/idgate-probe")
                && e["exe_unknown"].is_null()),
        "{e}"
    );
}

/// Records are named by the policy that decided them: after each of
/// three reloads (the kernel's two generations taking turns), a deny
/// carries the rule name of the policy then active.
#[test]
fn records_name_the_rule_of_the_policy_that_decided_after_reloads() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-names");
    let web = cg.inside("web");
    let log = audit_log(&cg);
    let _cleanup = Cleanup(log.clone());
    let agent = Agent::start(&cg, &policy(&f), &config(&log, "", None));
    let mut seen = 0;
    for name in ["db-first", "db-second", "db-third"] {
        agent.write_policy(&policy(&f).replace("\"no-db\"", &format!("{name:?}")));
        agent.try_cli(&["policy", "reload"]).expect("reload");
        assert_eq!(probe(Some(&web), "tcp", &f.next_tcp4()), "EPERM");
        seen += 1;
        let got = events(&log, seen);
        assert_eq!(got.len(), seen, "{got:#?}");
        assert_eq!(got[seen - 1]["rule"], name, "{:#}", got[seen - 1]);
    }
}

#[test]
fn every_hook_and_reason_is_reported_as_decided() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-reasons");
    let web = cg.inside("web");
    let audited = cg.inside("audited");
    let stranger = cg.inside("stranger");
    let log = audit_log(&cg);
    let _cleanup = Cleanup(log.clone());
    let agent = Agent::start(&cg, &policy(&f), &config(&log, "", None));
    let u = f.udp_port;

    let cases: Vec<(&Path, &str, String, &str)> = vec![
        (
            &web,
            "tcp",
            format!("[::ffff:127.0.0.2]:{}", f.tcp_port),
            "EPERM",
        ),
        (&web, "udp-sendto", format!("[::1]:{u}"), "EPERM"),
        (&web, "udp-sendto", format!("127.0.0.1:{u}"), "EPERM"),
        (&stranger, "tcp", f.tcp4(), "EPERM"),
        (&audited, "tcp", f.tcp4(), "ok"),
    ];
    for (dir, op, addr, want) in &cases {
        assert_eq!(probe(Some(dir), op, addr), *want, "{op} {addr}");
    }
    let got = events(&log, cases.len());
    assert_eq!(got.len(), cases.len(), "{got:#?}");
    let validator = events_schema();
    for e in &got {
        assert_schema(&validator, e);
    }
    let fields = |e: &Value, keys: &[&str]| -> Vec<String> {
        keys.iter().map(|k| e[*k].to_string()).collect()
    };
    let (web_q, audited_q) = (format!("{WEB:?}"), format!("{AUDITED:?}"));
    let (web_q, audited_q) = (web_q.as_str(), audited_q.as_str());
    let keys = [
        "hook",
        "protocol",
        "dst_addr",
        "v4_mapped",
        "verdict",
        "reason",
        "rule",
        "identity",
    ];
    let want: Vec<Vec<&str>> = vec![
        vec![
            "\"connect6\"",
            "\"tcp\"",
            "\"::ffff:127.0.0.2\"",
            "true",
            "\"deny\"",
            "\"default\"",
            "\"default\"",
            web_q,
        ],
        vec![
            "\"sendmsg6\"",
            "\"udp\"",
            "\"::1\"",
            "false",
            "\"deny\"",
            "\"default\"",
            "\"default\"",
            web_q,
        ],
        vec![
            "\"sendmsg4\"",
            "\"udp\"",
            "\"127.0.0.1\"",
            "false",
            "\"deny\"",
            "\"default\"",
            "\"default\"",
            web_q,
        ],
        vec![
            "\"connect4\"",
            "\"tcp\"",
            "\"127.0.0.1\"",
            "false",
            "\"deny\"",
            "\"unknown_workload\"",
            "\"default\"",
            "null",
        ],
        vec![
            "\"connect4\"",
            "\"tcp\"",
            "\"127.0.0.1\"",
            "false",
            "\"allow\"",
            "\"audit_allowed\"",
            "\"default\"",
            audited_q,
        ],
    ];
    for (e, w) in got.iter().zip(&want) {
        assert_eq!(fields(e, &keys), *w, "{e}");
    }
    assert_eq!(got[3]["slot"], 0);

    // A revoked identity is denied whatever its rules say, and told so.
    agent.try_cli(&["revoke", WEB]).expect("revoke");
    assert_eq!(probe(Some(&web), "tcp", &f.tcp4()), "EPERM");
    let got = events(&log, cases.len() + 1);
    let e = got.last().unwrap();
    assert_schema(&validator, e);
    assert_eq!(
        fields(e, &["verdict", "reason", "identity", "rule_id", "rule"]),
        ["\"deny\"", "\"revoked\"", web_q, "0", "null"]
    );
}

#[test]
fn allowed_connects_are_recorded_only_as_sampled() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-sample");
    let web = cg.inside("web");
    let log = audit_log(&cg);
    let _cleanup = Cleanup(log.clone());
    let mut agent = Agent::start(
        &cg,
        &policy(&f),
        &config(&log, "allow_sample_rate = 0.0", None),
    );

    // Sampling 0: the allowed connect leaves nothing; the denied one after
    // it shows the reader has caught up past it (the ring keeps order).
    assert_eq!(probe(Some(&web), "tcp", &f.tcp4()), "ok");
    assert_eq!(probe(Some(&web), "tcp", &f.next_tcp4()), "EPERM");
    let got = events(&log, 1);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["verdict"], "deny");

    // With no agent running the kernel still judges, and its record waits
    // in the pinned ring buffer for the next agent.
    assert!(agent.stop(Signal::SIGTERM).success());
    let (pid, answer) = probe_with_pid(&web, "tcp", &f.next_tcp4());
    assert_eq!(answer, "EPERM");

    // Sampling 1, after a restart: the waiting record, then exactly one
    // record for one allowed connect.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("allow_sample_rate = 0.0", "allow_sample_rate = 1.0"),
    )
    .unwrap();
    agent.spawn();
    agent.wait_ready();
    assert_eq!(probe(Some(&web), "tcp", &f.tcp4()), "ok");
    let got = events(&log, 3);
    assert_eq!(got.len(), 3, "{got:#?}");
    let backlog = &got[1];
    assert_schema(&events_schema(), backlog);
    assert_eq!(
        (&backlog["pid"], &backlog["reason"]),
        (&pid.into(), &"rule".into())
    );
    // It was decided by the previous agent's policy generation: named only
    // if this agent applied the same generation (docs/events.md).
    assert!(
        backlog["rule"].is_null() || backlog["rule"] == "no-db",
        "{backlog}"
    );
    let e = &got[2];
    assert_schema(&events_schema(), e);
    assert_eq!(
        (&e["verdict"], &e["reason"], &e["rule"], &e["identity"]),
        (
            &"allow".into(),
            &"rule".into(),
            &"tcp-local".into(),
            &WEB.into()
        )
    );
}

#[test]
fn metrics_count_the_decisions_made() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-metrics");
    let web = cg.inside("web");
    let stranger = cg.inside("stranger");
    let log = audit_log(&cg);
    let _cleanup = Cleanup(log.clone());
    let port = free_loopback_port();
    let _agent = Agent::start(
        &cg,
        &policy(&f),
        &config(&log, "allow_sample_rate = 1.0", Some(port)),
    );

    for _ in 0..3 {
        assert_eq!(probe(Some(&web), "tcp", &f.next_tcp4()), "EPERM");
    }
    for _ in 0..2 {
        assert_eq!(probe(Some(&web), "tcp", &f.tcp4()), "ok");
    }
    assert_eq!(probe(Some(&stranger), "tcp", &f.tcp4()), "EPERM");
    events(&log, 6);

    let text = scrape(port);
    let decisions = |labels: &str| metric(&text, "idgate_decision_events_total", labels);
    assert_eq!(
        decisions(&format!(
            "identity=\"{WEB}\",verdict=\"deny\",reason=\"rule\""
        )),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        decisions(&format!(
            "identity=\"{WEB}\",verdict=\"allow\",reason=\"rule\""
        )),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        decisions("identity=\"unknown\",verdict=\"deny\",reason=\"unknown_workload\""),
        Some(1.0),
        "{text}"
    );
    let samples: usize = text
        .lines()
        .filter(|l| l.starts_with("idgate_decision_events_total{"))
        .count();
    assert_eq!(samples, 3, "{text}");
    assert_eq!(
        metric(&text, "idgate_event_ring_drops_total", ""),
        Some(0.0)
    );
    // Attestation: the start-up pass at least, over the scope and its two
    // cgroups, each pass timed.
    let passes = metric(&text, "idgate_attestation_passes_total", "").unwrap();
    assert!(passes >= 1.0, "{text}");
    assert!(
        metric(&text, "idgate_attested_cgroups_total", "").unwrap() >= 3.0,
        "{text}"
    );
    assert!(
        metric(&text, "idgate_attestation_pass_seconds_count", "").unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "idgate_audit_log_lost_records_total", ""),
        Some(0.0)
    );
    assert_eq!(metric(&text, "idgate_policy_reloads_total", ""), Some(0.0));
    assert_eq!(metric(&text, "idgate_identities", ""), Some(2.0));
    assert_eq!(
        metric(&text, "idgate_workloads", "state=\"attested\""),
        Some(2.0)
    );
    // The stranger, and the scope cgroup itself.
    assert_eq!(
        metric(&text, "idgate_workloads", "state=\"unknown\""),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "idgate_map_entries", "map=\"IDG_IDENTITIES\""),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "idgate_map_capacity", "map=\"IDG_SLOT_PORTS\""),
        Some(f64::from(idgate_common_max_set_port_blocks()))
    );
}

/// `MAX_SET_PORT_BLOCKS` from idgate-common (not a dependency of the
/// tests: they see only what the agent shows).
fn idgate_common_max_set_port_blocks() -> u32 {
    262_144
}

#[test]
fn a_full_ring_buffer_counts_drops_and_loses_nothing_silently() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-flood");
    let web = cg.inside("web");
    let log = audit_log(&cg);
    let _cleanup = Cleanup(log.clone());
    let port = free_loopback_port();
    let agent = Agent::start(&cg, &policy(&f), &config(&log, "", Some(port)));
    // The ring buffer holds about 9,000 records: stall the reader and make
    // more denied connects than that.
    const FLOOD: u32 = 20_000;
    agent.signal(Signal::SIGSTOP);
    let started = Instant::now();
    let counts = repeat_counts(spawn_repeat(&web, FLOOD, "tcp", &f.next_tcp4()));
    let flood_time = started.elapsed();
    assert_eq!(counts.get("EPERM"), Some(&FLOOD), "{counts:?}");
    let resumed = Instant::now();
    agent.signal(Signal::SIGCONT);

    // Every connect is either a record or a counted drop. (The drop count
    // is read once a second; the last new record tells when the backlog
    // was written.)
    let mut last = (0, resumed);
    let (records, drops) = wait_for("records + drops to add up", Duration::from_secs(30), || {
        let records = decision_lines(&log);
        if records != last.0 {
            last = (records, Instant::now());
        }
        let drops = metric(&scrape(port), "idgate_event_ring_drops_total", "")? as u64;
        (records + drops == u64::from(FLOOD)).then_some((records, drops))
    });
    let drain_time = last.1 - resumed;
    assert!(drops > 0, "no drops: the ring buffer never filled");
    assert!(records > 0);
    assert!(
        agent.log().contains("decision records dropped"),
        "{}",
        agent.log()
    );
    // And the log says how many it lost.
    let lost: u64 = json_lines(&log)
        .iter()
        .filter(|e| e["kind"] == "lost")
        .inspect(|e| assert_schema(&events_schema(), e))
        .map(|e| e["records"].as_u64().unwrap())
        .sum();
    assert_eq!(lost, drops);
    // So a policy suggested from it says it cannot be complete.
    let suggested = agent
        .try_cli(&["policy", "suggest", "--from", log.to_str().unwrap()])
        .unwrap();
    assert!(
        suggested.contains(&format!("# INCOMPLETE: {drops} decision records were lost")),
        "{suggested}"
    );
    eprintln!(
        "flood: {FLOOD} denied connects in {flood_time:?} ({:.0}/s); {records} records, {drops} dropped; backlog written in {drain_time:?} ({:.0} records/s)",
        f64::from(FLOOD) / flood_time.as_secs_f64(),
        records as f64 / drain_time.as_secs_f64(),
    );

    // With the reader running, a flood the buffer can absorb loses nothing.
    const LIVE: u32 = 5_000;
    let started = Instant::now();
    let counts = repeat_counts(spawn_repeat(&web, LIVE, "tcp", &f.next_tcp4()));
    assert_eq!(counts.get("EPERM"), Some(&LIVE), "{counts:?}");
    let want = records + u64::from(LIVE);
    wait_for("the live flood's records", Duration::from_secs(30), || {
        (decision_lines(&log) >= want).then_some(())
    });
    let live_time = started.elapsed();
    let text = scrape(port);
    assert_eq!(
        metric(&text, "idgate_event_ring_drops_total", ""),
        Some(drops as f64),
        "the live flood dropped records"
    );
    eprintln!(
        "live: {LIVE} denied connects made and recorded in {live_time:?} ({:.0}/s)",
        f64::from(LIVE) / live_time.as_secs_f64()
    );
}

#[test]
fn an_audit_log_that_cannot_be_written_stops_the_agent_before_anything_is_attached() {
    require_privileges!();
    let cg = Cgroups::new("ev-badlog");
    let mut agent = Agent::prepare(
        &cg,
        "",
        "[events]\naudit_log = \"/proc/idgate-no-such-dir/audit.log\"\n",
    );
    let (ok, log) = agent.run_to_exit();
    assert!(!ok, "agent started:\n{log}");
    assert!(
        log.contains("audit log /proc/idgate-no-such-dir/audit.log"),
        "{log}"
    );
    assert!(agent.pinned_links().is_empty(), "something was attached");
    assert!(!agent.pin_dir.exists(), "pin dir was created");
}

#[test]
fn a_full_disk_is_counted_while_enforcement_goes_on() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("ev-full");
    let web = cg.inside("web");
    let port = free_loopback_port();
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    let agent = Agent::start(
        &cg,
        &policy(&f),
        &config(Path::new("/dev/full"), "", Some(port)),
    );
    for _ in 0..3 {
        assert_eq!(probe(Some(&web), "tcp", &f.next_tcp4()), "EPERM");
    }
    assert_eq!(probe(Some(&web), "tcp", &f.tcp4()), "ok");
    let lost = wait_for("lost records counted", Duration::from_secs(10), || {
        let lost = metric(&scrape(port), "idgate_audit_log_lost_records_total", "")?;
        (lost >= 3.0).then_some(lost)
    });
    assert_eq!(lost, 3.0);
    let log = agent.log();
    assert_eq!(log.matches("audit log write failed").count(), 1, "{log}");
}

#[test]
fn the_documented_examples_follow_the_events_schema() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.md")).unwrap();
    let validator = events_schema();
    let mut reasons = Vec::new();
    for block in doc.split("```json\n").skip(1) {
        let text = block.split("```").next().unwrap();
        let e: Value = serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}:\n{text}"));
        assert_schema(&validator, &e);
        let what = match e["kind"].as_str() {
            Some(kind) => format!(
                "{kind} {}",
                e.get("action")
                    .or(e.get("source"))
                    .unwrap()
                    .as_str()
                    .unwrap()
            ),
            None => e["reason"].as_str().unwrap().to_owned(),
        };
        reasons.push(what);
    }
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "audit_allowed",
            "audit_allowed",
            "default",
            "grant",
            "grant expired",
            "grant granted",
            "lost ring_buffer",
            "no_policy",
            "revoked",
            "rule",
            "unknown_workload"
        ]
    );
}
