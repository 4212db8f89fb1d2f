//! Faults on demand: kill and start nodes or regions, partition and heal.
//! (Freezing is in `freeze`, clock skew in `clock`.)

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use super::wait::{wait_for, wait_for_etcd, wait_for_http};
use super::{Lab, Member};
use crate::process::{self, ProcSpec};
use crate::progress::Progress;

/// `lab kill NODE|REGION`: SIGKILL the processes of a node (its agent,
/// PostgreSQL and pgBackRest's archive-push, which a lost machine loses too)
/// or of a whole region (agents, gateway, etcd member).
pub async fn kill(dir: &Path, target: &str) -> Result<()> {
    let lab = Lab::open(dir)?;
    let chosen = lab.select(target)?;
    let mut killed = Vec::new();
    let mut pids = Vec::new();
    for (member, spec) in &chosen {
        if let Some(pid) = process::running_pid(&spec.pid_file, &spec.identity) {
            // The agent first, then its postmaster: the postmaster would be stopped
            // by its supervisor anyway, but a SIGKILL to both makes the fault
            // instantaneous. In the other order an agent scheduled between the
            // two signals reports its server's death as an unexpected exit.
            let postmaster = match member {
                Member::Agent { node, .. } => lab.data_dir(node).and_then(|d| process::postmaster_pid(&d)),
                _ => None,
            };
            process::signal(pid, libc::SIGKILL);
            pids.push(pid);
            killed.push(format!("{} (pid {pid})", spec.name));
            if let (Some(pm), Member::Agent { node, .. }) = (postmaster, member) {
                process::signal(pm, libc::SIGKILL);
                pids.push(pm);
                killed.push(format!("postgres {node} (pid {pm})"));
            }
            if let Member::Agent { node, .. } = member {
                let run_dir = lab.config.node(node).map(|(_, n)| lab.config.resolve(&n.run_dir()));
                let archivers = run_dir.map(|d| crate::backup::pgbackrest::running_pids(&d));
                for p in archivers.unwrap_or_default() {
                    process::signal(p, libc::SIGKILL);
                    pids.push(p);
                    killed.push(format!("pgbackrest {node} (pid {p})"));
                }
            }
        }
    }
    let stuck = process::wait_gone(&pids, Duration::from_secs(10)).await;
    anyhow::ensure!(stuck.is_empty(), "pids {stuck:?} survived SIGKILL");
    if killed.is_empty() {
        println!("nothing of {target} was running");
    } else {
        println!("killed {}", killed.join(", "));
    }
    Ok(())
}

/// `lab start NODE|REGION`: starts what of a node or region is not running,
/// and (with `wait`) waits until it is back (etcd answering, node healthy,
/// gateway serving).
pub async fn start(dir: &Path, target: &str, wait: bool) -> Result<()> {
    let lab = Lab::open(dir)?;
    let chosen = lab.select(target)?;
    let mut progress = Progress::new();
    let mut started = Vec::new();
    let mut started_specs: Vec<&ProcSpec> = Vec::new();
    for (member, spec) in &chosen {
        if process::running_pid(&spec.pid_file, &spec.identity).is_none() {
            progress.step(format!("starting {}", spec.name));
            process::start(spec)?;
            started.push(member.clone());
            started_specs.push(spec);
        }
    }
    if started.is_empty() {
        progress.done();
        println!("everything of {target} is already running");
        return Ok(());
    }
    if !wait {
        progress.done();
        println!(
            "started {} (not waiting until it is back)",
            started_specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    progress.step(format!("waiting for {target} to be back"));
    let result = async {
        let coord = wait_for_etcd(&lab.config, Duration::from_secs(30)).await?;
        // Reports from before the restart (still in etcd until their lease
        // expires) do not count: only ones written after this revision do.
        // Revisions, not clocks: a node may run with a skewed clock.
        let since = coord.snapshot().await?.revision;
        for member in &started {
            match member {
                Member::Etcd { .. } | Member::Wan => {}
                // moto keeps objects in memory: a restarted server starts empty and needs its bucket.
                Member::S3 { region } => {
                    for (repo, _) in lab.s3_repositories().into_iter().filter(|(r, _)| &r.region == region) {
                        super::up::make_bucket(&lab, repo, Duration::from_secs(30)).await?;
                    }
                }
                Member::Agent { node, .. } => {
                    wait_for(&coord, Duration::from_secs(90), &format!("{node} to be healthy"), &started_specs, |s| {
                        s.members.iter().any(|m| &m.node == node && m.healthy && m.revision > since).then_some(())
                    })
                    .await?;
                }
                Member::Gateway { region } => {
                    wait_for_http(
                        &lab.config,
                        lab.config.region(region)?.gateway.api,
                        "/healthz",
                        Duration::from_secs(30),
                    )
                    .await?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            progress.done();
            // What was started, not everything the target names: the rest was running.
            println!("started {}", started_specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "));
            Ok(())
        }
        Err(e) => {
            progress.fail();
            Err(e)
        }
    }
}

/// `lab partition REGION`: cut a region off from every other region.
pub async fn partition(dir: &Path, region: &str) -> Result<()> {
    let lab = Lab::open(dir)?;
    let regions = lab.region_names();
    let Some(ri) = regions.iter().position(|r| r == region) else {
        bail!("no region named {region:?} in the lab (regions: {})", regions.join(", "));
    };
    if lab.network.hosts == super::topology::Hosts::Netns {
        let net = lab.net();
        tokio::task::spawn_blocking(move || super::netns::partition(net, ri)).await??;
        println!("partitioned {region}: the router drops what it sends to other regions and what they send it (`meridian lab heal` to undo)");
        return Ok(());
    }
    let Some(groups) = super::partition::Groups::detect(lab.net()) else {
        bail!("lab partition needs root and cgroup v2 (it places each region in its own cgroup and drops its traffic with nftables); nothing was changed");
    };
    let outside: Vec<String> = lab
        .running()
        .into_iter()
        .filter(|(m, _, pid)| m.region() == region && !in_group(*pid, &groups.region_dir(region)))
        .map(|(_, s, _)| s.name)
        .collect();
    if !outside.is_empty() {
        bail!(
            "{} started outside the region's cgroup (the lab was started without root?); restart the lab as root",
            outside.join(", ")
        );
    }
    // nft runs a process: off the async workers.
    tokio::task::spawn_blocking(move || groups.partition(&regions, ri)).await??;
    println!(
        "partitioned {region}: its processes cannot reach other regions, nor they it (`meridian lab heal` to undo)"
    );
    Ok(())
}

/// `lab heal`: remove every partition.
pub async fn heal(dir: &Path) -> Result<()> {
    let lab = Lab::open(dir)?;
    if lab.network.hosts == super::topology::Hosts::Netns {
        let net = lab.net();
        let healed = tokio::task::spawn_blocking(move || {
            let had = super::netns::has_partition(net);
            super::netns::heal(net).map(|()| had)
        })
        .await??;
        println!("{}", if healed { "healed: every region reaches every other again" } else { "no partition to heal" });
        return Ok(());
    }
    match super::partition::Groups::detect(lab.net()) {
        Some(groups) => {
            let healed = tokio::task::spawn_blocking(move || {
                let had = groups.has_rules();
                groups.heal().map(|()| had)
            })
            .await??;
            println!(
                "{}",
                if healed { "healed: every region reaches every other again" } else { "no partition to heal" }
            );
        }
        None => println!("no partition to heal"),
    }
    Ok(())
}

/// Whether `pid` runs in the cgroup `dir`.
fn in_group(pid: u32, dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
}
