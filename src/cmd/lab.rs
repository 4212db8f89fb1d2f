use std::path::PathBuf;

use anyhow::Result;

use crate::lab::topology::LabShape;

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
    },
    /// Stop every process of the lab by pid and remove its directory.
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
    /// SIGKILL the processes of a node (agent and PostgreSQL) or of a whole region.
    Kill {
        /// A node or region name.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Start again what of a node or region is not running, and wait until it is back.
    Start {
        /// A node or region name.
        target: String,
        #[command(flatten)]
        dir: DirArg,
    },
}

pub async fn run(args: Args) -> Result<i32> {
    match args.command {
        Sub::Up { dir, net, regions, nodes_per_region } => {
            crate::lab::up(&dir.dir, &LabShape { net, regions, nodes_per_region }).await?
        }
        Sub::Down { dir } => crate::lab::down(&dir.dir).await?,
        Sub::Kill { target, dir } => crate::lab::kill(&dir.dir, &target).await?,
        Sub::Start { target, dir } => crate::lab::start(&dir.dir, &target).await?,
    }
    Ok(0)
}
