//! A replica built from a backup repository (`[backup] clone_from =
//! "repository"`), so a node in a far region does not pull the whole
//! database across the WAN: the newest backup of its region's repository
//! (else the first) is restored into the empty data directory, then a
//! catch-up server replays the archived WAL (pgBackRest's `archive-get` as
//! `restore_command`) and, where the archive ends, streams from the leader.
//! Once it streams, it is stopped and started the ordinary way, without
//! `restore_command`: a promotion must never wait on a repository (PostgreSQL
//! asks the archive for timeline history files when it promotes, and the
//! repository may be in the region that was just lost).
//!
//! Every failure empties the data directory again; the caller then copies a
//! base backup from the leader instead.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Agent;
use crate::backup::pgbackrest;
use crate::postgres::files::StartAs;
use crate::postgres::scratch::ScratchServer;

/// How long replay may make no progress (and not stream) before the catch-up is given up.
const STALLED: Duration = Duration::from_secs(60);

impl Agent {
    /// The repository to clone from, when the cluster file asks for one.
    pub(super) fn clone_repository(&self) -> Option<(usize, String)> {
        let backup = self.config.backup.as_ref()?;
        if backup.clone_from != crate::config::CloneFrom::Repository {
            return None;
        }
        let (region, _) = self.config.node(&self.server.node).ok()?;
        backup.nearest_repository(&region.name).map(|(i, r)| (i, r.name.clone()))
    }

    /// Builds this (empty) node from repository `repo` (`repoN`), caught up
    /// until it streams from `upstream`; leaves the server stopped and the
    /// data directory a complete standby. On failure the directory is empty.
    pub(super) async fn clone_from_repository(
        &mut self,
        (index, name): (usize, String),
        upstream: &(String, std::net::SocketAddr),
    ) -> Result<()> {
        self.set_starting(&format!("restoring the newest backup of repository {name}"));
        self.empty_data_dir().await?;
        let started = Instant::now();
        let result = self.restore_and_catch_up(index, &name, upstream).await;
        // archive-get runs asynchronously and may still be prefetching for the stopped server.
        let leftovers = pgbackrest::running_pids(&self.server.run_dir);
        crate::process::stop_all(&leftovers, Duration::from_secs(5)).await;
        match result {
            Ok(label) => {
                tracing::info!(
                    "built from backup {label} of repository {name} and caught up with {} in {} ms",
                    upstream.0,
                    started.elapsed().as_millis()
                );
                Ok(())
            }
            Err(e) => {
                self.empty_data_dir().await?;
                Err(e)
            }
        }
    }

    /// Returns the backup's label.
    async fn restore_and_catch_up(
        &mut self,
        index: usize,
        name: &str,
        upstream: &(String, std::net::SocketAddr),
    ) -> Result<String> {
        let mut cmd = self.pgbackrest_command("restore", "info");
        cmd.arg(format!("--repo={index}"))
            .arg("--type=standby")
            .arg(format!("--pg1-path={}", self.server.data_dir.display()));
        crate::process::kill_with_parent(&mut cmd);
        let out = tokio::task::spawn_blocking(move || cmd.output()).await?.context("run pgbackrest restore")?;
        if !out.status.success() {
            bail!("pgbackrest restore from {name}: {}", pgbackrest::error_text(&out.stderr));
        }
        let label = restored_label(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|| "?".into());
        self.set_starting(&format!("replaying archived WAL after backup {label} of repository {name}"));

        // meridian's files for a standby of the leader, plus pgBackRest's
        // restore_command for as long as the catch-up lasts.
        let auto = self.server.data_dir.join("postgresql.auto.conf");
        let recovery = crate::backup::restore::recovery_lines(
            &std::fs::read_to_string(&auto).with_context(|| format!("read {}", auto.display()))?,
        );
        if !recovery.contains("restore_command") {
            bail!("pgbackrest restore wrote no restore_command into {}", auto.display());
        }
        self.server.write_files(&self.config, &self.secrets, &StartAs::Standby { upstream: Some(upstream.clone()) })?;
        let mut text = std::fs::read_to_string(&auto)?;
        text.push_str(&recovery);
        std::fs::write(&auto, text).with_context(|| format!("write {}", auto.display()))?;
        self.server.clear_stale_lock()?;

        let cmd = self.server.postmaster_command()?;
        let mut server = ScratchServer::new(self.spawner.spawn(cmd).await.context("start the catch-up server")?);
        let mut progress = (None::<String>, Instant::now());
        loop {
            if let Some(status) = server.exited() {
                bail!("the catch-up server stopped ({status}); see {}", self.server.log_path().display());
            }
            let state = match self.server.connect().await {
                Ok(c) => c
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn()::text, \
                         (SELECT status FROM pg_stat_wal_receiver) = 'streaming' IS TRUE",
                        &[],
                    )
                    .await
                    .ok()
                    .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, bool>(1))),
                Err(_) => None,
            };
            if let Some((replayed, streaming)) = state {
                if streaming {
                    break;
                }
                if replayed != progress.0 {
                    if let Some(lsn) = &replayed {
                        self.set_starting(&format!("replaying archived WAL from repository {name}: at {lsn}"));
                    }
                    progress = (replayed, Instant::now());
                }
            }
            if progress.1.elapsed() > STALLED {
                bail!(
                    "no WAL replayed for {STALLED:?} and not streaming from {} (last at {})",
                    upstream.0,
                    progress.0.as_deref().unwrap_or("-")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        server.stop(Duration::from_secs(60)).await.context("stop the catch-up server")?;
        Ok(label)
    }
}

/// The backup pgBackRest restored, from its `info` output
/// (`... restore backup set 20261203-074035F, recovery will start at ...`).
fn restored_label(out: &str) -> Option<String> {
    let rest = &out[out.find("restore backup set ")? + "restore backup set ".len()..];
    Some(rest.split(|c: char| c == ',' || c.is_whitespace()).next()?.to_string()).filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_restored_backup_is_named_in_pgbackrests_output() {
        let out = "2026-12-03 07:50:01.123 P00   INFO: repo2: restore backup set 20261203-074035F, recovery will start at 2026-12-03 07:40:35\n";
        assert_eq!(super::restored_label(out).as_deref(), Some("20261203-074035F"));
        assert_eq!(super::restored_label("nothing"), None);
    }
}
