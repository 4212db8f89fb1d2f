//! Backups through the gateway: `backup create` writes a job to etcd for the
//! agent of the node that should run it (`backup::job::choose_node`) and
//! returns; the caller follows the job. `list`, `status` and `verify` run
//! pgBackRest here against the repositories alone (`backup::repo`), so they
//! work while every database server is down.

use serde::{Deserialize, Serialize};

use super::operations::Refused;
use super::Gateway;
use crate::backup::catalog::{BackupSet, Catalog};
use crate::backup::job::{choose_node, BackupJob, BackupType, JobState};
use crate::backup::repo::{Repositories, Verified};
use crate::cluster::{now_ms, ArchiveReport, Role};

use anyhow::{Context, Result};

fn backup_config(g: &Gateway) -> Result<crate::config::BackupConfig> {
    g.config().backup.clone().ok_or_else(|| Refused("the cluster file has no [backup] section".into()).into())
}

/// Starts a backup of `backup_type` to `repository` (every repository when
/// None); refused while another job runs.
pub async fn create(
    g: &Gateway,
    backup_type: BackupType,
    repository: Option<&str>,
    requested_by: &str,
) -> Result<BackupJob> {
    let backup = backup_config(g)?;
    let repositories: Vec<String> = match repository {
        Some(r) if backup.repositories.iter().any(|x| x.name == r) => vec![r.to_string()],
        Some(r) => {
            let names: Vec<&str> = backup.repositories.iter().map(|x| x.name.as_str()).collect();
            return Err(Refused(format!("no repository named {r:?} (repositories: {})", names.join(", "))).into());
        }
        None => backup.repositories.iter().map(|x| x.name.clone()).collect(),
    };
    let s = g.coord.snapshot().await?;
    if let Some(job) = &s.backup_job {
        if !job.replaceable(&s.members) {
            return Err(Refused(format!(
                "backup job {} ({} on {}) is {}; wait for it to finish",
                job.id, job.backup_type, job.node, job.state
            ))
            .into());
        }
    }
    let Some(primary) = s.leader.as_ref().map(|l| l.leader.node.clone()) else {
        return Err(Refused("there is no primary; a backup needs one".into()).into());
    };
    let node = choose_node(&g.config(), &backup, &repositories[0], &primary, &s.members).map_err(Refused)?;
    let now = now_ms();
    let job = BackupJob {
        id: format!("{now:x}"),
        backup_type,
        repositories,
        node,
        primary,
        requested_by: requested_by.to_string(),
        requested_at_ms: now,
        state: JobState::Requested,
        current: None,
        started_at_ms: None,
        outcomes: Vec::new(),
        error: None,
    };
    if !g.coord.put_backup_job(s.backup_job.as_ref(), &job).await? {
        return Err(Refused("another backup job was started at the same moment; try again".into()).into());
    }
    tracing::info!("backup job {} requested by {requested_by}: {} on {}", job.id, job.backup_type, job.node);
    Ok(job)
}

pub async fn job(g: &Gateway) -> Result<Option<BackupJob>> {
    Ok(g.coord.snapshot().await?.backup_job)
}

async fn with_repositories<T: Send + 'static>(
    g: &Gateway,
    f: impl FnOnce(&Repositories) -> Result<T> + Send + 'static,
) -> Result<T> {
    backup_config(g)?;
    let (config, secrets, ca) = (g.config().clone(), g.secrets.clone(), g.identity.ca());
    tokio::task::spawn_blocking(move || f(&Repositories::open(&config, &secrets, &ca, None, None)?))
        .await
        .context("join pgbackrest")?
}

pub async fn catalog(g: &Gateway) -> Result<Catalog> {
    with_repositories(g, |r| r.info()).await
}

/// `pgbackrest verify` of `repository`, or of each in turn.
pub async fn verify(g: &Gateway, repository: Option<String>) -> Result<Vec<Verified>> {
    with_repositories(g, move |r| {
        let names: Vec<String> = match repository {
            Some(name) => {
                r.index(&name).map_err(|e| Refused(format!("{e:#}")))?;
                vec![name]
            }
            None => r.names().to_vec(),
        };
        // The oldest backup of each repository is where its WAL chain must begin.
        let catalog = r.info().ok();
        names.iter().map(|n| r.verify(n, catalog.as_ref())).collect()
    })
    .await
}

/// One repository in `backup status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoStatus {
    pub repository: String,
    pub region: String,
    /// pgBackRest's word on the repository ("ok", "no valid backups", or why it cannot be read).
    pub status: String,
    pub last_backup: Option<BackupSet>,
    pub last_full: Option<BackupSet>,
    /// The newest WAL segment it holds.
    pub last_archived: Option<String>,
    /// WAL the primary wrote that this repository does not hold yet (to the end of its newest segment).
    pub archive_lag_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStatus {
    pub repositories: Vec<RepoStatus>,
    /// The primary's archiver: what it pushed to every repository last, and how long ago.
    pub primary_archive: Option<ArchiveReport>,
    pub job: Option<BackupJob>,
}

pub async fn status(g: &Gateway) -> Result<BackupStatus> {
    let backup = backup_config(g)?;
    let s = g.coord.snapshot().await?;
    let primary = s.members.iter().find(|m| m.role == Role::Primary && m.is_fresh());
    let write_lsn = primary.and_then(|p| p.write_lsn).map(|l| l.0);
    let catalog = catalog(g).await;
    let repositories = backup
        .repositories
        .iter()
        .map(|r| {
            let (status, c) = match &catalog {
                Ok(c) => (
                    c.repositories
                        .iter()
                        .find(|x| x.repository == r.name)
                        .map(|x| x.message.clone())
                        .unwrap_or_default(),
                    Some(c),
                ),
                Err(e) => (format!("{e:#}"), None),
            };
            RepoStatus {
                repository: r.name.clone(),
                region: r.region.clone(),
                status,
                last_backup: c.and_then(|c| c.last(&r.name, None)).cloned(),
                last_full: c.and_then(|c| c.last(&r.name, Some("full"))).cloned(),
                last_archived: c.and_then(|c| c.archived_max(&r.name)).map(String::from),
                archive_lag_bytes: match (write_lsn, c.and_then(|c| c.archived_through(&r.name))) {
                    (Some(w), Some(a)) => Some(w.saturating_sub(a)),
                    _ => None,
                },
            }
        })
        .collect();
    Ok(BackupStatus { repositories, primary_archive: primary.and_then(|p| p.archive.clone()), job: s.backup_job })
}

/// The body of `POST /v1/backups`.
#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    pub backup_type: BackupType,
    pub repository: Option<String>,
}

/// The body of `POST /v1/backups/verify`.
#[derive(Debug, Deserialize)]
pub struct VerifyRequest {
    pub repository: Option<String>,
}

/// How often the schedule looks.
pub const SCHEDULE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Takes the backups `[backup]`'s schedule asks for (`backup::job::due`).
/// Every gateway runs it; the job key lets one job run at a time, and the
/// last job counts as taken even before the catalog shows it, so two
/// gateways do not take the same backup twice.
pub async fn schedule(g: Gateway, shutdown: tokio_util::sync::CancellationToken) {
    let Some(backup) = g.config().backup.clone() else { return };
    let started = std::time::Instant::now();
    loop {
        // The catalog is read every round, also for `meridian status`; backups
        // are asked for only once `schedule_delay` has passed.
        if let Err(e) = schedule_once(&g, &backup, started.elapsed() >= backup.schedule_delay).await {
            tracing::warn!("failed to run the backup schedule: {e:#}");
        }
        let next = if started.elapsed() < backup.schedule_delay {
            SCHEDULE_EVERY.min(backup.schedule_delay - started.elapsed())
        } else {
            SCHEDULE_EVERY
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

async fn schedule_once(g: &Gateway, backup: &crate::config::BackupConfig, take: bool) -> Result<()> {
    let catalog = catalog(g).await?;
    *g.catalog.lock().unwrap() = Some((std::time::Instant::now(), catalog.clone()));
    if !take {
        return Ok(());
    }
    // Read after the catalog: a job that ended meanwhile is seen here.
    let s = g.coord.snapshot().await?;
    if s.leader.is_none() || s.backup_job.as_ref().is_some_and(|j| !j.replaceable(&s.members)) {
        return Ok(());
    }
    // 0 ok, 2 no valid backups yet: both can take a backup.
    let readable =
        |name: &str| catalog.repositories.iter().any(|r| r.repository == name && (r.code == 0 || r.code == 2));
    let now_s = now_ms() / 1000;
    let Some((backup_type, repository)) =
        crate::backup::job::due(backup, &catalog, &readable, s.backup_job.as_ref(), now_s)
    else {
        return Ok(());
    };
    match create(g, backup_type, Some(&repository), &format!("schedule (gateway {})", g.region)).await {
        Ok(job) => tracing::info!("the schedule started a {backup_type} backup to {repository} (job {})", job.id),
        // Another gateway's schedule, or an operator, was first.
        Err(e) if e.downcast_ref::<Refused>().is_some() => tracing::debug!("scheduled backup not started: {e:#}"),
        Err(e) => return Err(e),
    }
    Ok(())
}
