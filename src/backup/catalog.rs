//! What the repositories hold, from `pgbackrest info --output=json`: the
//! backups (type, times, LSN range, timeline, size, the node that took it)
//! and each repository's WAL archive range. Pure (tested below).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::chain;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSet {
    pub label: String,
    pub repository: String,
    /// full, diff or incr.
    pub backup_type: String,
    /// Unix seconds.
    pub started_at: u64,
    pub stopped_at: u64,
    pub lsn_start: Option<String>,
    pub lsn_stop: Option<String>,
    /// The timeline of the backup's first WAL segment.
    pub timeline: Option<u32>,
    /// Bytes of the database it copied, and what they take in the repository.
    pub database_bytes: u64,
    pub repository_bytes: u64,
    /// The backup a diff or incr builds on.
    pub prior: Option<String>,
    /// The node whose agent took it (meridian's annotation).
    pub node: Option<String>,
    /// pgBackRest found page checksum errors in the copied files.
    pub error: bool,
}

impl BackupSet {
    /// A backup for tests of what is decided from the catalog.
    #[cfg(test)]
    pub fn sample(label: &str, repository: &str, kind: &str, stopped_at: u64, lsn_stop: Option<&str>) -> BackupSet {
        BackupSet {
            label: label.into(),
            repository: repository.into(),
            backup_type: kind.into(),
            started_at: stopped_at.saturating_sub(5),
            stopped_at,
            lsn_start: None,
            lsn_stop: lsn_stop.map(String::from),
            timeline: Some(1),
            database_bytes: 1,
            repository_bytes: 1,
            prior: None,
            node: None,
            error: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRange {
    pub repository: String,
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoState {
    pub repository: String,
    /// pgBackRest's status: 0 ok, 1 missing stanza, 2 no valid backups, 3 missing stanza data, ...
    pub code: i64,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Oldest first, per repository in the configuration's order.
    pub backups: Vec<BackupSet>,
    pub archives: Vec<ArchiveRange>,
    pub repositories: Vec<RepoState>,
}

impl Catalog {
    /// The newest backup in `repository`, of `backup_type` when given.
    pub fn last(&self, repository: &str, backup_type: Option<&str>) -> Option<&BackupSet> {
        self.backups
            .iter()
            .filter(|b| b.repository == repository && backup_type.is_none_or(|t| b.backup_type == t))
            .max_by_key(|b| b.stopped_at)
    }

    pub fn find(&self, label: &str) -> Vec<&BackupSet> {
        self.backups.iter().filter(|b| b.label == label).collect()
    }

    /// The newest WAL segment `repository` holds.
    pub fn archived_max(&self, repository: &str) -> Option<&str> {
        self.archives.iter().filter(|a| a.repository == repository).filter_map(|a| a.max.as_deref()).max()
    }

    /// The WAL position just past the newest segment `repository` holds.
    pub fn archived_through(&self, repository: &str) -> Option<u64> {
        let (_, segno) = chain::parse_segment(self.archived_max(repository)?)?;
        Some((segno + 1) * chain::SEGMENT_SIZE)
    }
}

/// One repository in `meridian status`: what the gateway read from the
/// catalog last (`as_of_seconds` ago), with the archive lag against the
/// primary's current position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoSummary {
    pub repository: String,
    /// pgBackRest's status of the repository, or why it could not be read.
    pub status: String,
    pub last_backup: Option<String>,
    pub last_backup_type: Option<String>,
    /// Unix seconds.
    pub last_backup_stopped_at: Option<u64>,
    pub last_archived: Option<String>,
    pub archive_lag_bytes: Option<u64>,
    pub as_of_seconds: u64,
}

impl RepoSummary {
    pub fn build(catalog: &Catalog, repository: &str, write_lsn: Option<u64>, as_of_seconds: u64) -> RepoSummary {
        let last = catalog.last(repository, None);
        RepoSummary {
            repository: repository.to_string(),
            status: catalog
                .repositories
                .iter()
                .find(|r| r.repository == repository)
                .map(|r| r.message.clone())
                .unwrap_or_default(),
            last_backup: last.map(|b| b.label.clone()),
            last_backup_type: last.map(|b| b.backup_type.clone()),
            last_backup_stopped_at: last.map(|b| b.stopped_at),
            last_archived: catalog.archived_max(repository).map(String::from),
            archive_lag_bytes: match (write_lsn, catalog.archived_through(repository)) {
                (Some(w), Some(a)) => Some(w.saturating_sub(a)),
                _ => None,
            },
            as_of_seconds,
        }
    }

    /// One line of `meridian status`.
    pub fn render(&self, now_s: u64) -> String {
        let backup = match (&self.last_backup, &self.last_backup_type, self.last_backup_stopped_at) {
            (Some(l), Some(t), Some(at)) => {
                format!(
                    "last backup {l} ({t}, {} ago)",
                    humantime::format_duration(std::time::Duration::from_secs(now_s.saturating_sub(at)))
                )
            }
            _ => "no backup".into(),
        };
        format!(
            "repository {}: {}; {backup}; archived to {}, {} behind (read {}s ago)\n",
            self.repository,
            self.status,
            self.last_archived.as_deref().unwrap_or("-"),
            self.archive_lag_bytes.map(crate::cluster::human_bytes).unwrap_or_else(|| "?".into()),
            self.as_of_seconds
        )
    }
}

#[derive(Deserialize)]
struct Stanza {
    #[serde(default)]
    archive: Vec<Archive>,
    #[serde(default)]
    backup: Vec<Backup>,
    #[serde(default)]
    repo: Vec<Repo>,
}

#[derive(Deserialize)]
struct Archive {
    database: DbRef,
    min: Option<String>,
    max: Option<String>,
}

#[derive(Deserialize)]
struct DbRef {
    #[serde(rename = "repo-key")]
    repo_key: usize,
}

#[derive(Deserialize)]
struct Backup {
    archive: Option<ArchiveSpan>,
    database: DbRef,
    #[serde(default)]
    error: bool,
    info: Sizes,
    label: String,
    lsn: Option<LsnSpan>,
    prior: Option<String>,
    timestamp: Times,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    annotation: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct ArchiveSpan {
    start: Option<String>,
}

#[derive(Deserialize)]
struct LsnSpan {
    start: Option<String>,
    stop: Option<String>,
}

#[derive(Deserialize)]
struct Sizes {
    size: u64,
    repository: RepoSize,
}

#[derive(Deserialize)]
struct RepoSize {
    size: u64,
}

#[derive(Deserialize)]
struct Times {
    start: u64,
    stop: u64,
}

#[derive(Deserialize)]
struct Repo {
    key: usize,
    status: Status,
}

#[derive(Deserialize)]
struct Status {
    code: i64,
    message: String,
}

/// `names[i]` is the name of the configuration's `repo{i+1}`.
pub fn parse_info(json: &[u8], names: &[String]) -> Result<Catalog> {
    let stanzas: Vec<Stanza> = serde_json::from_slice(json).context("parse pgbackrest info --output=json")?;
    let name = |key: usize| names.get(key.wrapping_sub(1)).cloned().unwrap_or_else(|| format!("repo{key}"));
    let mut c = Catalog::default();
    for s in stanzas {
        for a in s.archive {
            c.archives.push(ArchiveRange { repository: name(a.database.repo_key), min: a.min, max: a.max });
        }
        for b in s.backup {
            let timeline = b.archive.as_ref().and_then(|a| a.start.as_deref()).and_then(chain::parse_segment);
            c.backups.push(BackupSet {
                label: b.label,
                repository: name(b.database.repo_key),
                backup_type: b.kind,
                started_at: b.timestamp.start,
                stopped_at: b.timestamp.stop,
                lsn_start: b.lsn.as_ref().and_then(|l| l.start.clone()),
                lsn_stop: b.lsn.as_ref().and_then(|l| l.stop.clone()),
                timeline: timeline.map(|(tli, _)| tli),
                database_bytes: b.info.size,
                repository_bytes: b.info.repository.size,
                prior: b.prior,
                node: b.annotation.and_then(|a| a.get("node").cloned()),
                error: b.error,
            });
        }
        for r in s.repo {
            c.repositories.push(RepoState { repository: name(r.key), code: r.status.code, message: r.status.message });
        }
    }
    let order = |r: &str| names.iter().position(|n| n == r).unwrap_or(usize::MAX);
    c.backups.sort_by_key(|b| (order(&b.repository), b.stopped_at));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pgBackRest 2.45's output for a stanza with a full backup in repo2 only (trimmed).
    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000004","min":"000000010000000000000001"},
      {"database":{"id":1,"repo-key":2},"id":"15-1","max":"000000020000000000000006","min":"000000010000000000000001"}],
      "backup":[{"archive":{"start":"000000010000000000000004","stop":"000000010000000000000004"},"backrest":{"format":5,"version":"2.45"},
      "database":{"id":1,"repo-key":2},"error":false,"info":{"delta":30529815,"repository":{"delta":6070608,"size":6070608},"size":30529815},
      "label":"20261202-165504F","lsn":{"start":"0/4000028","stop":"0/4000100"},"prior":null,"reference":null,
      "timestamp":{"start":1796230504,"stop":1796230507},"type":"full","annotation":{"node":"ap-northeast-1a"}}],
      "cipher":"aes-256-cbc","db":[],"name":"lab",
      "repo":[{"cipher":"aes-256-cbc","key":1,"status":{"code":2,"message":"no valid backups"}},{"cipher":"aes-256-cbc","key":2,"status":{"code":0,"message":"ok"}}],
      "status":{"code":4,"lock":{"backup":{"held":false}},"message":"different across repos"}}]"#;

    #[test]
    fn info_becomes_backups_and_archive_ranges_by_repository_name() {
        let names = vec!["ap-south-1".to_string(), "ap-northeast-1".to_string()];
        let c = parse_info(INFO.as_bytes(), &names).unwrap();
        assert_eq!(c.backups.len(), 1);
        let b = &c.backups[0];
        assert_eq!(
            (b.label.as_str(), b.repository.as_str(), b.backup_type.as_str()),
            ("20261202-165504F", "ap-northeast-1", "full")
        );
        assert_eq!((b.timeline, b.node.as_deref(), b.database_bytes), (Some(1), Some("ap-northeast-1a"), 30529815));
        assert_eq!(b.lsn_start.as_deref(), Some("0/4000028"));
        assert_eq!(c.last("ap-northeast-1", Some("full")).map(|b| b.label.as_str()), Some("20261202-165504F"));
        assert!(c.last("ap-south-1", None).is_none());
        assert_eq!(c.archived_max("ap-northeast-1"), Some("000000020000000000000006"));
        assert_eq!(c.archived_through("ap-south-1"), Some(5 * chain::SEGMENT_SIZE));
        assert_eq!(c.repositories[0].message, "no valid backups");
        assert!(parse_info(b"not json", &names).is_err());
    }
}
