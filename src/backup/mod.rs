//! Backups and WAL archiving with pgBackRest: meridian renders each node's
//! configuration (`pgbackrest`), runs `stanza-create` on the primary, and
//! holds WAL on standbys until every repository has it (`held`). See
//! docs/backup.md.

pub mod catalog;
pub mod chain;
pub mod job;
pub mod pgbackrest;
pub mod replace;
pub mod repo;
pub mod restore;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The repository indices (`repo1` → 1) a rendered configuration names.
pub fn repository_indices(conf: &str) -> Vec<u32> {
    let mut out: Vec<u32> =
        conf.lines().filter_map(|l| l.strip_prefix("repo")?.split_once("-type=")?.0.parse().ok()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The directory of a repository's archive, under `archive/<stanza>/<archive-id>/`,
/// in which pgBackRest keeps a WAL file: segments, `.partial` segments and
/// backup labels in the directory named by the first 16 hex digits; timeline
/// history files beside those directories.
pub fn wal_directory(file: &str) -> Option<&str> {
    let hex = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit());
    if file.strip_suffix(".history").is_some_and(|tli| tli.len() == 8 && hex(tli)) {
        Some("")
    } else if file.get(..24).is_some_and(hex) {
        file.get(..16)
    } else {
        None
    }
}

/// Whether a listing of that directory holds `file`: pgBackRest names a
/// segment (and a `.partial` one) `<file>-<sha1>[.<compression>]`, a history
/// file or backup label as it is.
pub fn listing_holds(names: &[String], file: &str) -> bool {
    let with_checksum = format!("{file}-");
    names.iter().any(|n| n == file || n.starts_with(&with_checksum))
}

/// A standby's archiving (`meridian wal archive`): succeeds only when every repository of the
/// configuration holds `file`, so that a standby's PostgreSQL keeps (and
/// retries) a WAL file the repositories lack. Never pushes.
pub fn held(pgbackrest: &Path, conf: &Path, stanza: &str, file: &str) -> Result<()> {
    let Some(dir) = wal_directory(file) else { bail!("{file:?} is not a WAL file name") };
    let text = std::fs::read_to_string(conf).with_context(|| format!("read {}", conf.display()))?;
    let repos = repository_indices(&text);
    if repos.is_empty() {
        bail!("{} names no repository", conf.display());
    }
    let include = conf.parent().map(pgbackrest::include_path).unwrap_or_default();
    let ls = |repo: u32, path: &str| -> Result<Vec<String>> {
        let mut cmd = Command::new(pgbackrest);
        crate::process::kill_with_parent(&mut cmd);
        let out = cmd
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--config-include-path={}", include.display()))
            .arg(format!("--stanza={stanza}"))
            .arg(format!("--repo={repo}"))
            .arg(format!("--io-timeout={}", LIST_TIMEOUT.as_secs()))
            .args(["--output=json", "repo-ls", path])
            .output()
            .with_context(|| format!("run {}", pgbackrest.display()))?;
        if !out.status.success() {
            bail!("repo{repo}: repo-ls {path}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let listing: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).with_context(|| format!("repo{repo}: parse repo-ls {path}"))?;
        Ok(listing.into_iter().map(|(k, _)| k).filter(|k| k != ".").collect())
    };
    for repo in repos {
        let archive = format!("archive/{stanza}");
        // One archive id per database system identity and major version (`15-1`); newest last.
        let mut ids = ls(repo, &archive)?;
        ids.sort_by_key(|id| id.rsplit('-').next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0));
        let mut found = false;
        for id in ids.iter().rev() {
            let path = if dir.is_empty() { format!("{archive}/{id}") } else { format!("{archive}/{id}/{dir}") };
            if listing_holds(&ls(repo, &path)?, file) {
                found = true;
                break;
            }
        }
        if !found {
            bail!("repo{repo} does not hold {file} yet; kept until it does");
        }
    }
    Ok(())
}

/// How long one listing may take before the archiver is told to try later.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_files_are_looked_for_where_pgbackrest_keeps_them() {
        assert_eq!(wal_directory("000000010000000000000003"), Some("0000000100000000"));
        assert_eq!(wal_directory("000000020000000000000003.partial"), Some("0000000200000000"));
        assert_eq!(wal_directory("000000010000000000000002.00000028.backup"), Some("0000000100000000"));
        assert_eq!(wal_directory("00000002.history"), Some(""));
        assert_eq!(wal_directory("../../etc/passwd"), None);
        assert_eq!(wal_directory("archive_status"), None);
        assert_eq!(wal_directory("0000000100000000000000é3"), None, "not hex, and no panic on a char boundary");
    }

    #[test]
    fn a_listing_holds_a_segment_by_name_and_checksum_not_by_its_partial() {
        let seg = "000000010000000000000003";
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(listing_holds(&names(&[&format!("{seg}-0123abcd.lz4")]), seg));
        assert!(!listing_holds(&names(&["000000010000000000000004-ab.lz4"]), seg));
        assert!(!listing_holds(&names(&[&format!("{seg}.partial-0123.lz4")]), seg), "a partial is not the segment");
        assert!(listing_holds(&names(&[&format!("{seg}.partial-0123.lz4")]), &format!("{seg}.partial")));
        assert!(listing_holds(&names(&["00000002.history"]), "00000002.history"));
        assert!(!listing_holds(&names(&["00000002.history"]), "00000003.history"));
    }

    #[test]
    fn repositories_are_read_from_the_rendered_configuration() {
        let conf = "[global]\nrepo1-type=s3\nrepo1-path=/a\nrepo2-type=posix\nrepo12-type=posix\n[lab]\npg1-path=/d\n";
        assert_eq!(repository_indices(conf), vec![1, 2, 12]);
    }
}
