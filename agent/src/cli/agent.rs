//! `idgate agent` and `idgate uninstall`.

use std::path::PathBuf;

use anyhow::Context;
use idgate::admin;
use idgate::bpf::Uninstalled;
use idgate::config::Config;

use super::DEFAULT_CONFIG;

#[derive(clap::Args)]
pub struct AgentArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(idgate::daemon::run(&args.config))?;
    Ok(())
}

pub fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    // A running agent holds its pins and puts back any that go. Any answer
    // on the socket (an error, another protocol version) means it runs.
    let answer = admin::request::<admin::Status>(&config.control_socket, admin::Request::Status);
    if !matches!(answer, Err(admin::AdminError::Io { .. })) {
        anyhow::bail!(
            "the agent is running (it answers on {}): stop it first",
            config.control_socket.display()
        );
    }
    let pin_dir = config.pin_dir.display();
    match idgate::bpf::uninstall(&config.pin_dir)? {
        Uninstalled::NoBpffs => println!(
            "no bpffs is mounted where {pin_dir} would be: nothing is pinned there, nothing to remove (uninstall mounts nothing)"
        ),
        Uninstalled::Removed(removed) if removed.is_empty() => {
            println!("nothing is pinned at {pin_dir}: nothing to remove");
        }
        Uninstalled::Removed(removed) => {
            for path in &removed {
                println!("removed {}", path.display());
            }
            println!(
                "idgate uninstalled from {pin_dir} ({} pins removed)",
                removed.len()
            );
        }
    }
    Ok(())
}
