//! `idgate events [--follow] [--identity ID] [--verdict allow|deny] [--json]`.

use idgate::admin::{self, Request};
use serde_json::Value;

use super::{Connection, text};

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Keep printing new decisions as they are made.
    #[arg(long, short)]
    follow: bool,
    /// Only decisions about this SPIFFE ID (`unknown`: unknown workloads).
    #[arg(long)]
    identity: Option<String>,
    /// Only `allow` or `deny` decisions.
    #[arg(long)]
    verdict: Option<String>,
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let json = args.conn.json;
    let request = Request::Events {
        follow: args.follow,
        identity: args.identity,
        verdict: args.verdict,
    };
    admin::request_stream(&args.conn.socket, request, |line| {
        if json {
            println!("{line}");
        } else {
            match serde_json::from_str::<Value>(line) {
                Ok(e) => println!("{}", human(&e)),
                Err(_) => println!("{line}"),
            }
        }
        true
    })?;
    Ok(())
}

/// One decision in one line for a person.
fn human(e: &Value) -> String {
    if let Some(missed) = e.get("missed") {
        return format!("... {missed} events missed (this reader fell behind)");
    }
    let who = match &e["identity"] {
        Value::Null => "unknown".to_owned(),
        id => text(id),
    };
    let dest = if text(&e["dst_addr"]).contains(':') {
        format!("[{}]:{}", text(&e["dst_addr"]), e["dst_port"])
    } else {
        format!("{}:{}", text(&e["dst_addr"]), e["dst_port"])
    };
    let rule = match &e["rule"] {
        Value::Null => String::new(),
        r => format!(" rule={}", text(r)),
    };
    format!(
        "{} {:5} {who} -> {dest}/{} reason={}{rule} pid={} comm={} exe={}",
        text(&e["time"]),
        text(&e["verdict"]),
        text(&e["protocol"]),
        text(&e["reason"]),
        e["pid"],
        text(&e["comm"]),
        text(&e["exe"]),
    )
}
