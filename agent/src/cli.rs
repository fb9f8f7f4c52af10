//! Command-line front ends: one module per subcommand group, each a thin
//! layer over the library.

mod agent;
mod events;
mod explain;
mod grant;
mod policy;
mod revoke;
mod run;
mod status;
mod svid;
mod workloads;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use idgate::admin::{self, Request};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The default agent configuration.
pub const DEFAULT_CONFIG: &str = "/etc/idgate/agent.toml";

#[derive(Parser)]
#[command(
    name = "idgate",
    version,
    about = "Workload-identity enforcement agent"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Agent(agent::AgentArgs),
    /// Execute the running agent again in its process (after an upgrade),
    /// handing its DNS listeners over: no lookup fails.
    Restart(agent::RestartArgs),
    /// Remove every pinned program and map: enforcement stops.
    Uninstall(agent::UninstallArgs),
    /// Show what the running agent enforces.
    Status(status::StatusArgs),
    /// Check, reload or show policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Which rule of the running policy decides a connect.
    Explain(explain::ExplainArgs),
    /// Deny every workload of an identity at once, until `unrevoke`.
    Revoke(revoke::RevokeArgs),
    /// Lift a revocation.
    Unrevoke(revoke::RevokeArgs),
    /// Allow an identity a destination for a while, on top of its policy
    /// (or --revoke / --extend a grant).
    Grant(grant::GrantArgs),
    /// List the running grants: who granted them, when, why, time left.
    Grants(grant::GrantsArgs),
    /// Show decisions: recent ones, or (--follow) as they are made.
    Events(events::EventsArgs),
    /// List the cgroups under the scope and their identities.
    Workloads(workloads::WorkloadsArgs),
    /// Run a command with an identity, in a cgroup of its own (operators).
    Run(run::RunArgs),
    /// Fetch your own SVID and bundles from the SPIFFE Workload API.
    Svid(svid::SvidArgs),
}

/// Where the running agent listens, and how to print its answers.
#[derive(clap::Args)]
pub struct Connection {
    /// The agent's control socket.
    #[arg(long, default_value = "/run/idgate/control.sock")]
    pub socket: PathBuf,
    /// Print the agent's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Connection {
    /// Sends a request and reads the result as `T`, the reply type of its
    /// command; the agent's error comes back as it is.
    pub fn request<T: DeserializeOwned>(&self, request: Request) -> anyhow::Result<T> {
        Ok(admin::request(&self.socket, request)?)
    }

    /// Prints a reply as JSON, or with `human` for a person.
    pub fn print<T: Serialize>(&self, reply: &T, human: impl FnOnce(&T)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(reply).expect("a reply serialises")
            );
        } else {
            human(reply);
        }
    }
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Restart(args) => agent::restart(args),
        Command::Uninstall(args) => agent::uninstall(args),
        Command::Status(args) => status::run(args),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Explain(args) => explain::run(args),
        Command::Revoke(args) => revoke::run(args, true),
        Command::Unrevoke(args) => revoke::run(args, false),
        Command::Workloads(args) => workloads::run(args),
        Command::Grant(args) => grant::run(args),
        Command::Grants(args) => grant::list(args),
        Command::Events(args) => events::run(args),
        Command::Run(args) => run::run(args),
        Command::Svid(args) => svid::run(args),
    }
}
