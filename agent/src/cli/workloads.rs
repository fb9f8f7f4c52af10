//! `idgate workloads`.

use idgate::admin::Request;

use super::{Connection, text};

#[derive(clap::Args)]
pub struct WorkloadsArgs {
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: WorkloadsArgs) -> anyhow::Result<()> {
    let reply = args.conn.request(Request::Workloads)?;
    args.conn.print(&reply, |r| {
        let empty = Vec::new();
        let list = r["workloads"].as_array().unwrap_or(&empty);
        println!("{} cgroups under {}", list.len(), text(&r["scope"]));
        for w in list {
            let identity = match w["state"].as_str() {
                Some("attested" | "operator") => text(&w["id"]),
                Some("expired") => format!("expired ({})", text(&w["id"])),
                Some("conflict") => format!("conflict {}", w["candidates"]),
                Some("unreadable") => format!("unreadable: {}", text(&w["error"])),
                other => other.unwrap_or("?").to_owned(),
            };
            println!("{}", text(&w["path"]));
            println!("  identity   {identity}");
            if let Some(sel) = w["selectors"].as_array() {
                let sel: Vec<String> = sel.iter().map(text).collect();
                println!("  selectors  {}", sel.join(" "));
            }
            println!("  pids       {}", w["pids"]);
            println!("  since      {}", since(&w["since"]));
        }
        println!("{}", text(&r["kubernetes"]));
    });
    Ok(())
}

/// A serialised `SystemTime` as seconds since the epoch.
fn since(v: &serde_json::Value) -> String {
    match v["secs_since_epoch"].as_u64() {
        Some(s) => format!("{s} (unix seconds)"),
        None => text(v),
    }
}
