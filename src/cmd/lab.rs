use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{FailoverConfig, FailoverMode, LagBudget};
use crate::lab::topology::{Hosts, LabShape};

fn parse_mode(s: &str) -> Result<FailoverMode, String> {
    match s {
        "automatic" => Ok(FailoverMode::Automatic),
        "manual" => Ok(FailoverMode::Manual),
        _ => Err(format!("{s:?} is neither automatic nor manual")),
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Args)]
struct DirArg {
    /// The lab's directory (config, data, logs, pids). Default: the directory
    /// of the cluster file (`--config` / `$MERIDIAN_CONFIG`) when it holds a
    /// lab, else ./.meridian-lab.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Where `lab up` puts a lab when no --dir is given.
const DEFAULT_DIR: &str = ".meridian-lab";

impl DirArg {
    /// The lab to act on: `--dir`, else the cluster file's directory if it is
    /// a lab (so `export MERIDIAN_CONFIG=<lab>/meridian.toml` is enough), else
    /// ./.meridian-lab.
    fn resolve(&self, config: &Path) -> PathBuf {
        if let Some(d) = &self.dir {
            return d.clone();
        }
        match config.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }) {
            Some(p) if crate::lab::is_lab(p) => p.to_path_buf(),
            _ => PathBuf::from(DEFAULT_DIR),
        }
    }
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Write a cluster file and start etcd, agents and gateways; return once healthy.
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// Second octet of the lab's addresses (127.NET.REGION.HOST; 10.NET.REGION.HOST with --hosts netns).
        #[arg(long, default_value_t = 0)]
        net: u8,
        /// Database regions, the first preferred for the primary; a witness is added below three.
        #[arg(long, value_delimiter = ',', default_value = "ap-south-1,ap-northeast-1")]
        regions: Vec<String>,
        #[arg(long, default_value_t = 1)]
        nodes_per_region: usize,
        /// failover.within_region in the lab's cluster file.
        #[arg(long, default_value = "automatic", value_parser = parse_mode)]
        within_region: FailoverMode,
        /// failover.cross_region in the lab's cluster file.
        #[arg(long, default_value = "automatic", value_parser = parse_mode)]
        cross_region: FailoverMode,
        /// failover.max_lag_on_failover: a size (16MB) or a duration (5s).
        #[arg(long, default_value = "16MB")]
        max_lag_on_failover: LagBudget,
        /// failover.lease_ttl.
        #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
        lease_ttl: std::time::Duration,
        /// The DR trigger object (file:///path or s3://bucket/key); default <dir>/dr/trigger.
        #[arg(long)]
        trigger_object: Option<String>,
        /// Also fail over to this region when the trigger object appears (failover.dr_trigger).
        #[arg(long)]
        dr_trigger_region: Option<String>,
        /// An S3-compatible endpoint for s3:// objects (credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
        #[arg(long)]
        s3_endpoint: Option<String>,
        /// [replication] synchronous: off, region or remote.
        #[arg(long, default_value = "off")]
        synchronous: crate::config::Synchronous,
        /// No [backup]: no archiving, no repositories, no lab S3 server.
        #[arg(long)]
        no_backup: bool,
        /// [replication] max_commit_lag: hold commits while no standby in another region is within this (5s).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_commit_lag: Option<std::time::Duration>,
        /// [proxy] pool_mode: session (a server connection per client) or transaction (per transaction).
        #[arg(long, default_value = "session")]
        pool_mode: crate::config::PoolMode,
        /// loopback: every process on its own loopback address in one network
        /// stack; netns: every process in its own network namespace (10.NET.REGION.HOST),
        /// a bridge per region and a router between them (root, iproute2, nftables).
        #[arg(long, value_enum, default_value_t = Hosts::Loopback)]
        hosts: Hosts,
        /// netns: one-way delay between regions (40ms: a round trip takes 80ms), by a relay on the router.
        #[arg(long)]
        wan_latency: Option<String>,
        /// netns: each packet's delay varies by up to this much (never reordered).
        #[arg(long, requires = "wan_latency")]
        wan_jitter: Option<String>,
        /// netns: the share of packets between regions dropped (0.5%).
        #[arg(long, requires = "wan_latency")]
        wan_loss: Option<String>,
    },
    /// Stop every process of the lab by pid and remove its directory.
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
    /// SIGKILL the processes of a node (agent and PostgreSQL) or of a whole region.
    Kill {
        /// A node or region name, or etcd:REGION / gateway:REGION for just that process.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Cut a region off from every other region (root: cgroup v2 + nftables; netns: nftables on the router).
    Partition {
        region: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Remove every partition.
    Heal {
        #[command(flatten)]
        dir: DirArg,
    },
    /// SIGSTOP a node's agent (agent:NODE) or its PostgreSQL with every child (postgres:NODE): a hang, not a death.
    Freeze {
        /// agent:NODE or postgres:NODE.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Restart a node's agent with its wall clock OFFSET off (libfaketime; +30s, -30s; 0 to undo).
    Skew {
        node: String,
        /// +30s, -1m, ... or 0.
        #[arg(allow_hyphen_values = true)]
        offset: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// The lab's S3 server: moto behind a TLS front (started by `lab up`).
    #[command(hide = true)]
    S3 {
        #[arg(long)]
        port: u16,
        /// The server's certificate and key (`D/tls/repository-<name>`).
        #[arg(long)]
        identity_dir: PathBuf,
        /// Listen on this address too (the netns lab's observer link), beside 127.0.0.1.
        #[arg(long)]
        also_listen: Option<std::net::IpAddr>,
    },
    /// The netns lab's WAN relay: delays packets between regions (started by `lab up` in the router namespace).
    #[command(hide = true)]
    WanRelay {
        #[command(flatten)]
        dir: DirArg,
    },
    /// SIGCONT what `freeze` stopped (agent:NODE or postgres:NODE).
    Thaw {
        /// agent:NODE or postgres:NODE.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Add a node to REGION while the cluster runs: writes D/meridian.next.toml
    /// (the next letter, the lab's addresses, a health check) and applies it as
    /// `config apply` does, waiting until the node has cloned and streams.
    AddNode {
        region: String,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Remove NODE while the cluster runs: writes D/meridian.next.toml without
    /// it and applies it; the node drains, stops and keeps its data unless --purge.
    RemoveNode {
        node: String,
        #[arg(long)]
        purge: bool,
        /// If it holds the primary, switch over to a node that stays first.
        #[arg(long)]
        switchover: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Add region NAME while the cluster runs: its etcd member (a learner until
    /// caught up), its gateway and --nodes nodes on the lab's next addresses;
    /// writes D/meridian.next.toml and applies it.
    AddRegion {
        name: String,
        /// Database nodes (0: a witness region).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Remove region NAME while the cluster runs: its nodes leave (data kept
    /// unless --purge), its etcd member is removed, its gateway and etcd stop.
    RemoveRegion {
        name: String,
        #[arg(long)]
        purge: bool,
        /// If it holds the primary, switch over to a node that stays first.
        #[arg(long)]
        switchover: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Start again what of a node or region is not running, and wait until it is back.
    Start {
        /// A node or region name, or etcd:REGION / gateway:REGION.
        target: String,
        /// Return once the processes run, without waiting until they are back
        /// (a node that may rightly stay unhealthy, e.g. waiting for an operator).
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        dir: DirArg,
    },
}

pub async fn run(args: Args, config: &Path) -> Result<i32> {
    match args.command {
        Sub::Up {
            dir,
            net,
            regions,
            nodes_per_region,
            within_region,
            cross_region,
            max_lag_on_failover,
            lease_ttl,
            trigger_object,
            dr_trigger_region,
            s3_endpoint,
            synchronous,
            no_backup,
            max_commit_lag,
            pool_mode,
            hosts,
            wan_latency,
            wan_jitter,
            wan_loss,
        } => {
            let wan = wan_latency
                .as_deref()
                .map(|l| crate::lab::wan::Wan::parse(l, wan_jitter.as_deref(), wan_loss.as_deref()))
                .transpose()?;
            let failover = FailoverConfig {
                lease_ttl,
                within_region,
                cross_region,
                max_lag_on_failover,
                dr_trigger: None,
                primary_probe_timeout: None,
            };
            let shape = LabShape {
                net,
                regions,
                nodes_per_region,
                failover,
                trigger_object,
                dr_trigger_region,
                s3_endpoint,
                synchronous,
                backup: !no_backup,
                max_commit_lag,
                pool_mode,
                hosts,
                wan,
            };
            // A new lab goes where --dir says, never where an old cluster file points.
            crate::lab::up(dir.dir.as_deref().unwrap_or(Path::new(DEFAULT_DIR)), &shape).await?
        }
        Sub::Down { dir } => crate::lab::down(&dir.resolve(config)).await?,
        Sub::Kill { target, dir } => crate::lab::kill(&dir.resolve(config), &target).await?,
        Sub::Start { target, no_wait, dir } => crate::lab::start(&dir.resolve(config), &target, !no_wait).await?,
        Sub::Partition { region, dir } => crate::lab::partition(&dir.resolve(config), &region).await?,
        Sub::Heal { dir } => crate::lab::heal(&dir.resolve(config)).await?,
        Sub::Freeze { target, dir } => crate::lab::freeze(&dir.resolve(config), &target).await?,
        Sub::Thaw { target, dir } => crate::lab::thaw(&dir.resolve(config), &target).await?,
        Sub::S3 { port, identity_dir, also_listen } => {
            let name = identity_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let identity = crate::tls::Identity { name, dir: identity_dir };
            let python = Path::new(crate::lab::MOTO_PYTHON);
            crate::lab::s3::serve(port, also_listen, &identity, python, super::shutdown_on_signal()).await?
        }
        Sub::WanRelay { dir } => {
            let lab = crate::lab::Lab::open(&dir.resolve(config))?;
            let wan = lab.network.wan.context("this lab has no WAN (lab up --hosts netns --wan-latency ...)")?;
            // Blocking reads and a writer thread: off the async runtime.
            tokio::task::spawn_blocking(move || crate::lab::wan::relay(crate::lab::netns::WAN_DEVICE, wan)).await??
        }
        Sub::Skew { node, offset, dir } => crate::lab::skew(&dir.resolve(config), &node, &offset).await?,
        Sub::AddNode { region, no_wait, json, dir } => {
            let dir = dir.resolve(config);
            crate::lab::membership::can_add_hosts(&dir)?;
            let change = |c: &mut _, d: &_| crate::lab::membership::add_node(c, d, &region).map(|_| ());
            return change_lab(&dir, change, false, no_wait, false, json).await;
        }
        Sub::AddRegion { name, nodes, no_wait, json, dir } => {
            let dir = dir.resolve(config);
            crate::lab::membership::can_add_hosts(&dir)?;
            let change = |c: &mut _, d: &_| crate::lab::membership::add_region(c, d, &name, nodes);
            return change_lab(&dir, change, false, no_wait, false, json).await;
        }
        Sub::RemoveRegion { name, purge, switchover, no_wait, json, dir } => {
            let change = |c: &mut _, _: &_| crate::lab::membership::remove_region(c, &name);
            return change_lab(&dir.resolve(config), change, purge, no_wait, switchover, json).await;
        }
        Sub::RemoveNode { node, purge, switchover, no_wait, json, dir } => {
            let change = |c: &mut _, _: &_| crate::lab::membership::remove_node(c, &node);
            return change_lab(&dir.resolve(config), change, purge, no_wait, switchover, json).await;
        }
    }
    Ok(0)
}

/// Writes D/meridian.next.toml (the lab's file changed by `change`) and applies it.
async fn change_lab(
    dir: &Path,
    change: impl FnOnce(&mut crate::config::Config, &Path) -> Result<()>,
    purge: bool,
    no_wait: bool,
    switchover: bool,
    json: bool,
) -> Result<i32> {
    let (config, next) = crate::lab::membership::next_file(dir, change)?;
    let wait = (!no_wait).then_some(std::time::Duration::from_secs(600));
    super::config::apply(&config, &next, purge, wait, switchover, json).await
}
