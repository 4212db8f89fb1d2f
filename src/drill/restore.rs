//! `restore`: the mistake backups exist for. With the workload running, a
//! table is dropped just after a time T; the drill restores the repository
//! away from the primary's region to just before T into the lab's second
//! cluster (`restore-into.toml`), starts it, and checks what a person would:
//! the dropped table is back with the same checksum, every write acknowledged
//! before T is there, nothing sent after T is, and the restored rows match
//! the source's byte for byte. It reports how long the restore took, then
//! stops the restored cluster and destroys it (data, etcd prefix, stanza).
//!
//! T and the acknowledgements are timed by the drill's clock, the commits by
//! the primary's: in the lab they are one clock. Against machines whose
//! clocks differ by more than the gap between T and the drop, the checks
//! would blame the restore for the clocks.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::checks::id_range;
use super::report::{Check, Event, RoundReport, Series};
use super::scenario::Scenario;
use super::workload::{self, Workload};
use super::Drill;
use crate::backup::catalog::Catalog;
use crate::backup::chain;
use crate::backup::job::{BackupJob, BackupType, JobState};
use crate::backup::restore::Report;
use crate::cluster::now_ms;
use crate::config::Config;

/// What the restore round measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreOutcome {
    pub repository: String,
    pub backup: String,
    /// The recovery target (RFC 3339, the drill's clock).
    pub target: String,
    pub cluster: String,
    /// `meridian restore` from start to end: checks, pgBackRest, recovery, promotion.
    pub restore_ms: u64,
    /// From the restore's start until the restored primary answered SQL.
    pub serving_ms: Option<u64>,
    /// The steps `meridian restore` reported, with their times.
    pub steps: Vec<(String, u64)>,
}

const VICTIM_ROWS: i32 = 10_000;
const BACKUP_TIMEOUT: Duration = Duration::from_secs(600);
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);
const SERVING_TIMEOUT: Duration = Duration::from_secs(90);
const DESTROY_TIMEOUT: Duration = Duration::from_secs(60);

/// The restored cluster's agent; SIGKILLed if dropped without `stop`.
struct RestoredAgent(tokio::process::Child);

impl RestoredAgent {
    async fn stop(mut self) {
        if let Some(pid) = self.0.id() {
            crate::process::signal(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.0.wait()).await.is_err() {
            tracing::warn!("the restored cluster's agent did not stop within 30 s of SIGTERM; killing it");
            let _ = self.0.kill().await;
        }
    }
}

impl Drill {
    pub(super) async fn restore_round(&self, n: u32, key: u32) -> Result<RoundReport> {
        let lab = self.lab.as_ref().context("the restore scenario runs against the lab")?;
        let into_path = lab.join("restore-into.toml");
        if !into_path.exists() {
            bail!("{} is missing: the lab writes it when it has [backup]", into_path.display());
        }
        let into = Config::load(&into_path)?;
        let before = self.wait_healthy(super::REDUNDANCY_TIMEOUT).await?;
        let primary = before.primary.clone().expect("healthy means a primary");
        let repository = self.repository_away_from(&self.region_of(&primary))?;
        let start_ms = now_ms();
        let mut events = vec![Event::at(start_ms, "round starts")];
        let backup = self.ensure_backup(&repository, &mut events).await?;
        let writer = workload::connect(self.config.regions[0].gateway.writer, &self.credentials)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        writer
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS meridian_drill_dropped;
                 CREATE TABLE meridian_drill_dropped (id int PRIMARY KEY, payload text NOT NULL);
                 INSERT INTO meridian_drill_dropped SELECT g, md5(g::text) FROM generate_series(1, {VICTIM_ROWS}) g"
            ))
            .await
            .context("create the table the drill drops")?;
        let victim =
            writer.query_one(VICTIM_SUM, &[]).await.context("checksum the table the drill drops")?.get::<_, String>(0);

        let workload = Workload::start(self.spec(key, &primary));
        events.push(Event::at(now_ms(), "workload starts"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let target = SystemTime::now();
        let target_ms = now_ms();
        let target_text = humantime::format_rfc3339_micros(target).to_string();
        events.push(Event::at(target_ms, "T: the restore target"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let dropped = writer.batch_execute("DROP TABLE meridian_drill_dropped").await;
        events.push(Event::at(now_ms(), "table dropped"));
        self.say(format!("  dropped meridian_drill_dropped just after T = {target_text}"));
        let archived = async {
            dropped.context("drop the table")?;
            let lsn: String = writer.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
            tokio::time::sleep(Duration::from_secs(2)).await;
            // A segment's worth of WAL closes the segment that holds the drop,
            // so it is archived now rather than after archive_timeout.
            writer
                .batch_execute(
                    "CREATE TABLE meridian_drill_filler AS
                       SELECT g AS id, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 31) i) AS pad
                       FROM generate_series(1, 18000) g;
                     DROP TABLE meridian_drill_filler",
                )
                .await
                .context("write a segment of WAL after the drop")?;
            self.wait_archived(&primary, chain::parse_lsn(&lsn).context("parse pg_current_wal_lsn")?).await
        }
        .await;
        let record = workload.stop().await;
        let end_ms = now_ms();
        events.push(Event::at(end_ms, "workload stops"));
        archived?;
        events.push(Event::at(now_ms(), "the drop's WAL is archived"));

        // The restore, the restored cluster's first agent, SQL.
        let exe = std::env::current_exe().context("find the meridian binary")?;
        let source = self.config.source.clone().context("the cluster file's path")?;
        let restore_started = Instant::now();
        let out = tokio::process::Command::new(&exe)
            .arg("--config")
            .arg(&source)
            .args(["restore", "--to-time", &target_text, "--repository", &repository, "--json", "--into"])
            .arg(&into_path)
            .env("CI", "true")
            .kill_on_drop(true)
            .output()
            .await
            .context("run meridian restore")?;
        let restore_ms = restore_started.elapsed().as_millis() as u64;
        if !out.status.success() {
            bail!("meridian restore failed after {restore_ms} ms: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let report: Report = serde_json::from_slice(&out.stdout).context("parse meridian restore's report")?;
        events.push(Event::at(now_ms(), &format!("restored into {} ({} ms)", report.cluster, restore_ms)));
        self.say(format!("  restored {} from {repository} into {} in {restore_ms} ms", report.backup, report.cluster));
        let agent = self.start_restored_agent(&exe, &into_path, &report.node, lab)?;
        let (_, node) = into.node(&report.node)?;
        let checked = self.check_restored(node.address, key, &record, target_ms, &victim, restore_started).await;
        agent.stop().await;
        let destroyed = self.destroy_restored(&exe, &into_path).await;
        events.push(Event::at(now_ms(), "restored cluster destroyed"));

        let (mut checks, serving_ms) = match checked {
            Ok((checks, serving)) => (checks, Some(serving)),
            Err(e) => (vec![Check::new("restored cluster answers", false, format!("{e:#}"))], None),
        };
        checks.push(Check::new(
            "restored cluster removed",
            destroyed.is_ok(),
            match &destroyed {
                Ok(()) => format!("{}: data, etcd prefix and stanza removed", report.cluster),
                Err(e) => format!("{e:#}"),
            },
        ));
        let after = self.status().await.ok();
        let passed = checks.iter().all(|c| c.passed);
        Ok(RoundReport {
            round: n,
            scenario: Scenario::Restore,
            old_primary: primary.clone(),
            new_primary: after.as_ref().and_then(|s| s.primary.clone()),
            epoch_before: before.epoch,
            epoch_after: after.map(|s| s.epoch),
            start_ms,
            fault_ms: target_ms,
            end_ms,
            rto_ms: None,
            acknowledged: record.acks.len(),
            rows_on_primary: None,
            missing_acknowledged: 0,
            missing_sample: Vec::new(),
            wal_lost_bytes: 0,
            wal_lost_estimate: 0,
            errors: record.errors.len(),
            writers: record.writers.clone(),
            persistent: false,
            commit_p50_ms: None,
            commit_p99_ms: None,
            redundancy_ms: None,
            recovered: true,
            passed,
            checks,
            events,
            series: Series::build(&record, start_ms, end_ms),
            restore: Some(RestoreOutcome {
                repository,
                backup,
                target: target_text,
                cluster: report.cluster,
                restore_ms,
                serving_ms,
                steps: report.steps,
            }),
        })
    }

    /// The repository in another region than `region` (the one that
    /// survives the primary's region), else the first.
    fn repository_away_from(&self, region: &str) -> Result<String> {
        let b = self.config.backup.as_ref().context("the cluster file has no [backup]")?;
        b.repositories
            .iter()
            .find(|r| r.region != region)
            .or(b.repositories.first())
            .map(|r| r.name.clone())
            .context("[backup] names no repository")
    }

    /// The newest backup in `repository`, taking a full one first if it holds none.
    async fn ensure_backup(&self, repository: &str, events: &mut Vec<Event>) -> Result<String> {
        let catalog: Catalog = self.api.get("/v1/backups", Duration::from_secs(60)).await?;
        if let Some(b) = catalog.last(repository, None) {
            return Ok(b.label.clone());
        }
        self.say(format!("  {repository} holds no backup: taking a full one"));
        let body = serde_json::json!({ "backup_type": BackupType::Full, "repository": repository });
        let asked: BackupJob = self.api.act("/v1/backups", &body, Duration::from_secs(30)).await?;
        let deadline = Instant::now() + BACKUP_TIMEOUT;
        loop {
            let job = self.backup_job().await?.context("the backup job disappeared from etcd")?;
            if job.id != asked.id {
                bail!("backup job {} was replaced by {}", asked.id, job.id);
            }
            match job.state {
                JobState::Succeeded => {
                    let label = job.outcomes.iter().find_map(|o| o.label.clone()).context("the backup has no label")?;
                    events.push(Event::at(now_ms(), &format!("full backup {label} taken")));
                    return Ok(label);
                }
                JobState::Failed => bail!("the full backup to {repository} failed: {:?} {:?}", job.error, job.outcomes),
                _ if Instant::now() > deadline => bail!("the full backup to {repository} took over {BACKUP_TIMEOUT:?}"),
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Until the primary has archived the segment holding `lsn`.
    async fn wait_archived(&self, primary: &str, lsn: u64) -> Result<()> {
        let want = lsn / chain::SEGMENT_SIZE;
        let deadline = Instant::now() + ARCHIVE_TIMEOUT;
        let mut last = String::from("no status");
        while Instant::now() < deadline {
            if let Ok(s) = self.status().await {
                let archived = s
                    .nodes
                    .iter()
                    .find(|n| n.name == primary)
                    .and_then(|n| n.archive.as_ref())
                    .and_then(|a| a.last_archived.clone());
                if archived.as_deref().and_then(chain::parse_segment).is_some_and(|(_, seg)| seg >= want) {
                    return Ok(());
                }
                last = archived.unwrap_or_else(|| "nothing archived".into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("{primary} did not archive segment {want:X} (holding the drop) within {ARCHIVE_TIMEOUT:?}; last archived: {last}")
    }

    fn start_restored_agent(&self, exe: &Path, into: &Path, node: &str, lab: &Path) -> Result<RestoredAgent> {
        let log_path = lab.join("logs").join("drill-restored-agent.log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        // On the netns lab the node's address lives in its namespace: the restored agent runs there too.
        let netns = crate::lab::Lab::open(lab).ok().filter(|l| l.network.hosts == crate::lab::topology::Hosts::Netns);
        let mut cmd = match netns.as_ref().and_then(|l| {
            let (region, _) = l.config.node(node).ok()?;
            let member = crate::lab::Member::Agent { node: node.to_string(), region: region.name.clone() };
            crate::lab::netns::namespace_of(l.net(), &member)
        }) {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", &ns]).arg(exe);
                c
            }
            None => tokio::process::Command::new(exe),
        };
        let child = cmd
            .arg("--config")
            .arg(into)
            .args(["agent", "--node", node])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start the restored cluster's agent")?;
        Ok(RestoredAgent(child))
    }

    /// What a person checks on the restored primary at `address`; returns
    /// the checks and when it first answered (ms since `since`).
    async fn check_restored(
        &self,
        address: std::net::SocketAddr,
        key: u32,
        record: &workload::Record,
        target_ms: u64,
        victim: &str,
        since: Instant,
    ) -> Result<(Vec<Check>, u64)> {
        let deadline = Instant::now() + SERVING_TIMEOUT;
        let restored = loop {
            match workload::connect(address, &self.credentials).await {
                Ok(c) if c.simple_query("SELECT 1 FROM meridian_drill LIMIT 1").await.is_ok() => break c,
                Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(_) => bail!("the restored primary at {address} did not answer queries within {SERVING_TIMEOUT:?}"),
                Err(e) => bail!("the restored primary at {address} did not answer within {SERVING_TIMEOUT:?}: {e}"),
            }
        };
        let serving = since.elapsed().as_millis() as u64;
        let mut checks = Vec::new();
        let back = restored.query_one(VICTIM_SUM, &[]).await.map(|r| r.get::<_, String>(0));
        checks.push(Check::new(
            "dropped table restored",
            back.as_deref().ok() == Some(victim),
            match &back {
                Ok(sum) if sum == victim => format!("{VICTIM_ROWS} rows, checksum {sum} as before the drop"),
                Ok(sum) => format!("checksum {sum}, before the drop {victim}"),
                Err(e) => format!("unreadable: {e}"),
            },
        ));
        let (lo, hi) = id_range(key);
        let rows = restored
            .query("SELECT id, at_ms FROM meridian_drill WHERE id >= $1 AND id < $2", &[&lo, &hi])
            .await
            .context("read the restored rows")?;
        let present: BTreeSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
        let before: Vec<i64> = record.acks.iter().filter(|a| a.ack_ms < target_ms).map(|a| a.id).collect();
        let missing: Vec<i64> = before.iter().copied().filter(|id| !present.contains(id)).collect();
        checks.push(Check::new(
            "every write acknowledged before T restored",
            missing.is_empty() && !before.is_empty(),
            format!(
                "{} of {} acknowledged before T missing{}",
                missing.len(),
                before.len(),
                missing.first().map(|id| format!(", e.g. id {id}")).unwrap_or_default()
            ),
        ));
        let after: Vec<i64> =
            rows.iter().filter(|r| r.get::<_, i64>(1) as u64 > target_ms).map(|r| r.get::<_, i64>(0)).collect();
        let acked_after = record.acks.iter().filter(|a| a.sent_ms > target_ms).count();
        checks.push(Check::new(
            "nothing written after T restored",
            after.is_empty() && acked_after > 0,
            format!(
                "{} restored row(s) sent after T, of {acked_after} acknowledged after it{}",
                after.len(),
                after.first().map(|id| format!(", e.g. id {id}")).unwrap_or_default()
            ),
        ));
        // Every restored row of the drill's table, against the same ids on the source.
        let sum_of = "SELECT count(*), coalesce(md5(string_agg(id || ':' || writer || ':' || at_ms, ',' ORDER BY id)), '') FROM meridian_drill";
        let restored_sum = restored.query_one(sum_of, &[]).await.context("checksum the restored rows")?;
        let ids: Vec<i64> = restored
            .query("SELECT id FROM meridian_drill", &[])
            .await
            .context("list the restored rows")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let source = workload::connect(self.config.regions[0].gateway.writer, &self.credentials)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let source_sum = source
            .query_one(&format!("{sum_of} WHERE id = ANY($1)"), &[&ids])
            .await
            .context("checksum the same rows on the source")?;
        let (rc, rs) = (restored_sum.get::<_, i64>(0), restored_sum.get::<_, String>(1));
        let (sc, ss) = (source_sum.get::<_, i64>(0), source_sum.get::<_, String>(1));
        checks.push(Check::new(
            "restored rows identical to the source's",
            rc == sc && rs == ss,
            format!("restored {rc} rows {rs}; the source's same ids: {sc} rows {ss}"),
        ));
        Ok((checks, serving))
    }

    /// `meridian destroy --repositories --yes` of the restored cluster,
    /// retried until its agent's lease has expired.
    async fn destroy_restored(&self, exe: &Path, into: &Path) -> Result<()> {
        let deadline = Instant::now() + DESTROY_TIMEOUT;
        loop {
            let out = tokio::process::Command::new(exe)
                .arg("--config")
                .arg(into)
                .args(["destroy", "--repositories", "--yes", "--json"])
                .env("CI", "true")
                .kill_on_drop(true)
                .output()
                .await
                .context("run meridian destroy")?;
            if out.status.success() {
                return Ok(());
            }
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if Instant::now() > deadline || !why.contains("is not stopped") {
                bail!("meridian destroy of the restored cluster: {why}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

const VICTIM_SUM: &str =
    "SELECT count(*) || ' ' || md5(string_agg(id || ':' || payload, ',' ORDER BY id)) FROM meridian_drill_dropped";
