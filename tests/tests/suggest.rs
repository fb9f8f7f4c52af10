//! `idgate policy suggest` end to end: a workload in audit mode runs a
//! fixed script of connects (and lookups through the agent's DNS path);
//! the policy suggested from the audit log, loaded in enforce mode, lets
//! the same script through without one denial and denies a connect
//! outside it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use idgate_tests::dns::{DigQuery, DnsServer, NOWHERE, Resolver, Zone, connect, loopback_ip};
use idgate_tests::{
    Agent, Cgroups, Fixture, Listeners, assert_schema, events_schema, free_port, json_lines, probe,
    require_privileges, require_tools, target_bin, wait_for,
};

const CODER: &str = "spiffe://example.org/agents/coder";

/// The workload's script: TCP and UDP to loopback addresses and ports.
fn script(f: &Fixture) -> Vec<(&'static str, String)> {
    vec![
        ("tcp", format!("127.0.0.1:{}", f.tcp_port)),
        ("tcp", format!("127.0.0.2:{}", f.tcp_port)),
        ("tcp", format!("[::1]:{}", f.tcp_port)),
        ("tcp", format!("127.0.0.1:{}", f.udp_port)),
        ("udp-sendto", format!("127.0.0.1:{}", f.udp_port)),
        ("udp-connect", format!("127.0.0.3:{}", f.udp_port)),
    ]
}

/// Runs the script in `dir`; returns what the kernel answered each call.
fn run(dir: &Path, script: &[(&str, String)]) -> Vec<String> {
    script
        .iter()
        .map(|(op, addr)| probe(Some(dir), op, addr))
        .collect()
}

/// The policy both tests start from: the coder in audit mode, denying by
/// default (so every connect is recorded).
fn audit_policy() -> String {
    format!(
        "[unknown]\ndefault = \"deny\"\n\n[[identity]]\nid = \"{CODER}\"\ndefault = \"deny\"\naudit = true\n"
    )
}

/// The audit log of a test's agent, in a directory of its own under the
/// temporary directory, removed when the test ends (see [`Cleanup`]).
fn audit_log(cg: &Cgroups) -> (PathBuf, Cleanup) {
    let log = std::env::temp_dir().join(format!("{}-audit/audit.log", cg.scope_rel()));
    (log.clone(), Cleanup(log))
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

#[test]
fn a_suggested_policy_allows_the_script_it_saw_and_nothing_else() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("suggest");
    let coder = cg.inside("coder");
    let (log, _cleanup) = audit_log(&cg);
    let audit = audit_policy();
    let config = format!(
        "[[workload]]\ncgroup = \"coder\"\nidentity = \"{CODER}\"\n\
         [events]\naudit_log = {log:?}\n"
    );
    let agent = Agent::start(&cg, &audit, &config);
    let script = script(&f);

    // 1. Audit mode: nothing is denied, every connect is recorded.
    let audited = run(&coder, &script);
    assert!(!audited.contains(&"EPERM".to_owned()), "{audited:?}");
    wait_for("the script's records", Duration::from_secs(10), || {
        let n = json_lines(&log)
            .iter()
            .filter(|e| e["reason"] == "audit_allowed")
            .count();
        (n >= script.len()).then_some(())
    });

    // 2. The suggestion, from the log and from the agent, is the same.
    let suggested = agent
        .try_cli(&["policy", "suggest", "--from", log.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("suggest: {e}"));
    let from_agent = agent
        .try_cli(&["policy", "suggest", "--identity", CODER])
        .unwrap_or_else(|e| panic!("suggest: {e}"));
    assert_eq!(suggested, from_agent);
    assert!(
        suggested.contains(&format!("id = \"{CODER}\"")),
        "{suggested}"
    );
    assert!(!suggested.contains("audit ="), "{suggested}");

    // 3. Enforced, the same script runs with no denial...
    agent.write_policy(&format!("[unknown]\ndefault = \"deny\"\n{suggested}"));
    agent
        .try_cli(&["policy", "reload"])
        .unwrap_or_else(|e| panic!("reload of\n{suggested}\n{e}"));
    let before = json_lines(&log).len();
    let enforced = run(&coder, &script);
    assert_eq!(enforced, audited, "{suggested}");
    // ... and what it did not do is denied.
    let other_port = f.tcp_port.max(f.udp_port) + 1;
    for (op, addr) in [
        ("tcp", format!("127.0.0.1:{other_port}")),
        ("tcp", format!("127.0.0.4:{}", f.tcp_port)),
        ("udp-sendto", format!("127.0.0.4:{}", f.udp_port)),
    ] {
        assert_eq!(probe(Some(&coder), op, &addr), "EPERM", "{op} {addr}");
    }
    let records = wait_for("the three denials", Duration::from_secs(10), || {
        let lines = json_lines(&log);
        (lines.len() >= before + 3).then_some(lines)
    });
    std::thread::sleep(Duration::from_millis(300));
    let denials = json_lines(&log)[before..]
        .iter()
        .filter(|e| e["verdict"] == "deny" || e["reason"] == "audit_allowed")
        .count();
    assert_eq!(denials, 3, "{:#?}", &records[before..]);
}

/// The name the workload looks up in audit mode; no rule covers it.
const NAME: &str = "audit-only.test.example";

/// The workload's script with a lookup: it asks the agent's DNS path for
/// [`NAME`] (dig, in its cgroup), then connects to the address it got,
/// and to 127.0.0.1, which it never looked up. Returns the answer's
/// status and addresses, and the kernel's answer to each connect.
fn lookup_script(coder: &Path, port: u16) -> (Option<String>, Vec<IpAddr>, Vec<String>) {
    let answer = Resolver::new(&[NOWHERE])
        .in_cgroup(coder)
        .dig(&DigQuery::new(NAME));
    let mut connects: Vec<String> = answer
        .addrs
        .iter()
        .map(|a| connect(coder, &a.to_string(), port))
        .collect();
    connects.push(connect(coder, "127.0.0.1", port));
    (answer.status, answer.addrs, connects)
}

#[test]
fn a_suggested_policy_names_what_audit_mode_lookups_answered() {
    require_privileges!();
    require_tools!("dnsmasq", "dig", "unshare");
    let listeners = Listeners::new();
    let port = listeners.tcp_port;
    let named = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
    let zone = Zone::new()
        .host(NAME, &[named], 300)
        .nxdomain("test.example");
    let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone);
    let mut cg = Cgroups::new("suggest-dns");
    let coder = cg.inside("coder");
    let (log, _cleanup) = audit_log(&cg);
    let audit = audit_policy();
    // The test zone's addresses are loopback ones: learned only when
    // `private_answers` allows (else the record marks them, and suggest
    // keeps them as addresses).
    let config = format!(
        "[[workload]]\ncgroup = \"coder\"\nidentity = \"{CODER}\"\n\
         [events]\naudit_log = {log:?}\n\
         [dns]\nlisten_port = {}\nupstreams = [\"{}\"]\nprivate_answers = \"allow\"\n",
        free_port(),
        upstream.addr()
    );
    let agent = Agent::start(&cg, &audit, &config);

    // 1. Audit mode: the name no rule covers is forwarded and answered;
    // nothing is denied; the lookup's record carries what it answered.
    let (status, addrs, audited) = lookup_script(&coder, port);
    assert_eq!(status.as_deref(), Some("NOERROR"));
    assert_eq!(addrs, [named]);
    assert!(upstream.was_queried(NAME));
    assert_eq!(audited, ["allowed", "allowed"]);
    let records = wait_for("the script's records", Duration::from_secs(10), || {
        let lines = json_lines(&log);
        let lookup = lines.iter().any(|e| {
            e["hook"] == "dns"
                && e["dst_name"] == NAME
                && e["reason"] == "audit_allowed"
                && e["dns"]["answered"][0]["addr"] == "127.0.0.7"
                && e["dns"]["answered"][0]["ttl"] == 300
        });
        let connects = lines
            .iter()
            .filter(|e| e["hook"] == "connect4" && e["reason"] == "audit_allowed")
            .count();
        (lookup && connects >= 2).then_some(lines)
    });
    let schema = events_schema();
    for e in &records {
        assert_schema(&schema, e);
    }

    // 2. The suggestion, from the log and from the agent, is the same,
    // and writes the name, not its address.
    let suggested = agent
        .try_cli(&["policy", "suggest", "--from", log.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("suggest: {e}"));
    let from_agent = agent
        .try_cli(&["policy", "suggest", "--identity", CODER])
        .unwrap_or_else(|e| panic!("suggest: {e}"));
    assert_eq!(suggested, from_agent);
    let to: Vec<&str> = suggested
        .lines()
        .filter(|l| l.starts_with("to = "))
        .collect();
    assert_eq!(
        to,
        [format!("to = [\"127.0.0.1\", \"{NAME}\"]")],
        "{suggested}"
    );
    assert!(
        suggested.contains("#     for 127.0.0.7, which its lookup answered\n"),
        "{suggested}"
    );
    // `idgate policy check` takes it as it is.
    let file = log.with_file_name("suggested.toml");
    std::fs::write(&file, format!("[unknown]\ndefault = \"deny\"\n{suggested}")).unwrap();
    let check = Command::new(target_bin("idgate"))
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .expect("run idgate policy check");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // 3. Enforced, the same script runs with no denial: the lookup is
    // answered by the name rule, the connect allowed through the address
    // it learned.
    agent.write_policy(&format!("[unknown]\ndefault = \"deny\"\n{suggested}"));
    agent
        .try_cli(&["policy", "reload"])
        .unwrap_or_else(|e| panic!("reload of\n{suggested}\n{e}"));
    let before = json_lines(&log).len();
    let (status, addrs, enforced) = lookup_script(&coder, port);
    assert_eq!(status.as_deref(), Some("NOERROR"));
    assert_eq!(addrs, [named]);
    assert_eq!(enforced, audited, "{suggested}");
    let answered = wait_for(
        "the enforced lookup's record",
        Duration::from_secs(10),
        || {
            json_lines(&log)[before..]
                .iter()
                .find(|e| e["hook"] == "dns" && e["dst_name"] == NAME)
                .cloned()
        },
    );
    assert_eq!(answered["reason"], "answered", "{answered}");
    assert_eq!(answered["rule"], NAME, "{answered}");
    // ... and an address the name did not answer is denied.
    assert_eq!(connect(&coder, "127.0.0.8", port), "EPERM");
    wait_for("the denial", Duration::from_secs(10), || {
        json_lines(&log)[before..]
            .iter()
            .any(|e| e["verdict"] == "deny")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let lines = json_lines(&log);
    let denials: Vec<_> = lines[before..]
        .iter()
        .filter(|e| e["verdict"] == "deny" || e["reason"] == "audit_allowed")
        .collect();
    assert_eq!(denials.len(), 1, "{denials:#?}");
    assert_eq!(denials[0]["dst_addr"], "127.0.0.8", "{denials:#?}");
}
