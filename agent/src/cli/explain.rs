//! `idgate explain --identity ID --to ADDR:PORT/PROTO`.

use std::net::SocketAddr;

use idgate::admin::{Explained, Identity, Protocol, Request, Verdict};

use super::Connection;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// A SPIFFE ID, or `unknown` for a workload without one.
    #[arg(long)]
    identity: Identity,
    /// The destination: `ADDR:PORT/tcp` or `ADDR:PORT/udp` (IPv6 in
    /// brackets: `[::1]:53/udp`); `/tcp` when left out.
    #[arg(long, value_parser = destination)]
    to: (SocketAddr, Protocol),
    #[command(flatten)]
    conn: Connection,
}

/// `ADDR:PORT[/PROTO]`.
fn destination(s: &str) -> Result<(SocketAddr, Protocol), String> {
    let (to, protocol) = match s.rsplit_once('/') {
        Some((to, protocol)) => (to, protocol.parse()?),
        None => (s, Protocol::Tcp),
    };
    let to = to.parse().map_err(|_| {
        format!("destination {to:?} is not ADDR:PORT (like 10.0.0.1:443 or [::1]:53)")
    })?;
    Ok((to, protocol))
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let (to, protocol) = args.to;
    let explained: Explained = args.conn.request(Request::Explain {
        identity: args.identity,
        to,
        protocol,
    })?;
    args.conn.print(&explained, |r| {
        let rule = if r.rule_owner.is_empty() {
            r.rule.clone()
        } else {
            format!("{} (of {})", r.rule, r.rule_owner)
        };
        let verdict = match (r.verdict, r.revoked, r.audit_allowed) {
            (Verdict::Deny, true, _) => "deny (revoked)".to_owned(),
            (Verdict::Allow, _, true) => "allow (audit: would deny)".to_owned(),
            (v, _, _) => v.to_string(),
        };
        println!(
            "{} -> {}/{}: {verdict} by rule {rule}, policy generation {}",
            r.identity, r.to, r.protocol, r.generation
        );
    });
    Ok(())
}
