//! Observing: etcd's snapshot and the facts about the local server that the
//! pure view builder (`failover::view`) interprets.

use std::time::{Duration, Instant};

use super::{Agent, Running};
use crate::coord::Snapshot;
use crate::failover::view::{self, Facts};
use crate::failover::{Local, NodeView};
use crate::postgres::files::StartAs;

impl Agent {
    /// The cluster's state in etcd, or None when etcd does not answer.
    pub(super) async fn read_snapshot(&mut self) -> Option<Snapshot> {
        // A primary stops waiting `READ_SPARE` before its lease stops being
        // provably alive: a read that does not answer by then must leave it
        // time to fence itself (`failover::view::SILENCE_SPARE`).
        let budget = match &self.running {
            Some(Running { start: StartAs::Primary, .. }) => {
                self.lease.fresh_until().saturating_duration_since(Instant::now()).saturating_sub(view::READ_SPARE)
            }
            _ => Duration::MAX,
        };
        let read = match tokio::time::timeout(budget, self.coord.snapshot()).await {
            Ok(read) => read,
            Err(_) => Err(anyhow::anyhow!(
                "read cluster state from etcd: no answer within {budget:?}, the lease's time to spare"
            )),
        };
        let snapshot = match read {
            Ok(s) => {
                self.epoch_seen = self.epoch_seen.max(s.epoch);
                self.leaderless_since_revision = view::leaderless_since(self.leaderless_since_revision, &s);
                Some(s)
            }
            Err(e) => {
                tracing::warn!("failed to {e:#}");
                None
            }
        };
        self.led_under = view::leading_lease(self.led_under, snapshot.as_ref(), &self.server.node);
        snapshot
    }

    /// What the agent knows about its own server and lease.
    async fn facts(&self) -> Facts {
        let local = match &self.running {
            None if !self.server.is_initialized() => Local::Empty,
            None => Local::Stopped,
            Some(Running { start: StartAs::Primary, .. }) => Local::Primary,
            Some(Running { start: StartAs::Standby { upstream }, .. }) => {
                Local::Standby { upstream: upstream.as_ref().map(|(n, _)| n.clone()) }
            }
        };
        // pg_controldata runs a process and reads a file: off the async workers.
        let control_timeline = if local == Local::Stopped {
            let server = self.server.clone();
            tokio::task::spawn_blocking(move || server.control_timeline().ok()).await.ok().flatten()
        } else {
            None
        };
        Facts {
            me: self.server.node.clone(),
            local,
            control_timeline,
            running_timeline: self.last_local.as_ref().and_then(|l| l.timeline),
            not_streaming_since: self.not_streaming_since,
            lease: self.lease.id(),
            lease_fresh_until: self.lease.fresh_until(),
            leaderless_since_revision: self.leaderless_since_revision,
            led_under: self.led_under,
        }
    }

    pub(super) async fn view(&self, snapshot: Option<&Snapshot>) -> NodeView {
        let facts = self.facts().await;
        view::build(&self.config, &facts, snapshot, Instant::now())
    }
}
