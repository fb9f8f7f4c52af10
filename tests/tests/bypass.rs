//! Every known way around cgroup socket hooks, each done for real by a
//! workload whose policy denies the destination: each must end denied
//! (and leave a decision record), or be shown impossible from inside the
//! workload. See docs/architecture.md, "Which cgroup decides".

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use idgate_tests::{
    Agent, Cgroups, PINNED_LINKS, Workload, json_lines, probe, require_privileges, target_bin,
    wait_for,
};

const ALPHA: &str = "spiffe://example.org/alpha";
const BETA: &str = "spiffe://example.org/beta";
const NOBODY: u32 = 65534;

/// A TCP and a UDP listener on one port; ALPHA may reach them, BETA and
/// unknown workloads may not. BETA may make raw sockets.
struct Fixture {
    _tcp: TcpListener,
    _udp: UdpSocket,
    port: u16,
}

impl Fixture {
    fn new() -> Self {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let udp = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        Self {
            _tcp: tcp,
            _udp: udp,
            port,
        }
    }

    fn dest(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn policy(&self) -> String {
        format!(
            "[[identity]]\nid = \"{ALPHA}\"\n[[identity.egress]]\nname = \"alpha-local\"\nto = [\"127.0.0.1/32\"]\nports = [{}]\naction = \"allow\"\n\
             [[identity]]\nid = \"{BETA}\"\nraw_sockets = true\n",
            self.port
        )
    }
}

fn start(cg: &Cgroups, f: &Fixture, log: &Path) -> Agent {
    let config = format!(
        "[[workload]]\ncgroup = \"alpha\"\nidentity = \"{ALPHA}\"\n\
         [[workload]]\ncgroup = \"beta\"\nidentity = \"{BETA}\"\n\
         [events]\naudit_log = {log:?}\n"
    );
    Agent::start(cg, &f.policy(), &config)
}

fn audit_log(cg: &Cgroups) -> PathBuf {
    std::env::temp_dir().join(format!("{}-audit.log", cg.scope_rel()))
}

#[test]
fn every_connect_path_is_judged_and_recorded() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("bp-paths");
    let alpha = cg.inside("alpha");
    let beta = cg.inside("beta");
    let log = audit_log(&cg);
    let _agent = start(&cg, &f, &log);
    let dest = f.dest();
    let ops = [
        "tcp",
        "tfo-sendto",
        "tfo-connect",
        "mptcp",
        "uring-connect",
        "udp-sendto",
        "udp-connect",
        "udp-connect-send",
    ];
    for op in ops {
        assert_eq!(
            probe(Some(&alpha), op, &dest),
            "ok",
            "{op} from the allowed identity"
        );
        assert_eq!(
            probe(Some(&beta), op, &dest),
            "EPERM",
            "{op} from the denied identity"
        );
    }
    // One deny record per attempt, each naming the denied identity.
    let denied = wait_for(
        "a deny record for every attempt",
        Duration::from_secs(10),
        || {
            let records: Vec<_> = json_lines(&log)
                .into_iter()
                .filter(|r| r["verdict"] == "deny" && r["identity"] == BETA)
                .collect();
            (records.len() >= ops.len()).then_some(records)
        },
    );
    assert_eq!(denied.len(), ops.len(), "{denied:#?}");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn raw_sockets_are_refused_and_packet_sockets_need_cap_net_raw() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("bp-raw");
    let alpha = cg.inside("alpha");
    let beta = cg.inside("beta");
    let outside = cg.outside("outside");
    let log = audit_log(&cg);
    let _agent = start(&cg, &f, &log);
    // Even a root workload may not make a raw inet socket in the scope.
    assert_eq!(probe(Some(&alpha), "raw4", "-"), "EPERM");
    assert_eq!(probe(Some(&outside), "raw4", "-"), "ok");
    // Unless its identity's policy allows them.
    assert_eq!(probe(Some(&beta), "raw4", "-"), "ok");
    // Packet sockets reach no cgroup socket hook (and BPF LSM programs do
    // not load on every kernel): the kernel refuses them to a workload
    // without CAP_NET_RAW, as managed workloads must run.
    let mut w = Workload::start(Some(NOBODY));
    w.move_to(&alpha);
    assert_eq!(w.call("packet", "-"), "EPERM");
    assert_eq!(w.call("raw4", "-"), "EPERM");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn the_calling_cgroup_decides_for_moved_and_passed_sockets() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("bp-moved");
    let alpha = cg.inside("alpha");
    let beta = cg.inside("beta");
    let log = audit_log(&cg);
    let _agent = start(&cg, &f, &log);
    let dest = f.dest();

    // A socket made in alpha, used after the process moved to beta: beta
    // decides.
    let mut w = Workload::start(None);
    w.move_to(&alpha);
    assert_eq!(w.ask(&format!("hold {dest}")), "ok");
    w.move_to(&beta);
    assert_eq!(w.ask(&format!("connect-held {dest}")), "EPERM");
    // And the other way round.
    assert_eq!(w.ask(&format!("hold {dest}")), "ok");
    w.move_to(&alpha);
    assert_eq!(w.ask(&format!("connect-held {dest}")), "ok");

    // A socket made in alpha and passed over SCM_RIGHTS to a process in
    // beta: the process that connects, in beta, decides.
    let path = std::env::temp_dir().join(format!("{}-pass.sock", cg.scope_rel()));
    let _ = std::fs::remove_file(&path);
    let mut sender = Workload::start(None);
    sender.move_to(&alpha);
    let mut receiver = Workload::start(None);
    receiver.move_to(&beta);
    assert_eq!(receiver.ask(&format!("listen-fd {}", path.display())), "ok");
    assert_eq!(sender.ask(&format!("hold {dest}")), "ok");
    assert_eq!(sender.ask(&format!("send-held {}", path.display())), "ok");
    assert_eq!(receiver.ask("accept-fd"), "ok");
    assert_eq!(receiver.ask(&format!("connect-held {dest}")), "EPERM");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn a_workload_cannot_move_itself_or_touch_the_programs() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("bp-priv");
    let alpha = cg.inside("alpha");
    let beta = cg.inside("beta");
    let log = audit_log(&cg);
    let agent = start(&cg, &f, &log);
    let mut w = Workload::start(Some(NOBODY));
    w.move_to(&beta);
    // Moving to a cgroup whose identity may reach the destination needs
    // write access to cgroup.procs, which an unprivileged workload lacks.
    assert_eq!(w.join(&alpha), "EACCES");
    assert_eq!(w.call("tcp", &f.dest()), "EPERM");
    // Taking hold of a pinned link, to detach or replace the program,
    // needs privileges it does not have either.
    for link in agent.pinned_links() {
        let pin = agent.pin_dir.join(&link);
        let answer = w.call("detach-link", pin.to_str().unwrap());
        assert!(answer == "EACCES" || answer == "EPERM", "{link}: {answer}");
    }
    assert_eq!(agent.pinned_links().len(), PINNED_LINKS);
    // Still enforced.
    assert_eq!(w.call("tcp", &f.dest()), "EPERM");
    // Root could (the test checks the probe really would detach): the
    // guard is the privilege, not the probe failing.
    let pin = agent.pin_dir.join(&agent.pinned_links()[0]);
    let root = std::process::Command::new(target_bin("idgate-probe"))
        .args(["detach-link", pin.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&root.stdout).trim(), "ok");
    let _ = std::fs::remove_file(&log);
}
