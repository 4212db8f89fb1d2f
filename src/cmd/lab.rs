use std::path::PathBuf;

use anyhow::Result;

use crate::config::{FailoverConfig, FailoverMode, LagBudget};
use crate::lab::topology::LabShape;

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
    /// The lab's directory (config, data, logs, pids).
    #[arg(long, default_value = ".meridian-lab")]
    dir: PathBuf,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Write a cluster file and start etcd, agents and gateways; return once healthy.
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// Second octet of the lab's loopback addresses (127.NET.REGION.HOST).
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
    /// Cut a region off from every other region (root: cgroup v2 + nftables).
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
    /// SIGCONT what `freeze` stopped (agent:NODE or postgres:NODE).
    Thaw {
        /// agent:NODE or postgres:NODE.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Start again what of a node or region is not running, and wait until it is back.
    Start {
        /// A node or region name, or etcd:REGION / gateway:REGION.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
}

pub async fn run(args: Args) -> Result<i32> {
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
        } => {
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
            };
            crate::lab::up(&dir.dir, &shape).await?
        }
        Sub::Down { dir } => crate::lab::down(&dir.dir).await?,
        Sub::Kill { target, dir } => crate::lab::kill(&dir.dir, &target).await?,
        Sub::Start { target, dir } => crate::lab::start(&dir.dir, &target).await?,
        Sub::Partition { region, dir } => crate::lab::partition(&dir.dir, &region).await?,
        Sub::Heal { dir } => crate::lab::heal(&dir.dir).await?,
        Sub::Freeze { target, dir } => crate::lab::freeze(&dir.dir, &target).await?,
        Sub::Thaw { target, dir } => crate::lab::thaw(&dir.dir, &target).await?,
        Sub::Skew { node, offset, dir } => crate::lab::skew(&dir.dir, &node, &offset).await?,
    }
    Ok(0)
}
