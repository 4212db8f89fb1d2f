//! The node agent: owns one PostgreSQL server and runs the HA loop.
//!
//! Every second it observes (its server, etcd), asks `failover::decide` what
//! to do, does it, and publishes the node's report to `members/<node>` under
//! its lease. The postmaster runs under a supervisor process
//! (`postgres::supervisor`), which the agent starts with a parent-death
//! signal: a dead agent means a stopped server, and a frozen one still gets
//! its primary fenced.
//!
//! Tasks: the HA loop (this module; rejoining in `rejoin`, the server's
//! process in `supervise`), the lease keeper (`lease`), the publisher, which
//! writes the latest report every second even while the loop is busy with a
//! long action such as a base backup, the fencing feeder (`watchdog`) and the
//! primary's self-probe (`probe`).

pub mod api;
pub mod lease;
mod probe;
mod rejoin;
mod report;
mod supervise;
pub mod watchdog;

use std::collections::VecDeque;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Epoch, HistoryEntry, Lsn, MemberStatus, Optime, PromotionKind, Role, SwitchoverRequest};
use crate::config::{Config, Secrets};
use crate::coord::{Coord, Snapshot};
use crate::failover::{self, Action, AfterRewindFailure, Candidate, LastPrimary, Local, NodeView, Policy, Shared};
use crate::postgres::files::{self, StartAs};
use crate::postgres::spawner::Spawner;
use crate::postgres::Server;
use lease::LeaseKeeper;

/// How often the HA loop runs.
const TICK: Duration = Duration::from_secs(1);
/// How often it runs while the cluster has no leader.
const FAST_TICK: Duration = Duration::from_millis(200);
/// A server that crashes more often than this within `CRASH_WINDOW` is left stopped.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(300);
/// How often the primary checks that etcd's leader is outside its region.
const ETCD_LEADER_CHECK: Duration = Duration::from_secs(5);
/// A standby not streaming for this long, on a timeline behind the leader's, is rewound.
const STALL_AFTER: Duration = Duration::from_secs(5);
/// How long an upstream has to answer before a rewind against it is tried.
const UPSTREAM_PROBE: Duration = Duration::from_secs(2);
/// After a failed rewind, the copy runs as a standby this long before the next try.
const REWIND_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Shutdown {
    /// SIGINT: sessions end, a shutdown checkpoint is written and sent to standbys.
    Fast,
    /// SIGQUIT: stop now; crash recovery at the next start.
    Immediate,
}

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
    /// The last observation of the running server.
    last_local: Option<crate::postgres::status::LocalStatus>,
    /// Since when a running standby has not been streaming.
    not_streaming_since: Option<Instant>,
    /// The etcd revision at which this agent first saw no leader; None while there is one.
    leaderless_since_revision: Option<i64>,
    /// Stops a read-write server the moment its lease goes stale.
    watchdog: watchdog::Watchdog,
    /// When the primary last checked where etcd's leader is.
    etcd_leader_checked: Option<Instant>,
    /// After a failed rewind: not before this instant again.
    rewind_retry_at: Option<Instant>,
    /// Set by the self-probe when the primary's server hung (see `probe`);
    /// cleared once `leader` is released after the server is gone.
    hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
    server.recover_swap()?;
    server.prepare_dirs()?;

    let coord = Coord::connect(&config).await?;
    let Some(lease) = LeaseKeeper::start(coord.clone(), config.failover.lease_ttl, shutdown.clone()).await else {
        return Ok(());
    };
    let (latest, latest_rx) = watch::channel(None);
    // Peers take a refused connection on this API as proof that the agent (and
    // so its PostgreSQL) is dead: if the API stops, the agent stops with it.
    let api_shutdown = shutdown.clone();
    let api_rx = latest_rx.clone();
    tokio::spawn(async move {
        api::serve(api, api_rx, api_shutdown.clone()).await;
        api_shutdown.cancel();
    });
    tokio::spawn(publish_loop(coord.clone(), lease.clone(), latest_rx, shutdown.clone()));

    let watchdog = watchdog::Watchdog::start(lease.clone(), shutdown.clone());
    let probe_timeout = config.failover.probe_timeout();
    let hung = probe::start(server.clone(), watchdog.clone(), lease.clone(), probe_timeout, shutdown.clone());
    let mut agent = Agent {
        config,
        secrets,
        region,
        server,
        coord,
        spawner: Spawner::start(),
        running: None,
        crashes: VecDeque::new(),
        fenced: false,
        epoch_seen: 0,
        detail: None,
        latest,
        last_local: None,
        not_streaming_since: None,
        leaderless_since_revision: None,
        etcd_leader_checked: None,
        rewind_retry_at: None,
        watchdog,
        hung,
        lease,
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
        // Without a leader every second counts: look (and report) five times as often.
        let tick = if agent.leaderless_since_revision.is_some() { FAST_TICK } else { TICK };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
    agent.shutdown().await;
    Ok(())
}

/// Writes each new report as soon as it is made, and the latest one again every
/// second (so a long action does not make the node look dead), under the current lease.
async fn publish_loop(
    coord: Coord,
    lease: LeaseKeeper,
    mut latest: watch::Receiver<Option<MemberStatus>>,
    shutdown: CancellationToken,
) {
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = latest.changed() => if changed.is_err() { return },
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
            self.leaderless_since_revision = match (&s.leader, self.leaderless_since_revision) {
                (Some(_), _) => None,
                (None, Some(t)) => Some(t),
                (None, None) => Some(s.revision),
            };
        }
        if self.release_after_hang(snapshot.as_ref()).await {
            return Ok(()); // the snapshot predates the release: look again
        }
        let view = self.view(snapshot.as_ref());
        let action = failover::decide(&view);
        // A detail describes the current situation only; actions set it anew.
        self.detail = None;
        if !matches!(action, Action::Keep | Action::Wait { .. }) {
            tracing::info!("{:?} -> {action:?}", view.local);
        }
        self.act(action, snapshot.as_ref()).await?;
        self.report(snapshot.as_ref()).await;
        // Right after observing, so the recorded position is as fresh as the report.
        if self.latest.borrow().as_ref().is_some_and(|r| r.role == Role::Primary) {
            self.record_optime(snapshot.as_ref()).await?;
            self.place_etcd_leader().await;
            if let Some(s) = &snapshot {
                self.apply_synchronous_standbys(s).await?;
            }
        }
        Ok(())
    }

    /// Once the supervisor has stopped a hung primary's server, `leader` is
    /// released so a standby takes over now rather than when the abandoned
    /// lease expires.
    async fn release_after_hang(&mut self, snapshot: Option<&Snapshot>) -> bool {
        use std::sync::atomic::Ordering;
        if !self.hung.load(Ordering::SeqCst) || self.running.is_some() {
            return false;
        }
        let me = self.server.node.clone();
        if let Some(l) = snapshot.and_then(|s| s.leader.as_ref()).filter(|l| l.leader.node == me) {
            match self.coord.release_leader(&me, l.leader.epoch).await {
                Ok(_) => {
                    tracing::warn!("released leader of epoch {} after the server hung", l.leader.epoch);
                    self.lease.resume();
                }
                Err(e) => tracing::warn!("failed to {e:#}; leader expires with the abandoned lease"),
            }
        } else if snapshot.is_some() {
            self.lease.resume(); // leader is not ours (any more): nothing to take with the lease
        }
        self.hung.store(false, Ordering::SeqCst);
        true
    }

    /// On the primary: names the standbys commits wait for (`[replication]
    /// synchronous`), among those that stream from it now, and reloads when
    /// that changed. Without a view of etcd the set is left as it is: a
    /// partitioned primary keeps waiting for its synchronous standby, so it
    /// acknowledges nothing that a failover elsewhere would lose.
    async fn apply_synchronous_standbys(&mut self, s: &Snapshot) -> Result<()> {
        let me = self.server.node.clone();
        let streaming: Vec<&str> = s
            .members
            .iter()
            .filter(|m| {
                m.role == Role::Replica && m.healthy && m.upstream.as_deref() == Some(me.as_str()) && m.is_fresh()
            })
            .map(|m| m.node.as_str())
            .collect();
        let names = crate::config::synchronous_standby_names(&self.config, &me, &streaming);
        if self.server.set_synchronous_standby_names(names.as_deref())? {
            tracing::info!("synchronous standbys: {}", names.as_deref().unwrap_or("none (asynchronous)"));
            self.client().await?.batch_execute("SELECT pg_reload_conf()").await.context("reload the configuration")?;
        }
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
        let local_timeline = match local {
            // The control file is only trustworthy for a stopped server.
            Local::Stopped => self.server.control_timeline().ok(),
            _ => self.last_local.as_ref().and_then(|l| l.timeline),
        };
        let shared = snapshot.map(|s| {
            let leader_report = s.leader.as_ref().and_then(|l| s.members.iter().find(|m| m.node == l.leader.node));
            let candidates = s
                .members
                .iter()
                .filter(|m| m.is_fresh())
                .filter(|m| matches!(m.role, Role::Replica | Role::Fenced))
                .filter_map(|m| {
                    let (region, _) = self.config.node(&m.node).ok()?;
                    Some(Candidate {
                        node: m.node.clone(),
                        region: region.name.clone(),
                        priority: region.priority.unwrap_or(u32::MAX),
                        lsn: m.write_lsn.or(m.replay_lsn)?,
                        replay_lsn: m.replay_lsn?,
                        lag_seconds: m.lag_seconds,
                        timeline: m.timeline,
                        reported_revision: m.revision,
                    })
                })
                .collect();
            let last_primary =
                s.optime.as_ref().map(|o| LastPrimary { node: o.node.clone(), region: o.region.clone(), lsn: o.lsn });
            Shared {
                leader: s.leader.as_ref().map(|l| l.leader.clone()),
                leader_is_my_lease: s.leader.as_ref().is_some_and(|l| l.lease == self.lease.id()),
                leader_ready: leader_report.is_some_and(|m| m.role == Role::Primary && m.healthy),
                leader_timeline: leader_report.and_then(|m| m.timeline),
                epoch: s.epoch,
                initialized_by: s.initialized_by.clone(),
                candidates,
                last_primary,
                leaderless_since_revision: self.leaderless_since_revision,
                switchover: s.switchover.clone().filter(|sw| sw.aborted.is_none()),
                dr: s.dr.clone().filter(|d| d.done_epoch.is_none()),
            }
        });
        let f = &self.config.failover;
        NodeView {
            me: self.server.node.clone(),
            bootstrap_node: self.config.bootstrap_node().is_some_and(|n| n.name == self.server.node),
            local,
            local_timeline,
            stalled: self.not_streaming_since.is_some_and(|t| t.elapsed() >= STALL_AFTER),
            shared,
            lease_fresh: self.lease.is_fresh(),
            policy: Policy {
                within_region: f.within_region,
                cross_region: f.cross_region,
                max_lag: f.max_lag_on_failover,
            },
        }
    }

    async fn act(&mut self, action: Action, snapshot: Option<&Snapshot>) -> Result<()> {
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
        // Immediate: a fast shutdown waits for walsenders to send the shutdown
        // checkpoint, which a partitioned standby may never acknowledge.
        self.stop_as(Shutdown::Immediate).await;
        let leader = snapshot.and_then(|s| s.leader.as_ref()).map(|l| l.leader.node.clone());
        let upstream = leader.filter(|n| *n != self.server.node).map(|n| self.upstream(&n)).transpose()?;
        self.start(StartAs::Standby { upstream }).await
    }

    /// Takes `leader` with the next epoch (unless this node already holds it),
    /// promotes, and records the promotion in `history/<epoch>`.
    async fn promote(&mut self, kind: PromotionKind, reason: &str, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(snap) = snapshot else { return Ok(()) };
        let me = self.server.node.clone();
        let held = snap.leader.as_ref().filter(|l| l.leader.node == me && l.lease == self.lease.id());
        let epoch = match held {
            Some(l) => l.leader.epoch,
            None => match self.coord.acquire_leader(&me, snap.epoch, self.lease.id()).await? {
                Some(e) => e,
                None => return Ok(()), // another node won this epoch; the next pass follows it
            },
        };
        self.epoch_seen = self.epoch_seen.max(epoch);
        tracing::info!("promoting to primary of epoch {epoch}: {reason}");
        let watchdog = self.watchdog.clone();
        let client = self.client().await?;
        let lsn: Option<String> = client
            .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
            .await
            .context("read the received WAL position")?
            .get(0);
        // Armed before the server can accept a write; a failed promotion disarms below.
        watchdog.guard();
        let promoted: bool = match client.query_one("SELECT pg_promote(true, 60)", &[]).await {
            Ok(row) => row.get(0),
            Err(e) => {
                watchdog.release();
                return Err(e).context("promote PostgreSQL");
            }
        };
        if !promoted {
            bail!("pg_promote did not finish within 60s; see {}", self.server.log_path().display());
        }
        // The new timeline reaches the control file only at the next checkpoint;
        // until then pg_rewind on a former primary would see "same timeline" and
        // do nothing. So checkpoint now.
        client.batch_execute("CHECKPOINT").await.context("checkpoint after promotion")?;
        // Slots before the first report as primary: followers repoint only then.
        self.ensure_slots().await?;
        if let Some(r) = self.running.as_mut() {
            r.start = StartAs::Primary;
        }
        self.fenced = false;
        let lsn = lsn.and_then(|l| l.parse::<Lsn>().ok());
        let last = snap.optime.as_ref();
        let lost = match (last, lsn) {
            (Some(o), Some(l)) => Some(o.lsn.0.saturating_sub(l.0)),
            _ => None,
        };
        // When it began: the request for operator actions, the old primary's last sign for a failover.
        let (started_at_ms, lost) = match kind {
            PromotionKind::Switchover => (snap.switchover.as_ref().map(|r| r.requested_at_ms), Some(0)),
            PromotionKind::Dr => (snap.dr.as_ref().map(|d| d.at_ms), lost),
            PromotionKind::Failover => (last.map(|o| o.at_ms), lost),
        };
        let entry = HistoryEntry {
            epoch,
            kind,
            from: last.map(|o| o.node.clone()),
            to: me.clone(),
            reason: reason.to_string(),
            lsn,
            lost_bytes_estimate: lost,
            started_at_ms: started_at_ms.unwrap_or_else(crate::cluster::now_ms),
            finished_at_ms: crate::cluster::now_ms(),
        };
        tracing::info!("promoted: primary of epoch {epoch} ({kind})");
        self.coord.put_history(&entry).await?;
        // The request is carried out: clear it so it cannot act again.
        match kind {
            PromotionKind::Switchover => {
                if let Some(sw) = &snap.switchover {
                    self.coord.update_switchover(sw, None).await?;
                }
            }
            PromotionKind::Dr => {
                if let Some(dr) = &snap.dr {
                    self.coord.complete_dr(dr, epoch).await?;
                }
            }
            PromotionKind::Failover => {}
        }
        Ok(())
    }

    /// Planned switchover on the old primary: stop cleanly (the shutdown
    /// checkpoint streams to the standbys), record that checkpoint, wait until
    /// the target has replayed it, and only then release `leader`. If the target
    /// does not catch up by the deadline, start again as primary (this node never
    /// gave up `leader`) and mark the request aborted.
    async fn hand_over(&mut self, to: &str, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(sw) = snapshot.and_then(|s| s.switchover.clone()) else { return Ok(()) };
        let Some(leader) = snapshot.and_then(|s| s.leader.as_ref()).map(|l| l.leader.clone()) else { return Ok(()) };
        tracing::info!("switchover to {to}: stopping cleanly");
        self.set_starting(&format!("handing over to {to}"));
        // From when this node stops taking writes, by its own monotonic clock.
        let deadline = Instant::now() + Duration::from_millis(sw.timeout_ms);
        self.stop().await;
        let final_lsn = self.server.control_checkpoint()?;
        let recorded = SwitchoverRequest { final_lsn: Some(final_lsn), ..sw.clone() };
        if !self.coord.update_switchover(&sw, Some(&recorded)).await? {
            tracing::warn!("the switchover request changed under us; staying primary");
            return self.start(StartAs::Primary).await;
        }
        loop {
            let replayed = self
                .coord
                .snapshot()
                .await
                .ok()
                .and_then(|s| s.members.into_iter().find(|m| m.node == to))
                .and_then(|m| m.replay_lsn);
            // final_lsn is where the checkpoint record starts; replay has passed it
            // only when the end of the last replayed record lies beyond.
            if replayed.is_some_and(|r| r > final_lsn) {
                break;
            }
            if Instant::now() >= deadline {
                let why = format!("{to} had not replayed the old primary's final checkpoint {final_lsn} by the deadline (replayed {replayed:?})");
                tracing::warn!("switchover aborted: {why}; starting again as primary");
                self.start(StartAs::Primary).await?;
                let aborted = SwitchoverRequest { aborted: Some(why), ..recorded.clone() };
                self.coord.update_switchover(&recorded, Some(&aborted)).await?;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.coord.release_leader(&self.server.node, leader.epoch).await?;
        tracing::info!("switchover: {to} has replayed up to {final_lsn}; released leader");
        Ok(())
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

    /// Every few seconds, the primary makes sure etcd's leader is not in its own
    /// region (see `Coord::keep_etcd_leader_away`). Best effort: a failure only
    /// makes a region loss slower to recover from, never unsafe.
    async fn place_etcd_leader(&mut self) {
        if self.etcd_leader_checked.is_some_and(|t| t.elapsed() < ETCD_LEADER_CHECK) {
            return;
        }
        self.etcd_leader_checked = Some(Instant::now());
        let avoid: Vec<String> =
            self.config.region(&self.region).ok().and_then(|r| r.etcd.clone()).into_iter().collect();
        // Best of all in a witness region: then losing any database region,
        // not only the primary's, costs no etcd election (which could delay
        // the primary's lease renewals long enough to fence it).
        let prefer: Vec<String> =
            self.config.regions.iter().filter(|r| r.nodes.is_empty()).filter_map(|r| r.etcd.clone()).collect();
        match self.coord.keep_etcd_leader_away(&avoid, &prefer).await {
            Ok(Some(to)) => tracing::info!("moved etcd leadership to {to}, away from {}", self.region),
            Ok(None) => {}
            Err(e) => tracing::warn!("failed to {e:#}"),
        }
    }

    /// The leader writes its position every pass, so that survivors can measure
    /// their lag against it once it is gone.
    async fn record_optime(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(local) = &self.last_local else { return Ok(()) };
        let (Some(lsn), Some(leader)) = (local.write_lsn, snapshot.and_then(|s| s.leader.as_ref())) else {
            return Ok(());
        };
        let optime = Optime {
            node: self.server.node.clone(),
            region: self.region.clone(),
            epoch: leader.leader.epoch,
            lsn,
            timeline: local.timeline,
            at_ms: crate::cluster::now_ms(),
        };
        self.coord.put_optime(&optime).await?;
        Ok(())
    }

    /// A leader whose agent API and PostgreSQL port both refuse connections has
    /// no agent, hence no PostgreSQL (parent-death signal): remove it now rather
    /// than wait for its lease to expire. A partition drops packets instead,
    /// which times out and leaves the lease to expire as usual.
    async fn depose_dead_leader(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(entry) = snapshot.and_then(|s| s.leader.as_ref()) else { return Ok(()) };
        if entry.leader.node == self.server.node {
            return Ok(());
        }
        let (_, node) = self.config.node(&entry.leader.node)?;
        if !(refuses(node.api).await && refuses(node.address).await) {
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

/// A TCP connection attempt is actively refused (nothing listens there), as
/// opposed to accepted, or dropped by a partition.
async fn refuses(addr: std::net::SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn describe(start: &StartAs) -> String {
    match start {
        StartAs::Primary => "primary".into(),
        StartAs::Standby { upstream: Some((n, _)) } => format!("standby of {n}"),
        StartAs::Standby { upstream: None } => "standby with no upstream".into(),
    }
}
