//! Faults: the agent killed mid-reload and restarted under load, pins
//! removed by hand, a full identities map.

use std::net::TcpListener;
use std::time::Duration;

use idgate_tests::{
    Agent, Cgroups, PINNED_LINKS, probe, repeat_counts, require_privileges, spawn_repeat, wait_for,
};
use nix::sys::signal::Signal;

const WEB: &str = "spiffe://example.org/web";

fn binding(cgroups: &[&str]) -> String {
    cgroups
        .iter()
        .map(|c| format!("[[workload]]\ncgroup = \"{c}\"\nidentity = \"{WEB}\"\n"))
        .collect()
}

/// WEB may reach `port` on 127.0.0.1, and `extra` /32s on port 9 (to make
/// the policy big); nothing else.
fn policy(port: u16, extra: u32) -> String {
    let mut p = format!(
        "[[identity]]\nid = \"{WEB}\"\n[[identity.egress]]\nname = \"local\"\nto = [\"127.0.0.1/32\"]\nports = [{port}]\nprotocol = \"tcp\"\naction = \"allow\"\n"
    );
    for i in 0..extra {
        p.push_str(&format!(
            "[[identity.egress]]\nname = \"bulk-{i}\"\nto = [\"10.{}.{}.{}/32\"]\nports = [9]\naction = \"allow\"\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    p
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Accept and drop connections so the backlog never fills.
    let accept = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for c in accept.incoming() {
            drop(c);
        }
    });
    (l, port)
}

#[test]
fn a_hundred_restarts_under_a_connect_loop_never_let_a_denied_connect_through() {
    require_privileges!();
    let (_l, port) = listener();
    let mut cg = Cgroups::new("flt-restart");
    let web = cg.inside("web");
    let mut agent = Agent::start(&cg, &policy(port, 0), &binding(&["web"]));
    let allowed = format!("127.0.0.1:{port}");
    let denied = format!("127.0.0.2:{port}");
    let (mut allowed_seen, mut denied_seen) = (0, 0);
    for round in 0..100 {
        let a = spawn_repeat(&web, 40, "tcp", &allowed);
        let d = spawn_repeat(&web, 40, "tcp", &denied);
        agent.stop(Signal::SIGKILL);
        agent.spawn();
        agent.wait_ready();
        let (a, d) = (repeat_counts(a), repeat_counts(d));
        assert_eq!(
            d.get("EPERM"),
            Some(&40),
            "round {round}: denied loop {d:?}"
        );
        assert_eq!(a.get("ok"), Some(&40), "round {round}: allowed loop {a:?}");
        allowed_seen += 40;
        denied_seen += 40;
    }
    assert_eq!(
        agent.status()["programs"]["adopted"]
            .as_array()
            .unwrap()
            .len(),
        PINNED_LINKS
    );
    eprintln!("{allowed_seen} allowed and {denied_seen} denied connects across 100 restarts");
}

/// An agent finds, where its connect4 link belongs, a link that holds
/// another program (here its own connect6 program: what an upgrade that
/// changed the programs looks like to the new agent). It does not adopt
/// it: it attaches its own program and puts it in that pin's place.
#[test]
fn a_pinned_link_holding_another_program_is_replaced_not_adopted() {
    require_privileges!();
    let (_l, port) = listener();
    let mut cg = Cgroups::new("flt-replace");
    let web = cg.inside("web");
    let mut agent = Agent::start(&cg, &policy(port, 0), &binding(&["web"]));
    agent.stop(Signal::SIGTERM);
    let links = agent.pinned_links();
    let pin = |program: &str| {
        let name = links
            .iter()
            .find(|l| l.starts_with(&format!("{program}@")))
            .unwrap_or_else(|| panic!("no {program} link in {links:?}"));
        agent.pin_dir.join(name)
    };
    std::fs::rename(pin("idgate_connect6"), pin("idgate_connect4")).unwrap();
    // The connect4 program is detached: IPv4 goes unjudged; the connect6
    // program is still attached (pinned under the other name). The kernel
    // frees a link whose last pin is gone after an RCU grace period and a
    // workqueue pass, so the detach is waited for.
    wait_for(
        "the unpinned connect4 link to be freed",
        Duration::from_secs(10),
        || (probe(Some(&web), "tcp", "127.0.0.2:9") == "ECONNREFUSED").then_some(()),
    );
    assert_eq!(probe(Some(&web), "tcp", "[::1]:9"), "EPERM");
    // IPv6 stays judged while the agent starts and swaps the pins.
    let v6 = spawn_repeat(&web, 200, "tcp", "[::1]:9");
    agent.spawn();
    agent.wait_ready();
    assert_eq!(repeat_counts(v6).get("EPERM"), Some(&200));
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.2:9"), "EPERM");
    assert_eq!(probe(Some(&web), "tcp", &format!("127.0.0.1:{port}")), "ok");
    assert_eq!(probe(Some(&web), "tcp", "[::1]:9"), "EPERM");
    let programs = &agent.status()["programs"];
    assert_eq!(programs["replaced"], serde_json::json!(["idgate_connect4"]));
    assert_eq!(programs["attached"], serde_json::json!(["idgate_connect6"]));
    assert_eq!(agent.pinned_links(), links, "no staged pin is left");
    assert!(
        agent
            .log()
            .contains("replaced a pinned link that held another program")
    );
    // Restarted again, it adopts all of them.
    agent.stop(Signal::SIGTERM);
    agent.spawn();
    agent.wait_ready();
    let adopted = agent.status()["programs"]["adopted"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(adopted, PINNED_LINKS);
}

#[test]
fn sigkill_mid_reload_keeps_enforcement_and_a_consistent_generation() {
    require_privileges!();
    let (_l, port) = listener();
    let mut cg = Cgroups::new("flt-reload");
    let web = cg.inside("web");
    let mut agent = Agent::start(&cg, &policy(port, 0), &binding(&["web"]));
    let allowed = format!("127.0.0.1:{port}");
    // The new policy is big (its reload takes a while) and still allows
    // the same destination.
    let attempts = kill_mid_reload(
        &mut agent,
        &policy(port, 0),
        &policy(port, 30_000),
        Duration::from_millis(150),
    );
    eprintln!("the kill landed mid-reload: {attempts:?}");
    // Whichever generation is active, it is whole: the allowed destination
    // connects, the rest is denied.
    assert_eq!(probe(Some(&web), "tcp", &allowed), "ok");
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.2:9"), "EPERM");
    // A restarted agent applies the files as they are.
    agent.spawn();
    agent.wait_ready();
    assert_eq!(probe(Some(&web), "tcp", &allowed), "ok");
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.2:9"), "EPERM");
    let rules = agent.status()["rules"].as_u64().unwrap();
    assert_eq!(rules, 30_001);
}

/// Where a SIGKILL `delay` after `idgate policy reload` was sent landed.
#[derive(Debug, PartialEq)]
enum Landed {
    /// Before the agent read the request: the reload could not connect,
    /// or its request was still unread (ECONNRESET).
    Early(Duration, String),
    /// Mid-reload: the agent read the request and died before it
    /// answered, and it never logged the reload's end.
    Mid(Duration),
    /// After the reload ended (answered, or logged as ended).
    Late(Duration),
}

/// At most this many tries, for at most this long, to land the kill.
const KILL_TRIES: usize = 8;
const KILL_BUDGET: Duration = Duration::from_secs(240);

/// Kills the running agent (SIGKILL) while it reloads from its `small`
/// policy to the `big` one, `delay` after the reload is sent; when the
/// kill lands before or after the reload instead, it starts the agent on
/// `small` again and tries another delay (halfway between the latest
/// early and late ones once there are both), at most [`KILL_TRIES`] times
/// in [`KILL_BUDGET`]. Returns every try's outcome (the last one `Mid`),
/// leaves the agent stopped and `big` in its files; panics naming every
/// outcome when no kill lands mid-reload.
fn kill_mid_reload(agent: &mut Agent, small: &str, big: &str, delay: Duration) -> Vec<Landed> {
    let started = std::time::Instant::now();
    let (mut early, mut late): (Option<Duration>, Option<Duration>) = (None, None);
    let mut delay = delay;
    let mut tries = Vec::new();
    while tries.len() < KILL_TRIES && started.elapsed() < KILL_BUDGET {
        if !tries.is_empty() {
            agent.write_policy(small);
            agent.spawn();
            agent.wait_ready();
        }
        agent.write_policy(big);
        let log_before = agent.log().len();
        let socket = agent.socket.clone();
        let reload = std::thread::spawn(move || {
            std::process::Command::new(idgate_tests::target_bin("idgate"))
                .args(["policy", "reload", "--socket"])
                .arg(&socket)
                .output()
                .expect("run idgate policy reload")
        });
        std::thread::sleep(delay);
        agent.stop(Signal::SIGKILL);
        let out = reload.join().expect("reload thread");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        let log = agent.log();
        let ended = ["policy reloaded", "policy reload refused"]
            .iter()
            .any(|end| log[log_before..].contains(end));
        let landed = if out.status.success() || ended {
            Landed::Late(delay)
        } else if said.contains("closed the connection without a reply") {
            Landed::Mid(delay)
        } else {
            Landed::Early(delay, said.trim().to_owned())
        };
        match landed {
            Landed::Mid(_) => {
                tries.push(landed);
                return tries;
            }
            Landed::Early(d, _) => early = Some(d),
            Landed::Late(d) => late = Some(d),
        }
        tries.push(landed);
        delay = match (early, late) {
            (Some(e), Some(l)) => (e + l) / 2,
            (Some(e), None) => e * 2,
            (None, Some(l)) => l / 2,
            (None, None) => unreachable!("a try was early or late"),
        };
    }
    panic!(
        "no SIGKILL landed mid-reload in {} tries ({:?}): {tries:#?}",
        tries.len(),
        started.elapsed()
    );
}

#[test]
fn pins_removed_by_hand_are_reported_and_put_back() {
    require_privileges!();
    let (_l, port) = listener();
    let mut cg = Cgroups::new("flt-pins");
    let web = cg.inside("web");
    let agent = Agent::start(
        &cg,
        &policy(port, 0),
        &format!("resync_seconds = 1\n{}", binding(&["web"])),
    );
    let links = agent.pinned_links();
    let connect4 = links
        .iter()
        .find(|l| l.starts_with("idgate_connect4@"))
        .unwrap();
    std::fs::remove_file(agent.pin_dir.join(connect4)).unwrap();
    std::fs::remove_file(agent.pin_dir.join("IDG_IDENTITIES")).unwrap();
    // The agent still holds the link: enforcement never stopped.
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.2:9"), "EPERM");
    let restored = wait_for("the pins to be put back", Duration::from_secs(10), || {
        let n = agent.status()["pins_restored"].as_u64().unwrap();
        (n >= 2).then_some(n)
    });
    assert_eq!(restored, 2);
    assert_eq!(agent.pinned_links(), links);
    assert!(agent.pin_dir.join("IDG_IDENTITIES").exists());
    assert!(agent.log().contains("pins were removed by hand"));
    // Uninstalling under a running agent is refused: it would put them back.
    let err = agent.uninstall().expect_err("uninstall while running");
    assert!(err.contains("stop it first"), "{err}");
}

#[test]
fn a_full_identities_map_denies_new_workloads_and_evicts_none() {
    require_privileges!();
    let (_l, port) = listener();
    let mut cg = Cgroups::new("flt-full");
    let dirs: Vec<_> = ["w1", "w2", "w3"].iter().map(|c| cg.inside(c)).collect();
    let agent = Agent::start(
        &cg,
        &policy(port, 0),
        &format!("max_workloads = 2\n{}", binding(&["w1", "w2", "w3"])),
    );
    let allowed = format!("127.0.0.1:{port}");
    let answers: Vec<String> = dirs
        .iter()
        .map(|d| probe(Some(d), "tcp", &allowed))
        .collect();
    assert_eq!(
        answers.iter().filter(|a| *a == "ok").count(),
        2,
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|a| *a == "EPERM").count(),
        1,
        "{answers:?}"
    );
    let status = agent.status();
    assert_eq!(status["bind_failures"], 1);
    let not_enforced: Vec<_> = agent
        .workloads()
        .into_iter()
        .filter(|w| w["enforced"] == false)
        .collect();
    assert_eq!(not_enforced.len(), 1);
    let denied_dir = &dirs[answers.iter().position(|a| a == "EPERM").unwrap()];
    assert!(
        denied_dir.ends_with(
            not_enforced[0]["path"]
                .as_str()
                .unwrap()
                .trim_start_matches('/')
                .rsplit('/')
                .next()
                .unwrap()
        )
    );
    assert!(agent.log().contains("cannot bind: the workload is denied"));
}
