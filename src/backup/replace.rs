//! `meridian restore --replace`: the restored data becomes the cluster's own.
//! Run on the host of the node that will hold it (by default the primary's).
//!
//! 1. Everything is checked first (the node, its agent, the repository, a
//!    backup that fits the target); nothing changes on a refusal.
//! 2. A `restore` request goes into etcd under this process's lease: the
//!    primary steps down, the node's agent stops its server and keeps it
//!    stopped, and nobody promotes (`failover::during_restore`). Should this
//!    process die, the lease takes the request with it and the cluster
//!    carries on with its own data.
//! 3. The backup is restored *beside* the node's data (`<data_dir>.restore`),
//!    recovered to the target and promoted on a new timeline, then stopped.
//! 4. The node's data directory is moved aside to
//!    `<data_dir>.replaced-<unix time>` (kept: a person removes it when sure)
//!    and the restored one put in its place; the request says `restored`.
//! 5. The node's agent takes `leader` with the next epoch and records a
//!    `restore` entry in history; the other nodes rewind to the new timeline
//!    (or copy it afresh) by the ordinary rules.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::restore::{self, Request};
use crate::cluster::{now_ms, Lsn, RestoreRequest, RestoreStep, Role};
use crate::config::Config;
use crate::coord::{Coord, Snapshot};
use crate::postgres::Server;

const LEASE_TTL: Duration = Duration::from_secs(10);
/// How long a restore waits for the newest timeline's history to be archived.
const HISTORY_WAIT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const LEAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplaceReport {
    pub cluster: String,
    pub node: String,
    pub repository: String,
    pub backup: String,
    pub target: restore::Target,
    pub timeline: u32,
    pub lsn: String,
    pub epoch: u64,
    /// Where the node's previous data directory was moved (kept).
    pub previous_data: PathBuf,
    pub steps: Vec<(String, u64)>,
    pub total_ms: u64,
}

/// What will happen, for the confirmation.
pub struct Plan {
    pub node: String,
    pub repository: String,
    pub backup: String,
    pub target: String,
}

/// Runs the replacement; `confirm` sees the plan once every check passed.
pub async fn run(
    config: &Config,
    node: Option<String>,
    req: Request,
    progress: &mut crate::progress::Progress,
    confirm: impl FnOnce(&Plan) -> Result<()>,
) -> Result<ReplaceReport> {
    let started = Instant::now();
    let mut steps: Vec<(String, u64)> = Vec::new();
    let since = Instant::now();
    progress.step(format!("checking cluster {}", config.cluster));
    let probe_identity = match &node {
        Some(n) => config.tls_identity(&format!("node-{n}")),
        None => config.bootstrap_node().map(|n| config.tls_identity(&format!("node-{}", n.name))).context("no node")?,
    };
    let coord = Coord::connect(config, &probe_identity).await?;
    let snap = coord.snapshot().await?;
    let node = match node {
        Some(n) => n,
        None => snap
            .leader
            .as_ref()
            .map(|l| l.leader.node.clone())
            .context("the cluster has no primary now: name the node to restore onto with --node")?,
    };
    let (_, n) = config.node(&node)?;
    let server = Server::new(config, n)?;
    refuse_unless_ready(&snap, &node, &server)?;
    let secrets = config.secrets()?;
    let ca = config.tls_ca_file();
    let (repo, catalog) = restore::open_repository(config, &secrets, &ca, req.repository.as_deref(), server.os_ids)?;
    let repository = repo.names()[0].clone();
    let set = restore::choose_backup(&catalog, &repository, &req.target)?.clone();
    let target = restore::canonical(req.target.clone())?;
    let plan = Plan {
        node: node.clone(),
        repository: repository.clone(),
        backup: set.label.clone(),
        target: restore::describe(&target),
    };
    // The restored data takes the timeline after the newest history file the
    // repository holds. A primary promoted moments ago may not have archived
    // its own yet: the restored data would take that timeline's number, and a
    // node still on it would follow without a rewind (seen in tests). So the
    // history of the newest timeline any node is on must be there first.
    let newest = snap.members.iter().filter_map(|m| m.timeline).max().unwrap_or(1);
    if newest >= 2 {
        let file = format!("{newest:08X}.history");
        progress.step(format!("waiting for {repository} to hold {file}, the history of the newest timeline"));
        let waited = Instant::now();
        loop {
            let r = repo.holds(&file);
            match r {
                Ok(()) => break,
                Err(e) if waited.elapsed() >= HISTORY_WAIT => bail!(
                    "{repository} does not hold {file}, the history of timeline {newest} that the cluster is on                      (its primary has not archived it yet?): {e:#}; restored now, the data could take that                      timeline's number. Nothing was changed"
                ),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }
    steps.push(("checks".into(), since.elapsed().as_millis() as u64));
    confirm(&plan)?;

    // From here on the cluster changes; the request lives as long as this process.
    let lease = coord.grant_lease(LEASE_TTL).await?;
    let keepalive = {
        let coord = coord.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_TTL / 5).await;
                if let Err(e) = coord.renew_lease(lease).await {
                    tracing::warn!("failed to renew the restore's lease (retrying): {e:#}");
                }
            }
        })
    };
    let _stop_keepalive = AbortOnDrop(keepalive);
    let mut request = RestoreRequest {
        node: node.clone(),
        requested_by: format!("restore on {}", hostname()),
        requested_at_ms: now_ms(),
        backup: set.label.clone(),
        target: plan.target.clone(),
        state: RestoreStep::Stopping,
    };
    if !coord.request_restore(&request, lease).await? {
        bail!("another restore or a switchover is in progress; nothing was changed");
    }
    let epoch_before = snap.epoch;
    let result = replace(
        config,
        &coord,
        &server,
        &repo,
        &set,
        &target,
        &req,
        &secrets,
        &mut request,
        lease,
        progress,
        &mut steps,
    )
    .await;
    let (timeline, lsn, previous_data) = match result {
        Ok(r) => r,
        Err(e) => {
            // The node's own data is still in place: hand the cluster back to its rules.
            let _ = coord.update_restore(&request, None).await;
            let _ = coord.revoke_lease(lease).await;
            return Err(e);
        }
    };
    let since = Instant::now();
    progress.step(format!("waiting for {node} to lead with the restored data"));
    let epoch = loop {
        let s = coord.snapshot().await?;
        let leads = s.leader.as_ref().filter(|l| l.leader.node == node && l.leader.epoch > epoch_before);
        let healthy = s.members.iter().any(|m| m.node == node && m.role == Role::Primary && m.healthy);
        if let (Some(l), true) = (leads, healthy) {
            break l.leader.epoch;
        }
        if since.elapsed() > LEAD_TIMEOUT {
            bail!(
                "{node} did not lead with the restored data within {LEAD_TIMEOUT:?} (see its agent's log); \
                 the data is in place and the previous data kept in {}",
                previous_data.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    steps.push(("new primary".into(), since.elapsed().as_millis() as u64));
    let _ = coord.update_restore(&request, None).await;
    let _ = coord.revoke_lease(lease).await;
    progress.done();
    Ok(ReplaceReport {
        cluster: config.cluster.clone(),
        node,
        repository,
        backup: set.label,
        target: req.target,
        timeline,
        lsn: lsn.to_string(),
        epoch,
        previous_data,
        steps,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

/// The node must hold data, be on this host, and have a running agent (it
/// is what stops the server and later takes `leader`).
fn refuse_unless_ready(snap: &Snapshot, node: &str, server: &Server) -> Result<()> {
    if !server.data_dir.join("PG_VERSION").exists() {
        bail!(
            "{node}'s data directory {} holds no data on this host: run restore --replace on {node}'s host",
            server.data_dir.display()
        );
    }
    if !snap.members.iter().any(|m| m.node == node && m.is_fresh()) {
        bail!("{node}'s agent does not report; it must run to stop its server and take over the restored data");
    }
    if let Some(r) = &snap.restore {
        bail!("a restore onto {} is already in progress", r.node);
    }
    if let Some(sw) = snap.switchover.as_ref().filter(|sw| sw.aborted.is_none()) {
        bail!("a switchover from {} to {} is in progress; try again after it", sw.from, sw.to);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn replace(
    config: &Config,
    coord: &Coord,
    server: &Server,
    repo: &super::repo::Repositories,
    set: &super::catalog::BackupSet,
    target: &restore::Target,
    req: &Request,
    secrets: &crate::config::Secrets,
    request: &mut RestoreRequest,
    lease: crate::coord::LeaseId,
    progress: &mut crate::progress::Progress,
    steps: &mut Vec<(String, u64)>,
) -> Result<(u32, Lsn, PathBuf)> {
    let node = &request.node.clone();
    let since = Instant::now();
    progress.step(format!("waiting for the primary to step down and {node}'s server to stop"));
    loop {
        let s = coord.snapshot().await?;
        if s.restore.as_ref() != Some(request) {
            bail!("the restore request vanished from etcd (its lease expired?); nothing was changed");
        }
        let stopped = s.members.iter().any(|m| m.node == *node && m.is_fresh() && m.role == Role::Stopped);
        if s.leader.is_none() && stopped && crate::process::postmaster_pid(&server.data_dir).is_none() {
            break;
        }
        if since.elapsed() > STOP_TIMEOUT {
            bail!("the primary did not step down or {node} did not stop within {STOP_TIMEOUT:?}; nothing was changed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    steps.push(("stop".into(), since.elapsed().as_millis() as u64));
    advance(coord, request, RestoreStep::Restoring).await?;

    // Restored and recovered beside the node's data, which stays untouched until the swap.
    let beside = sibling(&server.data_dir, ".restore");
    let scratch = Server { data_dir: beside.clone(), ..server.clone() };
    restore::empty_dir(&beside);
    let _ = std::fs::remove_dir(&beside);
    scratch.prepare_dirs()?;
    progress.step(format!("restoring backup {} into {}", set.label, beside.display()));
    let restored = restore::restore_and_recover(
        &scratch,
        repo,
        set,
        target,
        req.timeout,
        req.timeline,
        config,
        secrets,
        progress,
        steps,
    )
    .await;
    let (timeline, lsn) = match restored {
        Ok(r) => r,
        Err(e) => {
            restore::empty_dir(&beside);
            let _ = std::fs::remove_dir(&beside);
            return Err(e);
        }
    };
    let lsn: Lsn = lsn.parse().map_err(|e| anyhow::anyhow!("{e}")).context("the restored position")?;

    // The swap: the node's server is stopped, and stays so while the request
    // stands. A restore frozen past its lease (SIGSTOP, a stalled machine)
    // finds the request gone and the node possibly running again: it must not
    // move the data from under it. A fresh renewal leaves seconds of lease
    // for what takes milliseconds.
    let ttl = coord.renew_lease(lease).await?;
    let current = coord.snapshot().await?.restore;
    if ttl < (LEASE_TTL.as_secs() / 2) as i64 || current.as_ref() != Some(request) {
        bail!(
            "the restore request expired while the data was being restored (was this process stopped?); \
             the cluster went on with its own data, and the restored data stays in {}",
            beside.display()
        );
    }
    if crate::process::postmaster_pid(&server.data_dir).is_some() {
        bail!("{node}'s server is running again; the restored data stays in {}", beside.display());
    }
    let previous = sibling(&server.data_dir, &format!(".replaced-{}", now_ms() / 1000));
    std::fs::rename(&server.data_dir, &previous)
        .with_context(|| format!("move {} aside", server.data_dir.display()))?;
    if let Err(e) = std::fs::rename(&beside, &server.data_dir) {
        std::fs::rename(&previous, &server.data_dir).context("put the previous data back")?;
        return Err(e).context("move the restored data into place");
    }
    if let Err(e) = advance(coord, request, RestoreStep::Restored { timeline, lsn }).await {
        // Nobody may start the restored data without the request: put the old back.
        if crate::process::postmaster_pid(&server.data_dir).is_none() {
            let _ = std::fs::rename(&server.data_dir, &beside);
            let _ = std::fs::rename(&previous, &server.data_dir);
        }
        return Err(e);
    }
    Ok((timeline, lsn, previous))
}

/// Moves the request to `step`, by compare-and-swap.
async fn advance(coord: &Coord, request: &mut RestoreRequest, step: RestoreStep) -> Result<()> {
    let next = RestoreRequest { state: step, ..request.clone() };
    if !coord.update_restore(request, Some(&next)).await? {
        bail!("the restore request changed or vanished in etcd (its lease expired?)");
    }
    *request = next;
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "?".into())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
