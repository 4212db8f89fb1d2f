//! The primary probes its own server: a hung primary is replaced.
//!
//! A primary whose processes are stopped, or stuck on their storage, takes no
//! writes, yet its agent keeps renewing the lease from its own task, so
//! nobody else may be promoted: every client waits for as long as the hang
//! lasts. So while the server runs read-write, this task commits a tiny
//! transaction on it every half second (over the agent's own socket, with
//! `synchronous_commit = local`, so a lost synchronous standby does not count
//! as a hang). When one does not finish within `failover.primary_probe_timeout`
//! (default half the lease TTL), the server counts as hung: the supervisor
//! stops it at once (SIGQUIT, then SIGKILL of every process a moment later),
//! the agent stops renewing its lease so `leader` expires even if nothing
//! else works, and the HA loop releases `leader` as soon as the server is
//! gone, so a standby takes over without waiting for the lease.
//!
//! Only a timeout counts: a probe that fails fast (the server crashed or is
//! restarting) is the HA loop's business.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::lease::LeaseKeeper;
use super::watchdog::Watchdog;
use crate::postgres::Server;

const EVERY: Duration = Duration::from_millis(500);
/// Commits, and flushes a commit record to the local WAL.
const PROBE: &str = "BEGIN; SET LOCAL synchronous_commit TO local; SELECT txid_current(); COMMIT";

pub fn start(
    server: Server,
    watchdog: Watchdog,
    lease: LeaseKeeper,
    timeout: Duration,
    shutdown: CancellationToken,
) -> Arc<AtomicBool> {
    let hung = Arc::new(AtomicBool::new(false));
    let flag = hung.clone();
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            if !watchdog.is_armed() {
                client = None;
                continue;
            }
            let probe = async {
                if client.is_none() {
                    client = Some(server.connect().await?);
                }
                let c = client.as_ref().expect("connected above");
                c.batch_execute(PROBE).await.map_err(anyhow::Error::from)
            };
            match tokio::time::timeout(timeout, probe).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => client = None,
                Err(_) => {
                    tracing::error!(
                        "the primary's server did not commit a probe transaction within {timeout:?}: it is hung; stopping it and giving up leader"
                    );
                    watchdog.fence_now();
                    lease.abandon();
                    flag.store(true, Ordering::SeqCst);
                    client = None;
                }
            }
        }
    });
    hung
}
