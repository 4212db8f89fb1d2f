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
    match crate::process::raise_open_files_limit() {
        Ok(n) if n < 4096 => tracing::warn!(
            "this process may open only {n} files (RLIMIT_NOFILE): fewer clients than max_client_conn may connect; raise LimitNOFILE"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("failed to {e:#}"),
    }
    crate::gateway::run(config, &args.region, super::shutdown_on_signal()).await?;
    Ok(0)
}
