//! The credential broker end to end: the real agent, a real HTTPS
//! upstream (Python's `http.server` with `ssl`, tests/python/key_api.py)
//! that requires an API key, a real DNS server (dnsmasq) for its names,
//! and real clients (curl, Python `requests`, the `anthropic` SDK) in a
//! workload's cgroup that hold no key. The kernel sends their connects to
//! the agent, which adds the key; every way around it is refused.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idgate_tests::dns::{
    DnsServer, NOWHERE, Resolver, Run, Zone, audit, dns_config, loopback_ip, run_bounded,
};
use idgate_tests::pki::TestCa;
use idgate_tests::{
    Agent, Cgroups, WEB, free_port, probe, require_privileges, require_tools, wait_for,
};

/// The key the upstream requires; no workload may ever see it.
const SECRET: &str = "sk-test-0123456789-never-in-a-workload";
/// What SDKs send when they are given no key.
const PLACEHOLDER: &str = "placeholder";

/// The upstream "API": key_api.py on `addr:443`, with a certificate of
/// the test CA for its names.
struct KeyApi {
    child: Child,
}

impl KeyApi {
    fn start(dir: &Path, ip: IpAddr, ca: &TestCa, names: &[&str], key_file: &Path) -> Self {
        let leaf = ca.leaf(names);
        let cert = dir.join("api.pem");
        let key = dir.join("api.key");
        std::fs::write(&cert, &leaf.pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let ready = dir.join("api.ready");
        let _ = std::fs::remove_file(&ready);
        let script = idgate_tests::python::script("key_api.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(ip.to_string())
            .arg("443")
            .arg(&cert)
            .arg(&key)
            .arg("x-api-key")
            .arg(key_file)
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 key_api.py");
        let mut api = Self { child };
        wait_for(
            "the upstream API to listen",
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = api.child.try_wait() {
                    panic!("key_api.py ended: {status}");
                }
                ready.exists().then_some(())
            },
        );
        api
    }
}

impl Drop for KeyApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent with the broker on, whose `web` identity has credential rules
/// for `api.test` (any request) and `limited.test` (GET under
/// `/v1/models` only) and `down.test` (where nothing listens), and a
/// plain name rule for `other.test` on 443; `api.test`, `limited.test`,
/// `other.test` and `new.test` (which no rule names at start) share one
/// address (a CDN's), the upstream's.
struct EgressWorld {
    agent: Agent,
    /// The policy it started with.
    policy: String,
    web: PathBuf,
    log: PathBuf,
    dir: PathBuf,
    _api: KeyApi,
    _dns: DnsServer,
    _cg: Cgroups,
}

impl EgressWorld {
    fn start(tag: &str) -> Self {
        let mut cg = Cgroups::new(tag);
        let web = cg.inside("web");
        let dir = std::env::temp_dir().join(format!("{}-egress", cg.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("api-key");
        std::fs::write(&key_file, format!("{SECRET}\n")).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ca = TestCa::new("idgate test upstream CA");
        std::fs::write(dir.join("upstream-ca.pem"), &ca.pem).unwrap();
        let api_ip = loopback_ip();
        let down_ip = loopback_ip();
        let api = KeyApi::start(
            &dir,
            api_ip,
            &ca,
            &["api.test", "limited.test", "other.test", "new.test"],
            &key_file,
        );
        let zone = Zone::new()
            .host("api.test", &[api_ip], 60)
            .host("new.test", &[api_ip], 60)
            .host("limited.test", &[api_ip], 60)
            .host("other.test", &[api_ip], 60)
            .host("down.test", &[down_ip], 60);
        let dns = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone);
        let log = dir.join("audit.jsonl");
        let key = key_file.display();
        let policy = format!(
            r#"[[identity]]
id = "{WEB}"
default = "deny"

[[identity.credential]]
name = "test-api"
host = "api.test"
header = "x-api-key"
secret_file = "{key}"

[[identity.credential]]
name = "limited"
host = "limited.test"
header = "x-api-key"
secret_file = "{key}"
methods = ["GET"]
paths = ["/v1/models"]

[[identity.credential]]
name = "down"
host = "down.test"
header = "x-api-key"
secret_file = "{key}"

[[identity.egress]]
name = "other"
to = ["other.test"]
ports = [443]
protocol = "tcp"
action = "allow"
"#
        );
        let config = format!(
            "[[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n{}\
             [egress]\nenabled = true\ntls_port = {}\nhttp_port = {}\n\
             extra_roots = [{:?}]\nupstream_timeout = \"3s\"\n",
            dns_config(dns.addr(), &log, "private_answers = \"allow\""),
            free_port(),
            free_port(),
            dir.join("upstream-ca.pem"),
        );
        let agent = Agent::start(&cg, &policy, &config);
        Self {
            agent,
            policy,
            web,
            log,
            dir,
            _api: api,
            _dns: dns,
            _cg: cg,
        }
    }

    /// The trust bundle the agent gives workloads: the system's roots
    /// and its egress CA.
    fn bundle(&self) -> PathBuf {
        self.agent.dir.join("state/egress/bundle.pem")
    }

    /// A client in the `web` cgroup, whose DNS server (one that does not
    /// exist) the kernel replaces with the agent's.
    fn client(&self) -> Resolver {
        Resolver::new(&[NOWHERE]).in_cgroup(&self.web)
    }

    /// `curl -sS ARGS` from the workload, trusting the egress bundle;
    /// stdout is the body, then a line with the status code and the HTTP
    /// version.
    fn curl(&self, args: &[&str]) -> Run {
        let bundle = self.bundle();
        let mut all = vec![
            "-sS",
            "--max-time",
            "15",
            "--cacert",
            bundle.to_str().unwrap(),
            "-w",
            "\n%{http_code} %{http_version}",
        ];
        all.extend_from_slice(args);
        self.client().run("curl", &all)
    }

    /// The broker's records in the audit log, once `count` are there.
    fn broker_records(&self, count: usize) -> Vec<serde_json::Value> {
        wait_for("broker records", Duration::from_secs(10), || {
            let found: Vec<_> = audit(&self.log)
                .into_iter()
                .filter(|r| r["hook"] == "broker")
                .collect();
            (found.len() >= count).then_some(found)
        })
    }
}

impl Drop for EgressWorld {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.agent.log());
            eprintln!(
                "audit log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The status code and HTTP version `curl -w` printed last, and the body
/// before them.
fn status(run: &Run) -> (String, &str) {
    let (body, last) = run
        .stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line: {run:?}"));
    (last.to_owned(), body)
}

fn require_egress_tools() -> bool {
    if let Some(reason) = idgate_tests::missing_tools(&["curl", "python3", "dnsmasq", "unshare"]) {
        idgate_tests::cannot_run(&reason);
        return false;
    }
    true
}

#[test]
fn a_workload_calls_the_api_by_name_and_the_agent_adds_the_key() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-key");

    // HTTP/1.1, with the placeholder key an SDK sends: replaced.
    let run = w.curl(&[
        "--http1.1",
        "-H",
        &format!("x-api-key: {PLACEHOLDER}"),
        "https://api.test/v1/echo?q=1",
    ]);
    let (code, body) = status(&run);
    assert_eq!(code, "200 1.1", "{run:?}");
    let echoed: serde_json::Value = serde_json::from_str(body).expect("JSON echo");
    assert_eq!(echoed["path"], "/v1/echo?q=1");
    assert_eq!(echoed["headers"]["host"], "api.test");

    // HTTP/2 between the workload and the agent.
    let run = w.curl(&[
        "--http2",
        "-X",
        "POST",
        "-d",
        "hi",
        "https://api.test/v1/echo",
    ]);
    let (code, body) = status(&run);
    assert_eq!(code, "200 2", "{run:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).unwrap()["body"],
        "hi"
    );

    // Server-sent events stream through: every chunk arrives.
    let run = w.curl(&["-N", "https://api.test/v1/stream"]);
    let (code, body) = status(&run);
    assert_eq!(code, "200 2", "{run:?}");
    assert_eq!(body.matches("data: chunk").count(), 5, "{body}");

    let records = w.broker_records(3);
    let first = &records[0];
    assert_eq!(first["identity"], WEB);
    assert_eq!(first["rule"], "test-api");
    assert_eq!(first["dst_name"], "api.test");
    assert_eq!(first["http"]["method"], "GET");
    assert_eq!(first["http"]["status"], 200);

    // The key is nowhere the workload or an operator's log could see it.
    let audit_text = std::fs::read_to_string(&w.log).unwrap();
    assert!(!audit_text.contains(SECRET), "the audit log holds the key");
    assert!(
        !w.agent.log().contains(SECRET),
        "the agent's log holds the key"
    );
}

#[test]
fn python_clients_and_the_anthropic_sdk_work_through_idgate_run_with_no_key() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let Some(python) = idgate_tests::python::env() else {
        return;
    };
    let w = EgressWorld::start("egress-sdk");
    let script = r#"
import os, sys, requests, anthropic
assert "ANTHROPIC_API_KEY" not in os.environ or os.environ["ANTHROPIC_API_KEY"] == "placeholder"
r = requests.get("https://api.test/v1/echo", timeout=10)
print("requests", r.status_code)
client = anthropic.Anthropic(base_url="https://api.test", api_key="placeholder", max_retries=0)
m = client.messages.create(model="test", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
print("anthropic", m.content[0].text)
"#;
    // `idgate run` binds the command's own cgroup to the identity and
    // points its TLS clients at the egress bundle.
    let idgate = idgate_tests::target_bin("idgate");
    let socket = w.agent.socket.to_str().unwrap().to_owned();
    let run = Resolver::new(&[NOWHERE]).run(
        &idgate,
        &[
            "run",
            "--socket",
            &socket,
            "--identity",
            WEB,
            "--",
            python.to_str().unwrap(),
            "-c",
            script,
        ],
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.contains("requests 200"), "{run:?}");
    assert!(
        run.stdout.contains("anthropic hello from the test API"),
        "{run:?}"
    );
}

#[test]
fn every_way_around_the_broker_is_refused_or_stays_inside_the_rule() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-bypass");
    let api_ip = match w.client().getent("api.test").addrs.first() {
        Some(ip) => *ip,
        None => panic!("api.test did not resolve"),
    };

    // A plain name rule's host on a shared address: the ClientHello names
    // it, so it is passed through untouched (the upstream's own
    // certificate, and no key added: 401).
    let upstream_ca = w.dir.join("upstream-ca.pem");
    let run = w.client().run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "15",
            "--cacert",
            upstream_ca.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://other.test/v1/echo",
        ],
    );
    assert_eq!(run.stdout, "401", "passed through without the key: {run:?}");

    // Another name in the ClientHello, on the credential host's address.
    let run = w.curl(&[
        "--connect-to",
        "evil.test:443:api.test:443",
        "https://evil.test/",
    ]);
    assert_ne!(run.code(), Some(0), "{run:?}");
    // A Host header for another name (HTTP/1.1), and an :authority for
    // another name (HTTP/2: curl sends the Host header as :authority).
    for version in ["--http1.1", "--http2"] {
        let run = w.curl(&[version, "-H", "Host: other.test", "https://api.test/"]);
        let (code, _) = status(&run);
        assert!(code.starts_with("421 "), "{version}: {run:?}");
    }
    // CONNECT through the broker to another host: refused (HTTP/1.1),
    // or a stream error (HTTP/2 allows no CONNECT with a path).
    let connect = |version| {
        w.curl(&[
            version,
            "-X",
            "CONNECT",
            "--request-target",
            "other.test:443",
            "https://api.test/",
        ])
    };
    let run = connect("--http1.1");
    assert!(status(&run).0.starts_with("405 "), "{run:?}");
    let run = connect("--http2");
    assert!(!status(&run).0.starts_with("2"), "{run:?}");
    // Methods and paths the rule does not list.
    let run = w.curl(&["https://limited.test/v1/models"]);
    assert!(status(&run).0.starts_with("200 "), "{run:?}");
    for args in [
        &["-X", "DELETE", "https://limited.test/v1/models"][..],
        &["https://limited.test/v1/files"][..],
    ] {
        let run = w.curl(args);
        let (code, body) = status(&run);
        assert!(code.starts_with("403 "), "{args:?}: {run:?}");
        assert!(
            body.contains("limited"),
            "the reason names the rule: {body}"
        );
    }
    // Plain HTTP to port 80: no rule says `http`, the kernel denies it.
    let run = w.curl(&["http://api.test/"]);
    assert_eq!(run.code(), Some(7), "curl: could not connect: {run:?}");
    // QUIC (UDP 443) to the learned address is denied: clients fall back
    // to TCP.
    let to = format!("{api_ip}:443");
    assert_eq!(probe(Some(&w.web), "udp-sendto", &to), "EPERM");

    let records = w.broker_records(6);
    let reasons: Vec<&str> = records
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"passthrough"), "{reasons:?}");
    let refused_sni = records.iter().any(|r| {
        r["reason"] == "refused"
            && r["http"]["sni"] == "evil.test"
            && r["http"]["detail"].is_string()
    });
    assert!(refused_sni, "{records:#?}");
}

#[test]
fn a_connect_to_the_upstream_address_without_the_name_is_denied() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-noname");
    // The upstream's address, learned some other way (not by this
    // identity's lookup): the kernel denies it.
    let ip = Resolver::new(&[w._dns.addr().ip()])
        .getent("api.test")
        .addrs
        .first()
        .copied()
        .expect("the host resolves outside the scope");
    assert_eq!(probe(Some(&w.web), "tcp", &format!("{ip}:443")), "EPERM");
    wait_for("the denial's record", Duration::from_secs(10), || {
        audit(&w.log).into_iter().find(|r| {
            r["dst_addr"] == ip.to_string() && r["verdict"] == "deny" && r["reason"] == "default"
        })
    });
}

#[test]
fn an_upstream_that_fails_gives_a_clear_502_and_the_broker_serves_on() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-down");
    let run = w.curl(&["https://down.test/v1/echo"]);
    let (code, body) = status(&run);
    assert!(code.starts_with("502 "), "{run:?}");
    assert!(!body.is_empty(), "a reason: {run:?}");
    assert!(!body.contains(SECRET));
    let run = w.curl(&["https://api.test/v1/echo"]);
    assert!(status(&run).0.starts_with("200 "), "{run:?}");
}

#[test]
fn a_reload_that_adds_a_credential_host_extends_the_egress_ca_to_it() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-reload");
    let before = w.dir.join("bundle-before.pem");
    std::fs::copy(w.bundle(), &before).unwrap();
    let key = w.dir.join("api-key");
    w.agent.write_policy(&format!(
        "{}\n[[identity.credential]]\nname = \"new\"\nhost = \"new.test\"\n\
         header = \"x-api-key\"\nsecret_file = \"{}\"\n",
        w.policy,
        key.display()
    ));
    w.agent.try_cli(&["policy", "reload"]).expect("reload");
    // The CA is issued again for the new host a moment after the reload.
    let run = wait_for(
        "the new credential host through the broker",
        Duration::from_secs(10),
        || {
            let run = w.curl(&["https://new.test/v1/echo"]);
            status(&run).0.starts_with("200 ").then_some(run)
        },
    );
    let (_, body) = status(&run);
    let echoed: serde_json::Value = serde_json::from_str(body).expect("JSON echo");
    assert_eq!(echoed["headers"]["host"], "new.test");
    // The hosts of before still work.
    let run = w.curl(&["https://api.test/v1/echo"]);
    assert!(status(&run).0.starts_with("200 "), "{run:?}");
    // OpenSSL (curl) enforces the constraint: the bundle of before the
    // reload, whose CA did not permit the new host, refuses its
    // certificate (60: the peer's certificate cannot be verified), and
    // still takes the old hosts'.
    let old = |url: &str| {
        w.client().run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "15",
                "--cacert",
                before.to_str().unwrap(),
                "-o",
                "/dev/null",
                url,
            ],
        )
    };
    let run = old("https://new.test/v1/echo");
    assert_eq!(run.code(), Some(60), "{run:?}");
    assert!(run.stderr.contains("subtree"), "{run:?}");
    let run = old("https://api.test/v1/echo");
    assert_eq!(run.code(), Some(0), "{run:?}");
}

#[test]
fn an_unprivileged_workload_cannot_read_the_key_from_the_agent_or_its_file() {
    require_privileges!();
    require_tools!("setpriv");
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-secrets");
    let pid = w.agent.pid();
    let key_file = w.dir.join("api-key");
    // The client's files (its resolv.conf) live as long as it.
    let client = w.client();
    for path in [
        format!("/proc/{pid}/environ"),
        format!("/proc/{pid}/mem"),
        format!("/proc/{pid}/maps"),
        key_file.display().to_string(),
    ] {
        let mut cmd = client.command("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "cat",
            &path,
        ]);
        let run = run_bounded(cmd, Duration::from_secs(10));
        assert_ne!(run.code(), Some(0), "{path} was readable: {run:?}");
        assert!(run.stderr.contains("Permission denied"), "{path}: {run:?}");
        assert!(!run.stdout.contains(SECRET), "{path}");
    }
}

#[test]
fn a_workload_running_as_uid_0_is_warned_about_and_owns_roots_files() {
    require_privileges!();
    require_tools!("setpriv", "sleep", "cat");
    if !require_egress_tools() {
        return;
    }
    let w = EgressWorld::start("egress-root");
    assert_eq!(
        w.agent.status()["root_workloads"],
        serde_json::json!([]),
        "no process of the workload runs yet"
    );
    // A process of the `web` workload, whose identity has credential
    // rules, running as uid 0: `idgate status` names it. (The client's
    // files live as long as it.)
    let client = w.client();
    let mut sleeper = client.command("sleep");
    sleeper.arg("60").stdin(Stdio::null()).stdout(Stdio::null());
    let mut sleeper = sleeper.spawn().expect("sleep in the workload");
    let pid = sleeper.id();
    let warned = wait_for("the uid 0 warning", Duration::from_secs(10), || {
        let status = w.agent.status();
        status["root_workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| {
                r["pids"]
                    .as_array()
                    .is_some_and(|p| p.contains(&pid.into()))
            })
            .cloned()
    });
    assert_eq!(warned["identity"], WEB);
    let cgroup = warned["cgroup"].as_str().unwrap();
    assert!(cgroup.ends_with("/web"), "{warned}");
    let text = w.agent.try_cli(&["status"]).expect("idgate status");
    assert!(
        text.contains(&format!("warning: workload {cgroup} ({WEB})")) && text.contains("uid 0"),
        "{text}"
    );

    // What such a workload reads, as uid 0 without CAP_SYS_PTRACE (as in
    // a container's default capabilities): root's files, the secret file
    // and the egress CA's key among them; the agent's environment (it
    // holds no secret); but not the agent's memory: the kernel lets
    // another process read it only with CAP_SYS_PTRACE or every
    // capability the agent has. With CAP_SYS_PTRACE (root's default
    // outside containers), it reads the agent's memory too.
    let as_root = |ptrace: bool, args: &[&str]| {
        let mut cmd = client.command("setpriv");
        cmd.arg("--inh-caps=-all");
        if !ptrace {
            cmd.arg("--bounding-set=-sys_ptrace");
        }
        cmd.arg("--").args(args);
        run_bounded(cmd, Duration::from_secs(10))
    };
    let key_file = w.dir.join("api-key");
    let run = as_root(false, &["cat", key_file.to_str().unwrap()]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.contains(SECRET));
    let ca_key = w.agent.dir.join("state/egress/ca/1/ca.key");
    let run = as_root(false, &["cat", ca_key.to_str().unwrap()]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.contains("PRIVATE KEY"));
    let agent = w.agent.pid().to_string();
    let run = as_root(false, &["cat", &format!("/proc/{agent}/environ")]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(!run.stdout.contains(SECRET));
    // 16 bytes of the agent's first mapping, through /proc/PID/mem.
    let read_memory = r#"
import sys
pid = sys.argv[1]
start = int(open(f"/proc/{pid}/maps").readline().split("-")[0], 16)
try:
    f = open(f"/proc/{pid}/mem", "rb")
    f.seek(start)
    print("read", len(f.read(16)))
except OSError as e:
    print(e.strerror)
"#;
    let run = as_root(false, &["python3", "-c", read_memory, &agent]);
    assert_eq!(run.stdout.trim(), "Permission denied", "{run:?}");
    let run = as_root(true, &["python3", "-c", read_memory, &agent]);
    assert_eq!(run.stdout.trim(), "read 16", "{run:?}");

    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
