//! A SPIFFE test workload. It moves itself into a cgroup (`--cgroup`),
//! then talks to idgate's Workload API (`--socket`):
//!
//! - `interop AUDIENCE`: with the Rust `spiffe` crate (a client others
//!   wrote) fetches the X.509 context and a JWT-SVID and verifies them:
//!   the chain by rustls against the bundle of the SVID's trust domain,
//!   the JWT by the crate's own validator with the fetched JWT bundles.
//!   Prints one JSON object.
//! - `serve ALLOWED_ID...`: a mutual TLS server on 127.0.0.1 presenting its
//!   X.509-SVID (fetched with the `spiffe` crate) and accepting only
//!   clients whose SVID verifies and whose SPIFFE ID is allowed. Prints
//!   `listening PORT`, then `accepted ID` or `refused REASON` per client.
//! - `connect ADDR EXPECTED_ID`: a mutual TLS client; prints `ok REPLY`,
//!   `refused REASON` or the errno of a connect the kernel denied.
//! - `raw CASE`: one raw gRPC call (idgate's generated client), to see the
//!   status codes for bad input; `stream` prints each X.509-SVID update.
//!   Prints JSON lines.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idgate::identity::SpiffeId;
use idgate::svid::tls::{self, BundleSource, SpiffeVerifier};
use idgate::workload_api::{self, proto};
use serde_json::json;
use spiffe::{TrustDomain, WorkloadApiClient, X509Context};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--cgroup") {
        let dir = PathBuf::from(args.remove(1));
        args.remove(0);
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| fail(&format!("joining {}: {e}", dir.display())));
    }
    if args.first().map(String::as_str) != Some("--socket") || args.len() < 3 {
        fail("usage: idgate-spiffe [--cgroup DIR] --socket PATH interop|serve|connect|raw ...");
    }
    let socket = PathBuf::from(args[1].clone());
    let command = args[2].clone();
    let rest = args[3..].to_vec();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match command.as_str() {
        "interop" => rt.block_on(interop(&socket, &rest[0])),
        "serve" => {
            let ctx = rt.block_on(x509_context(&socket));
            serve(&ctx, &rest);
        }
        "connect" => {
            let ctx = rt.block_on(x509_context(&socket));
            connect(&ctx, &rest[0], &rest[1]);
        }
        "raw" => rt.block_on(raw(&socket, &rest[0], &rest[1..])),
        other => fail(&format!("unknown command {other}")),
    }
}

fn fail(message: &str) -> ! {
    println!("{}", json!({"error": message}));
    std::process::exit(1);
}

async fn client(socket: &std::path::Path) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap_or_else(|e| fail(&format!("connect: {e}")))
}

async fn x509_context(socket: &std::path::Path) -> X509Context {
    client(socket)
        .await
        .fetch_x509_context()
        .await
        .unwrap_or_else(|e| fail(&format!("X.509 context: {e}")))
}

/// The X.509 bundle of a trust domain in a context, as DER.
fn bundle_source(ctx: &X509Context) -> BundleSource {
    let set = ctx.bundle_set().clone();
    Arc::new(move |td: &str| {
        let td = TrustDomain::new(td).ok()?;
        set.get(&td).map(|b| {
            b.authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
    })
}

fn own_svid(ctx: &X509Context) -> (Vec<Vec<u8>>, Vec<u8>) {
    let svid = ctx.default_svid().unwrap_or_else(|| fail("no SVID"));
    (
        svid.cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        svid.private_key().as_bytes().to_vec(),
    )
}

async fn interop(socket: &std::path::Path, audience: &str) {
    let client = client(socket).await;
    // Debug: the gRPC status code too.
    let ctx = client
        .fetch_x509_context()
        .await
        .unwrap_or_else(|e| fail(&format!("X.509 context: {e:?}")));
    let svid = ctx.default_svid().unwrap_or_else(|| fail("no SVID"));
    let id = svid.spiffe_id().clone();
    let bundle = ctx
        .bundle_set()
        .get(id.trust_domain())
        .unwrap_or_else(|| fail("no bundle for the SVID's own trust domain"));
    // rustls path validation against the SVID's own trust domain bundle.
    let mut roots = rustls::RootCertStore::empty();
    for a in bundle.authorities() {
        roots
            .add(a.as_bytes().to_vec().into())
            .unwrap_or_else(|e| fail(&format!("bundle authority: {e}")));
    }
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec().into())
        .collect();
    let leaf = rustls::server::ParsedCertificate::try_from(&chain[0])
        .unwrap_or_else(|e| fail(&format!("leaf: {e}")));
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &roots,
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
    .unwrap_or_else(|e| fail(&format!("chain does not verify: {e}")));
    let trust_domains: Vec<String> = ctx
        .bundle_set()
        .iter()
        .map(|(td, _)| td.to_string())
        .collect();

    let jwt = client
        .fetch_jwt_svid([audience], None)
        .await
        .unwrap_or_else(|e| fail(&format!("JWT-SVID: {e}")));
    let jwt_bundles = client
        .fetch_jwt_bundles()
        .await
        .unwrap_or_else(|e| fail(&format!("JWT bundles: {e}")));
    let validated = spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &[audience])
        .unwrap_or_else(|e| fail(&format!("JWT-SVID does not validate: {e}")));
    let wrong_audience =
        spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["not-the-audience"])
            .is_err();
    let by_api = client
        .validate_jwt_token(audience, jwt.token())
        .await
        .unwrap_or_else(|e| fail(&format!("ValidateJWTSVID: {e}")));
    println!(
        "{}",
        json!({
            "x509_id": id.to_string(),
            "chain": chain.len(),
            "chain_verified": true,
            "trust_domains": trust_domains,
            "jwt_id": validated.spiffe_id().to_string(),
            "jwt_kid": validated.key_id(),
            "jwt_wrong_audience_refused": wrong_audience,
            "validated_by_api": by_api.spiffe_id().to_string(),
        })
    );
}

fn parse_ids(ids: &[String]) -> Vec<SpiffeId> {
    ids.iter()
        .map(|s| s.parse().unwrap_or_else(|e| fail(&format!("{s}: {e}"))))
        .collect()
}

fn serve(ctx: &X509Context, allowed: &[String]) {
    let (chain, key) = own_svid(ctx);
    let verifier = SpiffeVerifier::exactly(bundle_source(ctx), parse_ids(allowed));
    let config = Arc::new(
        tls::mtls_server_config(verifier, &chain, &key)
            .unwrap_or_else(|e| fail(&format!("TLS config: {e}"))),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("listening {}", listener.local_addr().expect("addr").port());
    let me = ctx.default_svid().expect("svid").spiffe_id().to_string();
    for stream in listener.incoming() {
        let Ok(mut tcp) = stream else { continue };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let mut conn = rustls::ServerConnection::new(config.clone()).expect("server connection");
        let result = (|| -> Result<String, String> {
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
            }
            let peer = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or("no client certificate")?;
            let id = idgate::svid::leaf_id(peer).map_err(|e| e.to_string())?;
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut line = String::new();
            BufReader::new(&mut tls)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            writeln!(tls, "hello {id} from {me}").map_err(|e| e.to_string())?;
            conn.send_close_notify();
            let _ = conn.complete_io(&mut tcp);
            Ok(id.to_string())
        })();
        match result {
            Ok(id) => println!("accepted {id}"),
            Err(e) => println!("refused {e}"),
        }
        let _ = std::io::stdout().flush();
    }
}

fn connect(ctx: &X509Context, addr: &str, expected: &str) {
    let (chain, key) = own_svid(ctx);
    let verifier = SpiffeVerifier::exactly(bundle_source(ctx), parse_ids(&[expected.to_owned()]));
    let config = tls::client_config(verifier, Some((&chain, &key)))
        .unwrap_or_else(|e| fail(&format!("TLS config: {e}")));
    let mut tcp = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            let name = match e.raw_os_error() {
                Some(libc::EPERM) => "EPERM".to_owned(),
                Some(libc::ECONNREFUSED) => "ECONNREFUSED".to_owned(),
                _ => e.to_string(),
            };
            println!("{name}");
            return;
        }
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "peer.invalid".try_into().expect("name"))
            .expect("client connection");
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let result = writeln!(tls, "hi").and_then(|()| {
        let mut reply = String::new();
        BufReader::new(tls).read_line(&mut reply).map(|_| reply)
    });
    match result {
        Ok(reply) if !reply.is_empty() => println!("ok {}", reply.trim()),
        Ok(_) => println!("refused by the server"),
        Err(e) => println!("refused {e}"),
    }
}

fn report<T>(
    r: Result<tonic::Response<T>, tonic::Status>,
    ok: impl FnOnce(T) -> serde_json::Value,
) {
    let v = match r {
        Ok(resp) => {
            let mut v = ok(resp.into_inner());
            v["code"] = json!("Ok");
            v
        }
        Err(s) => json!({"code": format!("{:?}", s.code()), "message": s.message()}),
    };
    println!("{v}");
}

async fn raw(socket: &std::path::Path, case: &str, args: &[String]) {
    let mut c = workload_api::connect(socket)
        .await
        .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let jwt = |audience: Vec<String>, spiffe_id: &str| proto::JwtsvidRequest {
        audience,
        spiffe_id: spiffe_id.to_owned(),
    };
    let token_of = |r: proto::JwtsvidResponse| json!({"token": r.svids[0].svid, "spiffe_id": r.svids[0].spiffe_id});
    match case {
        "no-header" => report(
            c.fetch_jwtsvid(tonic::Request::new(jwt(vec!["a".into()], "")))
                .await,
            token_of,
        ),
        "jwt" => report(
            c.fetch_jwtsvid(workload_api::request(jwt(args.to_vec(), "")))
                .await,
            token_of,
        ),
        "jwt-for" => report(
            c.fetch_jwtsvid(workload_api::request(jwt(vec!["a".into()], &args[0])))
                .await,
            token_of,
        ),
        "validate" => report(
            c.validate_jwtsvid(workload_api::request(proto::ValidateJwtsvidRequest {
                audience: args[0].clone(),
                svid: args[1].clone(),
            }))
            .await,
            |r| json!({"spiffe_id": r.spiffe_id, "claims": format!("{:?}", r.claims)}),
        ),
        "oversized" => report(
            c.validate_jwtsvid(workload_api::request(proto::ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: "x".repeat(200 * 1024),
            }))
            .await,
            |r| json!({"spiffe_id": r.spiffe_id}),
        ),
        "bundles" => match c
            .fetch_x509_bundles(workload_api::request(proto::X509BundlesRequest {}))
            .await
        {
            Ok(s) => {
                let first = s.into_inner().message().await;
                report(
                    first.map(|m| tonic::Response::new(m.unwrap_or_default())),
                    |r| json!({"trust_domains": r.bundles.keys().collect::<Vec<_>>()}),
                )
            }
            Err(e) => report::<()>(Err(e), |_| json!({})),
        },
        "stream" => {
            // Every update of the X.509-SVID stream for `args[0]` seconds.
            let limit = Duration::from_secs(args[0].parse().expect("seconds"));
            let start = Instant::now();
            let mut stream = match c
                .fetch_x509svid(workload_api::request(proto::X509svidRequest {}))
                .await
            {
                Ok(s) => s.into_inner(),
                Err(e) => return report::<()>(Err(e), |_| json!({})),
            };
            loop {
                let left = limit.saturating_sub(start.elapsed());
                match tokio::time::timeout(left, stream.message()).await {
                    Err(_) => {
                        println!("{}", json!({"code": "Timeout"}));
                        return;
                    }
                    Ok(Ok(Some(m))) => {
                        let svid = &m.svids[0];
                        let chain = idgate::svid::split_der(&svid.x509_svid).expect("chain");
                        println!(
                            "{}",
                            json!({
                                "code": "Ok",
                                "at_ms": start.elapsed().as_millis() as u64,
                                "spiffe_id": svid.spiffe_id,
                                "leaf": chain[0].iter().map(|b| format!("{b:02x}")).collect::<String>(),
                                "bundle": idgate::svid::split_der(&svid.bundle).expect("bundle").len(),
                                "federated": m.federated_bundles.keys().collect::<Vec<_>>(),
                            })
                        );
                    }
                    Ok(Ok(None)) => {
                        println!("{}", json!({"code": "Ended"}));
                        return;
                    }
                    Ok(Err(s)) => return report::<()>(Err(s), |_| json!({})),
                }
                let _ = std::io::stdout().flush();
            }
        }
        other => fail(&format!("unknown case {other}")),
    }
}
