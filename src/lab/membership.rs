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

/// Refuses, before anything is published, to add hosts to a netns lab.
pub fn can_add_hosts(dir: &Path) -> Result<()> {
    if Lab::open(dir)?.network.hosts == topology::Hosts::Netns {
        bail!("the netns lab cannot give a new node or region hosts of their own yet (namespaces and links); use a loopback lab");
    }
    Ok(())
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

/// Adds region `name` with `nodes` database nodes (none: a witness region),
/// its etcd member and gateway, on the lab's next region addresses, with the
/// lowest priority and a health check per node like the others'.
pub fn add_region(config: &mut Config, dir: &Path, name: &str, nodes: usize) -> Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 40
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "region name {name:?}: lowercase letters, digits and '-', at most 40"
    );
    if config.region(name).is_ok() {
        bail!("the lab already has a region {name:?}");
    }
    anyhow::ensure!(nodes <= 24, "--nodes: at most 24");
    let octet = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.octets()[2] as usize,
        _ => 0,
    };
    let ri = config.regions.iter().map(|r| octet(r.gateway.api)).max().unwrap_or(0); // 0-based index of the next
    anyhow::ensure!(ri < 250, "no free region addresses left in this lab");
    let net = match config.regions[0].gateway.api.ip() {
        std::net::IpAddr::V4(v4) => v4.octets()[1],
        _ => bail!("the lab's addresses are not IPv4"),
    };
    let hosts = topology::Hosts::Loopback;
    let addr = |host: u8, port: u16| std::net::SocketAddr::new(topology::host_ip(hosts, net, ri, host).into(), port);
    let etcd = topology::etcd_client_url(hosts, net, ri);
    let mut region = crate::config::Region {
        name: name.to_string(),
        priority: (nodes > 0).then(|| config.regions.iter().filter_map(|r| r.priority).max().unwrap_or(0) + 1),
        etcd: Some(etcd.clone()),
        gateway: crate::config::GatewayAddrs {
            api: addr(2, 8080),
            dns: addr(2, 5353),
            writer: addr(2, 6432),
            reader: addr(2, 6433),
        },
        nodes: Vec::new(),
    };
    let template = config.health.checks.iter().find(|c| c.name.starts_with("node-")).cloned();
    for k in 0..nodes {
        let node_name = topology::node_name(name, k);
        if config.node(&node_name).is_ok() {
            bail!("node name {node_name} is already taken");
        }
        let nd = topology::node_dir(dir, &node_name);
        let node = Node {
            address: addr(11 + k as u8, 5432),
            api: addr(11 + k as u8, 8008),
            data_dir: nd.join("data"),
            run_dir: Some(nd.join("run")),
            name: node_name.clone(),
        };
        if let Some(mut check) = template.clone() {
            check.name = format!("node-{node_name}");
            check.target = Some(node.address.to_string());
            config.health.checks.push(check);
        }
        region.nodes.push(node);
    }
    config.etcd.endpoints.push(etcd);
    config.regions.push(region);
    Ok(())
}

/// Removes region `name` with its nodes, their health checks and its etcd
/// member. Refused when a DNS record points at its gateway (edit the file).
pub fn remove_region(config: &mut Config, name: &str) -> Result<()> {
    let region = config.region(name)?.clone();
    let gateway_ips: Vec<String> =
        [region.gateway.writer, region.gateway.reader, region.gateway.api].iter().map(|a| a.ip().to_string()).collect();
    for r in &config.dns.records {
        let targets = std::iter::once(&r.primary).chain(r.secondary.as_ref());
        if targets.into_iter().any(|t| gateway_ips.contains(&t.value)) {
            bail!("DNS record {:?} points at region {name}'s gateway: change the record first", r.name);
        }
    }
    let node_checks: Vec<String> = region.nodes.iter().map(|n| format!("node-{}", n.name)).collect();
    config.health.checks.retain(|c| !node_checks.contains(&c.name));
    config.regions.retain(|r| r.name != name);
    if let Some(url) = &region.etcd {
        config.etcd.endpoints.retain(|e| e != url);
    }
    Ok(())
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

/// The agents of removed nodes, still running when the file was replaced;
/// the gateways and etcd members of removed regions, stopped once those
/// agents are gone; the gateways of added regions, to wait for.
pub struct Leaving {
    pub agents: Vec<(String, u32)>,
    pub region_processes: Vec<(String, u32)>,
    pub removed_regions: Vec<String>,
    pub new_gateways: Vec<std::net::SocketAddr>,
    pub config: Config,
}

/// Installs `text` as the lab's cluster file (the old one kept as
/// `meridian.toml.<version - 1>`) and starts the agents of `added`.
pub struct Membership<'a> {
    pub added: &'a [String],
    pub removed: &'a [String],
    pub added_regions: &'a [String],
    pub removed_regions: &'a [String],
}

pub fn take_file(dir: &Path, text: &str, version: u64, m: &Membership) -> Result<Leaving> {
    let (added, removed) = (m.added, m.removed);
    let lab = Lab::open(dir)?;
    if (!added.is_empty() || !m.added_regions.is_empty()) && lab.network.hosts == topology::Hosts::Netns {
        bail!(
            "the netns lab cannot give {} a host of its own yet (a namespace and its links); use a loopback lab",
            added.iter().chain(m.added_regions).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let region_processes = lab
        .running()
        .into_iter()
        .filter_map(|(member, spec, pid)| match &member {
            Member::Etcd { region } | Member::Gateway { region } if m.removed_regions.contains(region) => {
                Some((spec.name, pid))
            }
            _ => None,
        })
        .collect();
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
    // What `lab up` made for every node, gateway and etcd member: a key and a certificate from the lab's CA.
    let mut subjects: Vec<(String, crate::ca::Subject)> =
        added.iter().map(|n| (format!("node-{n}"), crate::ca::Subject::Node(n.clone()))).collect();
    for r in m.added_regions {
        subjects.push((format!("gateway-{r}"), crate::ca::Subject::Gateway(r.clone())));
        if lab.config.region(r).is_ok_and(|r| r.etcd.is_some()) {
            subjects.push((format!("etcd-{r}"), crate::ca::Subject::Etcd(r.clone())));
        }
    }
    for (sub, subject) in subjects {
        let sub = dir.join("tls").join(sub);
        if !sub.join("tls.crt").exists() {
            const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
            crate::ca::issue(&ca_dir, &sub, &lab.config, &subject, YEAR)?;
        }
    }
    // etcd first (already a learner: it joins the running cluster), then the agents, then the gateways.
    let order = |member: &Member| match member {
        Member::Etcd { .. } => 0,
        Member::Agent { .. } => 1,
        _ => 2,
    };
    let mut starting: Vec<_> = lab
        .processes()
        .into_iter()
        .filter(|(member, _)| match member {
            Member::Agent { node, .. } => added.contains(node),
            Member::Etcd { region } | Member::Gateway { region } => m.added_regions.contains(region),
            _ => false,
        })
        .collect();
    starting.sort_by_key(|(member, _)| order(member));
    for (_, spec) in starting {
        if process::running_pid(&spec.pid_file, &spec.identity).is_none() {
            let pid = process::start(&spec)?;
            eprintln!("started {} (pid {pid})", spec.name);
        }
    }
    let new_gateways =
        m.added_regions.iter().filter_map(|r| lab.config.region(r).ok().map(|r| r.gateway.api)).collect();
    Ok(Leaving {
        agents,
        region_processes,
        removed_regions: m.removed_regions.to_vec(),
        new_gateways,
        config: lab.config.clone(),
    })
}

/// Waits until the leaving agents have exited; at `timeout`, stops them (SIGTERM, then SIGKILL).
pub async fn wait_left(leaving: &Leaving, timeout: Duration) -> Result<()> {
    for addr in &leaving.new_gateways {
        super::wait::wait_for_http(&leaving.config, *addr, "/healthz", Duration::from_secs(30))
            .await
            .with_context(|| format!("the new region's gateway on {addr}"))?;
    }
    let pids: Vec<u32> = leaving.agents.iter().map(|(_, p)| *p).collect();
    let stuck = process::wait_gone(&pids, timeout).await;
    if stuck.is_empty() {
        stop_region_processes(leaving).await;
        return Ok(());
    }
    for &p in &stuck {
        process::signal(p, libc::SIGTERM);
    }
    let still = process::wait_gone(&stuck, Duration::from_secs(40)).await;
    for &p in &still {
        process::signal(p, libc::SIGKILL);
    }
    stop_region_processes(leaving).await;
    bail!("the agents of leaving nodes (pids {stuck:?}) did not exit within {timeout:?}; the lab stopped them")
}

/// Stops the gateways and etcd members of removed regions (by pid), then
/// removes their regions' partition groups.
async fn stop_region_processes(leaving: &Leaving) {
    let pids: Vec<u32> = leaving.region_processes.iter().map(|(_, p)| *p).collect();
    for (name, pid) in &leaving.region_processes {
        process::signal(*pid, libc::SIGTERM);
        eprintln!("stopping {name} (pid {pid}): its region left");
    }
    let stuck = process::wait_gone(&pids, Duration::from_secs(20)).await;
    for &p in &stuck {
        process::signal(p, libc::SIGKILL);
    }
    process::wait_gone(&stuck, Duration::from_secs(5)).await;
    if let Some(groups) = super::partition::Groups::detect(leaving.net()) {
        for r in &leaving.removed_regions {
            groups.remove_region(r);
        }
    }
    // A removed etcd member can never rejoin with its data (etcd refuses it):
    // a region added again under the same name starts a fresh member.
    if let Some(dir) = leaving.config.source.as_deref().and_then(Path::parent) {
        for r in &leaving.removed_regions {
            let data = dir.join("etcd").join(r);
            if data.exists() {
                if let Err(e) = std::fs::remove_dir_all(&data) {
                    eprintln!("failed to remove {}: {e}", data.display());
                }
            }
        }
    }
}

impl Leaving {
    fn net(&self) -> u8 {
        match self.config.regions.first().map(|r| r.gateway.api.ip()) {
            Some(std::net::IpAddr::V4(v4)) => v4.octets()[1],
            _ => 0,
        }
    }
}
