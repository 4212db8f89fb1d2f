//! `meridian restore`: a new cluster from a repository (see `backup::restore`),
//! or, with `--replace`, the cluster's own data replaced (`backup::replace`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::backup::restore::{self, Request, Target};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["latest", "to_time", "to_lsn", "backup"])))]
#[command(group(clap::ArgGroup::new("where").required(true).args(["into", "replace"])))]
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
    into: Option<PathBuf>,
    /// Make the restored data this cluster's own: on the host of --node (default: the
    /// primary's), every other node then follows it on a new timeline, epoch + 1. The
    /// node's previous data directory is kept beside it.
    #[arg(long)]
    replace: bool,
    /// With --replace: the node that will hold the restored data.
    #[arg(long, requires = "replace")]
    node: Option<String>,
    /// With --replace: do not ask for the cluster's name.
    #[arg(long, requires = "replace")]
    yes: bool,
    /// Give up when recovery takes longer.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let source = super::load_config(config)?;
    let target = match (args.latest, args.to_time, args.to_lsn, args.backup) {
        (_, Some(t), _, _) => Target::Time(t),
        (_, _, Some(l), _) => Target::Lsn(l),
        (_, _, _, Some(b)) => Target::Backup(b),
        _ => Target::Latest,
    };
    let req = Request { target, timeline: args.timeline, repository: args.repository, timeout: args.timeout };
    let mut progress = crate::progress::Progress::new();
    let Some(into_path) = args.into else {
        return replace(&source, args.node, req, args.yes, args.json, &mut progress).await;
    };
    let into = super::load_config(&into_path)?;
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
        into_path.display(),
        report.node
    );
    Ok(0)
}

async fn replace(
    config: &crate::config::Config,
    node: Option<String>,
    req: Request,
    yes: bool,
    json: bool,
    progress: &mut crate::progress::Progress,
) -> Result<i32> {
    let cluster = config.cluster.clone();
    let confirm = |plan: &crate::backup::replace::Plan| -> Result<()> {
        if !json {
            eprintln!(
                "this replaces cluster {cluster:?}'s data with backup {} of repository {} recovered to {}:",
                plan.backup, plan.repository, plan.target
            );
            eprintln!("  writes after that point are no longer the cluster's (the primary steps down now);");
            eprintln!("  {} becomes the primary; the other nodes follow it on a new timeline;", plan.node);
            eprintln!("  {}'s present data directory is kept beside it (*.replaced-<time>)", plan.node);
        }
        if yes {
            return Ok(());
        }
        if !std::io::stdin().is_terminal() {
            bail!("restore --replace asks for the cluster's name on a terminal; pass --yes to run it without");
        }
        eprint!("type the cluster's name ({cluster}) to go on: ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != cluster {
            bail!("{:?} is not the cluster's name; nothing was changed", line.trim());
        }
        Ok(())
    };
    let report = match crate::backup::replace::run(config, node, req, progress, confirm).await {
        Ok(r) => r,
        Err(e) => {
            progress.fail();
            return Err(e);
        }
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(0);
    }
    for (step, ms) in &report.steps {
        println!("  {:>7.2}s  {step}", *ms as f64 / 1000.0);
    }
    println!(
        "cluster {} now runs on backup {} of repository {}: {} is primary of epoch {} on timeline {} (from {}), in {:.1}s",
        report.cluster,
        report.backup,
        report.repository,
        report.node,
        report.epoch,
        report.timeline,
        report.lsn,
        report.total_ms as f64 / 1000.0
    );
    println!("{}'s previous data is kept in {}; remove it when sure", report.node, report.previous_data.display());
    Ok(0)
}
