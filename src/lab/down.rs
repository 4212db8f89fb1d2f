//! `lab down`: every process stopped by pid, partitions removed, the lab
//! directory deleted (only a directory with the lab's marker).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{partition, Lab, Member, MARKER};
use crate::config::Config;
use crate::process;

/// Stops every process of the lab by pid (gateways and agents first, whose agents
/// stop their PostgreSQL; then any orphaned postmaster and pgBackRest process;
/// the S3 servers; etcd last).
pub(super) async fn stop_processes(lab: &Lab) {
    // A frozen server (`lab freeze postgres:NODE`) would hold its agent's stop
    // for every grace period in turn: continue it first.
    for (_, n) in lab.config.nodes() {
        if let Some(pm) = lab.data_dir(&n.name).and_then(|d| process::postmaster_pid(&d)) {
            for pid in std::iter::once(pm).chain(process::children_of(pm)) {
                process::signal(pid, libc::SIGCONT);
            }
        }
    }
    let running = lab.running();
    // The S3 servers stay until the servers have stopped: a primary's clean
    // shutdown switches to a new segment and archives the one it closed.
    let front: Vec<u32> = running
        .iter()
        .filter(|(m, _, _)| !matches!(m, Member::Etcd { .. } | Member::S3 { .. }))
        .map(|(_, _, p)| *p)
        .collect();
    process::stop_all(&front, Duration::from_secs(30)).await;
    let postmasters: Vec<u32> = lab
        .config
        .nodes()
        .filter_map(|(_, n)| lab.data_dir(&n.name))
        .filter_map(|d| process::postmaster_pid(&d))
        .collect();
    for pid in &postmasters {
        process::signal(*pid, libc::SIGQUIT);
    }
    process::stop_all(&postmasters, Duration::from_secs(10)).await;
    // pgBackRest's asynchronous archive-push outlives a server whose agent was killed.
    let archivers: Vec<u32> = lab
        .config
        .nodes()
        .flat_map(|(_, n)| crate::backup::pgbackrest::running_pids(&lab.config.resolve(&n.run_dir())))
        .collect();
    process::stop_all(&archivers, Duration::from_secs(5)).await;
    let s3: Vec<u32> = running.iter().filter(|(m, _, _)| matches!(m, Member::S3 { .. })).map(|(_, _, p)| *p).collect();
    process::stop_all(&s3, Duration::from_secs(5)).await;
    // Stopped together, etcd members each wait seconds for their peers (leader
    // transfer). The lab's etcd data is thrown away, or restarted from disk
    // (which etcd is built to survive), so a short grace before SIGKILL will do.
    let etcd: Vec<u32> =
        running.iter().filter(|(m, _, _)| matches!(m, Member::Etcd { .. })).map(|(_, _, p)| *p).collect();
    for pid in &etcd {
        process::signal(*pid, libc::SIGTERM);
    }
    for pid in process::wait_gone(&etcd, Duration::from_secs(1)).await {
        process::signal(pid, libc::SIGKILL);
    }
    let stuck = process::wait_gone(&etcd, Duration::from_secs(5)).await;
    if !stuck.is_empty() {
        tracing::error!("etcd pids {stuck:?} are still alive after SIGKILL");
    }
    // The WAN relay last: until everything else has stopped, regions still talk.
    let relay: Vec<u32> = running.iter().filter(|(m, _, _)| matches!(m, Member::Wan)).map(|(_, _, p)| *p).collect();
    process::stop_all(&relay, Duration::from_secs(5)).await;
    if lab.network.hosts == super::topology::Hosts::Netns {
        let net = lab.net();
        match tokio::task::spawn_blocking(move || super::netns::teardown(net)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("{e:#}"),
            Err(e) => tracing::error!("failed to remove the netns lab's network: {e}"),
        }
    }
    if let Some(groups) = partition::Groups::detect(lab.net()) {
        let regions = lab.region_names();
        // nft runs a process and removing a cgroup is retried: off the async workers.
        let removed = tokio::task::spawn_blocking(move || {
            if let Err(e) = groups.heal() {
                tracing::error!("failed to remove the lab's partition rules: {e:#}");
            }
            groups.remove(&regions);
        });
        if let Err(e) = removed.await {
            tracing::error!("failed to remove the lab's partition rules and cgroups: {e}");
        }
    }
}

/// `lab down`: stops everything and removes the lab directory. Safe to repeat.
pub async fn down(dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir)?;
    if !dir.join(MARKER).is_file() {
        println!("no lab in {}; nothing to do", dir.display());
        return Ok(());
    }
    let lab = Lab::open(&dir)?;
    let n = lab.running().len();
    stop_processes(&lab).await;
    let left = lab.running();
    if !left.is_empty() {
        let names: Vec<String> = left.iter().map(|(_, s, p)| format!("{} (pid {p})", s.name)).collect();
        bail!("could not stop {}; the lab directory is kept", names.join(", "));
    }
    let listening = if lab.network.hosts == super::topology::Hosts::Netns {
        // Its addresses went with its namespaces: probing them now would send
        // packets out of this machine by the default route. What is left to
        // check is the namespaces themselves.
        let left = super::netns::leftovers(lab.net());
        if !left.is_empty() {
            bail!("could not remove {}; the lab directory is kept (run `meridian lab down` again)", left.join(", "));
        }
        Vec::new()
    } else {
        still_listening(&lab.config).await
    };
    remove_lab_dir(&dir)?;
    println!("stopped {n} processes and removed {}", dir.display());
    if !listening.is_empty() {
        bail!("something still listens on {} after the lab stopped", listening.join(", "));
    }
    Ok(())
}

async fn still_listening(config: &Config) -> Vec<String> {
    let mut addrs: Vec<SocketAddr> =
        config.etcd.endpoints.iter().filter_map(|e| crate::config::parse_etcd_url(e).ok()).collect();
    for r in &config.regions {
        addrs.extend([r.gateway.api, r.gateway.dns, r.gateway.writer, r.gateway.reader]);
        for n in &r.nodes {
            addrs.extend([n.address, n.api]);
        }
    }
    let mut out = Vec::new();
    for addr in addrs {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            out.push(addr.to_string());
        }
    }
    out
}

pub(super) fn remove_lab_dir(dir: &Path) -> Result<()> {
    anyhow::ensure!(dir.join(MARKER).is_file(), "{} is not a lab directory; refusing to delete it", dir.display());
    std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
}
