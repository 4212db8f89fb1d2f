//! The primary's archiving duty: the stanza must exist in every repository
//! before `archive-push` can store anything, so a primary creates it (an
//! idempotent `stanza-create`) once per agent, in the background so the HA
//! loop never waits for a repository.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::JoinHandle;

use super::Agent;
use crate::backup::pgbackrest;

#[derive(Default)]
pub(super) struct Archiving {
    /// A push refused for other content in a repository, as last seen.
    conflict: Option<String>,
    stanza_ready: bool,
    creating: Option<JoinHandle<Result<()>>>,
    not_before: Option<Instant>,
    pause: Duration,
}

impl Agent {
    /// Creates the stanza once this node is primary; retried with a growing pause.
    pub(super) async fn archiving_duties(&mut self) {
        if self.config.backup.is_none() {
            return;
        }
        self.check_archive_conflict();
        if self.archiving.stanza_ready {
            return;
        }
        if let Some(task) = self.archiving.creating.take_if(|t| t.is_finished()) {
            match task.await.context("join stanza-create").and_then(|r| r) {
                Ok(()) => {
                    tracing::info!("pgBackRest stanza {} is ready in every repository", self.config.cluster);
                    self.archiving.stanza_ready = true;
                    // The archiver waits up to a minute after failed tries (the files
                    // written before the stanza existed); a reload wakes it now.
                    if let Some(pid) = crate::process::postmaster_pid(&self.server.data_dir) {
                        crate::process::signal(pid, libc::SIGHUP);
                    }
                    return;
                }
                // The archiver of a promoted primary holds the stanza's lock while it pushes: try again soon.
                Err(e) if format!("{e:#}").contains(&format!("[{:03}]", pgbackrest::LOCK_BUSY)) => {
                    tracing::debug!("stanza-create waits for the archiver's lock: {e:#}");
                    self.archiving.not_before = Some(Instant::now() + Duration::from_secs(2));
                }
                Err(e) => {
                    self.archiving.pause =
                        (self.archiving.pause * 2).clamp(Duration::from_secs(2), Duration::from_secs(60));
                    self.archiving.not_before = Some(Instant::now() + self.archiving.pause);
                    tracing::warn!(
                        "failed to create the pgBackRest stanza (next try in {:?}; WAL waits in pg_wal meanwhile): {e:#}",
                        self.archiving.pause
                    );
                }
            }
        }
        if self.archiving.creating.is_some() || self.archiving.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let mut cmd = self.pgbackrest_command("stanza-create", "error");
        self.archiving.creating = Some(tokio::task::spawn_blocking(move || {
            let out = cmd.output().context("run pgbackrest stanza-create")?;
            if !out.status.success() {
                bail!("pgbackrest stanza-create: {}", pgbackrest::error_text(&out.stderr));
            }
            Ok(())
        }));
    }

    /// A refused push for other content is the one archiving failure that may
    /// mean two servers wrote the same timeline: an ERROR, in the report (and
    /// so `status`, `/metrics`) until the file is pushed.
    fn check_archive_conflict(&mut self) {
        let now = pgbackrest::archive_conflict(&self.server.run_dir, pgbackrest::stanza(&self.config));
        if now.is_some() && now != self.archiving.conflict {
            tracing::error!(
                "possible split brain: {} (pgBackRest never overwrites an archived file; find out which server wrote it)",
                now.as_deref().unwrap_or_default()
            );
        }
        self.archiving.conflict = now;
    }

    /// What the report says of archiving: `pg_stat_archiver` from the last
    /// observation, and a refusal for other content. None without `[backup]`.
    pub(super) fn archive_report(&self) -> Option<crate::cluster::ArchiveReport> {
        self.config.backup.as_ref()?;
        let local = self.last_local.as_ref();
        Some(crate::cluster::ArchiveReport {
            last_archived: local.and_then(|l| l.last_archived.clone()),
            last_archived_age_seconds: local.and_then(|l| l.last_archived_age_seconds),
            failing: local.and_then(|l| l.archive_failing.clone()),
            conflict: self.archiving.conflict.clone(),
        })
    }

    /// Stops the asynchronous archive-push processes the stopped server left
    /// behind (they detach from PostgreSQL); what they had not pushed is still
    /// `.ready` in pg_wal and is pushed after the next start.
    pub(super) async fn stop_archivers(&self) {
        let pids = pgbackrest::running_pids(&self.server.run_dir);
        if !pids.is_empty() {
            tracing::info!("stopping pgBackRest's asynchronous archive-push (pids {pids:?})");
            crate::process::stop_all(&pids, Duration::from_secs(5)).await;
        }
    }

    /// `pgbackrest <command>` with this node's configuration, as the server's user.
    /// `console` is pgBackRest's console log level: `info` to read what it did (a backup's label).
    pub(super) fn pgbackrest_command(&self, command: &str, console: &str) -> std::process::Command {
        let backup = self.config.backup.as_ref().expect("called with [backup] only");
        let run_dir = &self.server.run_dir;
        let mut cmd = self.server.command_at(&backup.pgbackrest);
        cmd.arg(format!("--config={}", pgbackrest::conf_path(run_dir).display()))
            .arg(format!("--config-include-path={}", pgbackrest::include_path(run_dir).display()))
            .arg(format!("--stanza={}", pgbackrest::stanza(&self.config)))
            .arg(format!("--log-level-console={console}"))
            .args(["--log-level-stderr=error", command]);
        cmd
    }
}
