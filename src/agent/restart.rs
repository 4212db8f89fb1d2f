//! Restarts for `meridian rolling-restart`.
//!
//! What a restart would change is reported as `pending_restart`: settings
//! published by `config apply` that take a restart (kept aside by
//! `published`), and a PostgreSQL package upgraded under the running server
//! (the installed `postgres --version` differs from the running
//! `server_version`; looked at every `INSTALLED_CHECK`).
//!
//! A standby takes the wanted settings whenever its server starts (`start`);
//! a primary keeps the running ones until it starts as a standby, so a
//! standby never runs with less of `max_connections` and its kin than the
//! primary whose WAL it replays (for an increase; see `config::change` for
//! decreases).
//!
//! A `restart` request naming this node restarts its server, a standby only:
//! once every gateway says its readers avoid the node and the transactions
//! open on it have finished (at most a second each), fast shutdown, then a start with the wanted settings and the installed
//! binaries, streaming from the same upstream. The request's id goes into the
//! report (`restarted_for`), which is what the gateway waits for. A primary
//! never restarts on a request: the gateway switches over first. An agent
//! that starts finds any request naming it already carried out, since its
//! server starts after it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::Agent;
use crate::config::change::RESTART_SETTINGS;
use crate::coord::Snapshot;
use crate::postgres::files::StartAs;

/// How often the agent compares the installed PostgreSQL with the running one.
const INSTALLED_CHECK: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct Restarts {
    /// The last request carried out (or found carried out at start).
    pub restarted_for: Option<String>,
    /// `server_version` of the running server, read when it started.
    pub running_version: Option<String>,
    /// The installed `postgres --version`, and when it was last read.
    installed_version: Option<String>,
    installed_checked: Option<Instant>,
}

/// "15.20" from `postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)` or from
/// `server_version` ("15.20 (Debian 15.20-0+deb12u1)").
pub fn version_number(text: &str) -> Option<String> {
    let rest = text.trim().strip_prefix("postgres (PostgreSQL)").unwrap_or(text).trim();
    let v = rest.split_whitespace().next()?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

impl Agent {
    /// What a restart of this node's server would change, in a few words each.
    pub(super) fn pending_restart(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if let Some(wanted) = &self.published.wanted_settings {
            let running = &self.config.postgres.settings;
            for k in RESTART_SETTINGS {
                if wanted.get(*k) != running.get(*k) {
                    let show = |v: Option<&toml::Value>| {
                        v.map_or("default".to_string(), |v| v.as_str().map_or(v.to_string(), str::to_string))
                    };
                    pending.push(format!("{k}: {} -> {}", show(running.get(*k)), show(wanted.get(*k))));
                }
            }
        }
        let r = &self.restarts;
        if let (Some(installed), Some(running)) = (&r.installed_version, &r.running_version) {
            if installed != running && self.running.is_some() {
                pending.push(format!("PostgreSQL {installed} installed, {running} running"));
            }
        }
        pending
    }

    /// Reads the installed PostgreSQL's version, at most once every `INSTALLED_CHECK`.
    pub(super) async fn check_installed_version(&mut self) {
        if self.restarts.installed_checked.is_some_and(|t| t.elapsed() < INSTALLED_CHECK) {
            return;
        }
        self.restarts.installed_checked = Some(Instant::now());
        let postgres = self.server.bin_dir.join("postgres");
        match tokio::process::Command::new(&postgres).arg("--version").output().await {
            Ok(out) if out.status.success() => {
                self.restarts.installed_version = version_number(&String::from_utf8_lossy(&out.stdout));
            }
            Ok(out) => tracing::warn!("{} --version failed: {}", postgres.display(), out.status),
            Err(e) => tracing::warn!("failed to run {} --version: {e}", postgres.display()),
        }
    }

    /// Reads the running server's version (after each start).
    pub(super) async fn read_running_version(&mut self) -> Result<()> {
        let row = self.client().await?.query_one("SHOW server_version", &[]).await.context("read server_version")?;
        self.restarts.running_version = version_number(row.get(0));
        Ok(())
    }

    /// At start: a request naming this node is carried out by the start itself.
    pub(super) fn restart_found_at_start(&mut self, snapshot: Option<&Snapshot>) {
        if let Some(r) = snapshot.and_then(|s| s.restart.as_ref()).filter(|r| r.node == self.server.node) {
            self.restarts.restarted_for = Some(r.id.clone());
        }
    }

    /// Carries out a `restart` request naming this node, if this node runs a standby.
    pub(super) async fn restart_duties(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(req) = snapshot.and_then(|s| s.restart.as_ref()).filter(|r| r.node == self.server.node) else {
            return Ok(());
        };
        if self.restarts.restarted_for.as_deref() == Some(req.id.as_str()) || self.published.leaving.is_some() {
            return Ok(());
        }
        let Some(start) = self.running.as_ref().map(|r| r.start.clone()) else {
            // Not running: the next start is the restart.
            return Ok(());
        };
        if !matches!(start, StartAs::Standby { .. }) {
            tracing::warn!(
                "a restart was asked of this node ({}), but it runs the primary: not restarting",
                req.reason
            );
            return Ok(());
        }
        let id = req.id.clone();
        let pending = self.pending_restart();
        tracing::info!(
            "restarting PostgreSQL for a rolling restart ({}){}",
            req.reason,
            if pending.is_empty() { String::new() } else { format!(": {}", pending.join("; ")) }
        );
        let started = Instant::now();
        // The gateways' readers leave a node whose restart is requested
        // (`routing::restarting`); once every gateway says so, the transactions
        // open here finish before the fast shutdown would cut them.
        let grace = super::promote::HAND_OVER_GRACE.1;
        let moved =
            self.wait_for_gateways("avoid this node", grace, |g| g.avoiding.as_deref() == Some(id.as_str())).await;
        let drained = self.drain_for_hand_over().await;
        tracing::info!("readers moved off: {moved}; {drained}");
        self.stop().await;
        self.start(start).await?;
        self.restarts.restarted_for = Some(id);
        tracing::info!("PostgreSQL restarted in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::version_number;

    #[test]
    fn versions_are_read_from_both_spellings() {
        assert_eq!(version_number("postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)\n").as_deref(), Some("15.20"));
        assert_eq!(version_number("15.20 (Debian 15.20-0+deb12u1)").as_deref(), Some("15.20"));
        assert_eq!(version_number("16.1").as_deref(), Some("16.1"));
        assert_eq!(version_number("postgres (PostgreSQL)"), None);
        assert_eq!(version_number("garbage"), None);
    }
}
