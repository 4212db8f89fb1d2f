//! The node's report (`members/<node>`): role, positions, lag, health.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::lease::LeaseKeeper;
use crate::cluster::{now_ms, Lsn, MemberStatus, Role};
use crate::coord::{Coord, Snapshot};
use crate::postgres::files::StartAs;
use crate::postgres::status::{self, LocalStatus};

use super::{Agent, Running, TICK};

/// Writes each new report as soon as it is made, and the latest one again every
/// second (so a long action does not make the node look dead), under the current lease.
pub(super) async fn publish_loop(
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
        report.updated_at_ms = now_ms();
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
    pub(super) fn base_report(&self, role: Role) -> MemberStatus {
        MemberStatus {
            node: self.server.node.clone(),
            region: self.region.clone(),
            role,
            timeline: None,
            write_lsn: None,
            flush_lsn: None,
            replay_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            upstream: None,
            epoch_seen: self.epoch_seen,
            healthy: false,
            detail: self.detail.clone().or_else(|| self.waiting.as_ref().map(|w| w.to_string())),
            waiting: self.waiting.clone(),
            failure: self.failures.current().cloned(),
            cert_not_after: self.certificate_not_after(),
            archive: self.archive_report(),
            commit_hold: self.commit_hold.clone(),
            config_version: self.published.version,
            pending_restart: self.pending_restart(),
            restarted_for: self.restarts.restarted_for.clone(),
            hung_recently: self.hung_at.is_some_and(|t| t.elapsed() < super::HANG_STAND_ASIDE),
            updated_at_ms: now_ms(),
            unchanged_ms: 0,
            revision: 0,
        }
    }

    /// Observes the server and makes the latest report available to the publisher and the API.
    pub(super) async fn report(&mut self, snapshot: Option<&Snapshot>) {
        self.report_edited(snapshot, |_| {}).await
    }

    /// Reports, changing the report with `edit` before anyone can read it.
    pub(super) async fn report_edited(&mut self, snapshot: Option<&Snapshot>, edit: impl FnOnce(&mut MemberStatus)) {
        let report = match self.observe().await {
            None => self.base_report(if self.server.is_initialized() { Role::Stopped } else { Role::Starting }),
            Some(Err(e)) => {
                let mut r = self.base_report(Role::Starting);
                r.detail = Some(format!("PostgreSQL does not answer: {e:#}"));
                r
            }
            Some(Ok(local)) => {
                let streaming = local.receiver_status.as_deref() == Some("streaming");
                if streaming || !local.in_recovery {
                    self.not_streaming_since = None;
                } else if self.not_streaming_since.is_none() {
                    self.not_streaming_since = Some(std::time::Instant::now());
                }
                let r = self.report_from(&local, snapshot);
                self.last_local = Some(local);
                r
            }
        };
        if report.role == Role::Stopped || report.role == Role::Starting {
            self.last_local = None;
        }
        let mut report = report;
        self.mark_leaving(&mut report);
        edit(&mut report);
        self.latest.send_replace(Some(report));
    }

    async fn observe(&mut self) -> Option<anyhow::Result<LocalStatus>> {
        self.running.as_ref()?;
        Some(match self.client().await {
            Ok(c) => status::query(c).await,
            Err(e) => Err(e),
        })
    }

    fn report_from(&mut self, local: &LocalStatus, snapshot: Option<&Snapshot>) -> MemberStatus {
        let upstream = match self.running.as_ref().map(|r| &r.start) {
            Some(StartAs::Standby { upstream: Some((n, _)) }) => Some(n.clone()),
            _ => None,
        };
        let streaming = local.receiver_status.as_deref() == Some("streaming");
        if streaming {
            self.fenced = false;
        }
        let is_primary = matches!(self.running, Some(Running { start: StartAs::Primary, .. })) && !local.in_recovery;
        let role = match (is_primary, self.fenced) {
            (true, _) => Role::Primary,
            (false, true) => Role::Fenced,
            (false, false) => Role::Replica,
        };
        // The leader's last published position; our own received WAL if that is newer.
        let leader_lsn = snapshot
            .and_then(|s| s.leader.as_ref())
            .and_then(|l| snapshot?.members.iter().find(|m| m.node == l.leader.node))
            .and_then(|m| m.write_lsn);
        let (lag_bytes, lag_seconds) = if is_primary {
            (Some(0), Some(0.0))
        } else {
            lag(local.replay_lsn, leader_lsn.max(local.write_lsn), local.replay_age_seconds)
        };
        let mut r = self.base_report(role);
        r.timeline = local.timeline;
        r.write_lsn = local.write_lsn;
        r.flush_lsn = local.flush_lsn;
        r.replay_lsn = local.replay_lsn;
        r.lag_bytes = lag_bytes;
        r.lag_seconds = lag_seconds;
        r.upstream = upstream.clone();
        r.healthy = is_primary || streaming;
        if !r.healthy && r.detail.is_none() {
            r.detail = Some(match (&upstream, &local.receiver_status) {
                (None, _) => "standby with no leader to follow".into(),
                (Some(u), None) => format!("not streaming from {u}"),
                (Some(u), Some(s)) => format!("walreceiver {s} from {u}"),
            });
        }
        r
    }
}

/// Lag behind the leader: bytes of WAL not yet replayed, and seconds since the
/// last replayed commit (0 when nothing is left to replay).
pub fn lag(replay: Option<Lsn>, target: Option<Lsn>, replay_age: Option<f64>) -> (Option<u64>, Option<f64>) {
    let Some(replay) = replay else { return (None, None) };
    let bytes = target.map(|t| t.0.saturating_sub(replay.0));
    let seconds = match bytes {
        Some(0) => Some(0.0),
        _ => replay_age.map(|a| a.max(0.0)),
    };
    (bytes, seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_and_age_otherwise() {
        assert_eq!(lag(Some(Lsn(100)), Some(Lsn(100)), Some(42.0)), (Some(0), Some(0.0)));
        assert_eq!(lag(Some(Lsn(100)), Some(Lsn(164)), Some(2.5)), (Some(64), Some(2.5)));
        assert_eq!(
            lag(Some(Lsn(200)), Some(Lsn(100)), None),
            (Some(0), Some(0.0)),
            "a stale leader position is not negative lag"
        );
        assert_eq!(lag(None, Some(Lsn(100)), None), (None, None));
    }
}
