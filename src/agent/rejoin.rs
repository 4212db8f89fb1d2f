//! Rejoining a leader: rewind, or a fresh copy made beside the old data, and
//! never an emptied data directory for an upstream that does not answer.

use std::time::Instant;

use anyhow::{Context, Result};

use std::time::Duration;

use super::Agent;
use crate::failover::{self, AfterRewindFailure, WaitReason};
use crate::postgres::files::StartAs;

/// How long an upstream has to answer before a rewind against it is tried.
const UPSTREAM_PROBE: Duration = Duration::from_secs(2);
/// After a failed rewind, the copy runs as a standby this long before the next try.
const REWIND_RETRY: Duration = Duration::from_secs(10);

impl Agent {
    /// Fills the empty data directory from the leader (a base backup) or,
    /// with `clone_from = "repository"`, from a backup repository (falling
    /// back to the leader when that fails), then starts as its standby. The
    /// directory is marked while it fills, so a crash midway leaves no half
    /// copy to start from (`Server::recover_swap`).
    pub(super) async fn clone_from(&mut self, from: &str) -> Result<()> {
        let upstream = self.upstream(from)?;
        self.diverged = false;
        self.server.begin_clone()?;
        let mut copied = false;
        if let Some(repository) = self.clone_repository() {
            let name = repository.1.clone();
            match self.clone_from_repository(repository, &upstream).await {
                Ok(()) => copied = true,
                Err(e) => tracing::warn!(
                    "failed to build this node from repository {name} ({e:#}); copying a base backup from {from} instead"
                ),
            }
        }
        if !copied {
            self.set_starting(&format!("copying a base backup from {from}"));
            self.empty_data_dir().await?;
            // The passfile must exist before pg_basebackup reads it.
            self.server.write_files(
                &self.config,
                &self.secrets,
                &StartAs::Standby { upstream: Some(upstream.clone()) },
            )?;
            let server = self.server.clone();
            let user = self.config.postgres.replication_user.clone();
            let addr = upstream.1;
            if let Err(e) = tokio::task::spawn_blocking(move || server.base_backup(addr, &user)).await? {
                self.empty_data_dir().await?;
                return Err(e);
            }
        }
        self.server.end_clone()?;
        self.start(StartAs::Standby { upstream: Some(upstream) }).await
    }

    /// initdb and pg_basebackup need an empty directory; a failed attempt leaves debris.
    /// Removing a large directory takes a while: off the async workers.
    pub(super) async fn empty_data_dir(&self) -> Result<()> {
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || {
            let dir = &server.data_dir;
            if dir.exists() {
                for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
                    let path = entry?.path();
                    let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                    r.with_context(|| format!("remove {}", path.display()))?;
                }
            }
            server.prepare_dirs()
        })
        .await?
    }

    /// Rewinds a server whose history diverged from the leader's, then follows it.
    ///
    /// The local data may be the best copy left (the leader can hang right
    /// after a failover), so it is never thrown away for an upstream that does
    /// not answer: the rewind waits until the upstream answers, a rewind that
    /// fails to talk to it is retried later with the server running again as a
    /// standby (still a failover candidate), and only a divergence pg_rewind
    /// proves it cannot repair leads to a fresh copy, made beside this one.
    pub(super) async fn rejoin(&mut self, upstream: &str) -> Result<()> {
        let (name, addr) = self.upstream(upstream)?;
        if self.rewind_retry_at.is_some_and(|t| Instant::now() < t) {
            self.wait(WaitReason::RewindRetry { upstream: name.clone() });
            return self.keep_serving((name, addr)).await;
        }
        if !crate::postgres::answers(addr, UPSTREAM_PROBE).await {
            self.wait(WaitReason::UpstreamSilent { upstream: name.clone() });
            return self.keep_serving((name, addr)).await;
        }
        self.set_starting(&format!("rewinding to follow {name}"));
        self.stop().await;
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.clear_stale_lock()).await??;
        let server = self.server.clone();
        let user = self.config.postgres.replication_user.clone();
        let Err(e) = tokio::task::spawn_blocking(move || server.rewind(addr, &user)).await? else {
            self.fenced = false;
            self.rewind_retry_at = None;
            self.diverged = false;
            return self.start(StartAs::Standby { upstream: Some((name, addr)) }).await;
        };
        self.rewind_retry_at = Some(Instant::now() + REWIND_RETRY);
        match failover::after_rewind_failure(&format!("{e:#}")) {
            AfterRewindFailure::KeepAndRetry => {
                tracing::warn!("failed to rewind ({e:#}); keeping this copy and retrying in {REWIND_RETRY:?}");
                self.keep_serving((name, addr)).await
            }
            AfterRewindFailure::FreshCopy => {
                tracing::error!(
                    "failed to rewind ({e:#}); this copy cannot follow {name}: making a fresh copy beside it"
                );
                // The old copy runs again (a candidate, should the leader be lost)
                // while the new one is made: on its own timeline, following nobody,
                // since it cannot follow the leader's (and is not healthy for readers).
                self.diverged = true;
                if let Err(e) = self.keep_serving_alone().await {
                    tracing::warn!("failed to restart the old copy while copying ({e:#})");
                }
                // One fresh copy at a time: the others keep theirs meanwhile.
                let me = self.server.node.clone();
                if let Some(holder) = self.coord.take_recopy(&me, self.lease.id()).await? {
                    self.wait(WaitReason::RecopyTurn { holder });
                    return Ok(());
                }
                self.set_starting(&format!("copying a base backup from {name} beside the current data"));
                let server = self.server.clone();
                let user = self.config.postgres.replication_user.clone();
                let copied = tokio::task::spawn_blocking(move || server.copy_beside(addr, &user)).await?;
                if let Err(e) = copied {
                    self.coord.release_recopy(&me).await?;
                    return Err(e);
                }
                self.stop().await;
                let server = self.server.clone();
                let swapped = tokio::task::spawn_blocking(move || server.swap_in_copy()).await?;
                self.coord.release_recopy(&me).await?;
                swapped?;
                self.fenced = false;
                self.rewind_retry_at = None;
                self.diverged = false;
                self.start(StartAs::Standby { upstream: Some((name, addr)) }).await
            }
        }
    }

    /// Makes sure the local copy runs, as a standby following nobody.
    async fn keep_serving_alone(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        self.start(StartAs::Standby { upstream: None }).await
    }

    /// Makes sure the local copy runs as a standby of `upstream` (it may have
    /// been stopped for a rewind), so it serves reads and reports its position.
    pub(super) async fn keep_serving(&mut self, upstream: (String, std::net::SocketAddr)) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        self.start(StartAs::Standby { upstream: Some(upstream) }).await
    }
}
