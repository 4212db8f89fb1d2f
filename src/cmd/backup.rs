//! `meridian backup create|list|status|verify`, through a gateway.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backup::catalog::Catalog;
use crate::backup::job::{BackupJob, BackupType, JobState};
use crate::backup::repo::Verified;
use crate::client::ApiClient;
use crate::cluster::human_bytes;
use crate::gateway::backup::BackupStatus;
use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Take a backup (in every repository, one after another, unless --repository).
    Create {
        #[arg(long = "type", value_enum, default_value = "full")]
        backup_type: BackupType,
        #[arg(long)]
        repository: Option<String>,
        /// Give up waiting (the backup goes on) after this long.
        #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Return once the job is accepted instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every backup in every repository.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Last backup and archived segment, archive lag, per repository; the current job.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Check every backup's files and the archived WAL (pgbackrest verify), per repository.
    Verify {
        #[arg(long)]
        repository: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

const CALL: Duration = Duration::from_secs(30);

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let api = ApiClient::new(&config)?;
    match args.command {
        Sub::Create { backup_type, repository, timeout, no_wait, json } => {
            let body = serde_json::json!({ "backup_type": backup_type, "repository": repository });
            let job: BackupJob = api.act("/v1/backups", &body, CALL).await?;
            if no_wait {
                print_job(&job, json)?;
                return Ok(0);
            }
            let job = follow(&api, job, timeout, json).await?;
            print_job(&job, json)?;
            Ok(if job.state == JobState::Succeeded { 0 } else { 1 })
        }
        Sub::List { json } => {
            let c: Catalog = api.get("/v1/backups", CALL).await?;
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                print_list(&c);
            }
            Ok(0)
        }
        Sub::Status { json } => {
            let s: BackupStatus = api.get("/v1/backups/status", CALL).await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        Sub::Verify { repository, json } => {
            let mut p = Progress::new();
            if !json {
                p.step(format!("verifying {}", repository.as_deref().unwrap_or("every repository")));
            }
            let body = serde_json::json!({ "repository": repository });
            let v: Vec<Verified> = api.post("/v1/backups/verify", &body, Duration::from_secs(6 * 3600)).await?;
            let ok = v.iter().all(|r| r.ok);
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                if ok {
                    p.done()
                } else {
                    p.fail()
                }
                for r in &v {
                    println!("{}: {} ({:.1}s)", r.repository, if r.ok { "ok" } else { "FAILED" }, r.ms as f64 / 1000.0);
                    for l in r.report.lines() {
                        println!("    {l}");
                    }
                }
            }
            Ok(if ok { 0 } else { super::EXIT_PROBLEMS })
        }
    }
}

/// Polls the job until it finishes, a step per repository on stderr.
async fn follow(api: &ApiClient, mut job: BackupJob, timeout: Duration, quiet: bool) -> Result<BackupJob> {
    let deadline = Instant::now() + timeout;
    let mut p = Progress::new();
    let mut shown: Option<String> = None;
    let id = job.id.clone();
    if !quiet {
        p.step(format!("backup job {id}: waiting for {} to start", job.node));
    }
    loop {
        if job.id != id {
            bail!("backup job {id} was replaced by job {} before it finished", job.id);
        }
        let step = match (&job.state, &job.current) {
            (JobState::Running, Some(repo)) => Some(format!("{} backup to {repo} on {}", job.backup_type, job.node)),
            _ => None,
        };
        if !quiet && step.is_some() && step != shown {
            p.step(step.clone().unwrap_or_default());
            shown = step;
        }
        if job.state.finished() {
            if !quiet {
                if job.state == JobState::Succeeded {
                    p.done()
                } else {
                    p.fail()
                }
            }
            return Ok(job);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for backup job {id} (it goes on; see `meridian backup status`)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        match api.get::<Option<BackupJob>>("/v1/backups/job", CALL).await {
            Ok(Some(j)) => job = j,
            Ok(None) => bail!("backup job {id} disappeared from etcd"),
            Err(e) => tracing::debug!("failed to read the backup job (retrying): {e:#}"),
        }
    }
}

fn print_job(job: &BackupJob, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(job)?);
        return Ok(());
    }
    println!("backup job {} ({}, on {}): {}", job.id, job.backup_type, job.node, job.state);
    for o in &job.outcomes {
        match (&o.label, &o.error) {
            (_, Some(e)) => println!("  {}: FAILED after {:.1}s: {e}", o.repository, o.ms as f64 / 1000.0),
            (label, None) => {
                println!("  {}: {} in {:.1}s", o.repository, label.as_deref().unwrap_or("done"), o.ms as f64 / 1000.0)
            }
        }
    }
    if let Some(e) = &job.error {
        println!("  {e}");
    }
    Ok(())
}

fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn print_list(c: &Catalog) {
    if c.backups.is_empty() {
        println!("no backups");
    }
    println!(
        "{:<18} {:<5} {:<16} {:<21} {:>6} {:<22} {:>3} {:>9} {:>9} node",
        "label", "type", "repository", "stopped", "took", "lsn", "tli", "size", "stored"
    );
    for b in &c.backups {
        println!(
            "{:<18} {:<5} {:<16} {:<21} {:>5}s {:<22} {:>3} {:>9} {:>9} {}",
            b.label,
            b.backup_type,
            b.repository,
            time(b.stopped_at),
            b.stopped_at.saturating_sub(b.started_at),
            format!("{}-{}", b.lsn_start.as_deref().unwrap_or("?"), b.lsn_stop.as_deref().unwrap_or("?")),
            b.timeline.map(|t| t.to_string()).unwrap_or_default(),
            human_bytes(b.database_bytes),
            human_bytes(b.repository_bytes),
            b.node.as_deref().unwrap_or("-"),
        );
    }
    for a in &c.archives {
        println!(
            "archive {}: {} .. {}",
            a.repository,
            a.min.as_deref().unwrap_or("-"),
            a.max.as_deref().unwrap_or("-")
        );
    }
}

fn print_status(s: &BackupStatus) {
    for r in &s.repositories {
        println!("repository {} (region {}): {}", r.repository, r.region, r.status);
        match &r.last_backup {
            Some(b) => println!("  last backup   {} {} at {}", b.label, b.backup_type, time(b.stopped_at)),
            None => println!("  last backup   none"),
        }
        if let Some(b) = &r.last_full {
            println!("  last full     {} at {}", b.label, time(b.stopped_at));
        }
        println!(
            "  archived to   {}, {} behind the primary",
            r.last_archived.as_deref().unwrap_or("-"),
            r.archive_lag_bytes.map(human_bytes).unwrap_or_else(|| "?".into())
        );
    }
    if let Some(a) = &s.primary_archive {
        println!(
            "primary archiver: last {} ({}s ago){}",
            a.last_archived.as_deref().unwrap_or("-"),
            a.last_archived_age_seconds.map(|s| format!("{s:.0}")).unwrap_or_else(|| "?".into()),
            a.failing.as_deref().map(|f| format!(", FAILING on {f}")).unwrap_or_default()
        );
    }
    if let Some(j) = &s.job {
        println!("job {}: {} on {}, {}", j.id, j.backup_type, j.node, j.state);
    }
}
