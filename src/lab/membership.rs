//! `config apply` on a lab: the lab plays the operator who, on real
//! machines, installs the new file and starts or stops the units
//! (docs/deploy.md). After the new version is published, the lab's cluster
//! file becomes the new one and the agents of joining nodes start; the
//! agents of leaving nodes exit by themselves once they have drained, and
//! the lab waits for that by pid (stopping them itself only at the deadline).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{topology, Lab, Member};
use crate::config::{Config, Node};
use crate::process;

/// Writes `D/meridian.next.toml`: the lab's cluster file changed by `edit`.
/// Returns the lab's cluster file and the new one.
pub fn next_file(dir: &Path, edit: impl FnOnce(&mut Config, &Path) -> Result<()>) -> Result<(PathBuf, PathBuf)> {
    let lab = Lab::open(dir)?;
    let mut config = lab.config.clone();
    edit(&mut config, &lab.dir)?;
    let next = lab.dir.join("meridian.next.toml");
    let text = format!(
        "# Written by `meridian lab add-node/remove-node`: the lab's cluster file with one node more or less.\n{}",
        toml::to_string(&config).context("render the cluster file")?
    );
    std::fs::write(&next, text).with_context(|| format!("write {}", next.display()))?;
    Ok((lab.config_path(), next))
}

/// Adds the next node of `region` (its letter, the lab's addresses for it, a
/// health check like the others'); returns its name.
pub fn add_node(config: &mut Config, dir: &Path, region: &str) -> Result<String> {
    let Some(ri) = config.regions.iter().position(|r| r.name == region) else {
        let names: Vec<&str> = config.regions.iter().map(|r| r.name.as_str()).collect();
        bail!("no region {region:?} in this lab (regions: {})", names.join(", "));
    };
    if config.regions[ri].nodes.is_empty() {
        bail!("{region} is a witness region (no database nodes); add nodes to a database region");
    }
    let k = (0..24).find(|k| config.node(&topology::node_name(region, *k)).is_err()).context("no free node letter")?;
    let name = topology::node_name(region, k);
    let first = config.regions[ri].nodes[0].clone();
    let host = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            std::net::SocketAddr::new(std::net::Ipv4Addr::new(o[0], o[1], o[2], 11 + k as u8).into(), a.port())
        }
        _ => a,
    };
    let nd = topology::node_dir(dir, &name);
    let node = Node {
        address: host(first.address),
        api: host(first.api),
        data_dir: nd.join("data"),
        run_dir: Some(nd.join("run")),
        name: name.clone(),
    };
    if let Some(other) = config.nodes().find(|(_, n)| n.address == node.address || n.api == node.api) {
        bail!("{} is already used by node {}", node.address, other.1.name);
    }
    let template = config.health.checks.iter().find(|c| c.name == format!("node-{}", first.name)).cloned();
    if let Some(mut check) = template {
        check.name = format!("node-{name}");
        check.target = Some(node.address.to_string());
        config.health.checks.push(check);
    }
    config.regions[ri].nodes.push(node);
    Ok(name)
}

/// Removes `node` and its health check.
pub fn remove_node(config: &mut Config, node: &str) -> Result<()> {
    config.node(node)?;
    for r in &mut config.regions {
        r.nodes.retain(|n| n.name != node);
    }
    config.health.checks.retain(|c| c.name != format!("node-{node}"));
    Ok(())
}

/// The agents of removed nodes, still running when the file was replaced.
pub struct Leaving {
    pub agents: Vec<(String, u32)>,
}

/// Installs `text` as the lab's cluster file (the old one kept as
/// `meridian.toml.<version - 1>`) and starts the agents of `added`.
pub fn take_file(dir: &Path, text: &str, version: u64, added: &[String], removed: &[String]) -> Result<Leaving> {
    let lab = Lab::open(dir)?;
    if !added.is_empty() && lab.network.hosts == topology::Hosts::Netns {
        bail!(
            "the netns lab cannot give {} a host of its own yet (a namespace and its links); use a loopback lab",
            added.join(", ")
        );
    }
    let agents = lab
        .running()
        .into_iter()
        .filter_map(|(m, _, pid)| match m {
            Member::Agent { node, .. } if removed.contains(&node) => Some((node, pid)),
            _ => None,
        })
        .collect();
    let path = lab.config_path();
    let kept = dir.join(format!("meridian.toml.{}", version.saturating_sub(1)));
    std::fs::copy(&path, &kept).with_context(|| format!("keep {} as {}", path.display(), kept.display()))?;
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    let lab = Lab::open(dir)?;
    let ca_dir = dir.join("tls").join("ca");
    for node in added {
        // What `lab up` made for every node: a key and a certificate from the lab's CA.
        let sub = dir.join("tls").join(format!("node-{node}"));
        if !sub.join("tls.crt").exists() {
            const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
            crate::ca::issue(&ca_dir, &sub, &lab.config, &crate::ca::Subject::Node(node.clone()), YEAR)?;
        }
    }
    for (member, spec) in lab.processes() {
        let Member::Agent { node, .. } = &member else { continue };
        if added.contains(node) && process::running_pid(&spec.pid_file, &spec.identity).is_none() {
            let pid = process::start(&spec)?;
            eprintln!("started {} (pid {pid})", spec.name);
        }
    }
    Ok(Leaving { agents })
}

/// Waits until the leaving agents have exited; at `timeout`, stops them (SIGTERM, then SIGKILL).
pub async fn wait_left(leaving: &Leaving, timeout: Duration) -> Result<()> {
    let pids: Vec<u32> = leaving.agents.iter().map(|(_, p)| *p).collect();
    let stuck = process::wait_gone(&pids, timeout).await;
    if stuck.is_empty() {
        return Ok(());
    }
    for &p in &stuck {
        process::signal(p, libc::SIGTERM);
    }
    let still = process::wait_gone(&stuck, Duration::from_secs(40)).await;
    for &p in &still {
        process::signal(p, libc::SIGKILL);
    }
    bail!("the agents of leaving nodes (pids {stuck:?}) did not exit within {timeout:?}; the lab stopped them")
}
