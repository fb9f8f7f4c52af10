//! Operating a running agent: atomic reload under load, a refused reload,
//! the control socket's authorisation, and revocation.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use idgate_tests::{
    Agent, Cgroups, probe, repeat_counts, require_privileges, spawn_repeat, target_bin,
};
use nix::sys::signal::Signal;

const WEB: &str = "spiffe://example.org/web";

fn binding() -> String {
    format!("[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n")
}

/// `web` may reach `port` on 127.0.0.1 (allow = true) or nothing.
fn policy(port: u16, allow: bool) -> String {
    let action = if allow { "allow" } else { "deny" };
    format!(
        "[[identity]]\nid = \"{WEB}\"\n[[identity.egress]]\nname = \"local-{action}\"\nto = [\"127.0.0.1/32\"]\nports = [{port}]\nprotocol = \"tcp\"\naction = \"{action}\"\n"
    )
}

#[test]
fn reloads_switch_atomically_under_a_connect_loop() {
    require_privileges!();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and drop connections so the backlog never fills.
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let mut cg = Cgroups::new("reload");
    let web = cg.inside("web");
    let agent = Agent::start(&cg, &policy(port, true), &binding());
    let dest = format!("127.0.0.1:{port}");
    assert_eq!(probe(Some(&web), "tcp", &dest), "ok");

    // A reloader switches between the two policies every 20 ms for as
    // long as the connect loop runs, so the loop always spans reloads.
    const CONNECTS: u32 = 20_000;
    let looping = spawn_repeat(&web, CONNECTS, "tcp", &dest);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let (stop, dir, socket) = (stop.clone(), agent.dir.clone(), agent.socket.clone());
        std::thread::spawn(move || {
            let mut generations = Vec::new();
            let mut allow = true;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                allow = !allow;
                std::fs::write(dir.join("policy/policy.toml"), policy(port, allow)).unwrap();
                let out = std::process::Command::new(target_bin("idgate"))
                    .args(["policy", "reload", "--json", "--socket"])
                    .arg(&socket)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                generations.push(reply["generation"].as_u64().unwrap());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // End on the allowing policy.
            if !allow {
                std::fs::write(dir.join("policy/policy.toml"), policy(port, true)).unwrap();
                let out = std::process::Command::new(target_bin("idgate"))
                    .args(["policy", "reload", "--socket"])
                    .arg(&socket)
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
            generations
        })
    };
    let counts = repeat_counts(looping);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let generations = reloader.join().expect("reloader");
    // Every connect was judged by one of the two policies: allowed, or
    // denied by policy; none failed for any other reason.
    let other: u32 = counts
        .iter()
        .filter(|(k, _)| *k != "ok" && *k != "EPERM")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(other, 0, "{counts:?}");
    assert_eq!(counts.values().sum::<u32>(), CONNECTS, "{counts:?}");
    assert!(generations.len() >= 2, "{generations:?}");
    // The loop ran across the reloads: it saw both policies.
    assert!(
        counts.contains_key("ok") && counts.contains_key("EPERM"),
        "{counts:?}"
    );
    // The generation's number grows with every reload.
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );
    // The last reload allowed: the kernel agrees now.
    assert_eq!(probe(Some(&web), "tcp", &dest), "ok");
    let status = agent.status();
    assert!(status["reloads"].as_u64().unwrap() >= generations.len() as u64);
    eprintln!(
        "connect outcomes during {} reloads: {counts:?}",
        generations.len()
    );
}

/// Reloads that change one identity's rule, one after another, are each
/// in force when answered: its tries are changed in place in the
/// generation switched to (no new tries), so each reload must leave both
/// generations right, with rules changed, added and removed.
#[test]
fn one_rule_changes_are_each_in_force_when_the_reload_answers() {
    require_privileges!();
    // The extra rule's address is one no other rule covers, so an entry
    // left behind by its removal would still allow it.
    let listeners: Vec<TcpListener> = ["127.0.0.1:0", "127.0.0.1:0", "127.0.0.2:0"]
        .iter()
        .map(|a| TcpListener::bind(a).unwrap())
        .collect();
    let dests: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let mut cg = Cgroups::new("inplace");
    let web = cg.inside("web");
    // Port `ports[i]` allowed, and with `extra` another rule for the
    // third listener.
    let policy_of = |i: usize, extra: bool| {
        let mut text = policy(ports[i], true);
        if extra {
            text.push_str(&format!(
                "[[identity.egress]]\nname = \"extra\"\nto = [\"127.0.0.2/32\"]\nports = [{}]\nprotocol = \"tcp\"\naction = \"allow\"\n",
                ports[2]
            ));
        }
        text
    };
    let agent = Agent::start(&cg, &policy_of(0, false), &binding());
    for round in 0..12 {
        let (i, extra) = (round % 2, round % 3 == 1);
        agent.write_policy(&policy_of(i, extra));
        agent.try_cli(&["policy", "reload"]).expect("reload");
        let seen: Vec<String> = dests.iter().map(|d| probe(Some(&web), "tcp", d)).collect();
        let want: Vec<&str> = (0..3)
            .map(|p| {
                if p == i || (p == 2 && extra) {
                    "ok"
                } else {
                    "EPERM"
                }
            })
            .collect();
        assert_eq!(
            seen, want,
            "round {round}: port {i} allowed, extra rule {extra}"
        );
    }
    drop(listeners);
}

/// `policy(port, true)` and `identities` more identity blocks of four
/// rules each: a policy that takes the agent seconds to compile and write.
fn large_policy(port: u16, identities: usize) -> String {
    let mut text = policy(port, true);
    for i in 0..identities {
        text.push_str(&format!(
            "[[identity]]\nid = \"spiffe://example.org/filler/{i}\"\n"
        ));
        for r in 0..4 {
            text.push_str(&format!(
                "[[identity.egress]]\nname = \"r{r}\"\nto = [\"10.{}.{}.0/24\"]\nports = [{}]\naction = \"allow\"\n",
                i / 256,
                i % 256,
                1000 + r
            ));
        }
    }
    text
}

/// The owner answers while a reload's generation is being compiled and
/// written off it: `status` shows the reload under way, and a revocation
/// made meanwhile is answered and denies at once, before the reload's own
/// answer comes. Ordering, not timing: a round whose reload finished
/// before the revocation was answered proves nothing and is made again.
#[test]
fn revocations_and_status_are_answered_during_a_reload() {
    require_privileges!();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cg = Cgroups::new("busy");
    let web = cg.inside("web");
    let agent = Agent::start(&cg, &large_policy(port, 5_000), &binding());
    let dest = format!("127.0.0.1:{port}");
    assert_eq!(probe(Some(&web), "tcp", &dest), "ok");
    for round in 0..5 {
        let reload = {
            let (idgate, socket) = (target_bin("idgate"), agent.socket.clone());
            std::thread::spawn(move || {
                Command::new(idgate)
                    .args(["policy", "reload", "--socket"])
                    .arg(&socket)
                    .output()
                    .unwrap()
            })
        };
        // Status comes from the owner's snapshot: it says when a
        // generation is being written.
        let mut seen_reloading = false;
        while !reload.is_finished() && !seen_reloading {
            seen_reloading = agent.status()["reloading"] == true;
        }
        let revoked = seen_reloading
            && agent.try_cli(&["revoke", WEB]).is_ok()
            && probe(Some(&web), "tcp", &dest) == "EPERM";
        let during = revoked && !reload.is_finished();
        let out = reload.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if revoked {
            // The reload does not undo a revocation made during it.
            assert_eq!(probe(Some(&web), "tcp", &dest), "EPERM");
            agent.try_cli(&["unrevoke", WEB]).expect("unrevoke");
            assert_eq!(probe(Some(&web), "tcp", &dest), "ok");
        }
        if during {
            eprintln!("round {round}: revoked and denied while the reload was written");
            return;
        }
    }
    panic!("in 5 reloads, no revocation was answered while a reload was under way");
}

#[test]
fn a_broken_policy_is_refused_and_the_running_one_stays() {
    require_privileges!();
    let mut cg = Cgroups::new("badreload");
    let web = cg.inside("web");
    let agent = Agent::start(&cg, &policy(9, false), &binding());
    let before = agent.status();
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.1:9"), "EPERM");

    agent.write_policy(&format!(
        "[[identity]]\nid = \"{WEB}\"\n[[identity.egress]]\nname = \"x\"\nto = [\"127.0.0.1/32\"]\nports = [\"9-1\"]\naction = \"allow\"\n"
    ));
    let err = agent
        .try_cli(&["policy", "reload"])
        .expect_err("a broken policy must be refused");
    assert!(err.contains("policy.toml"), "file not named: {err}");
    assert!(err.contains("reversed"), "problem not named: {err}");
    assert!(err.contains("policy.toml:6:"), "line not named: {err}");

    let after = agent.status();
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["reload_errors"], 1);
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.1:9"), "EPERM");
    // The daemon is still serving, and a good policy goes through.
    agent.write_policy(&policy(9, true));
    agent.try_cli(&["policy", "reload"]).expect("reload");
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.1:9"), "ECONNREFUSED");
}

/// Runs `idgate ARGS --socket S` as `uid` (primary group `uid`).
fn cli_as(uid: u32, agent: &Agent, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(target_bin("idgate"));
    cmd.uid(uid).gid(uid);
    run_cli(cmd, agent, args)
}

/// Runs `idgate ARGS --socket S` as `uid` with primary group `uid` and
/// the supplementary `groups`.
fn cli_with_groups(uid: u32, groups: u32, agent: &Agent, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg(format!("--groups={groups}"))
        .arg(target_bin("idgate"));
    run_cli(cmd, agent, args)
}

/// Runs `cmd ARGS --socket S`: whether it succeeded, and what it printed.
fn run_cli(mut cmd: Command, agent: &Agent, args: &[&str]) -> (bool, String) {
    let out = cmd
        .args(args)
        .arg("--socket")
        .arg(&agent.socket)
        .output()
        .expect("run idgate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_control_socket_authorises_by_peer_credentials() {
    require_privileges!();
    const NOBODY: u32 = 65534;
    const OPERATOR: u32 = 4242;
    const OPERATORS_GROUP: u32 = 4444;
    const MEMBER: u32 = 4343;
    let cg = Cgroups::new("peercred");
    let agent = Agent::start(
        &cg,
        "",
        &format!("operator_uids = [{OPERATOR}]\noperator_gids = [{OPERATORS_GROUP}]\n"),
    );
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    // Open the directory and the socket to everyone, so that only the
    // agent's own SO_PEERCRED check stands between a caller and it.
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let (ok, out) = cli_as(NOBODY, &agent, &["status"]);
    assert!(!ok, "a non-operator was served: {out}");
    assert!(out.contains("uid 65534 is not an operator"), "{out}");
    let (ok, out) = cli_as(NOBODY, &agent, &["revoke", WEB]);
    assert!(!ok && out.contains("not an operator"), "{out}");
    assert!(agent.status()["revoked"].as_array().unwrap().is_empty());
    assert!(
        agent
            .log()
            .contains("refused a caller that is not an operator")
    );

    let (ok, out) = cli_as(OPERATOR, &agent, &["status"]);
    assert!(ok, "the configured operator was refused: {out}");
    // A member of an operator group is one whether the group is its
    // primary group or a supplementary one; another group is not enough.
    let (ok, out) = cli_as(OPERATORS_GROUP, &agent, &["status"]);
    assert!(ok, "the operator group as primary group was refused: {out}");
    let (ok, out) = cli_with_groups(MEMBER, OPERATORS_GROUP, &agent, &["status"]);
    assert!(
        ok,
        "the operator group as supplementary group was refused: {out}"
    );
    let (ok, out) = cli_with_groups(MEMBER, NOBODY, &agent, &["status"]);
    assert!(!ok && out.contains("uid 4343 is not an operator"), "{out}");
}

#[test]
fn a_granter_may_grant_within_its_duration_and_do_nothing_else() {
    require_privileges!();
    const GRANTER: u32 = 4545;
    const NOBODY: u32 = 65534;
    let cg = Cgroups::new("granter");
    let agent = Agent::start(
        &cg,
        "",
        &format!("[grants]\n[[grants.granters]]\nuids = [{GRANTER}]\nmax_duration = \"10m\"\n"),
    );
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let grant = |uid: u32, minutes: &str| {
        let args = [
            "grant",
            "--identity",
            WEB,
            "--to",
            "10.0.0.0/8",
            "--for",
            minutes,
            "--json",
        ];
        cli_as(uid, &agent, &args)
    };
    let id_of = |out: &str| -> String {
        let reply: serde_json::Value = serde_json::from_str(out).expect("grant reply is JSON");
        reply["grant"]["id"].to_string()
    };

    let (ok, out) = cli_as(GRANTER, &agent, &["status"]);
    assert!(!ok && out.contains("uid 4545 may only grant"), "{out}");
    let (ok, out) = cli_as(GRANTER, &agent, &["revoke", WEB]);
    assert!(!ok && out.contains("may only grant"), "{out}");
    assert!(agent.status()["revoked"].as_array().unwrap().is_empty());
    let (ok, out) = grant(GRANTER, "1h");
    assert!(!ok && out.contains("at most 10m"), "{out}");
    let (ok, out) = grant(NOBODY, "5m");
    assert!(!ok && out.contains("not an operator"), "{out}");

    let (ok, own) = grant(GRANTER, "5m");
    assert!(ok, "{own}");
    let own = id_of(&own);
    let (ok, theirs) = grant(0, "5m");
    assert!(ok, "{theirs}");
    let theirs = id_of(&theirs);
    let (ok, out) = cli_as(GRANTER, &agent, &["grants"]);
    assert!(ok, "{out}");
    let (ok, out) = cli_as(GRANTER, &agent, &["grant", "--revoke", &theirs]);
    assert!(!ok && out.contains("its own grants"), "{out}");
    let (ok, out) = cli_as(GRANTER, &agent, &["grant", "--extend", &own, "--for", "9m"]);
    assert!(ok, "{out}");
    let (ok, out) = cli_as(GRANTER, &agent, &["grant", "--revoke", &own]);
    assert!(ok, "{out}");
    let running = agent.try_cli(&["grants", "--json"]).expect("grants");
    let running: serde_json::Value = serde_json::from_str(&running).expect("grants is JSON");
    let ids: Vec<String> = running["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .map(|g| g["id"].to_string())
        .collect();
    assert_eq!(
        ids,
        [theirs],
        "the granter's own grant is revoked, root's runs"
    );
}

#[test]
fn malformed_and_oversized_requests_get_errors_and_the_daemon_keeps_serving() {
    require_privileges!();
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let cg = Cgroups::new("badrequest");
    let agent = Agent::start(&cg, "", "");
    // With no operator groups, only root (the agent's owner) opens it.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let ask = |bytes: &[u8]| -> String {
        let mut s = UnixStream::connect(&agent.socket).unwrap();
        // The daemon may answer and close before reading everything.
        let _ = s.write_all(bytes);
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    for (req, want) in [
        (&b"{not json\n"[..], "malformed"),
        (
            b"{\"version\":3,\"command\":\"format_disk\"}\n",
            "format_disk",
        ),
        (b"{\"version\":9,\"command\":\"status\"}\n", "version 9"),
        // An idgate CLI of the first protocol asks a newer agent.
        (
            b"{\"version\":1,\"command\":\"status\"}\n",
            "CLI speaks control protocol version 1 and this agent speaks version 3",
        ),
        (b"{\"command\":\"status\"}\n", "no `version`"),
    ] {
        let reply = ask(req);
        assert!(
            reply.contains("\"ok\":false") && reply.contains(want),
            "{reply}"
        );
    }
    let mut big = vec![b' '; 70 * 1024];
    big.push(b'\n');
    let reply = ask(&big);
    assert!(reply.contains("larger than"), "{reply}");
    assert!(agent.try_cli(&["status"]).is_ok());
}

#[test]
fn revocation_denies_at_once_and_holds_across_reload_and_restart() {
    require_privileges!();
    let mut cg = Cgroups::new("revoke");
    let web = cg.inside("web");
    let web = Some(web.as_path());
    let mut agent = Agent::start(&cg, &policy(9, true), &binding());
    assert_eq!(probe(web, "tcp", "127.0.0.1:9"), "ECONNREFUSED");

    let out = agent.try_cli(&["revoke", WEB]).expect("revoke");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(probe(web, "tcp", "127.0.0.1:9"), "EPERM");
    let explain = agent
        .try_cli(&["explain", "--identity", WEB, "--to", "127.0.0.1:9/tcp"])
        .unwrap();
    assert!(explain.contains("revoked"), "{explain}");

    agent.try_cli(&["policy", "reload"]).expect("reload");
    assert_eq!(probe(web, "tcp", "127.0.0.1:9"), "EPERM");

    agent.stop(Signal::SIGTERM);
    assert_eq!(probe(web, "tcp", "127.0.0.1:9"), "EPERM");
    agent.spawn();
    agent.wait_ready();
    assert_eq!(probe(web, "tcp", "127.0.0.1:9"), "EPERM");
    assert_eq!(agent.status()["revoked"][0], WEB);

    agent.try_cli(&["unrevoke", WEB]).expect("unrevoke");
    assert_eq!(probe(web, "tcp", "127.0.0.1:9"), "ECONNREFUSED");
}

#[test]
fn explain_names_the_deciding_rule() {
    require_privileges!();
    let cg = Cgroups::new("explain");
    let agent = Agent::start(&cg, &policy(443, true), &binding());
    let run = |to: &str| {
        agent
            .try_cli(&["explain", "--identity", WEB, "--to", to, "--json"])
            .map(|o| serde_json::from_str::<serde_json::Value>(&o).unwrap())
    };
    let r = run("127.0.0.1:443/tcp").unwrap();
    assert_eq!(r["verdict"], "allow");
    assert_eq!(r["rule"], "local-allow");
    let r = run("127.0.0.1:443/udp").unwrap();
    assert_eq!(r["verdict"], "deny");
    assert_eq!(r["rule"], "default");
    let r = run("[::ffff:127.0.0.1]:443").unwrap();
    assert_eq!(r["verdict"], "allow");
    // A name: no rule names it, so nothing is learned for it and a
    // connect to its addresses gets the default.
    let r = run("localhost:443").unwrap();
    assert_eq!(r["verdict"], "deny");
    assert!(r.get("pattern").is_none(), "{r}");
    assert_eq!(r["learned"], serde_json::json!([]));
    let e = run("local host:443").unwrap_err();
    assert!(
        e.contains("not ADDR:PORT or NAME:PORT") || e.contains("local host"),
        "{e}"
    );
    let e = run("localhost").unwrap_err();
    assert!(e.contains("not ADDR:PORT or NAME:PORT"), "{e}");
}

#[test]
fn idgate_events_shows_and_follows_decisions_with_filters() {
    require_privileges!();
    use std::io::{BufRead, BufReader};
    let mut cg = Cgroups::new("evcli");
    let web = cg.inside("web");
    let stranger = cg.inside("stranger");
    let agent = Agent::start(&cg, &policy(9, false), &binding());
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.1:9"), "EPERM");

    // Following from now: recent decisions first, then new ones.
    let mut follow = Command::new(target_bin("idgate"))
        .args([
            "events",
            "--follow",
            "--json",
            "--verdict",
            "deny",
            "--socket",
        ])
        .arg(&agent.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["identity"], WEB);
    assert_eq!(first["verdict"], "deny");
    assert_eq!(probe(Some(&stranger), "tcp", "127.0.0.1:9"), "EPERM");
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(second["identity"].is_null(), "{second}");
    assert_eq!(second["reason"], "unknown_workload");
    follow.kill().unwrap();
    follow.wait().unwrap();

    // Without --follow: the recent ones, filtered, in a person's words.
    let out = agent
        .try_cli(&["events", "--identity", WEB])
        .expect("idgate events");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("deny") && out.contains(WEB) && out.contains("127.0.0.1:9/tcp"),
        "{out}"
    );
    let out = agent.try_cli(&["events", "--identity", "unknown"]).unwrap();
    assert!(
        out.contains("reason=unknown_workload") && !out.contains(WEB),
        "{out}"
    );
    let err = agent
        .try_cli(&["events", "--verdict", "maybe"])
        .unwrap_err();
    assert!(err.contains("not allow or deny"), "{err}");
}
