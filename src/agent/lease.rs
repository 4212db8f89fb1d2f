//! Keeps this agent's etcd lease alive from a thread of its own, with its own
//! small runtime and its own etcd connection, so that neither long actions (a
//! base backup, a crash recovery) nor a runtime whose workers are blocked
//! can let it lapse by accident.
//!
//! Freshness is measured from when a renewal was *sent*: etcd restarts the TTL
//! when it receives the request, which is after we sent it, so "sent + TTL -
//! margin" is always before etcd can expire the lease. A primary whose lease is
//! not fresh fences itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::coord::{Coord, LeaseId};

#[derive(Debug, Clone, Copy)]
struct State {
    lease: LeaseId,
    /// When the last successful renewal (or the grant) was sent.
    renewed_at: Instant,
    /// Set when the agent gave the lease up (its primary hung): no renewal
    /// until etcd has certainly expired it, so `leader` goes with it even if
    /// releasing it fails.
    abandoned: bool,
}

/// A shared view of the agent's lease.
#[derive(Clone)]
pub struct LeaseKeeper {
    state: Arc<Mutex<State>>,
    ttl: Duration,
}

impl LeaseKeeper {
    /// Grants a lease (retrying until etcd answers or shutdown) and starts
    /// renewing it on the keeper's own thread. None: shut down before a grant.
    pub async fn start(
        config: &Config,
        identity: &crate::tls::Identity,
        shutdown: CancellationToken,
    ) -> Result<Option<LeaseKeeper>> {
        let (config, ttl, identity) = (config.clone(), config.failover.lease_ttl, identity.clone());
        let (granted, grant) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("lease-keeper".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = granted.send(Err(anyhow::Error::new(e).context("start the lease keeper's runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let coord = match Coord::connect(&config, &identity).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = granted.send(Err(e));
                            return;
                        }
                    };
                    let Some(keeper) = Self::grant(&coord, ttl, &shutdown).await else {
                        let _ = granted.send(Ok(None));
                        return;
                    };
                    let _ = granted.send(Ok(Some(keeper.clone())));
                    keeper.renew_loop(coord, shutdown).await;
                });
            })
            .context("start the lease keeper's thread")?;
        grant.await.context("the lease keeper's thread ended")?
    }

    async fn grant(coord: &Coord, ttl: Duration, shutdown: &CancellationToken) -> Option<LeaseKeeper> {
        let (lease, renewed_at) = loop {
            let sent = Instant::now();
            match coord.grant_lease(ttl).await {
                Ok(id) => break (id, sent),
                Err(e) => tracing::warn!("failed to {e:#}; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        Some(LeaseKeeper { state: Arc::new(Mutex::new(State { lease, renewed_at, abandoned: false })), ttl })
    }

    pub fn id(&self) -> LeaseId {
        self.state.lock().unwrap().lease
    }

    /// etcd cannot have expired the lease yet, with a third of the TTL to spare
    /// for stopping PostgreSQL.
    pub fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until()
    }

    /// Until when the lease is provably alive: two thirds into the TTL after
    /// the last successful renewal was sent.
    /// An abandoned lease is not fresh: nothing may rely on it any more.
    pub fn fresh_until(&self) -> Instant {
        let state = self.state.lock().unwrap();
        if state.abandoned {
            return state.renewed_at;
        }
        state.renewed_at + (self.ttl - self.ttl / 3)
    }

    /// Stops renewing the current lease; a new one is granted once etcd has
    /// certainly expired it (a TTL and a second after the last renewal was sent).
    pub fn abandon(&self) {
        self.state.lock().unwrap().abandoned = true;
    }

    /// Renews the lease again: what it had to take with it is gone already
    /// (`leader` was released), and the member report lives under it too.
    pub fn resume(&self) {
        self.state.lock().unwrap().abandoned = false;
    }

    async fn renew_loop(self, coord: Coord, shutdown: CancellationToken) {
        // Renew four times per TTL; after a failure, retry quickly: one lost
        // renewal (an etcd election, say) must not let the lease go stale.
        let period = self.ttl / 4;
        let retry = Duration::from_millis(250);
        let mut wait = period;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            {
                let mut state = self.state.lock().unwrap();
                if state.abandoned {
                    if state.renewed_at.elapsed() < self.ttl + Duration::from_secs(1) {
                        wait = retry;
                        continue;
                    }
                    state.abandoned = false; // the renewal below finds it expired and grants anew
                }
            }
            let lease = self.id();
            let sent = Instant::now();
            wait = retry;
            // Long enough for a cut-off member's timeout and a try on the next.
            match tokio::time::timeout(self.ttl / 3, coord.renew_lease(lease)).await {
                Ok(Ok(ttl)) if ttl > 0 => {
                    self.state.lock().unwrap().renewed_at = sent;
                    wait = period;
                }
                Ok(Ok(_)) => {
                    // Expired on etcd's side: everything under it is gone. Start over
                    // with a new lease; a leadership held under the old one is lost.
                    tracing::warn!("etcd lease {lease:x} expired; granting a new one");
                    let sent = Instant::now();
                    match coord.grant_lease(self.ttl).await {
                        Ok(id) => {
                            *self.state.lock().unwrap() = State { lease: id, renewed_at: sent, abandoned: false };
                            wait = period;
                        }
                        Err(e) => tracing::warn!("failed to {e:#}"),
                    }
                }
                Ok(Err(e)) => tracing::warn!("failed to {e:#}"),
                Err(_) => tracing::warn!("etcd did not answer a lease renewal within {:?}", self.ttl / 3),
            }
        }
    }
}
