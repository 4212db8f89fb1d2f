//! `meridian drill`: run a real workload, inject a fault, measure what clients
//! saw, and check that nothing acknowledged was lost, that no two primaries
//! took writes, and that the cluster came back to full redundancy.
//!
//! A round: wait for a healthy cluster; start writers (through every
//! gateway's writer port) and a reader per database region (its reader port);
//! inject the fault; wait for the expected outcome (a new primary taking
//! writes, or writes going on without one); undo the fault; wait until every
//! node is healthy again; stop the workload; then check: acknowledged ids on
//! the primary (RPO), acknowledgements against the leaders recorded in
//! history (split brain), every node replaying the primary's marker (verify)
//! and holding the same rows (checksums), one timeline everywhere.
//!
//! Fault injection uses `meridian lab` (the same binary), so every scenario
//! runs against the lab; against any other cluster only the operator actions
//! (`switchover`, `dr-failover`) run, through the gateways' API.

pub mod analysis;
mod backups;
mod checks;
pub mod report;
mod restore;
pub mod scenario;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::ApiClient;
use crate::cluster::{now_ms, ClusterStatus, HistoryEntry, Role};
use crate::config::Config;
use report::{Check, Event, RoundReport, Series};
use scenario::{Plan, Scenario};
use workload::{Credentials, Workload, WorkloadSpec};

/// How long a fault is held when no failover is expected.
const HOLD: Duration = Duration::from_secs(8);
const RECOVER_TIMEOUT: Duration = Duration::from_secs(90);
const REDUNDANCY_TIMEOUT: Duration = Duration::from_secs(120);
/// Clock slack for the split-brain check (acknowledgements are timed by the drill's clock).
const CLOCK_SLACK_MS: u64 = 50;

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub plan: Plan,
    pub rounds: usize,
    pub seed: u64,
    pub writers: u32,
    pub rate: f64,
    /// Writers keep their one connection (see `WorkloadSpec::persistent`).
    pub persistent: bool,
    pub report_dir: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Print progress lines (to stderr).
    pub progress: bool,
}

/// The lab directory, when the cluster file is a lab's.
fn lab_dir(config: &Config) -> Option<PathBuf> {
    let dir = config.source.as_ref()?.parent()?.to_path_buf();
    dir.join(".meridian-lab").exists().then_some(dir)
}

/// The application's credentials: given, or the lab's `app` role.
fn credentials(config: &Config, given: Option<Credentials>) -> Result<Credentials> {
    if let Some(c) = given {
        return Ok(c);
    }
    let Some(dir) = lab_dir(config) else {
        bail!("outside the lab, say how the workload logs in: --user and --dbname, with the password in MERIDIAN_DRILL_PASSWORD")
    };
    let line = std::fs::read_to_string(dir.join("pgpass")).context("read the lab's pgpass")?;
    let password = line.trim_end().splitn(5, ':').nth(4).context("the lab's pgpass has no password")?;
    Ok(Credentials {
        user: "app".into(),
        password: password.replace("\\:", ":").replace("\\\\", "\\"),
        dbname: "app".into(),
        tls: crate::tls::postgres(&config.tls_ca_file(), None)?,
    })
}

struct Drill {
    config: Config,
    api: ApiClient,
    lab: Option<PathBuf>,
    options: DrillOptions,
    credentials: Credentials,
    started: Instant,
    /// Rows of round n carry ids in `[(first_key + n - 1) * 10^12, ...)`, past
    /// every earlier drill's, so drills can run again on the same table.
    first_key: u32,
    /// The region a remove-node round took its node from, to add one back.
    removed_from: std::sync::Mutex<Option<String>>,
}

/// Undoes whatever fault an interrupted drill may have left in a lab: heals
/// partitions and starts again what is not running, region by region.
pub async fn undo_faults(config: &Config) -> Result<()> {
    let Some(dir) = lab_dir(config) else { return Ok(()) };
    let exe = std::env::current_exe().context("find the meridian binary")?;
    let lab = |args: Vec<String>| {
        let (exe, dir) = (exe.clone(), dir.clone());
        async move {
            let out = tokio::process::Command::new(exe).arg("lab").args(&args).arg("--dir").arg(dir).output().await?;
            anyhow::ensure!(
                out.status.success(),
                "lab {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            anyhow::Ok(())
        }
    };
    lab(vec!["heal".into()]).await?;
    for (_, n) in config.nodes() {
        lab(vec!["thaw".into(), format!("agent:{}", n.name)]).await?;
        lab(vec!["thaw".into(), format!("postgres:{}", n.name)]).await?;
    }
    for r in &config.regions {
        lab(vec!["start".into(), r.name.clone()]).await?;
    }
    Ok(())
}

fn primary_timeline(s: &ClusterStatus) -> Option<u32> {
    s.nodes.iter().find(|n| Some(&n.name) == s.primary.as_ref()).and_then(|n| n.timeline)
}

/// Runs the drill and returns its report; the caller decides the exit status.
pub async fn run(config: Config, options: DrillOptions) -> Result<report::DrillReport> {
    let lab = lab_dir(&config);
    let plan = scenario::rounds(options.plan, options.rounds, options.seed, lab.is_some());
    if let Some(s) = plan.iter().find(|s| s.needs_lab()) {
        if lab.is_none() {
            bail!("scenario {s} injects faults and runs only against `meridian lab`; on any cluster use switchover or dr-failover");
        }
    }
    if let Some(s) = plan.iter().find(|s| s.needs_backup()) {
        if config.backup.is_none() {
            bail!("scenario {s} needs backups: the cluster file has no [backup] section (see docs/backup.md)");
        }
    }
    let drill = Drill {
        api: ApiClient::new(&config)?,
        credentials: credentials(&config, options.credentials.clone())?,
        config,
        lab,
        options,
        started: Instant::now(),
        first_key: 0,
        removed_from: Default::default(),
    };
    let mut drill = drill;
    drill.first_key = drill.prepare().await?;
    drill.say(format!(
        "drill: {} round(s): {}",
        plan.len(),
        plan.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    ));
    let mut rounds = Vec::new();
    for (i, scenario) in plan.iter().enumerate() {
        let n = i + 1;
        drill.say(format!("round {n}/{}: {scenario}", plan.len()));
        let round = drill.round(n as u32, *scenario).await;
        let round = match round {
            Ok(r) => r,
            Err(e) => RoundReport::failed(n as u32, *scenario, format!("{e:#}")),
        };
        drill.say(format!("round {n}: {}", round.one_line()));
        let stop = !round.recovered;
        rounds.push(round);
        if stop {
            drill.say("the cluster did not recover; stopping the drill".to_string());
            break;
        }
    }
    let mut report = report::DrillReport::new(&drill.config, &drill.options, rounds);
    report.network = drill.lab.as_deref().and_then(|d| crate::lab::Lab::open(d).ok()).map(|l| l.network);
    if let Some(dir) = &drill.options.report_dir {
        report.write(dir)?;
        drill.say(format!("report: {}", dir.join("drill.html").display()));
    }
    Ok(report)
}

impl Drill {
    fn say(&self, line: String) {
        if self.options.progress {
            eprintln!("[{:>6.1}s] {line}", self.started.elapsed().as_secs_f64());
        }
    }

    async fn status(&self) -> Result<ClusterStatus> {
        self.api.get("/v1/cluster", Duration::from_secs(5)).await
    }

    async fn history(&self) -> Result<Vec<HistoryEntry>> {
        self.api.get("/v1/history", Duration::from_secs(5)).await
    }

    /// Runs `meridian lab ARGS --dir LAB`.
    async fn lab(&self, args: &[&str]) -> Result<()> {
        let dir = self.lab.as_ref().context("not a lab")?;
        let exe = std::env::current_exe().context("find the meridian binary")?;
        let out = tokio::process::Command::new(exe)
            .arg("lab")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .env("CI", "true")
            .output()
            .await
            .context("run meridian lab")?;
        if !out.status.success() {
            bail!("lab {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Creates the drill's table through the writer endpoint; returns the first round key.
    async fn prepare(&self) -> Result<u32> {
        self.wait_healthy(REDUNDANCY_TIMEOUT).await?;
        let addr = self.config.regions[0].gateway.writer;
        // Healthy by etcd is not yet reachable through the proxy (a connection
        // cut by a fault just undone): retry within a deadline, as a client would.
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match workload::connect(addr, &self.credentials).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("the writer endpoint refused the drill's first connection ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => bail!("connect to the writer endpoint {addr} within 30s: {e}"),
            }
        };
        client.batch_execute(workload::TABLE_DDL).await.context("create the drill's table")?;
        let row = client
            .query_one("SELECT (coalesce(max(id), 0) / 1000000000000)::int + 1 FROM meridian_drill", &[])
            .await
            .context("read the drill's last key")?;
        Ok(row.get::<_, i32>(0) as u32)
    }

    /// Waits until there is a primary, every node is healthy and, with
    /// synchronous replication, the primary vouches for a standby; returns the status.
    async fn wait_healthy(&self, timeout: Duration) -> Result<ClusterStatus> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            match self.status().await {
                // Full redundancy: every node healthy and on the primary's timeline
                // (a standby that just started may not report one yet).
                // With synchronous replication, also a standby the primary vouches for:
                // until then a failover could lose acknowledged writes.
                Ok(s)
                    if s.primary.is_some()
                        && s.nodes.iter().all(|n| n.healthy && n.timeline == primary_timeline(&s))
                        && s.vouched.as_ref().is_none_or(|v| !v.is_empty()) =>
                {
                    return Ok(s)
                }
                Ok(s) => {
                    // A node that gave up restarting its server never recovers by itself: say so now.
                    if let Some((n, why)) = s.nodes.iter().find_map(|n| match &n.waiting {
                        Some(w @ crate::failover::WaitReason::GaveUp { .. }) => Some((n, w)),
                        _ => None,
                    }) {
                        bail!("{} will not recover by itself: {why}", n.name);
                    }
                    last = s
                        .nodes
                        .iter()
                        .filter(|n| !n.healthy || n.timeline != primary_timeline(&s))
                        .map(|n| {
                            let tl = n.timeline.map_or("unknown".to_string(), |t| t.to_string());
                            format!("{} {} timeline {tl}", n.name, n.role)
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    if s.vouched.as_ref().is_some_and(|v| v.is_empty()) && last.is_empty() {
                        last = "the primary vouches for no synchronous standby yet".into();
                    }
                    if s.primary.is_none() {
                        last = format!("no primary ({})", s.reason.unwrap_or_default());
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("the cluster was not fully healthy within {timeout:?}: {last}")
    }

    fn spec(&self, key: u32, primary: &str) -> WorkloadSpec {
        WorkloadSpec {
            primary: self.config.node(primary).map(|(_, n)| n.address).expect("the primary is a configured node"),
            writers: self.options.writers,
            rate: self.options.rate,
            writer_endpoints: self.config.regions.iter().map(|r| r.gateway.writer).collect(),
            reader_endpoints: self
                .config
                .regions
                .iter()
                .filter(|r| !r.nodes.is_empty())
                .map(|r| (r.name.clone(), r.gateway.reader))
                .collect(),
            credentials: self.credentials.clone(),
            round: key,
            persistent: self.options.persistent,
        }
    }

    fn region_of(&self, node: &str) -> String {
        self.config.node(node).map(|(r, _)| r.name.clone()).unwrap_or_default()
    }

    async fn round(&self, n: u32, scenario: Scenario) -> Result<RoundReport> {
        let key = self.first_key + n - 1;
        if scenario == Scenario::Restore {
            return self.restore_round(n, key).await;
        }
        let before = self.wait_healthy(REDUNDANCY_TIMEOUT).await?;
        let old_primary = before.primary.clone().expect("healthy means a primary");
        let old_region = self.region_of(&old_primary);
        let history_before = self.history().await?.len();
        let start_ms = now_ms();
        let mut events = vec![Event::at(start_ms, "workload starts")];
        let workload = Workload::start(self.spec(key, &old_primary));
        // Warm up: every writer connected and acknowledging.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The standbys' copies must survive whatever the fault does to the primary.
        // A remove-node round removes one replica's data on purpose (--purge).
        let removed = match scenario {
            Scenario::RemoveNode => self.removable_node(&before).ok(),
            _ => None,
        };
        let data_watch = self.lab.is_some().then(|| {
            let dirs = self
                .config
                .nodes()
                .filter(|(_, n)| n.name != old_primary && Some(&n.name) != removed.as_ref())
                .map(|(_, n)| (n.name.clone(), self.config.resolve(&n.data_dir)))
                .collect();
            checks::DataWatch::start(dirs)
        });
        // A failover in the middle of a backup: the backup first.
        let backup_job = match scenario {
            Scenario::BackupDuringFailover => match self.start_backup().await {
                Ok(job) => {
                    let at = job.started_at_ms.unwrap_or_else(now_ms);
                    events.push(Event::at(at, &format!("full backup on {} started", job.node)));
                    Some(job)
                }
                Err(e) => {
                    workload.stop().await;
                    return Err(e);
                }
            },
            _ => None,
        };
        let fault_ms = now_ms();
        let outcome = self.inject(scenario, &before, &old_primary, &old_region, &mut events).await;
        let recovered = match outcome {
            Ok(()) => self.await_outcome(scenario, &workload, &old_primary, fault_ms, &mut events).await,
            Err(e) => Err(e),
        };
        let recovered_at_ms = recovered.as_ref().ok().copied();
        let restore = self.restore(scenario, &old_primary, &old_region).await;
        let undone_ms = now_ms();
        events.push(Event::at(undone_ms, "fault undone"));
        let healthy = self.wait_healthy(REDUNDANCY_TIMEOUT).await;
        let redundancy_ms = healthy.is_ok().then(|| now_ms() - fault_ms);
        if healthy.is_ok() {
            events.push(Event::at(now_ms(), "full redundancy"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let record = workload.stop().await;
        let end_ms = now_ms();
        let mut checks = Vec::new();
        let mut failure = None;
        if let Err(e) = &recovered {
            failure = Some(format!("{e:#}"));
        }
        if let Err(e) = &restore {
            failure.get_or_insert(format!("undo the fault: {e:#}"));
        }
        if let Err(e) = &healthy {
            failure.get_or_insert(format!("{e:#}"));
        }
        checks.push(Check::new("recovered", failure.is_none(), failure.clone().unwrap_or_else(|| "yes".into())));
        if let Some(w) = data_watch {
            checks.push(w.check().await);
        }
        let after = self.status().await.ok();
        let new_primary = after.as_ref().and_then(|s| s.primary.clone());
        let history: Vec<HistoryEntry> =
            self.history().await.unwrap_or_default().into_iter().skip(history_before).collect();

        // RTO and RPO.
        // The longest stretch without an acknowledged write, from the fault until
        // writes resumed on the new primary (or until the fault was undone).
        // A membership round's undo is a change too (the region leaves, the node joins back): measured as well.
        let rto_ms = match recovered_at_ms {
            Some(_) if scenario.changes_membership() => Some(analysis::longest_gap(&record.acks, fault_ms, undone_ms)),
            Some(until) => Some(analysis::longest_gap(&record.acks, fault_ms, until)),
            None => analysis::write_gap(&record.acks, fault_ms),
        };
        // WAL lost: what the old primary wrote beyond the new primary's position
        // at promotion, measured directly (history's estimate cannot see what a
        // partitioned primary wrote after its last report).
        let wal_lost_bytes: u64 = match (record.old_primary_lsn, history.iter().find(|h| h.to != old_primary)) {
            (Some(old), Some(p)) => p.lsn.map(|l| old.0.saturating_sub(l.0)).unwrap_or(0),
            _ => 0,
        };
        let wal_lost_estimate: u64 = history.iter().filter_map(|h| h.lost_bytes_estimate).sum();
        let (missing, present_count) = match &new_primary {
            Some(p) => match self.present_ids(p, key).await {
                Ok(present) => (analysis::missing(&record.acks, &present), Some(present.len())),
                Err(e) => {
                    checks.push(Check::new("rows readable", false, format!("{e:#}")));
                    (Vec::new(), None)
                }
            },
            None => (Vec::new(), None),
        };
        let same_region = new_primary.as_ref().is_some_and(|p| self.region_of(p) == old_region);
        let sync = self.config.replication.synchronous;
        let promised = scenario.promises_no_loss(sync, same_region);
        checks.push(Check::new(
            "no acknowledged write lost",
            missing.is_empty() || !promised,
            format!(
                "{} of {} acknowledged missing{}",
                missing.len(),
                record.acks.len(),
                if promised { "" } else { " (this mode does not promise zero loss here)" }
            ),
        ));
        if scenario.expects_new_primary() {
            let moved = new_primary.as_ref().is_some_and(|p| *p != old_primary);
            checks.push(Check::new(
                "primary moved",
                moved,
                format!("{old_primary} -> {}", new_primary.clone().unwrap_or("none".into())),
            ));
        } else {
            let stayed = new_primary.as_deref() == Some(old_primary.as_str()) && history.is_empty();
            checks.push(Check::new("no failover", stayed, format!("{} promotion(s) during the round", history.len())));
        }
        // Split brain: every acknowledgement came from the leader of its time.
        let leaders = analysis::succession(&old_primary, &history);
        let bad = analysis::split_brain(&record.acks, &leaders, CLOCK_SLACK_MS);
        checks.push(Check::new(
            "no split brain",
            bad.is_empty(),
            match bad.first() {
                None => format!(
                    "{} acknowledgements; leaders {}",
                    record.acks.len(),
                    leaders.iter().map(|l| l.node.as_str()).collect::<Vec<_>>().join(" -> ")
                ),
                Some(a) => format!(
                    "{} acknowledged by a non-leader, e.g. id {} by {} at {}",
                    bad.len(),
                    a.id,
                    a.node,
                    a.ack_ms
                ),
            },
        ));
        if healthy.is_ok() {
            checks.extend(self.consistency(key).await);
        }
        if let Some(job) = &backup_job {
            checks.extend(self.backup_checks(&job.id, fault_ms).await);
        }
        let pooling = self.config.proxy.pool_mode == crate::config::PoolMode::Transaction;
        if let Some(allowed) = scenario.client_failures_allowed().filter(|_| self.options.persistent && pooling) {
            checks.push(analysis::client_check(&record.writers, allowed));
        }
        let commit_ms: Vec<u64> = record
            .acks
            .iter()
            .filter(|a| a.sent_ms + 1000 < fault_ms || a.sent_ms > end_ms.saturating_sub(1000))
            .map(|a| a.ack_ms - a.sent_ms)
            .collect();
        for h in &history {
            events.push(Event::at(h.finished_at_ms, &format!("{} promoted ({:?})", h.to, h.kind)));
        }
        events.sort_by_key(|e| e.at_ms);
        let series = Series::build(&record, start_ms, end_ms);
        Ok(RoundReport {
            round: n,
            scenario,
            old_primary,
            new_primary,
            epoch_before: before.epoch,
            epoch_after: after.map(|s| s.epoch),
            start_ms,
            fault_ms,
            end_ms,
            rto_ms,
            acknowledged: record.acks.len(),
            rows_on_primary: present_count,
            missing_acknowledged: missing.len(),
            missing_sample: missing.iter().take(20).copied().collect(),
            wal_lost_bytes,
            wal_lost_estimate,
            errors: record.errors.len(),
            writers: record.writers.clone(),
            persistent: self.options.persistent,
            commit_p50_ms: analysis::percentile(&commit_ms, 50.0),
            commit_p99_ms: analysis::percentile(&commit_ms, 99.0),
            redundancy_ms,
            recovered: failure.is_none(),
            passed: checks.iter().all(|c| c.passed),
            checks,
            events,
            series,
            restore: None,
        })
    }

    async fn inject(
        &self,
        scenario: Scenario,
        before: &ClusterStatus,
        old_primary: &str,
        old_region: &str,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let what = match scenario {
            Scenario::PrimaryNodeKill => {
                self.lab(&["kill", old_primary]).await?;
                format!("killed {old_primary}")
            }
            Scenario::PrimaryRegionKill => {
                self.lab(&["kill", old_region]).await?;
                format!("killed region {old_region}")
            }
            Scenario::PrimaryRegionPartition => {
                self.lab(&["partition", old_region]).await?;
                format!("partitioned region {old_region}")
            }
            Scenario::ReplicaRegionPartition => {
                let region = self.other_db_region(old_region)?;
                self.lab(&["partition", &region]).await?;
                format!("partitioned replica region {region}")
            }
            Scenario::EtcdMemberLoss => {
                let region = self.etcd_region_away_from(old_region)?;
                self.lab(&["kill", &format!("etcd:{region}")]).await?;
                format!("killed the etcd member of {region}")
            }
            Scenario::PrimaryAgentFreeze => {
                self.lab(&["freeze", &format!("agent:{old_primary}")]).await?;
                format!("froze the agent of {old_primary} (SIGSTOP)")
            }
            Scenario::PrimaryHang => {
                self.lab(&["freeze", &format!("postgres:{old_primary}")]).await?;
                format!("hung the PostgreSQL of {old_primary} (SIGSTOP of every process)")
            }
            Scenario::ClockSkew => {
                // Every standby's agent 30 s ahead or behind, then the primary dies:
                // a skewed node takes over, and nothing may notice the clocks.
                for (i, n) in self.standbys(before).iter().enumerate() {
                    let offset = if i % 2 == 0 { "-30s" } else { "+30s" };
                    self.lab(&["skew", n, offset]).await?;
                    events.push(Event::at(now_ms(), &format!("{n}'s clock {offset}")));
                }
                self.lab(&["kill", old_primary]).await?;
                format!("killed {old_primary}; every standby's clock 30 s off")
            }
            Scenario::BackupDuringFailover => {
                self.lab(&["kill", old_primary]).await?;
                format!("killed {old_primary} during the backup")
            }
            Scenario::Restore => bail!("a restore round injects no fault"),
            Scenario::AddRegion => {
                let region = self.drill_region();
                self.lab(&["add-region", &region, "--nodes", "1"]).await?;
                format!("region {region} added (etcd member, gateway, node {region}a) and streaming")
            }
            Scenario::RemoveNode => {
                let node = self.removable_node(before)?;
                self.lab(&["remove-node", &node, "--purge"]).await?;
                format!("replica {node} removed (drained, stopped, data removed)")
            }
            Scenario::Switchover => {
                let target = before
                    .nodes
                    .iter()
                    .filter(|n| n.role == Role::Replica && n.healthy)
                    .min_by_key(|n| (n.region != old_region, n.name.clone()))
                    .context("no healthy replica to switch over to")?
                    .name
                    .clone();
                events.push(Event::at(now_ms(), &format!("switchover to {target} requested")));
                let body = serde_json::json!({ "to": target, "timeout_ms": 60_000 });
                let _: serde_json::Value = self.api.act("/v1/switchover", &body, Duration::from_secs(80)).await?;
                format!("switchover to {target} done")
            }
            Scenario::DrFailover => {
                let region = self.other_db_region(old_region)?;
                events.push(Event::at(now_ms(), &format!("DR failover to {region} requested")));
                let body = serde_json::json!({ "region": region, "allow_data_loss": false, "timeout_ms": 60_000 });
                let _: serde_json::Value = self.api.act("/v1/failover", &body, Duration::from_secs(80)).await?;
                format!("DR failover to {region} done")
            }
        };
        self.say(format!("  {what}"));
        events.push(Event::at(now_ms(), &what));
        Ok(())
    }

    /// Waits for what the scenario should lead to; returns when it happened
    /// (the first write on the new primary, or the end of the hold).
    async fn await_outcome(
        &self,
        scenario: Scenario,
        workload: &Workload,
        old_primary: &str,
        fault_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<u64> {
        if !scenario.expects_new_primary() {
            tokio::time::sleep(HOLD).await;
            if workload.acks_since(fault_ms + 1000) == 0 {
                bail!("writes stopped during a fault that should not stop them");
            }
            return Ok(now_ms());
        }
        let deadline = Instant::now() + RECOVER_TIMEOUT;
        loop {
            if let Some(ack) = workload.acked_elsewhere_since(fault_ms, old_primary) {
                events.push(Event::at(ack.ack_ms, &format!("first write acknowledged by {}", ack.node)));
                self.say(format!(
                    "  writes resumed on {} after {:.2}s",
                    ack.node,
                    (ack.ack_ms - fault_ms) as f64 / 1000.0
                ));
                return Ok(ack.ack_ms);
            }
            if Instant::now() > deadline {
                bail!("no write was acknowledged by a new primary within {RECOVER_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Undoes the fault: restart what was killed, heal partitions.
    async fn restore(&self, scenario: Scenario, old_primary: &str, old_region: &str) -> Result<()> {
        match scenario {
            Scenario::PrimaryNodeKill | Scenario::BackupDuringFailover => self.lab(&["start", old_primary]).await,
            Scenario::PrimaryRegionKill => self.lab(&["start", old_region]).await,
            Scenario::PrimaryRegionPartition | Scenario::ReplicaRegionPartition => self.lab(&["heal"]).await,
            Scenario::EtcdMemberLoss => {
                let region = self.etcd_region_away_from(old_region)?;
                self.lab(&["start", &format!("etcd:{region}")]).await
            }
            Scenario::PrimaryAgentFreeze => self.lab(&["thaw", &format!("agent:{old_primary}")]).await,
            Scenario::PrimaryHang => self.lab(&["thaw", &format!("postgres:{old_primary}")]).await,
            // The clocks stay skewed: undoing it would restart the new primary's
            // agent, a second failover. Skewed clocks are harmless by design;
            // `lab skew NODE 0` puts one right.
            Scenario::ClockSkew => self.lab(&["start", old_primary]).await,
            Scenario::Switchover | Scenario::DrFailover | Scenario::Restore => Ok(()),
            Scenario::AddRegion => self.lab(&["remove-region", &self.drill_region()]).await,
            Scenario::RemoveNode => {
                let region = self.removed_from.lock().unwrap().take().context("no node was removed")?;
                self.lab(&["add-node", &region]).await
            }
        }
    }

    /// The region an add-region round adds (and removes again).
    fn drill_region(&self) -> String {
        "drill-region".to_string()
    }

    /// A replica in a region with another node (a region keeps at least one);
    /// the same one for the same status.
    fn removable_node(&self, status: &ClusterStatus) -> Result<String> {
        let primary = status.primary.clone().unwrap_or_default();
        let mut per_region: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for n in &status.nodes {
            per_region.entry(n.region.as_str()).or_default().push(n.name.as_str());
        }
        let node = status
            .nodes
            .iter()
            .filter(|n| n.name != primary && per_region[n.region.as_str()].len() >= 2)
            .max_by_key(|n| n.name.clone())
            .context("remove-node needs a region with two nodes (`lab up --nodes-per-region 2`)")?;
        *self.removed_from.lock().unwrap() = Some(node.region.clone());
        Ok(node.name.clone())
    }

    fn standbys(&self, status: &ClusterStatus) -> Vec<String> {
        status.nodes.iter().filter(|n| Some(&n.name) != status.primary.as_ref()).map(|n| n.name.clone()).collect()
    }

    fn other_db_region(&self, not: &str) -> Result<String> {
        self.config
            .regions
            .iter()
            .find(|r| r.name != not && !r.nodes.is_empty())
            .map(|r| r.name.clone())
            .with_context(|| format!("no database region besides {not}"))
    }

    /// An etcd member outside the primary's region (prefer one without nodes).
    fn etcd_region_away_from(&self, not: &str) -> Result<String> {
        let mut candidates: Vec<_> = self.config.regions.iter().filter(|r| r.name != not && r.etcd.is_some()).collect();
        candidates.sort_by_key(|r| !r.nodes.is_empty());
        candidates.first().map(|r| r.name.clone()).context("no etcd member outside the primary's region")
    }
}

/// The default report directory.
pub fn default_report_dir(config: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new(".")).join("drill-report")
}
