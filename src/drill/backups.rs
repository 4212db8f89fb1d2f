//! `backup-during-failover`: a full backup is started, and once it has run
//! for a while the primary is killed, so the failover (and the archiving that
//! goes on through it) happens in the middle of the backup. Beyond a failover
//! round's own checks: the backup job ended (it completed, or it is marked
//! failed; never left running), the fault did come in the middle of it, and
//! `backup verify` finds every repository's files and WAL chain complete.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::report::Check;
use super::Drill;
use crate::backup::job::{BackupJob, BackupType, JobState};
use crate::backup::repo::Verified;

/// How far into the backup the fault comes. The lab's first repository (S3)
/// takes about 15 s for a full backup, so this lands in its file copy.
/// The round checks afterwards that it did (`fault hit the backup mid-way`).
const INTO_THE_BACKUP: Duration = Duration::from_millis(1500);
const JOB_START_TIMEOUT: Duration = Duration::from_secs(30);
const JOB_END_TIMEOUT: Duration = Duration::from_secs(180);
const CALL: Duration = Duration::from_secs(30);

impl Drill {
    pub(super) async fn backup_job(&self) -> Result<Option<BackupJob>> {
        self.api.get("/v1/backups/job", CALL).await
    }

    /// Asks for a full backup and returns once it has been running for
    /// [`INTO_THE_BACKUP`]: the job, as it was then.
    pub(super) async fn start_backup(&self) -> Result<BackupJob> {
        let body = serde_json::json!({ "backup_type": BackupType::Full, "repository": null });
        let asked: BackupJob = self.api.act("/v1/backups", &body, CALL).await.context("ask for a full backup")?;
        self.say(format!("  backup job {} asked of {}", asked.id, asked.node));
        let deadline = Instant::now() + JOB_START_TIMEOUT;
        let running_since = loop {
            let job = self.backup_job().await?.context("the backup job disappeared from etcd")?;
            if job.id != asked.id {
                bail!("backup job {} was replaced by {} before it ran", asked.id, job.id);
            }
            match job.state {
                JobState::Running if job.current.is_some() => break Instant::now(),
                s if s.finished() => bail!("backup job {} ended ({s}) before the fault: {:?}", job.id, job.error),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("backup job {} was not running within {JOB_START_TIMEOUT:?} (state {})", job.id, job.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(INTO_THE_BACKUP.saturating_sub(running_since.elapsed())).await;
        let job = self.backup_job().await?.context("the backup job disappeared from etcd")?;
        if job.state != JobState::Running {
            bail!(
                "backup job {} was {} already, {INTO_THE_BACKUP:?} in; the fault would not hit it",
                job.id,
                job.state
            );
        }
        Ok(job)
    }

    /// The checks after the round: the job ended, the fault hit it mid-way,
    /// and every repository verifies with a complete WAL chain.
    pub(super) async fn backup_checks(&self, job_id: &str, fault_ms: u64) -> Vec<Check> {
        let mut checks = Vec::new();
        let deadline = Instant::now() + JOB_END_TIMEOUT;
        let ended = loop {
            match self.backup_job().await {
                Ok(Some(j)) if j.id != job_id => break Err(format!("replaced by job {} before it ended", j.id)),
                Ok(Some(j)) if j.state.finished() => break Ok(j),
                Ok(None) => break Err("disappeared from etcd".to_string()),
                Ok(Some(j)) if Instant::now() > deadline => {
                    break Err(format!("still {} after {JOB_END_TIMEOUT:?} on {}", j.state, j.node))
                }
                Err(e) if Instant::now() > deadline => break Err(format!("unreadable: {e:#}")),
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        match &ended {
            Ok(j) => {
                let outcomes: Vec<String> = j
                    .outcomes
                    .iter()
                    .map(|o| match (&o.label, &o.error) {
                        (_, Some(e)) => format!("{}: failed: {e}", o.repository),
                        (l, None) => format!("{}: {}", o.repository, l.as_deref().unwrap_or("done")),
                    })
                    .collect();
                let why = j.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
                checks.push(Check::new(
                    "backup completed or marked failed",
                    true,
                    format!("job {} on {}: {}{why}; {}", j.id, j.node, j.state, outcomes.join("; ")),
                ));
                // The first repository's backup was under way at the fault: it
                // failed, or it finished after it.
                let first = j.outcomes.first();
                let mid_way = j.started_at_ms.is_some_and(|s| s <= fault_ms)
                    && first.is_none_or(|o| !o.ok || o.finished_at_ms > fault_ms);
                checks.push(Check::new(
                    "fault hit the backup mid-way",
                    mid_way,
                    format!(
                        "the fault came {:.1}s after the job started; its first backup {}",
                        j.started_at_ms.map_or(0.0, |s| fault_ms.saturating_sub(s) as f64 / 1000.0),
                        match first {
                            None => "never ran".to_string(),
                            Some(o) if !o.ok => format!("to {} failed", o.repository),
                            Some(o) => format!(
                                "to {} finished {:.1}s after the fault",
                                o.repository,
                                o.finished_at_ms.saturating_sub(fault_ms) as f64 / 1000.0
                            ),
                        }
                    ),
                ));
            }
            Err(e) => checks.push(Check::new("backup completed or marked failed", false, format!("job {job_id}: {e}"))),
        }
        let verified: Result<Vec<Verified>> = self
            .api
            .post("/v1/backups/verify", &serde_json::json!({ "repository": null }), Duration::from_secs(600))
            .await;
        checks.push(match verified {
            Ok(v) => Check::new(
                "backup verify: files and WAL chain complete",
                !v.is_empty() && v.iter().all(|r| r.ok),
                v.iter()
                    .map(|r| {
                        let chain =
                            r.chain.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "chain not checked".into());
                        let status = if r.ok { "ok" } else { "FAILED" };
                        let bad: Vec<&str> = r
                            .report
                            .lines()
                            .map(str::trim)
                            .filter(|l| !r.ok && (l.contains("invalid") || l.starts_with("status:")))
                            .collect();
                        format!(
                            "{}: {status}, {chain}{}",
                            r.repository,
                            if bad.is_empty() { String::new() } else { format!(" [{}]", bad.join("; ")) }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Err(e) => Check::new("backup verify: files and WAL chain complete", false, format!("{e:#}")),
        });
        checks
    }
}
