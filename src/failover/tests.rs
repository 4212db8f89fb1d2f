use super::*;
use proptest::prelude::*;

fn leader(node: &str, epoch: Epoch) -> Option<Leader> {
    Some(Leader { node: node.into(), epoch })
}

fn shared(leader: Option<Leader>, mine: bool, epoch: Epoch) -> Option<Shared> {
    Some(Shared { leader, leader_is_my_lease: mine, leader_ready: true, epoch, initialized_by: Some("a".into()) })
}

fn view(me: &str, local: Local, shared: Option<Shared>) -> NodeView {
    NodeView { me: me.into(), bootstrap_node: me == "a", local, shared, lease_fresh: true }
}

#[test]
fn decisions_table() {
    let fresh_cluster =
        Some(Shared { leader: None, leader_is_my_lease: false, leader_ready: false, epoch: 0, initialized_by: None });
    let standby_of = |n: &str| Local::Standby { upstream: Some(n.into()) };
    let cases: Vec<(&str, NodeView, Action)> = vec![
        ("the bootstrap node creates a new cluster", view("a", Local::Empty, fresh_cluster.clone()), Action::Bootstrap),
        (
            "other nodes wait for it",
            view("b", Local::Empty, fresh_cluster.clone()),
            Action::Wait { reason: "no data yet and no leader to copy from".into() },
        ),
        (
            "a node that claimed initialization retries after a crash",
            view(
                "a",
                Local::Empty,
                Some(Shared {
                    leader: None,
                    leader_is_my_lease: false,
                    leader_ready: false,
                    epoch: 1,
                    initialized_by: Some("a".into()),
                }),
            ),
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
            Action::Wait { reason: "waiting for leader a to be ready to copy from".into() },
        ),
        (
            "a wiped node never re-creates an existing cluster",
            view("a", Local::Empty, shared(None, false, 4)),
            Action::Wait { reason: "no data yet and no leader to copy from".into() },
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
            "without a leader a node starts read-only",
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
            "a primary that lost etcd fences",
            view("a", Local::Primary, None),
            Action::Fence { reason: "cannot reach etcd to renew the leader lease".into() },
        ),
        (
            "a primary whose lease went stale fences",
            NodeView { lease_fresh: false, ..view("a", Local::Primary, shared(leader("a", 1), true, 1)) },
            Action::Fence { reason: "the leader lease was not renewed in time".into() },
        ),
        (
            "a primary that another node replaced fences",
            view("a", Local::Primary, shared(leader("b", 2), false, 2)),
            Action::Fence { reason: "b is the leader of epoch 2".into() },
        ),
        (
            "a primary holding an old epoch fences",
            view("a", Local::Primary, shared(leader("a", 1), true, 2)),
            Action::Fence { reason: "leader epoch 1 is stale (current 2)".into() },
        ),
    ];
    for (what, v, want) in cases {
        assert_eq!(decide(&v), want, "{what}");
    }
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
                epoch,
                initialized_by: init.map(String::from),
            },
        ),
    );
    (node, any::<bool>(), local, shared, any::<bool>()).prop_map(|(me, boot, local, shared, fresh)| NodeView {
        me: me.into(),
        bootstrap_node: boot,
        local,
        shared,
        lease_fresh: fresh,
    })
}

fn holds_leader(v: &NodeView) -> bool {
    v.lease_fresh
        && v.shared.as_ref().is_some_and(|s| {
            s.leader_is_my_lease && s.leader.as_ref().is_some_and(|l| l.node == v.me && l.epoch == s.epoch)
        })
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
}
