//! `idgate status`.

use idgate::admin::Request;

use super::{Connection, text};

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let reply = args.conn.request(Request::Status)?;
    args.conn.print(&reply, |r| {
        for key in [
            "version",
            "uptime_seconds",
            "scope",
            "pin_dir",
            "mode",
            "generation",
            "identities",
            "rules",
            "workloads",
            "reloads",
            "reload_errors",
            "pins_restored",
            "bind_failures",
            "max_workloads",
        ] {
            println!("{key:<15} {}", text(&r[key]));
        }
        let programs = &r["programs"];
        for key in ["attached", "adopted", "replaced", "detached"] {
            println!("{:<15} {}", format!("programs.{key}"), programs[key]);
        }
        println!("{:<15} {}", "revoked", r["revoked"]);
        let k8s = &r["kubernetes"];
        if k8s.is_object() {
            for key in [
                "kubelet",
                "state",
                "pods",
                "last_success",
                "last_error",
                "last_error_at",
                "fetches",
                "failures",
            ] {
                println!("{:<15} {}", format!("k8s.{key}"), text(&k8s[key]));
            }
        } else {
            println!("{:<15} off", "kubernetes");
        }
    });
    Ok(())
}
