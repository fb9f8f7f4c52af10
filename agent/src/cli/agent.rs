//! `idgate agent` and `idgate uninstall`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use idgate::admin;
use idgate::bpf::Uninstalled;
use idgate::config::Config;
use idgate::dns::Handover;

use super::{Connection, DEFAULT_CONFIG};

#[derive(clap::Args)]
pub struct AgentArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Sockets handed over by the agent this one replaces in the same
    /// process (`idgate restart`); never given by hand.
    #[arg(long, hide = true)]
    dns_listeners: Option<String>,
}

#[derive(clap::Args)]
pub struct RestartArgs {
    /// How long to wait for the agent to answer again.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    wait: Duration,
    #[command(flatten)]
    conn: Connection,
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Taken first: the descriptors are this process's from its start.
    let handover: Handover = match &args.dns_listeners {
        Some(spec) => spec.parse()?,
        None => Handover::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(idgate::daemon::run(&args.config, handover))?;
    Ok(())
}

/// Asks the agent to execute itself again, and waits until it answers.
pub fn restart(args: RestartArgs) -> anyhow::Result<()> {
    let asked = Instant::now();
    let restarting: admin::Restarting = args.conn.request(admin::Request::Restart)?;
    // The new agent answers `status` once it serves again; its uptime
    // started after the request.
    let status = loop {
        if let Ok(s) = args.conn.request::<admin::Status>(admin::Request::Status)
            && Duration::from_secs(s.uptime_seconds) <= asked.elapsed()
            && asked.elapsed() > Duration::from_millis(50)
        {
            break s;
        }
        if asked.elapsed() > args.wait {
            anyhow::bail!(
                "the agent (pid {}) did not answer within {} after the restart: see its log",
                restarting.pid,
                humantime::format_duration(args.wait)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    args.conn.print(&status, |s| {
        println!(
            "restarted (pid {}, version {}) in {} ms; policy generation {}",
            restarting.pid,
            s.version,
            asked.elapsed().as_millis(),
            s.generation
        );
    });
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
