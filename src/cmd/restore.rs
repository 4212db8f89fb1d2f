//! `meridian restore`: a new cluster from a repository (see `backup::restore`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::backup::restore::{self, Request, Target};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["latest", "to_time", "to_lsn", "backup"])))]
pub struct Args {
    /// Replay every archived WAL file.
    #[arg(long)]
    latest: bool,
    /// Stop just before this time (RFC 3339, e.g. 2026-12-02T17:04:54Z).
    #[arg(long)]
    to_time: Option<String>,
    /// Stop just before this WAL position (e.g. 0/3000060).
    #[arg(long)]
    to_lsn: Option<String>,
    /// Stop at the end of this backup (a label from `meridian backup list`).
    #[arg(long)]
    backup: Option<String>,
    /// The timeline to follow (default: the latest, which after failovers is the one that was live).
    #[arg(long)]
    timeline: Option<u32>,
    /// The repository to restore from (default: the first that can be read). With it, only that
    /// repository's credentials are needed in the secrets file.
    #[arg(long)]
    repository: Option<String>,
    /// The new cluster's file: another name, and nodes whose data directories are empty.
    #[arg(long)]
    into: PathBuf,
    /// Give up when recovery takes longer.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let source = super::load_config(config)?;
    let into = super::load_config(&args.into)?;
    let target = match (args.latest, args.to_time, args.to_lsn, args.backup) {
        (_, Some(t), _, _) => Target::Time(t),
        (_, _, Some(l), _) => Target::Lsn(l),
        (_, _, _, Some(b)) => Target::Backup(b),
        _ => Target::Latest,
    };
    let req = Request { target, timeline: args.timeline, repository: args.repository, timeout: args.timeout };
    let mut progress = crate::progress::Progress::new();
    let report = match restore::run(&source, &into, req, &mut progress).await {
        Ok(r) => r,
        Err(e) => {
            progress.fail();
            return Err(e);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(0);
    }
    for (step, ms) in &report.steps {
        println!("  {:>7.2}s  {step}", *ms as f64 / 1000.0);
    }
    println!(
        "restored cluster {} from {}'s repository {} (backup {}) in {:.1}s: node {} starts timeline {} at {}",
        report.cluster,
        report.from_cluster,
        report.repository,
        report.backup,
        report.total_ms as f64 / 1000.0,
        report.node,
        report.timeline,
        report.lsn
    );
    println!(
        "next: start the agents of {} (`meridian agent --config {} --node {}` first); the others clone from it",
        report.cluster,
        args.into.display(),
        report.node
    );
    Ok(0)
}
