use super::*;
use crate::cluster::{DrSwitch, PromotionKind, SwitchoverRequest};
use proptest::prelude::*;
use std::time::Duration;

const POLICY: Policy = Policy {
    within_region: FailoverMode::Automatic,
    cross_region: FailoverMode::Automatic,
    max_lag: LagBudget::Bytes(1000),
    synchronous: Synchronous::Off,
};

fn leader(node: &str, epoch: Epoch) -> Option<Leader> {
    Some(Leader { node: node.into(), epoch })
}

fn shared(leader: Option<Leader>, mine: bool, epoch: Epoch) -> Option<Shared> {
    Some(Shared {
        leader,
        leader_is_my_lease: mine,
        leader_ready: true,
        leader_timeline: Some(1),
        epoch,
        initialized_by: Some("a".into()),
        candidates: vec![],
        last_primary: None,
        sync: None,
        leaderless_since_revision: None,
        switchover: None,
        dr: None,
        restore: None,
    })
}

fn view(me: &str, local: Local, shared: Option<Shared>) -> NodeView {
    NodeView {
        me: me.into(),
        bootstrap_node: me == "a",
        local,
        local_timeline: Some(1),
        stalled: false,
        shared,
        lease_fresh: true,
        led_with_time_to_spare: false,
        policy: POLICY,
    }
}

fn cand(node: &str, region: &str, priority: u32, lsn: u64) -> Candidate {
    Candidate {
        node: node.into(),
        region: region.into(),
        priority,
        lsn: Lsn(lsn),
        replay_lsn: Lsn(lsn),
        lag_seconds: Some(0.5),
        timeline: Some(1),
        reported_revision: 20,
        hung_recently: false,
    }
}

/// No leader; `a` (region r1) was primary at LSN 10_000.
fn leaderless(candidates: Vec<Candidate>) -> Option<Shared> {
    Some(Shared {
        leader: None,
        leader_is_my_lease: false,
        leader_ready: false,
        leader_timeline: None,
        epoch: 1,
        initialized_by: Some("a".into()),
        candidates,
        last_primary: Some(LastPrimary { node: "a".into(), region: "r1".into(), lsn: Lsn(10_000) }),
        sync: None,
        leaderless_since_revision: Some(10),
        switchover: None,
        dr: None,
        restore: None,
    })
}

fn standby() -> Local {
    Local::Standby { upstream: Some("a".into()) }
}

fn is_promote(a: &Action) -> bool {
    matches!(a, Action::Promote { .. })
}

#[test]
fn decisions_table() {
    let fresh_cluster = Some(Shared {
        leader_ready: false,
        leader_timeline: None,
        epoch: 0,
        initialized_by: None,
        ..shared(None, false, 0).unwrap()
    });
    let standby_of = |n: &str| Local::Standby { upstream: Some(n.into()) };
    let cases: Vec<(&str, NodeView, Action)> = vec![
        ("the bootstrap node creates a new cluster", view("a", Local::Empty, fresh_cluster.clone()), Action::Bootstrap),
        (
            "other nodes wait for it",
            view("b", Local::Empty, fresh_cluster.clone()),
            Action::Wait { reason: WaitReason::NoData },
        ),
        (
            "a node that claimed initialization retries after a crash",
            view("a", Local::Empty, shared(None, false, 1)),
            Action::Bootstrap,
        ),
        (
            "an empty node copies a ready leader",
            view("b", Local::Empty, shared(leader("a", 1), false, 1)),
            Action::Clone { from: "a".into() },
        ),
        (
            "but not one that is still starting",
            view("b", Local::Empty, Some(Shared { leader_ready: false, ..shared(leader("a", 1), false, 1).unwrap() })),
            Action::Wait { reason: WaitReason::LeaderNotReady { leader: "a".into(), to_copy: true } },
        ),
        (
            "a wiped node never re-creates an existing cluster",
            view("a", Local::Empty, shared(None, false, 4)),
            Action::Wait { reason: WaitReason::NoData },
        ),
        (
            "the leader starts read-write",
            view("a", Local::Stopped, shared(leader("a", 1), true, 1)),
            Action::StartPrimary,
        ),
        (
            "a stopped follower starts as a standby",
            view("b", Local::Stopped, shared(leader("a", 1), false, 1)),
            Action::StartStandby { upstream: Some("a".into()) },
        ),
        (
            "a stopped node on an older timeline rejoins by rewind",
            NodeView {
                local_timeline: Some(1),
                ..view(
                    "a",
                    Local::Stopped,
                    Some(Shared { leader_timeline: Some(2), ..shared(leader("b", 2), false, 2).unwrap() }),
                )
            },
            Action::Rejoin { upstream: "b".into() },
        ),
        (
            "a stalled standby on an older timeline rejoins by rewind",
            NodeView {
                stalled: true,
                ..view(
                    "a",
                    standby_of("b"),
                    Some(Shared { leader_timeline: Some(2), ..shared(leader("b", 2), false, 2).unwrap() }),
                )
            },
            Action::Rejoin { upstream: "b".into() },
        ),
        (
            "a streaming standby on an older timeline is left to switch by itself",
            view(
                "a",
                standby_of("b"),
                Some(Shared { leader_timeline: Some(2), ..shared(leader("b", 2), false, 2).unwrap() }),
            ),
            Action::Keep,
        ),
        (
            "without a leader a stopped node starts read-only",
            view("b", Local::Stopped, shared(None, false, 1)),
            Action::StartStandby { upstream: None },
        ),
        (
            "a previous incarnation's leader key does not make us primary",
            view("a", Local::Stopped, shared(leader("a", 1), false, 1)),
            Action::StartStandby { upstream: None },
        ),
        (
            "without etcd a stopped node starts read-only",
            view("a", Local::Stopped, None),
            Action::StartStandby { upstream: None },
        ),
        (
            "a standby follows a new leader",
            view("b", standby_of("a"), shared(leader("c", 2), false, 2)),
            Action::Follow { upstream: "c".into() },
        ),
        ("a standby of the leader stays", view("b", standby_of("a"), shared(leader("a", 1), false, 1)), Action::Keep),
        ("the leader stays primary", view("a", Local::Primary, shared(leader("a", 1), true, 1)), Action::Keep),
        (
            "a standby that won leader promotes",
            view("b", standby_of("a"), shared(leader("b", 2), true, 2)),
            Action::Promote { kind: PromotionKind::Failover, reason: "this node holds leader".into() },
        ),
        (
            "a primary that lost etcd fences",
            view("a", Local::Primary, None),
            Action::Fence { reason: FenceReason::EtcdUnreachable },
        ),
        (
            "a primary that led under its lease when etcd last answered keeps running while the lease has time to spare",
            NodeView { led_with_time_to_spare: true, ..view("a", Local::Primary, None) },
            Action::Keep,
        ),
        (
            "... until that lease is no longer provably alive",
            NodeView { led_with_time_to_spare: true, lease_fresh: false, ..view("a", Local::Primary, None) },
            Action::Fence { reason: FenceReason::EtcdUnreachable },
        ),
        (
            "what etcd answers now outweighs what it answered before",
            NodeView { led_with_time_to_spare: true, ..view("a", Local::Primary, shared(leader("b", 2), false, 2)) },
            Action::Fence { reason: FenceReason::OtherLeader { node: "b".into(), epoch: 2 } },
        ),
        (
            "a primary whose lease went stale fences",
            NodeView { lease_fresh: false, ..view("a", Local::Primary, shared(leader("a", 1), true, 1)) },
            Action::Fence { reason: FenceReason::LeaseNotRenewed },
        ),
        (
            "a primary that another node replaced fences",
            view("a", Local::Primary, shared(leader("b", 2), false, 2)),
            Action::Fence { reason: FenceReason::OtherLeader { node: "b".into(), epoch: 2 } },
        ),
        (
            "a primary holding an old epoch fences",
            view("a", Local::Primary, shared(leader("a", 1), true, 2)),
            Action::Fence { reason: FenceReason::StaleEpoch { held: 1, current: 2 } },
        ),
    ];
    for (what, v, want) in cases {
        assert_eq!(decide(&v), want, "{what}");
    }
}

#[test]
fn failover_picks_the_most_advanced_then_not_the_former_primary_then_the_preferred_region_then_the_name() {
    let cases: Vec<(&str, Vec<Candidate>, &str)> = vec![
        ("most WAL wins", vec![cand("b", "r1", 1, 9_500), cand("c", "r2", 2, 9_900)], "c"),
        ("equal WAL: the preferred region", vec![cand("c", "r2", 2, 9_900), cand("b", "r1", 1, 9_900)], "b"),
        ("equal WAL and region: the first name", vec![cand("c", "r1", 1, 9_900), cand("b", "r1", 1, 9_900)], "b"),
        (
            // a lost `leader` (a hang, a fence) and restarted its server as a standby.
            "equal WAL: not the former primary",
            vec![cand("a", "r1", 1, 9_900), cand("b", "r1", 1, 9_900), cand("c", "r2", 2, 9_900)],
            "b",
        ),
        (
            "the former primary with more WAL loses least",
            vec![cand("a", "r1", 1, 10_000), cand("b", "r1", 1, 9_900)],
            "a",
        ),
        ("beyond the budget is never chosen", vec![cand("b", "r1", 1, 8_000), cand("c", "r2", 2, 9_100)], "c"),
        (
            // b is a former primary on timeline 1 whose rewind has not succeeded: its
            // extra WAL may have diverged from timeline 2.
            "an older timeline is never chosen, however much WAL",
            vec![
                Candidate { timeline: Some(1), ..cand("b", "r1", 1, 9_999) },
                Candidate { timeline: Some(2), ..cand("c", "r2", 2, 9_500) },
            ],
            "c",
        ),
        (
            "a former primary whose server hung stands aside, however much WAL",
            vec![Candidate { hung_recently: true, ..cand("a", "r1", 1, 10_000) }, cand("c", "r2", 2, 9_100)],
            "c",
        ),
        (
            "... unless no other standby may take over",
            vec![Candidate { hung_recently: true, ..cand("a", "r1", 1, 10_000) }, cand("b", "r1", 1, 8_000)],
            "a",
        ),
    ];
    for (what, candidates, want) in cases {
        let shared = leaderless(candidates.clone());
        for c in &candidates {
            let action = decide(&view(&c.node, standby(), shared.clone()));
            assert_eq!(is_promote(&action), c.node == want, "{what}: {} decided {action:?}", c.node);
        }
    }
}

#[test]
fn no_automatic_failover_says_why() {
    let cases: Vec<(&str, Policy, Vec<Candidate>, &str)> = vec![
        (
            "lag beyond the budget",
            POLICY,
            vec![cand("b", "r2", 2, 5_000)],
            "b: replay 4.9kB behind, beyond the 1000B budget",
        ),
        (
            "cross-region manual",
            Policy { cross_region: FailoverMode::Manual, ..POLICY },
            vec![cand("b", "r2", 2, 10_000)],
            "b: cross-region failover is manual",
        ),
        (
            "within-region manual",
            Policy { within_region: FailoverMode::Manual, ..POLICY },
            vec![cand("b", "r1", 1, 10_000)],
            "b: within-region failover is manual",
        ),
        (
            "time budget, lag unknown",
            Policy { max_lag: LagBudget::Time(Duration::from_secs(5)), ..POLICY },
            vec![Candidate { lag_seconds: None, ..cand("b", "r2", 2, 10_000) }],
            "b: lag unknown",
        ),
    ];
    for (what, policy, candidates, want) in cases {
        let v = NodeView { policy, ..view("b", standby(), leaderless(candidates)) };
        match decide(&v) {
            Action::Wait { reason: reason @ WaitReason::NoFailover { .. } } => {
                assert!(reason.to_string().contains(want), "{what}: {reason}")
            }
            other => panic!("{what}: expected to wait, got {other:?}"),
        }
    }
    // Positions reported before the leader vanished may have grown since: wait for newer ones.
    let mut early = leaderless(vec![cand("b", "r1", 1, 10_000)]).unwrap();
    // (revision 20 is the report's, seen leaderless at revision 50: written before)
    early.leaderless_since_revision = Some(50);
    match decide(&view("b", standby(), Some(early))) {
        Action::Wait { reason } => assert_eq!(reason, WaitReason::FinalPositions),
        other => panic!("promoted on a stale position: {other:?}"),
    }
    // The boundary: a report written at the very revision the agent saw no leader at
    // may predate the loss; one revision later it cannot.
    let mut at = leaderless(vec![cand("b", "r1", 1, 10_000)]).unwrap();
    at.leaderless_since_revision = Some(20);
    assert!(matches!(decide(&view("b", standby(), Some(at.clone()))), Action::Wait { .. }));
    at.leaderless_since_revision = Some(19);
    assert!(is_promote(&decide(&view("b", standby(), Some(at)))));
    let mut no_record = leaderless(vec![cand("b", "r2", 2, 10_000)]).unwrap();
    no_record.last_primary = None;
    assert!(matches!(decide(&view("b", standby(), Some(no_record))), Action::Wait { .. }));
}

#[test]
fn the_budget_counts_wal_a_standby_received_beyond_the_recorded_position() {
    // The leader recorded 10_000, but a standby has received up to 50_000 since:
    // the other standby, replayed to 10_000, is 40_000 behind, not 0.
    let mut ahead = cand("b", "r2", 2, 50_000);
    ahead.replay_lsn = Lsn(1_000); // received much, replayed little: beyond the budget itself
    let c = cand("c", "r2", 2, 10_000);
    let v = view("c", standby(), leaderless(vec![ahead, c]));
    match decide(&v) {
        Action::Wait { reason: WaitReason::NoFailover { why: NoFailover::Refused { refusals } } } => {
            let c = refusals.iter().find(|r| r.node == "c").expect("c is refused");
            assert_eq!(c.why, RefusalReason::ReplayBehind { behind_bytes: 40_000, budget_bytes: 1000 });
            assert_eq!(c.to_string(), "c: replay 39.1kB behind, beyond the 1000B budget");
        }
        other => panic!("promoted beyond the budget: {other:?}"),
    }
}

#[test]
fn with_synchronous_replication_only_a_standby_with_every_vouched_commit_is_promoted() {
    // `a` (r1) was primary at 10_000 (epoch 1); b (r2) and c (r3) are remote.
    let record = |standbys: &[&str]| SyncRecord {
        node: "a".into(),
        epoch: 1,
        standbys: standbys.iter().map(|s| s.to_string()).collect(),
        at_ms: 0,
    };
    let remote = Policy { synchronous: Synchronous::Remote, max_lag: LagBudget::Bytes(16 << 20), ..POLICY };
    let region = Policy { synchronous: Synchronous::Region, ..remote };
    let off = Policy { synchronous: Synchronous::Off, ..remote };
    let last = LastPrimary { node: "a".into(), region: "r1".into(), lsn: Lsn(10_000) };
    let (a2, b, c) = (cand("a2", "r1", 1, 9_000), cand("b", "r2", 2, 9_500), cand("c", "r3", 3, 10_000));
    let all = vec![a2.clone(), b.clone(), c.clone()];
    let pick = |cands: &[Candidate], sync: Option<&SyncRecord>, policy: &Policy| {
        choose(cands, Some(&last), sync, policy).map(|c| c.node)
    };

    // Every vouched standby reports: the most advanced of them sets the bar.
    assert_eq!(pick(&all, Some(&record(&["b", "c"])), &remote), Ok("c".into()));
    let within = Policy { cross_region: FailoverMode::Manual, ..remote };
    match pick(&all, Some(&record(&["b", "c"])), &within) {
        Err(NoFailover::Refused { refusals }) => {
            let a2 = refusals.iter().find(|r| r.node == "a2").expect("a2 is refused");
            assert_eq!(a2.why, RefusalReason::BehindSynchronous { standby: "c".into(), behind_bytes: 1_000 });
            assert!(a2.to_string().contains("would lose acknowledged commits"), "{a2}");
        }
        other => panic!("a2 lacks commits c has: {other:?}"),
    }
    // A candidate ahead of every vouched standby is fine too (it has them all).
    assert_eq!(pick(&all, Some(&record(&["b"])), &remote), Ok("c".into()));

    // `remote`: nothing vouched (the primary ran asynchronously) or a vouched standby
    // silent, and no automatic failover at all, however small the lag.
    for (sync, want) in [
        (None, NoFailover::NotVouched { epoch: None }),
        (Some(record(&[])), NoFailover::NotVouched { epoch: Some(1) }),
        (Some(record(&["b", "gone"])), NoFailover::SynchronousMissing { missing: vec!["gone".into()] }),
    ] {
        assert_eq!(pick(&all, sync.as_ref(), &remote), Err(want.clone()));
        let text = WaitReason::NoFailover { why: want }.to_string();
        assert!(text.contains("--allow-data-loss"), "says how an operator goes on: {text}");
    }
    // ... but the former primary itself, back from a fence, has all it acknowledged.
    let former = cand("a", "r1", 1, 10_000);
    let with_former = vec![b.clone(), former.clone()];
    assert_eq!(pick(&with_former, Some(&record(&[])), &remote), Ok("a".into()));
    match pick(&[b.clone(), Candidate { lsn: Lsn(9_000), ..former.clone() }], Some(&record(&[])), &remote) {
        Ok(c) => assert_eq!(c, "a", "even behind another standby"),
        other => panic!("{other:?}"),
    }
    // `region` promises a failover within the region; a lost region falls back to the budget.
    assert_eq!(pick(&[b.clone(), c.clone()], Some(&record(&["a2"])), &region), Ok("c".into()));
    assert_eq!(pick(&all, Some(&record(&[])), &region), Ok("c".into()));
    // `off` ignores the record.
    assert_eq!(pick(&[a2.clone(), b.clone()], Some(&record(&["c"])), &off), Ok("b".into()));

    // Through decide: the standby waits and says why.
    let mut shared = leaderless(vec![b.clone(), c.clone()]).unwrap();
    shared.sync = Some(record(&[]));
    let v = NodeView { policy: remote, ..view("c", standby(), Some(shared)) };
    match decide(&v) {
        Action::Wait { reason } => {
            assert!(reason.to_string().contains("ran asynchronously"), "{reason}")
        }
        other => panic!("promoted after asynchronous commits: {other:?}"),
    }
}

// ---- properties over random views ----

fn arb_policy() -> impl Strategy<Value = Policy> {
    let mode = prop_oneof![Just(FailoverMode::Automatic), Just(FailoverMode::Manual)];
    (mode.clone(), mode, 0u64..3000).prop_map(|(w, c, b)| Policy {
        within_region: w,
        cross_region: c,
        max_lag: LagBudget::Bytes(b),
        synchronous: Synchronous::Off,
    })
}

fn arb_candidates() -> impl Strategy<Value = Vec<Candidate>> {
    let one = (prop::sample::select(vec!["r1", "r2", "r3"]), 8_000u64..10_500, 1u32..4);
    prop::collection::vec(one, 0..5).prop_map(|v| {
        v.into_iter().enumerate().map(|(i, (region, lsn, prio))| cand(&format!("n{i}"), region, prio, lsn)).collect()
    })
}

fn arb_view() -> impl Strategy<Value = NodeView> {
    let node = prop::sample::select(vec!["a", "b", "c"]);
    let local = prop_oneof![
        Just(Local::Empty),
        Just(Local::Stopped),
        Just(Local::Primary),
        proptest::option::of(node.clone()).prop_map(|u| Local::Standby { upstream: u.map(String::from) }),
    ];
    let leader =
        proptest::option::of((node.clone(), 0u64..4)).prop_map(|l| l.map(|(n, e)| Leader { node: n.into(), epoch: e }));
    let shared = proptest::option::of(
        (leader, any::<bool>(), any::<bool>(), 0u64..4, proptest::option::of(node.clone())).prop_map(
            |(leader, mine, ready, epoch, init)| Shared {
                leader,
                leader_is_my_lease: mine,
                leader_ready: ready,
                leader_timeline: Some(1),
                epoch,
                initialized_by: init.map(String::from),
                candidates: vec![],
                last_primary: None,
                sync: None,
                leaderless_since_revision: None,
                switchover: None,
                dr: None,
                restore: None,
            },
        ),
    );
    (node, any::<bool>(), local, shared, any::<bool>(), any::<bool>(), arb_policy()).prop_map(
        |(me, boot, local, shared, fresh, led, policy)| NodeView {
            me: me.into(),
            bootstrap_node: boot,
            local,
            local_timeline: Some(1),
            stalled: false,
            shared,
            lease_fresh: fresh,
            led_with_time_to_spare: led,
            policy,
        },
    )
}

/// Holds `leader` of the current epoch under a fresh lease: as etcd answers
/// now, or, when it does not answer, as it last answered.
fn holds_leader(v: &NodeView) -> bool {
    v.lease_fresh
        && match &v.shared {
            Some(s) => s.leader_is_my_lease && s.leader.as_ref().is_some_and(|l| l.node == v.me && l.epoch == s.epoch),
            None => v.led_with_time_to_spare,
        }
}

proptest! {
    /// Never two writable nodes: whatever it sees, a node without the current
    /// leadership never starts or keeps a read-write server.
    #[test]
    fn only_the_current_leader_runs_read_write(v in arb_view()) {
        let action = decide(&v);
        if !holds_leader(&v) {
            prop_assert_ne!(&action, &Action::StartPrimary);
            if v.local == Local::Primary {
                let fenced = matches!(action, Action::Fence { .. });
                prop_assert!(fenced, "kept a read-write server without leadership: {:?}", action);
            }
        }
    }

    /// Only a node with no data, in a cluster that has never had an epoch beyond 1, initializes.
    #[test]
    fn bootstrap_never_overwrites_a_cluster(v in arb_view()) {
        if decide(&v) == Action::Bootstrap {
            let s = v.shared.as_ref().unwrap();
            prop_assert_eq!(&v.local, &Local::Empty);
            prop_assert!(s.leader.is_none() && s.epoch <= 1);
        }
    }

    /// Every node deciding from the same etcd state: at most one tries to promote
    /// (so at most one leader per epoch), never beyond the budget or against a
    /// manual mode, and it is the eligible one with the most WAL.
    #[test]
    fn at_most_one_promotion_and_only_the_best_eligible(candidates in arb_candidates(), policy in arb_policy()) {
        let shared = leaderless(candidates.clone());
        let last = shared.as_ref().unwrap().last_primary.clone().unwrap();
        let promoters: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| is_promote(&decide(&NodeView { policy, ..view(&c.node, standby(), shared.clone()) })))
            .collect();
        prop_assert!(promoters.len() <= 1, "{} nodes promote", promoters.len());
        let eligible: Vec<&Candidate> = candidates.iter().filter(|c| {
            let mode = if c.region == last.region { policy.within_region } else { policy.cross_region };
            mode == FailoverMode::Automatic && within_budget(c, &furthest(&last, &candidates), policy.max_lag).is_ok()
        }).collect();
        match promoters.first() {
            Some(p) => {
                prop_assert!(eligible.iter().any(|e| e.node == p.node), "{} was not eligible", p.node);
                prop_assert!(eligible.iter().all(|e| e.lsn <= p.lsn), "{} is not the most advanced", p.node);
            }
            None => prop_assert!(eligible.is_empty(), "nobody promoted although {} were eligible", eligible.len()),
        }
    }
}

fn switchover(final_lsn: Option<u64>) -> SwitchoverRequest {
    SwitchoverRequest {
        from: "a".into(),
        to: "b".into(),
        requested_by: "test".into(),
        requested_at_ms: 0,
        timeout_ms: 10_000,
        final_lsn: final_lsn.map(Lsn),
        aborted: None,
    }
}

fn dr_to(target: &str) -> DrSwitch {
    DrSwitch {
        active_region: "r2".into(),
        target: target.into(),
        allow_data_loss: false,
        set_by: "operator".into(),
        at_ms: 0,
        lost_bytes_estimate: 0,
        done_epoch: None,
        trigger: None,
    }
}

#[test]
fn switchover_and_dr_requests() {
    let with = |sw: Option<SwitchoverRequest>, dr: Option<DrSwitch>, leader_: Option<Leader>, mine: bool| {
        let mut s = leaderless(vec![cand("b", "r2", 2, 10_000), cand("c", "r1", 1, 10_000)]).unwrap();
        s.leader = leader_;
        s.leader_is_my_lease = mine;
        s.leader_ready = true;
        s.switchover = sw;
        s.dr = dr;
        Some(s)
    };
    let promote = |kind| move |a: &Action| matches!(a, Action::Promote { kind: k, .. } if *k == kind);
    // The old primary hands over; nobody else acts while it does.
    assert_eq!(
        decide(&view("a", Local::Primary, with(Some(switchover(None)), None, leader("a", 1), true))),
        Action::HandOver { to: "b".into() }
    );
    // Once it stopped and released leader, only the target promotes, even if another has as much WAL and a better region.
    let after = with(Some(switchover(Some(9_000))), None, None, false);
    assert!(promote(PromotionKind::Switchover)(&decide(&view("b", standby(), after.clone()))));
    assert!(matches!(decide(&view("c", standby(), after)), Action::Wait { .. }));
    // A DR switch: the old primary steps down, then only the target promotes, whatever the modes.
    assert!(matches!(
        decide(&view("a", Local::Primary, with(None, Some(dr_to("b")), leader("a", 1), true))),
        Action::StepDown { .. }
    ));
    let manual = Policy { cross_region: FailoverMode::Manual, within_region: FailoverMode::Manual, ..POLICY };
    let gone = with(None, Some(dr_to("b")), None, false);
    assert!(promote(PromotionKind::Dr)(&decide(&NodeView { policy: manual, ..view("b", standby(), gone.clone()) })));
    assert!(matches!(decide(&view("c", standby(), gone)), Action::Wait { .. }));
    // The safety rule still comes first: a primary without a fresh lease fences, request or not.
    let stale = NodeView {
        lease_fresh: false,
        ..view("a", Local::Primary, with(Some(switchover(None)), None, leader("a", 1), true))
    };
    assert!(matches!(decide(&stale), Action::Fence { .. }));
}

/// `restore --replace` onto `b`: the primary `a` steps down, `b` stops and
/// waits, nobody promotes meanwhile; once the data is in place `b` takes
/// `leader`, and the others follow it by the ordinary rules.
#[test]
fn a_restore_replacing_the_data_stops_everyone_until_the_restored_node_leads() {
    use crate::cluster::{RestoreRequest, RestoreStep};
    let req = |state| RestoreRequest {
        node: "b".into(),
        requested_by: "ops".into(),
        requested_at_ms: 1,
        backup: "20261203-074035F".into(),
        target: "just before 2026-12-03 07:40:50".into(),
        state,
    };
    let during = |leader_: Option<Leader>, mine: bool, state| {
        let epoch = leader_.as_ref().map_or(1, |l| l.epoch);
        Some(Shared { restore: Some(req(state)), ..shared(leader_, mine, epoch).unwrap() })
    };
    let restored = || RestoreStep::Restored { timeline: 3, lsn: Lsn(0x500_0000) };
    let wait_for_b = Action::Wait { reason: WaitReason::RestoreInProgress { node: "b".into() } };
    let cases: Vec<(&str, NodeView, Action)> = vec![
        (
            "the primary steps down",
            view("a", Local::Primary, during(leader("a", 1), true, RestoreStep::Stopping)),
            Action::StepDown {
                reason:
                    "ops replaces the cluster's data with backup 20261203-074035F (just before 2026-12-03 07:40:50)"
                        .into(),
            },
        ),
        (
            "the restore's node stops",
            view("b", standby(), during(None, false, RestoreStep::Stopping)),
            Action::StopForRestore,
        ),
        (
            "and stays stopped while the data is written",
            view("b", Local::Stopped, during(None, false, RestoreStep::Restoring)),
            wait_for_b.clone(),
        ),
        (
            "no other standby promotes meanwhile",
            view("c", standby(), during(None, false, RestoreStep::Restoring)),
            wait_for_b.clone(),
        ),
        (
            "nor starts as primary when stopped",
            view("a", Local::Stopped, during(None, false, RestoreStep::Stopping)),
            wait_for_b.clone(),
        ),
        (
            "the restored node takes leader",
            view("b", Local::Stopped, during(None, false, restored())),
            Action::TakeRestored,
        ),
        (
            "and runs as primary once it holds it",
            view("b", Local::Primary, during(leader("b", 2), true, restored())),
            Action::Keep,
        ),
        (
            "the others follow it by the ordinary rules",
            view("a", Local::Standby { upstream: None }, during(leader("b", 2), false, restored())),
            Action::Follow { upstream: "b".into() },
        ),
    ];
    for (what, v, want) in cases {
        assert_eq!(decide(&v), want, "{what}");
    }
    let stale = NodeView { lease_fresh: false, ..view("b", Local::Stopped, during(None, false, restored())) };
    assert_eq!(decide(&stale), Action::Wait { reason: WaitReason::LeaseNotFresh }, "leader only on a fresh lease");
}
