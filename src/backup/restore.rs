//! `meridian restore --into NEW`: a new cluster (its own name, its own etcd
//! prefix) from a repository of an existing one, so a person can look before
//! deciding. It needs only the source's cluster file and that repository's
//! credentials: with every database server of the source gone, the surviving
//! region's repository is enough (pilot-light DR).
//!
//! Steps, on the host of the new cluster's first node:
//! 1. check everything first (the target against what the repository holds,
//!    an empty data directory, an empty etcd prefix): a refusal changes nothing;
//! 2. `pgbackrest restore` of the chosen backup into the data directory;
//! 3. PostgreSQL replays the archived WAL to the target and promotes (a new
//!    timeline), with the new cluster's files and pgBackRest's recovery
//!    settings; then it is stopped cleanly and the recovery settings removed;
//! 4. `initialize` in the new cluster's etcd prefix names the node, whose
//!    agent then adopts the data as primary (`failover::Action::AdoptRestored`)
//!    and the other nodes clone from it as usual.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::catalog::{BackupSet, Catalog};
use super::chain;
use super::repo::Repositories;
use crate::config::Config;
use crate::postgres::files::StartAs;
use crate::postgres::Server;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// Just before this time (RFC 3339).
    Time(String),
    /// Just before this WAL position.
    Lsn(String),
    /// The end of this backup (consistent, no WAL replayed past it).
    Backup(String),
}

pub struct Request {
    pub target: Target,
    pub timeline: Option<u32>,
    /// The repository to restore from; else the first that answers and holds a backup.
    pub repository: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub cluster: String,
    pub from_cluster: String,
    pub repository: String,
    pub backup: String,
    pub target: Target,
    pub node: String,
    /// The new cluster's first timeline, and where it began.
    pub timeline: u32,
    pub lsn: String,
    pub steps: Vec<(String, u64)>,
    pub total_ms: u64,
}

/// The backup a restore to `target` starts from (pure; tested below):
/// the newest one that ended before the target. Refusals name what the
/// repository holds.
pub fn choose_backup<'a>(catalog: &'a Catalog, repository: &str, target: &Target) -> Result<&'a BackupSet> {
    let sets: Vec<&BackupSet> = catalog.backups.iter().filter(|b| b.repository == repository).collect();
    if sets.is_empty() {
        bail!("repository {repository} holds no backup");
    }
    let labels = || sets.iter().map(|b| b.label.as_str()).collect::<Vec<_>>().join(", ");
    let newest = |ok: &dyn Fn(&BackupSet) -> bool| sets.iter().copied().filter(|b| ok(b)).max_by_key(|b| b.stopped_at);
    match target {
        Target::Latest => Ok(newest(&|_| true).expect("not empty")),
        Target::Backup(label) => newest(&|b| &b.label == label)
            .with_context(|| format!("no backup {label:?} in repository {repository} (backups: {})", labels())),
        Target::Time(t) => {
            let at = humantime::parse_rfc3339_weak(t)
                .with_context(|| format!("--to-time {t:?} is not a time like 2026-12-02T17:04:54Z"))?;
            if at > SystemTime::now() {
                bail!("--to-time {t} is in the future");
            }
            let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
            newest(&|b| b.stopped_at <= secs).with_context(|| {
                let oldest = sets.iter().min_by_key(|b| b.stopped_at).expect("not empty");
                format!(
                    "--to-time {t} is before the restore window of repository {repository}: its oldest backup, {}, ended at {}",
                    oldest.label,
                    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(oldest.stopped_at))
                )
            })
        }
        Target::Lsn(l) => {
            let at =
                chain::parse_lsn(l).with_context(|| format!("--to-lsn {l:?} is not a WAL position like 0/3000060"))?;
            let stop = |b: &BackupSet| b.lsn_stop.as_deref().and_then(chain::parse_lsn);
            newest(&|b| stop(b).is_some_and(|s| s <= at)).with_context(|| {
                format!("--to-lsn {l} is before every backup in repository {repository} (backups: {})", labels())
            })
        }
    }
}

/// A time as `recovery_target_time` takes it: to the microsecond, with a
/// space and a numeric zone (it refuses RFC 3339's nanoseconds and `Z`).
pub(super) fn canonical(target: Target) -> Result<Target> {
    Ok(match target {
        Target::Time(t) => {
            let at = humantime::parse_rfc3339_weak(&t).with_context(|| format!("--to-time {t:?} is not a time"))?;
            let rfc = humantime::format_rfc3339_micros(at).to_string();
            Target::Time(format!("{}+00", rfc.replacen('T', " ", 1).trim_end_matches('Z')))
        }
        other => other,
    })
}

/// pgBackRest's restore options for `target` from `set`.
fn restore_args(target: &Target, set: &BackupSet, timeline: Option<u32>) -> Vec<String> {
    let mut a = vec![format!("--set={}", set.label)];
    match target {
        Target::Latest => {}
        Target::Backup(_) => a.extend(["--type=immediate".into(), "--target-action=promote".into()]),
        // Exclusive: a transaction that committed exactly at the target is not replayed.
        Target::Time(t) => a.extend([
            "--type=time".into(),
            format!("--target={t}"),
            "--target-exclusive".into(),
            "--target-action=promote".into(),
        ]),
        Target::Lsn(l) => a.extend([
            "--type=lsn".into(),
            format!("--target={l}"),
            "--target-exclusive".into(),
            "--target-action=promote".into(),
        ]),
    }
    if let Some(t) = timeline {
        a.push(format!("--target-timeline={t}"));
    }
    a
}

/// What pgBackRest appended to postgresql.auto.conf for recovery (everything
/// after its marker line), to be put back after meridian rewrote the file.
pub(crate) fn recovery_lines(auto_conf: &str) -> String {
    match auto_conf.find("# Recovery settings generated by pgBackRest") {
        Some(i) => auto_conf[i..].to_string(),
        None => String::new(),
    }
}

pub async fn run(
    source: &Config,
    into: &Config,
    req: Request,
    progress: &mut crate::progress::Progress,
) -> Result<Report> {
    let started = Instant::now();
    let mut steps: Vec<(String, u64)> = Vec::new();
    let mut since = Instant::now();
    if into.cluster == source.cluster {
        bail!("--into must name a new cluster (its cluster file says {:?}, the source's name)", into.cluster);
    }
    let node = into.bootstrap_node().context("the new cluster file has no node")?.clone();
    let server = Server::new(into, &node)?;
    if std::fs::read_dir(&server.data_dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{}'s data directory {} is not empty; restore writes only into an empty one",
            node.name,
            server.data_dir.display()
        );
    }
    let source_secrets = source.secrets()?;
    let into_secrets = into.secrets()?;

    // Nothing is changed before every check passed.
    progress.step(format!("checking cluster {} in etcd", into.cluster));
    let coord = crate::coord::Coord::connect(into, &server.tls).await?;
    let s = coord.snapshot().await?;
    if s.initialized_by.is_some() || s.epoch > 0 || !s.members.is_empty() {
        bail!(
            "cluster {:?} already has state in etcd (initialized by {}, epoch {}); restore makes a new cluster: name another, or remove this one with `meridian destroy`",
            into.cluster,
            s.initialized_by.as_deref().unwrap_or("-"),
            s.epoch
        );
    }
    progress.step(format!("reading what cluster {}'s repositories hold", source.cluster));
    let ca = source.tls_ca_file();
    let ca = if ca.exists() { ca } else { server.tls.ca() };
    let (repo, catalog) = open_repository(source, &source_secrets, &ca, req.repository.as_deref(), server.os_ids)?;
    let name = repo.names()[0].clone();
    let set = choose_backup(&catalog, &name, &req.target)?.clone();
    let target = canonical(req.target.clone())?;
    steps.push(("checks".into(), since.elapsed().as_millis() as u64));

    progress.step(format!("restoring backup {} from repository {name} into {}", set.label, server.data_dir.display()));
    server.prepare_dirs()?;
    let restored = restore_and_recover(
        &server,
        &repo,
        &set,
        &target,
        req.timeout,
        req.timeline,
        into,
        &into_secrets,
        progress,
        &mut steps,
    )
    .await;
    let (timeline, lsn) = match restored {
        Ok(r) => r,
        Err(e) => {
            // The directory was empty before: leave it so, for the next try.
            empty_dir(&server.data_dir);
            return Err(e);
        }
    };
    since = Instant::now();

    progress.step(format!("handing node {} the data in etcd", node.name));
    let holder = coord.claim_initialize(&node.name).await?;
    if holder != node.name {
        bail!(
            "{holder} initialized cluster {} meanwhile; the restored data in {} is not used",
            into.cluster,
            server.data_dir.display()
        );
    }
    steps.push(("etcd".into(), since.elapsed().as_millis() as u64));
    progress.done();
    Ok(Report {
        cluster: into.cluster.clone(),
        from_cluster: source.cluster.clone(),
        repository: name,
        backup: set.label,
        target: req.target,
        node: node.name.clone(),
        timeline,
        lsn,
        steps,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

/// Restores `set` into the (empty) data directory and recovers to `target`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn restore_and_recover(
    server: &Server,
    repo: &Repositories,
    set: &BackupSet,
    target: &Target,
    timeout: Duration,
    timeline: Option<u32>,
    into: &Config,
    into_secrets: &crate::config::Secrets,
    progress: &mut crate::progress::Progress,
    steps: &mut Vec<(String, u64)>,
) -> Result<(u32, String)> {
    let since = Instant::now();
    let out = repo
        .command("restore")
        .arg("--repo=1")
        .arg(format!("--pg1-path={}", server.data_dir.display()))
        .args(restore_args(target, set, timeline))
        .output()
        .context("run pgbackrest restore")?;
    if !out.status.success() {
        bail!("pgbackrest restore: {}", super::pgbackrest::error_text(&out.stderr));
    }
    steps.push(("pgbackrest restore".into(), since.elapsed().as_millis() as u64));

    let since = Instant::now();
    progress.step(format!("replaying WAL to {} and promoting", describe(target)));
    let auto = server.data_dir.join("postgresql.auto.conf");
    let recovery = recovery_lines(&std::fs::read_to_string(&auto).with_context(|| format!("read {}", auto.display()))?);
    server.write_files(into, into_secrets, &StartAs::Primary)?;
    let mut text = std::fs::read_to_string(&auto)?;
    text.push_str(&recovery);
    std::fs::write(&auto, text)?;
    let recovered = recover(server, timeout).await;
    // pgBackRest's asynchronous archive-get may still be prefetching for the stopped server.
    let leftovers = crate::process::pids_mentioning(&repo.conf_path().display().to_string());
    crate::process::stop_all(&leftovers, Duration::from_secs(5)).await;
    let (timeline, lsn) = recovered?;
    // The next start (the agent's) must not recover to the target again.
    server.write_files(into, into_secrets, &StartAs::Primary)?;
    steps.push(("recovery".into(), since.elapsed().as_millis() as u64));
    Ok((timeline, lsn))
}

/// Removes everything inside `dir`, keeping `dir`.
pub(super) fn empty_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if let Err(err) = r {
            tracing::warn!("failed to remove {}: {err}", p.display());
        }
    }
}

pub(super) fn describe(t: &Target) -> String {
    match t {
        Target::Latest => "the end of the archive".into(),
        Target::Time(t) => format!("just before {t}"),
        Target::Lsn(l) => format!("just before {l}"),
        Target::Backup(b) => format!("the end of backup {b}"),
    }
}

/// The repository to restore from and what it holds: the one asked for, or
/// the first in the cluster file that can be read and holds a backup.
pub(super) fn open_repository(
    source: &Config,
    secrets: &crate::config::Secrets,
    ca: &Path,
    only: Option<&str>,
    os_ids: Option<(u32, u32)>,
) -> Result<(Repositories, Catalog)> {
    let backup = source.backup.as_ref().context("the source cluster file has no [backup] section")?;
    let names: Vec<String> = match only {
        Some(n) => vec![n.to_string()],
        None => backup.repositories.iter().map(|r| r.name.clone()).collect(),
    };
    let mut failures = Vec::new();
    for n in &names {
        let attempt = Repositories::open(source, secrets, ca, Some(n), os_ids).and_then(|r| {
            let c = r.info()?;
            let state = c.repositories.first().map(|s| (s.code, s.message.clone()));
            match state {
                Some((0, _)) => Ok((r, c)),
                Some((_, message)) => bail!("{message}"),
                None => bail!("pgBackRest reported nothing"),
            }
        });
        match attempt {
            Ok(found) => return Ok(found),
            Err(e) if only.is_some() => return Err(e.context(format!("read repository {n}"))),
            Err(e) => failures.push(format!("{n}: {e:#}")),
        }
    }
    bail!("no repository can be restored from: {}", failures.join("; "))
}

/// Runs PostgreSQL until recovery reached its target and promoted, then stops
/// it cleanly. Returns the new timeline and where it begins.
async fn recover(server: &Server, timeout: Duration) -> Result<(u32, String)> {
    server.clear_stale_lock()?;
    let mut cmd = server.postmaster_command()?;
    // On the unix socket alone: nothing else (a standby of the node's address,
    // a gateway's probe) may talk to a server that is still recovering.
    cmd.arg("-c").arg("listen_addresses=");
    // Dies with this process: a recovery server must never outlive the restore
    // (with --replace it would hold the node's socket and port).
    crate::process::kill_with_parent(&mut cmd);
    let child = cmd.spawn().context("start PostgreSQL for recovery")?;
    let mut pm = crate::postgres::scratch::ScratchServer::new(child);
    let deadline = Instant::now() + timeout;
    let log = server.log_path();
    let promoted = loop {
        if let Some(status) = pm.exited() {
            bail!("PostgreSQL stopped during recovery ({status}): {}", log_tail(&log));
        }
        if Instant::now() >= deadline {
            bail!("recovery did not finish within {timeout:?}; see {}", log.display());
        }
        if let Ok(c) = server.connect().await {
            // WAL control functions fail (an ERROR in the server's log) during recovery.
            if let Ok(row) = c
                .query_one(
                    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) END, \
                            CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END",
                    &[],
                )
                .await
            {
                if let (Some(file), Some(lsn)) = (row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1)) {
                    break (file, lsn);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let timeline = chain::parse_segment(&promoted.0).map(|(t, _)| t).unwrap_or_default();
    pm.stop(Duration::from_secs(60)).await?;
    Ok((timeline, promoted.1))
}

/// The last lines of a server log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> =
        text.lines().filter(|l| l.contains("FATAL") || l.contains("ERROR") || l.contains("PANIC")).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    format!("{tail} (see {})", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(label: &str, repo: &str, stopped_at: u64, lsn_stop: &str) -> BackupSet {
        BackupSet::sample(label, repo, "full", stopped_at, Some(lsn_stop))
    }

    #[test]
    fn the_newest_backup_before_the_target_is_chosen_and_every_bad_target_is_named() {
        let c = Catalog {
            backups: vec![
                set("A", "r1", 1_000_000_000, "0/3000000"),
                set("B", "r1", 1_000_000_100, "0/5000000"),
                set("C", "r2", 1_000_000_200, "0/7000000"),
            ],
            ..Catalog::default()
        };
        let pick = |t: Target| choose_backup(&c, "r1", &t).map(|b| b.label.clone());
        assert_eq!(pick(Target::Latest).unwrap(), "B");
        assert_eq!(pick(Target::Backup("A".into())).unwrap(), "A");
        assert_eq!(pick(Target::Time("2001-09-09T01:47:00Z".into())).unwrap(), "A"); // 1_000_000_020
        assert_eq!(pick(Target::Time("2001-09-09T01:50:00Z".into())).unwrap(), "B");
        assert_eq!(pick(Target::Lsn("0/4000000".into())).unwrap(), "A");
        for (t, says) in [
            (Target::Backup("C".into()), "no backup \"C\" in repository r1 (backups: A, B)"),
            (Target::Time("2001-09-09T01:46:00Z".into()), "before the restore window"),
            (Target::Time("2999-01-01T00:00:00Z".into()), "in the future"),
            (Target::Time("yesterday".into()), "is not a time"),
            (Target::Lsn("0/1000000".into()), "before every backup"),
            (Target::Lsn("xyz".into()), "is not a WAL position"),
        ] {
            let e = format!("{:#}", pick(t).unwrap_err());
            assert!(e.contains(says), "{e}");
        }
        assert!(format!("{:#}", choose_backup(&c, "r3", &Target::Latest).unwrap_err()).contains("holds no backup"));
    }

    #[test]
    fn recovery_targets_become_pgbackrest_options() {
        assert_eq!(
            canonical(Target::Time("2026-12-02T17:12:36.554773123Z".into())).unwrap(),
            Target::Time("2026-12-02 17:12:36.554773+00".into())
        );
        let s = set("B", "r1", 1, "0/1");
        assert_eq!(restore_args(&Target::Latest, &s, None), ["--set=B"]);
        assert_eq!(
            restore_args(&Target::Time("2026-12-02T17:00:00Z".into()), &s, Some(2)),
            [
                "--set=B",
                "--type=time",
                "--target=2026-12-02T17:00:00Z",
                "--target-exclusive",
                "--target-action=promote",
                "--target-timeline=2"
            ]
        );
        let auto = "a = 1\n# Recovery settings generated by pgBackRest restore on 2026-12-02\nrestore_command = 'x'\n";
        assert_eq!(
            recovery_lines(auto),
            "# Recovery settings generated by pgBackRest restore on 2026-12-02\nrestore_command = 'x'\n"
        );
    }
}
