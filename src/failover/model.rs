//! A model of the whole cluster for property tests: four nodes in two
//! regions, each deciding from its *own* snapshot of etcd (taken at some
//! earlier step, so possibly stale and different from the others'), with
//! etcd's compare-and-swap arbitrating every change, over random
//! interleavings of observing, deciding, renewing, time passing, writes,
//! replication, stalls, partitions, crashes, switchover and DR requests.
//!
//! The code under test is what the agent runs: `view::build`, `decide`,
//! `duties::hand_over`, `duties::restart_read_write`, `duties::completions`.
//! Everything around it (etcd, the supervisor's deadline, PostgreSQL's WAL
//! positions) is modelled here, and the oracles judge from the model's own
//! state without calling the code under test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::duties::{self, Completion, HandOver};
use super::sync;
use super::view::{self, Facts};
use super::{decide, Action, Local};
use crate::cluster::{DrSwitch, Leader, Lsn, MemberStatus, Optime, PromotionKind, Role, SwitchoverRequest, SyncRecord};
use crate::config::{Config, FailoverMode, LagBudget, Synchronous};
use crate::coord::{LeaderEntry, Snapshot};
use crate::lab::topology::{lab_config, LabShape};
use std::collections::BTreeSet;

const TTL_MS: u64 = 6000;
/// The size of the old primary's shutdown checkpoint record in a switchover.
const CHECKPOINT_BYTES: u64 = 100;

/// One node's server and agent, as the model sees them.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    region: String,
    local: Local,
    fenced: bool,
    timeline: u32,
    /// The LSN at which its current timeline began.
    timeline_start: u64,
    received: u64,
    replayed: u64,
    lease: i64,
    /// When its last successful renewal was sent (and received: no delay modelled).
    renewed_at: u64,
    /// The snapshot it decides from next; None: it must observe first (it
    /// always sees its own writes). Some(None): etcd did not answer.
    snapshot: Option<Option<Snapshot>>,
    leaderless_since: Option<i64>,
    /// The lease it held `leader` under in the last snapshot that answered.
    led_under: Option<i64>,
    partitioned: bool,
    stalled: bool,
    down: bool,
    /// A hand-over in progress: its final checkpoint and deadline.
    handover: Option<(Lsn, u64)>,
    /// Its server's `synchronous_standby_names` (empty on every start).
    sync_names: BTreeSet<String>,
    /// A change of that set not yet in the `sync` record: set, when, position.
    sync_change: Option<(BTreeSet<String>, u64, Option<u64>)>,
    /// The highest LSN it acknowledged a commit at while read-write (oracle).
    acked: u64,
}

/// etcd: one key space, one revision counter, leases with expiry times.
#[derive(Debug, Clone, Default)]
struct Etcd {
    revision: i64,
    epoch: u64,
    leader: Option<LeaderEntry>,
    leases: BTreeMap<i64, u64>,
    next_lease: i64,
    members: BTreeMap<String, Report>,
    optime: Option<Optime>,
    sync: Option<SyncRecord>,
    switchover: Option<SwitchoverRequest>,
    dr: Option<DrSwitch>,
}

/// A member report in etcd.
#[derive(Debug, Clone)]
struct Report {
    status: MemberStatus,
    revision: i64,
    written_at: u64,
    lease: i64,
}

#[derive(Debug, Clone)]
enum Ev {
    Observe(usize),
    Decide(usize),
    Renew(usize),
    Publish(usize),
    Advance(u64),
    Write(u64),
    /// A standby receives up to this many bytes and replays up to that many.
    Replicate(usize, u64, u64),
    Stall(usize, bool),
    Partition(usize, bool),
    Crash(usize),
    Restart(usize),
    Switchover(usize, u64),
    Dr(usize),
    HandOverTick(usize),
    /// What an agent does besides deciding, in one go: renew, stream, report,
    /// and look at a hand-over in progress.
    Busy(usize),
    /// The primary's agent names its synchronous standbys and keeps the `sync` record.
    SyncDuty(usize),
}

struct Model {
    config: Config,
    base: Instant,
    now: u64,
    nodes: Vec<Node>,
    etcd: Etcd,
    /// Which node held leader in each epoch (oracle record).
    leaders: BTreeMap<u64, String>,
    /// Every promotion, for the test that the model reaches them.
    promoted: Vec<PromotionKind>,
    /// Decisions that kept a primary running while etcd did not answer.
    kept_without_etcd: usize,
}

impl Model {
    fn new(within: FailoverMode, cross: FailoverMode, budget: u64, synchronous: Synchronous) -> Model {
        let shape = LabShape { regions: vec!["r1".into(), "r2".into()], nodes_per_region: 2, ..Default::default() };
        let mut config = lab_config(&shape, std::path::Path::new("/model"));
        config.failover.within_region = within;
        config.failover.cross_region = cross;
        config.failover.max_lag_on_failover = LagBudget::Bytes(budget);
        config.failover.lease_ttl = Duration::from_millis(TTL_MS);
        config.replication.synchronous = synchronous;
        let mut etcd = Etcd { epoch: 1, next_lease: 1, revision: 1, ..Etcd::default() };
        let nodes: Vec<Node> = config
            .nodes()
            .enumerate()
            .map(|(i, (region, n))| {
                let lease = etcd.next_lease;
                etcd.next_lease += 1;
                etcd.leases.insert(lease, TTL_MS);
                Node {
                    name: n.name.clone(),
                    region: region.name.clone(),
                    local: if i == 0 { Local::Primary } else { Local::Standby { upstream: None } },
                    fenced: false,
                    timeline: 1,
                    timeline_start: 0,
                    received: 1000,
                    replayed: 1000,
                    lease,
                    renewed_at: 0,
                    snapshot: None,
                    leaderless_since: None,
                    led_under: None,
                    partitioned: false,
                    stalled: false,
                    down: false,
                    handover: None,
                    sync_names: BTreeSet::new(),
                    sync_change: None,
                    acked: 1000,
                }
            })
            .collect();
        let first = &nodes[0];
        etcd.leader = Some(LeaderEntry { leader: Leader { node: first.name.clone(), epoch: 1 }, lease: first.lease });
        let leaders = BTreeMap::from([(1, first.name.clone())]);
        let mut m = Model {
            config,
            base: Instant::now(),
            now: 0,
            nodes,
            etcd,
            leaders,
            promoted: vec![],
            kept_without_etcd: 0,
        };
        for i in 0..m.nodes.len() {
            m.nodes[i].local =
                if i == 0 { Local::Primary } else { Local::Standby { upstream: Some(m.nodes[0].name.clone()) } };
            m.publish(i);
        }
        m
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn fresh_until(&self, n: &Node) -> u64 {
        n.renewed_at + TTL_MS - TTL_MS / 3
    }

    fn bump(&mut self) -> i64 {
        self.etcd.revision += 1;
        self.etcd.revision
    }

    fn snapshot(&self) -> Snapshot {
        let members = self
            .etcd
            .members
            .values()
            .map(|r| MemberStatus { unchanged_ms: self.now - r.written_at, revision: r.revision, ..r.status.clone() })
            .collect();
        Snapshot {
            revision: self.etcd.revision,
            leader: self.etcd.leader.clone(),
            epoch: self.etcd.epoch,
            members,
            initialized_by: Some(self.nodes[0].name.clone()),
            optime: self.etcd.optime.clone(),
            sync: self.etcd.sync.clone(),
            switchover: self.etcd.switchover.clone(),
            restart: None,
            dr: self.etcd.dr.clone(),
            restore: None,
            backup_job: None,
            health: vec![],
            gateways: vec![],
        }
    }

    fn idx(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn read_write(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].local == Local::Primary).collect()
    }

    fn stop(&mut self, i: usize) {
        self.nodes[i].local = Local::Stopped;
    }

    fn publish(&mut self, i: usize) {
        let n = &self.nodes[i];
        if n.down || n.partitioned || !self.etcd.leases.contains_key(&n.lease) {
            return;
        }
        let (role, healthy) = match (&n.local, n.fenced) {
            (Local::Primary, _) => (Role::Primary, true),
            (Local::Standby { .. }, true) => (Role::Fenced, false),
            (Local::Standby { upstream }, false) => (Role::Replica, upstream.is_some() && !n.stalled),
            _ => (Role::Stopped, false),
        };
        let running = matches!(n.local, Local::Primary | Local::Standby { .. });
        let report = MemberStatus {
            node: n.name.clone(),
            region: n.region.clone(),
            role,
            timeline: running.then_some(n.timeline),
            write_lsn: running.then_some(Lsn(n.received)),
            flush_lsn: running.then_some(Lsn(n.received)),
            replay_lsn: running.then_some(Lsn(n.replayed)),
            lag_bytes: None,
            lag_seconds: Some(0.0),
            upstream: match &n.local {
                Local::Standby { upstream } => upstream.clone(),
                _ => None,
            },
            epoch_seen: self.etcd.epoch,
            healthy,
            detail: None,
            waiting: None,
            failure: None,
            cert_not_after: None,
            archive: None,
            commit_hold: None,
            updated_at_ms: self.now,
            config_version: 0,
            pending_restart: Vec::new(),
            restarted_for: None,
            hung_recently: false,
            unchanged_ms: 0,
            revision: 0,
        };
        let (name, lease, region, received, primary) =
            (n.name.clone(), n.lease, n.region.clone(), n.received, n.local == Local::Primary);
        let rev = self.bump();
        self.etcd.members.insert(name.clone(), Report { status: report, revision: rev, written_at: self.now, lease });
        // The leader records its position, by compare-and-swap on `leader`.
        if let Some(l) = self.etcd.leader.clone().filter(|l| primary && l.leader.node == name && l.lease == lease) {
            let lsn = Lsn(received);
            self.etcd.optime =
                Some(Optime { node: name, region, epoch: l.leader.epoch, lsn, timeline: None, at_ms: self.now });
        }
    }

    /// The supervisor: a read-write server stops at its lease's deadline, whatever its agent does.
    fn supervise(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].local == Local::Primary && self.now >= self.fresh_until(&self.nodes[i]) {
                self.stop(i);
                self.nodes[i].fenced = true;
            }
        }
    }

    fn expire(&mut self) {
        let now = self.now;
        let expired: Vec<i64> = self.etcd.leases.iter().filter(|(_, e)| **e <= now).map(|(l, _)| *l).collect();
        for l in expired {
            self.etcd.leases.remove(&l);
            if self.etcd.leader.as_ref().is_some_and(|e| e.lease == l) {
                self.etcd.leader = None;
                self.bump();
            }
            let before = self.etcd.members.len();
            self.etcd.members.retain(|_, r| r.lease != l);
            if self.etcd.members.len() != before {
                self.bump();
            }
        }
    }

    fn step(&mut self, ev: &Ev) -> Result<(), String> {
        match *ev {
            Ev::Observe(i) => {
                let n = &self.nodes[i];
                if n.down {
                    return Ok(());
                }
                let snap = (!n.partitioned).then(|| self.snapshot());
                if let Some(s) = &snap {
                    self.nodes[i].leaderless_since = view::leaderless_since(self.nodes[i].leaderless_since, s);
                }
                let name = self.nodes[i].name.clone();
                self.nodes[i].led_under = view::leading_lease(self.nodes[i].led_under, snap.as_ref(), &name);
                self.nodes[i].snapshot = Some(snap);
            }
            Ev::Decide(i) => self.decide(i)?,
            Ev::Renew(i) => {
                let n = &self.nodes[i];
                if n.down || n.partitioned {
                    return Ok(());
                }
                if self.etcd.leases.contains_key(&n.lease) {
                    self.etcd.leases.insert(n.lease, self.now + TTL_MS);
                } else {
                    let lease = self.etcd.next_lease;
                    self.etcd.next_lease += 1;
                    self.etcd.leases.insert(lease, self.now + TTL_MS);
                    self.nodes[i].lease = lease;
                }
                self.nodes[i].renewed_at = self.now;
            }
            Ev::Publish(i) => self.publish(i),
            Ev::Advance(ms) => {
                self.now += ms;
                self.expire();
            }
            Ev::Write(bytes) => {
                for i in self.read_write() {
                    self.nodes[i].received += bytes;
                    self.nodes[i].replayed = self.nodes[i].received;
                }
            }
            Ev::Replicate(i, received, replayed) => self.replicate(i, received, replayed),
            Ev::Stall(i, on) => self.nodes[i].stalled = on,
            Ev::Partition(i, on) => self.nodes[i].partitioned = on,
            Ev::Crash(i) => {
                // The agent dies and its server with it (parent-death signal).
                self.stop(i);
                self.nodes[i].down = true;
                self.nodes[i].handover = None;
            }
            Ev::Restart(i) => {
                // A new agent process: a lease of its own (the old one expires by itself).
                if self.nodes[i].down && !self.nodes[i].partitioned {
                    let lease = self.etcd.next_lease;
                    self.etcd.next_lease += 1;
                    self.etcd.leases.insert(lease, self.now + TTL_MS);
                    let n = &mut self.nodes[i];
                    n.down = false;
                    n.snapshot = None;
                    n.leaderless_since = None;
                    n.led_under = None;
                    n.lease = lease;
                    n.renewed_at = self.now;
                }
            }
            Ev::Switchover(to, timeout_ms) => {
                // What the gateway checks: from the current primary, to another node.
                let Some(l) = self.etcd.leader.clone() else { return Ok(()) };
                let to = self.nodes[to].name.clone();
                // An aborted request may be replaced (what `meridian switchover` does).
                let free = self.etcd.switchover.as_ref().is_none_or(|sw| sw.aborted.is_some());
                if free && to != l.leader.node {
                    self.etcd.switchover = Some(SwitchoverRequest {
                        from: l.leader.node.clone(),
                        to,
                        requested_by: "model".into(),
                        requested_at_ms: self.now,
                        timeout_ms,
                        final_lsn: None,
                        aborted: None,
                    });
                    self.bump();
                }
            }
            Ev::Dr(target) => {
                let n = &self.nodes[target];
                if self.etcd.dr.as_ref().is_none_or(|d| d.done_epoch.is_some()) {
                    self.etcd.dr = Some(DrSwitch {
                        active_region: n.region.clone(),
                        target: n.name.clone(),
                        allow_data_loss: true,
                        set_by: "model".into(),
                        at_ms: self.now,
                        lost_bytes_estimate: 0,
                        done_epoch: None,
                        trigger: None,
                    });
                    self.bump();
                }
            }
            Ev::HandOverTick(i) => self.hand_over_tick(i)?,
            Ev::SyncDuty(i) => self.sync_duty(i),
            Ev::Busy(i) => {
                for ev in
                    [Ev::Renew(i), Ev::Replicate(i, 2000, 1500), Ev::Publish(i), Ev::HandOverTick(i), Ev::SyncDuty(i)]
                {
                    self.step(&ev)?;
                }
            }
        }
        self.supervise();
        self.acknowledge();
        self.check_always()
    }

    fn replicate(&mut self, i: usize, bytes: u64, replay_bytes: u64) {
        let n = &self.nodes[i];
        let Local::Standby { upstream: Some(up) } = &n.local else { return };
        let Some(u) = self.idx(up) else { return };
        let src = &self.nodes[u];
        // A server handing over streams its shutdown checkpoint before it exits.
        let serving = matches!(src.local, Local::Primary | Local::Standby { .. }) || src.handover.is_some();
        if n.stalled || n.down || src.down || !serving {
            return;
        }
        // A standby follows its upstream onto a newer timeline only if it has
        // not gone past where that timeline began (else it diverged: rewind).
        if n.timeline != src.timeline && !(n.timeline < src.timeline && n.received <= src.timeline_start) {
            return;
        }
        let (timeline, start, src_received) = (src.timeline, src.timeline_start, src.received);
        // WAL moves in whole records: the shutdown checkpoint (CHECKPOINT_BYTES
        // from the final LSN) is received and replayed whole or not at all.
        let handover = src.handover;
        let whole = |lsn: u64| match handover {
            Some((fin, _)) if lsn > fin.0 && lsn < fin.0 + CHECKPOINT_BYTES => fin.0,
            _ => lsn,
        };
        let n = &mut self.nodes[i];
        n.timeline = timeline;
        n.timeline_start = start;
        n.received = whole(src_received.min(n.received + bytes)).max(n.received);
        n.replayed = whole(n.received.min(n.replayed + replay_bytes)).max(n.replayed);
    }

    fn decide(&mut self, i: usize) -> Result<(), String> {
        if self.nodes[i].down || self.nodes[i].handover.is_some() {
            return Ok(());
        }
        let Some(snapshot) = self.nodes[i].snapshot.take() else { return Ok(()) };
        let n = &self.nodes[i];
        let facts = Facts {
            me: n.name.clone(),
            local: n.local.clone(),
            control_timeline: Some(n.timeline),
            running_timeline: Some(n.timeline),
            not_streaming_since: n.stalled.then(|| self.at(0)),
            lease: n.lease,
            lease_fresh_until: self.at(self.fresh_until(n)),
            leaderless_since_revision: n.leaderless_since,
            led_under: n.led_under,
        };
        let v = view::build(&self.config, &facts, snapshot.as_ref(), self.at(self.now));
        let action = decide(&v);
        self.apply(i, &action, snapshot.as_ref())?;
        // Never read-write without a fresh lease and the leader key of the current epoch.
        let n = &self.nodes[i];
        if n.local == Local::Primary && snapshot.is_none() {
            self.kept_without_etcd += 1;
        }
        let n = &self.nodes[i];
        if n.local == Local::Primary {
            if self.now >= self.fresh_until(n) {
                return Err(format!("{} runs read-write after {action:?} without a fresh lease", n.name));
            }
            let ok =
                self.etcd.leader.as_ref().is_some_and(|l| {
                    l.leader.node == n.name && l.lease == n.lease && l.leader.epoch == self.etcd.epoch
                });
            if !ok {
                return Err(format!(
                    "{} runs read-write after {action:?}; etcd's leader is {:?}",
                    n.name, self.etcd.leader
                ));
            }
        }
        Ok(())
    }

    fn apply(&mut self, i: usize, action: &Action, snap: Option<&Snapshot>) -> Result<(), String> {
        let name = self.nodes[i].name.clone();
        match action {
            Action::Keep | Action::Wait { .. } | Action::Bootstrap | Action::Clone { .. } => {}
            // Only `meridian restore` sets up what this needs: an ordinary history never must.
            Action::AdoptRestored => return Err(format!("{name} would adopt restored data in an ordinary history")),
            // Only `meridian restore --replace` asks for these; the model never does.
            Action::StopForRestore | Action::TakeRestored => {
                return Err(format!("{name} acted on a restore that was never requested: {action:?}"))
            }
            Action::StartPrimary => {
                let epoch = snap.and_then(|s| s.leader.as_ref()).map(|l| l.leader.epoch).unwrap_or_default();
                if self.unvouch(i, epoch) {
                    self.start_primary(i);
                }
            }
            Action::StartStandby { upstream } => {
                self.nodes[i].local = Local::Standby { upstream: upstream.clone() };
            }
            Action::Follow { upstream } => self.nodes[i].local = Local::Standby { upstream: Some(upstream.clone()) },
            Action::Fence { .. } => {
                let leader = snap.and_then(|s| s.leader.as_ref()).map(|l| l.leader.node.clone()).filter(|l| *l != name);
                self.nodes[i].local = Local::Standby { upstream: leader };
                self.nodes[i].fenced = true;
            }
            Action::StepDown { .. } => {
                self.stop(i);
                if let Some(l) = snap.and_then(|s| s.leader.clone()) {
                    self.release(&name, l.leader.epoch);
                }
                self.nodes[i].local = Local::Standby { upstream: None };
                self.nodes[i].fenced = true;
            }
            Action::Rejoin { upstream } => {
                let Some(u) = self.idx(upstream) else { return Ok(()) };
                let (tl, start, up_received) =
                    (self.nodes[u].timeline, self.nodes[u].timeline_start, self.nodes[u].received);
                let n = &mut self.nodes[i];
                // pg_rewind: back to where the histories forked, then the upstream's timeline.
                n.received = n.received.min(start).min(up_received);
                n.replayed = n.replayed.min(n.received);
                n.timeline = tl;
                n.timeline_start = start;
                n.local = Local::Standby { upstream: Some(upstream.clone()) };
                n.fenced = false;
            }
            Action::HandOver { .. } => {
                let Some(sw) = self.etcd.switchover.clone().filter(|sw| sw.from == name && sw.final_lsn.is_none())
                else {
                    return Ok(());
                };
                // A clean stop writes a shutdown checkpoint at the end of WAL.
                self.stop(i);
                let final_lsn = Lsn(self.nodes[i].received);
                self.nodes[i].received += CHECKPOINT_BYTES;
                self.nodes[i].replayed = self.nodes[i].received;
                self.etcd.switchover = Some(SwitchoverRequest { final_lsn: Some(final_lsn), ..sw.clone() });
                self.bump();
                self.nodes[i].handover = Some((final_lsn, self.now + sw.timeout_ms));
            }
            Action::Promote { kind, .. } => self.promote(i, *kind, snap)?,
        }
        Ok(())
    }

    fn release(&mut self, node: &str, epoch: u64) {
        if self.etcd.leader.as_ref().is_some_and(|l| l.leader.node == node && l.leader.epoch == epoch) {
            self.etcd.leader = None;
            self.bump();
        }
    }

    fn promote(&mut self, i: usize, kind: PromotionKind, snap: Option<&Snapshot>) -> Result<(), String> {
        let Some(snap) = snap else { return Ok(()) };
        let (name, lease) = (self.nodes[i].name.clone(), self.nodes[i].lease);
        let held = self.etcd.leader.as_ref().is_some_and(|l| l.leader.node == name && l.lease == lease);
        let held_in_view = snap.leader.as_ref().is_some_and(|l| l.leader.node == name && l.lease == lease);
        if !held_in_view {
            // acquire_leader: only if nobody holds it and the epoch is the one seen.
            if self.etcd.leader.is_some() || self.etcd.epoch != snap.epoch || !self.etcd.leases.contains_key(&lease) {
                return Ok(());
            }
            self.etcd.epoch += 1;
            self.etcd.leader =
                Some(LeaderEntry { leader: Leader { node: name.clone(), epoch: self.etcd.epoch }, lease });
            self.bump();
            self.check_promotion(i, kind)?;
            // ... and records where this node starts, from its last report, as the epoch's first optime.
            let reported = self.etcd.members.get(&name).map(|r| &r.status);
            if let Some(lsn) = reported.and_then(|r| r.write_lsn.or(r.replay_lsn)) {
                let (region, epoch) = (self.nodes[i].region.clone(), self.etcd.epoch);
                self.etcd.optime =
                    Some(Optime { node: name.clone(), region, epoch, lsn, timeline: None, at_ms: self.now });
            }
            self.promoted.push(kind);
        } else if !held {
            return Ok(()); // the real agent's pg_promote would follow; its lease check fences it next
        }
        let epoch = self.etcd.epoch;
        if let Some(other) = self.leaders.insert(epoch, name.clone()).filter(|o| *o != name) {
            return Err(format!("two leaders in epoch {epoch}: {other} and {name}"));
        }
        let n = &mut self.nodes[i];
        n.replayed = n.received; // a promotion replays everything received
        n.timeline += 1;
        n.timeline_start = n.received;
        n.local = Local::Primary;
        n.fenced = false;
        n.sync_names.clear();
        n.sync_change = None;
        n.acked = n.received;
        // Carried-out requests are cleared by compare-and-swap.
        let dones = duties::completions(&name, Some(epoch), self.etcd.switchover.as_ref(), self.etcd.dr.as_ref());
        for done in dones {
            match done {
                Completion::ClearSwitchover(sw) if self.etcd.switchover.as_ref() == Some(&sw) => {
                    self.etcd.switchover = None;
                }
                Completion::CompleteDr(dr, e) if self.etcd.dr.as_ref() == Some(&dr) => {
                    self.etcd.dr = Some(DrSwitch { done_epoch: Some(e), ..dr });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Oracles for a new leader, from the model's own state.
    fn check_promotion(&self, i: usize, kind: PromotionKind) -> Result<(), String> {
        let n = &self.nodes[i];
        match kind {
            PromotionKind::Failover => {
                let Some(last) = &self.etcd.optime else {
                    return Err(format!("{} promoted with no record of the last primary's position", n.name));
                };
                let f = &self.config.failover;
                let mode = if last.region == n.region { f.within_region } else { f.cross_region };
                if mode == FailoverMode::Manual {
                    return Err(format!("{} promoted against a manual mode (last primary in {})", n.name, last.region));
                }
                // The node's replay as it reported it: what it was judged on.
                let reported = self.etcd.members.get(&n.name).and_then(|r| r.status.replay_lsn).unwrap_or_default();
                let LagBudget::Bytes(budget) = f.max_lag_on_failover else { unreachable!() };
                let behind = last.lsn.0.saturating_sub(reported.0);
                if behind > budget {
                    return Err(format!("{} promoted {behind} bytes behind, budget {budget}", n.name));
                }
                // `remote` promises more: no commit the last primary acknowledged is lost.
                let before = self.leaders.get(&(self.etcd.epoch - 1)).and_then(|p| self.idx(p));
                if let Some(p) = before.filter(|_| self.config.replication.synchronous == Synchronous::Remote) {
                    let (prev, acked) = (&self.nodes[p].name, self.nodes[p].acked);
                    if prev != &n.name && n.received < acked {
                        return Err(format!(
                            "{} promoted with WAL to {}, but {prev} acknowledged commits up to {acked}",
                            n.name, n.received
                        ));
                    }
                }
            }
            PromotionKind::Switchover => {
                let sw = self.etcd.switchover.as_ref().ok_or("a switchover promotion with no request")?;
                let fin = sw.final_lsn.ok_or("a switchover promotion before the old primary stopped")?;
                if n.replayed <= fin.0 {
                    return Err(format!(
                        "{} promoted by switchover having replayed {} of the final checkpoint at {fin}",
                        n.name, n.replayed
                    ));
                }
            }
            PromotionKind::Dr => {}
            PromotionKind::Restore => return Err(format!("{} promoted as a restore nobody requested", n.name)),
        }
        Ok(())
    }

    fn hand_over_tick(&mut self, i: usize) -> Result<(), String> {
        let Some((final_lsn, deadline)) = self.nodes[i].handover else { return Ok(()) };
        let name = self.nodes[i].name.clone();
        // The hand-over writes to etcd: the agent's next decision reads anew.
        self.nodes[i].snapshot = None;
        let Some(sw) = self.etcd.switchover.clone() else {
            self.nodes[i].handover = None;
            return Ok(());
        };
        let replayed = self.etcd.members.get(&sw.to).and_then(|r| r.status.replay_lsn);
        let epoch = self.etcd.leader.as_ref().filter(|l| l.leader.node == name).map(|l| l.leader.epoch);
        match duties::hand_over(replayed, final_lsn, self.at(self.now), self.at(deadline)) {
            HandOver::Waiting => {}
            HandOver::Done => {
                if let Some(e) = epoch {
                    self.release(&name, e);
                }
                self.nodes[i].handover = None;
            }
            HandOver::TimedOut => {
                let lease = self.nodes[i].lease;
                let still = self.etcd.leader.as_ref().is_some_and(|l| l.leader.node == name && l.lease == lease);
                self.etcd.switchover = Some(SwitchoverRequest { aborted: Some("timeout".into()), ..sw });
                self.bump();
                let fresh = self.now < self.fresh_until(&self.nodes[i]);
                if duties::restart_read_write(still, fresh) {
                    // The agent empties the record first; if it cannot, the server stays stopped.
                    if self.unvouch(i, epoch.unwrap_or_default()) {
                        self.start_primary(i);
                    }
                } else {
                    self.nodes[i].fenced = true;
                    self.nodes[i].local = Local::Standby { upstream: None };
                }
                self.nodes[i].handover = None;
                if self.nodes[i].local == Local::Primary {
                    let ok = self.etcd.leader.as_ref().is_some_and(|l| l.leader.node == name && l.lease == lease);
                    if !ok || self.now >= self.fresh_until(&self.nodes[i]) {
                        return Err(format!("{name} restarted read-write after a timed-out switchover without leader"));
                    }
                }
            }
        }
        Ok(())
    }

    /// A server started read-write comes up with no synchronous standbys.
    fn start_primary(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.local = Local::Primary;
        n.sync_names.clear();
        n.sync_change = None;
    }

    /// `Agent::unvouch_before_restart`: empties the `sync` record of `epoch`
    /// by compare-and-swap on `leader`; false when `leader` is not this node's.
    fn unvouch(&mut self, i: usize, epoch: u64) -> bool {
        if self.config.replication.synchronous == Synchronous::Off {
            return true;
        }
        let name = self.nodes[i].name.clone();
        if !self.etcd.leader.as_ref().is_some_and(|l| l.leader.node == name && l.leader.epoch == epoch) {
            return false;
        }
        self.etcd.sync = Some(SyncRecord { node: name, epoch, standbys: vec![], at_ms: self.now });
        self.bump();
        true
    }

    /// `Agent::apply_synchronous_standbys` and `narrow_sync_record`, from a
    /// snapshot read now, with every etcd write a compare-and-swap on `leader`.
    fn sync_duty(&mut self, i: usize) {
        let n = &self.nodes[i];
        if self.config.replication.synchronous == Synchronous::Off
            || n.down
            || n.partitioned
            || n.local != Local::Primary
        {
            return;
        }
        let snap = self.snapshot();
        let me = n.name.clone();
        let Some(epoch) = snap.leader.as_ref().filter(|l| l.leader.node == me).map(|l| l.leader.epoch) else {
            return;
        };
        let holds = |m: &Model| m.etcd.leader.as_ref().is_some_and(|l| l.leader.node == me && l.leader.epoch == epoch);
        let mut vouched: Vec<String> = snap
            .sync
            .as_ref()
            .filter(|r| r.epoch == epoch && r.node == me)
            .map(|r| r.standbys.clone())
            .unwrap_or_default();
        let streaming = duties::streaming_standbys(&snap.members, &me);
        let names = crate::config::synchronous_standby_names(&self.config, &me, &streaming);
        let wanted = sync::names_in(names.as_deref());
        if let Some(standbys) = sync::record_before(&vouched, &n.sync_names, &wanted) {
            if !holds(self) {
                return;
            }
            self.etcd.sync = Some(SyncRecord { node: me.clone(), epoch, standbys: standbys.clone(), at_ms: self.now });
            self.bump();
            vouched = standbys;
        }
        let now = self.now;
        let n = &mut self.nodes[i];
        n.sync_names = wanted.clone();
        if wanted.is_empty() || sync::records(&vouched, &wanted) {
            n.sync_change = None;
            return;
        }
        let (set, at, since) = match n.sync_change.take() {
            Some(c) if c.0 == wanted => c,
            _ => (wanted, now, None),
        };
        let since = since.or((now >= at + 500).then_some(n.received));
        let Some(since) = since else {
            self.nodes[i].sync_change = Some((set, at, None));
            return;
        };
        let flushed: Vec<(String, Lsn)> = self
            .nodes
            .iter()
            .filter(|m| !m.down && m.local == Local::Standby { upstream: Some(me.clone()) })
            .filter(|m| m.timeline == self.nodes[i].timeline)
            .map(|m| (m.name.clone(), Lsn(m.received)))
            .collect();
        if sync::may_narrow(&set, Lsn(since), &flushed) && holds(self) {
            let standbys: Vec<String> = set.into_iter().collect();
            self.etcd.sync = Some(SyncRecord { node: me, epoch, standbys, at_ms: now });
            self.bump();
        } else {
            self.nodes[i].sync_change = Some((set, at, Some(since)));
        }
    }

    /// PostgreSQL acknowledges a read-write server's commits once one of its
    /// synchronous standbys has them (at once with none named).
    fn acknowledge(&mut self) {
        for p in self.read_write() {
            let (name, tl, received) = (self.nodes[p].name.clone(), self.nodes[p].timeline, self.nodes[p].received);
            let point = if self.nodes[p].sync_names.is_empty() {
                received
            } else {
                self.nodes
                    .iter()
                    .filter(|m| self.nodes[p].sync_names.contains(&m.name) && !m.down && m.timeline == tl)
                    .filter(|m| m.local == Local::Standby { upstream: Some(name.clone()) })
                    .map(|m| m.received.min(received))
                    .max()
                    .unwrap_or(0)
            };
            self.nodes[p].acked = self.nodes[p].acked.max(point);
        }
    }

    /// Checked after every step: at most one read-write server at any moment.
    fn check_always(&self) -> Result<(), String> {
        let rw = self.read_write();
        if rw.len() > 1 {
            let names: Vec<&str> = rw.iter().map(|&i| self.nodes[i].name.as_str()).collect();
            return Err(format!("split brain: {names:?} all run read-write"));
        }
        Ok(())
    }
}

fn arb_event(nodes: usize) -> impl Strategy<Value = Ev> {
    let i = 0..nodes;
    prop_oneof![
        24 => i.clone().prop_map(Ev::Observe),
        24 => i.clone().prop_map(Ev::Decide),
        30 => i.clone().prop_map(Ev::Busy),
        6 => i.clone().prop_map(Ev::Renew),
        6 => i.clone().prop_map(Ev::Publish),
        12 => (50u64..1500).prop_map(Ev::Advance),
        9 => (1u64..5000).prop_map(Ev::Write),
        9 => (i.clone(), 1u64..8000, 0u64..4000).prop_map(|(i, b, r)| Ev::Replicate(i, b, r)),
        3 => (i.clone(), any::<bool>()).prop_map(|(i, on)| Ev::Stall(i, on)),
        3 => (i.clone(), any::<bool>()).prop_map(|(i, on)| Ev::Partition(i, on)),
        6 => i.clone().prop_map(Ev::Crash),
        3 => i.clone().prop_map(Ev::Restart),
        6 => (i.clone(), 500u64..8000).prop_map(|(i, t)| Ev::Switchover(i, t)),
        1 => i.clone().prop_map(Ev::Dr),
        6 => i.prop_map(Ev::HandOverTick),
    ]
}

/// As `arb_event`, with the primary's synchronous duty as often as a decision.
fn arb_sync_event(nodes: usize) -> impl Strategy<Value = Ev> {
    prop_oneof![
        8 => arb_event(nodes),
        2 => (0..nodes).prop_map(Ev::SyncDuty),
        1 => (1u64..5000).prop_map(Ev::Write),
        1 => (0..nodes).prop_map(|i| Ev::Partition(i, false)),
    ]
}

fn arb_mode() -> impl Strategy<Value = FailoverMode> {
    prop_oneof![3 => Just(FailoverMode::Automatic), 1 => Just(FailoverMode::Manual)]
}

/// Runs one interleaving; the error names the violated property and the step.
fn run(
    within: FailoverMode,
    cross: FailoverMode,
    budget: u64,
    synchronous: Synchronous,
    events: &[Ev],
) -> Result<(), String> {
    let mut m = Model::new(within, cross, budget, synchronous);
    for (k, ev) in events.iter().enumerate() {
        m.step(ev).map_err(|e| format!("step {k} ({ev:?}) at {} ms: {e}", m.now))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    /// Nodes deciding from their own, possibly stale, views: at most one
    /// leader per epoch and one read-write server at a time; never
    /// read-write without a fresh lease and the current leader key; never a
    /// failover promotion beyond the budget or against a manual mode; never a
    /// switchover promotion before the old primary's final checkpoint is replayed.
    #[test]
    fn nodes_with_their_own_stale_views_keep_every_promise(
        within in arb_mode(),
        cross in arb_mode(),
        budget in 0u64..20_000,
        events in prop::collection::vec(arb_event(4), 100..500),
    ) {
        if let Err(e) = run(within, cross, budget, Synchronous::Off, &events) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// The same with `synchronous = remote`, the primary keeping the `sync`
    /// record as its agent does: besides every promise above, no failover
    /// promotes a node without every commit the last primary acknowledged
    /// (commits acknowledged while it ran asynchronously included).
    #[test]
    fn with_synchronous_remote_no_failover_loses_an_acknowledged_commit(
        within in arb_mode(),
        cross in arb_mode(),
        budget in 0u64..20_000,
        events in prop::collection::vec(arb_sync_event(4), 100..500),
    ) {
        if let Err(e) = run(within, cross, budget, Synchronous::Remote, &events) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The model does reach the states the properties are about: failovers,
/// completed switchovers and refused promotions all happen in generated runs.
#[test]
fn the_model_reaches_failovers_and_switchovers() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    for synchronous in [Synchronous::Off, Synchronous::Remote] {
        let mut runner = TestRunner::deterministic();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        let (mut vouching, mut unvouched, mut kept) = (0, 0, 0);
        for _ in 0..200 {
            let events = match synchronous {
                Synchronous::Off => {
                    prop::collection::vec(arb_event(4), 400..401).new_tree(&mut runner).unwrap().current()
                }
                _ => prop::collection::vec(arb_sync_event(4), 400..401).new_tree(&mut runner).unwrap().current(),
            };
            let mut m = Model::new(FailoverMode::Automatic, FailoverMode::Automatic, 20_000, synchronous);
            for ev in &events {
                m.step(ev).unwrap();
                match m.etcd.sync.as_ref().map(|r| r.standbys.is_empty()) {
                    Some(true) => unvouched += 1,
                    Some(false) => vouching += 1,
                    None => {}
                }
            }
            for k in &m.promoted {
                *kinds.entry(k.to_string()).or_default() += 1;
            }
            kept += m.kept_without_etcd;
        }
        eprintln!("{synchronous}: promotions in 200 runs: {kinds:?}; steps with a vouching record {vouching}, an empty one {unvouched}; primaries kept while etcd did not answer {kept}");
        for kind in ["failover", "switchover", "dr"] {
            assert!(
                kinds.get(kind).copied().unwrap_or(0) >= 5,
                "{synchronous}: too few {kind} promotions to test anything: {kinds:?}"
            );
        }
        if synchronous == Synchronous::Remote {
            assert!(vouching > 1000 && unvouched > 1000, "the record both vouches and empties: {vouching} {unvouched}");
        }
    }
}

/// The hole the `sync` record closes, step by step: the remote standbys are
/// cut off, the primary goes on asynchronously and acknowledges a write no
/// standby has, then dies; the remote standbys come back. None of them may be
/// promoted; the former primary, back, is.
#[test]
fn commits_acknowledged_asynchronously_are_never_lost_to_a_failover() {
    let mut m = Model::new(FailoverMode::Automatic, FailoverMode::Automatic, 20_000, Synchronous::Remote);
    let all = |ev: fn(usize) -> Ev| (0..4).map(ev).collect::<Vec<_>>();
    let run = |m: &mut Model, evs: Vec<Ev>| {
        for ev in evs {
            m.step(&ev).unwrap_or_else(|e| panic!("{ev:?}: {e}"));
        }
    };
    // Healthy: every standby streams, and the primary vouches for the remote ones.
    for _ in 0..3 {
        run(&mut m, all(Ev::Busy));
        run(&mut m, vec![Ev::Advance(600)]);
    }
    run(&mut m, vec![Ev::SyncDuty(0)]);
    let vouched = m.etcd.sync.clone().expect("a record");
    assert_eq!(vouched.standbys, vec!["r2a".to_string(), "r2b".to_string()], "{vouched:?}");
    // r1b (same region) and the remote standbys stop receiving; the remote ones are cut off.
    run(&mut m, vec![Ev::Stall(1, true), Ev::Partition(2, true), Ev::Partition(3, true)]);
    for _ in 0..6 {
        run(&mut m, vec![Ev::Busy(0), Ev::Busy(1), Ev::Advance(700)]);
    }
    run(&mut m, vec![Ev::SyncDuty(0)]);
    assert_eq!(m.etcd.sync.as_ref().map(|r| r.standbys.len()), Some(0), "the record empties first");
    run(&mut m, vec![Ev::Write(3000), Ev::Publish(0)]);
    assert_eq!(m.nodes[0].acked, m.nodes[0].received, "asynchronous: acknowledged at once");
    run(&mut m, vec![Ev::Crash(0), Ev::Partition(2, false), Ev::Partition(3, false), Ev::Stall(1, false)]);
    // Well past the lease, every standby looks and decides, many times.
    for _ in 0..20 {
        run(&mut m, vec![Ev::Advance(400)]);
        for i in 1..4 {
            run(&mut m, vec![Ev::Busy(i), Ev::Observe(i), Ev::Decide(i)]);
        }
    }
    assert!(m.promoted.is_empty(), "promoted without the acknowledged write: {:?}", m.promoted);
    // The former primary comes back, as a standby first, and leads again.
    run(&mut m, vec![Ev::Restart(0)]);
    for _ in 0..10 {
        run(&mut m, vec![Ev::Advance(300)]);
        for i in 0..4 {
            run(&mut m, vec![Ev::Busy(i), Ev::Observe(i), Ev::Decide(i)]);
        }
    }
    assert_eq!(m.promoted, vec![PromotionKind::Failover]);
    assert_eq!(m.etcd.leader.as_ref().map(|l| l.leader.node.as_str()), Some("r1a"));
}

/// etcd falls silent for the primary alone (an etcd election, a cut link).
/// A silence shorter than its lease's freshness costs nothing: it stays
/// primary, on its timeline, and nobody promotes. A longer one ends its
/// writes when the lease is no longer provably alive, and another node
/// takes over only after etcd expired that lease: at no step do two servers
/// run read-write (`check_always`, after every step).
#[test]
fn a_primary_rides_out_a_short_silence_of_etcd_and_fences_on_a_long_one() {
    let mut m = Model::new(FailoverMode::Automatic, FailoverMode::Automatic, 20_000, Synchronous::Off);
    let run = |m: &mut Model, evs: &[Ev]| {
        for ev in evs {
            m.step(ev).unwrap_or_else(|e| panic!("{ev:?} at {} ms: {e}", m.now));
        }
    };
    let everyone_looks = |m: &mut Model| {
        for i in 0..4 {
            run(m, &[Ev::Busy(i), Ev::Observe(i), Ev::Decide(i)]);
        }
    };
    for _ in 0..3 {
        everyone_looks(&mut m);
        run(&mut m, &[Ev::Advance(600)]);
    }
    assert_eq!(m.read_write(), vec![0]);

    // Short: 2 s from a renewal, within the 4 s the lease stays provably
    // alive less the 1.5 s it must have to spare.
    everyone_looks(&mut m);
    run(&mut m, &[Ev::Partition(0, true)]);
    for _ in 0..4 {
        run(&mut m, &[Ev::Advance(500)]);
        everyone_looks(&mut m);
    }
    assert_eq!(m.read_write(), vec![0], "the primary kept running through a short silence");
    assert!(!m.nodes[0].fenced && m.promoted.is_empty());
    run(&mut m, &[Ev::Partition(0, false)]);
    everyone_looks(&mut m);
    assert_eq!((m.read_write(), m.nodes[0].timeline), (vec![0], 1), "and goes on as it was");

    // Long: writes end when the lease is no longer provably alive; a failover follows its expiry.
    run(&mut m, &[Ev::Partition(0, true)]);
    let cut_at = m.now;
    let mut ended_at = None;
    for _ in 0..30 {
        run(&mut m, &[Ev::Advance(250)]);
        everyone_looks(&mut m);
        if ended_at.is_none() && m.nodes[0].local != Local::Primary {
            ended_at = Some(m.now - cut_at);
        }
    }
    let ended_at = ended_at.expect("the cut-off primary stopped taking writes");
    assert!(ended_at <= TTL_MS - TTL_MS / 3, "writes ended {ended_at} ms into the silence");
    assert!(m.nodes[0].fenced);
    assert_eq!(m.promoted, vec![PromotionKind::Failover]);
    let leader = m.etcd.leader.as_ref().map(|l| l.leader.node.clone());
    assert!(leader.as_deref().is_some_and(|l| l != "r1a"), "{leader:?}");
}
