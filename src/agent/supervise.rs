//! The server's process under its supervisor: noticing exits, bounded
//! restarts, stopping it.

use std::time::{Duration, Instant};

use super::{Agent, Shutdown};
use crate::postgres::supervisor::FENCED_EXIT;

impl Agent {
    /// Notices a server that exited without being asked to.
    pub(super) fn reap(&mut self) {
        let Some(r) = self.running.as_mut() else { return };
        match r.child.try_wait() {
            Ok(Some(status)) if status.code() == Some(FENCED_EXIT) => {
                if self.hung.load(std::sync::atomic::Ordering::SeqCst) {
                    tracing::warn!("fencing: the supervisor stopped the hung server");
                    self.hung_at = Some(Instant::now());
                } else {
                    tracing::warn!(
                        "fencing: the supervisor stopped PostgreSQL because the leader lease was not renewed in time"
                    );
                }
                self.watchdog.detach();
                self.running = None;
                self.fenced = true;
            }
            Ok(Some(status)) => {
                tracing::error!("PostgreSQL exited unexpectedly ({status}); see {}", self.server.log_path().display());
                self.watchdog.detach();
                self.running = None;
                self.crashes.record(Instant::now());
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("failed to check the postmaster: {e}"),
        }
    }

    /// Asks the archiver to start no more archive commands (SIGTERM), so a
    /// fast shutdown is not held by its last pass: PostgreSQL 15's archiver
    /// runs every file not yet archived at shutdown and, as `wal archive`
    /// refuses on a stopping server, sleeps a second between its three tries
    /// of each (measured: a switchover's stop took 3.2 s, 3 s of it that).
    /// The files stay in pg_wal, as they would after those failures (see
    /// docs/backup.md "Shutdown and processes"). Best effort.
    async fn quiet_archiver(&mut self) {
        let Some(client) = self.running.as_ref().and_then(|r| r.client.as_ref()) else { return };
        let sql = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'";
        match tokio::time::timeout(Duration::from_secs(2), client.query_opt(sql, &[])).await {
            Ok(Ok(Some(row))) => {
                let pid: i32 = row.get(0);
                if pid > 0 {
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!("failed to find the archiver: {e}"),
            Err(_) => tracing::debug!("failed to find the archiver in 2s"),
        }
    }

    /// Stops the server with a fast shutdown, escalating to immediate, then SIGKILL.
    pub(super) async fn stop(&mut self) {
        self.stop_as(Shutdown::Fast).await
    }

    /// The supervisor stays armed until the server has exited: if the lease
    /// goes stale while a fast shutdown waits (on walsenders, say), it still
    /// stops the server at the deadline.
    pub(super) async fn stop_as(&mut self, how: Shutdown) {
        if matches!(how, Shutdown::Fast) {
            self.quiet_archiver().await;
        }
        let Some(mut r) = self.running.take() else { return };
        let pid = r.child.id() as i32;
        let signals: &[(i32, u64)] = match how {
            Shutdown::Fast => &[(libc::SIGINT, 30), (libc::SIGQUIT, 5), (libc::SIGKILL, 5)],
            Shutdown::Immediate => &[(libc::SIGQUIT, 5), (libc::SIGKILL, 5)],
        };
        for &(signal, wait) in signals {
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = r.child.try_wait() {
                    tracing::info!("PostgreSQL stopped");
                    self.watchdog.detach();
                    return;
                }
                // Often: a switchover's write pause includes this wait.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tracing::warn!("PostgreSQL (pid {pid}) did not stop after signal {signal} within {wait}s");
        }
    }
}
