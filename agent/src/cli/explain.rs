//! `idgate explain --identity ID --to ADDR:PORT/PROTO` (or `NAME:PORT`).

use idgate::admin::{Explained, Identity, Protocol, Request, Target, Verdict};

use super::Connection;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// A SPIFFE ID, or `unknown` for a workload without one.
    #[arg(long)]
    identity: Identity,
    /// The destination: `ADDR:PORT/tcp` or `ADDR:PORT/udp` (IPv6 in
    /// brackets: `[::1]:53/udp`), or `NAME:PORT[/PROTO]` for the addresses
    /// the identity's lookups of a name opened; `/tcp` when left out.
    #[arg(long, value_parser = destination)]
    to: (Target, Protocol),
    #[command(flatten)]
    conn: Connection,
}

/// `ADDR:PORT[/PROTO]` or `NAME:PORT[/PROTO]`.
fn destination(s: &str) -> Result<(Target, Protocol), String> {
    let (to, protocol) = match s.rsplit_once('/') {
        Some((to, protocol)) => (to, protocol.parse()?),
        None => (s, Protocol::Tcp),
    };
    Ok((to.parse()?, protocol))
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
            (Verdict::Allow, _, _) if r.brokered => {
                "allow through the credential broker, which adds the credential".to_owned()
            }
            (Verdict::Allow, _, true) => "allow (audit: would deny)".to_owned(),
            (v, _, _) => v.to_string(),
        };
        let grants = r
            .grants
            .iter()
            .map(|g| format!("grant:{g}"))
            .collect::<Vec<_>>()
            .join(", ");
        match (&r.to, &r.pattern) {
            (Target::Name { .. }, None) if !r.grants.is_empty() => println!(
                "{} -> {}/{}: no rule names it, but {grants} covers it: its lookups are answered, and the answers' addresses are open on the grant's ports and protocol until its end; other connects to them are judged by the policy ({verdict} by rule {rule}), policy generation {}",
                r.identity, r.to, r.protocol, r.generation
            ),
            (Target::Name { .. }, None) => println!(
                "{} -> {}/{}: no rule names it: its lookups are answered NXDOMAIN, and its addresses are judged as any other ({verdict} by rule {rule}), policy generation {}",
                r.identity, r.to, r.protocol, r.generation
            ),
            (Target::Name { .. }, Some(pattern)) if r.learned.is_empty() => println!(
                "{} -> {}/{}: named by {pattern}; no address learned now (a lookup by this identity opens the answer's addresses), policy generation {}",
                r.identity, r.to, r.protocol, r.generation
            ),
            _ => println!(
                "{} -> {}/{}: {verdict} by rule {rule}, policy generation {}",
                r.identity, r.to, r.protocol, r.generation
            ),
        }
        if r.pattern.is_some() && !r.grants.is_empty() {
            println!(
                "  also covered by {grants}: the answers' addresses are open on its ports and protocol too"
            );
        }
        for l in &r.learned {
            println!(
                "  {} learned from {}: {} by rule {}, for {} s more",
                l.addr,
                l.name.as_deref().unwrap_or("?"),
                l.verdict,
                l.rule,
                l.expires_in_seconds
            );
        }
    });
    Ok(())
}
