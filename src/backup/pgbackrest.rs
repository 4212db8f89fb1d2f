//! A node's pgBackRest configuration, rendered from the cluster file and the
//! secrets file (pure; tested below), and the archive command PostgreSQL runs.
//!
//! Every node runs with `archive_mode = always`. A primary pushes each WAL
//! file to every repository (asynchronously, so one unreachable repository
//! does not stall the others); a standby *holds* each file it received until
//! every repository has it (`meridian wal archive`), so it never recycles a
//! segment the repositories lack. When the standby is promoted, PostgreSQL
//! removes `standby.signal` and the same command pushes what it held: the
//! segments a dead primary never archived reach the repositories, and the WAL
//! chain has no gap across the failover. Because standbys never push,
//! pgBackRest's `archive-mode-check` (which refuses `always`) is turned off.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{BackupConfig, Config, RepoLocation, Repository, Secrets};

/// pgBackRest's own directories (spool, locks, logs) in a node's run directory.
pub const DIR: &str = "pgbackrest";
/// The rendered configuration, in the run directory (0600: it holds the keys).
pub const CONF: &str = "pgbackrest.conf";

/// What the rendering needs to know about a node.
pub struct NodeFiles<'a> {
    pub data_dir: &'a Path,
    pub run_dir: &'a Path,
    pub port: u16,
    /// The cluster CA as the server's user can read it (the run directory's copy).
    pub cluster_ca: PathBuf,
}

/// The stanza is the cluster's name: every node of the cluster archives into the same one.
pub fn stanza(config: &Config) -> &str {
    &config.cluster
}

pub fn conf_path(run_dir: &Path) -> PathBuf {
    run_dir.join(CONF)
}

/// An include directory of our own, so that nothing in `/etc/pgbackrest` applies.
pub fn include_path(run_dir: &Path) -> PathBuf {
    run_dir.join(DIR).join("conf.d")
}

/// The whole `pgbackrest.conf` of a node. Fails when the secrets file lacks
/// what a repository needs (its S3 key, or the cipher passphrase).
pub fn render_conf(config: &Config, backup: &BackupConfig, secrets: &Secrets, node: &NodeFiles) -> Result<String> {
    let repos: Vec<&Repository> = backup.repositories.iter().collect();
    let mut s = render_global(config, backup, secrets, &node.cluster_ca, &node.run_dir.join(DIR), &repos)?;
    // PostgreSQL's log gets the archive command's output raw; pgBackRest's own
    // log (`<run_dir>/pgbackrest/log/`) has the details, PostgreSQL's log a
    // WARNING per failed try, and `status` the file that fails.
    let _ = writeln!(s, "\n[global:archive-push]\nlog-level-console=off");
    let _ = writeln!(s, "\n[{}]", stanza(config));
    let _ = writeln!(s, "pg1-path={}", node.data_dir.display());
    let _ = writeln!(s, "pg1-socket-path={}", node.run_dir.display());
    let _ = writeln!(s, "pg1-port={}", node.port);
    let _ = writeln!(s, "pg1-user={}", crate::postgres::SUPERUSER);
    Ok(s)
}

/// `[global]`: pgBackRest's own directories under `dir`, how it works, and
/// `repos` as `repo1`, `repo2`, ... in that order.
pub fn render_global(
    config: &Config,
    backup: &BackupConfig,
    secrets: &Secrets,
    cluster_ca: &Path,
    dir: &Path,
    repos: &[&Repository],
) -> Result<String> {
    let mut s = String::from("# Written by meridian; edit meridian.toml and the secrets file instead.\n[global]\n");
    let mut line = |k: &str, v: &str| {
        let _ = writeln!(s, "{k}={v}");
    };
    line("spool-path", &dir.join("spool").display().to_string());
    line("lock-path", &dir.join("lock").display().to_string());
    line("log-path", &dir.join("log").display().to_string());
    line("log-level-console", "warn");
    line("log-level-stderr", "off");
    line("log-level-file", "info");
    // One unreachable repository must not stall archiving to the others.
    line("archive-async", "y");
    // Standbys hold rather than push (see the module's comment), so archive_mode = always is safe.
    line("archive-mode-check", "n");
    line("process-max", &backup.process_max.to_string());
    line("compress-type", "lz4");
    // A backup starts with an immediate checkpoint, not whenever the next one comes.
    line("start-fast", "y");
    // A hung repository must not hold PostgreSQL's archiver (and so pg_wal) forever.
    line("io-timeout", "30");
    // How long PostgreSQL's archive command waits for the asynchronous push of
    // its file before failing (PostgreSQL retries later; the push goes on). A
    // fast shutdown waits for the archiver, so this bounds a switchover's stop
    // while a repository is unreachable (the default is 60 s).
    line("archive-timeout", "5");
    line("db-timeout", "600");
    for (i, repo) in repos.iter().enumerate() {
        let r = format!("repo{}", i + 1);
        match repo.location().map_err(anyhow::Error::msg)? {
            RepoLocation::S3 { bucket, prefix, host, port } => {
                let keys = secrets.repositories.get(&repo.name).with_context(|| {
                    format!(
                        "the secrets file has no [repository.{}] with s3_key and s3_key_secret for s3 repository {:?}",
                        repo.name, repo.name
                    )
                })?;
                line(&format!("{r}-type"), "s3");
                line(&format!("{r}-path"), &prefix);
                line(&format!("{r}-s3-bucket"), &bucket);
                line(&format!("{r}-s3-endpoint"), &host);
                line(&format!("{r}-storage-port"), &port.to_string());
                if let Some(ip) = repo.storage_host {
                    line(&format!("{r}-storage-host"), &ip.to_string());
                }
                line(&format!("{r}-s3-region"), &repo.s3_region);
                line(&format!("{r}-s3-uri-style"), "path");
                line(&format!("{r}-s3-key"), &keys.s3_key);
                line(&format!("{r}-s3-key-secret"), &keys.s3_key_secret);
                let ca = repo.ca_file.as_ref().map(|f| config.resolve(f)).unwrap_or_else(|| cluster_ca.to_path_buf());
                line(&format!("{r}-storage-ca-file"), &ca.display().to_string());
                // Verification stays on: the certificate must come from this CA and name `host`.
                line(&format!("{r}-storage-verify-tls"), "y");
            }
            RepoLocation::Posix { path } => {
                line(&format!("{r}-type"), "posix");
                line(&format!("{r}-path"), &path.display().to_string());
            }
        }
        line(&format!("{r}-retention-full"), &backup.retention_full.to_string());
        if backup.encrypt {
            let pass = secrets.backup_cipher_pass.as_deref().context(
                "[backup] encrypt is on but the secrets file has no backup_cipher_pass (or set encrypt = false)",
            )?;
            line(&format!("{r}-cipher-type"), "aes-256-cbc");
            line(&format!("{r}-cipher-pass"), pass);
        }
    }
    Ok(s)
}

/// The processes working with this node's pgBackRest configuration: the
/// asynchronous archive-push (which detaches from PostgreSQL and outlives it)
/// and its workers, an archive command still running (`meridian wal archive`).
/// Whoever stops the server for good stops these too. Found by pid: each names
/// this node's configuration file, a path no other node's processes use.
pub fn running_pids(run_dir: &Path) -> Vec<u32> {
    crate::process::pids_mentioning(&conf_path(run_dir).display().to_string())
}

/// pgBackRest's error for a lock another of its processes holds.
pub const LOCK_BUSY: u32 = 50;

/// pgBackRest's stderr as one line without its own "ERROR: " level prefix
/// (meridian logs it at its own level): "[050]: unable to acquire lock ...".
pub fn error_text(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("ERROR: ").or_else(|| l.strip_prefix("WARN: ")).unwrap_or(l))
        .collect();
    lines.join(" ")
}

/// The label a `pgbackrest backup` printed at `info` level ("new backup label = 20261202-165504F").
pub fn backup_label(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| Some(l.split_once("new backup label = ")?.1.trim().to_string()))
}

/// pgBackRest's error for a WAL file that already exists in a repository
/// with a different checksum (it never overwrites one).
pub const DIFFERENT_CHECKSUM: u32 = 45;

/// A push the asynchronous archiver refused because a repository holds the
/// same WAL file with other content: another server wrote this timeline.
/// pgBackRest leaves `<spool>/archive/<stanza>/out/<file>.error` holding
/// "<code>\n<message>" until the file is pushed.
pub fn archive_conflict(run_dir: &Path, stanza: &str) -> Option<String> {
    let out = run_dir.join(DIR).join("spool").join("archive").join(stanza).join("out");
    let mut found: Vec<(String, String)> = std::fs::read_dir(out)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let wal = name.strip_suffix(".error")?.to_string();
            let text = std::fs::read_to_string(e.path()).ok()?;
            let (code, message) = text.split_once('\n').unwrap_or((&text, ""));
            (code.trim().parse::<u32>().ok()? == DIFFERENT_CHECKSUM).then(|| (wal, message.trim().to_string()))
        })
        .collect();
    found.sort();
    found.first().map(|(wal, message)| format!("could not archive {wal}: {message}"))
}

/// PostgreSQL's `archive_command`: `meridian wal archive`, which pushes as a
/// primary, holds as a standby (PostgreSQL removes `standby.signal` the
/// moment it is promoted) and fails at once on a stopping server. PostgreSQL
/// runs it in the data directory.
pub fn archive_command(config: &Config, backup: &BackupConfig, run_dir: &Path, meridian: &Path) -> String {
    format!(
        "exec {meridian} wal archive --pgbackrest {pgbackrest} --pgbackrest-config {conf} --stanza {stanza} %p %f",
        meridian = meridian.display(),
        pgbackrest = backup.pgbackrest.display(),
        conf = conf_path(run_dir).display(),
        stanza = stanza(config),
    )
}

/// The settings meridian adds to `postgresql.auto.conf` when `[backup]` is on.
pub fn archive_settings(
    config: &Config,
    backup: &BackupConfig,
    run_dir: &Path,
    meridian: &Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("archive_mode", "always".into()),
        ("archive_command", archive_command(config, backup, run_dir, meridian)),
        ("archive_timeout", format!("{}s", backup.archive_timeout.as_secs())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RepositorySecrets;
    use crate::lab::topology::{lab_config, LabShape};

    fn secrets() -> Secrets {
        Secrets {
            replication_password: "r".into(),
            monitor_password: "m".into(),
            auth_password: "a".into(),
            backup_cipher_pass: Some("cipher-secret".into()),
            repositories: [(
                "ap-south-1".to_string(),
                RepositorySecrets { s3_key: "AKIA-lab".into(), s3_key_secret: "s3-secret".into() },
            )]
            .into(),
        }
    }

    fn node() -> NodeFiles<'static> {
        NodeFiles {
            data_dir: Path::new("/tmp/lab/nodes/a/data"),
            run_dir: Path::new("/tmp/lab/nodes/a/run"),
            port: 5432,
            cluster_ca: PathBuf::from("/tmp/lab/nodes/a/run/tls/ca.crt"),
        }
    }

    #[test]
    fn the_lab_archives_to_s3_over_verified_tls_and_to_a_directory_encrypted() {
        let c = lab_config(&LabShape { net: 7, ..LabShape::default() }, Path::new("/tmp/lab"));
        let b = c.backup.as_ref().unwrap();
        let conf = render_conf(&c, b, &secrets(), &node()).unwrap();
        for want in [
            "repo1-type=s3",
            "repo1-s3-bucket=meridian-backup",
            "repo1-path=/ap-south-1",
            "repo1-s3-endpoint=localhost",
            "repo1-storage-port=19007",
            "repo1-s3-uri-style=path",
            "repo1-storage-ca-file=/tmp/lab/nodes/a/run/tls/ca.crt",
            "repo1-storage-verify-tls=y",
            "repo2-type=posix",
            "repo2-path=/tmp/lab/backup/ap-northeast-1",
            "repo1-cipher-type=aes-256-cbc",
            "repo2-cipher-pass=cipher-secret",
            "archive-async=y",
            "archive-mode-check=n",
            "[global:archive-push]\nlog-level-console=off",
            "[lab]\npg1-path=/tmp/lab/nodes/a/data\npg1-socket-path=/tmp/lab/nodes/a/run\npg1-port=5432\npg1-user=postgres",
        ] {
            assert!(conf.contains(want), "missing {want:?} in\n{conf}");
        }
        // archive-push-queue-max drops WAL when reached: never set behind the operator's back.
        assert!(!conf.contains("queue-max"), "{conf}");
    }

    #[test]
    fn a_backups_label_is_read_from_its_output() {
        let out = "2026-12-02 16:55:07.185 P00   INFO: new backup label = 20261202-165504F\n2026-12-02 INFO: full backup size = 29.1MB";
        assert_eq!(backup_label(out).as_deref(), Some("20261202-165504F"));
        assert_eq!(backup_label("INFO: backup command end"), None);
    }

    #[test]
    fn missing_secrets_are_named() {
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        let b = c.backup.as_ref().unwrap();
        let mut s = secrets();
        s.repositories.clear();
        let e = render_conf(&c, b, &s, &node()).unwrap_err().to_string();
        assert!(e.contains("[repository.ap-south-1]"), "{e}");
        let mut s = secrets();
        s.backup_cipher_pass = None;
        let e = render_conf(&c, b, &s, &node()).unwrap_err().to_string();
        assert!(e.contains("backup_cipher_pass"), "{e}");
    }

    #[test]
    fn the_archive_command_is_meridians_with_the_nodes_configuration() {
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        let b = c.backup.as_ref().unwrap();
        let cmd = archive_command(&c, b, Path::new("/r"), Path::new("/bin/meridian"));
        assert_eq!(
            cmd,
            "exec /bin/meridian wal archive --pgbackrest /usr/bin/pgbackrest --pgbackrest-config /r/pgbackrest.conf --stanza lab %p %f"
        );
    }
}
