//! `meridian destroy`: removes a stopped cluster — its etcd keys, the data
//! and run directories of its nodes on this host and, when asked, its
//! backups (`pgbackrest stanza-delete` in every repository). It refuses while
//! anything of the cluster runs: an agent's or gateway's report in etcd (they
//! live under leases, so they vanish within a lease TTL of a stop), a
//! postmaster on one of its data directories, or an answer on one of its
//! agent or gateway API addresses. Everything is checked before anything is
//! removed; etcd goes last, so a destroy that failed midway can be run again.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::backup::repo::Repositories;
use crate::config::Config;
use crate::coord::Coord;

#[derive(Debug, Default, Serialize)]
pub struct Plan {
    pub cluster: String,
    /// Data and run directories present on this host.
    pub directories: Vec<PathBuf>,
    /// Repositories whose stanza is deleted (with `--repositories`).
    pub repositories: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Done {
    pub cluster: String,
    pub directories: Vec<PathBuf>,
    pub repositories: Vec<String>,
    pub etcd_keys: i64,
}

/// What runs of the cluster, in words; empty when nothing does.
async fn running(config: &Config, coord: &Coord) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let s = coord.snapshot().await?;
    for m in &s.members {
        found.push(format!("the agent of {} reports to etcd", m.node));
    }
    for h in &s.health {
        found.push(format!("the gateway in {} reports health to etcd", h.observer));
    }
    if let Some(l) = &s.leader {
        found.push(format!("{} holds leader (epoch {})", l.leader.node, l.leader.epoch));
    }
    for (_, n) in config.nodes() {
        let data = config.resolve(&n.data_dir);
        if let Some(pid) = crate::process::postmaster_pid(&data) {
            found.push(format!("PostgreSQL (pid {pid}) runs on {}", data.display()));
        }
        if answers(n.api).await {
            found.push(format!("something answers on {}'s agent API {}", n.name, n.api));
        }
    }
    for r in &config.regions {
        if answers(r.gateway.api).await {
            found.push(format!("something answers on the gateway API of {} ({})", r.name, r.gateway.api));
        }
    }
    Ok(found)
}

async fn answers(addr: std::net::SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// Checks that nothing of the cluster runs and says what would be removed.
pub async fn plan(config: &Config, coord: &Coord, repositories: bool) -> Result<Plan> {
    let running = running(config, coord).await?;
    if !running.is_empty() {
        bail!("cluster {:?} is not stopped: {}; stop it first", config.cluster, running.join("; "));
    }
    let mut directories = Vec::new();
    for (_, n) in config.nodes() {
        for d in [config.resolve(&n.data_dir), config.resolve(&n.run_dir())] {
            if d.exists() {
                directories.push(d);
            }
        }
    }
    let repositories = match (&config.backup, repositories) {
        (Some(b), true) => b.repositories.iter().map(|r| r.name.clone()).collect(),
        (None, true) => bail!("--repositories: the cluster file has no [backup] section"),
        _ => Vec::new(),
    };
    Ok(Plan { cluster: config.cluster.clone(), directories, repositories })
}

/// Carries out a plan: repositories, then directories, then etcd.
pub async fn run(config: &Config, coord: &Coord, plan: Plan, progress: &mut crate::progress::Progress) -> Result<Done> {
    if !plan.repositories.is_empty() {
        let secrets = config.secrets()?;
        let ca = config.tls_ca_file();
        let os_ids = match unsafe { libc::geteuid() } {
            0 => Some(crate::postgres::lookup_user(&config.postgres.os_user)?),
            _ => None,
        };
        for name in &plan.repositories {
            progress.step(format!("deleting the backups of {} in repository {name}", config.cluster));
            let repo = Repositories::open(config, &secrets, &ca, Some(name), os_ids)?;
            let pg = config.bootstrap_node().map(|n| config.resolve(&n.data_dir)).unwrap_or_default();
            repo.delete_stanza(&pg)
                .with_context(|| format!("delete stanza {} in repository {name}", config.cluster))?;
        }
    }
    for d in &plan.directories {
        progress.step(format!("removing {}", d.display()));
        let d2 = d.clone();
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&d2))
            .await?
            .with_context(|| format!("remove {}", d.display()))?;
    }
    progress.step(format!("removing cluster {}'s keys from etcd", config.cluster));
    let etcd_keys = coord.delete_cluster().await?;
    progress.done();
    Ok(Done { cluster: plan.cluster, directories: plan.directories, repositories: plan.repositories, etcd_keys })
}
