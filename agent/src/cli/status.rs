//! `idgate status`.

use std::fmt::Display;

use idgate::admin::{Request, Status};

use super::Connection;

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status: Status = args.conn.request(Request::Status)?;
    args.conn.print(&status, human);
    Ok(())
}

fn human(s: &Status) {
    let line = |key: &str, value: &dyn Display| println!("{key:<15} {value}");
    let list = |items: &[String]| format!("[{}]", items.join(", "));
    for w in &s.root_workloads {
        let pids: Vec<String> = w.pids.iter().map(ToString::to_string).collect();
        println!(
            "warning: workload {} ({}) has credential rules and runs as uid 0 (pids {}): it owns root's files, the secret files among them; run it as another user",
            w.cgroup,
            w.identity,
            pids.join(", ")
        );
    }
    line("version", &s.version);
    line("uptime_seconds", &s.uptime_seconds);
    line("scope", &s.scope.display());
    line("pin_dir", &s.pin_dir.display());
    line("mode", &s.mode);
    line("generation", &s.generation);
    line("reloading", &s.reloading);
    line("identities", &s.identities);
    line("rules", &s.rules);
    line("workloads", &s.workloads);
    line("reloads", &s.reloads);
    line("reload_errors", &s.reload_errors);
    line("pins_restored", &s.pins_restored);
    line("bind_failures", &s.bind_failures);
    line("max_workloads", &s.max_workloads);
    let p = &s.programs;
    line("programs.attached", &list(&p.attached));
    line("programs.adopted", &list(&p.adopted));
    line("programs.replaced", &list(&p.replaced));
    line("programs.detached", &list(&p.detached));
    for (program, why) in &p.unavailable {
        line("programs.unavailable", &format!("{program}: {why}"));
    }
    let revoked: Vec<String> = s.revoked.iter().map(ToString::to_string).collect();
    line("revoked", &list(&revoked));
    line("grants", &s.grants);
    match &s.dns {
        None => line("dns", &"off"),
        Some(d) => {
            let upstreams: Vec<String> = d.upstreams.iter().map(ToString::to_string).collect();
            line("dns.upstreams", &list(&upstreams));
            line("dns.namespaces", &d.namespaces);
            line(
                "dns.learned",
                &format!("{} of {} addresses", d.learned_addresses, d.capacity),
            );
            for i in &d.identities {
                let who = i
                    .identity
                    .as_ref()
                    .map_or("(slot released)".to_owned(), ToString::to_string);
                line(
                    "dns.identity",
                    &format!(
                        "{who}: {} of {} addresses, names {}",
                        i.addresses,
                        d.per_identity_limit,
                        list(&i.names)
                    ),
                );
            }
        }
    }
    let Some(k) = &s.kubernetes else {
        line("kubernetes", &"off");
        return;
    };
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    line("k8s.kubelet", &k.kubelet);
    line("k8s.state", &k.state);
    line("k8s.pods", &k.pods);
    line("k8s.last_success", &or_none(&k.last_success));
    line("k8s.last_error", &or_none(&k.last_error));
    line("k8s.last_error_at", &or_none(&k.last_error_at));
    line("k8s.fetches", &k.fetches);
    line("k8s.failures", &k.failures);
}
