use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// PostgreSQL's archive_command (run in the data directory): a primary
    /// pushes FILE to every repository; a standby (standby.signal) succeeds
    /// once every repository holds it, keeping what they lack; a stopping
    /// server fails at once and keeps the file. See docs/backup.md.
    Archive {
        /// The pgBackRest program.
        #[arg(long, default_value = "/usr/bin/pgbackrest")]
        pgbackrest: PathBuf,
        /// The node's rendered pgBackRest configuration.
        #[arg(long)]
        pgbackrest_config: PathBuf,
        #[arg(long)]
        stanza: String,
        /// The WAL file's path (PostgreSQL's %p).
        path: PathBuf,
        /// The WAL file's name (PostgreSQL's %f).
        file: String,
    },
}

/// How long a standby waits for the primary's push before PostgreSQL is told
/// to try later: the primary usually pushes within a second of the standby
/// receiving the segment, and each failure is a WARNING in the server's log.
const PATIENCE: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> Result<i32> {
    match args.command {
        Sub::Archive { pgbackrest, pgbackrest_config, stanza, path, file } => {
            // PostgreSQL's archiver is the parent: when it dies, so does this (and pgBackRest after exec).
            crate::process::die_with_parent()?;
            let here = Path::new(".");
            // A stopping server's archiver runs a last pass over every file and
            // waits for it. Nothing needs that pass: a standby that streamed the
            // files holds them and pushes them if promoted, and a restarted server
            // pushes them then. So a stop (a switchover's) is not held by a push.
            if crate::postgres::postmaster_stopping(here) {
                anyhow::bail!("the server is shutting down; {file} stays in pg_wal for its next start");
            }
            if !here.join("standby.signal").exists() {
                return Err(push(&pgbackrest, &pgbackrest_config, &stanza, &path));
            }
            let deadline = Instant::now() + PATIENCE;
            let (conf, st) = (pgbackrest_config.clone(), stanza.clone());
            let bin = pgbackrest.clone();
            let waited = tokio::task::spawn_blocking(move || loop {
                if crate::postgres::postmaster_stopping(here) {
                    anyhow::bail!("the server is shutting down; {file} is kept for its next start");
                }
                // Promoted while waiting: nobody else will push it now. Before
                // this, a promoted node's archiver sat out the rest of the wait
                // on a file its old primary had not pushed, and its backlog
                // (the history file too) waited behind it.
                if !here.join("standby.signal").exists() {
                    return Ok(false);
                }
                match crate::backup::held(&bin, &conf, &st, &file) {
                    Ok(()) => return Ok(true),
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => {
                        // Look again in a second; a stop or a promotion is noticed within a tenth of one.
                        let next = Instant::now() + Duration::from_secs(1);
                        while Instant::now() < next
                            && !crate::postgres::postmaster_stopping(here)
                            && here.join("standby.signal").exists()
                        {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .await??;
            if waited {
                return Ok(0);
            }
            Err(push(&pgbackrest, &pgbackrest_config, &stanza, &path))
        }
    }
}

/// Becomes `pgbackrest archive-push PATH` (exec: its exit status is PostgreSQL's answer).
fn push(pgbackrest: &Path, conf: &Path, stanza: &str, path: &Path) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let include = conf.parent().map(crate::backup::pgbackrest::include_path).unwrap_or_default();
    let e = std::process::Command::new(pgbackrest)
        .arg(format!("--config={}", conf.display()))
        .arg(format!("--config-include-path={}", include.display()))
        .arg(format!("--stanza={stanza}"))
        .arg("archive-push")
        .arg(path)
        .exec();
    anyhow::Error::new(e).context(format!("exec {}", pgbackrest.display()))
}
