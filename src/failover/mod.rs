//! Pure decisions: what one node's agent should do next, given what it sees.
//! No I/O here; the agent observes, calls `decide`, and carries the action out.
//!
//! The safety rule comes first and overrides everything: a server running
//! read-write without holding `leader` (with a lease this agent has renewed
//! recently enough) is fenced, i.e. restarted as a standby.

use crate::cluster::{Epoch, Leader};

/// The local server, as the agent last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// No PGDATA yet.
    Empty,
    /// PGDATA exists, no server running.
    Stopped,
    /// Running read-write.
    Primary,
    /// Running in recovery, streaming from `upstream` (None: configured with nowhere to stream from).
    Standby { upstream: Option<String> },
}

/// What etcd says, when it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    pub leader: Option<Leader>,
    /// `leader` is held by this agent's current lease (not a previous incarnation's).
    pub leader_is_my_lease: bool,
    /// The leader's agent reports a healthy primary, so it can serve a base backup.
    pub leader_ready: bool,
    pub epoch: Epoch,
    pub initialized_by: Option<String>,
}

/// Everything `decide` looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub me: String,
    /// The node the cluster file says creates a new cluster.
    pub bootstrap_node: bool,
    pub local: Local,
    /// None when etcd cannot be read (no quorum, partitioned, down).
    pub shared: Option<Shared>,
    /// This agent renewed its lease recently enough that etcd cannot have expired it.
    pub lease_fresh: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to change.
    Keep,
    /// Create the cluster: take `initialize`, then `leader` with epoch 1, then initdb.
    Bootstrap,
    /// Copy the leader's data directory, then start as its standby.
    Clone { from: String },
    /// Nothing can be done until a leader appears; the reason is shown in status.
    Wait { reason: String },
    /// Start (or keep) the server read-write: this node holds `leader`.
    StartPrimary,
    /// Start the server in recovery, streaming from `upstream` when there is one.
    StartStandby { upstream: Option<String> },
    /// Point a running standby at a new upstream.
    Follow { upstream: String },
    /// Restart a read-write server as a standby: it must not take writes.
    Fence { reason: String },
}

pub fn decide(v: &NodeView) -> Action {
    let holds_leader = v.shared.as_ref().is_some_and(|s| {
        s.leader_is_my_lease && s.leader.as_ref().is_some_and(|l| l.node == v.me && l.epoch == s.epoch)
    }) && v.lease_fresh;

    if v.local == Local::Primary && !holds_leader {
        let reason = match &v.shared {
            None => "cannot reach etcd to renew the leader lease".to_string(),
            Some(_) if !v.lease_fresh => "the leader lease was not renewed in time".to_string(),
            Some(s) => match &s.leader {
                Some(l) if l.node != v.me => format!("{} is the leader of epoch {}", l.node, l.epoch),
                Some(l) if l.epoch != s.epoch => format!("leader epoch {} is stale (current {})", l.epoch, s.epoch),
                _ => "this node does not hold the leader lease".to_string(),
            },
        };
        return Action::Fence { reason };
    }

    let Some(s) = &v.shared else {
        // Without etcd nothing may change; a stopped server comes up read-only.
        return match v.local {
            Local::Stopped => Action::StartStandby { upstream: None },
            _ => Action::Keep,
        };
    };

    let other_leader = s.leader.as_ref().filter(|l| l.node != v.me);
    match (&v.local, other_leader) {
        (Local::Empty, Some(l)) if s.leader_ready => Action::Clone { from: l.node.clone() },
        (Local::Empty, Some(l)) => {
            Action::Wait { reason: format!("waiting for leader {} to be ready to copy from", l.node) }
        }
        (Local::Empty, None) => {
            let mine = s.initialized_by.as_deref() == Some(v.me.as_str());
            let unclaimed = s.initialized_by.is_none() && v.bootstrap_node;
            if s.leader.is_none() && s.epoch <= 1 && (mine || unclaimed) {
                Action::Bootstrap
            } else {
                Action::Wait { reason: "no data yet and no leader to copy from".into() }
            }
        }
        (Local::Stopped, _) if holds_leader => Action::StartPrimary,
        (Local::Stopped, Some(l)) => Action::StartStandby { upstream: Some(l.node.clone()) },
        (Local::Stopped, None) => Action::StartStandby { upstream: None },
        (Local::Primary, _) => Action::Keep,
        (Local::Standby { upstream }, Some(l)) if upstream.as_deref() != Some(l.node.as_str()) => {
            Action::Follow { upstream: l.node.clone() }
        }
        (Local::Standby { .. }, _) => Action::Keep,
    }
}

#[cfg(test)]
mod tests;
