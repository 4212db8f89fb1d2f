//! Why a node waits, why a standby may not be promoted, why a primary fences:
//! typed, so that status, the gateway and the drill match on the case and
//! never parse a sentence back. `Display` gives the sentence people read.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::{human_bytes, Epoch};
use crate::config::format_bytes;

/// Why a node does nothing now. Published in the node's report (`waiting`)
/// next to its text (`detail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WaitReason {
    /// A leader exists but does not report a healthy primary yet.
    LeaderNotReady { leader: String, to_copy: bool },
    /// No data here, and nobody to copy from or create the cluster.
    NoData,
    /// Another node claimed `initialize` and is creating the cluster.
    Initializing { holder: String },
    /// A planned switchover names another node.
    SwitchoverInProgress { from: String, to: String },
    /// A DR switch names another node.
    DrInProgress { target: String },
    /// No leader: positions reported before it vanished may have grown since.
    FinalPositions,
    /// No leader; another standby ranks first and should take `leader`.
    OtherCandidate { node: String },
    /// No leader, and nobody may take over automatically.
    NoFailover { why: NoFailover },
    /// A rewind against `upstream` failed for a reason that keeps this copy.
    RewindRetry { upstream: String },
    /// The upstream does not answer, so no rewind is tried against it yet.
    UpstreamSilent { upstream: String },
    /// Another node is making a fresh copy (one at a time).
    RecopyTurn { holder: String },
    /// This agent's lease is not provably alive: no promotion on it.
    LeaseNotFresh,
    /// The server crashed too often; it is left stopped.
    GaveUp { crashes: usize, window_s: u64, log: String },
    /// `meridian restore --replace` is replacing the data; `node` will lead.
    RestoreInProgress { node: String },
}

impl WaitReason {
    /// For a reason that only arises without a leader: what it says about
    /// who takes over, for the status line.
    pub fn leaderless(&self) -> Option<String> {
        match self {
            WaitReason::NoFailover { why } => Some(format!("no automatic failover: {why}")),
            WaitReason::OtherCandidate { node } => Some(format!("{node} should take over")),
            WaitReason::FinalPositions => Some("waiting for every standby to report its final position".into()),
            WaitReason::RestoreInProgress { node } => {
                Some(format!("a restore is replacing the data; {node} will lead"))
            }
            _ => None,
        }
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::LeaderNotReady { leader, to_copy: true } => {
                write!(f, "waiting for leader {leader} to be ready to copy from")
            }
            WaitReason::LeaderNotReady { leader, to_copy: false } => {
                write!(f, "waiting for leader {leader} to be ready")
            }
            WaitReason::NoData => f.write_str("no data yet and no leader to copy from"),
            WaitReason::Initializing { holder } => write!(f, "{holder} is initializing the cluster"),
            WaitReason::SwitchoverInProgress { from, to } => write!(f, "switchover from {from} to {to} in progress"),
            WaitReason::DrInProgress { target } => write!(f, "DR failover to {target} in progress"),
            WaitReason::RestoreInProgress { node } => {
                write!(f, "a restore is replacing the cluster's data; {node} will lead with it")
            }
            WaitReason::FinalPositions => {
                f.write_str("no leader; waiting for every standby to report its final position")
            }
            WaitReason::OtherCandidate { node } => write!(f, "no leader; {node} should take over"),
            WaitReason::NoFailover { why } => write!(f, "no leader, and no automatic failover: {why}"),
            WaitReason::RewindRetry { upstream } => {
                write!(f, "a rewind against {upstream} failed; retrying shortly, keeping this copy")
            }
            WaitReason::UpstreamSilent { upstream } => {
                write!(f, "{upstream} does not answer; keeping this copy, rewinding once it does")
            }
            WaitReason::RecopyTurn { holder } => write!(f, "{holder} is making a fresh copy; this one waits its turn"),
            WaitReason::LeaseNotFresh => f.write_str("this agent's lease was not renewed recently; no promotion on it"),
            WaitReason::GaveUp { crashes, window_s, log } => {
                write!(
                    f,
                    "PostgreSQL exited unexpectedly {crashes} times in {window_s}s; not restarting it (see {log})"
                )
            }
        }
    }
}

/// Why no standby may be promoted automatically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoFailover {
    /// No `optime` in etcd, so no lag can be judged.
    NoLastPosition,
    /// No standby has a fresh report.
    NoStandbys,
    /// Every candidate was refused, each for its reason.
    Refused { refusals: Vec<Refusal> },
    /// `synchronous = remote`, and the last primary vouched for no standby
    /// (`sync` record of `epoch` empty, or none for its epoch).
    NotVouched { epoch: Option<Epoch> },
    /// `synchronous = remote`, and these standbys the last primary vouched for do not report.
    SynchronousMissing { missing: Vec<String> },
}

impl fmt::Display for NoFailover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoFailover::NoLastPosition => {
                f.write_str("no record of the last primary's position, so no lag can be judged")
            }
            NoFailover::NoStandbys => f.write_str("no healthy standby reports"),
            NoFailover::Refused { refusals } => {
                let parts: Vec<String> = refusals.iter().map(|r| r.to_string()).collect();
                f.write_str(&parts.join("; "))
            }
            NoFailover::NotVouched { .. } => f.write_str(
                "the last primary had no synchronous standby caught up (it ran asynchronously), so a promotion could lose acknowledged commits; `meridian failover --to-region R --allow-data-loss` accepts that",
            ),
            NoFailover::SynchronousMissing { missing } => write!(
                f,
                "synchronous standby {} does not report, and only it may hold the last acknowledged commits; `meridian failover --to-region R --allow-data-loss` promotes without it",
                missing.join(", ")
            ),
        }
    }
}

/// One candidate that may not be promoted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub node: String,
    pub why: RefusalReason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.node, self.why)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RefusalReason {
    /// Its timeline is older than another candidate's: it may have diverged.
    OlderTimeline { mine: u32, newest: u32 },
    /// The failover mode for its region relation is manual.
    Manual { cross_region: bool },
    /// It has replayed less than the byte budget allows.
    ReplayBehind { behind_bytes: u64, budget_bytes: u64 },
    /// Its last replayed commit is older than the time budget allows.
    TimeBehind { behind_ms: u64, budget_ms: u64 },
    /// A time budget is set, and its lag is unknown.
    LagUnknown,
    /// `synchronous = remote` and the last primary vouched for no standby
    /// (`missing` empty) or for some that do not report: only the former
    /// primary itself may be promoted.
    Unvouched { missing: Vec<String> },
    /// It has less WAL than `standby`, which the last primary vouched for.
    BehindSynchronous { standby: String, behind_bytes: u64 },
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::OlderTimeline { mine, newest } => {
                write!(f, "on timeline {mine}, older than another candidate's {newest}")
            }
            RefusalReason::Manual { cross_region } => {
                write!(f, "{} failover is manual", if *cross_region { "cross-region" } else { "within-region" })
            }
            RefusalReason::ReplayBehind { behind_bytes, budget_bytes } => write!(
                f,
                "replay {} behind, beyond the {} budget",
                human_bytes(*behind_bytes),
                format_bytes(*budget_bytes)
            ),
            RefusalReason::TimeBehind { behind_ms, budget_ms } => write!(
                f,
                "{:.1}s behind, beyond the {:?} budget",
                *behind_ms as f64 / 1000.0,
                std::time::Duration::from_millis(*budget_ms)
            ),
            RefusalReason::LagUnknown => f.write_str("lag unknown"),
            RefusalReason::Unvouched { missing } if missing.is_empty() => {
                f.write_str("the last primary ran asynchronously, so only it surely has every acknowledged commit")
            }
            RefusalReason::Unvouched { missing } => write!(
                f,
                "synchronous standby {} does not report, so only the last primary surely has every acknowledged commit",
                missing.join(", ")
            ),
            RefusalReason::BehindSynchronous { standby, behind_bytes } => write!(
                f,
                "{} behind synchronous standby {standby}: promoting it would lose acknowledged commits",
                human_bytes(*behind_bytes)
            ),
        }
    }
}

/// Why a read-write server must stop taking writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceReason {
    EtcdUnreachable,
    LeaseNotRenewed,
    OtherLeader { node: String, epoch: u64 },
    StaleEpoch { held: u64, current: u64 },
    NotHeld,
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceReason::EtcdUnreachable => f.write_str("cannot reach etcd to renew the leader lease"),
            FenceReason::LeaseNotRenewed => f.write_str("the leader lease was not renewed in time"),
            FenceReason::OtherLeader { node, epoch } => write!(f, "{node} is the leader of epoch {epoch}"),
            FenceReason::StaleEpoch { held, current } => write!(f, "leader epoch {held} is stale (current {current})"),
            FenceReason::NotHeld => f.write_str("this node does not hold the leader lease"),
        }
    }
}
