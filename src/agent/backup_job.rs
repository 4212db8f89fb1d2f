//! Carrying out a backup job (`backup::job`) that names this node: one
//! `pgbackrest backup` per repository, in order, in the background (the HA
//! loop never waits for a repository). Every step is written back to the job
//! in etcd by compare-and-swap, so the gateway shows progress and a job that
//! someone replaced is left alone.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::JoinHandle;

use super::Agent;
use crate::backup::job::{BackupJob, JobState, RepoOutcome};
use crate::backup::pgbackrest;
use crate::cluster::{now_ms, Role};
use crate::coord::{Coord, Snapshot};

/// The job this agent runs now.
pub(super) struct RunningJob {
    id: String,
    task: JoinHandle<()>,
}

impl Agent {
    pub(super) async fn backup_job_duties(&mut self, snapshot: Option<&Snapshot>) {
        if self.backup_job.as_ref().is_some_and(|r| r.task.is_finished()) {
            self.backup_job = None;
        }
        let Some(job) = snapshot.and_then(|s| s.backup_job.as_ref()) else { return };
        if job.node != self.server.node || job.state.finished() {
            return;
        }
        if self.backup_job.as_ref().is_some_and(|r| r.id == job.id) {
            return;
        }
        if job.state == JobState::Running {
            // Ours, running, but not by this process: the agent restarted midway
            // (pgBackRest's process died with it). Say so rather than leave it hanging.
            let failed = BackupJob {
                state: JobState::Failed,
                current: None,
                error: Some("the agent restarted while the backup ran; ask again".into()),
                ..job.clone()
            };
            if let Err(e) = self.coord.put_backup_job(Some(job), &failed).await {
                tracing::warn!("failed to mark the interrupted backup job {} failed: {e:#}", job.id);
            }
            return;
        }
        let role = self.latest.borrow().as_ref().map(|r| r.role);
        if role != Some(Role::Primary) && role != Some(Role::Replica) {
            let failed = BackupJob {
                state: JobState::Failed,
                error: Some(format!("{} is not running as primary or standby", self.server.node)),
                ..job.clone()
            };
            let _ = self.coord.put_backup_job(Some(job), &failed).await;
            return;
        }
        if role == Some(Role::Primary) {
            // A backup right after a promotion must not start from a checkpoint of the old timeline.
            if let Err(e) = self.checkpoint().await {
                tracing::warn!("failed to checkpoint before the backup: {e:#}");
            }
        }
        let commands = match self.backup_commands(job, role == Some(Role::Replica)) {
            Ok(c) => c,
            Err(e) => {
                let failed = BackupJob { state: JobState::Failed, error: Some(format!("{e:#}")), ..job.clone() };
                let _ = self.coord.put_backup_job(Some(job), &failed).await;
                return;
            }
        };
        tracing::info!("starting backup job {} ({}, to {})", job.id, job.backup_type, job.repositories.join(", "));
        let primary = self.config.node(&job.primary).map(|(_, n)| n.address).ok();
        let task = tokio::spawn(run_job(self.coord.clone(), job.clone(), primary, commands));
        self.backup_job = Some(RunningJob { id: job.id.clone(), task });
    }

    async fn checkpoint(&mut self) -> Result<()> {
        self.client().await?.batch_execute("CHECKPOINT").await.context("CHECKPOINT")
    }

    /// One `pgbackrest backup` per repository of the job. From a standby,
    /// pgBackRest also needs the primary (`pg2`), whose data directory is on
    /// this host (`backup::job::choose_node` makes sure).
    fn backup_commands(&self, job: &BackupJob, from_standby: bool) -> Result<Vec<(String, std::process::Command)>> {
        let backup = self.config.backup.as_ref().context("the cluster file has no [backup]")?;
        let mut out = Vec::new();
        for name in &job.repositories {
            let index = backup
                .repositories
                .iter()
                .position(|r| &r.name == name)
                .with_context(|| format!("no repository named {name:?} in [backup]"))?
                + 1;
            let mut cmd = self.pgbackrest_command("backup", "info");
            cmd.arg(format!("--repo={index}"))
                .arg(format!("--type={}", job.backup_type))
                .arg(format!("--annotation=node={}", self.server.node))
                .arg(format!("--annotation=job={}", job.id));
            if from_standby {
                let (_, p) = self.config.node(&job.primary)?;
                cmd.arg("--backup-standby")
                    .arg(format!("--pg2-path={}", p.data_dir.display()))
                    .arg(format!("--pg2-socket-path={}", p.run_dir().display()))
                    .arg(format!("--pg2-port={}", p.address.port()))
                    .arg(format!("--pg2-user={}", crate::postgres::SUPERUSER));
            }
            crate::process::kill_with_parent(&mut cmd);
            out.push((name.clone(), cmd));
        }
        Ok(out)
    }
}

/// How long a backup waits for the primary to create the stanza in a repository.
const STANZA_WAIT: Duration = Duration::from_secs(30);

/// pgBackRest's answer when the repository has no stanza yet ([055] on backup.info).
fn is_no_stanza_yet(error: &str) -> bool {
    error.contains("[055]") && error.contains("backup.info")
}

/// Runs the backups one after another, writing each step to etcd; stops
/// writing if the job was replaced (the gateway gave up on this node).
async fn run_job(
    coord: Coord,
    mut job: BackupJob,
    primary: Option<std::net::SocketAddr>,
    commands: Vec<(String, std::process::Command)>,
) {
    let mut next = BackupJob { state: JobState::Running, started_at_ms: Some(now_ms()), ..job.clone() };
    let mut all_ok = true;
    for (name, mut cmd) in commands {
        // The commands were made for the primary of the job's start (a standby's
        // backup reads from it): once another node leads, the rest cannot succeed.
        if let Some(moved) = primary_gone(&coord, &job.primary, primary).await {
            all_ok = false;
            tracing::warn!("backup job {}: skipping repository {name}: {moved}", job.id);
            let error = Some(format!("skipped: {moved}"));
            next.outcomes.push(RepoOutcome {
                repository: name,
                ok: false,
                label: None,
                error,
                ms: 0,
                finished_at_ms: now_ms(),
            });
            continue;
        }
        next.current = Some(name.clone());
        if !write(&coord, &mut job, next.clone()).await {
            return;
        }
        let started = Instant::now();
        let job_id = job.id.clone();
        let repo = name.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<Option<String>> {
            let waiting_since = Instant::now();
            loop {
                let out = cmd.output().context("run pgbackrest backup")?;
                if out.status.success() {
                    return Ok(pgbackrest::backup_label(&String::from_utf8_lossy(&out.stdout)));
                }
                let error = pgbackrest::error_text(&out.stderr);
                // The primary creates the stanza once it runs (`agent::backup`): a job
                // asked for right after a cluster starts waits for it, for a while.
                if is_no_stanza_yet(&error) && waiting_since.elapsed() < STANZA_WAIT {
                    if waiting_since.elapsed() < Duration::from_secs(1) {
                        tracing::info!("backup job {job_id}: repository {repo} has no stanza yet; waiting for the primary to create it");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                bail!("{error}");
            }
        })
        .await
        .context("join pgbackrest backup")
        .and_then(|r| r);
        let ms = started.elapsed().as_millis() as u64;
        let outcome = match result {
            Ok(label) => {
                tracing::info!("backup job {}: {} backup to {name} done in {ms} ms", job.id, job.backup_type);
                RepoOutcome { repository: name, ok: true, label, error: None, ms, finished_at_ms: now_ms() }
            }
            Err(e) => {
                all_ok = false;
                // The job (and so `backup status`) says so; the schedule tries again.
                tracing::warn!("failed to back up to repository {name} (job {}): {e:#}", job.id);
                RepoOutcome {
                    repository: name,
                    ok: false,
                    label: None,
                    error: Some(format!("{e:#}")),
                    ms,
                    finished_at_ms: now_ms(),
                }
            }
        };
        next.outcomes.push(outcome);
    }
    next.current = None;
    next.state = if all_ok { JobState::Succeeded } else { JobState::Failed };
    write(&coord, &mut job, next).await;
}

/// Why the job's primary can no longer serve its backups: another node
/// leads, or its server does not answer (killed: `leader` outlives it for a
/// few seconds). An unreadable etcd says nothing; pgBackRest finds out itself.
async fn primary_gone(coord: &Coord, primary: &str, address: Option<std::net::SocketAddr>) -> Option<String> {
    let snap = coord.snapshot().await.ok()?;
    match snap.leader.as_ref().map(|l| l.leader.node.as_str()) {
        Some(p) if p != primary => return Some(format!("the primary moved from {primary} to {p} during the job")),
        None => return Some(format!("{primary} no longer leads and no primary has taken over yet")),
        Some(_) => {}
    }
    match address {
        Some(a) if !crate::postgres::answers(a, std::time::Duration::from_secs(2)).await => {
            Some(format!("the primary {primary} does not answer at {a}"))
        }
        _ => None,
    }
}

/// Compare-and-swap from `job` to `next`, retried while etcd is unreachable;
/// false when someone else changed the job.
async fn write(coord: &Coord, job: &mut BackupJob, next: BackupJob) -> bool {
    for attempt in 0..30 {
        match coord.put_backup_job(Some(job), &next).await {
            Ok(true) => {
                *job = next;
                return true;
            }
            Ok(false) => {
                tracing::warn!("backup job {} was replaced in etcd; this agent stops reporting on it", job.id);
                return false;
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!("failed to record backup job {} progress (retrying): {e:#}", job.id);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_repository_without_a_stanza_is_told_from_other_failures() {
        let missing = "[055]: unable to load info file '/r/backup/lab/backup.info' or '/r/backup/lab/backup.info.copy': FileMissingError";
        assert!(super::is_no_stanza_yet(missing));
        assert!(!super::is_no_stanza_yet("[056]: unable to find primary cluster - cannot proceed"));
        assert!(!super::is_no_stanza_yet("[055]: unable to open missing file '/pg/global/pg_control' for read"));
    }
}
