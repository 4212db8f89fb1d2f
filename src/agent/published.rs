//! The published cluster file (`meridian config apply`): the agent runs by
//! the newest version and reports which one (`config_version` in its report,
//! so `config apply` can wait until every agent has taken it).
//!
//! Taking a version: `postgres.settings` that take a reload are written into
//! postgresql.auto.conf (`Server::set_settings`), pg_hba.conf is written
//! again (a node that joins may replicate from its address, one that left may
//! not), and PostgreSQL reloads; the rest of the file (nodes, policies) is in
//! force from the next pass. Settings that take a restart are kept aside
//! (`Published::wanted_settings`) and reported as pending until a restart
//! request (`meridian rolling-restart`, see `restart`) restarts this server
//! with them; a server that is not running takes them at once.
//!
//! A version without this node removes it: the node leaves. It reports itself
//! unhealthy at once (the gateways route no new session to it), waits until
//! the leader runs by that version (so it no longer names this node a
//! synchronous standby, nor admits it in pg_hba.conf) and its sessions have
//! ended (at most `DRAIN`), stops PostgreSQL and exits. Its data stays,
//! unless the version was applied with `--purge`. A
//! primary does not leave: `config apply` refuses to remove it, and if it
//! became primary meanwhile it keeps serving until a switchover moves the
//! primary elsewhere.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::Agent;
use crate::cluster::{MemberStatus, Role};
use crate::config::change::RESTART_SETTINGS;
use crate::config::Config;
use crate::coord::Snapshot;

/// How often the agent looks for a new version.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long a leaving node waits for its application sessions to end.
pub const DRAIN: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Published {
    /// The last version this agent took (or decided to leave).
    pub version: u64,
    checked: Option<Instant>,
    /// Set when a version removed this node.
    pub leaving: Option<Leaving>,
    /// Set once a leaving node has stopped its server: the agent exits.
    pub left: bool,
    /// The published `postgres.settings` when some of them take a restart
    /// this server has not had yet; None when the running ones are current.
    pub wanted_settings: Option<std::collections::BTreeMap<String, toml::Value>>,
}

pub(super) struct Leaving {
    /// The version that removed this node.
    pub version: u64,
    /// When the leader was first seen running by it (draining starts then).
    pub drain_since: Option<Instant>,
    /// Application sessions still open at the last look.
    pub sessions: Option<i64>,
    /// Logged once when the node is primary and cannot leave.
    pub warned_primary: bool,
    /// Empty the data directory once stopped (`config apply --purge`).
    pub purge: bool,
}

impl Agent {
    /// Takes a newer published version, if there is one (at most one look every `CHECK_EVERY`).
    pub(super) async fn published_config_duties(&mut self) -> Result<()> {
        if self.published.checked.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
            return Ok(());
        }
        self.published.checked = Some(Instant::now());
        let Some(p) = self.coord.published_config().await? else { return Ok(()) };
        if p.version <= self.published.version {
            return Ok(());
        }
        let Some(mut new) = Config::parse(&p.text).config else {
            tracing::error!("cluster file version {} in etcd does not parse; keeping the running one", p.version);
            self.published.version = p.version;
            return Ok(());
        };
        new.source = self.config.source.clone();
        if new.node(&self.server.node).is_err() {
            let purge = p.purge.contains(&self.server.node);
            tracing::warn!(
                "cluster file version {} (applied by {}) removes this node: leaving the cluster{}",
                p.version,
                p.applied_by,
                if purge { ", then removing its data (--purge)" } else { ", keeping its data" }
            );
            self.published.version = p.version;
            self.published.leaving =
                Some(Leaving { version: p.version, drain_since: None, sessions: None, warned_primary: false, purge });
            return Ok(());
        }
        self.take(new, p.version).await?;
        self.published.version = p.version;
        Ok(())
    }

    async fn take(&mut self, mut new: Config, version: u64) -> Result<()> {
        let old = &self.config.postgres.settings;
        let changed: Vec<String> = old
            .keys()
            .chain(new.postgres.settings.keys())
            .filter(|k| old.get(*k) != new.postgres.settings.get(*k))
            .cloned()
            .collect();
        let (restart, reload): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|k| RESTART_SETTINGS.contains(&k.as_str()));
        self.published.wanted_settings = None;
        if !restart.is_empty() && self.running.is_some() {
            tracing::warn!(
                "cluster file version {version} changes {}, which take a restart of PostgreSQL: pending until `meridian rolling-restart` restarts this node",
                restart.join(", ")
            );
            self.published.wanted_settings = Some(new.postgres.settings.clone());
            for k in &restart {
                match old.get(k) {
                    Some(v) => new.postgres.settings.insert(k.clone(), v.clone()),
                    None => new.postgres.settings.remove(k),
                };
            }
        }
        let hba_before = crate::postgres::files::render_hba(&self.config);
        let hba_changed = crate::postgres::files::render_hba(&new) != hba_before;
        let mut reload_needed = false;
        if self.server.is_initialized() {
            reload_needed |= self.server.set_settings(&new)?;
            if hba_changed {
                self.server.write_hba(&new)?;
                reload_needed = true;
            }
        }
        self.config = new;
        if reload_needed && self.running.is_some() {
            self.client().await?.execute("SELECT pg_reload_conf()", &[]).await.context("reload PostgreSQL")?;
        }
        // A joining node may ask for its slot as soon as pg_hba.conf admits it.
        if self.latest.borrow().as_ref().is_some_and(|r| r.role == Role::Primary) {
            self.ensure_slots().await?;
        }
        let mut what = Vec::new();
        if !reload.is_empty() {
            what.push(reload.join(", "));
        }
        if hba_changed {
            what.push("pg_hba.conf (the cluster's addresses)".into());
        }
        if what.is_empty() {
            tracing::info!("cluster file version {version} taken");
        } else {
            tracing::info!("cluster file version {version} taken; PostgreSQL reloaded with {}", what.join(" and "));
        }
        Ok(())
    }

    /// One pass of a leaving node: drain, then stop. Returns false when the
    /// node is primary and so cannot leave yet (the ordinary pass runs).
    pub(super) async fn leave_step(&mut self, snapshot: Option<&Snapshot>) -> bool {
        let Some(leaving) = self.published.leaving.as_mut() else { return false };
        let primary = self.latest.borrow().as_ref().is_some_and(|r| r.role == Role::Primary);
        if primary {
            if !leaving.warned_primary {
                tracing::error!(
                    "cluster file version {} removes this node, but it is the primary: it keeps serving until a switchover moves the primary",
                    leaving.version
                );
                leaving.warned_primary = true;
            }
            return false;
        }
        // A healthy primary must run by the version that removed this node before
        // the node stops: until then it may name it a synchronous standby. With
        // no primary the node waits: it may hold the only good copy (and with
        // --purge it would remove it).
        let leader_took_it = snapshot.is_some_and(|s| {
            let Some(leader) = s.leader.as_ref().map(|l| l.leader.node.as_str()) else { return false };
            s.members.iter().any(|m| {
                m.node == leader && m.role == Role::Primary && m.healthy && m.config_version >= leaving.version
            })
        });
        if leader_took_it && leaving.drain_since.is_none() {
            leaving.drain_since = Some(Instant::now());
        }
        let version = leaving.version;
        let sessions = if self.running.is_some() { self.application_sessions().await.ok() } else { Some(0) };
        let leaving = self.published.leaving.as_mut().expect("checked above");
        leaving.sessions = sessions;
        let drained = leaving.drain_since.is_some_and(|t| sessions == Some(0) || t.elapsed() >= DRAIN);
        if drained {
            if let Some(n) = sessions.filter(|n| *n > 0) {
                tracing::warn!("{n} session(s) still open after {}s of draining: stopping anyway", DRAIN.as_secs());
            }
            let purge = leaving.purge;
            self.stop().await;
            let data = self.server.data_dir.clone();
            if !purge {
                tracing::info!(
                    "left the cluster (cluster file version {version}); PostgreSQL stopped, data kept in {}",
                    data.display()
                );
            } else if self.running.is_none() {
                match std::fs::remove_dir_all(&data) {
                    Ok(()) => tracing::info!(
                        "left the cluster (cluster file version {version}); PostgreSQL stopped, {} removed (--purge)",
                        data.display()
                    ),
                    Err(e) => tracing::error!("left the cluster, but failed to remove {}: {e}", data.display()),
                }
            }
            self.published.left = true;
        }
        true
    }

    /// Sessions of anyone but meridian's own roles.
    async fn application_sessions(&mut self) -> Result<i64> {
        let p = &self.config.postgres;
        let ours = vec![p.replication_user.clone(), p.monitor_user.clone(), p.auth_user.clone(), "postgres".into()];
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                 AND pid <> pg_backend_pid() AND NOT (usename = ANY($1))",
                &[&ours],
            )
            .await
            .context("count application sessions")?;
        Ok(row.get(0))
    }

    /// What a leaving node's report says instead of its ordinary health.
    pub(super) fn mark_leaving(&self, report: &mut MemberStatus) {
        report.config_version = self.published.version;
        let Some(l) = &self.published.leaving else { return };
        if report.role == Role::Primary {
            report.detail = Some(format!(
                "removed by cluster file version {}, but primary: switch over to let it leave",
                l.version
            ));
            return;
        }
        report.healthy = false;
        report.detail = Some(match (l.drain_since, l.sessions) {
            (None, _) => {
                format!("leaving (cluster file version {}): waiting for a healthy primary to take it", l.version)
            }
            (Some(_), Some(n)) if n > 0 => {
                format!("leaving (cluster file version {}): draining {n} session(s)", l.version)
            }
            _ => format!("leaving (cluster file version {})", l.version),
        });
    }
}
