//! `idgate policy check | reload | show`.

use std::path::PathBuf;

use idgate::admin::{PolicyReloaded, PolicyShown, Request};

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
    }
    Ok(())
}
