//! The `idgate` command: the agent daemon and the operator subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use idgate::admin::{self, Request};
use idgate::config::Config;

const DEFAULT_CONFIG: &str = "/etc/idgate/agent.toml";

#[derive(Parser)]
#[command(
    name = "idgate",
    version,
    about = "Workload-identity enforcement agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Agent {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Remove every pinned program and map: enforcement stops.
    Uninstall {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show what the running agent enforces.
    Status {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(clap::Args)]
struct SocketArg {
    /// The agent's control socket.
    #[arg(long, default_value = "/run/idgate/control.sock")]
    socket: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idgate: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: our messages already quote their
/// source, so a cause is added only when its text is not there yet.
fn message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { config } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(idgate::daemon::run(&config))?;
        }
        Command::Uninstall { config } => {
            let config = Config::load(&config)?;
            let removed = idgate::bpf::uninstall(&config.pin_dir)?;
            for path in &removed {
                println!("removed {}", path.display());
            }
            println!(
                "idgate uninstalled from {} ({} pins removed)",
                config.pin_dir.display(),
                removed.len()
            );
        }
        Command::Status { socket } => {
            let status = admin::request(&socket.socket, Request::Status)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
    }
    Ok(())
}
