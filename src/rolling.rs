//! The order of a rolling restart (`meridian rolling-restart`). Pure: the
//! cluster's status and its regions' priorities in, the steps out.
//!
//! Replicas first (other regions', then the primary's region's, the one
//! that will take over last), each restarted and streaming again before the
//! next; then a switchover to a replica of the primary's region (or, with
//! none there, of the preferred region), then the old primary, now a
//! replica. A switchover that had to leave the primary's region is followed
//! by a switchover back, so the primary ends where it was. Nothing starts
//! unless every node is healthy: a restart takes one copy away for a moment,
//! and none may be missing already.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::cluster::{ClusterStatus, NodeStatus, Role};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Restart this replica's PostgreSQL and wait until it streams again.
    Restart { node: String },
    /// A planned switchover to this replica.
    Switchover { to: String },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Restart { node } => write!(f, "restart {node}"),
            Step::Switchover { to } => write!(f, "switch over to {to}"),
        }
    }
}

/// The steps, or why a rolling restart may not start. With `only_pending`,
/// only nodes that report something pending (`pending_restart`) restart,
/// and the primary's node (with its switchover) only if it does.
pub fn plan(
    status: &ClusterStatus,
    priorities: &BTreeMap<String, u32>,
    only_pending: bool,
) -> Result<Vec<Step>, String> {
    let Some(primary) = status.primary.as_deref() else {
        return Err(format!(
            "there is no primary{}; a rolling restart needs a healthy cluster",
            status.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
        ));
    };
    let unhealthy: Vec<String> = status
        .nodes
        .iter()
        .filter(|n| !n.healthy || !matches!(n.role, Role::Primary | Role::Replica))
        .map(|n| {
            format!("{} ({}{})", n.name, n.role, n.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())
        })
        .collect();
    if !unhealthy.is_empty() {
        return Err(format!(
            "every node must be healthy before a rolling restart takes one away; not healthy: {}",
            unhealthy.join(", ")
        ));
    }
    if !status.leaving.is_empty() {
        let names: Vec<&str> = status.leaving.iter().map(|n| n.name.as_str()).collect();
        return Err(format!("nodes are leaving the cluster ({}); wait until they have left", names.join(", ")));
    }
    let primary_node =
        status.nodes.iter().find(|n| n.name == primary).ok_or("the primary is not in the cluster file")?;
    let home = primary_node.region.clone();
    let replicas: Vec<&NodeStatus> = status.nodes.iter().filter(|n| n.name != primary).collect();
    let wanted = |n: &NodeStatus| !only_pending || !n.pending_restart.is_empty();
    let primary_restarts = wanted(primary_node);
    if primary_restarts && replicas.is_empty() {
        return Err(format!(
            "{primary} is the only node: restarting it stops all writes; restart it by hand (systemctl restart) if you must"
        ));
    }
    // The new primary: a replica at home, else one of the preferred region; by name within a region.
    let rank = |n: &NodeStatus| {
        let region_rank =
            if n.region == home { 0 } else { 1 + priorities.get(&n.region).copied().unwrap_or(u32::MAX) as u64 };
        (region_rank, n.name.clone())
    };
    let target = replicas.iter().min_by_key(|n| rank(n)).map(|n| n.name.clone());
    let mut order: Vec<&NodeStatus> = replicas.iter().copied().filter(|n| wanted(n)).collect();
    // Away from home first, the future primary last.
    order.sort_by_key(|n| (n.region == home, Some(&n.name) == target.as_ref(), n.name.clone()));
    let mut steps: Vec<Step> = order.iter().map(|n| Step::Restart { node: n.name.clone() }).collect();
    if primary_restarts {
        let target = target.expect("replicas is not empty");
        steps.push(Step::Switchover { to: target.clone() });
        steps.push(Step::Restart { node: primary.to_string() });
        let moved_away = replicas.iter().any(|n| n.name == target && n.region != home);
        if moved_away {
            steps.push(Step::Switchover { to: primary.to_string() });
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, region: &str, role: Role, pending: bool) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            region: region.into(),
            role,
            timeline: Some(1),
            lsn: None,
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            healthy: true,
            detail: None,
            waiting: None,
            failure: None,
            cert_not_after: None,
            archive: None,
            commit_hold: None,
            config_version: 1,
            pending_restart: if pending { vec!["max_connections: 100 -> 150".into()] } else { vec![] },
        }
    }

    fn status(nodes: Vec<NodeStatus>) -> ClusterStatus {
        let primary = nodes.iter().find(|n| n.role == Role::Primary).map(|n| n.name.clone());
        ClusterStatus {
            cluster: "c".into(),
            epoch: 1,
            primary,
            reason: None,
            nodes,
            leaving: vec![],
            backups: vec![],
            etcd_learners: vec![],
            vouched: None,
            gateways: Vec::new(),
        }
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.to_string()).collect()
    }

    fn priorities() -> BTreeMap<String, u32> {
        [("south".to_string(), 1), ("north".to_string(), 2), ("west".to_string(), 3)].into_iter().collect()
    }

    #[test]
    fn replicas_away_from_home_first_then_the_new_primary_then_the_old_one() {
        let s = status(vec![
            node("s1", "south", Role::Primary, true),
            node("s2", "south", Role::Replica, true),
            node("n1", "north", Role::Replica, true),
            node("w1", "west", Role::Replica, true),
        ]);
        assert_eq!(
            names(&plan(&s, &priorities(), false).unwrap()),
            ["restart n1", "restart w1", "restart s2", "switch over to s2", "restart s1"]
        );
    }

    #[test]
    fn a_primary_alone_in_its_region_goes_to_the_preferred_region_and_comes_back() {
        let s = status(vec![
            node("s1", "south", Role::Primary, true),
            node("w1", "west", Role::Replica, true),
            node("n1", "north", Role::Replica, true),
        ]);
        assert_eq!(
            names(&plan(&s, &priorities(), false).unwrap()),
            ["restart w1", "restart n1", "switch over to n1", "restart s1", "switch over to s1"]
        );
    }

    #[test]
    fn only_pending_skips_nodes_with_nothing_pending_and_the_switchover_with_them() {
        let s = status(vec![
            node("s1", "south", Role::Primary, false),
            node("s2", "south", Role::Replica, true),
            node("n1", "north", Role::Replica, false),
        ]);
        assert_eq!(names(&plan(&s, &priorities(), true).unwrap()), ["restart s2"]);
        assert_eq!(names(&plan(&s, &priorities(), false).unwrap()).len(), 4);
        let s = status(vec![node("s1", "south", Role::Primary, true), node("s2", "south", Role::Replica, false)]);
        assert_eq!(names(&plan(&s, &priorities(), true).unwrap()), ["switch over to s2", "restart s1"]);
    }

    #[test]
    fn refused_without_a_primary_with_an_unhealthy_node_a_leaving_node_or_a_single_node() {
        let mut s = status(vec![node("s1", "south", Role::Primary, true), node("s2", "south", Role::Replica, true)]);
        s.nodes[1].healthy = false;
        s.nodes[1].detail = Some("not streaming from s1".into());
        let why = plan(&s, &priorities(), false).unwrap_err();
        assert!(why.contains("s2 (replica: not streaming from s1)"), "{why}");

        let mut s = status(vec![node("s1", "south", Role::Primary, true), node("s2", "south", Role::Replica, true)]);
        s.primary = None;
        s.reason = Some("no node holds the leader lease".into());
        assert!(plan(&s, &priorities(), false).unwrap_err().contains("no primary (no node holds"));

        let mut s = status(vec![node("s1", "south", Role::Primary, true), node("s2", "south", Role::Replica, true)]);
        s.leaving.push(node("s3", "south", Role::Replica, false));
        assert!(plan(&s, &priorities(), false).unwrap_err().contains("leaving the cluster (s3)"));

        let s = status(vec![node("s1", "south", Role::Primary, true)]);
        assert!(plan(&s, &priorities(), false).unwrap_err().contains("the only node"));
        // Nothing pending on the single node: nothing to do, not an error.
        let s = status(vec![node("s1", "south", Role::Primary, false)]);
        assert_eq!(plan(&s, &priorities(), true).unwrap(), vec![]);
    }
}
