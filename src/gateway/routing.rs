//! Where a connection or a name goes, from one snapshot: pure functions shared
//! by the proxy and DNS, so that both always agree.

use std::net::SocketAddr;

use crate::cluster::{Epoch, Role};
use crate::config::{Config, LagBudget};
use crate::coord::Snapshot;

/// A backend to relay to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub node: String,
    pub address: SocketAddr,
    /// The leader's epoch when the backend is the leader; `None` for a standby.
    pub epoch: Option<Epoch>,
}

/// Why there is no writer right now; the proxy waits for it to pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoWriter {
    /// Writes wait while a planned switchover moves the primary.
    SwitchoverInProgress { from: String, to: String },
    /// Nobody holds `leader` of the current epoch.
    NoLeader,
    /// The leader's agent does not (yet) report it running as primary of its epoch.
    NotPrimaryYet { node: String },
}

impl std::fmt::Display for NoWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoWriter::SwitchoverInProgress { from, to } => write!(f, "a switchover from {from} to {to} is in progress"),
            NoWriter::NoLeader => f.write_str("the cluster has no leader"),
            NoWriter::NotPrimaryYet { node } => write!(f, "{node} holds leader but does not run as primary yet"),
        }
    }
}

/// The node writes may go to: the holder of `leader` for the current epoch,
/// once its agent reports it running as primary of that epoch (a promotion in
/// progress is not yet writable), and not while a switchover is under way.
pub fn writer(config: &Config, snap: &Snapshot) -> Result<Backend, NoWriter> {
    let leader = leader_node(config, snap);
    let ready = leader.as_ref().is_some_and(|leader| {
        snap.members.iter().any(|m| {
            m.node == leader.node
                && m.role == Role::Primary
                && m.healthy
                && m.epoch_seen >= leader.epoch.unwrap_or(0)
                && m.is_fresh()
        })
    });
    // A switchover's old primary serves until its report says it stopped taking
    // writes (after its checkpoint): only then do new transactions wait.
    match leader {
        Some(leader) if ready => Ok(leader),
        _ if snap.switchover.as_ref().is_some_and(|s| s.aborted.is_none()) => {
            let sw = snap.switchover.as_ref().expect("checked above");
            Err(NoWriter::SwitchoverInProgress { from: sw.from.clone(), to: sw.to.clone() })
        }
        Some(leader) => Err(NoWriter::NotPrimaryYet { node: leader.node }),
        None => Err(NoWriter::NoLeader),
    }
}

/// The writer for a new session-mode connection: none from the moment a
/// switchover is requested. A session outlives transactions, so one opened
/// on the old primary while it checkpoints would only be cut when it stops;
/// transaction pooling (`writer`) keeps sending it transactions until then.
pub fn writer_for_sessions(config: &Config, snap: &Snapshot) -> Result<Backend, NoWriter> {
    if let Some(sw) = snap.switchover.as_ref().filter(|s| s.aborted.is_none()) {
        return Err(NoWriter::SwitchoverInProgress { from: sw.from.clone(), to: sw.to.clone() });
    }
    writer(config, snap)
}

/// The holder of `leader`, if it is of the current epoch; what DNS answers for `writer`.
pub fn leader_node(config: &Config, snap: &Snapshot) -> Option<Backend> {
    let l = &snap.leader.as_ref()?.leader;
    if l.epoch != snap.epoch {
        return None;
    }
    let (_, node) = config.node(&l.node).ok()?;
    Some(Backend { node: l.node.clone(), address: node.address, epoch: Some(l.epoch) })
}

/// The node a rolling restart is about to restart (its `restart` request is
/// not carried out yet): readers move off it before its server stops.
pub fn restarting(snap: &Snapshot) -> Option<&crate::cluster::RestartRequest> {
    let req = snap.restart.as_ref()?;
    let done = snap.members.iter().any(|m| m.node == req.node && m.restarted_for.as_deref() == Some(req.id.as_str()));
    (!done).then_some(req)
}

/// Standbys of `region` that readers may use: streaming, healthy, reporting,
/// within `max_lag`, and not about to restart. Sorted by name so that callers
/// can spread load.
pub fn readers(config: &Config, snap: &Snapshot, region: &str, max_lag: LagBudget) -> Vec<Backend> {
    let restarting = restarting(snap).map(|r| r.node.as_str());
    let mut out: Vec<Backend> = snap
        .members
        .iter()
        .filter(|m| m.region == region && m.role == Role::Replica && m.healthy && m.is_fresh())
        .filter(|m| restarting != Some(m.node.as_str()))
        .filter(|m| match max_lag {
            LagBudget::Bytes(b) => m.lag_bytes.is_some_and(|l| l <= b),
            LagBudget::Time(t) => m.lag_seconds.is_some_and(|l| l <= t.as_secs_f64()),
        })
        .filter_map(|m| {
            let (_, node) = config.node(&m.node).ok()?;
            Some(Backend { node: m.node.clone(), address: node.address, epoch: None })
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// Aggregated verdicts, as `health::aggregate` computes them.
pub type Verdicts = std::collections::BTreeMap<String, bool>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::{Leader, Lsn, MemberStatus, SwitchoverRequest, STALE_REPORT_MS};
    use crate::coord::LeaderEntry;
    use crate::lab::topology::{lab_config, LabShape};

    pub(crate) const NOW: u64 = 1_000_000;

    /// A fresh, healthy report at `NOW` (shared with the zone's tests).
    pub(crate) fn member(node: &str, region: &str, role: Role, lag: u64) -> MemberStatus {
        MemberStatus {
            node: node.into(),
            region: region.into(),
            role,
            timeline: Some(1),
            write_lsn: Some(Lsn(100)),
            flush_lsn: Some(Lsn(100)),
            replay_lsn: Some(Lsn(100)),
            lag_bytes: Some(lag),
            lag_seconds: Some(0.0),
            upstream: None,
            epoch_seen: 2,
            healthy: true,
            detail: None,
            waiting: None,
            failure: None,
            cert_not_after: None,
            archive: None,
            commit_hold: None,
            updated_at_ms: NOW,
            config_version: 0,
            pending_restart: Vec::new(),
            restarted_for: None,
            hung_recently: false,
            unchanged_ms: 0,
            revision: 1,
        }
    }

    fn cluster() -> (Config, Snapshot) {
        let shape = LabShape { nodes_per_region: 2, ..LabShape::default() };
        let config = lab_config(&shape, std::path::Path::new("/tmp/lab"));
        let snap = Snapshot {
            epoch: 2,
            leader: Some(LeaderEntry { leader: Leader { node: "ap-south-1a".into(), epoch: 2 }, lease: 1 }),
            members: vec![
                member("ap-south-1a", "ap-south-1", Role::Primary, 0),
                member("ap-south-1b", "ap-south-1", Role::Replica, 10),
                member("ap-northeast-1a", "ap-northeast-1", Role::Replica, 64 << 20),
                member("ap-northeast-1b", "ap-northeast-1", Role::Replica, 0),
            ],
            ..Snapshot::default()
        };
        (config, snap)
    }

    #[test]
    fn the_writer_is_the_leader_of_the_current_epoch_running_as_primary() {
        let (config, mut snap) = cluster();
        assert_eq!(writer(&config, &snap).unwrap().node, "ap-south-1a");
        // A promotion in progress: leader taken, PostgreSQL still in recovery.
        snap.members[0].role = Role::Replica;
        assert!(writer(&config, &snap).is_err());
        snap.members[0].role = Role::Primary;
        // A report from before the epoch it leads.
        snap.members[0].epoch_seen = 1;
        assert!(writer(&config, &snap).is_err());
        snap.members[0].epoch_seen = 2;
        // A report this gateway has not seen rewritten for too long.
        snap.members[0].unchanged_ms = STALE_REPORT_MS + 1;
        assert!(writer(&config, &snap).is_err());
        snap.members[0].unchanged_ms = 0;
        // An epoch granted since: the leader key is from the past.
        snap.epoch = 3;
        assert!(writer(&config, &snap).is_err());
        assert_eq!(leader_node(&config, &snap), None);
    }

    #[test]
    fn a_switchover_holds_writes_once_the_old_primary_stops_taking_them() {
        let (config, mut snap) = cluster();
        let mut sw = SwitchoverRequest {
            from: "ap-south-1a".into(),
            to: "ap-south-1b".into(),
            requested_by: "test".into(),
            requested_at_ms: NOW,
            timeout_ms: 10_000,
            final_lsn: None,
            aborted: None,
        };
        snap.switchover = Some(sw.clone());
        assert!(writer(&config, &snap).is_ok(), "the old primary serves while it checkpoints");
        let primary = snap.members.iter().position(|m| m.node == "ap-south-1a").unwrap();
        snap.members[primary].role = Role::Starting;
        assert!(matches!(writer(&config, &snap), Err(NoWriter::SwitchoverInProgress { .. })), "then writes wait");
        snap.leader = None;
        assert!(matches!(writer(&config, &snap), Err(NoWriter::SwitchoverInProgress { .. })), "also once released");
        snap.members[primary].role = Role::Primary;
        assert!(
            matches!(writer_for_sessions(&config, &snap), Err(NoWriter::SwitchoverInProgress { .. })),
            "new sessions wait from the request"
        );
        sw.aborted = Some("timeout".into());
        snap.switchover = Some(sw);
        assert!(matches!(writer(&config, &snap), Err(NoWriter::NoLeader)), "an aborted request is no reason");
    }

    #[test]
    fn readers_are_local_streaming_standbys_within_the_lag_bound() {
        let (config, mut snap) = cluster();
        let names = |v: Vec<Backend>| v.into_iter().map(|b| b.node).collect::<Vec<_>>();
        let budget = LagBudget::Bytes(16 << 20);
        assert_eq!(names(readers(&config, &snap, "ap-south-1", budget)), ["ap-south-1b"]);
        assert_eq!(names(readers(&config, &snap, "ap-northeast-1", budget)), ["ap-northeast-1b"]);
        assert!(readers(&config, &snap, "witness", budget).is_empty());
        snap.members[1].healthy = false;
        assert!(readers(&config, &snap, "ap-south-1", budget).is_empty());
    }

    #[test]
    fn readers_leave_a_standby_whose_restart_is_requested_until_it_is_carried_out() {
        let (config, mut snap) = cluster();
        let budget = LagBudget::Bytes(16 << 20);
        let req = crate::cluster::RestartRequest {
            id: "r1".into(),
            node: "ap-south-1b".into(),
            reason: "test".into(),
            requested_by: "ap-south-1".into(),
            requested_at_ms: NOW,
        };
        snap.restart = Some(req);
        assert_eq!(restarting(&snap).map(|r| r.id.as_str()), Some("r1"));
        assert!(readers(&config, &snap, "ap-south-1", budget).is_empty());
        assert_eq!(readers(&config, &snap, "ap-northeast-1", budget).len(), 1, "other nodes are not affected");
        let i = snap.members.iter().position(|m| m.node == "ap-south-1b").unwrap();
        snap.members[i].restarted_for = Some("r1".into());
        assert!(restarting(&snap).is_none(), "carried out: the request waits only for the gateway to remove it");
        assert_eq!(readers(&config, &snap, "ap-south-1", budget).len(), 1);
    }
}
