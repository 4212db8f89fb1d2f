use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::client::ApiClient;
use crate::gateway::api::HealthStatus;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

/// `meridian health`: every check's aggregate and each observer's verdict.
pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let status: HealthStatus = ApiClient::new(&config)?.get("/v1/health", Duration::from_secs(5)).await?;
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(0)
}

pub fn render(s: &HealthStatus) -> String {
    let mut out = String::new();
    for c in &s.certificates {
        if let Some(w) = &c.warning {
            let _ = writeln!(out, "WARNING: the certificate of {} {w}", c.subject);
        }
    }
    if s.checks.is_empty() {
        out.push_str("no health checks are configured ([[health.check]] in the cluster file)\n");
        return out;
    }
    let _ = writeln!(out, "{:<24} {:<14} {:<10} WHY", "CHECK", "KIND", "STATUS");
    for c in &s.checks {
        let kind = c.kind.to_string();
        let status = match (c.pending, c.healthy) {
            (true, _) => "pending",
            (false, true) => "healthy",
            (false, false) => "UNHEALTHY",
        };
        let _ = writeln!(out, "{:<24} {:<14} {:<10} {}", c.name, kind, status, c.reason);
        for o in &c.observers {
            let verdict = match (o.pending, o.healthy) {
                (true, _) => "pending",
                (false, true) => "healthy",
                (false, false) => "unhealthy",
            };
            let _ = writeln!(out, "  {:<22} {:<14} {:<10} {}", format!("from {}", o.observer), "", verdict, o.detail);
        }
    }
    out
}
