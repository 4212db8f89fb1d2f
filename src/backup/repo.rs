//! pgBackRest run against the repositories alone, with no PostgreSQL beside
//! it: the gateway lists and verifies backups, `meridian restore` restores.
//! The configuration is rendered into a private temporary directory (it
//! holds the keys) that is removed when the value is dropped.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::catalog::{parse_info, Catalog};
use super::chain::{self, ChainCheck};
use super::pgbackrest;
use crate::config::{BackupConfig, Config, Repository, Secrets};

/// pgBackRest's `io-timeout` for `info`.
pub const INFO_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Repositories {
    dir: PrivateDir,
    conf: PathBuf,
    /// Names of `repo1`, `repo2`, ... in this configuration.
    names: Vec<String>,
    pgbackrest: PathBuf,
    stanza: String,
    /// The OS user pgBackRest runs as (restore writes the server's files as its user).
    os_ids: Option<(u32, u32)>,
}

/// One repository's `pgbackrest verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verified {
    pub repository: String,
    pub ok: bool,
    /// pgBackRest's report (or error), as it printed it.
    pub report: String,
    /// meridian's own check of the WAL chain (pgBackRest's verify checks
    /// each file and each backup's own WAL, not the gaps between backups).
    #[serde(default)]
    pub chain: Option<ChainCheck>,
    pub ms: u64,
}

impl Repositories {
    /// Every repository of `[backup]`, or only `only` (a restore with one
    /// repository's credentials: the others' are not needed, nor asked for).
    pub fn open(
        config: &Config,
        secrets: &Secrets,
        cluster_ca: &Path,
        only: Option<&str>,
        os_ids: Option<(u32, u32)>,
    ) -> Result<Repositories> {
        let backup: &BackupConfig = config.backup.as_ref().context("the cluster file has no [backup] section")?;
        let repos: Vec<&Repository> = match only {
            None => backup.repositories.iter().collect(),
            Some(name) => {
                let names: Vec<&str> = backup.repositories.iter().map(|r| r.name.as_str()).collect();
                vec![backup.repositories.iter().find(|r| r.name == name).with_context(|| {
                    format!("no repository named {name:?} in [backup] (repositories: {})", names.join(", "))
                })?]
            }
        };
        let dir = PrivateDir::new()?;
        let mut text = pgbackrest::render_global(config, backup, secrets, cluster_ca, dir.path(), &repos)?;
        text.push_str(&format!("\n[{}]\n", pgbackrest::stanza(config)));
        let conf = dir.path().join(pgbackrest::CONF);
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600))?;
        std::fs::create_dir(dir.path().join("conf.d"))?;
        if let Some((uid, gid)) = os_ids {
            for p in [dir.path().to_path_buf(), conf.clone(), dir.path().join("conf.d")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid)).with_context(|| format!("chown {}", p.display()))?;
            }
        }
        Ok(Repositories {
            conf,
            names: repos.iter().map(|r| r.name.clone()).collect(),
            pgbackrest: backup.pgbackrest.clone(),
            stanza: pgbackrest::stanza(config).to_string(),
            os_ids,
            dir,
        })
    }

    /// The rendered configuration: every pgBackRest process started with it names this path.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// Ok when every repository of this configuration holds WAL file `file`.
    pub fn holds(&self, file: &str) -> Result<()> {
        // `held` reads the include directory a node's configuration has beside it.
        let include = pgbackrest::include_path(self.dir.path());
        std::fs::create_dir_all(&include).with_context(|| format!("create {}", include.display()))?;
        super::held(&self.pgbackrest, &self.conf, &self.stanza, file)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// `repoN` of a repository in this configuration.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| i + 1)
            .with_context(|| format!("no repository named {name:?} (repositories: {})", self.names.join(", ")))
    }

    /// `pgbackrest <command>` with this configuration; output captured.
    pub fn command(&self, command: &str) -> Command {
        let mut cmd = Command::new(&self.pgbackrest);
        cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8").current_dir(self.dir.path());
        if let Some((uid, gid)) = self.os_ids {
            cmd.uid(uid).gid(gid);
        }
        cmd.arg(format!("--config={}", self.conf.display()))
            .arg(format!("--config-include-path={}", self.dir.path().join("conf.d").display()))
            .arg(format!("--stanza={}", self.stanza))
            .args(["--log-level-console=error", "--log-level-stderr=off"])
            .arg(command)
            .stdin(Stdio::null());
        crate::process::kill_with_parent(&mut cmd);
        cmd
    }

    /// What every repository holds. A repository that cannot be read is
    /// named in the error (pgBackRest's own message).
    pub fn info(&self) -> Result<Catalog> {
        // Small reads that a healthy repository answers at once; pgBackRest tries
        // about four times, so an unreachable repository is named within ~12 s.
        let out = self
            .command("info")
            .args([format!("--io-timeout={}", INFO_IO_TIMEOUT.as_secs()), "--output=json".into()])
            .output()
            .context("run pgbackrest info")?;
        if !out.status.success() {
            bail!("pgbackrest info: {}", pgbackrest::error_text(&[out.stdout, out.stderr].concat()));
        }
        let catalog = parse_info(&out.stdout, &self.names)?;
        // pgBackRest reports an unreadable repository as a status, not an error.
        Ok(catalog)
    }

    /// Deletes the stanza (every backup and archived WAL file) from the one
    /// repository this value was opened with. pgBackRest wants its stop file
    /// first; `--force` because no PostgreSQL is configured here to check
    /// (the caller made sure none of the cluster runs).
    /// `pg_path` is a data directory of the cluster (pgBackRest asks for one even with `--force`).
    pub fn delete_stanza(&self, pg_path: &Path) -> Result<()> {
        let pg1 = format!("--pg1-path={}", pg_path.display());
        for (cmd, extra) in [("stop", vec![]), ("stanza-delete", vec!["--repo=1", "--force", pg1.as_str()])] {
            let out = self.command(cmd).args(extra).output().with_context(|| format!("run pgbackrest {cmd}"))?;
            if !out.status.success() {
                bail!("pgbackrest {cmd}: {}", pgbackrest::error_text(&out.stderr));
            }
        }
        Ok(())
    }

    /// `pgbackrest verify` of one repository (every backup's files and the
    /// archive's WAL files), then the WAL chain from the oldest backup in
    /// `catalog` to the newest archived segment.
    pub fn verify(&self, name: &str, catalog: Option<&Catalog>) -> Result<Verified> {
        let started = std::time::Instant::now();
        let out = self
            .command("verify")
            .args([format!("--repo={}", self.index(name)?), "--output=text".into(), "--verbose".into()])
            .output()
            .context("run pgbackrest verify")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut ok = out.status.success() && text.lines().any(|l| l.trim() == "status: ok");
        let mut report = if out.status.success() {
            text
        } else {
            format!("{text}\n{}", pgbackrest::error_text(&out.stderr)).trim().to_string()
        };
        let oldest = catalog.and_then(|c| {
            c.backups
                .iter()
                .filter(|b| b.repository == name)
                .filter_map(|b| b.lsn_start.as_deref().and_then(chain::parse_lsn))
                .min()
        });
        let chain = match self.chain(name, oldest.map(|l| l / chain::SEGMENT_SIZE)) {
            Ok(c) => {
                ok &= c.complete();
                report.push_str(&format!("\n{c}"));
                Some(c)
            }
            Err(e) => {
                ok = false;
                report.push_str(&format!("\nWAL chain not checked: {e:#}"));
                None
            }
        };
        Ok(Verified { repository: name.to_string(), ok, report, chain, ms: started.elapsed().as_millis() as u64 })
    }

    /// The WAL chain of the newest archive (one per database identity and
    /// version, `15-1`) of repository `name`, from segment `from`.
    pub fn chain(&self, name: &str, from: Option<u64>) -> Result<ChainCheck> {
        let repo = format!("--repo={}", self.index(name)?);
        let archive = format!("archive/{}", self.stanza);
        let out = self
            .command("repo-ls")
            .args([repo.as_str(), "--recurse", "--output=json", archive.as_str()])
            .output()
            .context("run pgbackrest repo-ls")?;
        if !out.status.success() {
            bail!("list {archive}: {}", pgbackrest::error_text(&out.stderr));
        }
        let listing: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).context("parse pgbackrest repo-ls")?;
        let id_number = |id: &str| id.rsplit('-').next().and_then(|n| n.parse::<u32>().ok());
        let newest = listing.keys().filter_map(|k| k.split_once('/')).filter_map(|(id, _)| id_number(id)).max();
        let Some(newest) = newest else {
            return Ok(chain::check(&Default::default(), 1, None, from));
        };
        let id = listing
            .keys()
            .filter_map(|k| k.split_once('/').map(|(id, _)| id))
            .find(|id| id_number(id) == Some(newest))
            .expect("the newest id came from a key")
            .to_string();
        let archived: std::collections::BTreeSet<String> = listing
            .iter()
            .filter(|(k, v)| k.starts_with(&format!("{id}/")) && v["type"] == "file")
            .map(|(k, _)| chain::archived_name(k).to_string())
            .collect();
        let tli = chain::newest_timeline(&archived).unwrap_or(1);
        let history = if tli > 1 && archived.contains(&format!("{tli:08X}.history")) {
            let file = format!("{archive}/{id}/{tli:08X}.history");
            let out = self
                .command("repo-get")
                .args([repo.as_str(), file.as_str()])
                .output()
                .context("run pgbackrest repo-get")?;
            if !out.status.success() {
                bail!("read {file}: {}", pgbackrest::error_text(&out.stderr));
            }
            Some(chain::parse_history(&String::from_utf8_lossy(&out.stdout)))
        } else {
            None
        };
        Ok(chain::check(&archived, tli, history.as_deref(), from))
    }
}

/// A directory only its owner can enter, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> Result<PrivateDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        sweep_dead();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{PRIVATE_PREFIX}{}-{nanos}-{n}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(PrivateDir(path))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

const PRIVATE_PREFIX: &str = "meridian-pgbackrest-";

/// Removes the private directories of processes that died before they could
/// (SIGKILL): they hold repository keys.
fn sweep_dead() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PRIVATE_PREFIX).and_then(|r| r.split('-').next()?.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process::is_alive(pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("failed to remove {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_processs_private_directory_is_removed_and_a_new_one_is_private() {
        // Beyond Linux's largest pid (2^22), so never alive.
        let dead = std::env::temp_dir().join(format!("{PRIVATE_PREFIX}4194999-1-0"));
        std::fs::create_dir_all(dead.join("conf.d")).unwrap();
        let d = PrivateDir::new().unwrap();
        assert!(!dead.exists(), "{} is left", dead.display());
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let path = d.path().to_path_buf();
        drop(d);
        assert!(!path.exists());
    }
}
