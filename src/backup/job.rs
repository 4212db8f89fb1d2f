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

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Requested => "requested",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        })
    }
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
            upstream: upstream.map(String::from),
            ..crate::gateway::routing::tests::member(node, region, role, lag)
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

/// What the schedule asks for next (pure; tested below): for the first
/// repository in the configuration that is due, the largest type that is —
/// a full backup when it has none or its last full is `full_every` old, a
/// differential when the last full or differential is `diff_every` old, an
/// incremental when the last backup of any type is `incr_every` old. Backups
/// are known from the repositories' catalog and from the last job (which the
/// catalog may not show yet: it was read before the job ended). `readable`
/// says which repositories answered; one that did not is skipped.
pub fn due(
    backup: &BackupConfig,
    catalog: &super::catalog::Catalog,
    readable: &dyn Fn(&str) -> bool,
    last_job: Option<&BackupJob>,
    now_s: u64,
) -> Option<(BackupType, String)> {
    let from_job = |repo: &str, types: &[BackupType]| -> Option<u64> {
        let job = last_job.filter(|j| types.contains(&j.backup_type))?;
        let o = job.outcomes.iter().find(|o| o.repository == repo && o.ok)?;
        Some(o.finished_at_ms / 1000)
    };
    let last = |repo: &str, types: &[BackupType]| -> Option<u64> {
        let in_catalog = catalog
            .backups
            .iter()
            .filter(|b| b.repository == repo && types.iter().any(|t| t.as_str() == b.backup_type))
            .map(|b| b.stopped_at)
            .max();
        in_catalog.max(from_job(repo, types))
    };
    let older =
        |at: Option<u64>, every: std::time::Duration| at.is_none_or(|t| now_s.saturating_sub(t) >= every.as_secs());
    use BackupType::*;
    for r in backup.repositories.iter().filter(|r| readable(&r.name)) {
        let name = &r.name;
        if older(last(name, &[Full]), backup.full_every) {
            return Some((Full, name.clone()));
        }
        if let Some(every) = backup.diff_every {
            if older(last(name, &[Full, Diff]), every) {
                return Some((Diff, name.clone()));
            }
        }
        if let Some(every) = backup.incr_every {
            if older(last(name, &[Full, Diff, Incr]), every) {
                return Some((Incr, name.clone()));
            }
        }
    }
    None
}

#[cfg(test)]
mod schedule_tests {
    use super::*;
    use crate::backup::catalog::{BackupSet, Catalog};
    use crate::lab::topology::{lab_config, LabShape};
    use std::time::Duration;

    fn set(repo: &str, kind: &str, stopped_at: u64) -> BackupSet {
        BackupSet::sample(&format!("{stopped_at}{kind}"), repo, kind, stopped_at, None)
    }

    #[test]
    fn the_schedule_asks_for_the_largest_type_due_in_the_first_repository_due() {
        let c = lab_config(&LabShape::default(), std::path::Path::new("/tmp/lab"));
        let mut b = c.backup.clone().unwrap();
        b.full_every = Duration::from_secs(7 * 86400);
        b.diff_every = Some(Duration::from_secs(86400));
        b.incr_every = Some(Duration::from_secs(3600));
        let (r1, r2) = (b.repositories[0].name.clone(), b.repositories[1].name.clone());
        let all = |_: &str| true;
        let day = 86400;
        let now = 100 * day;
        // Nothing yet: a full backup, first repository first.
        assert_eq!(due(&b, &Catalog::default(), &all, None, now), Some((BackupType::Full, r1.clone())));
        // An unreadable repository is skipped.
        let only_r2 = |n: &str| n == r2;
        assert_eq!(due(&b, &Catalog::default(), &only_r2, None, now), Some((BackupType::Full, r2.clone())));
        // A fresh full in r1 (half an hour ago), none in r2.
        let mut cat = Catalog { backups: vec![set(&r1, "full", now - 1800)], ..Catalog::default() };
        assert_eq!(due(&b, &cat, &all, None, now), Some((BackupType::Full, r2.clone())));
        cat.backups.push(set(&r2, "full", now - 60));
        // r1's full is an hour old: an incremental is due there.
        cat.backups[0].stopped_at = now - 3600;
        assert_eq!(due(&b, &cat, &all, None, now), Some((BackupType::Incr, r1.clone())));
        // Two days old: a differential.
        cat.backups[0].stopped_at = now - 2 * day;
        assert_eq!(due(&b, &cat, &all, None, now), Some((BackupType::Diff, r1.clone())));
        // Eight days: a full again.
        cat.backups[0].stopped_at = now - 8 * day;
        assert_eq!(due(&b, &cat, &all, None, now), Some((BackupType::Full, r1.clone())));
        // ... unless the last job just took it, before the catalog was read.
        let job = BackupJob {
            id: "j".into(),
            backup_type: BackupType::Full,
            repositories: vec![r1.clone()],
            node: "n".into(),
            primary: "n".into(),
            requested_by: "schedule".into(),
            requested_at_ms: 0,
            state: JobState::Succeeded,
            current: None,
            started_at_ms: None,
            outcomes: vec![RepoOutcome {
                repository: r1.clone(),
                ok: true,
                label: None,
                error: None,
                ms: 1,
                finished_at_ms: (now - 10) * 1000,
            }],
            error: None,
        };
        assert_eq!(due(&b, &cat, &all, Some(&job), now), None);
        // Without diff and incr schedules only fulls are asked for.
        b.diff_every = None;
        b.incr_every = None;
        cat.backups[0].stopped_at = now - 2 * day;
        assert_eq!(due(&b, &cat, &all, None, now), None);
    }
}
