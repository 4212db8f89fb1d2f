use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::client::ApiClient;
use crate::gateway::verify::VerifyReport;

#[derive(clap::Args)]
pub struct Args {
    /// How long every replica may take to show the marker.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let client = ApiClient::new(&config)?;
    let body = serde_json::json!({ "timeout_ms": args.timeout.as_millis() as u64 });
    let report: VerifyReport = client.post("/v1/verify", &body, args.timeout + Duration::from_secs(10)).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("marker {} written on {} at {}", report.marker, report.primary, report.lsn);
        for r in &report.replicas {
            match (r.catch_up_ms, &r.error) {
                (Some(ms), _) => println!("  {:<20} {:<16} caught up in {ms:.1} ms", r.name, r.region),
                (None, Some(e)) => println!("  {:<20} {:<16} BEHIND: {e}", r.name, r.region),
                (None, None) => println!("  {:<20} {:<16} BEHIND", r.name, r.region),
            }
        }
    }
    if report.ok {
        Ok(0)
    } else {
        let behind: Vec<&str> = report.replicas.iter().filter(|r| !r.caught_up).map(|r| r.name.as_str()).collect();
        eprintln!(
            "error: replication not verified: {} did not show the marker within {:?}",
            behind.join(", "),
            args.timeout
        );
        Ok(super::EXIT_PROBLEMS)
    }
}
