use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Validate a cluster file and list every problem with where it is (exit 2 when there are any).
    Check {
        /// The file to check.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args) -> Result<i32> {
    let Sub::Check { file, json } = args.command;
    let text = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
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
