//! `idgate svid`: the caller's own SVID and bundles from the SPIFFE
//! Workload API (like SPIRE's `api fetch`), printed or written to files,
//! for debugging and scripts. Any local process may run it: it gets the
//! identity of the cgroup it runs in, or nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use idgate::svid::{certs_pem, pem, split_der};
use idgate::workload_api::{self, proto};
use x509_parser::prelude::*;

#[derive(clap::Args)]
pub struct SvidArgs {
    /// The Workload API socket; default `$SPIFFE_ENDPOINT_SOCKET` (a
    /// `unix:` URI), else `/run/idgate/workload.sock`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A JWT-SVID for `--audience` instead of the X.509-SVID.
    #[arg(long)]
    jwt: bool,
    /// Audience of the JWT-SVID (repeatable).
    #[arg(long = "audience", requires = "jwt")]
    audiences: Vec<String>,
    /// Write the files into DIR: `svid.pem` (chain), `svid.key` (mode
    /// 0600), `bundle.pem`, `federated/<trust domain>.pem`; or `svid.jwt`.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SvidArgs) -> anyhow::Result<()> {
    let socket = socket_path(args.socket.clone())?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fetch(args, socket))
}

/// The socket: given, or from `SPIFFE_ENDPOINT_SOCKET`, or the default.
fn socket_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        Ok(uri) => {
            let path = uri
                .strip_prefix("unix://")
                .or_else(|| uri.strip_prefix("unix:"))
                .with_context(|| format!("SPIFFE_ENDPOINT_SOCKET={uri:?} is not a unix: URI"))?;
            Ok(PathBuf::from(path))
        }
        Err(_) => Ok(PathBuf::from("/run/idgate/workload.sock")),
    }
}

async fn fetch(args: SvidArgs, socket: PathBuf) -> anyhow::Result<()> {
    let mut client = workload_api::connect(&socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    if args.jwt {
        if args.audiences.is_empty() {
            bail!("--jwt needs at least one --audience");
        }
        let reply = client
            .fetch_jwtsvid(workload_api::request(proto::JwtsvidRequest {
                audience: args.audiences.clone(),
                spiffe_id: String::new(),
            }))
            .await
            .map_err(status)?
            .into_inner();
        let svid = reply.svids.first().context("the reply holds no JWT-SVID")?;
        if let Some(dir) = &args.write {
            write(&dir.join("svid.jwt"), svid.svid.as_bytes(), 0o600)?;
        }
        if args.json {
            let v = serde_json::json!({"spiffe_id": svid.spiffe_id, "token": svid.svid});
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else if args.write.is_none() {
            println!("{}", svid.svid);
        } else {
            println!("{}: JWT-SVID written", svid.spiffe_id);
        }
        return Ok(());
    }
    let mut stream = client
        .fetch_x509svid(workload_api::request(proto::X509svidRequest {}))
        .await
        .map_err(status)?
        .into_inner();
    let reply = stream
        .message()
        .await
        .map_err(status)?
        .context("the stream ended without an SVID")?;
    let svid = reply
        .svids
        .first()
        .context("the reply holds no X.509-SVID")?;
    let chain = split_der(&svid.x509_svid)?;
    let bundle = split_der(&svid.bundle)?;
    let federated: BTreeMap<String, Vec<Vec<u8>>> = reply
        .federated_bundles
        .iter()
        .map(|(td, der)| {
            Ok((
                td.trim_start_matches("spiffe://").to_owned(),
                split_der(der)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let leaf = chain.first().context("the SVID has no certificate")?;
    let (_, cert) = X509Certificate::from_der(leaf).context("the SVID does not parse")?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);

    if let Some(dir) = &args.write {
        std::fs::create_dir_all(dir.join("federated"))
            .with_context(|| format!("creating {}", dir.display()))?;
        write(&dir.join("svid.pem"), certs_pem(&chain).as_bytes(), 0o644)?;
        write(
            &dir.join("svid.key"),
            pem("PRIVATE KEY", &svid.x509_svid_key).as_bytes(),
            0o600,
        )?;
        write(
            &dir.join("bundle.pem"),
            certs_pem(&bundle).as_bytes(),
            0o644,
        )?;
        for (td, certs) in &federated {
            write(
                &dir.join("federated").join(format!("{td}.pem")),
                certs_pem(certs).as_bytes(),
                0o644,
            )?;
        }
    }
    if args.json {
        let v = serde_json::json!({
            "spiffe_id": svid.spiffe_id,
            "not_after": humantime::format_rfc3339_seconds(not_after).to_string(),
            "chain": certs_pem(&chain),
            "bundle": certs_pem(&bundle),
            "federated_bundles": federated
                .iter()
                .map(|(td, c)| (td.clone(), certs_pem(c)))
                .collect::<BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        println!("SPIFFE ID:  {}", svid.spiffe_id);
        println!(
            "expires:    {} (in {})",
            humantime::format_rfc3339_seconds(not_after),
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        );
        println!("chain:      {} certificate(s)", chain.len());
        println!("bundle:     {} authority(ies)", bundle.len());
        for (td, certs) in &federated {
            println!("federated:  {td}, {} authority(ies)", certs.len());
        }
        if let Some(dir) = &args.write {
            println!("written to {}", dir.display());
        }
    }
    Ok(())
}

/// A gRPC status as an error that names its code.
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("Workload API: {:?}: {}", s.code(), s.message())
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}
