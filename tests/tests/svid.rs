//! SPIFFE credentials end to end: the agent's Workload API issues real
//! processes in real cgroups the SVIDs of the identities the kernel
//! enforces; two workloads talk mutual TLS with them, where the policy
//! (in the kernel) and the peer check (in the workload) decide on the same
//! SPIFFE IDs; revoked, unbound and foreign identities are refused; bad
//! requests get the specified status codes; clients others wrote (the
//! Rust `spiffe` crate, the Python `spiffe` package) verify what they get.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idgate_tests::{Agent, Cgroups, require_privileges, target_bin, wait_for};
use serde_json::Value;

const ALPHA: &str = "spiffe://example.org/alpha";
const BETA: &str = "spiffe://example.org/beta";
const GAMMA: &str = "spiffe://example.org/gamma";
const DELTA: &str = "spiffe://example.org/delta";
const OTHER: &str = "spiffe://other.test/client";

/// Every identity may reach loopback TCP, except DELTA, which may reach
/// nothing.
fn policy(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| {
            let egress = if *id == DELTA {
                String::new()
            } else {
                "[[identity.egress]]\nname = \"loopback\"\nto = [\"127.0.0.1/32\"]\nprotocol = \"tcp\"\naction = \"allow\"\n".to_owned()
            };
            format!("[[identity]]\nid = \"{id}\"\ndefault = \"deny\"\n{egress}")
        })
        .collect()
}

/// `[[workload]]` tables binding cgroups to identities, and `trust_domains`.
fn config(td: &str, workloads: &[(&str, &str)], svid: &str) -> String {
    let mut out = format!("trust_domains = [\"{td}\"]\nresync_seconds = 5\n");
    for (cgroup, id) in workloads {
        out.push_str(&format!(
            "[[workload]]\ncgroup = \"{cgroup}\"\nidentity = \"{id}\"\n"
        ));
    }
    out.push_str(&format!("[svid]\n{svid}\n"));
    out
}

fn socket(agent: &Agent) -> PathBuf {
    agent.dir.join("workload.sock")
}

/// `idgate-spiffe` without its debug information, made next to it (build
/// output, like the binary): attestation hashes the executable of every
/// process in a bound cgroup, and a debug build of this one is large.
fn spiffe_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let full = target_bin("idgate-spiffe");
        let small = full.with_file_name("idgate-spiffe.stripped");
        let tmp = full.with_file_name(format!(".idgate-spiffe.{}", std::process::id()));
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg(&full)
            .arg("-o")
            .arg(&tmp)
            .status()
            .expect("strip (binutils)");
        assert!(status.success(), "strip failed");
        std::fs::rename(&tmp, &small).expect("rename the stripped copy");
        small
    })
}

/// `idgate-spiffe` in `cgroup`, against `agent`'s Workload API.
fn spiffe(agent: &Agent, cgroup: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(spiffe_bin());
    cmd.arg("--cgroup")
        .arg(cgroup)
        .arg("--socket")
        .arg(socket(agent))
        .args(args);
    cmd
}

/// Runs `idgate-spiffe` to completion; its last output line as JSON.
fn spiffe_json(agent: &Agent, cgroup: &Path, args: &[&str]) -> Value {
    let out = spiffe(agent, cgroup, args)
        .output()
        .expect("run idgate-spiffe");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_else(|| {
        panic!(
            "no output from idgate-spiffe {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// `idgate svid ARGS` run in `cgroup` (a shell moves itself there first).
fn idgate_svid(agent: &Agent, cgroup: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(cgroup)
        .arg(target_bin("idgate"))
        .arg("svid")
        .arg("--socket")
        .arg(socket(agent))
        .args(args)
        .output()
        .expect("run idgate svid");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Waits until the agent has bound `dir` (the Workload API answers).
fn wait_bound(agent: &Agent, dir: &Path) {
    wait_for("the binding", Duration::from_secs(15), || {
        idgate_svid(agent, dir, &["--json"]).ok()
    });
}

/// A long-running mutual TLS server; killed on drop.
struct Server {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl Server {
    fn start(agent: &Agent, cgroup: &Path, allowed: &[&str]) -> Self {
        let mut args = vec!["serve"];
        args.extend(allowed);
        let mut child = spiffe(agent, cgroup, &args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the server starts");
        let port = first
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("server: {first}"))
            .parse()
            .expect("port");
        Self { child, lines, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the server said about the last connection.
    fn verdict(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a server verdict")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(agent: &Agent, cgroup: &Path, addr: &str, expect: &str) -> String {
    let out = spiffe(agent, cgroup, &["connect", addr, expect])
        .output()
        .expect("run client");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_bound_workload_gets_its_svids_and_an_unbound_one_is_denied() {
    require_privileges!();
    let mut cg = Cgroups::new("svid-fetch");
    let a = cg.inside("a");
    let stranger = cg.inside("stranger");
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA]),
        &config("example.org", &[("a", ALPHA)], "x509_ttl = \"10m\""),
    );
    wait_bound(&agent, &a);

    // The socket is world-connectable, like SPIRE's.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(socket(&agent))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);

    let out = tempdir(&agent, "out");
    let json: Value = serde_json::from_str(
        &idgate_svid(&agent, &a, &["--json", "--write", out.to_str().unwrap()]).unwrap(),
    )
    .unwrap();
    assert_eq!(json["spiffe_id"], ALPHA);
    assert!(
        json["chain"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    for f in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let key_mode = std::fs::metadata(out.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    // The CA key the agent made is its owner's only.
    let ca_key = agent.dir.join("state/svid/ca/example.org/1/ca.key");
    assert_eq!(
        std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let token = idgate_svid(&agent, &a, &["--jwt", "--audience", "db"]).unwrap();
    assert_eq!(token.trim().split('.').count(), 3);

    // A cgroup of the scope with no identity, and a process outside the
    // scope, get PermissionDenied and nothing else.
    for dir in [stranger, cg.outside("outside")] {
        let e = idgate_svid(&agent, &dir, &[]).unwrap_err();
        assert!(e.contains("PermissionDenied"), "{e}");
        let e = idgate_svid(&agent, &dir, &["--jwt", "--audience", "db"]).unwrap_err();
        assert!(e.contains("PermissionDenied"), "{e}");
        let v = spiffe_json(&agent, &dir, &["raw", "bundles"]);
        assert_eq!(v["code"], "PermissionDenied", "{v}");
    }
}

#[test]
fn bad_requests_get_the_specified_errors_and_the_server_keeps_serving() {
    require_privileges!();
    let mut cg = Cgroups::new("svid-bad");
    let a = cg.inside("a");
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA]),
        &config("example.org", &[("a", ALPHA)], ""),
    );
    wait_bound(&agent, &a);
    let raw = |args: &[&str]| {
        let mut all = vec!["raw"];
        all.extend(args);
        spiffe_json(&agent, &a, &all)
    };
    // No security header: InvalidArgument, even for a bound caller.
    assert_eq!(raw(&["no-header"])["code"], "InvalidArgument");
    // No audience, an empty one, too many.
    assert_eq!(raw(&["jwt"])["code"], "InvalidArgument");
    assert_eq!(raw(&["jwt", ""])["code"], "InvalidArgument");
    let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
    let mut args = vec!["jwt"];
    args.extend(many.iter().map(String::as_str));
    assert_eq!(raw(&args)["code"], "InvalidArgument");
    // A malformed SPIFFE ID; another workload's ID is never issued.
    assert_eq!(raw(&["jwt-for", "not-an-id"])["code"], "InvalidArgument");
    let v = raw(&["jwt-for", BETA]);
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    assert!(v.get("token").is_none());
    assert_eq!(raw(&["jwt-for", ALPHA])["spiffe_id"], ALPHA);

    // Validation: a token for another audience, garbage, a missing field.
    let token = raw(&["jwt", "db"])["token"].as_str().unwrap().to_owned();
    let ok = raw(&["validate", "db", &token]);
    assert_eq!(ok["spiffe_id"], ALPHA, "{ok}");
    let v = raw(&["validate", "unknown-audience", &token]);
    assert_eq!(v["code"], "InvalidArgument");
    assert!(v["message"].as_str().unwrap().contains("audience"), "{v}");
    assert_eq!(
        raw(&["validate", "db", "garbage"])["code"],
        "InvalidArgument"
    );
    assert_eq!(raw(&["validate", "", &token])["code"], "InvalidArgument");
    // A message over the limit is refused by the transport.
    let v = raw(&["oversized"]);
    assert_eq!(v["code"], "OutOfRange", "{v}");

    // A caller that vanishes mid-stream: the server carries on.
    let mut child = spiffe(&agent, &a, &["raw", "stream", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains(ALPHA), "{first}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(raw(&["jwt-for", ALPHA])["spiffe_id"], ALPHA);
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

#[test]
fn streams_renew_before_half_the_lifetime_and_end_on_revocation() {
    require_privileges!();
    let mut cg = Cgroups::new("svid-stream");
    let a = cg.inside("a");
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA]),
        &config(
            "example.org",
            &[("a", ALPHA)],
            "x509_ttl = \"4s\"\nca_ttl = \"1h\"",
        ),
    );
    wait_bound(&agent, &a);
    let mut child = spiffe(&agent, &a, &["raw", "stream", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    let first = next();
    let second = next();
    let third = next();
    assert_eq!(first["spiffe_id"], ALPHA);
    assert_ne!(first["leaf"], second["leaf"]);
    assert_ne!(second["leaf"], third["leaf"]);
    // Measured: each new SVID came before half of the old one's 4 s life
    // (2 s; a leaf is backdated by a tenth of its life, 0.4 s).
    for (a, b) in [(&first, &second), (&second, &third)] {
        let gap = b["at_ms"].as_u64().unwrap() - a["at_ms"].as_u64().unwrap();
        eprintln!("renewed after {gap} ms");
        assert!(gap < 2000 - 400 + 300, "renewed after {gap} ms");
    }
    // Revocation: the stream ends with PermissionDenied at once.
    let revoked_at = Instant::now();
    agent.try_cli(&["revoke", ALPHA]).unwrap();
    let last = loop {
        let v = next();
        if v["code"] != "Ok" {
            break v;
        }
    };
    assert_eq!(last["code"], "PermissionDenied", "{last}");
    eprintln!(
        "stream ended {} ms after revoke",
        revoked_at.elapsed().as_millis()
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    let e = idgate_svid(&agent, &a, &[]).unwrap_err();
    assert!(e.contains("PermissionDenied"), "{e}");
    agent.try_cli(&["unrevoke", ALPHA]).unwrap();
    wait_bound(&agent, &a);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn mutual_tls_where_policy_and_peer_check_decide_on_the_same_ids() {
    require_privileges!();
    let mut cg = Cgroups::new("svid-mtls");
    let dirs: Vec<PathBuf> = ["alpha", "beta", "gamma", "delta"]
        .iter()
        .map(|n| cg.inside(n))
        .collect();
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA, BETA, GAMMA, DELTA]),
        &config(
            "example.org",
            &[
                ("alpha", ALPHA),
                ("beta", BETA),
                ("gamma", GAMMA),
                ("delta", DELTA),
            ],
            "",
        ),
    );
    for d in &dirs {
        wait_bound(&agent, d);
    }
    let (alpha, beta, gamma, delta) = (&dirs[0], &dirs[1], &dirs[2], &dirs[3]);
    // ALPHA serves and accepts BETA only.
    let server = Server::start(&agent, alpha, &[BETA]);

    // BETA: the kernel lets it connect, ALPHA's check accepts it, and
    // BETA's check accepts ALPHA.
    let out = connect(&agent, beta, &server.addr(), ALPHA);
    assert_eq!(out, format!("ok hello {BETA} from {ALPHA}"));
    assert_eq!(server.verdict(), format!("accepted {BETA}"));

    // BETA expecting someone else refuses ALPHA.
    let out = connect(&agent, beta, &server.addr(), GAMMA);
    assert!(out.starts_with("refused"), "{out}");
    assert!(server.verdict().starts_with("refused"));

    // GAMMA: the kernel lets it connect; ALPHA's check refuses it.
    let out = connect(&agent, gamma, &server.addr(), ALPHA);
    assert!(!out.starts_with("ok"), "{out}");
    let v = server.verdict();
    assert!(v.starts_with("refused"), "{v}");

    // DELTA: the policy denies the connect itself.
    assert_eq!(connect(&agent, delta, &server.addr(), ALPHA), "EPERM");

    // BETA revoked: the kernel denies its connect, and it is issued no
    // SVID to present.
    agent.try_cli(&["revoke", BETA]).unwrap();
    assert_eq!(
        idgate_tests::probe(Some(beta), "tcp", &server.addr()),
        "EPERM"
    );
    let out = connect(&agent, beta, &server.addr(), ALPHA);
    assert!(out.contains("no identity issued"), "{out}");
    let e = idgate_svid(&agent, beta, &[]).unwrap_err();
    assert!(e.contains("PermissionDenied"), "{e}");

    // A foreign identity that ALPHA's trust domain does not federate
    // with. The other agent trusts example.org (a static federated
    // bundle: example.org's roots as ALPHA's `idgate svid --write` left
    // them), its policy lets its workload connect, and ALPHA refuses it.
    let creds = agent.dir.join("alpha-creds");
    idgate_svid(&agent, alpha, &["--write", creds.to_str().unwrap()]).unwrap();
    let mut other_cg = Cgroups::new("svid-mtls-other");
    let o = other_cg.inside("o");
    let other = Agent::start(
        &other_cg,
        &policy(&[OTHER]),
        &config(
            "other.test",
            &[("o", OTHER)],
            &format!(
                "[[svid.federates_with]]\ntrust_domain = \"example.org\"\nbundle = {:?}\n",
                creds.join("bundle.pem")
            ),
        ),
    );
    wait_bound(&other, &o);
    let server_foreign = Server::start(&agent, alpha, &[OTHER]);
    let out = connect(&other, &o, &server_foreign.addr(), ALPHA);
    assert!(!out.starts_with("ok"), "{out}");
    let v = server_foreign.verdict();
    assert!(v.starts_with("refused") && v.contains("other.test"), "{v}");
}

#[test]
fn the_rust_spiffe_crate_fetches_and_verifies_svids_and_bundles() {
    require_privileges!();
    let mut cg = Cgroups::new("svid-rust");
    let a = cg.inside("a");
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA]),
        &config("example.org", &[("a", ALPHA)], ""),
    );
    wait_bound(&agent, &a);
    let v = spiffe_json(&agent, &a, &["interop", "db"]);
    assert_eq!(v["x509_id"], ALPHA, "{v}");
    assert_eq!(v["chain_verified"], true);
    assert_eq!(v["trust_domains"], serde_json::json!(["example.org"]));
    assert_eq!(v["jwt_id"], ALPHA);
    assert_eq!(v["jwt_wrong_audience_refused"], true);
    assert_eq!(v["validated_by_api"], ALPHA);
}

#[test]
fn the_python_spiffe_package_fetches_and_verifies_svids_and_bundles() {
    require_privileges!();
    let Some(python) = python_spiffe() else {
        return;
    };
    let mut cg = Cgroups::new("svid-py");
    let a = cg.inside("a");
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA]),
        &config("example.org", &[("a", ALPHA)], ""),
    );
    wait_bound(&agent, &a);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/spiffe_interop.py");
    let out = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(&a)
        .arg(&python)
        .arg(&script)
        .arg(format!("unix://{}", socket(&agent).display()))
        .arg("db")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["x509_id"], ALPHA, "{v}");
    assert_eq!(v["chain_verified"], true);
    assert_eq!(v["jwt_id"], ALPHA);
    assert_eq!(v["jwt_wrong_audience_refused"], true);
    assert!(
        v["trust_domains"].to_string().contains("example.org"),
        "{v}"
    );
}

/// A python with the `spiffe` package from PyPI, in a venv under
/// `target/` (made once); `None`, with the reason printed, only when
/// PyPI cannot be reached.
fn python_spiffe() -> Option<PathBuf> {
    let target = target_bin("idgate")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned();
    let venv = target.join("py-spiffe");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if ready.exists() {
        return Some(python);
    }
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(
        status.success(),
        "python3 -m venv failed (install python3-venv)"
    );
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "spiffe"])
        .output()
        .expect("pip");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Could not find a version")
            || err.contains("NewConnectionError")
            || err.contains("Temporary failure in name resolution")
        {
            eprintln!("skipped: PyPI cannot be reached: {err}");
            return None;
        }
        panic!("pip install spiffe: {err}");
    }
    std::fs::write(&ready, "").unwrap();
    Some(python)
}

fn tempdir(agent: &Agent, name: &str) -> PathBuf {
    let d = agent.dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}
