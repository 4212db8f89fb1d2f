use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::drill::scenario::Plan;
use crate::drill::workload::Credentials;
use crate::drill::DrillOptions;

#[derive(clap::Args)]
pub struct Args {
    /// primary-node-kill, primary-region-kill, primary-region-partition,
    /// switchover, dr-failover, replica-region-partition, etcd-member-loss,
    /// primary-agent-freeze, primary-hang, clock-skew, backup-during-failover,
    /// restore, add-region, remove-node, or random (docs/drill.md).
    #[arg(long)]
    scenario: Plan,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seed of `random`; the same seed gives the same sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent writers (through every region's writer endpoint in turn).
    #[arg(long, default_value_t = 4)]
    writers: u32,
    /// Inserts per second per writer; 0 for as fast as they are acknowledged.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// reconnect: a writer opens a new connection after an error (as a client
    /// with retry logic does); persistent: it keeps the one it opened, never
    /// reconnecting, and a closed connection ends it (as an application's own
    /// long-lived pool does). With `[proxy] pool_mode = "transaction"` a
    /// persistent round also checks what the proxy promises: no client error
    /// in a switchover, at most one failed transaction per client in a
    /// failover whose clients' gateways stay up (docs/drill.md).
    #[arg(long, value_enum, default_value_t = Connections::Reconnect)]
    connections: Connections,
    /// Where drill.json and drill.html go (default: drill-report next to the cluster file).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The application role the workload logs in as (default: the lab's `app`);
    /// its password comes from MERIDIAN_DRILL_PASSWORD, never the command line.
    #[arg(long)]
    user: Option<String>,
    #[arg(long, default_value = "postgres")]
    dbname: String,
    /// The report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Connections {
    Reconnect,
    Persistent,
}

/// Exit status when a round failed a check.
const EXIT_FAILED: i32 = 3;

pub async fn run(config_path: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config_path)?;
    anyhow::ensure!(args.rounds >= 1 && args.rounds <= 1000, "--rounds must be between 1 and 1000");
    anyhow::ensure!((1..=64).contains(&args.writers), "--writers must be between 1 and 64");
    anyhow::ensure!(args.rate >= 0.0 && args.rate <= 10_000.0, "--rate must be between 0 and 10000");
    let credentials = match args.user {
        Some(user) => {
            let password = std::env::var("MERIDIAN_DRILL_PASSWORD")
                .map_err(|_| anyhow::anyhow!("--user needs the password in MERIDIAN_DRILL_PASSWORD"))?;
            Some(Credentials {
                user,
                password,
                dbname: args.dbname,
                tls: crate::tls::postgres(&config.tls_ca_file(), None)?,
            })
        }
        None => None,
    };
    let options = DrillOptions {
        plan: args.scenario,
        rounds: args.rounds,
        seed: args.seed,
        writers: args.writers,
        rate: args.rate,
        persistent: args.connections == Connections::Persistent,
        report_dir: Some(args.report.unwrap_or_else(|| crate::drill::default_report_dir(config_path))),
        credentials,
        progress: true,
    };
    // Interrupted mid-round, the drill undoes its fault before it exits:
    // a lab must not be left partitioned or with a region down.
    let shutdown = super::shutdown_on_signal();
    let report = tokio::select! {
        r = crate::drill::run(config.clone(), options) => r?,
        _ = shutdown.cancelled() => {
            eprintln!("interrupted: undoing the fault (lab heal, lab start of every region)");
            crate::drill::undo_faults(&config).await?;
            return Ok(130);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(if report.passed() { 0 } else { EXIT_FAILED })
}
