use std::path::Path;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The region this gateway serves, as named in the cluster file.
    #[arg(long)]
    region: String,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    crate::gateway::run(config, &args.region, super::shutdown_on_signal()).await?;
    Ok(0)
}
