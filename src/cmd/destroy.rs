//! `meridian destroy`: remove a stopped cluster (see `crate::destroy`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Also delete every backup and archived WAL file of the cluster, in every repository.
    #[arg(long)]
    repositories: bool,
    /// Do not ask for the cluster's name.
    #[arg(long)]
    yes: bool,
    /// A directory with a client certificate for etcd (`tls.crt`, `tls.key`, `ca.crt`;
    /// `meridian ca issue --user NAME`). Default: `<tls dir>/user-lab`, the lab's.
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config_path)?;
    let identity = match args.identity {
        Some(dir) => crate::tls::Identity {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            dir,
        },
        None => config.tls_identity(crate::lab::LAB_IDENTITY),
    };
    let coord = crate::coord::Coord::connect(&config, &identity).await?;
    let plan = crate::destroy::plan(&config, &coord, args.repositories).await?;
    if !args.json {
        println!("this removes cluster {:?} for good:", plan.cluster);
        println!("  every key under its etcd prefixes");
        for d in &plan.directories {
            println!("  {}", d.display());
        }
        for r in &plan.repositories {
            println!("  every backup and archived WAL file in repository {r}");
        }
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("destroy asks for the cluster's name on a terminal; pass --yes to run it without");
        }
        eprint!("type the cluster's name ({}) to go on: ", plan.cluster);
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != plan.cluster {
            bail!("{:?} is not the cluster's name; nothing was removed", line.trim());
        }
    }
    let mut progress = crate::progress::Progress::new();
    let done = match crate::destroy::run(&config, &coord, plan, &mut progress).await {
        Ok(d) => d,
        Err(e) => {
            progress.fail();
            return Err(e);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "destroyed cluster {}: {} directories, {} repositories, {} etcd keys",
            done.cluster,
            done.directories.len(),
            done.repositories.len(),
            done.etcd_keys
        );
    }
    Ok(0)
}
