//! `switchover` and `failover`: operator actions carried out through a gateway.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::client::ApiClient;
use crate::cluster::human_bytes;
use crate::gateway::operations::OperationReport;

#[derive(clap::Args)]
pub struct SwitchoverArgs {
    /// The replica that becomes primary.
    #[arg(long)]
    to: String,
    /// How long the target may take to catch up before the switchover is called off.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// The region to make active; its most advanced standby is promoted.
    #[arg(long)]
    to_region: String,
    /// Promote even when the standby is beyond the data-loss budget.
    #[arg(long)]
    allow_data_loss: bool,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
}

pub async fn switchover(config: &Path, args: SwitchoverArgs) -> Result<i32> {
    let config = super::load_config(config)?;
    let body = serde_json::json!({ "to": args.to, "timeout_ms": args.timeout.as_millis() as u64 });
    let report: OperationReport =
        ApiClient::new(&config)?.act("/v1/switchover", &body, args.timeout + Duration::from_secs(20)).await?;
    print_report(&report, args.json)
}

pub async fn failover(config: &Path, args: FailoverArgs) -> Result<i32> {
    let config = super::load_config(config)?;
    let body = serde_json::json!({
        "region": args.to_region,
        "allow_data_loss": args.allow_data_loss,
        "timeout_ms": args.timeout.as_millis() as u64,
    });
    let report: OperationReport =
        ApiClient::new(&config)?.act("/v1/failover", &body, args.timeout + Duration::from_secs(20)).await?;
    print_report(&report, args.json)
}

fn print_report(r: &OperationReport, json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(0);
    }
    for s in &r.steps {
        println!("  {:>7.2}s  {}", s.ms as f64 / 1000.0, s.step);
    }
    println!(
        "{} done: {} -> {} in epoch {}, {:.2}s, estimated loss {}",
        r.kind,
        r.from.as_deref().unwrap_or("-"),
        r.to,
        r.epoch,
        r.total_ms as f64 / 1000.0,
        human_bytes(r.lost_bytes_estimate)
    );
    Ok(0)
}
