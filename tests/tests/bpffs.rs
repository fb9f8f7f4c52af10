//! The BPF file system on a fresh machine, where nothing is mounted at
//! `/sys/fs/bpf`: agents that start together mount one bpffs between them,
//! a stacked mount is reported, and `idgate uninstall` mounts nothing.
//!
//! Each test makes a mount namespace of its own without bpffs
//! ([`MountNs`]), so none of the host's mounts is touched; cgroups and
//! attachments are the machine's as ever.

use idgate_tests::{
    Agent, Cgroups, MountNs, PINNED_LINKS, probe, require_privileges, require_tools,
};

const WEB: &str = "spiffe://example.org/web";

/// WEB may reach 127.0.0.1:9; nothing else.
const POLICY: &str = r#"
[[identity]]
id = "spiffe://example.org/web"

[[identity.egress]]
name = "local"
to = ["127.0.0.1/32"]
ports = [9]
action = "allow"
"#;

fn binding() -> String {
    format!("[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n")
}

/// The log lines of a stacked mount and of a mount (from the module
/// agent/src/bpf/bpffs.rs).
const STACKED: &str = "mounted on top of each other";
const MOUNTED: &str = "bpffs: mounted bpffs";

/// Every agent's every statfs(2) returns 300 ms late (strace injects the
/// delay; `-D` makes the agent the process the test started, `--seccomp-bpf`
/// stops it at statfs only): the look for bpffs and the mount that follows
/// it are far apart, so agents started together all look before any
/// mounts, and without the lock every one of them would mount.
const SLOW_STATFS: &[&str] = &[
    "strace",
    "-D",
    "-f",
    "--seccomp-bpf",
    "-qq",
    "-o",
    "/dev/null",
    "-e",
    "trace=statfs",
    "-e",
    "inject=statfs:delay_exit=300ms",
];

#[test]
fn agents_started_together_without_bpffs_mount_one_between_them() {
    require_privileges!();
    require_tools!("unshare", "nsenter", "strace");
    const AGENTS: usize = 4;
    let ns = MountNs::fresh();
    let mut cgroups: Vec<Cgroups> = (0..AGENTS)
        .map(|i| Cgroups::new(&format!("bpffs-race{i}")))
        .collect();
    let webs: Vec<_> = cgroups.iter_mut().map(|cg| cg.inside("web")).collect();
    let mut agents: Vec<Agent> = cgroups
        .iter()
        .map(|cg| {
            let mut agent = Agent::prepare(cg, POLICY, &binding());
            agent.run_in(&ns);
            agent.wrap_with(SLOW_STATFS);
            agent
        })
        .collect();
    // All at once: each finds no bpffs and goes for the mount.
    for agent in &mut agents {
        agent.spawn();
    }
    for agent in &mut agents {
        agent.wait_ready();
    }
    for (agent, web) in agents.iter().zip(&webs) {
        let mounts = ns.bpffs_mounts(agent.pid());
        assert_eq!(
            mounts.len(),
            1,
            "one bpffs at /sys/fs/bpf for every agent, not a stack: {mounts:#?}"
        );
        assert_eq!(
            agent.pinned_links().len(),
            PINNED_LINKS,
            "{:?}",
            agent.pin_path()
        );
        assert!(agent.pin_path().join("IDG_IDENTITIES").exists());
        assert!(!agent.log().contains(STACKED), "{}", agent.log());
        // Each enforces its own scope.
        assert_eq!(probe(Some(web), "tcp", "127.0.0.2:9"), "EPERM");
        assert_eq!(probe(Some(web), "tcp", "127.0.0.1:9"), "ECONNREFUSED");
    }
    let mounted = agents.iter().filter(|a| a.log().contains(MOUNTED)).count();
    assert_eq!(mounted, 1, "exactly one agent mounted bpffs");
    // The others found none at first, and one made meanwhile once it was
    // their turn: the race was run, not missed.
    let waited = agents
        .iter()
        .filter(|a| a.log().contains("mounted by another process meanwhile"))
        .count();
    assert!(waited >= 1, "no agent waited for another's mount");
    // The host's mount table is not the namespace's.
    assert_eq!(ns.bpffs_mounts(ns.pid()).len(), 1);
}

#[test]
fn a_stacked_bpffs_is_reported_and_the_agent_pins_on_the_top_one() {
    require_privileges!();
    require_tools!("unshare", "nsenter", "mount");
    let ns = MountNs::fresh();
    // Another program that mounts without looking first, twice.
    for _ in 0..2 {
        let status = ns
            .command("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t bpf failed");
    }
    assert_eq!(ns.bpffs_mounts(ns.pid()).len(), 2);
    let mut cg = Cgroups::new("bpffs-stack");
    let web = cg.inside("web");
    let mut agent = Agent::prepare(&cg, POLICY, &binding());
    agent.run_in(&ns);
    agent.spawn();
    agent.wait_ready();
    let log = agent.log();
    assert!(
        log.contains(&format!("2 bpf file systems are {STACKED}")),
        "{log}"
    );
    assert!(log.contains("ERROR"), "{log}");
    assert!(!log.contains(MOUNTED), "{log}");
    assert_eq!(
        ns.bpffs_mounts(agent.pid()).len(),
        2,
        "the agent mounts none"
    );
    assert_eq!(agent.pinned_links().len(), PINNED_LINKS);
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.2:9"), "EPERM");
}

#[test]
fn uninstall_where_no_bpffs_is_mounted_mounts_none_and_says_nothing_is_pinned() {
    require_privileges!();
    require_tools!("unshare", "nsenter");
    let ns = MountNs::fresh();
    let cg = Cgroups::new("bpffs-uninstall");
    let mut agent = Agent::prepare(&cg, POLICY, &binding());
    agent.run_in(&ns);
    let out = agent.uninstall().expect("uninstall");
    assert!(
        out.contains("no bpffs is mounted") && out.contains("nothing to remove"),
        "{out}"
    );
    assert!(
        ns.bpffs_mounts(ns.pid()).is_empty(),
        "uninstall mounted bpffs"
    );
}
