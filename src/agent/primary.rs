//! What only the primary does, every tick: record its position, keep etcd's
//! leader out of its region, name the synchronous standbys, keep slots, clear
//! carried-out requests, and give `leader` up once its hung server is gone.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{commit_lag, Agent};
use crate::cluster::{Lsn, Optime, SyncRecord};
use crate::coord::Snapshot;
use crate::failover::{duties, sync};
use crate::postgres::files;

/// How often the primary checks that etcd's leader is outside its region.
const ETCD_LEADER_CHECK: Duration = Duration::from_secs(5);
/// How long after changing its synchronous standbys the primary waits before
/// it takes the position a standby of the new set must flush past (a reload
/// reaches every process within milliseconds).
const SYNC_SETTLE: Duration = Duration::from_millis(500);

/// A change of the synchronous set not yet in the `sync` record.
#[derive(Debug, Clone)]
pub(super) struct SyncChange {
    set: BTreeSet<String>,
    at: Instant,
    /// The server's position, taken `SYNC_SETTLE` after the change.
    since: Option<Lsn>,
}

impl Agent {
    /// Runs while this node reports itself primary.
    pub(super) async fn primary_duties(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        self.record_optime(snapshot).await?;
        self.place_etcd_leader().await;
        self.archiving_duties().await;
        if let Err(e) = self.commit_guard().await {
            // Unmeasured is not within the bound: keep the last verdict.
            tracing::warn!("failed to measure the remote standbys' commit lag: {e:#}");
        }
        self.apply_synchronous_standbys(snapshot).await?;
        if let Some(s) = snapshot {
            self.finish_requests(s, None).await?;
        }
        Ok(())
    }

    /// `[replication] max_commit_lag`: logs the primary's position, measures
    /// how far behind the closest standby in another region is, and decides
    /// whether commits must wait for one (see `commit_lag`).
    async fn commit_guard(&mut self) -> Result<()> {
        let Some(bound) = self.config.replication.max_commit_lag else {
            self.commit_hold = None;
            return Ok(());
        };
        let column = match self.config.replication.commit_lag_by {
            commit_lag::CommitLagBy::Replay => "replay_lsn",
            commit_lag::CommitLagBy::Receive => "flush_lsn",
        };
        let client = self.client().await?;
        let current: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .context("read the current WAL position")?
            .get(0);
        let rows = client
            .query(
                &format!(
                    "SELECT application_name::text, {column}::text FROM pg_stat_replication WHERE {column} IS NOT NULL"
                ),
                &[],
            )
            .await
            .context("read pg_stat_replication")?;
        let now = Instant::now();
        let current: crate::cluster::Lsn = current.parse().map_err(anyhow::Error::msg)?;
        let log =
            self.commit_log.get_or_insert_with(|| commit_lag::PositionLog::new(bound * 4 + Duration::from_secs(60)));
        log.record(now, current);
        let positions: Vec<(String, crate::cluster::Lsn)> =
            rows.iter().filter_map(|r| Some((r.get::<_, String>(0), r.get::<_, String>(1).parse().ok()?))).collect();
        let remotes: Vec<(String, Option<crate::cluster::Lsn>)> = self
            .config
            .nodes()
            .filter(|(r, _)| r.name != self.region)
            .map(|(_, n)| (n.name.clone(), positions.iter().find(|(a, _)| *a == n.name).map(|(_, l)| *l)))
            .collect();
        let verdict = commit_lag::evaluate(log, now, bound, &remotes);
        let was = self.commit_hold.as_ref().is_some_and(|h| h.holding);
        if verdict.holding && !was {
            tracing::warn!(
                "{}",
                verdict.warning(&self.server.node).unwrap_or_default().trim_start_matches("WARNING: ")
            );
        } else if was && !verdict.holding {
            tracing::info!(
                "commits flow again: {} is {:.1}s behind, within max_commit_lag {bound:?}",
                verdict.best.as_deref().unwrap_or("?"),
                verdict.best_lag_ms.unwrap_or(0) as f64 / 1000.0
            );
        }
        self.commit_hold = Some(verdict);
        Ok(())
    }

    /// Once the supervisor has stopped a hung primary's server, `leader` is
    /// released so a standby takes over now rather than when the abandoned
    /// lease expires.
    pub(super) async fn release_after_hang(&mut self, snapshot: Option<&Snapshot>) -> bool {
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

    /// Names the standbys commits wait for (`[replication] synchronous`),
    /// among those that stream from it now, and reloads when that changed.
    /// Without a view of etcd the set is left as it is: a partitioned primary
    /// keeps waiting for its synchronous standby, so it acknowledges nothing
    /// that a failover elsewhere would lose.
    ///
    /// While the commit-lag guard holds commits, every standby in another
    /// region is named, streaming or not, so commits wait until one of them
    /// has the WAL (replayed, with `commit_lag_by = "replay"`).
    ///
    /// With `synchronous` on, the `sync` record in etcd is kept true around
    /// every change (`failover::sync`): widened or emptied before the server
    /// changes, narrowed to the new set once one of its standbys has flushed
    /// past the change.
    async fn apply_synchronous_standbys(&mut self, s: Option<&Snapshot>) -> Result<()> {
        let me = self.server.node.clone();
        let hold = self.commit_hold.as_ref().is_some_and(|h| h.holding);
        let recorded = self.config.replication.synchronous != crate::config::Synchronous::Off;
        let names = match (hold, s) {
            // The guard holds commits even without a view of etcd, unless a record must follow.
            (true, None) if !recorded => crate::config::remote_standby_names(&self.config, &me),
            (true, Some(_)) => crate::config::remote_standby_names(&self.config, &me),
            (false, Some(s)) => {
                let streaming = duties::streaming_standbys(&s.members, &me);
                crate::config::synchronous_standby_names(&self.config, &me, &streaming)
            }
            (_, None) => return Ok(()),
        };
        let mut record = None;
        if recorded {
            // Without etcd nothing changes: the record could not follow.
            let Some(s) = s else { return Ok(()) };
            let Some(epoch) = s.leader.as_ref().filter(|l| l.leader.node == me).map(|l| l.leader.epoch) else {
                return Ok(());
            };
            let mut vouched: Vec<String> = s
                .sync
                .as_ref()
                .filter(|r| r.epoch == epoch && r.node == me)
                .map(|r| r.standbys.clone())
                .unwrap_or_default();
            let current = sync::names_in(self.server.synchronous_standby_names()?.as_deref());
            let wanted = sync::names_in(names.as_deref());
            if let Some(standbys) = sync::record_before(&vouched, &current, &wanted) {
                if !self.put_sync(epoch, &standbys).await? {
                    return Ok(());
                }
                vouched = standbys;
            }
            record = Some((epoch, vouched, wanted));
        }
        let level = (hold && self.config.replication.commit_lag_by == commit_lag::CommitLagBy::Replay)
            .then_some("remote_apply");
        let names_changed = self.server.set_synchronous_standby_names(names.as_deref())?;
        let level_changed = self.server.set_guard_commit_level(level)?;
        if names_changed || level_changed {
            tracing::info!(
                "synchronous standbys: {}{}",
                names.as_deref().unwrap_or("none (asynchronous)"),
                if hold { " (holding commits: max_commit_lag)" } else { "" }
            );
            self.client().await?.batch_execute("SELECT pg_reload_conf()").await.context("reload the configuration")?;
        }
        if let Some((epoch, vouched, wanted)) = record {
            self.narrow_sync_record(epoch, &vouched, wanted).await?;
        }
        Ok(())
    }

    /// Narrows the `sync` record to the set the server runs with, once a
    /// standby of it has flushed past a position taken at least
    /// `SYNC_SETTLE` after the set changed (every process has reloaded by
    /// then; commits acknowledged before are all below that position).
    async fn narrow_sync_record(&mut self, epoch: u64, vouched: &[String], set: BTreeSet<String>) -> Result<()> {
        if set.is_empty() || sync::records(vouched, &set) {
            self.sync_change = None;
            return Ok(());
        }
        let change = match self.sync_change.take() {
            Some(c) if c.set == set => c,
            _ => SyncChange { set, at: Instant::now(), since: None },
        };
        let client = self.client().await?;
        let change = match change.since {
            None if change.at.elapsed() >= SYNC_SETTLE => {
                let lsn: String = client
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .context("read the WAL position")?
                    .get(0);
                SyncChange { since: Some(lsn.parse().map_err(anyhow::Error::msg)?), ..change }
            }
            _ => change,
        };
        let Some(since) = change.since else {
            self.sync_change = Some(change);
            return Ok(());
        };
        let rows = client
            .query(
                "SELECT application_name::text, flush_lsn::text FROM pg_stat_replication WHERE flush_lsn IS NOT NULL",
                &[],
            )
            .await
            .context("read pg_stat_replication")?;
        let flushed: Vec<(String, Lsn)> =
            rows.iter().filter_map(|r| Some((r.get::<_, String>(0), r.get::<_, String>(1).parse().ok()?))).collect();
        if sync::may_narrow(&change.set, since, &flushed) {
            let standbys: Vec<String> = change.set.iter().cloned().collect();
            if self.put_sync(epoch, &standbys).await? {
                tracing::info!("the sync record vouches for {} (flushed past {since})", standbys.join(", "));
            }
        } else {
            self.sync_change = Some(change);
        }
        Ok(())
    }

    /// A primary restarted within its epoch (its server crashed, or a
    /// switchover timed out) comes up asynchronous, its files written afresh:
    /// the `sync` record of `epoch` must stop vouching first. `recorded`:
    /// the record as last read, when known (None: write regardless).
    pub(super) async fn unvouch_before_restart(&self, epoch: u64, recorded: Option<&SyncRecord>) -> Result<()> {
        if self.config.replication.synchronous == crate::config::Synchronous::Off {
            return Ok(());
        }
        let me = &self.server.node;
        if recorded.is_some_and(|r| &r.node != me || r.epoch != epoch || r.standbys.is_empty()) {
            return Ok(()); // vouches for nothing of this epoch already
        }
        if !self.put_sync(epoch, &[]).await? {
            anyhow::bail!("record the synchronous standbys before starting: leader is no longer this node's");
        }
        Ok(())
    }

    async fn put_sync(&self, epoch: u64, standbys: &[String]) -> Result<bool> {
        let record = SyncRecord {
            node: self.server.node.clone(),
            epoch,
            standbys: standbys.to_vec(),
            at_ms: crate::cluster::now_ms(),
        };
        let written = self.coord.put_sync(&record).await?;
        if written && standbys.is_empty() {
            tracing::warn!(
                "the sync record vouches for no standby: an automatic failover now could lose acknowledged commits"
            );
        }
        Ok(written)
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

    /// The primary keeps a physical slot for every other node of the cluster
    /// file, so a replica that falls behind (up to `max_slot_wal_keep_size`)
    /// can still catch up; a node that left loses its slot once it no longer
    /// streams (a slot nobody consumes retains WAL until the disk is full).
    pub(super) async fn ensure_slots(&mut self) -> Result<()> {
        let me = self.server.node.clone();
        let wanted: Vec<String> =
            self.config.nodes().filter(|(_, n)| n.name != me).map(|(_, n)| files::slot_name(&n.name)).collect();
        let own = files::slot_name(&me);
        let client = self.client().await?;
        let rows = client
            .query("SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical' AND slot_name LIKE 'meridian\\_%'", &[])
            .await
            .context("list replication slots")?;
        let existing: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for slot in wanted.iter().filter(|s| !existing.iter().any(|(e, _)| e == *s)) {
            client
                .execute("SELECT pg_create_physical_replication_slot($1, true)", &[slot])
                .await
                .with_context(|| format!("create replication slot {slot}"))?;
        }
        // A slot for ourselves would retain WAL forever: nobody consumes it.
        let unwanted = existing.iter().filter(|(s, active)| *s == own || (!wanted.contains(s) && !active));
        for (slot, _) in unwanted {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                .await
                .with_context(|| format!("drop replication slot {slot}"))?;
            if *slot != own {
                tracing::info!("dropped replication slot {slot}: its node is no longer in the cluster file");
            }
        }
        Ok(())
    }
}
