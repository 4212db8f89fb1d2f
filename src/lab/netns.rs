//! The netns lab's network (`lab up --hosts netns`): every process in its own
//! network namespace with its own address, as if each were its own machine.
//!
//! ```text
//!   root namespace (CLI, tests, the lab's S3 server)
//!     mlab<N>  10.N.0.1/24 ── veth ── obs 10.N.0.254 ┐
//!                                                     │  mlab<N>-router
//!   mlab<N>-etcd-<region>   eth0 10.N.R.1  ── veth ── r<R>h1  ┐
//!   mlab<N>-gateway-<region> eth0 10.N.R.2 ── veth ── r<R>h2  ├ br<R> 10.N.R.254
//!   mlab<N>-<node>          eth0 10.N.R.1k ── veth ── r<R>h1k ┘
//!                                                     wan0 (TUN, when the WAN has a delay)
//! ```
//!
//! A region is a bridge in the router namespace; traffic within a region is
//! bridged, traffic between regions is routed by the router, and, with a WAN
//! delay, policy routing sends it through `wan0`, where the WAN relay (`wan`)
//! holds each packet before the kernel routes it on. Partitions are nftables
//! rules in the router's forward chain. The root namespace reaches every host
//! through the router without delay or partition: it is the outside observer,
//! as the CLI is on the loopback lab.
//!
//! Everything lives in namespaces named `mlab<N>-*` except the root end of the
//! observer link (`mlab<N>`, gone with its peer) and its route: deleting the
//! namespaces removes every veth, bridge, TUN device and nftables table, so
//! `teardown` works from names alone, after a crash too.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::topology::{host_ip, observer_ip, Hosts};
use super::Member;
use crate::config::Config;

/// Where `ip netns add` puts a namespace's handle.
const NETNS_DIR: &str = "/run/netns";
/// The TUN device cross-region packets go through, in the router namespace.
pub const WAN_DEVICE: &str = "wan0";
/// The routing table that sends cross-region packets to `WAN_DEVICE`.
const WAN_TABLE: &str = "100";

fn prefix(net: u8) -> String {
    format!("mlab{net}-")
}

pub fn router(net: u8) -> String {
    format!("mlab{net}-router")
}

/// The root namespace's end of the link to the router.
fn observer_link(net: u8) -> String {
    format!("mlab{net}")
}

/// The namespace a lab process runs in (the S3 server runs outside them).
pub fn namespace_of(net: u8, member: &Member) -> Option<String> {
    let host = match member {
        Member::S3 { .. } => return None,
        Member::Wan => "router".to_string(),
        Member::Etcd { region } => format!("etcd-{region}"),
        Member::Gateway { region } => format!("gateway-{region}"),
        Member::Agent { node, .. } => node.clone(),
    };
    Some(format!("{}{host}", prefix(net)))
}

/// The handle a process joins its namespace by.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// The lab's namespaces that exist now.
pub fn existing(net: u8) -> Vec<String> {
    let prefix = prefix(net);
    let mut out: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// One host: a namespace with one address in its region's subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Host {
    ns: String,
    region_index: usize,
    /// The last octet of its address.
    octet: u8,
}

/// The lab's hosts, from its cluster file: per region its etcd member (.1),
/// gateway (.2) and nodes (their addresses' last octet).
fn hosts(net: u8, config: &Config) -> Result<Vec<Host>> {
    let mut out = Vec::new();
    for (ri, r) in config.regions.iter().enumerate() {
        let mut add = |member: Member, ip: std::net::IpAddr| -> Result<()> {
            let std::net::IpAddr::V4(v4) = ip else { bail!("{member:?}: the netns lab is IPv4 only") };
            anyhow::ensure!(
                v4 == host_ip(Hosts::Netns, net, ri, v4.octets()[3]),
                "{member:?}: {v4} is not in region {}'s subnet",
                r.name
            );
            out.push(Host { ns: namespace_of(net, &member).expect("not S3"), region_index: ri, octet: v4.octets()[3] });
            Ok(())
        };
        if let Some(url) = &r.etcd {
            let addr = crate::config::parse_etcd_url(url).map_err(anyhow::Error::msg)?;
            add(Member::Etcd { region: r.name.clone() }, addr.ip())?;
        }
        add(Member::Gateway { region: r.name.clone() }, r.gateway.api.ip())?;
        for n in &r.nodes {
            add(Member::Agent { node: n.name.clone(), region: r.name.clone() }, n.address.ip())?;
        }
    }
    Ok(out)
}

/// Refuses, changing nothing, when the lab's names or addresses are taken.
pub fn check_free(net: u8) -> Result<()> {
    let taken = existing(net);
    if !taken.is_empty() {
        bail!(
            "network namespace(s) {} already exist: another netns lab on --net {net}, or one that crashed \
             (`meridian lab down --dir DIR`, or `ip netns del NAME`); nothing was changed",
            taken.join(", ")
        );
    }
    if link_exists(None, &observer_link(net)) {
        bail!(
            "a network interface named {} already exists (another netns lab on --net {net}?); nothing was changed",
            observer_link(net)
        );
    }
    let subnet = format!("10.{net}.");
    let routes = ip_output(&["-4", "-o", "route", "show"])? + &ip_output(&["-4", "-o", "addr", "show"])?;
    if let Some(line) = routes.lines().find(|l| l.split_whitespace().any(|w| w.starts_with(&subnet))) {
        bail!(
            "10.{net}.0.0/16 is already in use on this machine ({}); pick another --net; nothing was changed",
            line.trim()
        );
    }
    Ok(())
}

/// Builds the lab's network: the router, a bridge per region, a namespace per
/// host, the observer link and, with `wan_delay`, the TUN device and the
/// policy routes through it. On failure, removes what it made.
pub fn setup(net: u8, config: &Config, wan_delay: bool) -> Result<()> {
    let hosts = hosts(net, config)?;
    let result = build(net, config, &hosts, wan_delay);
    if result.is_err() {
        let _ = teardown(net);
    }
    result
}

fn build(net: u8, config: &Config, hosts: &[Host], wan_delay: bool) -> Result<()> {
    let r = router(net);
    ip(&["netns", "add", &r])?;
    ip(&["-n", &r, "link", "set", "lo", "up"])?;
    // A router, and one that takes back what the WAN relay writes on another
    // interface than the route to its source (reverse-path filtering off).
    in_namespace(
        &r,
        "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; \
         echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter",
    )?;
    let obs = observer_link(net);
    ip(&["link", "add", &obs, "type", "veth", "peer", "name", "obs", "netns", &r])?;
    ip(&["addr", "add", &format!("{}/24", observer_ip(net)), "dev", &obs])?;
    ip(&["link", "set", &obs, "up"])?;
    ip(&["-n", &r, "addr", "add", &format!("10.{net}.0.254/24"), "dev", "obs"])?;
    ip(&["-n", &r, "link", "set", "obs", "up"])?;
    ip(&["route", "add", &format!("10.{net}.0.0/16"), "via", &format!("10.{net}.0.254"), "dev", &obs])?;
    for ri in 0..config.regions.len() {
        let br = bridge(ri);
        ip(&["-n", &r, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", &r, "addr", "add", &format!("{}/24", gateway_ip(net, ri)), "dev", &br])?;
        ip(&["-n", &r, "link", "set", &br, "up"])?;
    }
    for h in hosts {
        let port = format!("r{}h{}", h.region_index + 1, h.octet);
        let address = host_ip(Hosts::Netns, net, h.region_index, h.octet);
        ip(&["netns", "add", &h.ns])?;
        ip(&["link", "add", "eth0", "netns", &h.ns, "type", "veth", "peer", "name", &port, "netns", &r])?;
        ip(&["-n", &r, "link", "set", &port, "master", &bridge(h.region_index), "up"])?;
        ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &h.ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &h.ns, "route", "add", "default", "via", &gateway_ip(net, h.region_index).to_string()])?;
    }
    if wan_delay {
        ip(&["-n", &r, "tuntap", "add", "dev", WAN_DEVICE, "mode", "tun"])?;
        // The relay holds packets in user space; the device's own queue only has to absorb bursts.
        ip(&["-n", &r, "link", "set", WAN_DEVICE, "txqueuelen", "10000", "up"])?;
        ip(&["-n", &r, "route", "add", "default", "dev", WAN_DEVICE, "table", WAN_TABLE])?;
        // To the observer: never delayed.
        ip(&["-n", &r, "rule", "add", "pref", "90", "to", &format!("10.{net}.0.0/24"), "table", "main"])?;
        for ri in 0..config.regions.len() {
            // From one region's bridge to any other region: through the WAN.
            let from = bridge(ri);
            ip(&[
                "-n",
                &r,
                "rule",
                "add",
                "pref",
                "100",
                "iif",
                &from,
                "to",
                &format!("10.{net}.0.0/16"),
                "table",
                WAN_TABLE,
            ])?;
        }
    }
    Ok(())
}

fn bridge(region_index: usize) -> String {
    format!("br{}", region_index + 1)
}

/// The router's address on a region's bridge: every host's default route.
fn gateway_ip(net: u8, region_index: usize) -> Ipv4Addr {
    host_ip(Hosts::Netns, net, region_index, 254)
}

/// Deletes every namespace of the lab on `--net net` (which takes their
/// veths, bridges, TUN device and nftables tables with them) and the
/// observer link. Call after the lab's processes are gone: a process still in
/// a namespace keeps it alive, unnamed. Returns what it deleted.
pub fn teardown(net: u8) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for ns in existing(net) {
        match ip(&["netns", "del", &ns]) {
            Ok(()) => deleted.push(ns),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // The root end of the observer link goes with its peer, once the kernel
    // has cleaned up the router's namespace (asynchronously).
    let obs = observer_link(net);
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_exists(None, &obs) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if link_exists(None, &obs) {
        match ip(&["link", "del", &obs]) {
            Ok(()) => deleted.push(obs),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("could not remove the netns lab's network: {}", errors.join("; "));
    }
    Ok(deleted)
}

/// What is left of a netns lab's network on `--net net`: namespaces and the observer link.
pub fn leftovers(net: u8) -> Vec<String> {
    let mut out = existing(net);
    if link_exists(None, &observer_link(net)) {
        out.push(format!("interface {}", observer_link(net)));
    }
    out
}

fn link_exists(ns: Option<&str>, name: &str) -> bool {
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["link", "show", "dev", name]);
    Command::new("ip").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip (install iproute2: scripts/setup)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a shell line inside a namespace (for its /proc/sys/net settings).
fn in_namespace(ns: &str, script: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .context("run ip netns exec")?;
    if !out.status.success() {
        bail!("in namespace {ns}: {script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs an nftables script in a namespace, atomically.
fn nft_in(ns: &str, script: &str) -> Result<()> {
    super::partition::nft(Some(ns), script)
}

/// The name of the router's partition table.
const PARTITION_TABLE: &str = "meridian_partition";

/// Cuts region `ri` off from every other region on the router (the observer still reaches both sides).
pub fn partition(net: u8, ri: usize) -> Result<()> {
    let own = format!("{}/24", host_ip(Hosts::Netns, net, ri, 0));
    let lab = format!("10.{net}.0.0/16");
    let observer = format!("10.{net}.0.0/24");
    let t = PARTITION_TABLE;
    let mut script = format!(
        "table inet {t}\nadd chain inet {t} forward {{ type filter hook forward priority -10; policy accept; }}\n"
    );
    script.push_str(&format!(
        "add rule inet {t} forward ip saddr {own} ip daddr {lab} ip daddr != {{ {own}, {observer} }} drop\n"
    ));
    script.push_str(&format!(
        "add rule inet {t} forward ip daddr {own} ip saddr {lab} ip saddr != {{ {own}, {observer} }} drop\n"
    ));
    nft_in(&router(net), &script)
}

/// Whether the router has partition rules.
pub fn has_partition(net: u8) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &router(net), "nft", "list", "table", "inet", PARTITION_TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes every partition rule.
pub fn heal(net: u8) -> Result<()> {
    if has_partition(net) {
        nft_in(&router(net), &format!("delete table inet {PARTITION_TABLE}\n"))?;
    }
    Ok(())
}
