//! Attestation end to end: real processes with real uids and executables
//! in real cgroups get the identities their registration entries say, and
//! the kernel judges their connects by them.

use std::io::BufRead;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use idgate_tests::{Agent, Cgroups, Workload, require_privileges, target_bin, wait_for};
use nix::sys::signal::Signal;

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
fn the_first_workload_of_an_entry_is_bound_without_a_new_generation() {
    require_privileges!();
    let f = Fixture::new();
    let mut cg = Cgroups::new("att-slot");
    let agent = agent_with(&cg, &f.policy(), &entry(ALPHA, &[path_sel(&cg, "c")], None));
    // No cgroup is bound (c is not there yet), but the entry's identity
    // holds its slot and policy already (BETA, which no entry names, does
    // not).
    let before = agent.status();
    assert_eq!(before["workloads"], 0, "{before}");
    assert_eq!(before["identities"], 1, "{before}");

    let c = cg.inside("c");
    let mut w = Workload::start(None);
    w.move_to(&c);
    assert_eq!(state_of(&agent, &c, "attested")["id"], ALPHA);
    assert_eq!(w.call("tcp", &f.a), "ok");
    assert_eq!(w.call("tcp", &f.b), "EPERM");
    // Binding it was one map update: the policy generation is the same.
    let after = agent.status();
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(after["identities"], 1, "{after}");
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

/// The kernel ends a binding's TTL by itself: `idgate run --ttl` with the
/// agent killed while the command runs.
#[test]
fn a_run_s_ttl_ends_in_the_kernel_with_the_agent_killed() {
    require_privileges!();
    let f = Fixture::new();
    let cg = Cgroups::new("att-ttl-kill");
    let mut agent = agent_with(&cg, &f.policy(), "");
    let probe = target_bin("idgate-probe");
    let probe = probe.display();
    let asked = Instant::now();
    let mut run = std::process::Command::new(target_bin("idgate"))
        .args(["run", "--identity", BETA, "--ttl", "3s", "--socket"])
        .arg(&agent.socket)
        .args([
            "--",
            "sh",
            "-c",
            &format!("{probe} tcp {b}; sleep 4; {probe} tcp {b}", b = f.b),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("idgate run");
    // The command's first answer: it runs, bound; then the agent goes.
    let mut out = std::io::BufReader::new(run.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("the first answer");
    agent.stop(Signal::SIGKILL);
    let mut second = String::new();
    out.read_line(&mut second).expect("the second answer");
    run.wait().expect("idgate run");
    assert!(asked.elapsed() >= Duration::from_secs(4));
    assert_eq!(
        [first.trim(), second.trim()],
        ["ok", "EPERM"],
        "allowed while bound, denied after"
    );
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

/// A fake kubelet: `GET /pods` over HTTPS on an ephemeral loopback port,
/// with a serving certificate from a CA of its own, answering as
/// `answer` says and recording every request head. One std thread; it
/// stops (and the port closes) on `stop` or drop.
struct FakeKubelet {
    port: u16,
    ca_pem: String,
    /// 200: the pod list; anything else: that status.
    answer: std::sync::Arc<std::sync::atomic::AtomicU16>,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKubelet {
    fn start(pods: &'static [u8]) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
        use std::sync::{Arc, Mutex};

        // A kubelet's certificate names its node.
        let ca = idgate_tests::pki::TestCa::new("test kubelet CA");
        let leaf = ca.leaf(&["node-1"]);
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der.into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.into()),
            )
            .unwrap(),
        );

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answer, requests, stop) = (answer.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let tcp = match listener.accept() {
                        Ok((tcp, _)) => tcp,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(e) => panic!("fake kubelet accept: {e}"),
                    };
                    let status = answer.load(Ordering::SeqCst);
                    if let Some(head) = Self::answer(&config, tcp, status, pods) {
                        requests.lock().unwrap().push(head);
                    }
                }
            })
        };
        Self {
            port,
            ca_pem: ca.pem.clone(),
            answer,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves one connection; returns the request head, if one came.
    fn answer(
        config: &std::sync::Arc<rustls::ServerConfig>,
        tcp: std::net::TcpStream,
        status: u16,
        pods: &[u8],
    ) -> Option<String> {
        use std::io::{Read, Write};
        tcp.set_nonblocking(false).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let conn = rustls::ServerConnection::new(config.clone()).ok()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        // A client that refuses the certificate ends here, unanswered.
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let body: &[u8] = if status == 200 { pods } else { b"fake failure" };
        let _ = write!(
            tls,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = tls.write_all(body);
        tls.conn.send_close_notify();
        let _ = tls.flush();
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn answer_with(&self, status: u16) {
        self.answer
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops answering: the thread ends and the port closes.
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("fake kubelet thread");
        }
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `k8s:` selectors match through the kubelet's pod list, fetched over
/// HTTPS with the bearer token and the kubelet's certificate verified
/// against the configured CA; when the kubelet fails, pod cgroups fall to
/// deny and `idgate status` says why. Every fetch here is one a new pod
/// cgroup asks for (the refresh interval is an hour).
#[test]
fn kubernetes_pods_attest_through_the_kubelet_pod_list() {
    require_privileges!();
    const CHECKOUT: &str = "spiffe://example.org/ns/payments/sa/checkout";
    const POD: &str = "8a0c5b7e_4e2f_4a8b_9d51_3c6e2f7a1b09";
    const SERVER: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const SIDECAR: &str = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b";
    const TOKEN: &str = "kubelet-test-token.abc";
    let pods: &'static [u8] =
        include_bytes!("../../agent/src/identity/k8s/testdata/kubelet-pods.json");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap().to_string();
    let port = dest.rsplit_once(':').unwrap().1;
    let policy = format!(
        "[[identity]]\nid = \"{CHECKOUT}\"\n[[identity.egress]]\nname = \"checkout-out\"\nto = [\"127.0.0.1/32\"]\nports = [{port}]\nprotocol = \"tcp\"\naction = \"allow\"\n"
    );
    let mut kubelet = FakeKubelet::start(pods);
    // The kubelet's systemd-driver layout, which attestation reads from
    // the top of the cgroup tree: the scope is the kubelet's root slice.
    let mut cg = Cgroups::at("kubepods.slice", "att-k8s");
    let pod_dir = |uid: &str| format!("kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice");
    let mut agent = Agent::prepare(
        &cg,
        &policy,
        &format!(
            "resync_seconds = 1\n[kubernetes]\nkubelet_url = \"https://127.0.0.1:{}\"\ntoken_path = \"token\"\nkubelet_ca_path = \"kubelet-ca.pem\"\nrefresh = \"1h\"\ntimeout = \"3s\"\n",
            kubelet.port
        ),
    );
    agent.write_entries(&entry(
        CHECKOUT,
        &[
            "k8s:ns:payments".into(),
            "k8s:sa:checkout".into(),
            "k8s:container-name:server".into(),
        ],
        None,
    ));
    std::fs::write(agent.dir.join("token"), format!("{TOKEN}\n")).unwrap();
    // First a CA that did not sign the kubelet's certificate.
    let other_ca = FakeKubelet::start(pods);
    std::fs::write(agent.dir.join("kubelet-ca.pem"), &other_ca.ca_pem).unwrap();
    drop(other_ca);
    agent.spawn();
    agent.wait_ready();

    let k8s_status = |agent: &Agent| agent.status()["kubernetes"].clone();
    let status = k8s_status(&agent);
    assert_eq!(status["state"], "error", "{status}");
    assert!(
        status["last_error"].as_str().unwrap().contains("TLS"),
        "{status}"
    );
    assert_eq!(status["last_success"], serde_json::Value::Null);
    assert!(kubelet.requests().is_empty(), "{:?}", kubelet.requests());

    // The right CA (read again for every fetch); the container's cgroup
    // appears and asks for a fetch.
    std::fs::write(agent.dir.join("kubelet-ca.pem"), &kubelet.ca_pem).unwrap();
    let server = cg.inside(&format!("{}/cri-containerd-{SERVER}.scope", pod_dir(POD)));
    let mut w = Workload::start(None);
    w.move_to(&server);
    let row = state_of(&agent, &server, "attested");
    assert_eq!(row["id"], CHECKOUT);
    let selectors = row["selectors"].to_string();
    assert!(
        selectors.contains("k8s:container-name:server"),
        "{selectors}"
    );
    assert_eq!(w.call("tcp", &dest), "ok");
    let requests = kubelet.requests();
    assert!(!requests.is_empty());
    for head in &requests {
        assert!(head.starts_with("GET /pods HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "authorization: bearer {}\r\n",
                TOKEN.to_ascii_lowercase()
            )),
            "{head}"
        );
    }
    let status = k8s_status(&agent);
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(status["pods"], 4, "{status}");
    assert!(status["last_success"].is_string(), "{status}");
    let text = agent.try_cli(&["status"]).unwrap();
    assert!(text.contains("k8s.state") && text.contains("ok"), "{text}");

    // The sidecar in the same pod is not the server container.
    let sidecar = cg.inside(&format!("{}/cri-containerd-{SIDECAR}.scope", pod_dir(POD)));
    let mut s = Workload::start(None);
    s.move_to(&sidecar);
    state_of(&agent, &sidecar, "unknown");
    assert_eq!(s.call("tcp", &dest), "EPERM");

    // The kubelet fails: a new pod's cgroup asks for the list, gets a
    // 500, and the pod facts are dropped.
    kubelet.answer_with(500);
    cg.inside(&pod_dir("0f0f0f0f_0000_4000_8000_000000000001"));
    state_of(&agent, &server, "unknown");
    assert_eq!(w.call("tcp", &dest), "EPERM");
    let status = k8s_status(&agent);
    assert_eq!(status["state"], "error", "{status}");
    assert_eq!(status["pods"], 0, "{status}");
    assert!(
        status["last_error"].as_str().unwrap().contains("500"),
        "{status}"
    );

    // Back: bound again.
    kubelet.answer_with(200);
    cg.inside(&pod_dir("0f0f0f0f_0000_4000_8000_000000000002"));
    state_of(&agent, &server, "attested");
    assert_eq!(w.call("tcp", &dest), "ok");

    // Gone: nothing answers on the port any more.
    kubelet.stop();
    cg.inside(&pod_dir("0f0f0f0f_0000_4000_8000_000000000003"));
    state_of(&agent, &server, "unknown");
    assert_eq!(w.call("tcp", &dest), "EPERM");
    let status = wait_for(
        "the kubelet error in status",
        Duration::from_secs(10),
        || {
            let s = k8s_status(&agent);
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("connect"))
                .then_some(s)
        },
    );
    assert_eq!(status["state"], "error", "{status}");
    assert!(status["last_success"].is_string(), "{status}");
    let text = agent.try_cli(&["status"]).unwrap();
    assert!(text.contains("connect"), "{text}");
    drop(listener);
}
