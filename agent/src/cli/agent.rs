//! `idgate agent` and `idgate uninstall`.

use std::path::PathBuf;

use anyhow::Context;
use idgate::admin;
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
    let removed = idgate::bpf::uninstall(&config.pin_dir)?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    println!(
        "idgate uninstalled from {} ({} pins removed)",
        config.pin_dir.display(),
        removed.len()
    );
    Ok(())
}
