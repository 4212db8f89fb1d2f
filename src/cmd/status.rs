use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::client::ApiClient;
use crate::cluster::ClusterStatus;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// Redraw every second until interrupted.
    #[arg(long)]
    watch: bool,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let client = ApiClient::new(&config)?;
    loop {
        let status: ClusterStatus = client.get("/v1/cluster", Duration::from_secs(5)).await?;
        if args.json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            if args.watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", status.render());
        }
        if !args.watch {
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
