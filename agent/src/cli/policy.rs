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
