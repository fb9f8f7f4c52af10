//! `idgate workloads`.

use std::time::UNIX_EPOCH;

use idgate::admin::{Binding, Request, WorkloadsList};

use super::Connection;

#[derive(clap::Args)]
pub struct WorkloadsArgs {
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: WorkloadsArgs) -> anyhow::Result<()> {
    let list: WorkloadsList = args.conn.request(Request::Workloads)?;
    args.conn.print(&list, |r| {
        println!("{} cgroups under {}", r.workloads.len(), r.scope.display());
        for w in &r.workloads {
            let identity = match &w.binding {
                Binding::Attested { id, .. } | Binding::Operator { id, .. } => id.to_string(),
                Binding::Expired { id } => format!("expired ({id})"),
                Binding::Conflict { candidates } => format!("conflict {candidates:?}"),
                Binding::Unreadable { error } => format!("unreadable: {error}"),
                Binding::Unknown => "unknown".into(),
            };
            println!("{}", w.path);
            println!("  identity   {identity}");
            if let Binding::Attested { selectors, .. } = &w.binding {
                println!("  selectors  {}", selectors.join(" "));
            }
            println!("  pids       {:?}", w.pids);
            let since = w.since.duration_since(UNIX_EPOCH).unwrap_or_default();
            println!("  since      {} (unix seconds)", since.as_secs());
            if !w.enforced {
                println!("  enforced   no: the kernel map is full, the cgroup is denied");
            }
        }
        println!("{}", r.kubernetes);
    });
    Ok(())
}
