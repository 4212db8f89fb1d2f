//! Health checks with Route 53's semantics. Every gateway probes every leaf
//! check on its interval and publishes its verdict to `health/<check>/<region>`
//! under its own lease (so a dead gateway's verdicts vanish); `aggregate`
//! combines the verdicts of all observers. An observer's verdict changes only
//! after `failure_threshold` consecutive probes disagree with it, and `invert`
//! turns the probe's result around (the trigger-object pattern).

pub mod aggregate;
pub mod probe;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::lease::LeaseKeeper;
use crate::cluster::{now_ms, HealthReport};
use crate::config::{CheckKind, HealthCheck};
use crate::coord::Coord;
use crate::objects::ObjectRef;
use probe::ProbeContext;
use probe::Probed;

use super::view::View;

/// Verdicts are written again this often even when unchanged, so `at_ms` shows the observer is alive.
const REPUBLISH: Duration = Duration::from_secs(5);

/// How soon a pending check is probed again.
const PENDING_RETRY: Duration = Duration::from_millis(250);

/// One observer's running verdict on one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    healthy: Option<bool>,
    /// The latest probe results' direction and how many in a row.
    streak: (bool, u32),
}

impl Verdict {
    pub fn new() -> Verdict {
        Verdict { healthy: None, streak: (false, 0) }
    }

    /// The verdict so far; None before the first result that could be judged.
    pub fn current(&self) -> Option<bool> {
        self.healthy
    }

    /// Takes one probe result (already inverted if the check says so); returns the verdict.
    /// The first result decides at once; after that, `threshold` in a row change it.
    pub fn observe(&mut self, ok: bool, threshold: u32) -> bool {
        self.streak = if self.streak.0 == ok { (ok, self.streak.1.saturating_add(1)) } else { (ok, 1) };
        let healthy = match self.healthy {
            None => ok,
            Some(h) if h != ok && self.streak.1 >= threshold => ok,
            Some(h) => h,
        };
        self.healthy = Some(healthy);
        healthy
    }
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict::new()
    }
}

/// Starts the publisher and a prober per leaf check; the probers start again
/// with each cluster file version the view takes (checks come and go with
/// nodes). Returns at once.
pub async fn start(g: &crate::gateway::Gateway, shutdown: CancellationToken) {
    let (tx, rx) = mpsc::channel::<HealthReport>(256);
    let (config, identity, coord) = (g.config(), g.identity.clone(), g.coord.clone());
    let publisher_shutdown = shutdown.clone();
    tokio::spawn(async move {
        match LeaseKeeper::start(&config, &identity, publisher_shutdown.clone()).await {
            Ok(Some(lease)) => publish(coord, lease, rx, publisher_shutdown).await,
            Ok(None) => {}
            Err(e) => tracing::error!("failed to {e:#}; health verdicts are not published"),
        }
    });
    // The probers run on a runtime of their own, on a thread of their own:
    // a probe's login computes SCRAM's 4096 PBKDF2 rounds on the thread that
    // polls it, and on the proxy's workers that stalled relayed sessions (a
    // task in a blocked worker's LIFO slot is not stolen). Measured through
    // the writer port, debug build, one pgbench client at 200 tps: commits
    // stalled 40-160 ms every 2 s (the checks' interval); direct: none.
    let g = g.clone();
    let spawned = std::thread::Builder::new().name("health-probes".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(supervise_checks(g, tx, shutdown)),
            Err(e) => tracing::error!("failed to start the health probes' runtime: {e}; checks report nothing"),
        }
    });
    if let Err(e) = spawned {
        tracing::error!("failed to start the health probes' thread: {e}; checks report nothing");
    }
}

/// Runs the probers of the cluster file in force until a new version is taken, then starts them again.
async fn supervise_checks(g: crate::gateway::Gateway, tx: mpsc::Sender<HealthReport>, shutdown: CancellationToken) {
    let mut view = g.view.clone();
    loop {
        let (config, version) = {
            let v = view.borrow_and_update();
            (v.config.clone(), v.config_version)
        };
        let probers = shutdown.child_token();
        start_probers(&g, &config, &tx, &probers);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = view.changed() => if changed.is_err() { return },
            }
            if view.borrow().config_version != version {
                break;
            }
        }
        probers.cancel();
    }
}

fn start_probers(
    g: &crate::gateway::Gateway,
    config: &std::sync::Arc<crate::config::Config>,
    tx: &mpsc::Sender<HealthReport>,
    shutdown: &CancellationToken,
) {
    let identity = &g.identity;
    let leaves: Vec<HealthCheck> =
        config.health.checks.iter().filter(|c| c.kind != CheckKind::Calculated).cloned().collect();
    if leaves.is_empty() {
        return;
    }
    // https:// checks trust the cluster CA, as every meridian listener's client does.
    let https = match crate::tls::client_config(&identity.ca(), None) {
        Ok(tls) => Some(crate::client::Https { tls, token: None }),
        Err(e) => {
            tracing::error!("failed to load the cluster CA: {e:#}; https:// checks will report unhealthy");
            None
        }
    };
    for check in leaves {
        let object = match (check.kind, &check.target) {
            (CheckKind::ObjectExists, Some(url)) => match ObjectRef::open(url, &config.object_store) {
                Ok(o) => Some(o),
                Err(e) => {
                    tracing::error!("failed to {e:#}; check {} will report unhealthy", check.name);
                    None
                }
            },
            _ => None,
        };
        let ctx = ProbeContext {
            monitor_user: config.postgres.monitor_user.clone(),
            monitor_password: g.secrets.monitor_password.clone(),
            object,
            https: https.clone(),
            pg_tls: g.pg_tls.clone(),
            backup: config.backup.as_ref().map(|_| (config.clone(), g.secrets.clone(), identity.ca())),
        };
        tokio::spawn(run_check(check, ctx, g.region.clone(), g.view.clone(), tx.clone(), shutdown.clone()));
    }
}

async fn run_check(
    check: HealthCheck,
    ctx: ProbeContext,
    observer: String,
    view: watch::Receiver<View>,
    tx: mpsc::Sender<HealthReport>,
    shutdown: CancellationToken,
) {
    let mut verdict = Verdict::new();
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While pending (nothing to judge by yet, e.g. before this gateway's first
    // view of etcd), look again soon rather than a whole interval later.
    let mut pending_retry = false;
    loop {
        let soon = tokio::time::sleep(PENDING_RETRY.min(check.interval));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            _ = soon, if pending_retry => {}
        }
        let snapshot = view.borrow().snapshot.clone();
        let probed = match tokio::time::timeout(check.timeout, probe::probe(&check, &ctx, Some(&snapshot))).await {
            Ok(r) => r,
            Err(_) => Probed::Failed(format!("no answer within {}", humantime::format_duration(check.timeout))),
        };
        // No data to judge by leaves the verdict as it was; before any, the check is pending.
        let (healthy, pending, detail) = match probed {
            Probed::Passed(d) => (verdict.observe(!check.invert, check.failure_threshold), false, d),
            Probed::Failed(d) => (verdict.observe(check.invert, check.failure_threshold), false, d),
            Probed::NoData(d) => match verdict.current() {
                Some(h) => (h, false, d),
                None => (false, true, d),
            },
        };
        pending_retry = pending;
        let detail = if check.invert { format!("{detail} (inverted)") } else { detail };
        let report = HealthReport {
            check: check.name.clone(),
            observer: observer.clone(),
            healthy,
            pending,
            detail,
            at_ms: now_ms(),
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

/// Writes a verdict when it changes, and every verdict again every few seconds and whenever the lease changed.
async fn publish(coord: Coord, lease: LeaseKeeper, mut rx: mpsc::Receiver<HealthReport>, shutdown: CancellationToken) {
    let mut published: BTreeMap<String, (HealthReport, i64, u64)> = BTreeMap::new();
    let mut last_error: Option<String> = None;
    loop {
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx.recv() => match r { Some(r) => r, None => return },
        };
        let lease_id = lease.id();
        let due = match published.get(&report.check) {
            None => true,
            Some((old, id, at)) => {
                old.healthy != report.healthy
                    || *id != lease_id
                    || report.at_ms.saturating_sub(*at) >= REPUBLISH.as_millis() as u64
            }
        };
        if !due {
            continue;
        }
        match coord.put_health(&report, lease_id).await {
            Ok(()) => {
                last_error = None;
                let at = report.at_ms;
                published.insert(report.check.clone(), (report, lease_id, at));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!("failed to {msg}");
                    last_error = Some(msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Verdict;

    #[test]
    fn the_first_result_decides_then_the_threshold_in_a_row() {
        let mut v = Verdict::new();
        assert!(v.observe(true, 3));
        assert!(v.observe(false, 3));
        assert!(v.observe(false, 3));
        assert!(v.observe(true, 3), "a success breaks the streak");
        assert!(v.observe(false, 3));
        assert!(v.observe(false, 3));
        assert!(!v.observe(false, 3), "three failures in a row");
        assert!(!v.observe(true, 3));
        let mut once = Verdict::new();
        assert!(!once.observe(false, 1));
        assert!(once.observe(true, 1), "threshold 1 follows every result");
    }
}
