use std::path::Path;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The region this gateway serves, as named in the cluster file.
    #[arg(long)]
    region: String,
    /// Worker threads of the SQL proxy's writer and reader ports. One, as
    /// PgBouncer: two workers wake each other for one another's sockets,
    /// which cost more per transaction than the second thread gains; raise
    /// it on a host whose gateway `proxy` thread is busy all the time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    proxy_threads: u16,
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
    crate::gateway::run(config, &args.region, args.proxy_threads.into(), super::shutdown_on_signal()).await?;
    Ok(0)
}
