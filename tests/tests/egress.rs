//! The credential broker end to end: the real agent, a real HTTPS
//! upstream (Python's `http.server` with `ssl`, tests/python/key_api.py)
//! that requires an API key, a real DNS server (dnsmasq) for its names,
//! and real clients (curl, Python `requests`, the `anthropic` SDK) in a
//! workload's cgroup that hold no key. The kernel sends their connects to
//! the agent, which adds the key; every way around it is refused. For
//! OAuth credentials, a real token endpoint stand-in
//! (tests/python/token_endpoint.py, PyJWT) validates the agent's JWT-SVID
//! through idgate's OIDC discovery document and issues the access token
//! a second upstream requires.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idgate_tests::dns::{
    DigQuery, DnsServer, NOWHERE, Resolver, Run, Zone, audit, dns_config, loopback_ip, run_bounded,
};
use idgate_tests::pki::TestCa;
use idgate_tests::{
    Agent, Cgroups, WEB, assert_schema, events_schema, free_loopback_port, free_port, metric,
    probe, require_privileges, require_tools, scrape, wait_for,
};

/// The key the upstream requires; no workload may ever see it.
const SECRET: &str = "sk-test-0123456789-never-in-a-workload";
/// An IPv6 address of `api.test` (nothing listens there): the broker is
/// reached over IPv4 only, so workloads are never given it.
const API_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10));

/// What SDKs send when they are given no key.
const PLACEHOLDER: &str = "placeholder";
/// The token endpoint of the OAuth credentials.
const TOKEN_ENDPOINT: &str = "https://sts.test/token";
/// The audience the token endpoint wants in the JWT-SVIDs it takes.
const STS_AUDIENCE: &str = "https://sts.test";

/// A Python server of tests/python/: HTTPS on `ip:443` with a
/// certificate of the test CA for its names, or plain HTTP on `ip:80`;
/// until dropped.
struct PyServer {
    child: Child,
    /// Its standard error: a line per request, with its status.
    log: PathBuf,
}

impl PyServer {
    /// Runs `python SCRIPT IP PORT CERT KEY ARGS... READY` (files named
    /// after `name` in `dir`; with no `tls`, port 80 and `-` for the
    /// certificate and key) and waits until READY exists.
    fn start(
        dir: &Path,
        name: &str,
        python: &Path,
        ip: IpAddr,
        tls: Option<(&TestCa, &[&str])>,
        args: &[OsString],
    ) -> Self {
        let (port, cert, key) = match tls {
            Some((ca, names)) => {
                let leaf = ca.leaf(names);
                let cert = dir.join(format!("{name}.pem"));
                let key = dir.join(format!("{name}.key"));
                std::fs::write(&cert, &leaf.pem).unwrap();
                std::fs::write(&key, &leaf.key_pem).unwrap();
                ("443", cert, key)
            }
            None => ("80", PathBuf::from("-"), PathBuf::from("-")),
        };
        let ready = dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let log = dir.join(format!("{name}.log"));
        let script = idgate_tests::python::script(&format!("{name}.py"));
        let child = Command::new(python)
            .arg(script)
            .arg(ip.to_string())
            .arg(port)
            .arg(&cert)
            .arg(&key)
            .args(args)
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the server's log"))
            .spawn()
            .unwrap_or_else(|e| panic!("{} {name}.py: {e}", python.display()));
        let mut server = Self { child, log };
        wait_for(
            &format!("{name}.py to listen"),
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!("{name}.py ended: {status}");
                }
                ready.exists().then_some(())
            },
        );
        server
    }

    /// The upstream "API" (key_api.py): every request must carry
    /// `header` with the contents of `key_file`.
    fn key_api(
        dir: &Path,
        tag: &str,
        ip: IpAddr,
        tls: Option<(&TestCa, &[&str])>,
        header: &str,
        key_file: &Path,
    ) -> Self {
        let dir = dir.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let args = [header.into(), key_file.into()];
        Self::start(&dir, "key_api", Path::new("python3"), ip, tls, &args)
    }
}

impl PyServer {
    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parts of an [`EgressWorld`] for OAuth credentials: rules for
/// `oauth.test` (token exchange) and `client.test` (client credentials)
/// that present the JWT-SVID for the token endpoint's audience, and
/// `denied.test` whose rule names another audience; the three on a
/// second upstream that wants `authorization: Bearer` and the token the
/// token endpoint issues.
struct OAuthParts {
    access_token: String,
    /// A line per request to the token endpoint.
    calls: PathBuf,
    sts_ip: IpAddr,
    oauth_ip: IpAddr,
    /// The agent's OIDC discovery listener's port on 127.0.0.1.
    oidc_port: u16,
    _endpoint: PyServer,
    _api: PyServer,
}

/// An agent with the broker on, whose `web` identity has credential rules
/// for `api.test` (any request) and `limited.test` (GET under
/// `/v1/models` only) and `down.test` (where nothing listens), and a
/// plain name rule for `other.test` on 443; `api.test`, `limited.test`,
/// `other.test` and `new.test` (which no rule names at start) share one
/// address (a CDN's), the upstream's.
struct EgressWorld {
    agent: Agent,
    metrics_port: u16,
    /// The policy it started with.
    policy: String,
    web: PathBuf,
    log: PathBuf,
    dir: PathBuf,
    oauth: Option<OAuthParts>,
    api: PyServer,
    _plain: PyServer,
    _websocket: Option<PyServer>,
    _dns: DnsServer,
    _cg: Cgroups,
}

/// What a world may have besides its plain parts, run by the tests'
/// venv.
#[derive(Clone, Copy)]
enum Extra {
    OAuth,
    WebSocket,
}

/// The credential rule for the WebSocket upstream (`{key}`: the secret
/// file).
const WS_RULE: &str = r#"
[[identity.credential]]
name = "ws"
host = "ws.test"
header = "x-api-key"
secret_file = "{key}"
"#;

impl EgressWorld {
    fn start(tag: &str) -> Self {
        Self::build(tag, None)
    }

    /// The world with [`OAuthParts`], its token endpoint run by `python`
    /// (the tests' venv, for PyJWT).
    fn with_oauth(tag: &str, python: &Path) -> Self {
        Self::build(tag, Some((python, Extra::OAuth)))
    }

    /// The world with a WebSocket upstream (tests/python/ws_api.py, run
    /// by `python`, the tests' venv, for `websockets`) at `ws.test`, and a
    /// credential rule `ws` for it.
    fn with_websocket(tag: &str, python: &Path) -> Self {
        Self::build(tag, Some((python, Extra::WebSocket)))
    }

    fn build(tag: &str, extra: Option<(&Path, Extra)>) -> Self {
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
        let api = PyServer::key_api(
            &dir,
            "api",
            api_ip,
            Some((&ca, &["api.test", "limited.test", "other.test", "new.test"])),
            "x-api-key",
            &key_file,
        );
        let plain_ip = loopback_ip();
        let plain = PyServer::key_api(&dir, "plain", plain_ip, None, "x-api-key", &key_file);
        let mut zone = Zone::new()
            .host("api.test", &[api_ip, API_V6], 60)
            .host("new.test", &[api_ip], 60)
            .host("limited.test", &[api_ip], 60)
            .host("other.test", &[api_ip], 60)
            .host("down.test", &[down_ip], 60)
            .host("untrusted.test", &[api_ip], 60)
            .host("plain.test", &[plain_ip], 60);
        let oauth = match extra {
            Some((python, Extra::OAuth)) => Some(OAuthParts::start(&dir, python, &ca)),
            _ => None,
        };
        if let Some(o) = &oauth {
            zone = o.hosts(zone);
        }
        let websocket = match extra {
            Some((python, Extra::WebSocket)) => {
                let ip = loopback_ip();
                zone = zone.host("ws.test", &[ip], 60);
                let args = ["x-api-key".into(), key_file.clone().into()];
                let tls = Some((&ca, &["ws.test"][..]));
                Some(PyServer::start(&dir, "ws_api", python, ip, tls, &args))
            }
            _ => None,
        };
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

[[identity.credential]]
name = "untrusted"
host = "untrusted.test"
header = "x-api-key"
secret_file = "{key}"

[[identity.credential]]
name = "plain"
host = "plain.test"
header = "x-api-key"
secret_file = "{key}"
http = true

[[identity.egress]]
name = "other"
to = ["other.test"]
ports = [443]
protocol = "tcp"
action = "allow"
{}{}"#,
            oauth.as_ref().map_or_else(String::new, OAuthParts::policy),
            websocket
                .as_ref()
                .map_or("", |_| WS_RULE)
                .replace("{key}", &key.to_string()),
        );
        let metrics_port = free_loopback_port();
        let config = format!(
            "trust_domains = [\"example.org\"]\n\
             [[workload]]\ncgroup = \"web\"\nidentity = \"{WEB}\"\n{}\
             [metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n\
             [egress]\nenabled = true\ntls_port = {}\nhttp_port = {}\n\
             extra_roots = [{:?}]\nupstream_timeout = \"3s\"\n{}",
            dns_config(dns.addr(), &log, "private_answers = \"allow\""),
            free_port(),
            free_port(),
            dir.join("upstream-ca.pem"),
            oauth.as_ref().map_or_else(String::new, OAuthParts::config),
        );
        let agent = Agent::start(&cg, &policy, &config);
        Self {
            agent,
            metrics_port,
            policy,
            web,
            log,
            dir,
            oauth,
            api,
            _plain: plain,
            _websocket: websocket,
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

    /// What the upstream logged: a line per request, with its status.
    fn upstream_log(&self) -> String {
        self.api.log()
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
            eprintln!("upstream log:\n{}", self.upstream_log());
            eprintln!(
                "audit log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl OAuthParts {
    /// The token endpoint on an address of its own (validating JWT-SVIDs
    /// of `web` for [`STS_AUDIENCE`] by the agent's OIDC discovery
    /// document, read at its first request) and the API that wants its
    /// token on another.
    fn start(dir: &Path, python: &Path, ca: &TestCa) -> Self {
        let (sts_ip, oauth_ip) = (loopback_ip(), loopback_ip());
        let oidc_port = idgate_tests::free_loopback_port();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let access_token = format!("at-e2e-{}-{nanos:x}", std::process::id());
        let token_file = dir.join("access-token");
        std::fs::write(&token_file, format!("{access_token}\n")).unwrap();
        let bearer_file = dir.join("bearer-key");
        std::fs::write(&bearer_file, format!("Bearer {access_token}\n")).unwrap();
        let calls = dir.join("token-calls");
        let discovery = format!("http://127.0.0.1:{oidc_port}/.well-known/openid-configuration");
        let args: Vec<OsString> = vec![
            discovery.into(),
            STS_AUDIENCE.into(),
            WEB.into(),
            token_file.into(),
            calls.clone().into(),
        ];
        let endpoint = PyServer::start(
            dir,
            "token_endpoint",
            python,
            sts_ip,
            Some((ca, &["sts.test"])),
            &args,
        );
        let api = PyServer::key_api(
            dir,
            "oauth-api",
            oauth_ip,
            Some((ca, &["oauth.test", "client.test", "denied.test"])),
            "authorization",
            &bearer_file,
        );
        Self {
            access_token,
            calls,
            sts_ip,
            oauth_ip,
            oidc_port,
            _endpoint: endpoint,
            _api: api,
        }
    }

    /// `zone` with the names of the token endpoint and the API.
    fn hosts(&self, zone: Zone) -> Zone {
        zone.host("sts.test", &[self.sts_ip], 60)
            .host("oauth.test", &[self.oauth_ip], 60)
            .host("client.test", &[self.oauth_ip], 60)
            .host("denied.test", &[self.oauth_ip], 60)
    }

    /// The agent's OIDC discovery provider (`[svid.oidc]`), whose
    /// documents the token endpoint reads.
    fn config(&self) -> String {
        let port = self.oidc_port;
        format!(
            "[svid]\n[svid.oidc]\nissuer = \"http://127.0.0.1:{port}\"\naddress = \"127.0.0.1:{port}\"\n"
        )
    }

    /// The credential rules of `web` for the three hosts.
    fn policy(&self) -> String {
        format!(
            r#"
[[identity.credential]]
name = "oauth"
host = "oauth.test"
kind = "oauth"
token_endpoint = "{TOKEN_ENDPOINT}"
audience = ["{STS_AUDIENCE}"]
scope = "api"

[[identity.credential]]
name = "client"
host = "client.test"
kind = "oauth"
token_endpoint = "{TOKEN_ENDPOINT}"
grant = "client_credentials"
audience = ["{STS_AUDIENCE}"]
client_id = "idgate-e2e"

[[identity.credential]]
name = "denied"
host = "denied.test"
kind = "oauth"
token_endpoint = "{TOKEN_ENDPOINT}"
audience = ["not-the-token-endpoint"]
"#
        )
    }

    /// The lines the token endpoint wrote, one per request.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
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

    // `explain` says where the connect goes, and the rule that sends it.
    let explained = w
        .agent
        .try_cli(&[
            "explain",
            "--json",
            "--identity",
            WEB,
            "--to",
            "api.test:443",
        ])
        .expect("explain");
    let explained: serde_json::Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(explained["verdict"], "allow", "{explained}");
    assert_eq!(explained["brokered"], true, "{explained}");
    assert_eq!(explained["rule"], "test-api", "{explained}");

    let records = w.broker_records(3);
    let first = &records[0];
    assert_eq!(first["identity"], WEB);
    assert_eq!(first["rule"], "test-api");
    assert_eq!(first["dst_name"], "api.test");
    assert_eq!(first["http"]["method"], "GET");
    assert_eq!(first["http"]["status"], 200);
    for record in &records {
        assert_schema(&events_schema(), record);
    }
    let shown = w.agent.try_cli(&["events"]).expect("idgate events");
    assert!(
        shown.contains("broker api.test GET /v1/echo 200") && shown.contains("rule=test-api"),
        "{shown}"
    );

    let forwarded = metric(
        &scrape(w.metrics_port),
        "idgate_broker_requests_total",
        &format!("identity=\"{WEB}\",credential=\"test-api\",outcome=\"forwarded\""),
    );
    assert_eq!(forwarded, Some(3.0));

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
    // Plain HTTP to port 80: no rule says `http`, the kernel denies it;
    // for a rule that says it, the broker adds the key there too.
    let run = w.curl(&["http://api.test/"]);
    assert_eq!(run.code(), Some(7), "curl: could not connect: {run:?}");
    let run = w.curl(&["http://plain.test/v1/echo"]);
    assert!(status(&run).0.starts_with("200 "), "{run:?}");
    // A credential host's IPv6 addresses are not handed out (the broker
    // is reached over IPv4): its AAAA query gets no records.
    let aaaa = w.client().dig(&DigQuery::new("api.test").qtype("AAAA"));
    assert_eq!(aaaa.status.as_deref(), Some("NOERROR"), "{aaaa:?}");
    assert!(aaaa.addrs.is_empty(), "{aaaa:?}");
    // QUIC (UDP 443) to the learned address is denied: clients fall back
    // to TCP.
    let to = format!("{api_ip}:443");
    assert_eq!(probe(Some(&w.web), "udp-sendto", &to), "EPERM");

    // Each refusal has its record: the broker's for what reached it, the
    // kernel's for what it denied.
    let statuses = |records: &[serde_json::Value], status: u64| {
        records
            .iter()
            .filter(|r| r["reason"] == "refused" && r["http"]["status"] == status)
            .count()
    };
    let records = wait_for("the broker's records", Duration::from_secs(10), || {
        let records = w.broker_records(1);
        let refused_sni = records.iter().any(|r| {
            r["reason"] == "refused"
                && r["http"]["sni"] == "evil.test"
                && r["http"]["detail"].is_string()
        });
        let passed = records.iter().any(|r| r["reason"] == "passthrough");
        let all = refused_sni
            && passed
            && statuses(&records, 421) >= 2
            && statuses(&records, 405) >= 1
            && statuses(&records, 403) >= 2;
        all.then_some(records)
    });
    for record in &records {
        assert_schema(&events_schema(), record);
    }
    let denied = |port: u64, protocol: &str| {
        audit(&w.log).iter().any(|r| {
            r["verdict"] == "deny"
                && r["dst_port"] == port
                && r["protocol"] == protocol
                && r["dst_addr"] == api_ip.to_string()
        })
    };
    wait_for("the kernel's denials", Duration::from_secs(10), || {
        (denied(80, "tcp") && denied(443, "udp")).then_some(())
    });
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
        .into_iter()
        .find(IpAddr::is_ipv4)
        .expect("the host resolves outside the scope");
    assert_eq!(probe(Some(&w.web), "tcp", &format!("{ip}:443")), "EPERM");
    // curl told the address, so it asks no DNS: it cannot connect.
    let run = w.curl(&[
        "--resolve",
        &format!("api.test:443:{ip}"),
        "https://api.test/",
    ]);
    assert_eq!(run.code(), Some(7), "{run:?}");
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
    // Nothing listens; a certificate that does not name the host.
    for url in [
        "https://down.test/v1/echo",
        "https://untrusted.test/v1/echo",
    ] {
        let run = w.curl(&[url]);
        let (code, body) = status(&run);
        assert!(code.starts_with("502 "), "{run:?}");
        assert!(!body.is_empty(), "a reason: {run:?}");
        assert!(!body.contains(SECRET));
    }
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
    let ca_keys = std::fs::read_dir(w.agent.dir.join("state/egress/ca"))
        .expect("the egress CA's directory")
        .map(|e| e.unwrap().path().join("ca.key"))
        .filter(|k| k.exists())
        .map(|k| k.display().to_string());
    // The client's files (its resolv.conf) live as long as it.
    let client = w.client();
    let paths: Vec<String> = [
        format!("/proc/{pid}/environ"),
        format!("/proc/{pid}/mem"),
        format!("/proc/{pid}/maps"),
        key_file.display().to_string(),
    ]
    .into_iter()
    .chain(ca_keys)
    .collect();
    assert_eq!(paths.len(), 5, "one egress CA key: {paths:?}");
    for path in paths {
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
fn requests_over_an_agent_restart_and_crash_fail_cleanly_and_never_go_out_without_the_key() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let mut w = EgressWorld::start("egress-restart");
    let warm = w.curl(&["https://api.test/v1/echo"]);
    assert!(status(&warm).0.starts_with("200 "), "{warm:?}");

    // Requests one after another while the agent restarts (`idgate
    // restart`, then a crash and a new start): each either gets its
    // answer or fails at once; none hangs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (bundle, web, stop) = (w.bundle(), w.web.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            let started = std::time::Instant::now();
            while runs.len() < 400
                && started.elapsed() < Duration::from_secs(60)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                let run = Resolver::new(&[NOWHERE]).in_cgroup(&web).run(
                    "curl",
                    &[
                        "-sS",
                        "--max-time",
                        "10",
                        "--cacert",
                        bundle.to_str().unwrap(),
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "https://api.test/v1/echo",
                    ],
                );
                runs.push(run);
            }
            runs
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let restarted = w.agent.try_cli(&["restart"]).expect("idgate restart");
    assert!(restarted.contains("restarted"), "{restarted}");
    std::thread::sleep(Duration::from_millis(500));
    w.agent.stop(nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    w.agent.spawn();
    w.agent.wait_ready();
    // Once back, requests go through again.
    wait_for(
        "a request through the restarted agent",
        Duration::from_secs(10),
        || {
            let run = w.curl(&["https://api.test/v1/echo"]);
            status(&run).0.starts_with("200 ").then_some(())
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = client.join().expect("the client loop");
    let answered = runs.iter().filter(|r| r.stdout == "200").count();
    assert!(answered > 0, "no request answered: {runs:?}");
    // While no agent ran, requests failed: the loop ran across the gap.
    assert!(answered < runs.len(), "none failed: {} runs", runs.len());
    for run in &runs {
        assert!(!run.timed_out(), "a request hung: {run:?}");
        assert!(
            run.stdout == "200" || run.code() != Some(0),
            "neither answered nor failed: {run:?}"
        );
        assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
    }
    // The upstream never saw a request without the key.
    let log = w.upstream_log();
    assert!(!log.contains("\" 401 "), "{log}");
    assert!(log.contains("\" 200 "), "{log}");
}

#[test]
fn an_oauth_credential_gets_a_token_with_the_jwt_svid_and_keeps_it() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let Some(python) = idgate_tests::python::env() else {
        return;
    };
    let w = EgressWorld::with_oauth("egress-oauth", &python);
    let oauth = w.oauth.as_ref().unwrap();
    let token = oauth.access_token.as_str();

    // Two requests per rule (a token exchange, a client assertion), the
    // workload's own authorization replaced: one token each, kept.
    for host in ["oauth.test", "client.test"] {
        for version in ["--http1.1", "--http2"] {
            let url = format!("https://{host}/v1/echo");
            let run = w.curl(&[version, "-H", "authorization: Bearer placeholder", &url]);
            let (code, body) = status(&run);
            assert!(code.starts_with("200 "), "{host} {version}: {run:?}");
            let echoed: serde_json::Value = serde_json::from_str(body).expect("JSON echo");
            assert_eq!(echoed["headers"]["host"], host);
            assert!(!body.contains(token), "{body}");
        }
    }
    let issued = format!("issued {WEB}");
    assert_eq!(oauth.calls(), [issued.as_str(), issued.as_str()]);

    // A rule whose JWT-SVID is for another audience: the token endpoint
    // refuses it, and the workload learns which endpoint said what.
    let run = w.curl(&["https://denied.test/v1/echo"]);
    let (code, body) = status(&run);
    assert!(code.starts_with("502 "), "{run:?}");
    assert_eq!(
        body.trim_end(),
        format!(
            "idgate: credential denied: token endpoint {TOKEN_ENDPOINT} answered 401: invalid_grant: the JWT was refused: InvalidAudienceError"
        )
    );
    assert!(!body.contains(token) && !body.contains("eyJ"), "{body}");
    assert_eq!(
        oauth.calls().last().map(String::as_str),
        Some("refused invalid_grant the JWT was refused: InvalidAudienceError")
    );

    let records = w.broker_records(5);
    let of = |rule: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["rule"] == rule).collect()
    };
    assert_eq!(of("oauth").len(), 2, "{records:#?}");
    assert!(
        of("client")
            .iter()
            .all(|r| r["reason"] != "failed" && r["http"]["status"] == 200),
        "{records:#?}"
    );
    let denied = of("denied");
    assert_eq!(denied.len(), 1, "{records:#?}");
    assert_eq!(denied[0]["reason"], "failed");
    assert_eq!(denied[0]["http"]["status"], 502);

    // Neither the access token nor a JWT (base64url JSON: `eyJ`) is in
    // the audit log or the agent's log.
    let audit_text = std::fs::read_to_string(&w.log).unwrap();
    let agent_log = w.agent.log();
    for (name, text) in [("audit log", &audit_text), ("agent log", &agent_log)] {
        assert!(!text.contains(token), "the {name} holds the access token");
        assert!(!text.contains("eyJ"), "the {name} holds a JWT");
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

#[test]
fn a_websocket_client_talks_to_the_upstream_through_the_broker() {
    require_privileges!();
    if !require_egress_tools() {
        return;
    }
    let Some(python) = idgate_tests::python::env() else {
        return;
    };
    let w = EgressWorld::with_websocket("egress-ws", &python);
    // The `websockets` package's client, with the placeholder key an SDK
    // sends and the egress bundle as OpenSSL's trust; the upstream wants
    // the real key in the opening handshake.
    let script = r#"
from websockets.sync.client import connect
with connect("wss://ws.test/stream", additional_headers={"x-api-key": "placeholder"}, open_timeout=10) as ws:
    for word in ["one", "two", "three"]:
        ws.send(word)
        print(ws.recv(timeout=10))
"#;
    // The client's files (its resolv.conf) live as long as it.
    let client = w.client();
    let mut cmd = client.command(&python);
    cmd.args(["-c", script]).env("SSL_CERT_FILE", w.bundle());
    let run = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "echo: one\necho: two\necho: three\n", "{run:?}");
    let records = wait_for("the upgrade's record", Duration::from_secs(10), || {
        let records = w.broker_records(1);
        records
            .iter()
            .any(|r| r["rule"] == "ws" && r["http"]["status"] == 101)
            .then_some(records)
    });
    for record in &records {
        assert_schema(&events_schema(), record);
    }
}
