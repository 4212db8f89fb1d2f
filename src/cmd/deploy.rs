//! `meridian deploy systemd`: unit files for real machines (see `crate::deploy`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::deploy::{self, Paths, Unit};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Write the systemd unit of one process: an agent (--node), a gateway (--region) or an etcd member (--etcd).
    Systemd {
        /// The agent of this node.
        #[arg(long, group = "what")]
        node: Option<String>,
        /// The gateway of this region.
        #[arg(long, group = "what")]
        gateway: Option<String>,
        /// The etcd member of this region.
        #[arg(long, group = "what")]
        etcd: Option<String>,
        /// The etcd member joins a running cluster (its region was added with
        /// `region add` / `config apply`, which made it a learner).
        #[arg(long, requires = "etcd")]
        joining: bool,
        /// Where the meridian binary is on the machine.
        #[arg(long, default_value = "/usr/local/bin/meridian")]
        binary: PathBuf,
        /// Where etcd is (Debian's etcd-server).
        #[arg(long, default_value = "/usr/bin/etcd")]
        etcd_binary: PathBuf,
        /// etcd's data directory. Default: /var/lib/etcd/meridian-<cluster>.
        #[arg(long)]
        etcd_data_dir: Option<PathBuf>,
        /// The user the gateway runs as.
        #[arg(long, default_value = "meridian")]
        gateway_user: String,
        /// The user etcd runs as (Debian's etcd-server makes `etcd`).
        #[arg(long, default_value = "etcd")]
        etcd_user: String,
        /// Write DIR/<unit>.service (e.g. /etc/systemd/system) instead of printing it.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

pub fn run(config_path: &Path, args: Args) -> Result<i32> {
    let Sub::Systemd { node, gateway, etcd, joining, binary, etcd_binary, etcd_data_dir, gateway_user, etcd_user, out } =
        args.command;
    let config = super::load_config(config_path)?;
    let unit = match (node, gateway, etcd) {
        (Some(node), None, None) => Unit::Agent { node },
        (None, Some(region), None) => Unit::Gateway { region },
        (None, None, Some(region)) => Unit::Etcd { region, joining },
        _ => anyhow::bail!("say which process: --node NODE, --gateway REGION or --etcd REGION"),
    };
    let config_file = std::path::absolute(config_path).context("resolve the cluster file's path")?;
    let paths = Paths {
        meridian: binary,
        config_file,
        etcd: etcd_binary,
        etcd_data_dir: etcd_data_dir
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/etcd/meridian-{}", config.cluster))),
        gateway_user,
        etcd_user,
    };
    let text = deploy::unit_file(&config, &unit, &paths)?;
    match out {
        Some(dir) => {
            let path = deploy::write_unit(&dir, &unit, &text)?;
            println!("wrote {}", path.display());
            println!("next: systemctl daemon-reload && systemctl enable --now {}", unit.file_name());
        }
        None => print!("{text}"),
    }
    Ok(0)
}
