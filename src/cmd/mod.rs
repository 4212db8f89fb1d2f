//! One thin file per subcommand: argument handling only, logic lives in the components.

mod agent;
mod audit;
mod backup;
mod ca;
mod config;
mod deploy;
mod destroy;
mod drill;
mod gateway;
mod health;
mod history;
mod lab;
mod operations;
mod region;
mod restore;
mod rolling;
mod status;
mod token;
mod verify;
mod wal;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit status for a command that ran but found problems (config check, verify).
pub const EXIT_PROBLEMS: i32 = 2;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "One PostgreSQL database across regions: replicas, failover, traffic steering, drills"
)]
pub struct Cli {
    /// The cluster file.
    #[arg(long, global = true, env = "MERIDIAN_CONFIG", default_value = "meridian.toml")]
    pub config: PathBuf,
    /// A file (0600) holding the API token to send; else $MERIDIAN_TOKEN, else [api] token_file.
    #[arg(long, global = true, env = "MERIDIAN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// More detailed logs.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check a cluster file; show, diff and apply the running one.
    Config(config::Args),
    /// Show every node's role, position and lag.
    Status(status::Args),
    /// Write a marker on the primary and time its arrival on every replica.
    Verify(verify::Args),
    /// Planned switchover to a replica, with zero data loss.
    Switchover(operations::SwitchoverArgs),
    /// Declare a disaster: make a region active and promote its best node.
    Failover(operations::FailoverArgs),
    /// Restart every PostgreSQL one at a time: replicas, a switchover, the old
    /// primary (settings that take a restart, a PostgreSQL package upgrade).
    RollingRestart(rolling::Args),
    /// Add a region (its etcd member, gateway and nodes) or remove one, while the cluster runs.
    Region(region::Args),
    /// Every promotion: kind, from, to, epoch, reason, duration, estimated loss.
    History(history::Args),
    /// Every health check: the aggregate and each gateway's verdict.
    Health(health::Args),
    /// Run a workload, inject a fault, measure RTO and RPO, check consistency; write a report.
    Drill(drill::Args),
    /// Run the agent of one node (owns its PostgreSQL).
    Agent(agent::Args),
    /// Run the gateway of one region (API, health checks, DNS, SQL proxy).
    Gateway(gateway::Args),
    /// A whole multi-region cluster on this machine.
    Lab(lab::Args),
    /// The cluster CA: create it, issue certificates, show their expiry.
    Ca(ca::Args),
    /// The API's tokens: create (shown once), list, revoke.
    Token(token::Args),
    /// Who did what: every mutating API call and every automatic promotion.
    Audit(audit::Args),
    /// Backups: create, list, status, verify (pgBackRest; see docs/backup.md).
    Backup(backup::Args),
    /// A new cluster from a repository: the latest data, a time, a WAL position or a backup.
    Restore(restore::Args),
    /// Remove a stopped cluster: its etcd keys, its data directories, with --repositories its backups.
    Destroy(destroy::Args),
    /// Unit files for real machines: systemd units for an agent, a gateway or an etcd member (docs/deploy.md).
    Deploy(deploy::Args),
    /// WAL archiving helpers that PostgreSQL runs (see docs/backup.md).
    Wal(wal::Args),
}

/// Runs a command and returns the process's exit status.
pub async fn run(cli: Cli) -> i32 {
    let config = cli.config.clone();
    if let Some(f) = cli.token_file.clone() {
        crate::client::set_token_file(f);
    }
    let result = match cli.command {
        Command::Config(a) => config::run(&config, a).await,
        Command::Status(a) => status::run(&config, a).await,
        Command::Verify(a) => verify::run(&config, a).await,
        Command::History(a) => history::run(&config, a).await,
        Command::Health(a) => health::run(&config, a).await,
        Command::Drill(a) => drill::run(&config, a).await,
        Command::Switchover(a) => operations::switchover(&config, a).await,
        Command::Failover(a) => operations::failover(&config, a).await,
        Command::RollingRestart(a) => rolling::run(&config, a).await,
        Command::Region(a) => region::run(&config, a).await,
        Command::Agent(a) => agent::run(&config, a).await,
        Command::Gateway(a) => gateway::run(&config, a).await,
        Command::Lab(a) => lab::run(a, &config).await,
        Command::Ca(a) => ca::run(&config, a).await,
        Command::Token(a) => token::run(&config, a).await,
        Command::Audit(a) => audit::run(&config, a).await,
        Command::Wal(a) => wal::run(a).await,
        Command::Backup(a) => backup::run(&config, a).await,
        Command::Restore(a) => restore::run(&config, a).await,
        Command::Destroy(a) => destroy::run(&config, a).await,
        Command::Deploy(a) => deploy::run(&config, a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

pub fn load_config(path: &Path) -> anyhow::Result<meridian_config::Config> {
    meridian_config::Config::load(path)
}

use crate::config as meridian_config;

/// A token cancelled by SIGINT or SIGTERM, for long-running components.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        t.cancel();
    });
    token
}
