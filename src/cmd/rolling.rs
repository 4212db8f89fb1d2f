//! `meridian rolling-restart`: every PostgreSQL restarted one at a time,
//! replicas first, then a switchover, then the old primary (`crate::rolling`
//! plans the order; each step goes through a gateway: `/v1/restart`,
//! `/v1/switchover`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::client::ApiClient;
use crate::cluster::ClusterStatus;
use crate::config::Config;
use crate::coord::PublishedConfig;
use crate::gateway::operations::OperationReport;
use crate::progress::Progress;
use crate::rolling::{self, Step};

#[derive(clap::Args)]
pub struct Args {
    /// Why, for the agents' logs and the audit log (a setting, a package upgrade).
    #[arg(long, default_value = "rolling restart")]
    reason: String,
    /// Restart only nodes that report a pending restart (settings published
    /// by `config apply`, or a newer PostgreSQL installed); the primary's node
    /// (and its switchover) only if it reports one.
    #[arg(long)]
    only_pending: bool,
    /// How long one node may take to restart and stream again.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    node_timeout: Duration,
    /// How long the switchover target may take to catch up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    switchover_timeout: Duration,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    plan: Vec<Step>,
    done: Vec<OperationReport>,
    primary_before: String,
    primary_after: Option<String>,
    total_ms: u64,
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let api = ApiClient::new(&config)?;
    let status: ClusterStatus = api.get("/v1/cluster", Duration::from_secs(10)).await?;
    // The regions' priorities as the cluster runs them (the local file may be older).
    let running = match api.get::<PublishedConfig>("/v1/config", Duration::from_secs(10)).await {
        Ok(p) => Config::parse(&p.text).config.unwrap_or(config.clone()),
        Err(_) => config.clone(),
    };
    let priorities = running.regions.iter().filter_map(|r| Some((r.name.clone(), r.priority?))).collect();
    let plan = match rolling::plan(&status, &priorities, args.only_pending) {
        Ok(p) => p,
        Err(why) => bail!("rolling restart refused: {why}"),
    };
    let primary_before = status.primary.clone().unwrap_or_default();
    if args.dry_run || plan.is_empty() {
        if args.json {
            let r = Report { plan, done: vec![], primary_before, primary_after: status.primary, total_ms: 0 };
            println!("{}", serde_json::to_string(&r)?);
        } else if plan.is_empty() {
            println!("nothing to restart: no node reports a pending restart");
        } else {
            for (i, s) in plan.iter().enumerate() {
                println!("{:>2}. {s}", i + 1);
            }
        }
        return Ok(0);
    }
    let started = Instant::now();
    let mut progress = Progress::new();
    let mut done = Vec::new();
    for (i, step) in plan.iter().enumerate() {
        progress.step(format!("[{}/{}] {step}", i + 1, plan.len()));
        let result: Result<OperationReport> = match step {
            Step::Restart { node } => {
                let body = serde_json::json!({
                    "node": node,
                    "reason": args.reason,
                    "timeout_ms": args.node_timeout.as_millis() as u64,
                });
                api.act("/v1/restart", &body, args.node_timeout + Duration::from_secs(20)).await
            }
            Step::Switchover { to } => {
                let body = serde_json::json!({ "to": to, "timeout_ms": args.switchover_timeout.as_millis() as u64 });
                api.act("/v1/switchover", &body, args.switchover_timeout + Duration::from_secs(20)).await
            }
        };
        match result {
            Ok(r) => {
                progress.done();
                done.push(r);
            }
            Err(e) => {
                progress.fail();
                bail!(
                    "rolling restart stopped at step {} of {} ({step}): {e:#}\n\
                     done so far: {}; run `meridian rolling-restart --only-pending` to finish once the cause is fixed",
                    i + 1,
                    plan.len(),
                    if done.is_empty() {
                        "nothing".to_string()
                    } else {
                        plan[..i].iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                    }
                );
            }
        }
    }
    let after: Option<ClusterStatus> = api.get("/v1/cluster", Duration::from_secs(10)).await.ok();
    let primary_after = after.and_then(|s| s.primary);
    let total_ms = started.elapsed().as_millis() as u64;
    if args.json {
        let r = Report { plan, done, primary_before, primary_after, total_ms };
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for r in &done {
            let what = match r.kind.as_str() {
                "switchover" => format!("switchover {} -> {}", r.from.as_deref().unwrap_or("-"), r.to),
                _ => format!("restart {}", r.to),
            };
            println!("  {:>7.2}s  {what}", r.total_ms as f64 / 1000.0);
        }
        println!(
            "rolling restart done: {} step(s) in {:.1}s; primary {primary_before} before, {} now",
            done.len(),
            total_ms as f64 / 1000.0,
            primary_after.as_deref().unwrap_or("unknown")
        );
    }
    Ok(0)
}
