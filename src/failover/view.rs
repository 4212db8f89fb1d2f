//! Building what `decide` decides from, purely: the cluster file, the etcd
//! snapshot, the facts the agent gathered about its own server, and the
//! time, in; a `NodeView` out. The agent's shell gathers (queries,
//! `pg_controldata`, the lease's clock) and this module interprets, so every
//! rule about who counts as a candidate, what is fresh and who is ready is
//! written once and tested without a server.

use std::time::{Duration, Instant};

use super::{Candidate, LastPrimary, Local, NodeView, Policy, Shared};
use crate::cluster::{MemberStatus, Role};
use crate::config::Config;
use crate::coord::{LeaseId, Snapshot};

/// A standby not streaming for this long, on a timeline behind the leader's, is rewound.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// A primary riding out a silence of etcd gives up a read of etcd this long
/// before its lease stops being provably alive, so that it fences itself
/// before its supervisor's deadline does (which would stop the server under
/// an agent that still takes it for running).
pub const READ_SPARE: Duration = Duration::from_millis(500);

/// A primary keeps running through a silence of etcd only while its lease
/// stays provably alive for this long: one more tick of the agent (1 s) and
/// a read cut short `READ_SPARE` before the end.
pub const SILENCE_SPARE: Duration = Duration::from_millis(1500);

/// What the agent knows about its own server and lease, gathered by the shell.
#[derive(Debug, Clone)]
pub struct Facts {
    pub me: String,
    /// What runs here, from the agent's record of the server it started.
    pub local: Local,
    /// The control file's timeline; read by the shell only for a stopped server
    /// (the only state in which it is trustworthy).
    pub control_timeline: Option<u32>,
    /// The timeline the running server last reported.
    pub running_timeline: Option<u32>,
    /// Since when a running standby has not been streaming.
    pub not_streaming_since: Option<Instant>,
    /// This agent's current lease.
    pub lease: LeaseId,
    /// Until when etcd certainly has not expired that lease (`LeaseKeeper::fresh_until`).
    pub lease_fresh_until: Instant,
    /// The etcd revision at which this agent first saw no leader (`leaderless_since`).
    pub leaderless_since_revision: Option<i64>,
    /// The lease under which the last etcd snapshot that answered showed this
    /// node holding `leader` of the current epoch (`leading_lease`).
    pub led_under: Option<LeaseId>,
}

/// The revision since which the cluster has had no leader, as this agent saw
/// it: kept while the leader stays absent, set at the first snapshot without
/// one, cleared when one appears.
pub fn leaderless_since(previous: Option<i64>, snapshot: &Snapshot) -> Option<i64> {
    match (&snapshot.leader, previous) {
        (Some(_), _) => None,
        (None, Some(r)) => Some(r),
        (None, None) => Some(snapshot.revision),
    }
}

/// The lease under which this node held `leader` of the current epoch in the
/// last snapshot that answered: set or cleared by every snapshot, kept while
/// etcd does not answer (`snapshot` None).
pub fn leading_lease(previous: Option<LeaseId>, snapshot: Option<&Snapshot>, me: &str) -> Option<LeaseId> {
    let Some(s) = snapshot else { return previous };
    s.leader.as_ref().filter(|l| l.leader.node == me && l.leader.epoch == s.epoch).map(|l| l.lease)
}

/// Everything `decide` looks at. `snapshot` is None when etcd did not answer.
pub fn build(config: &Config, facts: &Facts, snapshot: Option<&Snapshot>, now: Instant) -> NodeView {
    let local_timeline = match facts.local {
        Local::Stopped => facts.control_timeline,
        Local::Empty => None,
        _ => facts.running_timeline,
    };
    let f = &config.failover;
    NodeView {
        me: facts.me.clone(),
        bootstrap_node: config.bootstrap_node().is_some_and(|n| n.name == facts.me),
        local: facts.local.clone(),
        local_timeline,
        stalled: facts.not_streaming_since.is_some_and(|t| now.saturating_duration_since(t) >= STALL_AFTER),
        shared: snapshot.map(|s| shared(config, facts, s)),
        lease_fresh: now < facts.lease_fresh_until,
        led_with_time_to_spare: facts.led_under == Some(facts.lease) && now + SILENCE_SPARE < facts.lease_fresh_until,
        policy: Policy {
            within_region: f.within_region,
            cross_region: f.cross_region,
            max_lag: f.max_lag_on_failover,
            synchronous: config.replication.synchronous,
        },
    }
}

fn shared(config: &Config, facts: &Facts, s: &Snapshot) -> Shared {
    let leader_report = s.leader.as_ref().and_then(|l| s.members.iter().find(|m| m.node == l.leader.node));
    Shared {
        leader: s.leader.as_ref().map(|l| l.leader.clone()),
        leader_is_my_lease: s.leader.as_ref().is_some_and(|l| l.lease == facts.lease),
        // A just-promoted primary reports its timeline only once its control file has it.
        leader_ready: leader_report.is_some_and(|m| m.role == Role::Primary && m.healthy && m.timeline.is_some()),
        leader_timeline: leader_report.and_then(|m| m.timeline),
        epoch: s.epoch,
        initialized_by: s.initialized_by.clone(),
        candidates: s.members.iter().filter_map(|m| candidate(config, m)).collect(),
        // Only the current epoch's leader's position: an older one names a
        // primary that is not the last (the model found a leader promoted by
        // a DR switch that acknowledged a commit before it first recorded its
        // position, and the previous epoch's primary then promoted as if it
        // were "the former primary itself").
        last_primary: s.optime.as_ref().filter(|o| o.epoch == s.epoch).map(|o| LastPrimary {
            node: o.node.clone(),
            region: o.region.clone(),
            lsn: o.lsn,
        }),
        sync: s.sync.clone().filter(|r| r.epoch == s.epoch),
        leaderless_since_revision: facts.leaderless_since_revision,
        switchover: s.switchover.clone().filter(|sw| sw.aborted.is_none()),
        dr: s.dr.clone().filter(|d| d.done_epoch.is_none()),
        restore: s.restore.clone(),
    }
}

/// A member counts as a candidate when its report is fresh, it runs as a
/// standby (a fenced former primary included), it is in the cluster file, and
/// it reported both positions.
pub fn candidate(config: &Config, m: &MemberStatus) -> Option<Candidate> {
    if !m.is_fresh() || !matches!(m.role, Role::Replica | Role::Fenced) {
        return None;
    }
    let (region, _) = config.node(&m.node).ok()?;
    Some(Candidate {
        node: m.node.clone(),
        region: region.name.clone(),
        priority: region.priority.unwrap_or(u32::MAX),
        lsn: m.write_lsn.or(m.replay_lsn)?,
        replay_lsn: m.replay_lsn?,
        lag_seconds: m.lag_seconds,
        timeline: m.timeline,
        reported_revision: m.revision,
        hung_recently: m.hung_recently,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{DrSwitch, Leader, Lsn, Optime, SwitchoverRequest, STALE_REPORT_MS};
    use crate::coord::LeaderEntry;

    fn config() -> Config {
        let shape = crate::lab::topology::LabShape { nodes_per_region: 2, ..Default::default() };
        crate::lab::topology::lab_config(&shape, std::path::Path::new("/tmp/view-test"))
    }

    fn member(config: &Config, node: &str, role: Role) -> MemberStatus {
        let (region, _) = config.node(node).unwrap();
        MemberStatus {
            node: node.into(),
            region: region.name.clone(),
            role,
            timeline: Some(1),
            write_lsn: Some(Lsn(2000)),
            flush_lsn: Some(Lsn(2000)),
            replay_lsn: Some(Lsn(1900)),
            lag_bytes: Some(100),
            lag_seconds: Some(0.1),
            upstream: None,
            epoch_seen: 1,
            healthy: true,
            detail: None,
            waiting: None,
            failure: None,
            cert_not_after: None,
            archive: None,
            commit_hold: None,
            updated_at_ms: 0,
            config_version: 0,
            pending_restart: Vec::new(),
            restarted_for: None,
            hung_recently: false,
            unchanged_ms: 100,
            revision: 42,
        }
    }

    fn facts(me: &str, local: Local, now: Instant) -> Facts {
        Facts {
            me: me.into(),
            local,
            control_timeline: Some(3),
            running_timeline: Some(4),
            not_streaming_since: None,
            lease: 7,
            lease_fresh_until: now + Duration::from_secs(1),
            leaderless_since_revision: None,
            led_under: None,
        }
    }

    #[test]
    fn candidates_are_fresh_standbys_of_the_cluster_file_with_positions() {
        let c = config();
        let names = c.node_names();
        let (a, b) = (names[0].as_str(), names[1].as_str());
        let ok = member(&c, b, Role::Replica);
        assert_eq!(candidate(&c, &ok).map(|x| (x.lsn, x.replay_lsn)), Some((Lsn(2000), Lsn(1900))));
        assert!(candidate(&c, &member(&c, a, Role::Fenced)).is_some(), "a fenced former primary is a candidate");
        for role in [Role::Primary, Role::Starting, Role::Stopped, Role::Unknown] {
            assert!(candidate(&c, &member(&c, b, role)).is_none(), "{role} is no candidate");
        }
        let stale = MemberStatus { unchanged_ms: STALE_REPORT_MS + 1, ..ok.clone() };
        assert!(candidate(&c, &stale).is_none(), "a stale report is no candidate");
        let edge = MemberStatus { unchanged_ms: STALE_REPORT_MS, ..ok.clone() };
        assert!(candidate(&c, &edge).is_some(), "fresh up to STALE_REPORT_MS");
        let stranger = MemberStatus { node: "not-in-the-file".into(), ..ok.clone() };
        assert!(candidate(&c, &stranger).is_none(), "a node outside the cluster file is no candidate");
        assert!(candidate(&c, &MemberStatus { replay_lsn: None, ..ok.clone() }).is_none());
        let received_unknown = candidate(&c, &MemberStatus { write_lsn: None, ..ok.clone() }).unwrap();
        assert_eq!(received_unknown.lsn, Lsn(1900), "ranked on replay when nothing is known to be received");
        assert_eq!(candidate(&c, &ok).unwrap().reported_revision, 42);
    }

    #[test]
    fn readiness_lease_and_requests() {
        let c = config();
        let names = c.node_names();
        let (a, b) = (names[0].as_str(), names[1].as_str());
        let now = Instant::now();
        let mut snap = Snapshot {
            revision: 50,
            leader: Some(LeaderEntry { leader: Leader { node: a.into(), epoch: 2 }, lease: 7 }),
            epoch: 2,
            members: vec![member(&c, a, Role::Primary), member(&c, b, Role::Replica)],
            optime: Some(Optime {
                node: a.into(),
                region: "r".into(),
                epoch: 2,
                lsn: Lsn(5),
                timeline: Some(2),
                at_ms: 0,
            }),
            ..Snapshot::default()
        };
        let f = facts(a, Local::Primary, now);
        let v = build(&c, &f, Some(&snap), now);
        let s = v.shared.clone().unwrap();
        assert!(s.leader_ready && s.leader_is_my_lease && v.lease_fresh);
        assert_eq!(s.candidates.len(), 1);
        assert_eq!(s.last_primary.unwrap().lsn, Lsn(5));
        assert_eq!(v.local_timeline, Some(4), "a running server's timeline comes from its last query");
        assert!(v.bootstrap_node == (c.bootstrap_node().unwrap().name == a));

        let later = now + Duration::from_secs(1);
        assert!(!build(&c, &f, Some(&snap), later).lease_fresh, "fresh strictly before fresh_until");
        let other_lease = Facts { lease: 8, ..f.clone() };
        assert!(!build(&c, &other_lease, Some(&snap), now).shared.unwrap().leader_is_my_lease);

        snap.members[0].healthy = false;
        assert!(!build(&c, &f, Some(&snap), now).shared.unwrap().leader_ready, "an unhealthy primary is not ready");
        snap.members[0].healthy = true;
        snap.members[0].timeline = None;
        assert!(
            !build(&c, &f, Some(&snap), now).shared.unwrap().leader_ready,
            "a primary whose control file does not have its timeline yet is not ready"
        );
        snap.members[0].timeline = Some(4);
        snap.members[0].role = Role::Starting;
        assert!(!build(&c, &f, Some(&snap), now).shared.unwrap().leader_ready, "a starting leader is not ready");

        let sw = SwitchoverRequest {
            from: a.into(),
            to: b.into(),
            requested_by: "t".into(),
            requested_at_ms: 0,
            timeout_ms: 1000,
            final_lsn: None,
            aborted: None,
        };
        snap.switchover = Some(SwitchoverRequest { aborted: Some("late".into()), ..sw.clone() });
        assert!(build(&c, &f, Some(&snap), now).shared.unwrap().switchover.is_none(), "aborted requests are left out");
        snap.switchover = Some(sw.clone());
        assert_eq!(build(&c, &f, Some(&snap), now).shared.unwrap().switchover, Some(sw));
        let dr = DrSwitch {
            active_region: "r".into(),
            target: b.into(),
            allow_data_loss: false,
            set_by: "t".into(),
            at_ms: 0,
            lost_bytes_estimate: 0,
            done_epoch: Some(3),
            trigger: None,
        };
        snap.dr = Some(dr.clone());
        assert!(build(&c, &f, Some(&snap), now).shared.unwrap().dr.is_none(), "done DR switches are left out");
        snap.dr = Some(DrSwitch { done_epoch: None, ..dr });
        assert!(build(&c, &f, Some(&snap), now).shared.unwrap().dr.is_some());
        assert!(build(&c, &f, None, now).shared.is_none(), "no snapshot, no shared view");
    }

    #[test]
    fn timelines_and_stalls() {
        let c = config();
        let now = Instant::now();
        let stopped = facts("x", Local::Stopped, now);
        assert_eq!(build(&c, &stopped, None, now).local_timeline, Some(3), "a stopped server's from its control file");
        assert_eq!(build(&c, &facts("x", Local::Empty, now), None, now).local_timeline, None);
        let since = now;
        let standby = Facts { not_streaming_since: Some(since), ..facts("x", Local::Standby { upstream: None }, now) };
        assert!(!build(&c, &standby, None, since + STALL_AFTER - Duration::from_millis(1)).stalled);
        assert!(build(&c, &standby, None, since + STALL_AFTER).stalled);
    }

    #[test]
    fn leaderless_since_is_the_first_revision_without_a_leader() {
        let none = Snapshot { revision: 10, ..Snapshot::default() };
        assert_eq!(leaderless_since(None, &none), Some(10));
        let later = Snapshot { revision: 15, ..Snapshot::default() };
        assert_eq!(leaderless_since(Some(10), &later), Some(10), "kept while the leader stays absent");
        let led = Snapshot {
            revision: 20,
            leader: Some(LeaderEntry { leader: Leader { node: "a".into(), epoch: 1 }, lease: 1 }),
            ..Snapshot::default()
        };
        assert_eq!(leaderless_since(Some(10), &led), None);
        assert_eq!(leaderless_since(None, &Snapshot { revision: 30, ..Snapshot::default() }), Some(30));
    }

    #[test]
    fn the_lease_led_under_is_kept_only_while_etcd_is_silent() {
        let entry = |node: &str, epoch| Some(LeaderEntry { leader: Leader { node: node.into(), epoch }, lease: 7 });
        let led = Snapshot { epoch: 2, leader: entry("a", 2), ..Snapshot::default() };
        assert_eq!(leading_lease(None, Some(&led), "a"), Some(7));
        assert_eq!(leading_lease(Some(7), None, "a"), Some(7), "kept while etcd does not answer");
        assert_eq!(leading_lease(Some(7), Some(&led), "b"), None, "another node's");
        let old_epoch = Snapshot { epoch: 3, leader: entry("a", 2), ..Snapshot::default() };
        assert_eq!(
            leading_lease(Some(7), Some(&old_epoch), "a"),
            None,
            "held for an epoch that is not the current one"
        );
        assert_eq!(leading_lease(Some(7), Some(&Snapshot::default()), "a"), None, "gone");

        // The view counts it only under the agent's current lease.
        let c = config();
        let a = c.node_names()[0].clone();
        let now = Instant::now();
        let led_facts = Facts {
            led_under: Some(7),
            lease_fresh_until: now + SILENCE_SPARE + Duration::from_millis(1),
            ..facts(&a, Local::Primary, now)
        };
        assert!(build(&c, &led_facts, None, now).led_with_time_to_spare);
        let regranted = Facts { lease: 8, ..led_facts.clone() };
        assert!(
            !build(&c, &regranted, None, now).led_with_time_to_spare,
            "a lease granted since is not the one led under"
        );
        let short = Facts { lease_fresh_until: now + SILENCE_SPARE, ..led_facts };
        let v = build(&c, &short, None, now);
        assert!(v.lease_fresh && !v.led_with_time_to_spare, "fresh, but too briefly to look at etcd once more");
    }
}
