use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::ApiClient;
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
    /// can be taken while the cluster runs (exit 2 when refused; nothing changes then).
    Apply {
        file: PathBuf,
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
        Sub::Diff { file, json } => diff_or_apply(config, &file, false, json).await,
        Sub::Apply { file, json } => diff_or_apply(config, &file, true, json).await,
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

async fn diff_or_apply(config: &Path, file: &Path, apply: bool, json: bool) -> Result<i32> {
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
    let answer: PlanAnswer = if apply {
        let plan: PlanAnswer =
            client.post("/v1/config/plan", &PlanRequest { text: text.clone(), expect_version: None }, TIMEOUT).await?;
        let req = PlanRequest { text, expect_version: Some(plan.running_version) };
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
        client.post("/v1/config/plan", &PlanRequest { text, expect_version: None }, TIMEOUT).await?
    };
    let blocked = !answer.plan.refused.is_empty() || !answer.not_live.is_empty();
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
