//! `idgate grant` (make, revoke or extend a grant) and `idgate grants`.

use std::time::Duration;

use anyhow::bail;
use idgate::admin::{GrantChanged, GrantShown, GrantsList, Ports, Protocol, Request};

use super::Connection;

#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("what")
        .args(["identity", "revoke", "extend"])
        .required(true)
))]
pub struct GrantArgs {
    /// The SPIFFE ID to grant to: one identity (not a pattern, not
    /// `unknown`).
    #[arg(long, requires_all = ["to", "duration"])]
    identity: Option<String>,
    /// The destination, as a rule's `to`: an address, a CIDR, or a name
    /// (api.example.com, *.example.com: the addresses this identity's
    /// lookups of it are answered, each for its TTL).
    #[arg(long, requires = "identity")]
    to: Option<String>,
    /// A port or an inclusive range (8000-8080); every port when left out.
    #[arg(long, requires = "identity")]
    ports: Option<Ports>,
    /// tcp or udp; both when left out.
    #[arg(long, requires = "identity")]
    protocol: Option<Protocol>,
    /// How long it runs (90s, 10m, 2h), from now.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Why, for the audit log and `idgate grants`.
    #[arg(long, requires = "identity")]
    reason: Option<String>,
    /// End the grant with this id now.
    #[arg(long, value_name = "GRANT-ID", conflicts_with = "duration")]
    revoke: Option<u32>,
    /// Make the grant with this id run `--for DURATION` from now.
    #[arg(long, value_name = "GRANT-ID", requires = "duration")]
    extend: Option<u32>,
    #[command(flatten)]
    conn: Connection,
}

#[derive(clap::Args)]
pub struct GrantsArgs {
    #[command(flatten)]
    conn: Connection,
}

/// Whole seconds of `d`: the agent takes no less.
fn seconds(d: Duration) -> anyhow::Result<u64> {
    if d.subsec_nanos() != 0 {
        bail!(
            "--for {}: give whole seconds",
            humantime::format_duration(d)
        );
    }
    Ok(d.as_secs())
}

pub fn run(args: GrantArgs) -> anyhow::Result<()> {
    let duration = args.duration.map(seconds).transpose()?;
    let request = match (args.identity, args.revoke, args.extend) {
        (Some(identity), None, None) => Request::Grant {
            identity,
            to: args.to.expect("clap requires --to"),
            ports: args.ports,
            protocol: args.protocol,
            duration_seconds: duration.expect("clap requires --for"),
            reason: args.reason,
        },
        (None, Some(id), None) => Request::GrantRevoke { id },
        (None, None, Some(id)) => Request::GrantExtend {
            id,
            duration_seconds: duration.expect("clap requires --for"),
        },
        _ => unreachable!("clap allows one of --identity, --revoke, --extend"),
    };
    let changed: GrantChanged = args.conn.request(request)?;
    args.conn.print(&changed, |c| {
        let g = &c.grant;
        let action = serde_json::to_value(c.action).expect("an action serialises");
        println!(
            "grant {} {}",
            g.grant.id,
            action.as_str().unwrap_or_default()
        );
        describe(g);
    });
    Ok(())
}

pub fn list(args: GrantsArgs) -> anyhow::Result<()> {
    let list: GrantsList = args.conn.request(Request::Grants)?;
    args.conn.print(&list, |l| {
        println!("{} grants running", l.grants.len());
        for g in &l.grants {
            println!("grant {}", g.grant.id);
            describe(g);
        }
    });
    Ok(())
}

fn describe(g: &GrantShown) {
    let grant = &g.grant;
    println!("  identity    {}", grant.identity);
    println!(
        "  to          {} ports {} protocol {}",
        grant.to, grant.ports, grant.protocol
    );
    println!(
        "  granted     by uid {} at {}",
        grant.granted_by,
        humantime::format_rfc3339_seconds(grant.granted_at)
    );
    println!(
        "  left        {} (until {})",
        humantime::format_duration(Duration::from_secs(g.seconds_left)),
        humantime::format_rfc3339_seconds(g.expires_at)
    );
    if grant.to.name().is_some() {
        println!(
            "  by name     its lookups are answered; {} address(es) they were answered open now",
            g.learned_addresses
        );
    }
    if let Some(reason) = &grant.reason {
        println!("  reason      {reason}");
    }
    if g.slot.is_none() {
        println!("  in force    not yet: the identity holds no slot (no workload has it)");
    }
}
