//! A backup job: asked for through the gateway (or by its schedule), stored in
//! etcd at `backup`, carried out by the agent of the node it names. One job at
//! a time per cluster; the key keeps the last one so `backup create` can show
//! its outcome and the schedule knows what was just done. Choosing the node is
//! pure (tested below).

use serde::{Deserialize, Serialize};

use crate::cluster::{MemberStatus, Role};
use crate::config::{BackupConfig, Config, RunOn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Diff,
    Incr,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        }
    }
}

impl std::fmt::Display for BackupType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Written by the gateway; the node's agent has not taken it yet.
    Requested,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// One repository's part of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoOutcome {
    pub repository: String,
    pub ok: bool,
    /// pgBackRest's label of the new backup (`20261202-165504F`).
    pub label: Option<String>,
    /// pgBackRest's error when it failed.
    pub error: Option<String>,
    pub ms: u64,
    /// When this repository's backup finished (the agent's clock; shown, never compared across hosts).
    pub finished_at_ms: u64,
}

/// The `backup` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupJob {
    pub id: String,
    pub backup_type: BackupType,
    /// In order; each gets its own backup (pgBackRest backs up to one repository at a time).
    pub repositories: Vec<String>,
    /// The node whose agent runs pgBackRest.
    pub node: String,
    /// The primary when the job was made; a standby's backup reads a few files from it.
    pub primary: String,
    pub requested_by: String,
    pub requested_at_ms: u64,
    pub state: JobState,
    /// The repository being backed up now.
    pub current: Option<String>,
    pub started_at_ms: Option<u64>,
    pub outcomes: Vec<RepoOutcome>,
    /// Why the job failed as a whole (the node was no longer suitable, its agent restarted).
    pub error: Option<String>,
}

impl BackupJob {
    /// Whether the job may be replaced by a new one: it finished, or the node
    /// meant to run it no longer reports (so nothing is running it).
    pub fn replaceable(&self, members: &[MemberStatus]) -> bool {
        self.state.finished() || !members.iter().any(|m| m.node == self.node && m.is_fresh())
    }
}

/// Where a backup to `repository` runs, per `[backup] run_on`: a healthy
/// standby streaming from the primary, on the primary's host (pgBackRest
/// reads the few files a standby lacks from the primary's data directory),
/// in the repository's region when one is; else the primary.
pub fn choose_node(
    config: &Config,
    backup: &BackupConfig,
    repository: &str,
    primary: &str,
    members: &[MemberStatus],
) -> Result<String, String> {
    let p = members
        .iter()
        .find(|m| m.node == primary && m.is_fresh() && m.role == Role::Primary)
        .ok_or_else(|| format!("the primary {primary} has no fresh report; no backup can start"))?;
    if backup.run_on == RunOn::Primary {
        return Ok(p.node.clone());
    }
    let region = backup.repositories.iter().find(|r| r.name == repository).map(|r| r.region.as_str());
    let same_host = |node: &str| match (config.node(node), config.node(primary)) {
        (Ok((_, a)), Ok((_, b))) => crate::config::same_host(a, b),
        _ => false,
    };
    let mut standbys: Vec<&MemberStatus> = members
        .iter()
        .filter(|m| {
            m.is_fresh()
                && m.role == Role::Replica
                && m.healthy
                && m.upstream.as_deref() == Some(primary)
                && same_host(&m.node)
        })
        .collect();
    // In the repository's region first, then the least behind.
    standbys.sort_by_key(|m| (Some(m.region.as_str()) != region, m.lag_bytes.unwrap_or(u64::MAX), m.node.clone()));
    Ok(standbys.first().map(|m| m.node.clone()).unwrap_or_else(|| p.node.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::{lab_config, LabShape};

    fn member(node: &str, region: &str, role: Role, upstream: Option<&str>, lag: u64) -> MemberStatus {
        MemberStatus {
            node: node.into(),
            region: region.into(),
            role,
            timeline: Some(1),
            write_lsn: None,
            flush_lsn: None,
            replay_lsn: None,
            lag_bytes: Some(lag),
            lag_seconds: None,
            upstream: upstream.map(String::from),
            epoch_seen: 1,
            healthy: true,
            detail: None,
            waiting: None,
            failure: None,
            cert_not_after: None,
            archive: None,
            updated_at_ms: 0,
            unchanged_ms: 0,
            revision: 1,
        }
    }

    #[test]
    fn a_standby_on_the_primarys_host_runs_the_backup_in_the_repositorys_region_first() {
        let shape = LabShape { nodes_per_region: 2, ..LabShape::default() };
        let c = lab_config(&shape, std::path::Path::new("/tmp/lab"));
        let b = c.backup.clone().unwrap();
        let (r1, r2) = (b.repositories[0].clone(), b.repositories[1].clone());
        let names = c.node_names();
        let (p, s1, s2, s3) = (names[0].clone(), names[1].clone(), names[2].clone(), names[3].clone());
        let region = |node: &str| c.node(node).unwrap().0.name.clone();
        let members = vec![
            member(&p, &region(&p), Role::Primary, None, 0),
            member(&s1, &region(&s1), Role::Replica, Some(&p), 100),
            member(&s2, &region(&s2), Role::Replica, Some(&p), 0),
            member(&s3, &region(&s3), Role::Replica, Some(&p), 50),
        ];
        // The first repository is in the primary's region: its other node there.
        assert_eq!(choose_node(&c, &b, &r1.name, &p, &members).unwrap(), s1);
        // The second in the other region: the least behind there.
        assert_eq!(choose_node(&c, &b, &r2.name, &p, &members).unwrap(), s2);
        // An unhealthy or stale standby is passed over; none left: the primary.
        let only_primary: Vec<MemberStatus> = members
            .iter()
            .cloned()
            .map(|m| if m.node == p { m } else { MemberStatus { healthy: false, ..m } })
            .collect();
        assert_eq!(choose_node(&c, &b, &r1.name, &p, &only_primary).unwrap(), p);
        // run_on = primary.
        let b2 = BackupConfig { run_on: RunOn::Primary, ..b.clone() };
        assert_eq!(choose_node(&c, &b2, &r2.name, &p, &members).unwrap(), p);
        // No fresh primary: refused, with its name.
        let e = choose_node(&c, &b, &r1.name, &s1, &members).unwrap_err();
        assert!(e.contains(&s1), "{e}");
    }
}
