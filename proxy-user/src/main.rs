use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use ecsmesh::config::{Config, DEFAULT_PIN_DIR};

/// Service mesh for Amazon ECS: one node proxy per container instance, eBPF redirect.
#[derive(Parser)]
#[command(name = "ecsmesh", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy: attach the redirect, enrol tasks, forward their connections.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Tokio worker threads (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run as a per-task sidecar: the same proxy, attached to one task's cgroup, inside
    /// that task's network namespace. In an ECS task the task comes from the task metadata
    /// endpoint (a config with no [[tasks]]); otherwise the config lists exactly one task,
    /// in `host` network mode (the sidecar shares its netns).
    Sidecar {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a config file and print it as the proxy would use it.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Certificate authority: trust anchors, per-instance issuers, test certificates.
    Ca {
        #[command(subcommand)]
        cmd: ecsmesh::ca_cli::CaCommand,
    },
    /// The central identity issuer: attests nodes, issues node certificates and task SVIDs.
    Issuer {
        #[command(subcommand)]
        cmd: ecsmesh::issuer::IssuerCommand,
    },
    /// Write this container instance's node config from instance metadata (IMDSv2) and
    /// the stack's parameters; the node's parser checks it before it is written.
    Bootstrap(Box<ecsmesh::bootstrap::BootstrapArgs>),
    /// Remove every program, link, pin and map of one instance.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ecsmesh::logging::init(&cli.log_format);
    // One TLS crypto provider for the whole process (ring), before anything builds a
    // rustls config: the AWS SDK would otherwise be free to pick another.
    ecsmesh::aws::install_crypto_provider();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, so it survives journald and CloudWatch intact.
            eprintln!("ecsmesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, workers: Option<usize>) -> anyhow::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1");
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(ecsmesh::run::run(Arc::new(config)))?;
    Ok(())
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, workers } => serve(Config::load(&config)?, workers)?,
        Command::Sidecar { config, workers } => {
            let mut config = Config::load(&config)?;
            if config.tasks.is_empty() {
                // In an ECS task: the task comes from the task metadata endpoint.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                config = rt.block_on(ecsmesh::sidecar::from_task_metadata(config))?;
            }
            config.check_sidecar()?;
            serve(config, workers)?;
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
        }
        Command::Ca { cmd } => ecsmesh::ca_cli::run(cmd)?,
        Command::Issuer { cmd } => ecsmesh::issuer::cli::run(cmd)?,
        Command::Bootstrap(args) => ecsmesh::bootstrap::run(*args)?,
        Command::Uninstall { pin_dir } => {
            ecsmesh::ebpf::uninstall(&pin_dir)?;
            tracing::info!(pin_dir = %pin_dir.display(), "uninstalled");
        }
    }
    Ok(())
}
