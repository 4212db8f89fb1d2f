use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::client::ApiClient;
use crate::cluster::{human_bytes, HistoryEntry};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let history: Vec<HistoryEntry> = ApiClient::new(&config)?.get("/v1/history", Duration::from_secs(5)).await?;
    if args.json {
        println!("{}", serde_json::to_string(&history)?);
        return Ok(0);
    }
    if history.is_empty() {
        println!("no promotions yet");
        return Ok(0);
    }
    println!(
        "{:<6} {:<10} {:<18} {:<18} {:<20} {:>9} {:>9}  REASON",
        "EPOCH", "KIND", "FROM", "TO", "AT (UTC)", "DURATION", "LOST"
    );
    for h in &history {
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(h.finished_at_ms));
        println!(
            "{:<6} {:<10} {:<18} {:<18} {:<20} {:>8.1}s {:>9}  {}",
            h.epoch,
            h.kind.to_string(),
            h.from.as_deref().unwrap_or("-"),
            h.to,
            at.to_string().trim_end_matches('Z').replace('T', " "),
            h.finished_at_ms.saturating_sub(h.started_at_ms) as f64 / 1000.0,
            h.lost_bytes_estimate.map(human_bytes).unwrap_or_else(|| "-".into()),
            h.reason
        );
    }
    Ok(0)
}
