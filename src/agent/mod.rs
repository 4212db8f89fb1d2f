//! The node agent: owns one PostgreSQL server and runs the HA loop.
//!
//! The agent is a thin shell around pure decisions. Every tick it observes
//! (`observe`: its server, etcd), builds the view with
//! `failover::view::build`, asks `failover::decide` what to do, does it
//! (`act`, `promote`, `rejoin`), carries out the primary's duties
//! (`primary`) and publishes the node's report (`report`) to
//! `members/<node>` under its lease. The rules outside `decide` (crash
//! limits, dead leaders, synchronous standbys, switchover waits, clearing
//! carried-out requests, retry pauses) live in `failover::duties`.
//!
//! The postmaster runs under a supervisor process (`postgres::supervisor`)
//! that the agent starts with a parent-death signal (`supervise`): a dead
//! agent means a stopped server, and a frozen one still gets its primary
//! fenced.
//!
//! Tasks: the HA loop (this module), the publisher (`report::publish_loop`),
//! which rewrites the latest report every second even while the loop is busy
//! with a long action such as a base backup, the API (`api`) and the
//! primary's self-probe (`probe`) run on the runtime; the lease keeper
//! (`lease`) and the fencing feeder (`watchdog`) run on threads of their own,
//! so a runtime whose workers are blocked cannot delay a renewal or a fence.

mod act;
pub mod api;
mod backup;
mod backup_job;
mod certs;
mod clone;
pub mod commit_lag;
pub mod lease;
mod observe;
mod phase;
mod primary;
mod probe;
mod promote;
mod published;
mod rejoin;
mod report;
mod restart;
mod supervise;
pub mod wake;
pub mod watchdog;

use std::process::Child;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Epoch, MemberStatus, Role};
use crate::config::{Config, Secrets};
use crate::coord::{Coord, Snapshot};
use crate::failover::duties::{Crashes, Failures};
use crate::failover::{self, Action, WaitReason};
use crate::postgres::files::StartAs;
use crate::postgres::spawner::Spawner;
use crate::postgres::Server;
use lease::LeaseKeeper;

/// How often the HA loop runs.
const TICK: Duration = Duration::from_secs(1);
/// How often it runs while the cluster has no leader.
const FAST_TICK: Duration = Duration::from_millis(200);
/// For this long after its server hung as primary, a node reports so
/// (`MemberStatus::hung_recently`) and is promoted only when no other standby
/// may be: whatever hung it (a disk, the kernel) may hang it again, though
/// its restarted server looks fine and has the most WAL.
pub const HANG_STAND_ASIDE: Duration = Duration::from_secs(60);
// A primary riding out a silence of etcd must be able to tick once more and
// cut its read short before its lease's time to spare is gone.
const _: () =
    assert!(TICK.as_millis() + failover::view::READ_SPARE.as_millis() <= failover::view::SILENCE_SPARE.as_millis());

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
    crashes: Crashes,
    /// Set when this node fenced itself; cleared once it streams from a leader.
    fenced: bool,
    /// The highest epoch seen in etcd.
    epoch_seen: Epoch,
    /// What the node is doing or why it is unhealthy, for the report.
    detail: Option<String>,
    /// Why the node waits, as a type, for the report.
    waiting: Option<WaitReason>,
    /// The last failed action, for the report and the retry pause.
    failures: Failures,
    /// The latest report, for the publisher and the API.
    latest: watch::Sender<Option<MemberStatus>>,
    /// The last observation of the running server.
    last_local: Option<crate::postgres::status::LocalStatus>,
    /// Since when a running standby has not been streaming.
    not_streaming_since: Option<Instant>,
    /// The etcd revision at which this agent first saw no leader; None while there is one.
    leaderless_since_revision: Option<i64>,
    /// When the supervisor stopped this node's hung primary (`HANG_STAND_ASIDE`).
    hung_at: Option<Instant>,
    /// The lease this agent held `leader` under in the last etcd snapshot that answered.
    led_under: Option<crate::coord::LeaseId>,
    /// Stops a read-write server the moment its lease goes stale.
    watchdog: watchdog::Watchdog,
    /// When the primary last checked where etcd's leader is.
    etcd_leader_checked: Option<Instant>,
    /// After a failed rewind: not before this instant again.
    rewind_retry_at: Option<Instant>,
    /// pg_rewind proved this copy's history cannot be brought to the leader's:
    /// it starts on its own timeline until a rewind or a fresh copy replaces it.
    diverged: bool,
    /// Set by the self-probe when the primary's server hung (see `probe`);
    /// cleared once `leader` is released after the server is gone.
    hung: Arc<AtomicBool>,
    /// The primary's pgBackRest stanza (`[backup]`).
    archiving: backup::Archiving,
    /// The backup job this agent is carrying out.
    backup_job: Option<backup_job::RunningJob>,
    /// While primary with `max_commit_lag`: its WAL positions over time, and the guard's last verdict.
    commit_log: Option<commit_lag::PositionLog>,
    commit_hold: Option<commit_lag::CommitHold>,
    /// While primary: a change of the synchronous set the `sync` record does not show yet.
    sync_change: Option<primary::SyncChange>,
    /// The published cluster file's version this agent runs with.
    published: published::Published,
    /// Restart requests carried out, and the running and installed PostgreSQL versions.
    restarts: restart::Restarts,
    /// What the HA loop is doing, reported when it takes too long.
    phases: phase::Phases,
    /// Notified when a key of the switchover relay changes (see `wake`): the next pass starts at once.
    wake: Arc<tokio::sync::Notify>,
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
    let identity = server.tls.clone();
    let api_tls = crate::tls::server_config(&identity, crate::tls::ClientAuth::None)?;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.recover_swap().and_then(|()| s.prepare_dirs())).await??;

    let coord = Coord::connect(&config, &identity).await?;
    let Some(lease) = LeaseKeeper::start(&config, &identity, shutdown.clone()).await? else {
        return Ok(());
    };
    let (latest, latest_rx) = watch::channel(None);
    // Peers take a refused connection on this API as proof that the agent (and
    // so its PostgreSQL) is dead: if the API stops, the agent stops with it.
    let api_shutdown = shutdown.clone();
    let api_rx = latest_rx.clone();
    tokio::spawn(async move {
        api::serve(api, api_tls, api_rx, api_shutdown.clone()).await;
        api_shutdown.cancel();
    });
    tokio::spawn(report::publish_loop(coord.clone(), lease.clone(), latest_rx, shutdown.clone()));

    let probe_timeout = config.failover.probe_timeout();
    let watchdog = watchdog::Watchdog::start(lease.clone(), watchdog::starved_after(&config), shutdown.clone());
    probe::start(server.clone(), watchdog.clone(), probe_timeout, shutdown.clone());
    let hung = watchdog.hung();
    let wake = Arc::new(tokio::sync::Notify::new());
    wake::start(coord.clone(), wake.clone(), shutdown.clone());
    let mut agent = Agent {
        config,
        secrets,
        region,
        server,
        coord,
        spawner: Spawner::start(),
        running: None,
        crashes: Crashes::default(),
        fenced: false,
        epoch_seen: 0,
        detail: None,
        waiting: None,
        failures: Failures::default(),
        latest,
        last_local: None,
        not_streaming_since: None,
        leaderless_since_revision: None,
        led_under: None,
        hung_at: None,
        etcd_leader_checked: None,
        rewind_retry_at: None,
        diverged: false,
        watchdog,
        hung,
        lease,
        archiving: backup::Archiving::default(),
        backup_job: None,
        commit_log: None,
        commit_hold: None,
        sync_change: None,
        published: Default::default(),
        restarts: Default::default(),
        phases: phase::Phases::start(shutdown.clone()),
        wake,
    };
    tracing::info!("agent for {} started (lease {:x})", agent.server.node, agent.lease.id());
    // Run by the newest published cluster file from the first pass: the local
    // file may predate nodes that joined since (whose slots a primary keeps).
    if let Err(e) = agent.published_config_duties().await {
        agent.log_failure(&e);
    }
    let first = agent.read_snapshot().await;
    agent.restart_found_at_start(first.as_ref());
    while !shutdown.is_cancelled() && !agent.published.left {
        // A step may take long (a base backup); shutdown must not wait for it.
        tokio::select! {
            () = agent.step() => {}
            _ = shutdown.cancelled() => break,
        };
        // Without a leader every second counts: look (and report) five times as often.
        let tick = if agent.leaderless_since_revision.is_some() { FAST_TICK } else { TICK };
        agent.phases.enter("sleep between passes");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(tick) => {}
            () = agent.wake.notified() => {}
        }
    }
    agent.shutdown().await;
    Ok(())
}

impl Agent {
    /// One pass of the HA loop: observe, decide, act, report.
    async fn step(&mut self) {
        self.reap();
        self.phases.enter("read the etcd snapshot");
        let snapshot = self.read_snapshot().await;
        self.phases.enter("release leader after a hang");
        if self.release_after_hang(snapshot.as_ref()).await {
            return; // the snapshot predates the release: look again
        }
        self.phases.enter("leave the cluster");
        if self.leave_step(snapshot.as_ref()).await {
            self.phases.enter("report");
            self.report(snapshot.as_ref()).await;
            self.phases.enter("published configuration duties");
            if let Err(e) = self.published_config_duties().await {
                self.log_failure(&e);
            }
            return;
        }
        self.phases.enter("catch up for a switchover");
        self.catch_up_for_switchover(snapshot.as_ref()).await;
        self.phases.enter("build the view");
        let view = self.view(snapshot.as_ref()).await;
        let action = failover::decide(&view);
        // A detail describes the current situation only; actions set it anew.
        self.detail = None;
        self.waiting = None;
        if !matches!(action, Action::Keep | Action::Wait { .. }) {
            tracing::info!("{:?} -> {action:?}", view.local);
            if let (Action::Promote { .. }, Some(s)) = (&action, &view.shared) {
                // What the choice was made from, for a postmortem.
                let seen: Vec<String> = s
                    .candidates
                    .iter()
                    .map(|c| {
                        format!(
                            "{} (received {}, replayed {}, timeline {:?}{})",
                            c.node,
                            c.lsn,
                            c.replay_lsn,
                            c.timeline,
                            if c.hung_recently { ", hung recently" } else { "" }
                        )
                    })
                    .collect();
                tracing::info!("candidates: {}", seen.join("; "));
            }
        } else if view.shared.is_none() && view.local == failover::Local::Primary {
            tracing::warn!(
                "etcd does not answer; still primary while the lease is provably alive (for {:?} more)",
                self.lease.fresh_until().saturating_duration_since(Instant::now())
            );
        } else if view.stalled {
            tracing::debug!(
                "not streaming for {:?} or more; timeline {:?}, the leader's {:?}: {action:?}",
                failover::view::STALL_AFTER,
                view.local_timeline,
                view.shared.as_ref().and_then(|s| s.leader_timeline)
            );
        }
        self.phases.enter(format!("act: {}", act::label(&action).unwrap_or_else(|| format!("{action:?}"))));
        let riding_out = snapshot.is_none() && view.local == failover::Local::Primary && action == Action::Keep;
        self.act_with_retry(action, snapshot.as_ref()).await;
        if riding_out {
            // A primary riding out a silence of etcd looks again after one tick:
            // the duties below need etcd, and each would wait its timeouts out.
            self.phases.enter("report");
            self.report(None).await;
            return;
        }
        self.phases.enter("refresh the certificate");
        if let Err(e) = self.refresh_certificate().await {
            self.log_failure(&e);
        }
        self.phases.enter("report");
        self.report(snapshot.as_ref()).await;
        self.phases.enter("backup job duties");
        self.backup_job_duties(snapshot.as_ref()).await;
        self.phases.enter("published configuration duties");
        if let Err(e) = self.published_config_duties().await {
            self.log_failure(&e);
        }
        self.phases.enter("check the installed version");
        self.check_installed_version().await;
        self.phases.enter("restart duties");
        if let Err(e) = self.restart_duties(snapshot.as_ref()).await {
            self.log_failure(&e);
        }
        // Right after observing, so the recorded position is as fresh as the report.
        if self.latest.borrow().as_ref().is_some_and(|r| r.role == Role::Primary) {
            self.phases.enter("primary duties");
            if let Err(e) = self.primary_duties(snapshot.as_ref()).await {
                self.log_failure(&e);
            }
        } else {
            // A primary again later starts a new log: its old one says nothing of the new server.
            self.commit_log = None;
            self.commit_hold = None;
            self.sync_change = None;
        }
    }

    /// Carries out `action` unless the same action failed and its retry pause
    /// has not passed; remembers a failure for the report.
    async fn act_with_retry(&mut self, action: Action, snapshot: Option<&Snapshot>) {
        let label = act::label(&action);
        if label.as_ref().is_some_and(|l| !self.failures.may_try(l, Instant::now())) {
            return;
        }
        let waits = matches!(action, Action::Wait { .. });
        match self.act(action, snapshot).await {
            Ok(()) if waits => {}
            Ok(()) => self.failures.succeeded(),
            Err(e) => {
                self.log_failure(&e);
                if let Some(label) = label {
                    let transient = crate::coord::is_unavailable(&e);
                    self.failures.failed(&label, format!("{e:#}"), transient, Instant::now());
                }
            }
        }
    }

    /// ERROR is for what a person should look at; etcd being briefly out of
    /// reach (an election, a partition) is the normal weather of a cluster.
    fn log_failure(&self, e: &anyhow::Error) {
        if expected_failure(e) {
            tracing::warn!("failed to {e:#}");
        } else {
            tracing::error!("failed to {e:#}");
        }
    }

    async fn shutdown(&mut self) {
        tracing::info!("shutting down");
        // Stop first: revoking the lease releases `leader` (it lives under the
        // lease), and nobody may be promoted while this server could still write.
        self.stop().await;
        if let Err(e) = self.coord.revoke_lease(self.lease.id()).await {
            tracing::warn!("failed to {e:#}");
        }
        self.stop_archivers().await;
    }
}

/// A failure that says nothing new, logged as a warning: etcd unavailable,
/// or our own server gone. A session to it that closed, or a connection it
/// refuses or whose socket is gone, means it stopped (fenced by the
/// supervisor at the lease's deadline while etcd was silent, or crashed); the
/// reaper says which at the next tick, with the level that deserves.
fn expected_failure(e: &anyhow::Error) -> bool {
    let from_postgres = |f: &dyn Fn(&tokio_postgres::Error) -> bool| {
        e.chain().any(|c| c.downcast_ref::<tokio_postgres::Error>().is_some_and(f))
    };
    let refused_or_gone = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    });
    crate::coord::is_unavailable(e)
        || from_postgres(&|p| p.is_closed())
        || (from_postgres(&|_| true) && refused_or_gone)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_connection_to_a_server_that_is_not_running_is_expected_other_failures_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tokio_postgres::Config::new();
        config.host_path(dir.path()).port(5432).user("meridian");
        let gone = config.connect(tokio_postgres::NoTls).await.map(|_| ()).unwrap_err();
        let e = anyhow::Error::new(gone).context(format!("connect to PostgreSQL over {}", dir.path().display()));
        assert!(super::expected_failure(&e), "{e:#}");
        let unrelated = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound)).context("read a file");
        assert!(!super::expected_failure(&unrelated), "a missing file elsewhere is an error: {unrelated:#}");
    }
}
