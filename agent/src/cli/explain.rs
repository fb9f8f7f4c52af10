//! `idgate explain --identity ID --to ADDR:PORT/PROTO`.

use idgate::admin::Request;

use super::{Connection, text};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// A SPIFFE ID, or `unknown` for a workload without one.
    #[arg(long)]
    identity: String,
    /// The destination: `ADDR:PORT/tcp` or `ADDR:PORT/udp` (IPv6 in
    /// brackets: `[::1]:53/udp`); `/tcp` when left out.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let (to, protocol) = match args.to.rsplit_once('/') {
        Some((to, proto)) => (to.to_owned(), proto.to_owned()),
        None => (args.to.clone(), "tcp".to_owned()),
    };
    let reply = args.conn.request(Request::Explain {
        identity: args.identity,
        to,
        protocol,
    })?;
    args.conn.print(&reply, |r| {
        let owner = text(&r["rule_owner"]);
        let rule = if owner.is_empty() {
            text(&r["rule"])
        } else {
            format!("{} (of {owner})", text(&r["rule"]))
        };
        println!(
            "{} -> {}/{}: {} by rule {rule}, policy generation {}",
            text(&r["identity"]),
            text(&r["to"]),
            text(&r["protocol"]),
            text(&r["verdict"]),
            r["generation"]
        );
    });
    Ok(())
}
