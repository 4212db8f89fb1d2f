use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Succeed once every repository holds FILE (a standby's archive_command:
    /// it keeps the WAL the repositories lack until they have it). Never pushes.
    Held {
        /// The pgBackRest program.
        #[arg(long, default_value = "/usr/bin/pgbackrest")]
        pgbackrest: PathBuf,
        /// The node's rendered pgBackRest configuration.
        #[arg(long)]
        pgbackrest_config: PathBuf,
        #[arg(long)]
        stanza: String,
        /// The WAL file's name (PostgreSQL's %f).
        file: String,
    },
}

/// How long `held` waits for the primary's push before PostgreSQL is told to
/// try later: the primary usually pushes within a second of the standby receiving
/// the segment, and each failure is a WARNING in the server's log.
const PATIENCE: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> Result<i32> {
    match args.command {
        Sub::Held { pgbackrest, pgbackrest_config, stanza, file } => {
            let deadline = Instant::now() + PATIENCE;
            tokio::task::spawn_blocking(move || loop {
                match crate::backup::held(&pgbackrest, &pgbackrest_config, &stanza, &file) {
                    Ok(()) => return Ok(0),
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_secs(1)),
                }
            })
            .await?
        }
    }
}
