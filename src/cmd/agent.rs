use std::path::Path;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The node this agent owns, as named in the cluster file.
    #[arg(long)]
    node: String,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    crate::agent::run(config, &args.node, super::shutdown_on_signal()).await?;
    Ok(0)
}
