//! The node agent: owns one PostgreSQL server and runs the HA loop.
//!
//! Every second it observes (its server, etcd), asks `failover::decide` what
//! to do, does it, and publishes the node's report to `members/<node>` under
//! its lease. The postmaster is its direct child, started with a parent-death
//! signal (see `postgres::spawner`): a dead agent means a stopped server.
//!
//! Three tasks: the HA loop (this module), the lease keeper (`lease`), and the
//! publisher, which writes the latest report every second even while the loop
//! is busy with a long action such as a base backup.

pub mod api;
pub mod lease;
mod report;

use std::collections::VecDeque;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Epoch, MemberStatus, Role};
use crate::config::{Config, Secrets};
use crate::coord::{Coord, Snapshot};
use crate::failover::{self, Action, Local, NodeView, Shared};
use crate::postgres::files::{self, StartAs};
use crate::postgres::spawner::Spawner;
use crate::postgres::Server;
use lease::LeaseKeeper;

/// How often the HA loop runs.
const TICK: Duration = Duration::from_secs(1);
/// A server that crashes more often than this within `CRASH_WINDOW` is left stopped.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(300);

/// The running postmaster and how it was started.
struct Running {
    child: Child,
    start: StartAs,
    client: Option<tokio_postgres::Client>,
}

struct Agent {
    config: Config,
    secrets: Secrets,
    region: String,
    server: Server,
    coord: Coord,
    spawner: Spawner,
    lease: LeaseKeeper,
    running: Option<Running>,
    /// Recent unexpected exits of the server, for bounded restarts.
    crashes: VecDeque<Instant>,
    /// Set when this node fenced itself; cleared once it streams from a leader.
    fenced: bool,
    /// The highest epoch seen in etcd.
    epoch_seen: Epoch,
    /// What the node is doing or why it is unhealthy, for the report.
    detail: Option<String>,
    /// The latest report, for the publisher and the API.
    latest: watch::Sender<Option<MemberStatus>>,
}

/// Runs the agent for `node` until `shutdown`, then stops PostgreSQL and gives up leadership.
pub async fn run(config: Config, node: &str, shutdown: CancellationToken) -> Result<()> {
    let (region, node_cfg) = config.node(node)?;
    let region = region.name.clone();
    let server = Server::new(&config, node_cfg)?;
    let secrets = config.secrets()?;
    let api = tokio::net::TcpListener::bind(node_cfg.api)
        .await
        .with_context(|| format!("bind the agent API on {}", node_cfg.api))?;
    server.prepare_dirs()?;

    let coord = Coord::connect(&config).await?;
    let Some(lease) = LeaseKeeper::start(coord.clone(), config.failover.lease_ttl, shutdown.clone()).await else {
        return Ok(());
    };
    let (latest, latest_rx) = watch::channel(None);
    tokio::spawn(api::serve(api, latest_rx.clone(), shutdown.clone()));
    tokio::spawn(publish_loop(coord.clone(), lease.clone(), latest_rx, shutdown.clone()));

    let mut agent = Agent {
        config,
        secrets,
        region,
        server,
        coord,
        spawner: Spawner::start(),
        lease,
        running: None,
        crashes: VecDeque::new(),
        fenced: false,
        epoch_seen: 0,
        detail: None,
        latest,
    };
    tracing::info!("agent for {} started (lease {:x})", agent.server.node, agent.lease.id());
    while !shutdown.is_cancelled() {
        // A step may take long (a base backup); shutdown must not wait for it.
        let result = tokio::select! {
            r = agent.step() => r,
            _ = shutdown.cancelled() => break,
        };
        if let Err(e) = result {
            tracing::error!("failed to {e:#}");
            agent.detail = Some(format!("{e:#}"));
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    agent.shutdown().await;
    Ok(())
}

/// Writes the latest report every second under the current lease.
async fn publish_loop(
    coord: Coord,
    lease: LeaseKeeper,
    latest: watch::Receiver<Option<MemberStatus>>,
    shutdown: CancellationToken,
) {
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let Some(mut report) = latest.borrow().clone() else { continue };
        report.updated_at_ms = crate::cluster::now_ms();
        match coord.put_member(&report, lease.id()).await {
            Ok(()) => last_error = None,
            Err(e) => {
                // Once per distinct error: an unreachable etcd would otherwise flood the log.
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!("failed to {msg}");
                    last_error = Some(msg);
                }
            }
        }
    }
}

impl Agent {
    /// One pass of the HA loop.
    async fn step(&mut self) -> Result<()> {
        self.reap();
        let snapshot = match self.coord.snapshot().await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("failed to {e:#}");
                None
            }
        };
        if let Some(s) = &snapshot {
            self.epoch_seen = self.epoch_seen.max(s.epoch);
        }
        let view = self.view(snapshot.as_ref());
        let action = failover::decide(&view);
        if !matches!(action, Action::Keep | Action::Wait { .. }) {
            tracing::info!("{:?} -> {action:?}", view.local);
        }
        self.act(action, snapshot.as_ref()).await?;
        self.report(snapshot.as_ref()).await;
        Ok(())
    }

    fn view(&self, snapshot: Option<&Snapshot>) -> NodeView {
        let local = match &self.running {
            None if !self.server.is_initialized() => Local::Empty,
            None => Local::Stopped,
            Some(Running { start: StartAs::Primary, .. }) => Local::Primary,
            Some(Running { start: StartAs::Standby { upstream }, .. }) => {
                Local::Standby { upstream: upstream.as_ref().map(|(n, _)| n.clone()) }
            }
        };
        let shared = snapshot.map(|s| {
            let leader_ready = s.leader.as_ref().is_some_and(|l| {
                s.members.iter().any(|m| m.node == l.leader.node && m.role == Role::Primary && m.healthy)
            });
            Shared {
                leader: s.leader.as_ref().map(|l| l.leader.clone()),
                leader_is_my_lease: s.leader.as_ref().is_some_and(|l| l.lease == self.lease.id()),
                leader_ready,
                epoch: s.epoch,
                initialized_by: s.initialized_by.clone(),
            }
        });
        NodeView {
            me: self.server.node.clone(),
            bootstrap_node: self.config.bootstrap_node().is_some_and(|n| n.name == self.server.node),
            local,
            shared,
            lease_fresh: self.lease.is_fresh(),
        }
    }

    async fn act(&mut self, action: Action, snapshot: Option<&Snapshot>) -> Result<()> {
        match action {
            Action::Keep => {
                if matches!(self.running, Some(Running { start: StartAs::Primary, .. })) {
                    self.ensure_slots().await?;
                }
                Ok(())
            }
            Action::Wait { reason } => {
                self.detail = Some(reason);
                Ok(())
            }
            Action::Bootstrap => self.bootstrap(snapshot.map(|s| s.epoch).unwrap_or(0)).await,
            Action::Clone { from } => self.clone_from(&from).await,
            Action::StartPrimary => self.start(StartAs::Primary).await,
            Action::StartStandby { upstream } => {
                let upstream = upstream.map(|n| self.upstream(&n)).transpose()?;
                self.start(StartAs::Standby { upstream }).await
            }
            Action::Follow { upstream } => self.follow(&upstream).await,
            Action::Fence { reason } => self.fence(&reason, snapshot).await,
        }
    }

    fn upstream(&self, node: &str) -> Result<(String, std::net::SocketAddr)> {
        let (_, n) = self.config.node(node)?;
        Ok((n.name.clone(), n.address))
    }

    /// Creates the cluster: `initialize`, then `leader` with the next epoch, then initdb.
    async fn bootstrap(&mut self, epoch: Epoch) -> Result<()> {
        let me = self.server.node.clone();
        let holder = self.coord.claim_initialize(&me).await?;
        if holder != me {
            self.detail = Some(format!("{holder} is initializing the cluster"));
            return Ok(());
        }
        let Some(epoch) = self.coord.acquire_leader(&me, epoch, self.lease.id()).await? else {
            return Ok(()); // someone else is leader now; the next pass follows it
        };
        tracing::info!("initializing a new cluster as leader of epoch {epoch}");
        self.set_starting("initializing a new cluster");
        self.empty_data_dir()?;
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.initdb()).await??;
        self.start(StartAs::Primary).await?;
        let roles = files::roles_sql(&self.config, &self.secrets);
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

    /// Copies the leader's data directory, then starts as its standby.
    async fn clone_from(&mut self, from: &str) -> Result<()> {
        let upstream = self.upstream(from)?;
        self.set_starting(&format!("copying a base backup from {from}"));
        self.empty_data_dir()?;
        // The passfile must exist before pg_basebackup reads it.
        self.server.write_files(&self.config, &self.secrets, &StartAs::Standby { upstream: Some(upstream.clone()) })?;
        let server = self.server.clone();
        let user = self.config.postgres.replication_user.clone();
        let addr = upstream.1;
        if let Err(e) = tokio::task::spawn_blocking(move || server.base_backup(addr, &user)).await? {
            self.empty_data_dir()?;
            return Err(e);
        }
        self.start(StartAs::Standby { upstream: Some(upstream) }).await
    }

    /// initdb and pg_basebackup need an empty directory; a failed attempt leaves debris.
    fn empty_data_dir(&self) -> Result<()> {
        let dir = &self.server.data_dir;
        if dir.exists() {
            for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
                let path = entry?.path();
                let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                r.with_context(|| format!("remove {}", path.display()))?;
            }
        }
        self.server.prepare_dirs()
    }

    async fn start(&mut self, start: StartAs) -> Result<()> {
        if self.gave_up() {
            self.detail = Some(format!(
                "PostgreSQL exited unexpectedly {MAX_CRASHES} times in {}s; not restarting it (see {})",
                CRASH_WINDOW.as_secs(),
                self.server.log_path().display()
            ));
            return Ok(());
        }
        self.set_starting("starting PostgreSQL");
        self.server.write_files(&self.config, &self.secrets, &start)?;
        self.server.clear_stale_lock()?;
        let cmd = self.server.postmaster_command()?;
        let child = self.spawner.spawn(cmd).await.context("start postgres")?;
        let pid = child.id();
        // Registered before waiting: shutdown stops it, and reap() records an exit as a crash.
        let running = self.running.insert(Running { child, start: start.clone(), client: None });
        let client =
            self.server.wait_ready(|| matches!(running.child.try_wait(), Ok(None)), Duration::from_secs(120)).await?;
        running.client = Some(client);
        tracing::info!("PostgreSQL running as {} (pid {pid})", describe(&start));
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
    async fn fence(&mut self, reason: &str, snapshot: Option<&Snapshot>) -> Result<()> {
        tracing::warn!("fencing: {reason}; restarting PostgreSQL as a standby");
        self.fenced = true;
        self.stop().await;
        let leader = snapshot.and_then(|s| s.leader.as_ref()).map(|l| l.leader.node.clone());
        let upstream = leader.filter(|n| *n != self.server.node).map(|n| self.upstream(&n)).transpose()?;
        self.start(StartAs::Standby { upstream }).await
    }

    /// The primary keeps a physical slot for every other node, so a replica that
    /// falls behind (up to `max_slot_wal_keep_size`) can still catch up.
    async fn ensure_slots(&mut self) -> Result<()> {
        let me = self.server.node.clone();
        let wanted: Vec<String> =
            self.config.nodes().filter(|(_, n)| n.name != me).map(|(_, n)| files::slot_name(&n.name)).collect();
        let own = files::slot_name(&me);
        let client = self.client().await?;
        let rows = client
            .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' AND slot_name LIKE 'meridian\\_%'", &[])
            .await
            .context("list replication slots")?;
        let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        for slot in wanted.iter().filter(|s| !existing.contains(s)) {
            client
                .execute("SELECT pg_create_physical_replication_slot($1, true)", &[slot])
                .await
                .with_context(|| format!("create replication slot {slot}"))?;
        }
        if existing.contains(&own) {
            // A slot for ourselves would retain WAL forever: nobody consumes it.
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&own])
                .await
                .with_context(|| format!("drop replication slot {own}"))?;
        }
        Ok(())
    }

    /// The agent's superuser connection, reconnecting if it broke.
    async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        let Some(r) = self.running.as_mut() else { bail!("PostgreSQL is not running") };
        if r.client.as_ref().is_none_or(|c| c.is_closed()) {
            r.client = Some(self.server.connect().await?);
        }
        Ok(r.client.as_ref().expect("just connected"))
    }

    /// Notices a server that exited without being asked to.
    fn reap(&mut self) {
        let Some(r) = self.running.as_mut() else { return };
        match r.child.try_wait() {
            Ok(Some(status)) => {
                tracing::error!("PostgreSQL exited unexpectedly ({status}); see {}", self.server.log_path().display());
                self.running = None;
                let now = Instant::now();
                self.crashes.push_back(now);
                while self.crashes.front().is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW) {
                    self.crashes.pop_front();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("failed to check the postmaster: {e}"),
        }
    }

    fn gave_up(&self) -> bool {
        self.crashes.len() >= MAX_CRASHES
    }

    /// Stops the server with a fast shutdown, escalating to immediate, then SIGKILL.
    async fn stop(&mut self) {
        let Some(mut r) = self.running.take() else { return };
        let pid = r.child.id() as i32;
        for (signal, wait) in [(libc::SIGINT, 30), (libc::SIGQUIT, 5), (libc::SIGKILL, 5)] {
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = r.child.try_wait() {
                    tracing::info!("PostgreSQL stopped");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::warn!("PostgreSQL (pid {pid}) did not stop after signal {signal} within {wait}s");
        }
    }

    fn set_starting(&mut self, what: &str) {
        self.detail = Some(what.to_string());
        let mut report = self.base_report(Role::Starting);
        report.healthy = false;
        self.latest.send_replace(Some(report));
    }

    async fn shutdown(&mut self) {
        tracing::info!("shutting down");
        // Stop first: revoking the lease releases `leader` (it lives under the
        // lease), and nobody may be promoted while this server could still write.
        self.stop().await;
        if let Err(e) = self.coord.revoke_lease(self.lease.id()).await {
            tracing::warn!("failed to {e:#}");
        }
    }
}

fn describe(start: &StartAs) -> String {
    match start {
        StartAs::Primary => "primary".into(),
        StartAs::Standby { upstream: Some((n, _)) } => format!("standby of {n}"),
        StartAs::Standby { upstream: None } => "standby with no upstream".into(),
    }
}
