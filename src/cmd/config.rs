use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::ApiClient;
use crate::config::change::Cost;
use crate::config::Config;
use crate::coord::PublishedConfig;
use crate::gateway::config_api::{PlanAnswer, PlanRequest};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Print the cluster file that runs (published with `config apply`, else
    /// the one the gateways started with, as version 0).
    Show {
        /// A published version instead of the running one.
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// What replacing the running cluster file with FILE would change, what
    /// each change costs, and what would be refused (exit 2 if anything is).
    Diff {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Publish FILE as the running cluster file, if every change is safe and
    /// can be taken while the cluster runs (exit 2 when refused; nothing changes
    /// then), and wait until every agent runs by it: joining nodes cloned and
    /// streaming, leaving nodes drained and gone. In a lab, also starts the
    /// agents of joining nodes (on machines, start their units: docs/deploy.md).
    Apply {
        file: PathBuf,
        /// Nodes the file removes empty their data directories once they have left.
        #[arg(long)]
        purge: bool,
        /// Return once published, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// When the file removes the primary's node (or region), switch over
        /// first to a healthy replica the file keeps (its region's, else the
        /// preferred region's), then apply.
        #[arg(long)]
        switchover: bool,
        /// How long to wait for every agent (a joining node copies the whole database).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Validate a cluster file and list every problem with where it is (exit 2 when there are any).
    Check {
        /// The file to check.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    match args.command {
        Sub::Check { file, json } => check(&file, json),
        Sub::Show { version, json } => show(config, version, json).await,
        Sub::Diff { file, json } => diff_or_apply(config, &file, None, json).await,
        Sub::Apply { file, purge, no_wait, switchover, timeout, json } => {
            let opts = ApplyOptions { purge, wait: (!no_wait).then_some(timeout), switchover };
            diff_or_apply(config, &file, Some(opts), json).await
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(20);

async fn show(config: &Path, version: Option<u64>, json: bool) -> Result<i32> {
    let config = super::load_config(config)?;
    let path = match version {
        Some(v) => format!("/v1/config?version={v}"),
        None => "/v1/config".to_string(),
    };
    let shown: PublishedConfig = ApiClient::new(&config)?.get(&path, TIMEOUT).await?;
    if json {
        println!("{}", serde_json::to_string(&shown)?);
        return Ok(0);
    }
    if shown.version == 0 {
        println!("# version 0: {}", shown.applied_by);
    } else {
        println!(
            "# version {}, applied by {} at {} ({})",
            shown.version,
            shown.applied_by,
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(shown.at_ms)),
            shown.cost
        );
    }
    print!("{}", shown.text);
    Ok(0)
}

/// `config apply FILE` (also what `lab add-node` and `lab remove-node` run).
pub(super) async fn apply(
    config: &Path,
    file: &Path,
    purge: bool,
    wait: Option<Duration>,
    switchover: bool,
    json: bool,
) -> Result<i32> {
    diff_or_apply(config, file, Some(ApplyOptions { purge, wait, switchover }), json).await
}

struct ApplyOptions {
    purge: bool,
    /// How long to wait for every agent to run by the new version; None: do not wait.
    wait: Option<Duration>,
    /// Switch over first when the file removes the primary's node.
    switchover: bool,
}

/// With `--switchover`: when `new` no longer has the primary's node, moves
/// the primary to a healthy replica that `new` keeps (in the primary's region
/// if `new` keeps it, else in the region with the best priority), through
/// the gateway's planned switchover (no data lost).
async fn switch_over_first(client: &ApiClient, new: &Config, json: bool) -> Result<()> {
    let status: crate::cluster::ClusterStatus = client.get("/v1/cluster", TIMEOUT).await?;
    let Some(primary) = status.primary.clone() else { return Ok(()) };
    if new.node(&primary).is_ok() {
        return Ok(());
    }
    let home = status.nodes.iter().find(|n| n.name == primary).map(|n| n.region.clone()).unwrap_or_default();
    let priority = |region: &str| new.region(region).ok().and_then(|r| r.priority).unwrap_or(u32::MAX);
    let target = status
        .nodes
        .iter()
        .filter(|n| {
            n.name != primary && n.healthy && n.role == crate::cluster::Role::Replica && new.node(&n.name).is_ok()
        })
        .min_by_key(|n| (n.region != home, priority(&n.region), n.name.clone()))
        .map(|n| n.name.clone())
        .context("--switchover: no healthy replica that the new file keeps")?;
    if !json {
        eprintln!("the file removes {primary}, the primary: switching over to {target} first");
    }
    let body = serde_json::json!({ "to": target, "timeout_ms": 60_000 });
    let report: crate::gateway::operations::OperationReport =
        client.act("/v1/switchover", &body, Duration::from_secs(80)).await?;
    if !json {
        eprintln!("switched over {primary} -> {target} in {:.2}s", report.total_ms as f64 / 1000.0);
    }
    Ok(())
}

async fn diff_or_apply(config: &Path, file: &Path, apply: Option<ApplyOptions>, json: bool) -> Result<i32> {
    let config = super::load_config(config)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    // A file with problems goes nowhere: the same list `config check` prints.
    let checked = Config::parse(&text);
    if !checked.problems.is_empty() {
        if json {
            println!("{}", serde_json::json!({ "file": file, "ok": false, "problems": checked.problems }));
        } else {
            for p in &checked.problems {
                println!("{}: {p}", file.display());
            }
            eprintln!("{} problem(s) in {}; nothing changed", checked.problems.len(), file.display());
        }
        return Ok(super::EXIT_PROBLEMS);
    }
    let client = ApiClient::new(&config)?;
    let plan_request = PlanRequest { text: text.clone(), expect_version: None, purge: false };
    let answer: PlanAnswer = if let Some(opts) = &apply {
        if opts.switchover {
            if let Some(new) = checked.config.as_ref() {
                switch_over_first(&client, new, json).await?;
            }
        }
        let plan: PlanAnswer = client.post("/v1/config/plan", &plan_request, TIMEOUT).await?;
        let req = PlanRequest { text: text.clone(), expect_version: Some(plan.running_version), purge: opts.purge };
        match client.act("/v1/config", &req, TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                if json {
                    println!("{}", serde_json::json!({ "applied": false, "error": format!("{e:#}"), "plan": plan }));
                } else {
                    print_plan(&plan);
                    eprintln!("error: {e:#}");
                }
                return Ok(super::EXIT_PROBLEMS);
            }
        }
    } else {
        client.post("/v1/config/plan", &plan_request, TIMEOUT).await?
    };
    let blocked = !answer.plan.refused.is_empty() || !answer.not_live.is_empty();
    if let (Some(opts), Some(version)) = (&apply, answer.published) {
        if !json {
            print_plan(&answer);
            println!("published version {version}");
        }
        let in_force = take_effect(&config, &client, &text, version, &answer, opts).await;
        if json {
            let error = in_force.as_ref().err().map(|e| format!("{e:#}"));
            println!(
                "{}",
                serde_json::json!({ "applied": true, "answer": answer, "in_force": error.is_none(), "error": error })
            );
        }
        return match in_force {
            Ok(()) => Ok(0),
            // The JSON above says what is not in force.
            Err(_) if json => Ok(1),
            Err(e) => Err(e),
        };
    }
    if json {
        println!("{}", serde_json::to_string(&answer)?);
    } else {
        print_plan(&answer);
        match answer.published {
            Some(v) => println!("published version {v}; every agent takes it within a few seconds"),
            None if answer.plan.changes.is_empty() => println!("nothing to change: {} is what runs", file.display()),
            None if blocked => println!("apply would refuse this file; nothing changed"),
            None => println!("`meridian config apply {}` publishes it", file.display()),
        }
    }
    Ok(if blocked { super::EXIT_PROBLEMS } else { 0 })
}

/// After publishing: in a lab, install the file and start joining agents;
/// then wait (unless asked not to) until every node of the file runs by
/// `version` and is healthy, and no removed node still reports.
async fn take_effect(
    config: &Config,
    client: &ApiClient,
    text: &str,
    version: u64,
    answer: &PlanAnswer,
    opts: &ApplyOptions,
) -> Result<()> {
    let added = crate::config::change::added_nodes(&answer.plan);
    let removed = crate::config::change::removed_nodes(&answer.plan);
    let lab_dir = config.source.as_deref().and_then(Path::parent).filter(|d| crate::lab::is_lab(d));
    let leaving = match lab_dir {
        Some(dir) => {
            if !added.is_empty() {
                // Joining nodes start once the primary runs by the version: it then
                // admits their addresses and keeps their slots.
                wait_for_primary(client, version).await?;
            }
            let membership = crate::lab::membership::Membership {
                added: &added,
                removed: &removed,
                added_regions: &crate::config::change::added_regions(&answer.plan),
                removed_regions: &crate::config::change::removed_regions(&answer.plan),
            };
            Some(crate::lab::membership::take_file(dir, text, version, &membership)?)
        }
        None => {
            if let Some(crate::config::change::EtcdChange::Add { region, .. }) = &answer.etcd {
                eprintln!(
                    "start region {region}'s etcd member (`meridian deploy systemd --etcd {region} --joining`): it is a learner until it has caught up, then a gateway promotes it"
                );
            }
            for region in crate::config::change::added_regions(&answer.plan) {
                eprintln!("start region {region}'s gateway (`meridian deploy systemd --gateway {region}`)");
            }
            for region in crate::config::change::removed_regions(&answer.plan) {
                eprintln!("once its nodes have left, stop and disable region {region}'s gateway and etcd units");
            }
            if !added.is_empty() {
                eprintln!("start the agents of {} on their hosts (docs/deploy.md)", added.join(", "));
            }
            None
        }
    };
    let Some(timeout) = opts.wait else {
        // A lab never leaves a removed region's processes running unseen.
        if let Some(l) = leaving.as_ref().filter(|l| !l.region_processes.is_empty()) {
            crate::lab::membership::wait_left(l, Duration::from_secs(60)).await?;
        }
        return Ok(());
    };
    let started = std::time::Instant::now();
    let mut progress = crate::progress::Progress::new();
    let mut last = String::new();
    loop {
        let waiting = match client.get::<crate::cluster::ClusterStatus>("/v1/cluster", TIMEOUT).await {
            Ok(s) => {
                let mut w: Vec<String> = s
                    .nodes
                    .iter()
                    .filter(|n| n.config_version < version || !n.healthy)
                    .map(|n| match &n.detail {
                        Some(d) if added.contains(&n.name) => format!("{} joining ({d})", n.name),
                        Some(d) => format!("{} ({d})", n.name),
                        None => format!("{} (version {})", n.name, n.config_version),
                    })
                    .collect();
                w.extend(
                    s.leaving.iter().map(|n| format!("{} leaving ({})", n.name, n.detail.as_deref().unwrap_or("-"))),
                );
                w.extend(s.etcd_learners.iter().map(|l| format!("etcd member {l} (a learner, catching up)")));
                w.extend(
                    s.gateways
                        .iter()
                        .filter(|g| g.config_version < version)
                        .map(|g| format!("gateway {} (version {})", g.region, g.config_version)),
                );
                w
            }
            Err(e) => vec![format!("the gateway's status: {e:#}")],
        };
        if waiting.is_empty() {
            break;
        }
        let line = format!("waiting for {}", waiting.join(", "));
        if line != last {
            progress.step(line.clone());
            last = line;
        }
        if started.elapsed() > timeout {
            anyhow::bail!("version {version} is published but not in force after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(leaving) = &leaving {
        crate::lab::membership::wait_left(leaving, Duration::from_secs(30)).await?;
    }
    progress.done();
    eprintln!("version {version} in force on every node and gateway ({:.1}s)", started.elapsed().as_secs_f64());
    if answer.plan.cost() >= Cost::RollingRestart {
        let pending: Vec<String> = answer
            .plan
            .changes
            .iter()
            .filter(|c| c.cost == Cost::RollingRestart)
            .map(|c| c.path.trim_start_matches("postgres.settings.").to_string())
            .collect();
        if !pending.is_empty() {
            eprintln!(
                "{} take a restart: pending on every node until `meridian rolling-restart --only-pending`",
                pending.join(", ")
            );
        }
    }
    Ok(())
}

async fn wait_for_primary(client: &ApiClient, version: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s: crate::cluster::ClusterStatus = client.get("/v1/cluster", TIMEOUT).await?;
        let primary = s.primary.as_ref().and_then(|p| s.nodes.iter().find(|n| &n.name == p));
        if primary.is_some_and(|p| p.config_version >= version) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the primary does not run by version {version} after 60s; joining nodes not started");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_plan(a: &PlanAnswer) {
    println!("against the running version {}:", a.running_version);
    for c in &a.plan.changes {
        println!(
            "  {:<18} {}: {} -> {}",
            c.cost.to_string(),
            c.path,
            c.before.as_deref().unwrap_or("(none)"),
            c.after.as_deref().unwrap_or("(none)")
        );
    }
    println!("cost: {}", a.plan.cost());
    for r in &a.plan.refused {
        println!("refused: {r}");
    }
    for n in &a.not_live {
        println!("not applied: {n}");
    }
}

fn check(file: &Path, json: bool) -> Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let checked = Config::parse(&text);
    if json {
        println!(
            "{}",
            serde_json::json!({ "file": file, "ok": checked.problems.is_empty(), "problems": checked.problems })
        );
    } else if checked.problems.is_empty() {
        let c = checked.config.expect("a file without problems parses");
        println!(
            "{}: ok (cluster {:?}, {} regions, {} nodes)",
            file.display(),
            c.cluster,
            c.regions.len(),
            c.nodes().count()
        );
    } else {
        for p in &checked.problems {
            println!("{}: {p}", file.display());
        }
        eprintln!("{} problem(s) in {}", checked.problems.len(), file.display());
    }
    Ok(if checked.problems.is_empty() { 0 } else { super::EXIT_PROBLEMS })
}
