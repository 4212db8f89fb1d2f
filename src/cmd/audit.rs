//! `meridian audit`: who did what to the cluster, from the audit log in etcd.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::auth::AuditEntry;
use crate::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    /// Only entries of the last D (`1h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    limit: i64,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let since_ms = args.since.map(|d| now.saturating_sub(d).as_millis() as u64).unwrap_or(0);
    let path = format!("/v1/audit?since_ms={since_ms}&limit={}", args.limit);
    let entries: Vec<AuditEntry> = ApiClient::new(&config)?.get(&path, Duration::from_secs(10)).await?;
    if args.json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(0);
    }
    if entries.is_empty() {
        println!("no audit entries");
        return Ok(0);
    }
    println!(
        "{:<24} {:<22} {:<9} {:<22} {:<24} {:<16} {:>5}  RESULT",
        "TIME (UTC)", "WHO", "ROLE", "FROM", "ACTION", "TARGET", "EPOCH"
    );
    for e in &entries {
        let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(e.time_ms)).to_string();
        println!(
            "{:<24} {:<22} {:<9} {:<22} {:<24} {:<16} {:>5}  {}",
            at.trim_end_matches('Z').replace('T', " "),
            e.who,
            e.role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            e.source.as_deref().unwrap_or("-"),
            e.action,
            e.target.as_deref().unwrap_or("-"),
            e.epoch.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            e.result
        );
    }
    Ok(0)
}
