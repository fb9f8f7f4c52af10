//! `idgate events [--follow] [--identity ID] [--verdict allow|deny] [--json]`.

use idgate::admin::{self, EventLine, EventsOpened, Identity, Request, Verdict};
use idgate::events::Event;

use super::Connection;

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Keep printing new decisions as they are made.
    #[arg(long, short)]
    follow: bool,
    /// Only decisions about this SPIFFE ID (`unknown`: unknown workloads).
    #[arg(long)]
    identity: Option<Identity>,
    /// Only `allow` or `deny` decisions.
    #[arg(long)]
    verdict: Option<Verdict>,
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
    let mut bad = None;
    admin::request_stream::<EventsOpened>(&args.conn.socket, request, |line| {
        if json {
            println!("{line}");
            return true;
        }
        match line.parse::<EventLine>() {
            Ok(EventLine::Missed { missed }) => {
                println!("... {missed} events missed (this reader fell behind)");
                true
            }
            Ok(EventLine::Event(e)) => {
                println!("{}", human(&e));
                true
            }
            Err(e) => {
                bad = Some(anyhow::anyhow!(
                    "an event from the agent is not understood: {e}: {line}"
                ));
                false
            }
        }
    })?;
    bad.map_or(Ok(()), Err)
}

/// One decision in one line for a person.
fn human(e: &Event) -> String {
    let who = e.identity.as_deref().unwrap_or("unknown");
    let addr = std::net::SocketAddr::new(e.dst_addr, e.dst_port);
    let dest = match (&e.dst_name, &e.dns, &e.http) {
        (name, _, Some(http)) => {
            // A request through the credential broker.
            let host = name.as_deref().unwrap_or("?");
            let request = match (&http.method, &http.path) {
                (Some(m), Some(p)) => format!(" {m} {p}"),
                _ => String::new(),
            };
            let status = http.status.map(|s| format!(" {s}")).unwrap_or_default();
            let detail = http
                .detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            format!("broker {host}{request}{status}{detail}")
        }
        (Some(name), Some(dns), None) => {
            // What the answer gave: learned, or (audit mode) forwarded.
            let addrs: Vec<String> = dns
                .learned
                .iter()
                .filter_map(|l| l.split(' ').next().map(str::to_owned))
                .chain(dns.answered.iter().map(|a| a.addr.to_string()))
                .collect();
            if addrs.is_empty() {
                format!("dns {name} {}", dns.qtype)
            } else {
                format!("dns {name} {} [{}]", dns.qtype, addrs.join(" "))
            }
        }
        (Some(name), None, None) => format!("{name} ({}):{}", e.dst_addr, e.dst_port),
        _ => addr.to_string(),
    };
    let rule = e
        .rule
        .as_ref()
        .map(|r| format!(" rule={r}"))
        .unwrap_or_default();
    // What is known of a process that has gone is its pid and name.
    let exe = match (&e.exe, e.exe_unknown) {
        (Some(exe), _) => format!(" exe={exe}"),
        (None, Some(why)) => format!(" exe=? ({})", why.as_str()),
        (None, None) => String::new(),
    };
    format!(
        "{} {:5} {who} -> {dest}/{} reason={}{rule} pid={} comm={}{exe}",
        e.time,
        e.verdict.as_str(),
        e.protocol,
        e.reason,
        e.pid,
        e.comm,
    )
}
