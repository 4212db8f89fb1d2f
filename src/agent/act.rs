//! Carrying out `decide`'s actions: starting, following, fencing,
//! bootstrapping, and removing a dead leader. Promotion and the switchover
//! hand-over are in `promote`, rejoining in `rejoin`.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Agent, Running, Shutdown};
use crate::cluster::{Epoch, Role};
use crate::coord::Snapshot;
use crate::failover::duties::{self, Probe, CRASH_WINDOW, MAX_CRASHES};
use crate::failover::{Action, FenceReason, WaitReason};
use crate::postgres::files::{self, StartAs};

/// What a failure of `action` is recorded as (and retried under); None for
/// actions that are not retried with a pause.
pub(super) fn label(action: &Action) -> Option<String> {
    Some(match action {
        Action::Keep | Action::Wait { .. } => return None,
        Action::Bootstrap => "initialize the cluster".into(),
        Action::AdoptRestored => "start the restored data as primary".into(),
        Action::Clone { from } => format!("copy a base backup from {from}"),
        Action::StartPrimary => "start PostgreSQL as primary".into(),
        Action::StartStandby { .. } => "start PostgreSQL as a standby".into(),
        Action::Follow { upstream } => format!("follow {upstream}"),
        Action::Promote { .. } => "promote".into(),
        Action::HandOver { to } => format!("hand over to {to}"),
        Action::StepDown { .. } => "step down".into(),
        Action::Rejoin { upstream } => format!("rejoin {upstream}"),
        Action::Fence { .. } => "fence".into(),
        Action::StopForRestore => "stop for the restore".into(),
        Action::TakeRestored => "start the restored data as primary".into(),
    })
}

impl Agent {
    pub(super) async fn act(&mut self, action: Action, snapshot: Option<&Snapshot>) -> Result<()> {
        match action {
            Action::Keep => match &self.running {
                Some(Running { start: StartAs::Primary, .. }) => self.ensure_slots().await,
                Some(Running { start: StartAs::Standby { .. }, .. }) => self.depose_dead_leader(snapshot).await,
                None => Ok(()),
            },
            Action::Promote { kind, reason } => self.promote(kind, &reason, snapshot).await,
            Action::HandOver { to } => self.hand_over(&to, snapshot).await,
            Action::StepDown { reason } => self.step_down(&reason, snapshot).await,
            Action::Rejoin { upstream } => self.rejoin(&upstream).await,
            Action::Wait { reason } => {
                self.wait(reason);
                Ok(())
            }
            Action::Bootstrap => self.bootstrap(snapshot.map(|s| s.epoch).unwrap_or(0)).await,
            Action::AdoptRestored => self.adopt_restored(snapshot.map(|s| s.epoch).unwrap_or(0)).await,
            Action::Clone { from } => self.clone_from(&from).await,
            Action::StartPrimary => {
                let me = &self.server.node;
                let held = snapshot.and_then(|s| s.leader.as_ref()).filter(|l| &l.leader.node == me);
                let epoch =
                    held.context("start as primary: leader is not this node's in the last snapshot")?.leader.epoch;
                let record = snapshot.map(|s| s.sync.as_ref());
                match record {
                    Some(None) => {} // no record at all: nothing vouched
                    Some(Some(r)) => self.unvouch_before_restart(epoch, Some(r)).await?,
                    None => self.unvouch_before_restart(epoch, None).await?,
                }
                self.start(StartAs::Primary).await
            }
            Action::StartStandby { upstream } => {
                let upstream = upstream.map(|n| self.upstream(&n)).transpose()?;
                self.start(StartAs::Standby { upstream }).await
            }
            Action::Follow { upstream } => self.follow(&upstream).await,
            Action::Fence { reason } => self.fence(&reason, snapshot).await,
            Action::StopForRestore => {
                tracing::warn!("stopping PostgreSQL: a restore will replace this node's data");
                self.stop().await;
                Ok(())
            }
            Action::TakeRestored => self.take_restored(snapshot).await,
        }
    }

    /// Shows why the node does nothing, in its report (as a type, and as the
    /// detail's text unless an activity says more).
    pub(super) fn wait(&mut self, reason: WaitReason) {
        self.waiting = Some(reason);
    }

    pub(super) fn upstream(&self, node: &str) -> Result<(String, std::net::SocketAddr)> {
        let (_, n) = self.config.node(node)?;
        Ok((n.name.clone(), n.address))
    }

    /// Creates the cluster: `initialize`, then `leader` with the next epoch, then initdb.
    async fn bootstrap(&mut self, epoch: Epoch) -> Result<()> {
        let me = self.server.node.clone();
        let holder = self.coord.claim_initialize(&me).await?;
        if holder != me {
            self.wait(WaitReason::Initializing { holder });
            return Ok(());
        }
        let Some(epoch) = self.coord.acquire_leader(&me, epoch, self.lease.id(), None).await? else {
            return Ok(()); // someone else is leader now; the next pass follows it
        };
        tracing::info!("initializing a new cluster as leader of epoch {epoch}");
        self.set_starting("initializing a new cluster");
        self.empty_data_dir().await?;
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.initdb()).await??;
        self.start(StartAs::Primary).await?;
        // No standby exists yet: commits must not wait for a synchronous one.
        let roles = format!("SET synchronous_commit = local;\n{}", files::roles_sql(&self.config, &self.secrets));
        self.client().await?.batch_execute(&roles).await.context("create meridian's roles")?;
        if let Some(path) = &self.config.postgres.bootstrap_sql {
            let path = self.config.resolve(path);
            let server = self.server.clone();
            tokio::task::spawn_blocking(move || server.run_sql_file(&path)).await??;
        }
        self.ensure_slots().await?;
        tracing::info!("cluster initialized");
        Ok(())
    }

    /// Starts restored data (`meridian restore`) as this new cluster's first
    /// primary; its roles get this cluster's passwords.
    async fn adopt_restored(&mut self, epoch: Epoch) -> Result<()> {
        let me = self.server.node.clone();
        let Some(epoch) = self.coord.acquire_leader(&me, epoch, self.lease.id(), None).await? else {
            return Ok(()); // someone else is leader now; the next pass follows it
        };
        tracing::info!("starting the restored data as primary of epoch {epoch}");
        self.start(StartAs::Primary).await?;
        let roles =
            format!("SET synchronous_commit = local;\n{}", files::role_passwords_sql(&self.config, &self.secrets));
        self.client().await?.batch_execute(&roles).await.context("set the passwords of meridian's roles")?;
        self.ensure_slots().await?;
        tracing::info!("restored cluster started");
        Ok(())
    }

    pub(super) async fn start(&mut self, start: StartAs) -> Result<()> {
        if self.crashes.gave_up(std::time::Instant::now()) {
            self.wait(WaitReason::GaveUp {
                crashes: MAX_CRASHES,
                window_s: CRASH_WINDOW.as_secs(),
                log: self.server.log_path().display().to_string(),
            });
            return Ok(());
        }
        self.set_starting("starting PostgreSQL");
        // A new server gets its own time to start streaming before it counts
        // as stalled (else a rejoin that did not help repeats every tick).
        self.not_streaming_since = None;
        if matches!(start, StartAs::Standby { .. }) {
            // Settings published since the last start that take one (see `restart`).
            if let Some(wanted) = self.published.wanted_settings.take() {
                self.config.postgres.settings = wanted;
            }
        }
        // A copy whose history left the leader's cannot start on the leader's
        // timeline (PostgreSQL stops: "requested timeline N does not contain
        // minimum recovery point"): it stays on its own until it is replaced.
        let pinned;
        let config = if self.diverged && matches!(start, StartAs::Standby { .. }) {
            pinned = on_own_timeline(&self.config);
            &pinned
        } else {
            &self.config
        };
        self.server.write_files(config, &self.secrets, &start)?;
        self.server.clear_stale_lock()?;
        let cmd = self.server.supervised_postmaster_command()?;
        let mut child = self.spawner.spawn(cmd).await.context("start postgres")?;
        let pid = child.id();
        self.watchdog.attach(child.stdin.take().context("the supervisor's order pipe")?);
        if start == StartAs::Primary {
            // Armed before the server can accept a write.
            self.watchdog.guard();
        }
        // Registered before waiting: shutdown stops it, and reap() records an exit as a crash.
        let running = self.running.insert(Running { child, start: start.clone(), client: None });
        let client =
            self.server.wait_ready(|| matches!(running.child.try_wait(), Ok(None)), Duration::from_secs(120)).await?;
        running.client = Some(client);
        tracing::info!("PostgreSQL running as {} (supervisor pid {pid})", describe(&start));
        if let Err(e) = self.read_running_version().await {
            tracing::warn!("failed to {e:#}");
        }
        self.detail = None;
        Ok(())
    }

    async fn follow(&mut self, node: &str) -> Result<()> {
        let upstream = self.upstream(node)?;
        let start = StartAs::Standby { upstream: Some(upstream) };
        self.server.write_files(&self.config, &self.secrets, &start)?;
        self.client().await?.batch_execute("SELECT pg_reload_conf()").await.context("reload configuration")?;
        if let Some(r) = self.running.as_mut() {
            r.start = start;
        }
        tracing::info!("now following {node}");
        Ok(())
    }

    /// Restarts a read-write server as a standby: it must not take writes.
    pub(super) async fn fence(&mut self, reason: &FenceReason, snapshot: Option<&Snapshot>) -> Result<()> {
        tracing::warn!("fencing: {reason}; restarting PostgreSQL as a standby");
        self.fenced = true;
        // Immediate: a fast shutdown waits for walsenders to send the shutdown
        // checkpoint, which a partitioned standby may never acknowledge.
        self.stop_as(Shutdown::Immediate).await;
        let leader = snapshot.and_then(|s| s.leader.as_ref()).map(|l| l.leader.node.clone());
        let upstream = leader.filter(|n| *n != self.server.node).map(|n| self.upstream(&n)).transpose()?;
        self.start(StartAs::Standby { upstream }).await
    }

    /// A DR switch names another node: stop, release `leader`, and wait as a standby.
    async fn step_down(&mut self, reason: &str, snapshot: Option<&Snapshot>) -> Result<()> {
        tracing::warn!("stepping down: {reason}");
        self.fenced = true;
        self.stop().await;
        if let Some(l) = snapshot.and_then(|s| s.leader.as_ref()) {
            self.coord.release_leader(&self.server.node, l.leader.epoch).await?;
        }
        self.start(StartAs::Standby { upstream: None }).await
    }

    /// Removes a leader proven dead (`duties::leader_is_dead`) now rather
    /// than when its lease expires.
    async fn depose_dead_leader(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(entry) = snapshot.and_then(|s| s.leader.as_ref()) else { return Ok(()) };
        if entry.leader.node == self.server.node {
            return Ok(());
        }
        let (_, node) = self.config.node(&entry.leader.node)?;
        // The API first: a live leader's answers it, and its PostgreSQL is left alone.
        let api = probe(node.api).await;
        if api != Probe::Refused {
            return Ok(());
        }
        if !duties::leader_is_dead(api, probe(node.address).await) {
            return Ok(());
        }
        if self.coord.depose(entry).await? {
            tracing::warn!(
                "leader {} refuses connections on its agent API and PostgreSQL port: removed it",
                entry.leader.node
            );
        }
        Ok(())
    }

    /// The agent's superuser connection, reconnecting if it broke.
    pub(super) async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        let Some(r) = self.running.as_mut() else { bail!("PostgreSQL is not running") };
        if r.client.as_ref().is_none_or(|c| c.is_closed()) {
            r.client = Some(self.server.connect().await?);
        }
        Ok(r.client.as_ref().expect("just connected"))
    }

    pub(super) fn set_starting(&mut self, what: &str) {
        self.detail = Some(what.to_string());
        let mut report = self.base_report(Role::Starting);
        report.healthy = false;
        self.latest.send_replace(Some(report));
    }
}

/// One TCP connection attempt, classified.
async fn probe(addr: std::net::SocketAddr) -> Probe {
    match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Probe::Accepted,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        _ => Probe::Silent,
    }
}

fn describe(start: &StartAs) -> String {
    match start {
        StartAs::Primary => "primary".into(),
        StartAs::Standby { upstream: Some((n, _)) } => format!("standby of {n}"),
        StartAs::Standby { upstream: None } => "standby with no upstream".into(),
    }
}

/// `config` with the standby held on the timeline its data is on.
fn on_own_timeline(config: &crate::config::Config) -> crate::config::Config {
    let mut config = config.clone();
    config.postgres.settings.insert("recovery_target_timeline".into(), toml::Value::String("current".into()));
    config
}
