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
    stanza_ready: bool,
    creating: Option<JoinHandle<Result<()>>>,
    not_before: Option<Instant>,
    pause: Duration,
}

impl Agent {
    /// Creates the stanza once this node is primary; retried with a growing pause.
    pub(super) async fn archiving_duties(&mut self) {
        if self.config.backup.is_none() || self.archiving.stanza_ready {
            return;
        }
        if let Some(task) = self.archiving.creating.take_if(|t| t.is_finished()) {
            match task.await.context("join stanza-create").and_then(|r| r) {
                Ok(()) => {
                    tracing::info!("pgBackRest stanza {} is ready in every repository", self.config.cluster);
                    self.archiving.stanza_ready = true;
                    return;
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
        let mut cmd = self.pgbackrest_command("stanza-create");
        self.archiving.creating = Some(tokio::task::spawn_blocking(move || {
            let out = cmd.output().context("run pgbackrest stanza-create")?;
            if !out.status.success() {
                bail!("pgbackrest stanza-create: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        }));
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
    fn pgbackrest_command(&self, command: &str) -> std::process::Command {
        let backup = self.config.backup.as_ref().expect("called with [backup] only");
        let run_dir = &self.server.run_dir;
        let mut cmd = self.server.command_at(&backup.pgbackrest);
        cmd.arg(format!("--config={}", pgbackrest::conf_path(run_dir).display()))
            .arg(format!("--config-include-path={}", pgbackrest::include_path(run_dir).display()))
            .arg(format!("--stanza={}", pgbackrest::stanza(&self.config)))
            .args(["--log-level-console=error", "--log-level-stderr=error", command]);
        cmd
    }
}
