//! `ecsmesh issuer ...`: run the issuer, and edit its deny list.
use std::path::PathBuf;

use super::{IssuerConfig, config::is_instance_id, state};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum IssuerCommand {
    /// Run the issuer: attest nodes, issue node certificates and task SVIDs.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Tokio worker threads (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Deny an EC2 instance everything new (attestation, node renewal, SVIDs); what it
    /// holds lapses within the certificate lifetimes.
    DenyInstance {
        /// The issuer's state file (`state_file` of its config).
        #[arg(long)]
        state: PathBuf,
        /// EC2 instance id (i-…).
        instance: String,
    },
    /// Take an EC2 instance off the state file's deny list.
    AllowInstance {
        #[arg(long)]
        state: PathBuf,
        instance: String,
    },
}

pub fn run(cmd: IssuerCommand) -> anyhow::Result<()> {
    match cmd {
        IssuerCommand::Run { config, workers } => {
            let config = IssuerConfig::load(&config)?;
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = workers {
                anyhow::ensure!(n > 0, "--workers must be at least 1");
                builder.worker_threads(n);
            }
            builder
                .enable_all()
                .build()?
                .block_on(super::run::run(config))?;
        }
        IssuerCommand::DenyInstance { state, instance } => edit(&state, &instance, true)?,
        IssuerCommand::AllowInstance { state, instance } => edit(&state, &instance, false)?,
    }
    Ok(())
}

fn edit(path: &std::path::Path, instance: &str, deny: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_instance_id(instance),
        "{instance:?} is not an EC2 instance id (i-…)"
    );
    let changed = state::set_denied(path, instance, deny)?;
    let verb = if deny { "denied" } else { "allowed" };
    println!(
        "{instance} {verb}{}",
        if changed { "" } else { " (unchanged)" }
    );
    Ok(())
}
