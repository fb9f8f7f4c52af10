//! `idgate policy check | reload | show | suggest`.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use idgate::admin::{
    self, EventLine, EventsOpened, Identity, PolicyReloaded, PolicyShown, Request,
};
use idgate::identity::SpiffeId;
use idgate::policy::{SuggestOptions, Suggester};

use super::Connection;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file or directory offline and summarise what it
    /// allows; exits non-zero on any error (warnings are printed, and do
    /// not fail the check).
    Check {
        path: PathBuf,
        /// A trust domain the identities must belong to (repeatable).
        #[arg(long = "trust-domain")]
        trust_domains: Vec<String>,
    },
    /// Check two policies offline and show, per identity block, what
    /// going from OLD to NEW would open and close (rules added, taken
    /// away or rewritten, and changed settings), before it is applied.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// A trust domain the identities must belong to (repeatable).
        #[arg(long = "trust-domain")]
        trust_domains: Vec<String>,
    },
    /// Make the agent re-read, check and atomically apply its policy.
    Reload {
        #[command(flatten)]
        conn: Connection,
    },
    /// Show the running policy and its generation.
    Show {
        #[command(flatten)]
        conn: Connection,
    },
    /// Write a policy that would have allowed the connects decision
    /// records show were let through only by audit mode, or denied by a
    /// default (from the audit log, or the agent's recent decisions).
    Suggest(SuggestArgs),
}

#[derive(clap::Args)]
pub struct SuggestArgs {
    /// Only this SPIFFE ID's decisions.
    #[arg(long)]
    identity: Option<SpiffeId>,
    /// Only decisions since this time: RFC 3339, or a duration back from
    /// now (1h, 30m).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Read this audit log and its rotated files (AUDIT_LOG.1, ...)
    /// instead of the agent's recent decisions.
    #[arg(long, value_name = "AUDIT_LOG")]
    from: Option<PathBuf>,
    /// Merge IPv4 addresses into prefixes no shorter than this.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u8).range(0..=32))]
    prefix_v4: u8,
    /// Merge IPv6 addresses into prefixes no shorter than this.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u8).range(0..=128))]
    prefix_v6: u8,
    /// The agent's control socket (without --from).
    #[arg(long, default_value = "/run/idgate/control.sock")]
    socket: PathBuf,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check {
            path,
            trust_domains,
        } => {
            let policy = idgate::policy::load(&path, &trust_domains)?;
            for warning in &policy.warnings {
                eprintln!("{warning}");
            }
            print!("{}", idgate::policy::summary(&policy));
            println!("{}: ok", path.display());
        }
        PolicyCommand::Diff {
            old,
            new,
            trust_domains,
        } => {
            // A load error names the file and the place in it.
            let load = |path: &PathBuf| idgate::policy::load(path, &trust_domains);
            let (old, new) = (load(&old)?, load(&new)?);
            if old.mode != new.mode {
                println!("mode {:?} -> {:?}", old.mode, new.mode);
            }
            let changes = idgate::policy::by_block(&old, &new);
            for change in &changes {
                println!("{change}");
            }
            if changes.is_empty() && old.mode == new.mode {
                println!("no change");
            }
        }
        PolicyCommand::Reload { conn } => {
            let reloaded: PolicyReloaded = conn.request(Request::PolicyReload)?;
            conn.print(&reloaded, |r| {
                println!(
                    "policy reloaded: generation {} -> {}",
                    r.previous_generation, r.generation
                );
                println!("{}", r.diff);
            });
        }
        PolicyCommand::Show { conn } => {
            let shown: PolicyShown = conn.request(Request::PolicyShow)?;
            conn.print(&shown, |r| {
                println!(
                    "generation {} from {}",
                    r.generation,
                    r.policy_path.display()
                );
                print!("{}", r.summary);
            });
        }
        PolicyCommand::Suggest(args) => suggest(args)?,
    }
    Ok(())
}

fn suggest(args: SuggestArgs) -> anyhow::Result<()> {
    let since = args
        .since
        .as_deref()
        .map(|t| idgate::policy::parse_since(t, SystemTime::now()))
        .transpose()?;
    let mut suggester = Suggester::new(SuggestOptions {
        identity: args.identity.clone(),
        since,
        prefix_v4: args.prefix_v4,
        prefix_v6: args.prefix_v6,
    });
    let warnings = match &args.from {
        Some(path) => idgate::policy::read_audit_log(path, &mut suggester)?,
        None => from_agent(&args, &mut suggester)?,
    };
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if suggester.missed_records() > 0 {
        eprintln!(
            "warning: {} decision records were lost in this window: the suggestion cannot be complete",
            suggester.missed_records()
        );
    }
    print!("{}", suggester.render());
    Ok(())
}

/// The agent's recent decisions; the warnings of lines skipped.
fn from_agent(args: &SuggestArgs, suggester: &mut Suggester) -> anyhow::Result<Vec<String>> {
    eprintln!(
        "warning: the agent keeps only its last {} decisions; --from AUDIT_LOG reads further back",
        idgate::events::RECENT_EVENTS
    );
    let request = Request::Events {
        follow: false,
        identity: args.identity.clone().map(Identity::Id),
        verdict: None,
    };
    let mut warnings = Vec::new();
    let mut n = 0;
    admin::request_stream::<EventsOpened>(&args.socket, request, |line| {
        n += 1;
        let taken = match line.parse::<EventLine>() {
            Ok(EventLine::Missed { missed }) => {
                suggester.missed(missed);
                Ok(())
            }
            Ok(EventLine::Event(e)) => suggester.add(&e).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = taken {
            warnings.push(format!("the agent's event line {n}: skipped: {why}"));
        }
        true
    })
    .with_context(|| format!("reading decisions from {}", args.socket.display()))?;
    Ok(warnings)
}
