//! What only the primary does, every tick: record its position, keep etcd's
//! leader out of its region, name the synchronous standbys, keep slots, clear
//! carried-out requests, and give `leader` up once its hung server is gone.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::Agent;
use crate::cluster::Optime;
use crate::coord::Snapshot;
use crate::failover::duties;
use crate::postgres::files;

/// How often the primary checks that etcd's leader is outside its region.
const ETCD_LEADER_CHECK: Duration = Duration::from_secs(5);

impl Agent {
    /// Runs while this node reports itself primary.
    pub(super) async fn primary_duties(&mut self, snapshot: Option<&Snapshot>) -> Result<()> {
        self.record_optime(snapshot).await?;
        self.place_etcd_leader().await;
        self.archiving_duties().await;
        if let Some(s) = snapshot {
            self.apply_synchronous_standbys(s).await?;
            self.finish_requests(s, None).await?;
        }
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
    async fn apply_synchronous_standbys(&mut self, s: &Snapshot) -> Result<()> {
        let me = self.server.node.clone();
        let streaming = duties::streaming_standbys(&s.members, &me);
        let names = crate::config::synchronous_standby_names(&self.config, &me, &streaming);
        if self.server.set_synchronous_standby_names(names.as_deref())? {
            tracing::info!("synchronous standbys: {}", names.as_deref().unwrap_or("none (asynchronous)"));
            self.client().await?.batch_execute("SELECT pg_reload_conf()").await.context("reload the configuration")?;
        }
        Ok(())
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

    /// The primary keeps a physical slot for every other node, so a replica that
    /// falls behind (up to `max_slot_wal_keep_size`) can still catch up.
    pub(super) async fn ensure_slots(&mut self) -> Result<()> {
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
}
