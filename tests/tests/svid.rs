//! SPIFFE credentials end to end: the agent's Workload API issues real
//! processes in real cgroups the SVIDs of the identities the kernel
//! enforces; two workloads talk mutual TLS with them, where the policy
//! (in the kernel) and the peer check (in the workload) decide on the same
//! SPIFFE IDs; revoked, unbound and foreign identities are refused; bad
//! requests get the specified status codes; clients others wrote (the
//! Rust `spiffe` crate, the Python `spiffe` package) verify what they get.
//! Federation between agents: two agents of two trust domains fetch each
//! other's bundles from their bundle endpoints (https_spiffe, and
//! https_web through a test CA), their workloads talk mutual TLS, and a
//! foreign CA rotation reaches the other agent's workloads.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idgate_tests::{Agent, Cgroups, python, require_privileges, target_bin, wait_for};
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

/// An agent of trust domain `td` whose one workload (cgroup `workload`)
/// is `id`, which policy lets connect, with `svid` in its `[svid]` table;
/// started and bound. The cgroups come back first so that, bound in that
/// order, the agent goes before them.
fn bound_agent(
    tag: &str,
    td: &str,
    workload: &str,
    id: &str,
    svid: &str,
) -> (Cgroups, PathBuf, Agent) {
    let mut cgroups = Cgroups::new(tag);
    let dir = cgroups.inside(workload);
    let agent = Agent::start(
        &cgroups,
        &policy(&[id]),
        &config(td, &[(workload, id)], svid),
    );
    wait_bound(&agent, &dir);
    (cgroups, dir, agent)
}

/// `[svid]` lines that trust `td` only through a static bundle file,
/// fetching nothing.
fn static_trust(td: &str, bundle: &Path) -> String {
    format!("[[svid.federates_with]]\ntrust_domain = {td:?}\nbundle = {bundle:?}\n")
}

/// A long-running mutual TLS server (the Rust `spiffe` crate's, or
/// spiffe-tls's from PyPI) that prints `listening PORT`, then a verdict
/// per connection; killed on drop.
struct Server {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl Server {
    /// `idgate-spiffe serve ALLOWED...` in `cgroup`.
    fn start(agent: &Agent, cgroup: &Path, allowed: &[&str]) -> Self {
        let mut args = vec!["serve"];
        args.extend(allowed);
        Self::spawn(spiffe(agent, cgroup, &args))
    }

    /// `spiffe_tls_peer.py serve ALLOWED` in `cgroup`.
    fn python(python: &Path, agent: &Agent, cgroup: &Path, allowed: &str) -> Self {
        Self::spawn(python_in(
            python,
            agent,
            cgroup,
            "spiffe_tls_peer.py",
            &["serve", allowed],
        ))
    }

    fn spawn(mut command: Command) -> Self {
        let mut child = command
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
            .recv_timeout(Duration::from_secs(30))
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
            .recv_timeout(Duration::from_secs(15))
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
    let (_cg, a, agent) = bound_agent("svid-bad", "example.org", "a", ALPHA, "");
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
    let (_cg, a, agent) = bound_agent(
        "svid-stream",
        "example.org",
        "a",
        ALPHA,
        "x509_ttl = \"4s\"\nca_ttl = \"1h\"",
    );
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
    let (_other_cg, o, other) = bound_agent(
        "svid-mtls-other",
        "other.test",
        "o",
        OTHER,
        &static_trust("example.org", &creds.join("bundle.pem")),
    );
    let server_foreign = Server::start(&agent, alpha, &[OTHER]);
    let out = connect(&other, &o, &server_foreign.addr(), ALPHA);
    assert!(!out.starts_with("ok"), "{out}");
    let v = server_foreign.verdict();
    assert!(v.starts_with("refused") && v.contains("other.test"), "{v}");
}

#[test]
fn the_rust_spiffe_crate_fetches_and_verifies_svids_and_bundles() {
    require_privileges!();
    let (_cg, a, agent) = bound_agent("svid-rust", "example.org", "a", ALPHA, "");
    let v = spiffe_json(&agent, &a, &["interop", "db"]);
    assert_eq!(v["x509_id"], ALPHA, "{v}");
    assert_eq!(v["chain_verified"], true);
    assert_eq!(v["trust_domains"], serde_json::json!(["example.org"]));
    assert_eq!(v["jwt_id"], ALPHA);
    assert_eq!(v["jwt_wrong_audience_refused"], true);
    assert_eq!(v["validated_by_api"], ALPHA);
}

#[test]
fn any_authority_on_the_socket_is_answered_and_broken_http2_ends_only_its_connection() {
    use idgate_tests::raw_h2::{self, Answer, Conn};
    require_privileges!();
    let (_cg, _a, agent) = bound_agent("svid-authority", "example.org", "a", ALPHA, "");
    let sock = socket(&agent);
    let path = sock.to_str().unwrap().to_owned();
    let encoded = path.replace('/', "%2F");
    let authorities: [Option<&[u8]>; 7] = [
        Some(path.as_bytes()),
        Some(encoded.as_bytes()),
        Some(b""),
        None,
        Some(b"localhost"),
        Some(b"[::1"),
        Some(b"a b"),
    ];
    // This test's process is bound to no identity: every call that reaches
    // the Workload API is answered PermissionDenied (gRPC status 7). Each
    // authority twice on one connection: the second block refers to the
    // client's HPACK dynamic table.
    let mut kept = Conn::open(&sock);
    let mut stream = 1;
    for _ in 0..2 {
        for authority in authorities {
            let block = kept.request_block("FetchX509SVID", authority);
            kept.call(stream, &block, &[]);
            let answer = kept.answer(stream);
            let shown = authority.map(String::from_utf8_lossy);
            assert_eq!(answer.grpc_status(), Some("7"), "{shown:?}: {answer:?}");
            stream += 2;
        }
    }

    // Unexpected requests on the same connection get a gRPC status each,
    // and the connection goes on: a method that does not exist, a
    // message cut short, bytes that are no protobuf message, a compressed
    // message with no encoding named, a length over the limit.
    let unexpected: [(&str, &str, Vec<u8>, &str); 5] = [
        (
            "a method that does not exist",
            "FetchNothing",
            vec![0, 0, 0, 0, 0],
            "12",
        ),
        (
            "a message cut short",
            "FetchJWTSVID",
            vec![0, 0, 0, 0, 100, 1, 2],
            "13",
        ),
        (
            "not protobuf",
            "FetchJWTSVID",
            vec![0, 0, 0, 0, 2, 0xff, 0xff],
            "13",
        ),
        (
            "compressed, no encoding",
            "FetchJWTSVID",
            vec![1, 0, 0, 0, 0],
            "13",
        ),
        (
            "over the size limit",
            "FetchJWTSVID",
            vec![0, 0xff, 0xff, 0xff, 0xff],
            "11",
        ),
    ];
    for (what, method, body, code) in unexpected {
        let block = kept.request_block(method, Some(path.as_bytes()));
        kept.send(
            &[
                raw_h2::frame(raw_h2::HEADERS, raw_h2::END_HEADERS, stream, &block),
                raw_h2::frame(raw_h2::DATA, raw_h2::END_STREAM, stream, &body),
            ]
            .concat(),
        );
        let answer = kept.answer(stream);
        eprintln!("{what}: {answer:?}");
        assert_eq!(answer.grpc_status(), Some(code), "{what}: {answer:?}");
        stream += 2;
    }

    // What the layer cannot rewrite ends that connection with GOAWAY; the
    // server goes on serving the others.
    let h = |flags, payload: &[u8]| raw_h2::frame(raw_h2::HEADERS, flags, 1, payload);
    let mut bomb = vec![0x40, 1, b'x', 0x7f, 0xa1, 0x1e];
    bomb.extend([b'y'; 4000]);
    bomb.extend([0x80 | 62; 13_000]);
    let broken: Vec<(&str, Vec<u8>)> = vec![
        (
            "an HPACK index past the tables",
            h(raw_h2::END_HEADERS, &[0x80 | 70]),
        ),
        (
            "a table size over SETTINGS",
            h(raw_h2::END_HEADERS, &[0x3f, 0xe2, 0x1f, 0x82]),
        ),
        (
            "an HPACK bomb",
            [
                h(0, &bomb[..16_000]),
                raw_h2::frame(
                    raw_h2::CONTINUATION,
                    raw_h2::END_HEADERS,
                    1,
                    &bomb[16_000..],
                ),
            ]
            .concat(),
        ),
        (
            "a header block over 64 KiB",
            [
                h(0, &[0; 16_000]),
                raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &[0; 16_000]),
                raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &[0; 16_000]),
                raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &[0; 16_000]),
                raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &[0; 16_000]),
            ]
            .concat(),
        ),
        (
            "a HEADERS frame over 16 KiB",
            h(raw_h2::END_HEADERS, &[0; 20_000]),
        ),
        (
            "a block cut by another frame",
            [h(0, &[0x82]), raw_h2::frame(raw_h2::DATA, 0, 1, &[])].concat(),
        ),
        (
            "a flood of empty CONTINUATION frames",
            [h(0, &[0x82])]
                .into_iter()
                .chain((0..100).map(|_| raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &[])))
                .collect::<Vec<_>>()
                .concat(),
        ),
        (
            "CONTINUATION alone",
            raw_h2::frame(raw_h2::CONTINUATION, raw_h2::END_HEADERS, 1, &[0x82]),
        ),
    ];
    for (what, bytes) in broken {
        let mut bad = Conn::open(&sock);
        bad.send(&bytes);
        let answer = bad.answer(1);
        assert!(matches!(answer, Answer::GoAway(_)), "{what}: {answer:?}");
    }
    // Not HTTP/2 at all: closed.
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);

    let block = kept.request_block("FetchX509SVID", Some(path.as_bytes()));
    kept.call(stream, &block, &[]);
    assert_eq!(kept.answer(stream).grpc_status(), Some("7"));
    let mut fresh = Conn::open(&sock);
    let block = fresh.request_block("FetchX509SVID", Some(b""));
    fresh.call(1, &block, &[]);
    assert_eq!(fresh.answer(1).grpc_status(), Some("7"));
    assert_eq!(
        log_lines(&agent, &["closing a connection"]).len(),
        8,
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

/// `python SCRIPT ARGS` (a script of tests/python/) in `cgroup`, with
/// `SPIFFE_ENDPOINT_SOCKET` set to the agent's socket.
fn python_in(python: &Path, agent: &Agent, cgroup: &Path, script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(cgroup)
        .arg(python)
        .arg(python::script(script))
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket(agent).display()),
        );
    cmd
}

/// Runs a python script to completion; its last output line as JSON.
fn python_json(python: &Path, agent: &Agent, cgroup: &Path, script: &str, args: &[&str]) -> Value {
    let out = python_in(python, agent, cgroup, script, args)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_python_spiffe_package_as_published_fetches_validates_and_streams() {
    require_privileges!();
    let Some(python) = python::env() else {
        return;
    };
    let mut cg = Cgroups::new("svid-py");
    let a = cg.inside("a");
    let stranger = cg.inside("stranger");
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
    let sock = format!("unix://{}", socket(&agent).display());
    // gRPC's C core under the package sends the socket path as
    // `:authority`; every call is answered.
    let v = python_json(
        &python,
        &agent,
        &a,
        "spiffe_interop.py",
        &["fetch", &sock, "db"],
    );
    assert_eq!(v["x509_id"], ALPHA, "{v}");
    assert_eq!(v["chain_verified"], true);
    assert_eq!(v["trust_domains"], serde_json::json!(["example.org"]));
    assert_eq!(v["jwt_id"], ALPHA);
    assert_eq!(v["jwt_wrong_audience_refused"], true);
    assert_eq!(v["validated_by_api"], ALPHA);
    assert_eq!(v["api_wrong_audience_refused"], true);
    // The X.509 stream carried the renewal (before half of 4 s).
    assert_eq!(v["stream_errors"], serde_json::json!([]), "{v}");
    assert!(v["stream_svids"].as_u64().unwrap() >= 2, "{v}");
    eprintln!(
        "py-spiffe saw a rotation after {} ms",
        v["stream_rotation_ms"]
    );

    // From a cgroup without identity, and from outside the scope: every
    // call of the package, and of the Rust `spiffe` crate, is refused.
    for dir in [stranger, cg.outside("outside")] {
        let v = python_json(
            &python,
            &agent,
            &dir,
            "spiffe_interop.py",
            &["denied", &sock],
        );
        for (call, code) in v.as_object().unwrap() {
            assert_eq!(code, "PERMISSION_DENIED", "{call}: {v}");
        }
        assert_eq!(v.as_object().unwrap().len(), 7, "{v}");
        // The crate reads PermissionDenied with "no identity issued" as
        // its NoIdentityIssued.
        let v = spiffe_json(&agent, &dir, &["interop", "db"]);
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.ends_with("NoIdentityIssued"), "{v}");
    }
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

#[test]
fn spiffe_tls_from_pypi_talks_mutual_tls_between_two_bound_workloads() {
    require_privileges!();
    let Some(python) = python::env() else {
        return;
    };
    let mut cg = Cgroups::new("svid-pytls");
    let dirs: Vec<PathBuf> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|n| cg.inside(n))
        .collect();
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA, BETA, GAMMA]),
        &config(
            "example.org",
            &[("alpha", ALPHA), ("beta", BETA), ("gamma", GAMMA)],
            "",
        ),
    );
    for d in &dirs {
        wait_bound(&agent, d);
    }
    let (alpha, beta, gamma) = (&dirs[0], &dirs[1], &dirs[2]);
    let dial = |dir: &Path, addr: &str, expect: &str| -> String {
        let out = python_in(
            &python,
            &agent,
            dir,
            "spiffe_tls_peer.py",
            &["dial", addr, expect],
        )
        .output()
        .expect("run the python client");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // ALPHA serves and accepts BETA only; each side checks the other's ID.
    let server = Server::python(&python, &agent, alpha, BETA);
    let addr = server.addr();
    assert_eq!(
        dial(beta, &addr, ALPHA),
        format!("ok hello {BETA} from {ALPHA}")
    );
    assert_eq!(server.verdict(), format!("accepted {BETA}"));
    // GAMMA is refused by ALPHA.
    let out = dial(gamma, &addr, ALPHA);
    assert!(!out.starts_with("ok"), "{out}");
    assert!(server.verdict().starts_with("refused"));
    // BETA expecting GAMMA refuses ALPHA.
    let out = dial(beta, &addr, GAMMA);
    assert!(out.starts_with("refused"), "{out}");
    assert!(server.verdict().starts_with("refused"));
}

#[test]
fn rs256_jwt_svids_verify_with_pyjwt_and_the_workload_api() {
    require_privileges!();
    let Some(python) = python::env() else {
        return;
    };
    let port = idgate_tests::free_loopback_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let (_cg, a, agent) = bound_agent(
        "svid-rs256",
        "example.org",
        "a",
        ALPHA,
        &format!(
            "[svid.jwt_algorithms]\n\"example.org\" = \"RS256\"\n\
             [svid.oidc]\nissuer = \"{issuer}\"\naddress = \"127.0.0.1:{port}\"\n"
        ),
    );
    let discovery = format!("{issuer}/.well-known/openid-configuration");
    let v = python_json(
        &python,
        &agent,
        &a,
        "oidc_verify.py",
        &["verify", &discovery, &issuer, "api://AzureADTokenExchange"],
    );
    assert_eq!(v["sub"], ALPHA, "{v}");
    assert_eq!(v["algs"], serde_json::json!(["RS256"]), "{v}");
    // The Workload API's ValidateJWTSVID takes RS256 tokens too.
    let token = idgate_svid(&agent, &a, &["--jwt", "--audience", "partner"])
        .unwrap_or_else(|e| panic!("JWT-SVID: {e}"));
    let v = spiffe_json(&agent, &a, &["raw", "validate", "partner", token.trim()]);
    assert_eq!(v["code"], "Ok", "{v}");
    assert_eq!(v["spiffe_id"], ALPHA, "{v}");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

/// One raw HTTP/1.1 exchange with 127.0.0.1:`port`: the answer's status
/// line.
fn raw_http(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer (and close) before it has read it all.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn pyjwt_verifies_jwt_svids_through_the_oidc_discovery_document() {
    require_privileges!();
    let Some(python) = python::env() else {
        return;
    };
    let mut cg = Cgroups::new("svid-oidc");
    let a = cg.inside("a");
    let b = cg.inside("b");
    let port = idgate_tests::free_loopback_port();
    let issuer = format!("http://127.0.0.1:{port}/agents/h1");
    // A generation lives 60 s: the second is published at 30 s and signs
    // from 50 s.
    let agent = Agent::start(
        &cg,
        &policy(&[ALPHA, OTHER]),
        &format!(
            "trust_domains = [\"example.org\", \"other.test\"]\nresync_seconds = 5\n\
             [[workload]]\ncgroup = \"a\"\nidentity = \"{ALPHA}\"\n\
             [[workload]]\ncgroup = \"b\"\nidentity = \"{OTHER}\"\n\
             [svid]\nca_ttl = \"60s\"\njwt_ttl = \"10s\"\nx509_ttl = \"10s\"\n\
             [svid.oidc]\nissuer = \"{issuer}\"\ntrust_domain = \"example.org\"\n\
             address = \"127.0.0.1:{port}\"\nstatic_dir = \"oidc-www\"\n"
        ),
    );
    wait_bound(&agent, &a);
    wait_bound(&agent, &b);
    let discovery = format!("{issuer}/.well-known/openid-configuration");

    // Malformed, oversized and unexpected requests: each its status, and
    // the listener goes on serving.
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for (request, status) in [
        (get("/.well-known/openid-configuration"), "404"),
        (get("/agents/h1/keys"), "404"),
        (
            "POST /agents/h1/jwks.json HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned(),
            "405",
        ),
        ("\x16\x03\x01\x02\x00 no HTTP\r\n\r\n".to_owned(), "400"),
        (
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000)),
            "431",
        ),
    ] {
        let line = raw_http(port, request.as_bytes());
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status}")),
            "{}: {line}",
            &request[..40.min(request.len())]
        );
    }

    let v = python_json(
        &python,
        &agent,
        &a,
        "oidc_verify.py",
        &["verify", &discovery, &issuer, "sts.amazonaws.com"],
    );
    assert_eq!(v["sub"], ALPHA, "{v}");
    assert_eq!(v["iss"], issuer.as_str());
    assert_eq!(v["algs"], serde_json::json!(["ES256"]));
    for doc in ["discovery", "jwks"] {
        assert_eq!(v[format!("{doc}_content_type")], "application/json", "{v}");
        assert_eq!(
            v[format!("{doc}_cache_control")],
            "public, max-age=10",
            "{v}"
        );
    }
    assert_eq!(v["wrong_audience_refused"], "InvalidAudienceError", "{v}");

    // A JWT-SVID of the other trust domain: its key is not in this
    // issuer's JWK Set.
    let v = python_json(
        &python,
        &agent,
        &b,
        "oidc_verify.py",
        &["foreign", &discovery, &issuer, "sts.amazonaws.com"],
    );
    assert_eq!(v["sub"], OTHER, "{v}");
    assert_eq!(v["refused"], "PyJWKClientError", "{v}");

    // Through a rotation: tokens of the new key verify with the same
    // client, the old key stays published, the files follow.
    let www = agent.dir.join("oidc-www");
    let v = python_json(
        &python,
        &agent,
        &a,
        "oidc_verify.py",
        &[
            "rotation",
            &discovery,
            &issuer,
            "sts.amazonaws.com",
            www.to_str().unwrap(),
            "80",
        ],
    );
    assert_ne!(v["first_kid"], v["new_kid"], "{v}");
    assert_eq!(v["new_sub"], ALPHA, "{v}");
    assert_eq!(v["first_token_key_served"], ALPHA, "{v}");
    let served = v["served_kids"].as_array().unwrap();
    assert!(
        served.contains(&v["first_kid"]) && served.contains(&v["new_kid"]),
        "{v}"
    );
    assert_eq!(v["static_jwks_matches"], true, "{v}");
    assert_eq!(v["static_discovery_matches"], true, "{v}");
    assert_eq!(
        raw_http(port, get("/agents/h1/jwks.json").as_bytes()),
        "HTTP/1.1 200 OK"
    );
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

fn tempdir(agent: &Agent, name: &str) -> PathBuf {
    let d = agent.dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// Federation between agents: each agent is its own trust domain on its
// own scope, serves its bundle at a bundle endpoint on loopback, and
// fetches the other's.

const A_SERVER: &str = "spiffe://a.test/server";
const B_CLIENT: &str = "spiffe://b.test/client";
const B_BLOCKED: &str = "spiffe://b.test/blocked";
const C_CLIENT: &str = "spiffe://c.test/client";

/// An identity whose every connect is denied.
fn deny_all(id: &str) -> String {
    format!("[[identity]]\nid = \"{id}\"\ndefault = \"deny\"\n")
}

/// `[svid.bundle_endpoint]` on 127.0.0.1:`port`, with `extra` keys.
fn bundle_endpoint(port: u16, extra: &str) -> String {
    format!("[svid.bundle_endpoint]\naddress = \"127.0.0.1:{port}\"\n{extra}\n")
}

/// `[[svid.federates_with]]`: the https_spiffe bundle endpoint of agent
/// `td` on 127.0.0.1:`port`, bootstrapped (as the SPIFFE Federation spec
/// requires for https_spiffe) with `td`'s roots in `bootstrap`.
fn federates_spiffe(td: &str, port: u16, bootstrap: &Path) -> String {
    format!(
        "[[svid.federates_with]]\ntrust_domain = \"{td}\"\nurl = \"https://127.0.0.1:{port}/bundle\"\nprofile = \"https_spiffe\"\nendpoint_id = \"spiffe://{td}/idgate/bundle-endpoint\"\nbundle = {bootstrap:?}\n"
    )
}

/// Two loopback ports nobody listens on, distinct.
fn two_free_ports() -> (u16, u16) {
    loop {
        let (a, b) = (
            idgate_tests::free_loopback_port(),
            idgate_tests::free_loopback_port(),
        );
        if a != b {
            return (a, b);
        }
    }
}

/// The base64 bodies of the PEM blocks in `text`, in order.
fn pem_bodies(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with("-----BEGIN ") {
            body = Some(String::new());
        } else if line.starts_with("-----END ") {
            out.extend(body.take());
        } else if let Some(b) = &mut body {
            b.push_str(line);
        }
    }
    out
}

/// `idgate svid --json` of the workload in `dir`.
fn svid_json(agent: &Agent, dir: &Path) -> Value {
    let out = idgate_svid(agent, dir, &["--json"]).unwrap_or_else(|e| panic!("idgate svid: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The roots the workload in `dir` is handed for its own trust domain.
fn own_roots(agent: &Agent, dir: &Path) -> Vec<String> {
    pem_bodies(svid_json(agent, dir)["bundle"].as_str().expect("bundle"))
}

/// The roots the workload in `dir` is handed as `td`'s federated bundle
/// (none when it has none).
fn federated_roots(agent: &Agent, dir: &Path, td: &str) -> Vec<String> {
    svid_json(agent, dir)["federated_bundles"][td]
        .as_str()
        .map(pem_bodies)
        .unwrap_or_default()
}

/// A JWT-SVID of the workload in `from_dir`, validated by the Workload
/// API of `to` for its workload in `to_dir`: the SPIFFE ID it validates
/// to, or the error. Only JWT authorities validate it, and a PEM
/// bootstrap bundle has none: `Ok` means a fetched bundle is held.
fn jwt_validated_across(
    from: &Agent,
    from_dir: &Path,
    to: &Agent,
    to_dir: &Path,
) -> Result<String, Value> {
    let token = idgate_svid(from, from_dir, &["--jwt", "--audience", "partner"])
        .unwrap_or_else(|e| panic!("JWT-SVID: {e}"));
    let v = spiffe_json(to, to_dir, &["raw", "validate", "partner", token.trim()]);
    match v["spiffe_id"].as_str() {
        Some(id) if v["code"] == "Ok" => Ok(id.to_owned()),
        _ => Err(v),
    }
}

/// Lines of an agent's log that contain every one of `words`.
fn log_lines(agent: &Agent, words: &[&str]) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn two_agents_federate_over_https_spiffe_and_their_workloads_talk_mutual_tls() {
    require_privileges!();
    let (port_a, port_b) = two_free_ports();
    let mut cg_a = Cgroups::new("svid-fed-a");
    let a_dir = cg_a.inside("server");
    let mut cg_b = Cgroups::new("svid-fed-b");
    let b_dir = cg_b.inside("client");
    let b_blocked = cg_b.inside("blocked");

    // A (a.test) serves its bundle endpoint.
    let mut a = Agent::start(
        &cg_a,
        &policy(&[A_SERVER]),
        &config(
            "a.test",
            &[("server", A_SERVER)],
            &bundle_endpoint(port_a, ""),
        ),
    );
    wait_bound(&a, &a_dir);
    // a.test's roots, as its workload writes them out: B's bootstrap.
    let a_creds = tempdir(&a, "a-creds");
    idgate_svid(&a, &a_dir, &["--write", a_creds.to_str().unwrap()]).unwrap();
    let a_roots = own_roots(&a, &a_dir);
    assert_eq!(a_roots.len(), 1);

    // B (b.test) serves its own and fetches a.test's.
    let b = Agent::start(
        &cg_b,
        &(policy(&[B_CLIENT]) + &deny_all(B_BLOCKED)),
        &config(
            "b.test",
            &[("client", B_CLIENT), ("blocked", B_BLOCKED)],
            &(bundle_endpoint(port_b, "")
                + &federates_spiffe("a.test", port_a, &a_creds.join("bundle.pem"))),
        ),
    );
    wait_bound(&b, &b_dir);
    let b_creds = tempdir(&b, "b-creds");
    idgate_svid(&b, &b_dir, &["--write", b_creds.to_str().unwrap()]).unwrap();
    let b_roots = own_roots(&b, &b_dir);

    // A learns b.test the same way: its configuration gains the
    // federation and it restarts (its CA and bindings are kept).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&a.config)
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(federates_spiffe("b.test", port_b, &b_creds.join("bundle.pem")).as_bytes())
        })
        .expect("extend A's config");
    a.stop(nix::sys::signal::Signal::SIGTERM);
    a.spawn();
    a.wait_ready();
    wait_bound(&a, &a_dir);
    assert_eq!(own_roots(&a, &a_dir), a_roots, "A kept its CA");

    // Each agent fetched the other's bundle from its endpoint (TLS
    // checked against the endpoint's SPIFFE ID and trust domain roots):
    // kept in its state, handed to its workloads as a federated bundle,
    // JWT authorities included (the PEM bootstrap had none).
    let fetched = Instant::now();
    let id = wait_for("B validates A's JWT-SVID", Duration::from_secs(20), || {
        jwt_validated_across(&a, &a_dir, &b, &b_dir).ok()
    });
    assert_eq!(id, A_SERVER);
    let id = wait_for("A validates B's JWT-SVID", Duration::from_secs(20), || {
        jwt_validated_across(&b, &b_dir, &a, &a_dir).ok()
    });
    assert_eq!(id, B_CLIENT);
    eprintln!("both fetched within {} ms", fetched.elapsed().as_millis());
    for (agent, td) in [(&b, "a.test"), (&a, "b.test")] {
        let kept = agent.dir.join(format!("state/svid/federated/{td}.json"));
        assert!(kept.is_file(), "{} missing", kept.display());
        assert!(
            !log_lines(agent, &["federated bundle updated", td]).is_empty(),
            "{}",
            agent.log()
        );
    }
    assert_eq!(federated_roots(&b, &b_dir, "a.test"), a_roots);
    assert_eq!(federated_roots(&a, &a_dir, "b.test"), b_roots);
    // FetchX509Bundles, and the Rust `spiffe` crate's X.509 context, hold
    // both trust domains.
    let sorted = |v: &Value| {
        let mut tds: Vec<String> = v
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|t| {
                t.as_str()
                    .unwrap()
                    .trim_start_matches("spiffe://")
                    .to_owned()
            })
            .collect();
        tds.sort();
        tds
    };
    let v = spiffe_json(&b, &b_dir, &["raw", "bundles"]);
    assert_eq!(sorted(&v["trust_domains"]), ["a.test", "b.test"], "{v}");
    let v = spiffe_json(&b, &b_dir, &["interop", "partner"]);
    assert_eq!(v["x509_id"], B_CLIENT, "{v}");
    assert_eq!(sorted(&v["trust_domains"]), ["a.test", "b.test"], "{v}");

    // Mutual TLS, each side verifying the other's SVID through the
    // federated bundle; the kernel allows both connects (policy: loopback).
    let server = Server::start(&a, &a_dir, &[B_CLIENT, C_CLIENT]);
    let out = connect(&b, &b_dir, &server.addr(), A_SERVER);
    assert_eq!(out, format!("ok hello {B_CLIENT} from {A_SERVER}"));
    assert_eq!(server.verdict(), format!("accepted {B_CLIENT}"));
    let server_b = Server::start(&b, &b_dir, &[A_SERVER]);
    let out = connect(&a, &a_dir, &server_b.addr(), B_CLIENT);
    assert_eq!(out, format!("ok hello {A_SERVER} from {B_CLIENT}"));
    assert_eq!(server_b.verdict(), format!("accepted {A_SERVER}"));

    // The policy still decides: B's other workload holds a b.test SVID
    // that A would accept through the same bundle, but its identity may
    // connect nowhere, and the kernel says so.
    assert!(idgate_svid(&b, &b_blocked, &[]).is_ok());
    assert_eq!(connect(&b, &b_blocked, &server.addr(), A_SERVER), "EPERM");

    // A third trust domain that neither federates with: C trusts a.test
    // (a static bundle), its policy lets it connect, and A refuses it;
    // A's workload refuses C's server likewise.
    let (_cg_c, c_dir, c) = bound_agent(
        "svid-fed-c",
        "c.test",
        "client",
        C_CLIENT,
        &static_trust("a.test", &a_creds.join("bundle.pem")),
    );
    let out = connect(&c, &c_dir, &server.addr(), A_SERVER);
    assert!(!out.starts_with("ok"), "{out}");
    let v = server.verdict();
    assert!(v.starts_with("refused") && v.contains("c.test"), "{v}");
    let server_c = Server::start(&c, &c_dir, &[A_SERVER]);
    let out = connect(&a, &a_dir, &server_c.addr(), C_CLIENT);
    assert!(out.starts_with("refused"), "{out}");
    assert!(federated_roots(&a, &a_dir, "c.test").is_empty());
    assert!(jwt_validated_across(&c, &c_dir, &a, &a_dir).is_err());
    // And B still talks to A.
    let out = connect(&b, &b_dir, &server.addr(), A_SERVER);
    assert_eq!(out, format!("ok hello {B_CLIENT} from {A_SERVER}"));
    assert_eq!(server.verdict(), format!("accepted {B_CLIENT}"));
    for agent in [&a, &b, &c] {
        assert!(!agent.log().contains("panicked"), "{}", agent.log());
    }
}

/// A test CA and, signed by it, a serving certificate for the IP address
/// 127.0.0.1, written as PEM into `dir`: `ca.pem`, `endpoint.pem`,
/// `endpoint.key` (0600). Another CA's `other-ca.pem` beside them.
fn web_pki(dir: &Path) {
    use idgate_tests::pki::TestCa;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let ca = TestCa::new("idgate test web CA");
    let other = TestCa::new("another test CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    std::fs::write(dir.join("other-ca.pem"), &other.pem).unwrap();
    std::fs::write(dir.join("endpoint.pem"), &leaf.pem).unwrap();
    let key_path = dir.join("endpoint.key");
    std::fs::write(&key_path, &leaf.key_pem).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn an_https_web_bundle_endpoint_is_trusted_through_the_configured_ca_only() {
    require_privileges!();
    let port = idgate_tests::free_loopback_port();
    let mut cg_a = Cgroups::new("svid-web-a");
    let a_dir = cg_a.inside("server");
    let mut cg_b = Cgroups::new("svid-web-b");
    let b_dir = cg_b.inside("client");

    // A serves a.test's bundle with a Web PKI certificate from a test CA
    // (paths relative to its config, written before it starts).
    let mut a = Agent::prepare(
        &cg_a,
        &policy(&[A_SERVER]),
        &config(
            "a.test",
            &[("server", A_SERVER)],
            &bundle_endpoint(
                port,
                "profile = \"https_web\"\ncert = \"pki/endpoint.pem\"\nkey = \"pki/endpoint.key\"",
            ),
        ),
    );
    let pki = a.dir.join("pki");
    web_pki(&pki);
    a.spawn();
    a.wait_ready();
    wait_bound(&a, &a_dir);

    // B fetches it three times over, as three foreign trust domains (the
    // body names no trust domain): trusting the test CA (a.test), another
    // CA (wrong.test), the system's roots (system.test). No bootstrap
    // bundle: https_web needs none.
    let web = |td: &str, ca: Option<&Path>| {
        let mut s = format!(
            "[[svid.federates_with]]\ntrust_domain = \"{td}\"\nurl = \"https://127.0.0.1:{port}/\"\nprofile = \"https_web\"\n"
        );
        if let Some(ca) = ca {
            s.push_str(&format!("ca = {ca:?}\n"));
        }
        s
    };
    let b = Agent::start(
        &cg_b,
        &policy(&[B_CLIENT]),
        &config(
            "b.test",
            &[("client", B_CLIENT)],
            &(web("a.test", Some(&pki.join("ca.pem")))
                + &web("wrong.test", Some(&pki.join("other-ca.pem")))
                + &web("system.test", None)),
        ),
    );
    wait_bound(&b, &b_dir);
    let id = wait_for("B validates A's JWT-SVID", Duration::from_secs(20), || {
        jwt_validated_across(&a, &a_dir, &b, &b_dir).ok()
    });
    assert_eq!(id, A_SERVER);
    assert_eq!(federated_roots(&b, &b_dir, "a.test"), own_roots(&a, &a_dir));

    // The other two fail at the TLS handshake, are logged, and hand
    // workloads nothing.
    for td in ["wrong.test", "system.test"] {
        let lines = wait_for("the failed fetch logged", Duration::from_secs(15), || {
            let l = log_lines(&b, &["bundle fetch failed", td]);
            (!l.is_empty()).then_some(l)
        });
        assert!(lines[0].contains("UnknownIssuer"), "{}", lines[0]);
        assert!(federated_roots(&b, &b_dir, td).is_empty());
        assert!(
            !b.dir
                .join(format!("state/svid/federated/{td}.json"))
                .exists()
        );
    }
    let v = svid_json(&b, &b_dir);
    let tds: Vec<&String> = v["federated_bundles"].as_object().unwrap().keys().collect();
    assert_eq!(tds, ["a.test"], "{v}");

    assert!(!b.log().contains("panicked"), "{}", b.log());
}

/// The root certificate of generation `n` of `td`'s CA in `agent`'s
/// state, once it exists (a generation's directory appears whole).
fn ca_generation(agent: &Agent, td: &str, n: u32, within: Duration) -> String {
    let path = agent.dir.join(format!("state/svid/ca/{td}/{n}/ca.crt"));
    let pem = wait_for(&format!("CA generation {n}"), within, || {
        std::fs::read_to_string(&path).ok()
    });
    pem_bodies(&pem).pop().expect("a certificate")
}

#[test]
fn a_federated_bundle_follows_the_foreign_ca_rotation() {
    require_privileges!();
    let port = idgate_tests::free_loopback_port();
    let mut cg_a = Cgroups::new("svid-rot-a");
    let a_dir = cg_a.inside("server");
    let mut cg_b = Cgroups::new("svid-rot-b");
    let b_dir = cg_b.inside("client");

    // A's CA lives T = 30 s: generation 2 is published at 15 s and signs
    // from 25 s (the endpoint's SVID too); generation 1 expires at 30 s,
    // when generation 3 is published. The refresh hint is T/12, 2 s.
    let started = Instant::now();
    let a = Agent::start(
        &cg_a,
        &policy(&[A_SERVER]),
        &config(
            "a.test",
            &[("server", A_SERVER)],
            &format!(
                "ca_ttl = \"30s\"\nx509_ttl = \"5s\"\njwt_ttl = \"5s\"\n{}",
                bundle_endpoint(port, "")
            ),
        ),
    );
    wait_bound(&a, &a_dir);
    let gen1 = ca_generation(&a, "a.test", 1, Duration::from_secs(1));
    let a_creds = tempdir(&a, "a-creds");
    idgate_svid(&a, &a_dir, &["--write", a_creds.to_str().unwrap()]).unwrap();

    // B bootstraps with generation 1 only and follows the refresh hint.
    let b = Agent::start(
        &cg_b,
        &policy(&[B_CLIENT]),
        &config(
            "b.test",
            &[("client", B_CLIENT)],
            &federates_spiffe("a.test", port, &a_creds.join("bundle.pem")),
        ),
    );
    wait_bound(&b, &b_dir);
    wait_for("the first fetch", Duration::from_secs(10), || {
        jwt_validated_across(&a, &a_dir, &b, &b_dir).ok()
    });
    assert!(
        started.elapsed() < Duration::from_secs(22),
        "the agents took {:?} to start: too slow for this test's 30 s CA",
        started.elapsed()
    );
    assert_eq!(federated_roots(&b, &b_dir, "a.test")[0], gen1);

    // Generation 2 is published by A, and B's workload is handed it
    // within a few refresh hints.
    let gen2 = ca_generation(&a, "a.test", 2, Duration::from_secs(20));
    let published = Instant::now();
    wait_for(
        "B's workload gets generation 2",
        Duration::from_secs(8),
        || {
            let roots = federated_roots(&b, &b_dir, "a.test");
            (roots == [gen1.clone(), gen2.clone()]).then_some(())
        },
    );
    eprintln!(
        "generation 2 reached B's workload {} ms after A made it",
        published.elapsed().as_millis()
    );

    // Generation 1 expires: B now verifies A's endpoint (presenting an SVID
    // of generation 2) through the bundle it fetched, not its bootstrap
    // file, and keeps following: generation 3 in, generation 1 out.
    let gen3 = ca_generation(&a, "a.test", 3, Duration::from_secs(20));
    wait_for(
        "B's workload gets generation 3 without generation 1",
        Duration::from_secs(10),
        || {
            let roots = federated_roots(&b, &b_dir, "a.test");
            (roots == [gen2.clone(), gen3.clone()]).then_some(())
        },
    );
    // And what it holds validates A's current JWT-SVIDs (generation 2's
    // key signs them now).
    assert_eq!(
        jwt_validated_across(&a, &a_dir, &b, &b_dir).unwrap(),
        A_SERVER
    );
    assert!(
        log_lines(&b, &["bundle fetch failed"]).is_empty(),
        "{}",
        b.log()
    );
}
