//! Changing who is primary: promotion, the planned switchover's hand-over,
//! and clearing requests that have been carried out.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Agent;
use crate::cluster::{HistoryEntry, Lsn, PromotionKind, RestoreStep, StartPosition, SwitchoverRequest};
use crate::coord::Snapshot;
use crate::failover::duties::{self, Completion, HandOver};
use crate::postgres::files::StartAs;

/// How long a switchover lets client transactions open on the old primary
/// finish; the proxies hold new ones meanwhile, so this adds to the write
/// pause only while a transaction is open.
const HAND_OVER_DRAIN: Duration = Duration::from_secs(1);
/// Bounds of the time the proxies are given to see that the old primary no
/// longer takes new transactions (its report, through etcd's watch) before
/// open transactions are counted: one begun after the count would be cut.
pub(super) const HAND_OVER_GRACE: (Duration, Duration) = (Duration::from_millis(30), Duration::from_secs(1));

/// The grace for a report that etcd committed in `committed`.
fn hand_over_grace(committed: Duration) -> Duration {
    (committed * 2 + Duration::from_millis(20)).clamp(HAND_OVER_GRACE.0, HAND_OVER_GRACE.1)
}
/// How often a switchover's target wakes its startup process while the old
/// primary's final checkpoint is not replayed yet.
const NUDGE_EVERY: Duration = Duration::from_millis(50);
/// How long a promotion may wait before the startup process is woken again.
const PROMOTE_ASK_AGAIN: Duration = Duration::from_millis(250);
/// How often the old primary looks whether the target has replayed its final checkpoint.
const HAND_OVER_POLL: Duration = Duration::from_millis(10);
/// How long a switchover's target waits, in one pass, to replay the old
/// primary's final checkpoint before it reports (normally milliseconds: the
/// old primary's shutdown waits until its standbys have received it).
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);
/// Client transactions open, and sessions begun in the last quarter second
/// (a client that just logged in, through a session-mode proxy before it
/// held, is about to send its first statement).
const OPEN_TRANSACTIONS: &str = "SELECT count(*) FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
   AND (xact_start IS NOT NULL OR backend_start > now() - interval '250 milliseconds')";

/// Timelines reserved at most up to this number (an epoch past it is not
/// expected; it would only cost the guarantee of distinct numbers).
const MAX_RESERVED_TIMELINE: u32 = 100_000;

/// How long a promotion may take to end recovery.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    /// Takes `leader` with the next epoch (unless this node already holds it),
    /// promotes, and records the promotion in `history/<epoch>`. The request
    /// that led here is cleared by `finish_requests`, on this tick and every
    /// later one until etcd shows it gone.
    pub(super) async fn promote(
        &mut self,
        kind: PromotionKind,
        reason: &str,
        snapshot: Option<&Snapshot>,
    ) -> Result<()> {
        let Some(snap) = snapshot else { return Ok(()) };
        let me = self.server.node.clone();
        let held = snap.leader.as_ref().filter(|l| l.leader.node == me && l.lease == self.lease.id());
        let epoch = match held {
            Some(l) => l.leader.epoch,
            None => match self.coord.acquire_leader(&me, snap.epoch, self.lease.id(), self.start_position()).await? {
                Some(e) => e,
                None => return Ok(()), // another node won this epoch; the next pass follows it
            },
        };
        self.epoch_seen = self.epoch_seen.max(epoch);
        tracing::info!("promoting to primary of epoch {epoch}: {reason}");
        let watchdog = self.watchdog.clone();
        let server = self.server.clone();
        let client = self.client().await?;
        let lsn: Option<String> = client
            .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
            .await
            .context("read the received WAL position")?
            .get(0);
        // A timeline number of its own: epoch N takes timeline N or later (see `postgres::timeline`).
        let at_least = u32::try_from(epoch).unwrap_or(u32::MAX).min(MAX_RESERVED_TIMELINE);
        let reserved = tokio::task::spawn_blocking(move || server.reserve_timelines(at_least)).await??;
        if !reserved.is_empty() {
            tracing::info!(
                "timeline numbers below {at_least} taken elsewhere or unused: placeholders for {}",
                reserved.len()
            );
        }
        // Armed before the server can accept a write; a failed promotion disarms below.
        watchdog.guard();
        // pg_promote(true) looks every 100 ms whether recovery ended; looking
        // every 5 ms takes up to a tenth of a second off every write pause.
        let asked = Instant::now();
        if let Err(e) = client.query_one("SELECT pg_promote(false)", &[]).await {
            watchdog.release();
            return Err(e).context("promote PostgreSQL");
        }
        let mut asked_again = Instant::now();
        loop {
            let in_recovery: bool =
                client.query_one("SELECT pg_is_in_recovery()", &[]).await.context("wait for the promotion")?.get(0);
            if !in_recovery {
                break;
            }
            // Measured once in 30 switchovers: a standby whose upstream had just
            // stopped sat out wal_retrieve_retry_interval (5 s) before it saw the
            // request. A reload's SIGHUP wakes the startup process, which then
            // finds the request (asking again with pg_promote would fail, and
            // log an ERROR, should the promotion end in between).
            if asked_again.elapsed() >= PROMOTE_ASK_AGAIN {
                asked_again = Instant::now();
                tracing::info!(
                    "still in recovery {:.1?} after the promote request; waking the startup process",
                    asked.elapsed()
                );
                if let Err(e) = client.batch_execute("SELECT pg_reload_conf()").await {
                    tracing::debug!("failed to wake the startup process: {e}");
                }
            }
            if asked.elapsed() > PROMOTE_TIMEOUT {
                bail!(
                    "PostgreSQL was still in recovery {PROMOTE_TIMEOUT:?} after the promote request; see {}",
                    self.server.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let out_of_recovery = asked.elapsed();
        if let Some(r) = self.running.as_mut() {
            r.start = StartAs::Primary;
        }
        self.fenced = false;
        self.diverged = false;
        // The proxies route writes here from this report on: make it at once.
        // Without a timeline: the control file does not have the new one
        // before the checkpoint below, and followers wait for it (`leader_ready`).
        self.report_edited(Some(snap), |r| r.timeline = None).await;
        let ready = asked.elapsed();
        let client = self.client().await?;
        // The new timeline reaches the control file only at the next checkpoint;
        // until then pg_rewind on a former primary would see "same timeline" and
        // do nothing. So checkpoint now.
        client.batch_execute("CHECKPOINT").await.context("checkpoint after promotion")?;
        let timeline: Option<i32> = client
            .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
            .await
            .context("read the new timeline")?
            .get(0);
        if timeline.is_some_and(|t| (t as u32) < at_least) {
            tracing::warn!(
                "promoted to timeline {} below epoch {epoch}: a later promotion may reuse its number",
                timeline.unwrap_or_default()
            );
        }
        // Slots before the first report with a timeline: followers repoint only then.
        self.ensure_slots().await?;
        self.report(Some(snap)).await;
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
            PromotionKind::Restore => (snap.restore.as_ref().map(|r| r.requested_at_ms), lost),
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
        tracing::info!(
            "promoted: primary of epoch {epoch} ({kind}); out of recovery in {out_of_recovery:.1?}, reported as primary after {ready:.1?}"
        );
        self.record_promotion(&entry).await;
        self.finish_requests(snap, Some(epoch)).await
    }

    /// Writes a promotion to `history/<epoch>` and the audit log. History is a
    /// record for people: a failed write is logged and does not stop the caller.
    async fn record_promotion(&self, entry: &HistoryEntry) {
        let me = &self.server.node;
        if let Err(e) = self.coord.put_history(entry).await {
            tracing::warn!("failed to {e:#}; the promotion is not in history");
        }
        let audit = crate::auth::AuditEntry {
            time_ms: entry.finished_at_ms,
            who: format!("agent:{me}"),
            role: None,
            source: None,
            action: format!("promote ({})", entry.kind),
            target: Some(format!("node:{me}")),
            result: "ok".into(),
            detail: Some(entry.reason.clone()),
            epoch: Some(entry.epoch),
            recorded_by: format!("node:{me}"),
        };
        tracing::info!(target: "meridian::audit", "{}", serde_json::to_string(&audit).unwrap_or_default());
        if let Err(e) = self.coord.append_audit(&audit).await {
            tracing::warn!("failed to {e:#}; the promotion is not in the audit log");
        }
    }

    /// This standby's received position (or replayed, when it has no
    /// walreceiver) as last observed: the first `optime` of the epoch it is
    /// about to lead. None when its server has not reported one.
    fn start_position(&self) -> Option<StartPosition> {
        let local = self.last_local.as_ref()?;
        Some(StartPosition {
            region: self.region.clone(),
            lsn: local.write_lsn.or(local.replay_lsn)?,
            timeline: local.timeline,
        })
    }

    /// `meridian restore --replace` left restored data here, promoted on a
    /// new timeline: take `leader` with the next epoch, start it read-write,
    /// give meridian's roles this cluster's passwords (the data may predate
    /// a change), and record it in history.
    pub(super) async fn take_restored(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(snap) = snapshot else { return Ok(()) };
        let Some(req) = snap.restore.as_ref() else { return Ok(()) };
        let RestoreStep::Restored { timeline, lsn } = &req.state else { return Ok(()) };
        let me = self.server.node.clone();
        let start = StartPosition { region: self.region.clone(), lsn: *lsn, timeline: Some(*timeline) };
        let Some(epoch) = self.coord.acquire_leader(&me, snap.epoch, self.lease.id(), Some(start)).await? else {
            return Ok(()); // someone else holds leader; the next pass sees why
        };
        self.epoch_seen = self.epoch_seen.max(epoch);
        tracing::info!(
            "starting the restored data (backup {}, {}) as primary of epoch {epoch}",
            req.backup,
            req.target
        );
        self.start(StartAs::Primary).await?;
        let roles = format!(
            "SET synchronous_commit = local;\n{}",
            crate::postgres::files::role_passwords_sql(&self.config, &self.secrets)
        );
        self.client().await?.batch_execute(&roles).await.context("set the passwords of meridian's roles")?;
        self.ensure_slots().await?;
        let last = snap.optime.as_ref();
        let entry = HistoryEntry {
            epoch,
            kind: PromotionKind::Restore,
            from: last.map(|o| o.node.clone()),
            to: me,
            reason: format!(
                "{} restored backup {} to {} (timeline {timeline}) as the cluster's data",
                req.requested_by, req.backup, req.target
            ),
            lsn: Some(*lsn),
            // What the replaced data had beyond the restore point.
            lost_bytes_estimate: last.map(|o| o.lsn.0.saturating_sub(lsn.0)),
            started_at_ms: req.requested_at_ms,
            finished_at_ms: crate::cluster::now_ms(),
        };
        tracing::info!("restored data started: primary of epoch {epoch} ({})", entry.kind);
        self.record_promotion(&entry).await;
        Ok(())
    }

    /// On the leader running read-write: clears the `switchover`/`dr`
    /// requests it carried out (or that can no longer be), by compare-and-swap.
    /// Called after a promotion and again on every tick, so a write that
    /// failed once is repaired on the next.
    pub(super) async fn finish_requests(&mut self, snap: &Snapshot, epoch: Option<u64>) -> Result<()> {
        let me = self.server.node.clone();
        let epoch = epoch.or_else(|| {
            snap.leader
                .as_ref()
                .filter(|l| l.leader.node == me && l.lease == self.lease.id() && l.leader.epoch == snap.epoch)
                .map(|l| l.leader.epoch)
        });
        for done in duties::completions(&me, epoch, snap.switchover.as_ref(), snap.dr.as_ref()) {
            match done {
                Completion::ClearSwitchover(sw) => {
                    if self.coord.update_switchover(&sw, None).await? {
                        tracing::info!("cleared the switchover request from {} to {}", sw.from, sw.to);
                    }
                }
                Completion::CompleteDr(dr, epoch) => {
                    if self.coord.complete_dr(&dr, epoch).await? {
                        tracing::info!("marked the DR switch to {} done in epoch {epoch}", dr.target);
                    }
                }
            }
        }
        Ok(())
    }

    /// Planned switchover on the old primary: stop cleanly (the shutdown
    /// checkpoint streams to the standbys), record that checkpoint, wait until
    /// the target has replayed it, and only then release `leader`. If the
    /// target does not catch up by the deadline, mark the request aborted and
    /// start read-write again only if etcd confirms, in the same transaction,
    /// that this node still holds `leader` of its epoch under its lease, and
    /// that lease is fresh; otherwise come back as a standby.
    pub(super) async fn hand_over(&mut self, to: &str, snapshot: Option<&Snapshot>) -> Result<()> {
        let Some(sw) = snapshot.and_then(|s| s.switchover.clone()) else { return Ok(()) };
        let Some(leader) = snapshot.and_then(|s| s.leader.as_ref()).map(|l| l.leader.clone()) else { return Ok(()) };
        // Writes go on while the checkpoint runs: it leaves the shutdown's own little to write.
        let checkpointed = self.checkpoint_before_hand_over().await;
        tracing::info!("switchover to {to}: {checkpointed}; holding new transactions and stopping cleanly");
        // The proxies hold new transactions once this report says the node is no
        // primary any more; those already open may finish before the fast shutdown ends them.
        let grace = self.hold_new_transactions(to).await;
        let held = self.wait_for_gateways_to_hold(sw.requested_at_ms, grace).await;
        let drained = self.drain_for_hand_over().await;
        // From when this node stops taking writes, by its own monotonic clock.
        let deadline = Instant::now() + Duration::from_millis(sw.timeout_ms);
        self.stop().await;
        tracing::info!("switchover to {to}: stopped ({held}; {drained})");
        let server = self.server.clone();
        let stopped = Instant::now();
        let final_lsn = tokio::task::spawn_blocking(move || server.control_checkpoint()).await??;
        let recorded = SwitchoverRequest { final_lsn: Some(final_lsn), ..sw.clone() };
        if !self.coord.update_switchover(&sw, Some(&recorded)).await? {
            tracing::warn!("the switchover request changed under us; staying primary");
            return self.restart_after_hand_over(&leader, None).await;
        }
        tracing::info!(
            "switchover to {to}: final checkpoint {final_lsn} recorded {:.1?} after the stop",
            stopped.elapsed()
        );
        loop {
            let replayed = self
                .coord
                .snapshot()
                .await
                .ok()
                .and_then(|s| s.members.into_iter().find(|m| m.node == to))
                .and_then(|m| m.replay_lsn);
            match duties::hand_over(replayed, final_lsn, Instant::now(), deadline) {
                HandOver::Done => break,
                HandOver::Waiting => tokio::time::sleep(HAND_OVER_POLL).await,
                HandOver::TimedOut => {
                    let why = format!("{to} had not replayed the old primary's final checkpoint {final_lsn} by the deadline (replayed {})", replayed.map_or("nothing".into(), |r| r.to_string()));
                    tracing::warn!("switchover aborted: {why}");
                    let aborted = SwitchoverRequest { aborted: Some(why), ..recorded.clone() };
                    return self.restart_after_hand_over(&leader, Some((&recorded, &aborted))).await;
                }
            }
        }
        if self.coord.release_leader(&self.server.node, leader.epoch).await? {
            tracing::info!("switchover: {to} has replayed up to {final_lsn}; released leader");
        } else {
            tracing::warn!(
                "switchover: {to} has replayed up to {final_lsn}, but leader of epoch {} was no longer ours to release",
                leader.epoch
            );
        }
        Ok(())
    }

    /// On a switchover's target, once the old primary has recorded its final
    /// checkpoint: waits (briefly) until this server has replayed it, then
    /// reports at once, so that the old primary, which releases `leader` on
    /// that report, need not wait for this loop's next tick.
    pub(super) async fn catch_up_for_switchover(&mut self, snapshot: Option<&Snapshot>) {
        let me = &self.server.node;
        let Some(final_lsn) = snapshot
            .and_then(|s| s.switchover.as_ref())
            .filter(|sw| sw.to == *me && sw.aborted.is_none())
            .and_then(|sw| sw.final_lsn)
        else {
            return;
        };
        let reported = snapshot.and_then(|s| s.members.iter().find(|m| m.node == *me)).and_then(|m| m.replay_lsn);
        if reported.is_some_and(|r| r > final_lsn) || self.running.is_none() {
            return;
        }
        let Ok(client) = self.client().await else { return };
        let started = Instant::now();
        let mut nudged: Option<Instant> = None;
        while started.elapsed() < CATCH_UP_WAIT {
            let replayed = client
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
                .ok()
                .and_then(|row| row.get::<_, Option<String>>(0))
                .and_then(|l| l.parse::<Lsn>().ok());
            if replayed.is_some_and(|r| r > final_lsn) {
                tracing::info!(
                    "switchover: replayed the old primary's final checkpoint {final_lsn} ({:.1?})",
                    started.elapsed()
                );
                self.report(snapshot).await;
                return;
            }
            // The final checkpoint is usually streamed already, but when the
            // upstream's stop broke streaming, the startup process waits out
            // what is left of wal_retrieve_retry_interval (5 s) before it
            // reads pg_wal again (measured: 0.66 s). A reload's SIGHUP wakes
            // it (PostgreSQL's startup process sets its wakeup latch on SIGHUP).
            if nudged.is_none_or(|at| at.elapsed() >= NUDGE_EVERY) {
                nudged = Some(Instant::now());
                if let Err(e) = client.batch_execute("SELECT pg_reload_conf()").await {
                    tracing::debug!("failed to wake the startup process: {e}");
                }
            }
            tokio::time::sleep(HAND_OVER_POLL).await;
        }
    }

    /// Checkpoints while the server still takes writes; says how long it took.
    async fn checkpoint_before_hand_over(&mut self) -> String {
        let started = Instant::now();
        let Ok(client) = self.client().await else { return "no session to the server to checkpoint".into() };
        match client.batch_execute("CHECKPOINT").await {
            Ok(()) => format!("checkpointed in {:.1?}", started.elapsed()),
            Err(e) => {
                tracing::warn!("failed to checkpoint before the hand-over: {e}");
                "no checkpoint".into()
            }
        }
    }

    /// Reports that this node no longer takes writes, writing the report itself
    /// to time it; returns how long the proxies are given to see it: twice
    /// the time etcd took to commit it (a remote region's member applies a
    /// commit about one WAN trip after the quorum does), plus the gateways'
    /// own debounce and read, within `HAND_OVER_GRACE`.
    async fn hold_new_transactions(&mut self, to: &str) -> Duration {
        self.set_starting(&format!("handing over to {to}"));
        let Some(report) = self.latest.borrow().clone() else { return HAND_OVER_GRACE.1 };
        let started = Instant::now();
        let report = crate::cluster::MemberStatus { updated_at_ms: crate::cluster::now_ms(), ..report };
        match self.coord.put_member(&report, self.lease.id()).await {
            Ok(()) => hand_over_grace(started.elapsed()),
            Err(e) => {
                // The publisher writes it again within a second; give it that long.
                tracing::warn!("failed to {e:#}");
                HAND_OVER_GRACE.1
            }
        }
    }

    /// Waits until every live gateway says its proxies hold new transactions
    /// for this switchover (see `gateway::presence`).
    async fn wait_for_gateways_to_hold(&mut self, requested_at_ms: u64, grace: Duration) -> String {
        self.wait_for_gateways("held new transactions", grace, |g| g.holding_for == Some(requested_at_ms)).await
    }

    /// Waits until every live gateway's presence `says` what is awaited, at
    /// most `HAND_OVER_GRACE.1`; with no gateway known, for `grace`, the time
    /// they would need to see what changed. Says what it waited for.
    pub(super) async fn wait_for_gateways(
        &mut self,
        what: &str,
        grace: Duration,
        says: impl Fn(&crate::cluster::GatewayPresence) -> bool,
    ) -> String {
        let started = Instant::now();
        loop {
            let gateways = match self.coord.snapshot().await {
                Ok(s) => s.gateways,
                Err(_) => Vec::new(),
            };
            let waiting: Vec<&str> = gateways.iter().filter(|g| !says(g)).map(|g| g.region.as_str()).collect();
            if gateways.is_empty() {
                tokio::time::sleep(grace.saturating_sub(started.elapsed())).await;
                return format!("no gateway present; waited {grace:.1?} for proxies to see the change");
            }
            if waiting.is_empty() {
                return format!("{} gateways {what} after {:.1?}", gateways.len(), started.elapsed());
            }
            if started.elapsed() >= HAND_OVER_GRACE.1 {
                return format!(
                    "gateways {} did not say they {what} within {:?}; going on",
                    waiting.join(", "),
                    HAND_OVER_GRACE.1
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Once every proxy holds new transactions: waits (at most
    /// `HAND_OVER_DRAIN`) until no client transaction is open; says what it waited for.
    pub(super) async fn drain_for_hand_over(&mut self) -> String {
        let started = Instant::now();
        // A gateway says it holds only once its lent transactions have had a
        // first answer (`gateway::presence`); this moment is for a client
        // connected directly, whose statement may be on its way.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let Ok(client) = self.client().await else { return "no session to the server".into() };
        let open = loop {
            let open: i64 = match client.query_one(OPEN_TRANSACTIONS, &[]).await {
                Ok(row) => row.get(0),
                Err(e) => {
                    tracing::warn!("failed to count open transactions: {e}");
                    break -1;
                }
            };
            if open <= 0 || started.elapsed() >= HAND_OVER_DRAIN {
                break open;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let waited = started.elapsed();
        match open {
            0 => format!("open transactions finished in {waited:.1?}"),
            n if n > 0 => format!("{n} transactions still open after {waited:.1?} end now"),
            _ => format!("waited {waited:.1?}"),
        }
    }

    /// After a hand-over that did not happen: read-write again only with
    /// `leader` of our epoch confirmed by compare-and-swap (aborting the
    /// request in the same transaction) and a fresh lease.
    async fn restart_after_hand_over(
        &mut self,
        leader: &crate::cluster::Leader,
        abort: Option<(&SwitchoverRequest, &SwitchoverRequest)>,
    ) -> Result<()> {
        let me = self.server.node.clone();
        let lease = self.lease.id();
        let still_leader = match abort {
            Some((old, new)) => self.coord.abort_switchover_as_leader(&me, leader.epoch, lease, old, new).await,
            None => self.coord.holds_leader(&me, leader.epoch, lease).await,
        };
        let still_leader = still_leader.unwrap_or_else(|e| {
            tracing::warn!("failed to {e:#}");
            false
        });
        if duties::restart_read_write(still_leader, self.lease.is_fresh()) {
            tracing::info!("still the leader of epoch {}: starting again as primary", leader.epoch);
            self.unvouch_before_restart(leader.epoch, None).await?;
            return self.start(StartAs::Primary).await;
        }
        tracing::warn!("no longer provably the leader of epoch {}: starting as a standby", leader.epoch);
        if let Some((old, new)) = abort {
            // Still abort the request, so that the cluster can elect normally.
            if let Err(e) = self.coord.update_switchover(old, Some(new)).await {
                tracing::warn!("failed to {e:#}");
            }
        }
        self.fenced = true;
        self.start(StartAs::Standby { upstream: None }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_over_grace_follows_etcd_commit_time_within_bounds() {
        assert_eq!(hand_over_grace(Duration::from_millis(2)), Duration::from_millis(30), "one machine: the floor");
        assert_eq!(hand_over_grace(Duration::from_millis(45)), Duration::from_millis(110), "a 20 ms WAN");
        assert_eq!(hand_over_grace(Duration::from_secs(3)), Duration::from_secs(1), "a struggling etcd: the cap");
    }
}
