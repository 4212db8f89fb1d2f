//! The cluster's observed state, as agents publish it to etcd and as the
//! gateway API serves it: WAL positions, member status, the leader, the epoch,
//! and the status table the CLI prints.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::Config;

/// A WAL position. PostgreSQL prints it as `X/Y` (high and low 32 bits in hex);
/// so do we, in JSON and tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("{s:?} is not an LSN (X/Y)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("{s:?} is not an LSN"));
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Agents report every second; a report older than this is from an agent that
/// stopped reporting (dead, or cut off from etcd).
pub const STALE_REPORT_MS: u64 = 3000;

/// The fencing number: +1 at every promotion. Only the leader of the current
/// epoch may take writes.
pub type Epoch = u64;

/// What a node is doing, as far as meridian can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-write, and holds `leader` for the current epoch.
    Primary,
    /// A standby streaming (or trying to stream) from the primary.
    Replica,
    /// A former primary that lost its lease and restarted itself read-only.
    Fenced,
    /// Initializing, copying a base backup, or starting PostgreSQL.
    Starting,
    /// The agent runs but PostgreSQL does not.
    Stopped,
    /// No agent has reported for this node (its lease expired or it never started).
    Unknown,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Fenced => "fenced",
            Role::Starting => "starting",
            Role::Stopped => "stopped",
            Role::Unknown => "unknown",
        })
    }
}

/// One agent's report about its node, stored at `members/<node>` under the agent's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub node: String,
    pub region: String,
    pub role: Role,
    pub timeline: Option<u32>,
    /// Primary: current WAL insert position. Standby: last WAL received.
    pub write_lsn: Option<Lsn>,
    /// Primary: WAL flushed locally. Standby: same as received (flushed by the walreceiver).
    pub flush_lsn: Option<Lsn>,
    /// Primary: same as write. Standby: last WAL replayed (what readers see).
    pub replay_lsn: Option<Lsn>,
    /// How far replay is behind the leader's last published position.
    pub lag_bytes: Option<u64>,
    /// How long ago the last replayed transaction committed on the primary; 0 when caught up.
    pub lag_seconds: Option<f64>,
    /// The node this standby streams from, when streaming.
    pub upstream: Option<String>,
    /// The highest epoch this agent has seen; a primary with an old epoch is stale.
    pub epoch_seen: Epoch,
    /// PostgreSQL answers queries and, for a standby, its walreceiver is streaming.
    pub healthy: bool,
    /// Why the node is not healthy, or what it is doing, in a few words.
    pub detail: Option<String>,
    /// Why the agent does nothing now, as a type (`detail` has its text).
    #[serde(default)]
    pub waiting: Option<crate::failover::WaitReason>,
    /// The last action that failed, kept until it succeeds.
    #[serde(default)]
    pub failure: Option<ActionFailure>,
    /// When the node's certificate expires, Unix seconds.
    #[serde(default)]
    pub cert_not_after: Option<u64>,
    /// WAL archiving (`[backup]`), as this node's server reports it.
    #[serde(default)]
    pub archive: Option<ArchiveReport>,
    /// The primary's commit-lag guard (`[replication] max_commit_lag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_hold: Option<crate::agent::commit_lag::CommitHold>,
    /// The published cluster file version the agent runs by (0: the file it started with).
    #[serde(default)]
    pub config_version: u64,
    /// What a restart of PostgreSQL would change: settings published by
    /// `config apply` that take a restart, or a newer installed PostgreSQL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    /// The last `restart` request this agent carried out (or found carried
    /// out: a server started after the request was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_for: Option<String>,
    /// Its server hung as primary a short while ago (`agent::HANG_STAND_ASIDE`,
    /// by its agent's clock): it is promoted only when no other standby may be.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hung_recently: bool,
    /// Milliseconds since the Unix epoch, when the agent wrote this, by *its*
    /// clock: for people (history, logs), never for deciding freshness.
    pub updated_at_ms: u64,
    /// How long ago the process holding this value saw the report rewritten
    /// (its etcd revision change), by its own monotonic clock; stamped when a
    /// snapshot is read (`coord::Coord::snapshot`), never stored.
    #[serde(skip)]
    pub unchanged_ms: u64,
    /// The etcd revision of the report's last write; stamped when read.
    #[serde(skip)]
    pub revision: i64,
}

impl MemberStatus {
    /// The one freshness rule. A report is fresh while its key exists (it
    /// lives under its agent's lease, so the agent renewed within the TTL) and
    /// this process saw it rewritten within `STALE_REPORT_MS` (agents rewrite
    /// every second). No other host's clock is consulted, so a skewed clock
    /// anywhere changes nothing. A process that has just started trusts a
    /// report it sees for the first time for `STALE_REPORT_MS`.
    pub fn is_fresh(&self) -> bool {
        self.unchanged_ms <= STALE_REPORT_MS
    }
}

/// An action of the agent's that failed (a base backup, a rewind), shown in
/// status until it succeeds; the agent retries it with a growing pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionFailure {
    /// What was tried, e.g. "clone from ap-south-1a".
    pub action: String,
    /// The error, as the agent logged it.
    pub error: String,
    /// Failures in a row.
    pub attempts: u32,
    /// How long the agent waits before it tries again.
    pub retry_in_ms: u64,
}

/// The value of the `leader` key: who may take writes, and for which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    pub node: String,
    pub epoch: Epoch,
}

/// The value of the `optime` key: the leader's position, written every second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Optime {
    pub node: String,
    pub region: String,
    pub epoch: Epoch,
    pub lsn: Lsn,
    pub timeline: Option<u32>,
    pub at_ms: u64,
}

/// Where a new leader's WAL starts, as far as it knows when it takes
/// `leader` (a standby's received position, restored data's end): the first
/// `optime` of its epoch, written in the same transaction (`Coord::acquire_leader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPosition {
    pub region: String,
    pub lsn: Lsn,
    pub timeline: Option<u32>,
}

/// The value of the `sync` key: which standbys the leader of `epoch`
/// vouches for. With `standbys` non-empty, every commit that leader has
/// acknowledged is on at least one of them (received and flushed), so the one
/// of them with the most WAL has them all. Empty: no such promise (the leader
/// ran asynchronously at some point of its epoch, or has not yet had a
/// synchronous standby catch up). Written by the leader only, before it widens
/// or empties `synchronous_standby_names`, and narrowed only once a standby of
/// the new set has flushed past the point where the new set took effect
/// (`agent::primary::apply_synchronous_standbys`). An automatic failover reads
/// it (`failover::choose`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub node: String,
    pub epoch: Epoch,
    pub standbys: Vec<String>,
    pub at_ms: u64,
}

/// A live gateway, at `gateways/<region>` under the gateway's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPresence {
    pub region: String,
    /// The switchover (its `requested_at_ms`) for which this gateway's proxies
    /// hold new transactions: its view shows the request and no writer. The old
    /// primary counts open transactions once every live gateway holds.
    pub holding_for: Option<u64>,
    /// The published cluster file version this gateway routes by (0: the file
    /// it started with); `config apply` waits for every live gateway too.
    #[serde(default)]
    pub config_version: u64,
    /// The rolling restart (its request id) whose node this gateway's readers
    /// no longer use: that node's agent stops its server once every live
    /// gateway says so and the transactions open on it have finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avoiding: Option<String>,
}

/// A planned switchover in progress, at `switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    pub from: String,
    pub to: String,
    pub requested_by: String,
    pub requested_at_ms: u64,
    /// The old primary gives up (and stays primary) if the target has not
    /// caught up this long after it stopped. A duration, not a time: the
    /// gateway that writes it and the agent that acts on it may disagree on
    /// the time of day.
    pub timeout_ms: u64,
    /// Set by the old primary once it stopped cleanly: its shutdown checkpoint.
    pub final_lsn: Option<Lsn>,
    /// Set by the old primary when it gave up; agents ignore an aborted request.
    pub aborted: Option<String>,
}

/// A restart of one node's PostgreSQL asked by `meridian rolling-restart`, at
/// `restart`: one node at a time. The node's agent restarts its server (a
/// standby only) and reports the request's id in `restarted_for`; the gateway
/// that wrote the request waits for that, then deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRequest {
    /// Unique per request, so a report can say which one it carried out.
    pub id: String,
    pub node: String,
    pub reason: String,
    pub requested_by: String,
    pub requested_at_ms: u64,
}

/// `meridian restore --replace` in progress, at `restore`, under the lease of
/// the `meridian restore` process carrying it out: if that process dies, the
/// request goes with its lease and the cluster carries on with its own data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The node that will hold the restored data and become primary.
    pub node: String,
    pub requested_by: String,
    pub requested_at_ms: u64,
    /// The backup restored from, and the recovery target, for people and history.
    pub backup: String,
    pub target: String,
    pub state: RestoreStep,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreStep {
    /// Waiting for the primary to step down and `node`'s server to stop.
    Stopping,
    /// `meridian restore` is writing the restored data beside `node`'s.
    Restoring,
    /// The restored data is in place, promoted on a new timeline: `node`
    /// takes `leader` with the next epoch and starts it read-write.
    Restored { timeline: u32, lsn: Lsn },
}

/// The DR switch, at `dr`: the region an operator declared active, and the node
/// to promote there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrSwitch {
    pub active_region: String,
    pub target: String,
    pub allow_data_loss: bool,
    pub set_by: String,
    pub at_ms: u64,
    /// WAL the target lacked of the last primary position when the switch was set.
    pub lost_bytes_estimate: u64,
    /// The epoch in which the target was promoted, once done.
    pub done_epoch: Option<Epoch>,
    /// The trigger object (URL and version) that set this switch, when one did:
    /// the same object never switches twice.
    #[serde(default)]
    pub trigger: Option<String>,
}

/// One gateway's latest verdict on one health check, at `health/<check>/<observer>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub check: String,
    /// The region whose gateway ran the check.
    pub observer: String,
    /// After `invert` and the failure threshold.
    pub healthy: bool,
    /// No probe has found anything to judge by yet (then `healthy` is false
    /// and means nothing): shown as pending, not as unhealthy.
    #[serde(default)]
    pub pending: bool,
    /// What the last probe saw, in a few words.
    pub detail: String,
    pub at_ms: u64,
}

/// How a node became primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromotionKind {
    /// Automatic, after the leader was lost.
    Failover,
    /// Planned, with zero data loss.
    Switchover,
    /// Declared by an operator (`meridian failover --to-region`).
    Dr,
    /// The cluster's data replaced by a restore (`meridian restore --replace`).
    Restore,
}

impl fmt::Display for PromotionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PromotionKind::Failover => "failover",
            PromotionKind::Switchover => "switchover",
            PromotionKind::Dr => "dr",
            PromotionKind::Restore => "restore",
        })
    }
}

/// One promotion, stored at `history/<epoch>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub epoch: Epoch,
    pub kind: PromotionKind,
    /// The previous primary, when known.
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    /// The new primary's WAL position when it was promoted.
    pub lsn: Option<Lsn>,
    /// WAL the new primary did not have of the old primary's last recorded position.
    pub lost_bytes_estimate: Option<u64>,
    /// Last sign of the old primary (failover) or when the operation began.
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

/// What `GET /v1/cluster` returns and `meridian status` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    /// The last epoch ever granted (the `epoch` key), 0 before bootstrap.
    pub epoch: Epoch,
    /// The node holding `leader` and running as primary, if any.
    pub primary: Option<String>,
    /// Why there is no primary, when there is none.
    pub reason: Option<String>,
    pub nodes: Vec<NodeStatus>,
    /// Nodes no longer in the cluster file whose agents still report (leaving).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaving: Vec<NodeStatus>,
    /// Per repository, from the gateway's last reading of the catalog (`[backup]` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<crate::backup::catalog::RepoSummary>,
    /// etcd members that are learners (a region's member added by `config
    /// apply`, not voting until it has caught up), by name or peer URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_learners: Vec<String>,
    /// With `[replication] synchronous`: the standbys the primary of this
    /// epoch vouches for (`sync` record; empty: none, so only the former
    /// primary itself could be promoted automatically with `remote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vouched: Option<Vec<String>>,
    /// The gateways alive now (under their leases), with what they hold for
    /// and the cluster file version they route by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<GatewayPresence>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub region: String,
    pub role: Role,
    pub timeline: Option<u32>,
    /// Replay position (the primary: its current write position).
    pub lsn: Option<Lsn>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub healthy: bool,
    pub detail: Option<String>,
    /// Why its agent does nothing now, as a type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<crate::failover::WaitReason>,
    /// The agent's last failed action, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<ActionFailure>,
    /// When the node's certificate expires, Unix seconds, as its agent last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<u64>,
    /// WAL archiving, as the node's agent last said (`[backup]` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveReport>,
    /// The primary's commit-lag guard, as its agent last said (`max_commit_lag` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_hold: Option<crate::agent::commit_lag::CommitHold>,
    /// The published cluster file version its agent runs by (0: the file it started with).
    #[serde(default)]
    pub config_version: u64,
    /// What a restart would change (`meridian rolling-restart`), as its agent last said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
}

impl NodeStatus {
    /// The node as its agent's report has it.
    fn from_report(m: &MemberStatus) -> NodeStatus {
        NodeStatus {
            name: m.node.clone(),
            region: m.region.clone(),
            role: m.role,
            timeline: m.timeline,
            lsn: m.replay_lsn.or(m.write_lsn),
            lag_bytes: m.lag_bytes,
            lag_seconds: m.lag_seconds,
            healthy: m.healthy,
            detail: m.detail.clone(),
            waiting: m.waiting.clone(),
            failure: m.failure.clone(),
            cert_not_after: m.cert_not_after,
            archive: m.archive.clone(),
            commit_hold: m.commit_hold.clone(),
            config_version: m.config_version,
            pending_restart: m.pending_restart.clone(),
        }
    }
}

/// What a node's server says of its WAL archiving (`pg_stat_archiver`, and
/// pgBackRest's refusals). A primary archives by pushing to every repository;
/// a standby by seeing that every repository has the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchiveReport {
    /// The last WAL file archived.
    pub last_archived: Option<String>,
    /// Seconds since then, by the server's clock.
    pub last_archived_age_seconds: Option<f64>,
    /// A file whose archiving failed after the last success; PostgreSQL keeps it and retries.
    pub failing: Option<String>,
    /// A repository holds this node's WAL file with other content: two servers
    /// wrote the same timeline (a possible split brain).
    pub conflict: Option<String>,
}

impl ClusterStatus {
    /// Joins the configured nodes with what their agents published. A node with
    /// no report, or one not fresh (`MemberStatus::is_fresh`), is `unknown` (its
    /// agent may have died: the report outlives it until its lease expires). A node
    /// reporting `primary` without holding `leader` for the current epoch is
    /// shown as it reports but is not named primary.
    pub fn build(config: &Config, leader: Option<&Leader>, epoch: Epoch, members: &[MemberStatus]) -> ClusterStatus {
        let nodes: Vec<NodeStatus> = config
            .nodes()
            .map(|(region, node)| match members.iter().find(|m| m.node == node.name) {
                Some(m) if !m.is_fresh() => NodeStatus {
                    role: Role::Unknown,
                    lag_bytes: None,
                    lag_seconds: None,
                    healthy: false,
                    detail: Some(format!(
                        "report not rewritten for {:.1}s (was {})",
                        m.unchanged_ms as f64 / 1000.0,
                        m.role
                    )),
                    waiting: None,
                    failure: None,
                    ..NodeStatus::from_report(m)
                },
                Some(m) => NodeStatus::from_report(m),
                None => NodeStatus {
                    name: node.name.clone(),
                    region: region.name.clone(),
                    role: Role::Unknown,
                    timeline: None,
                    lsn: None,
                    lag_bytes: None,
                    lag_seconds: None,
                    healthy: false,
                    detail: Some("no report from its agent".into()),
                    waiting: None,
                    failure: None,
                    cert_not_after: None,
                    archive: None,
                    commit_hold: None,
                    config_version: 0,
                    pending_restart: Vec::new(),
                },
            })
            .collect();
        let leaving = members
            .iter()
            .filter(|m| m.is_fresh() && config.node(&m.node).is_err())
            .map(|m| NodeStatus { waiting: None, archive: None, commit_hold: None, ..NodeStatus::from_report(m) })
            .collect();
        let primary = leader
            .filter(|l| l.epoch == epoch)
            .filter(|l| nodes.iter().any(|n| n.name == l.node && n.role == Role::Primary))
            .map(|l| l.node.clone());
        let reason = match (&primary, leader) {
            (Some(_), _) => None,
            (None, None) if epoch == 0 => Some("the cluster has not been bootstrapped yet".into()),
            (None, None) => {
                // The standbys' agents say why none of them takes over (lag budget, manual mode).
                let why = nodes.iter().filter_map(|n| n.waiting.as_ref()?.leaderless()).next();
                Some(match why {
                    Some(w) => format!("no node holds the leader lease; {w}"),
                    None => "no node holds the leader lease".into(),
                })
            }
            (None, Some(l)) if l.epoch != epoch => {
                Some(format!("leader {} holds stale epoch {} (current {epoch})", l.node, l.epoch))
            }
            (None, Some(l)) => Some(format!("leader {} is not running as primary yet", l.node)),
        };
        ClusterStatus {
            cluster: config.cluster.clone(),
            epoch,
            primary,
            reason,
            nodes,
            leaving,
            backups: Vec::new(),
            etcd_learners: Vec::new(),
            vouched: None,
            gateways: Vec::new(),
        }
    }

    /// The status as a plain-text table, grouped by region.
    pub fn render(&self) -> String {
        let mut out = format!(
            "cluster {}  epoch {}  primary {}\n",
            self.cluster,
            self.epoch,
            self.primary.as_deref().unwrap_or("-")
        );
        if let Some(reason) = &self.reason {
            out.push_str(&format!("no primary: {reason}\n"));
        }
        let header = ["REGION", "NODE", "ROLE", "TL", "LSN", "LAG", "LAG TIME", "HEALTHY", "DETAIL"];
        let rows: Vec<[String; 9]> = self
            .nodes
            .iter()
            .map(|n| {
                [
                    n.region.clone(),
                    n.name.clone(),
                    n.role.to_string(),
                    opt(n.timeline),
                    opt(n.lsn),
                    n.lag_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
                    n.lag_seconds.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into()),
                    if n.healthy { "yes" } else { "no" }.into(),
                    match &n.failure {
                        Some(f) => format!(
                            "failed to {} ({}x, next try in {}s): {}",
                            f.action,
                            f.attempts,
                            f.retry_in_ms.div_ceil(1000),
                            f.error
                        ),
                        None => n.detail.clone().unwrap_or_default(),
                    },
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    s.push_str(cell);
                } else {
                    s.push_str(&format!("{cell:<w$}  "));
                }
            }
            s.trim_end().to_string() + "\n"
        };
        out.push_str(&line(&header.map(String::from)));
        for row in &rows {
            out.push_str(&line(row));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        for b in &self.backups {
            out.push_str(&b.render(now));
        }
        match self.vouched.as_deref() {
            Some([]) if self.primary.is_some() => out.push_str(
                "synchronous: no standby vouched for yet (the primary ran asynchronously or a standby is catching up): a failover now could lose acknowledged commits\n",
            ),
            Some(v) if !v.is_empty() => out.push_str(&format!(
                "synchronous: every acknowledged commit is on {}{}\n",
                if v.len() > 1 { "one of " } else { "" },
                v.join(", ")
            )),
            _ => {}
        }
        if !self.etcd_learners.is_empty() {
            out.push_str(&format!(
                "etcd: {} joining as learner(s), promoted once caught up\n",
                self.etcd_learners.join(", ")
            ));
        }
        for n in &self.nodes {
            if let Some(warning) = n.cert_not_after.and_then(|t| certificate_warning(t, now)) {
                out.push_str(&format!("WARNING: the certificate of node {} {warning}\n", n.name));
            }
            if let Some(f) = n.archive.as_ref().and_then(|a| a.failing.as_ref()).filter(|_| n.role == Role::Primary) {
                out.push_str(&format!(
                    "WARNING: primary {} could not archive {f} to every repository yet (PostgreSQL keeps it and retries)\n",
                    n.name
                ));
            }
            if let Some(w) = n.commit_hold.as_ref().filter(|_| n.role == Role::Primary).and_then(|h| h.warning(&n.name))
            {
                out.push_str(&w);
                out.push('\n');
            }
            if !n.pending_restart.is_empty() {
                out.push_str(&format!(
                    "node {} restarts with {} at the next `meridian rolling-restart`\n",
                    n.name,
                    n.pending_restart.join("; ")
                ));
            }
            if let Some(c) = n.archive.as_ref().and_then(|a| a.conflict.as_ref()) {
                out.push_str(&format!("ERROR: possible split brain: node {} {c}\n", n.name));
            }
        }
        out
    }
}

/// "expires in N days" when a certificate ends within `ca::WARN_BEFORE`, "expired" after.
pub fn certificate_warning(not_after: u64, now: u64) -> Option<String> {
    let warn = crate::ca::WARN_BEFORE.as_secs();
    match not_after.checked_sub(now) {
        None | Some(0) => Some("has expired; renew it (`meridian ca rotate`, or `ca issue` on its host)".into()),
        Some(left) if left < warn => Some(format!(
            "expires in {} days; renew it (`meridian ca rotate`, or `ca issue` on its host)",
            left.div_ceil(86_400)
        )),
        Some(_) => None,
    }
}

/// "no leader; X" -> "X".
fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Bytes in the largest unit that keeps one decimal meaningful.
pub fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b}B"),
        1024..1_048_576 => format!("{:.1}kB", b as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}MB", b as f64 / 1_048_576.0),
        _ => format!("{:.1}GB", b as f64 / 1_073_741_824.0),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests;
