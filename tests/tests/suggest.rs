//! `idgate policy suggest` end to end: a workload in audit mode runs a
//! fixed script of connects; the policy suggested from the audit log,
//! loaded in enforce mode, lets the same script through without one
//! denial and denies a connect outside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use idgate_tests::{Agent, Cgroups, Fixture, json_lines, probe, require_privileges, wait_for};

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
    let log = std::env::temp_dir().join(format!("{}-audit/audit.log", cg.scope_rel()));
    let _cleanup = Cleanup(log.clone());
    let audit = format!(
        "[unknown]\ndefault = \"deny\"\n\n[[identity]]\nid = \"{CODER}\"\ndefault = \"deny\"\naudit = true\n"
    );
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
