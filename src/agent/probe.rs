//! The primary probes its own server: a hung primary is replaced.
//!
//! A primary whose processes are stopped, or stuck on their storage, takes no
//! writes, yet its agent keeps renewing the lease from its own task, so
//! nobody else may be promoted: every client waits for as long as the hang
//! lasts. So while the server runs read-write, this task checks every half
//! second that the server answers a query (over the agent's own socket) and
//! that the data directory's file system takes a write and an fsync (a small
//! file beside the data directory). When a check does not finish within
//! `failover.primary_probe_timeout` (default half the lease TTL), the server
//! counts as hung: the supervisor stops it at once (SIGQUIT, then SIGKILL of
//! every process a moment later), the agent stops renewing its lease so
//! `leader` expires even if nothing else works, and the HA loop releases
//! `leader` as soon as the server is gone, so a standby takes over without
//! waiting for the lease.
//!
//! The probe writes no WAL: a probe transaction would make a partitioned
//! primary's WAL run ahead of its synchronous standby's, and a commit that
//! waited for that standby would take a lost region for a hung disk.
//!
//! Only a timeout counts: a probe that fails fast (the server crashed or is
//! restarting) is the HA loop's business. And a probe that stops finishing at
//! all (its task starved) counts too, from the watchdog's own thread
//! (`watchdog`): the lease is renewed from a thread of its own, so it must not
//! outlive the only check that would give it up.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::watchdog::Watchdog;
use crate::postgres::Server;

const EVERY: Duration = Duration::from_millis(500);
const PROBE: &str = "SELECT 1";

/// Starts the probe; a hang is flagged in `watchdog.hung()`. Each verdict
/// short of the timeout is told to the watchdog, whose own thread takes a
/// probe that stops finishing for a hang too.
pub fn start(server: Server, watchdog: Watchdog, timeout: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        // A probe that fails fast is not a hang, but one that always fails
        // (the probe file cannot be written, say) would blind the probe: say so, once.
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            if !watchdog.is_armed() {
                client = None;
                continue;
            }
            let storage = server.probe_file();
            let probe = async {
                if client.is_none() {
                    client = Some(server.connect().await?);
                }
                let c = client.as_ref().expect("connected above");
                c.batch_execute(PROBE).await?;
                // A thread stuck here on a hung disk stays stuck; the server is fenced anyway.
                let written = tokio::task::spawn_blocking(move || write_and_sync(&storage)).await?;
                anyhow::Ok(written.err().map(|e| format!("{e:#}")))
            };
            let verdict = tokio::time::timeout(timeout, probe).await;
            if verdict.is_ok() {
                watchdog.probed();
            }
            match verdict {
                Ok(Ok(None)) => last_error = None,
                Ok(Ok(Some(e))) => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!("the primary's storage probe fails (so it cannot see a hung disk): {e}");
                        last_error = Some(e);
                    }
                }
                // The server is starting, stopping or crashed: the HA loop's business.
                Ok(Err(_)) => client = None,
                Err(_) => {
                    tracing::error!(
                        "the primary's server or its storage did not answer a probe within {timeout:?}: it is hung; stopping it and giving up leader"
                    );
                    watchdog.fence_hung();
                    client = None;
                }
            }
        }
    });
}

fn write_and_sync(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(b"meridian storage probe\n").with_context(|| format!("write {}", path.display()))?;
    f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    Ok(())
}
