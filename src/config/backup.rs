//! `[backup]`: continuous WAL archiving and base backups with pgBackRest, to
//! one repository per region (`[[backup.repository]]`). meridian renders each
//! node's pgBackRest configuration from this section and the secrets file;
//! see docs/backup.md.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{humantime_serde, is_dns_label, Config, Problem};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupConfig {
    /// Where base backups run: a standby of the repository's region when one
    /// is healthy, else the primary (`prefer-standby`), or always the primary.
    #[serde(default)]
    pub run_on: RunOn,
    /// Where a node with an empty data directory gets its copy: a base
    /// backup from the primary, or the newest backup in its region's
    /// repository (else the first) replayed from the archive until it
    /// streams, so a far replica does not pull the database across the WAN.
    /// A repository that fails or holds no backup falls back to the primary.
    #[serde(default)]
    pub clone_from: CloneFrom,
    /// How often a full backup is taken.
    #[serde(default = "default_full_every", with = "humantime_serde")]
    pub full_every: Duration,
    /// How often a differential backup (changes since the last full) is taken; none if unset.
    #[serde(default, with = "humantime_serde::option")]
    pub diff_every: Option<Duration>,
    /// How often an incremental backup (changes since the last backup) is taken; none if unset.
    #[serde(default, with = "humantime_serde::option")]
    pub incr_every: Option<Duration>,
    /// How long after a gateway starts its schedule first looks (then every
    /// minute): a cluster just coming up does not start a backup at once.
    #[serde(default = "default_schedule_delay", with = "humantime_serde")]
    pub schedule_delay: Duration,
    /// Full backups kept per repository (with their differentials,
    /// incrementals and the WAL they need); older ones are expired.
    #[serde(default = "default_retention_full")]
    pub retention_full: u32,
    /// Encrypt every repository (AES-256-CBC) with `backup_cipher_pass` from the secrets file.
    #[serde(default = "yes")]
    pub encrypt: bool,
    /// PostgreSQL's `archive_timeout`: a quiet primary still closes and
    /// archives a segment this often, which bounds what a restore can lose.
    #[serde(default = "default_archive_timeout", with = "humantime_serde")]
    pub archive_timeout: Duration,
    /// Parallel processes for backup, restore and asynchronous archive-push.
    #[serde(default = "default_process_max")]
    pub process_max: u32,
    /// The pgBackRest program.
    #[serde(default = "default_pgbackrest")]
    pub pgbackrest: PathBuf,
    #[serde(rename = "repository", default)]
    pub repositories: Vec<Repository>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunOn {
    #[default]
    PreferStandby,
    Primary,
}

impl fmt::Display for RunOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunOn::PreferStandby => "prefer-standby",
            RunOn::Primary => "primary",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneFrom {
    #[default]
    Primary,
    Repository,
}

impl BackupConfig {
    /// The repository a node of `region` clones from: its region's, else the first.
    pub fn nearest_repository(&self, region: &str) -> Option<(usize, &Repository)> {
        let i = self.repositories.iter().position(|r| r.region == region).unwrap_or(0);
        self.repositories.get(i).map(|r| (i + 1, r))
    }
}

fn default_full_every() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_retention_full() -> u32 {
    2
}
fn yes() -> bool {
    true
}
fn default_schedule_delay() -> Duration {
    Duration::from_secs(300)
}

fn default_archive_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_process_max() -> u32 {
    2
}
fn default_pgbackrest() -> PathBuf {
    PathBuf::from("/usr/bin/pgbackrest")
}

/// One pgBackRest repository; its position in the list (from 1) is its
/// pgBackRest index (`repo1`, `repo2`, ...), so append new ones at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Repository {
    /// Names the repository in commands and status, and its table in the secrets file.
    pub name: String,
    /// The region it lives in; backups for it run there when possible.
    pub region: String,
    /// `s3://bucket/prefix` or `file:///absolute/path`.
    pub url: String,
    /// For `s3://`: `https://host[:port]`. pgBackRest speaks S3 only over TLS,
    /// and verifies the certificate's DNS names (not its addresses) against `host`.
    pub endpoint: Option<String>,
    /// For `s3://`: the bucket's region.
    #[serde(default = "default_s3_region")]
    pub s3_region: String,
    /// For `s3://`: the CA that signed the endpoint's certificate. Default:
    /// the cluster CA (`[tls]`), which is what the lab's S3 server uses; a
    /// public endpoint needs the system's CAs (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: Option<PathBuf>,
    /// For `s3://`: connect to this address instead of the endpoint's host
    /// (pgBackRest's `repo-storage-host`; requests still name the endpoint's
    /// host): a private address for a public endpoint, or the netns lab, whose
    /// hosts reach the lab's S3 server on the observer link. pgBackRest 2.45
    /// verifies the certificate against this address, as a DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_host: Option<std::net::IpAddr>,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

/// Where a repository keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    S3 { bucket: String, prefix: String, host: String, port: u16 },
    Posix { path: PathBuf },
}

impl Repository {
    /// The parsed `url` (and `endpoint`), or why they are wrong.
    pub fn location(&self) -> Result<RepoLocation, String> {
        if let Some(rest) = self.url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !is_bucket_name(bucket) {
                return Err(format!(
                    "{:?}: {bucket:?} is not a bucket name (3-63 lowercase letters, digits, '-' and '.')",
                    self.url
                ));
            }
            let endpoint = self.endpoint.as_deref().ok_or_else(|| {
                format!("{:?} needs `endpoint = \"https://host[:port]\"` (the S3 server to use)", self.url)
            })?;
            let (host, port) = parse_endpoint(endpoint)?;
            let prefix = format!("/{}", prefix.trim_matches('/'));
            Ok(RepoLocation::S3 { bucket: bucket.to_string(), prefix, host, port })
        } else if let Some(path) = self.url.strip_prefix("file://") {
            if self.endpoint.is_some() {
                return Err(format!("{:?} is a directory; `endpoint` is only for s3:// repositories", self.url));
            }
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!("{:?} must name an absolute directory, like file:///var/lib/backup", self.url));
            }
            Ok(RepoLocation::Posix { path: PathBuf::from(path.trim_end_matches('/')) })
        } else {
            Err(format!("{:?} must start with s3:// or file://", self.url))
        }
    }
}

/// `https://host[:port]` to the host and port; plain `http://` is refused
/// because pgBackRest 2.45 reaches S3 over TLS only.
fn parse_endpoint(endpoint: &str) -> Result<(String, u16), String> {
    let rest = endpoint.strip_prefix("https://").ok_or_else(|| {
        format!("endpoint {endpoint:?} must start with https:// (pgBackRest reaches S3 over TLS only)")
    })?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("endpoint {endpoint:?} has a bad port"))?),
        None => (rest, 443),
    };
    let name_ok = !host.is_empty()
        && host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !name_ok || host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "endpoint {endpoint:?}: the host must be a DNS name its certificate names (pgBackRest 2.45 does not match certificates by IP address)"
        ));
    }
    Ok((host.to_ascii_lowercase(), port))
}

fn is_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
}

pub(super) fn validate(config: &Config, p: &mut Vec<Problem>) {
    let Some(b) = &config.backup else { return };
    let mut push = |at: String, message: String| p.push(Problem { at, message });
    if b.repositories.is_empty() {
        push("backup.repository".into(), "at least one [[backup.repository]] is required".into());
    }
    if b.full_every < Duration::from_secs(3600) {
        push("backup.full_every".into(), "must be at least 1h".into());
    }
    let mut shorter = b.full_every;
    for (field, every) in [("diff_every", b.diff_every), ("incr_every", b.incr_every)] {
        if let Some(e) = every {
            if e < Duration::from_secs(600) || e >= shorter {
                push(
                    format!("backup.{field}"),
                    format!(
                        "{} must be at least 10m and shorter than {}",
                        humantime::format_duration(e),
                        humantime::format_duration(shorter)
                    ),
                );
            } else {
                shorter = e;
            }
        }
    }
    if !(1..=100).contains(&b.retention_full) {
        push("backup.retention_full".into(), "must be between 1 and 100 full backups".into());
    }
    if b.schedule_delay > Duration::from_secs(24 * 3600) {
        push("backup.schedule_delay".into(), "must be at most 1 day".into());
    }
    if b.archive_timeout < Duration::from_secs(10) || b.archive_timeout > Duration::from_secs(3600) {
        push("backup.archive_timeout".into(), "must be between 10s and 1h".into());
    }
    if !(1..=32).contains(&b.process_max) {
        push("backup.process_max".into(), "must be between 1 and 32".into());
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut urls: HashMap<&str, usize> = HashMap::new();
    for (i, r) in b.repositories.iter().enumerate() {
        let at = format!("backup.repository[{i}]");
        if !is_dns_label(&r.name) {
            push(format!("{at}.name"), format!("{:?} must be lowercase letters, digits and '-'", r.name));
        }
        if let Some(prev) = names.insert(&r.name, i) {
            push(
                format!("{at}.name"),
                format!("duplicate repository name {:?} (also backup.repository[{prev}])", r.name),
            );
        }
        if let Some(prev) = urls.insert(&r.url, i) {
            push(format!("{at}.url"), format!("{:?} is already backup.repository[{prev}]", r.url));
        }
        if !config.regions.iter().any(|reg| reg.name == r.region) {
            push(format!("{at}.region"), format!("{:?} is not one of the [[region]] names", r.region));
        }
        match r.location() {
            Err(m) => push(format!("{at}.url"), m),
            Ok(RepoLocation::Posix { .. }) if r.ca_file.is_some() => {
                push(format!("{at}.ca_file"), "is only for s3:// repositories".into())
            }
            Ok(_) => {}
        }
    }
    if b.repositories.len() > 256 {
        push("backup.repository".into(), "pgBackRest supports at most 256 repositories".into());
    }
}
