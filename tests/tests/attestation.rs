//! Attestation end to end: real processes with real uids and executables
//! in real cgroups get the identities their registration entries say, and
//! the kernel judges their connects by them.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use idgate_tests::{Agent, Cgroups, Workload, require_privileges, target_bin, wait_for};

const ALPHA: &str = "spiffe://example.org/alpha";
const BETA: &str = "spiffe://example.org/beta";
const OTHER_UID: u32 = 4321;

/// Two listeners; ALPHA may reach the first, BETA the second.
struct Fixture {
    _a: TcpListener,
    _b: TcpListener,
    a: String,
    b: String,
}

impl Fixture {
    fn new() -> Self {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        Self {
            a: a.local_addr().unwrap().to_string(),
            b: b.local_addr().unwrap().to_string(),
            _a: a,
            _b: b,
        }
    }

    fn policy(&self) -> String {
        let rule = |id: &str, addr: &str| {
            let port = addr.rsplit_once(':').unwrap().1;
            format!(
                "[[identity]]\nid = \"{id}\"\n[[identity.egress]]\nname = \"to-{port}\"\nto = [\"127.0.0.1/32\"]\nports = [{port}]\nprotocol = \"tcp\"\naction = \"allow\"\n"
            )
        };
        format!("{}{}", rule(ALPHA, &self.a), rule(BETA, &self.b))
    }
}

fn entry(id: &str, selectors: &[String], ttl: Option<&str>) -> String {
    let sel: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
    let ttl = ttl.map(|t| format!("ttl = {t:?}\n")).unwrap_or_default();
    format!(
        "[[entry]]\nid = {id:?}\nselectors = [{}]\n{ttl}",
        sel.join(", ")
    )
}

fn path_sel(cg: &Cgroups, rel: &str) -> String {
    format!("cgroup:path:/{}/{rel}", cg.scope_rel())
}

fn state_of(agent: &Agent, dir: &Path, state: &'static str) -> serde_json::Value {
    agent.wait_workload(dir, state, |w| w["state"] == state)
}

/// Starts an agent whose entries are written before it starts.
fn agent_with(cg: &Cgroups, policy: &str, entries: &str) -> Agent {
    let mut agent = Agent::prepare(cg, policy, "resync_seconds = 1\n");
    agent.write_entries(entries);
    agent.spawn();
    agent.wait_ready();
    agent
}

#[test]
fn processes_get_the_identity_of_their_uid_and_executable() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("att-unix");
    let a = cg.inside("a");
    let b = cg.inside("b");
    let probe = target_bin("idgate-probe");
    let entries = format!(
        "{}{}",
        entry(
            ALPHA,
            &[
                path_sel(&cg, "a"),
                "unix:uid:0".into(),
                format!("unix:path:{}", probe.display()),
            ],
            None,
        ),
        entry(
            BETA,
            &[path_sel(&cg, "b"), format!("unix:uid:{OTHER_UID}")],
            None,
        ),
    );
    let agent = agent_with(&cg, &f.policy(), &entries);

    let mut root_probe = Workload::start(None);
    root_probe.move_to(&a);
    let row = state_of(&agent, &a, "attested");
    assert_eq!(row["id"], ALPHA);
    assert_eq!(row["pids"][0], root_probe.pid());
    let selectors = row["selectors"].to_string();
    assert!(
        selectors.contains("unix:uid:0") && selectors.contains("unix:path:"),
        "{selectors}"
    );
    assert_eq!(root_probe.call("tcp", &f.a), "ok");
    assert_eq!(root_probe.call("tcp", &f.b), "EPERM");

    let mut other = Workload::start(Some(OTHER_UID));
    other.move_to(&b);
    assert_eq!(state_of(&agent, &b, "attested")["id"], BETA);
    assert_eq!(other.call("tcp", &f.b), "ok");
    assert_eq!(other.call("tcp", &f.a), "EPERM");

    // The same uid-4321 process in cgroup a does not match ALPHA's uid and
    // executable selectors: a has a process attesting to nothing beside one
    // attesting to ALPHA, so a is a conflict, and both are denied.
    other.move_to(&a);
    let row = state_of(&agent, &a, "conflict");
    assert_eq!(row["candidates"][0], ALPHA);
    assert_eq!(root_probe.call("tcp", &f.a), "EPERM");
    assert_eq!(other.call("tcp", &f.a), "EPERM");
    // b is empty now: an empty cgroup matches no unix: selector.
    state_of(&agent, &b, "unknown");
}

#[test]
fn a_cgroup_is_denied_until_every_process_attests_and_never_bound_early() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("att-early");
    let c = cg.inside("c");
    let probe = target_bin("idgate-probe");
    let entries = entry(
        ALPHA,
        &[path_sel(&cg, "c"), format!("unix:path:{}", probe.display())],
        None,
    );
    let agent = agent_with(&cg, &f.policy(), &entries);

    // A process that does not match is in the cgroup first; the workload
    // that would match joins it. The cgroup gets no identity while the
    // stranger is there, however often it is attested.
    let mut stranger = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    std::fs::write(c.join("cgroup.procs"), stranger.id().to_string()).unwrap();
    let mut w = Workload::start(None);
    w.move_to(&c);
    state_of(&agent, &c, "conflict");
    for _ in 0..5 {
        assert_eq!(w.call("tcp", &f.a), "EPERM");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(state_of(&agent, &c, "conflict")["state"], "conflict");

    // Once only the matching workload is left, it is bound and let through.
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    assert_eq!(state_of(&agent, &c, "attested")["id"], ALPHA);
    assert_eq!(w.call("tcp", &f.a), "ok");
}

#[test]
fn a_process_moving_to_another_cgroup_is_judged_by_its_new_identity() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("att-move");
    let m1 = cg.inside("m1");
    let m2 = cg.inside("m2");
    let entries = format!(
        "{}{}",
        entry(ALPHA, &[path_sel(&cg, "m1")], None),
        entry(BETA, &[path_sel(&cg, "m2")], None)
    );
    let agent = agent_with(&cg, &f.policy(), &entries);
    state_of(&agent, &m2, "attested");
    let mut w = Workload::start(None);
    w.move_to(&m1);
    state_of(&agent, &m1, "attested");
    assert_eq!(w.call("tcp", &f.a), "ok");
    assert_eq!(w.call("tcp", &f.b), "EPERM");
    // The workload moves itself (it runs as root here; a managed workload
    // must not have write access to cgroup.procs, see docs/architecture.md).
    assert_eq!(w.join(&m2), "ok");
    assert_eq!(w.call("tcp", &f.b), "ok");
    assert_eq!(w.call("tcp", &f.a), "EPERM");
}

#[test]
fn a_binding_expires_after_its_ttl_and_stays_expired() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("att-ttl");
    let t = cg.inside("t");
    // The executable selector keeps the empty cgroup unbound: the TTL
    // starts when the workload joins.
    let probe = target_bin("idgate-probe");
    let agent = agent_with(
        &cg,
        &f.policy(),
        &entry(
            ALPHA,
            &[path_sel(&cg, "t"), format!("unix:path:{}", probe.display())],
            Some("4s"),
        ),
    );
    let mut w = Workload::start(None);
    w.move_to(&t);
    state_of(&agent, &t, "attested");
    assert_eq!(w.call("tcp", &f.a), "ok");
    state_of(&agent, &t, "expired");
    assert_eq!(w.call("tcp", &f.a), "EPERM");
    // Re-attestation (a reload re-reads entries and attests everything)
    // does not bring it back.
    agent.try_cli(&["policy", "reload"]).expect("reload");
    assert_eq!(state_of(&agent, &t, "expired")["id"], ALPHA);
    assert_eq!(w.call("tcp", &f.a), "EPERM");
}

#[test]
fn removed_cgroups_are_forgotten_and_unbound() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("att-rm");
    let gone = cg.inside("gone");
    let agent = agent_with(
        &cg,
        &f.policy(),
        &entry(ALPHA, &[path_sel(&cg, "gone")], None),
    );
    state_of(&agent, &gone, "attested");
    let workloads_before = agent.status()["workloads"].as_u64().unwrap();
    std::fs::remove_dir(&gone).unwrap();
    wait_for(
        "the removed cgroup to be forgotten",
        Duration::from_secs(10),
        || {
            let bound = agent.status()["workloads"].as_u64().unwrap();
            (bound + 1 == workloads_before).then_some(())
        },
    );
    assert!(
        agent
            .workloads()
            .iter()
            .all(|w| !w["path"].as_str().unwrap().ends_with("/gone")),
        "{:?}",
        agent.workloads()
    );
}

#[test]
fn idgate_run_starts_a_command_with_an_identity_and_cleans_up() {
    require_privileges!();
    let f = Fixture::new();
    let cg = Cgroups::new("att-run");
    let agent = agent_with(&cg, &f.policy(), "");
    let probe = target_bin("idgate-probe");
    let probe = probe.to_str().unwrap();
    let out = agent
        .try_cli(&["run", "--identity", BETA, "--", probe, "tcp", &f.b])
        .expect("idgate run");
    assert_eq!(out.trim(), "ok");
    let out = agent
        .try_cli(&["run", "--identity", BETA, "--", probe, "tcp", &f.a])
        .expect("idgate run");
    assert_eq!(out.trim(), "EPERM");
    // The command's exit code comes back.
    let status = std::process::Command::new(target_bin("idgate"))
        .args(["run", "--identity", BETA, "--socket"])
        .arg(&agent.socket)
        .args(["--", "sh", "-c", "exit 3"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    // A bad identity is refused before anything runs.
    let err = agent
        .try_cli(&[
            "run",
            "--identity",
            "spiffe://Bad",
            "--",
            probe,
            "tcp",
            &f.b,
        ])
        .expect_err("bad identity");
    assert!(err.contains("spiffe://Bad"), "{err}");
    // Every run's cgroup is removed once its command has exited.
    wait_for("run cgroups to be removed", Duration::from_secs(10), || {
        let left: Vec<_> = std::fs::read_dir(cg.scope_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("idgate-run-"))
            .collect();
        left.is_empty().then_some(())
    });
}
