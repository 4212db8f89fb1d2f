//! The gateway's presence in etcd (`gateways/<region>`, under a lease of its
//! own): that it is alive, for which switchover its proxies hold new
//! transactions, which restarting standby its readers avoid, and the cluster
//! file version it routes by. A switchover's old primary counts the client transactions
//! still open only once every live gateway says it holds: a transaction a
//! proxy began after that count would be cut by the shutdown. Waiting for the
//! gateways themselves, rather than a fixed time, is both shorter on one
//! machine and safe across a slow WAN. A gateway says it holds only once
//! every transaction it lent an old primary's connection before the hold
//! has had its server's first answer (`pooled::Lend`): one still on
//! its way would reach the server after the count. Likewise it says it
//! avoids a restarting standby only once the reads lent that standby's
//! connections have had their first answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::proxy::ProxyStats;
use super::routing;
use super::view::View;
use crate::agent::lease::LeaseKeeper;
use crate::cluster::GatewayPresence;
use crate::config::PoolMode;
use crate::coord::Coord;

/// Written again this often (and whenever the lease changed), so that a
/// write lost to an etcd hiccup does not last.
const REPUBLISH: Duration = Duration::from_secs(5);

/// At most this long for lent transactions to reach their server before
/// saying the proxies hold (a server login or a request stuck longer is the
/// old primary's drain's to wait for, or to cut).
const LEND_WAIT: Duration = Duration::from_millis(500);

/// The switchover this view's proxies hold new transactions for: one is in
/// progress and the view names no writer (for new sessions, in session mode).
pub fn holding_for(view: &View) -> Option<u64> {
    let snap = &view.snapshot;
    let sw = snap.switchover.as_ref().filter(|s| s.aborted.is_none())?;
    let writer = match view.config.proxy.pool_mode {
        PoolMode::Session => routing::writer_for_sessions(&view.config, snap),
        PoolMode::Transaction => routing::writer(&view.config, snap),
    };
    writer.is_err().then_some(sw.requested_at_ms)
}

/// The address of the standby a rolling restart is about to restart.
fn restarting_address(view: &View) -> Option<std::net::SocketAddr> {
    let r = routing::restarting(&view.snapshot)?;
    view.config.node(&r.node).ok().map(|(_, n)| n.address)
}

/// Waits (at most `LEND_WAIT`) until `outstanding` lends are answered.
async fn wait_for_lends(to: &str, outstanding: impl Fn() -> u64) {
    let started = tokio::time::Instant::now();
    while outstanding() > 0 && started.elapsed() < LEND_WAIT {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    match outstanding() {
        0 => tracing::debug!("no transaction lent {to} unanswered after {:.1?}", started.elapsed()),
        n => tracing::warn!("{n} transactions lent {to} still unanswered after {LEND_WAIT:?}; saying so anyway"),
    }
}

/// Keeps `gateways/<region>` current until `shutdown`.
pub async fn run(
    coord: Coord,
    lease: LeaseKeeper,
    region: String,
    mut view: watch::Receiver<View>,
    proxies: Vec<Arc<ProxyStats>>,
    shutdown: CancellationToken,
) {
    let mut published: Option<(GatewayPresence, i64, tokio::time::Instant)> = None;
    let mut last_error: Option<String> = None;
    loop {
        let presence = {
            let v = view.borrow();
            GatewayPresence {
                region: region.clone(),
                holding_for: holding_for(&v),
                config_version: v.config_version,
                avoiding: routing::restarting(&v.snapshot).map(|r| r.id.clone()),
            }
        };
        let newly_holding = presence.holding_for.is_some()
            && published.as_ref().is_none_or(|(p, _, _)| p.holding_for != presence.holding_for);
        if newly_holding {
            // Looked at after the view, as the proxies count a lend before
            // they look at the view again: none outstanding now means none
            // will reach the old primary after its count.
            wait_for_lends("the old primary", || proxies.iter().map(|p| p.leader_lends.load(Ordering::SeqCst)).sum())
                .await;
        }
        let newly_avoiding =
            presence.avoiding.is_some() && published.as_ref().is_none_or(|(p, _, _)| p.avoiding != presence.avoiding);
        let avoided = newly_avoiding.then(|| restarting_address(&view.borrow())).flatten();
        if let Some(address) = avoided {
            // The same for a standby about to restart: its count of open
            // transactions must see every read lent its connections.
            let on_it = |p: &Arc<ProxyStats>| {
                p.standby_lends.lock().unwrap_or_else(|e| e.into_inner()).get(&address).copied().unwrap_or(0)
            };
            wait_for_lends("the restarting standby", || proxies.iter().map(on_it).sum()).await;
        }
        let lease_id = lease.id();
        let due =
            published.as_ref().is_none_or(|(p, id, at)| *p != presence || *id != lease_id || at.elapsed() >= REPUBLISH);
        if due {
            match coord.put_gateway(&presence, lease_id).await {
                Ok(()) => {
                    if presence.holding_for.is_some() {
                        tracing::debug!(
                            "holding new transactions for the switchover requested at {:?}",
                            presence.holding_for
                        );
                    }
                    last_error = None;
                    published = Some((presence, lease_id, tokio::time::Instant::now()));
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if last_error.as_ref() != Some(&msg) {
                        tracing::warn!("failed to {msg}");
                        last_error = Some(msg);
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
