//! The gateway's live view of the cluster: the latest consistent etcd snapshot
//! and when it was read. DNS and the proxy route from it; both must see a
//! change in etcd within a second, and must know when they can no longer see
//! etcd at all (the writer path then fails closed).
//!
//! One task keeps it current: it watches the cluster prefix and re-reads the
//! whole prefix after every change (the keyspace is small, and a full read at
//! one revision is what every decision needs), and at least once a second even
//! without changes, so that the read time proves etcd is still reachable.
//!
//! The view also carries the cluster file the gateway routes by: the one it
//! started with, replaced by each version `meridian config apply` publishes
//! (looked for at most once a second), so that DNS, the proxy and the API
//! take a new node or setting without a restart.

use std::sync::Arc;
use std::time::Duration;

// tokio's clock, not std's: it is the one tests pause and advance.
use tokio::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::coord::{Coord, Snapshot};

/// Re-read at least this often, so that freshness means "etcd answered lately".
const REFRESH: Duration = Duration::from_secs(1);
/// Changes come in bursts (a promotion touches several keys): read once per burst.
const DEBOUNCE: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
pub struct View {
    pub snapshot: Arc<Snapshot>,
    /// When `snapshot` was read; `None` until etcd first answered.
    pub read_at: Option<Instant>,
    /// The cluster file in force, and its published version (0: the file this gateway started with).
    pub config: Arc<Config>,
    pub config_version: u64,
}

impl View {
    /// Before etcd first answered: no snapshot, the file the gateway started with.
    pub fn new(config: Arc<Config>) -> View {
        View { snapshot: Arc::default(), read_at: None, config, config_version: 0 }
    }

    /// The snapshot, if it was read within `max_age`.
    pub fn fresh(&self, max_age: Duration) -> Option<&Snapshot> {
        self.read_at.filter(|t| t.elapsed() <= max_age).map(|_| self.snapshot.as_ref())
    }

    /// The snapshot, if it still proves who the leader is: read within half
    /// the lease's time to live. (Of the view's own config, so that no
    /// caller borrows the watch channel twice: a second read lock while a
    /// writer waits deadlocks, and once froze a gateway's proxies.)
    pub fn routable(&self) -> Option<&Snapshot> {
        self.fresh(self.config.failover.lease_ttl / 2)
    }
}

/// Starts the task that keeps the view current; it ends with `shutdown`.
/// `region` is this gateway's: a published file without it is not taken.
pub fn spawn(coord: Coord, config: Arc<Config>, region: String, shutdown: CancellationToken) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::new(config.clone()));
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = follow(coord, tx, Published { config, version: 0, checked: None, region }) => {}
        }
    });
    rx
}

/// The cluster file the view carries, and when etcd was last asked for a newer one.
struct Published {
    config: Arc<Config>,
    version: u64,
    checked: Option<Instant>,
    region: String,
}

impl Published {
    /// Takes a newer published version, if there is one (at most one look a second).
    async fn refresh(&mut self, coord: &Coord) {
        if self.checked.is_some_and(|t| t.elapsed() < REFRESH) {
            return;
        }
        self.checked = Some(Instant::now());
        let p = match coord.published_config().await {
            Ok(Some(p)) if p.version > self.version => p,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!("failed to {e:#}");
                return;
            }
        };
        self.version = p.version;
        match Config::parse(&p.text).config {
            Some(mut new) if new.region(&self.region).is_ok() => {
                new.source = self.config.source.clone();
                tracing::info!("cluster file version {} ({}, applied by {}) taken", p.version, p.cost, p.applied_by);
                self.config = Arc::new(new);
            }
            Some(_) => tracing::warn!(
                "cluster file version {} removes this gateway's region {}: routing by the last one until this gateway is stopped",
                p.version,
                self.region
            ),
            None => tracing::error!("cluster file version {} in etcd does not parse; keeping the last one", p.version),
        }
    }
}

async fn follow(coord: Coord, tx: watch::Sender<View>, mut published: Published) {
    let mut stream: Option<etcd_client::WatchStream> = None;
    let mut last_error: Option<String> = None;
    loop {
        let started = Instant::now();
        let snap = match coord.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!("failed to {msg}; routing from the last view until it is too old");
                    last_error = Some(msg);
                }
                stream = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if last_error.take().is_some() {
            tracing::info!("etcd answers again");
        }
        let revision = snap.revision;
        published.refresh(&coord).await;
        tx.send_replace(View {
            snapshot: Arc::new(snap),
            read_at: Some(started),
            config: published.config.clone(),
            config_version: published.version,
        });
        if stream.is_none() {
            match coord.watch(revision + 1).await {
                Ok(s) => stream = Some(s),
                Err(e) => tracing::warn!("failed to {e:#}; polling instead"),
            }
        }
        // Until something changes, or it is time to prove etcd is still there.
        let deadline = tokio::time::Instant::now() + REFRESH;
        match stream.as_mut() {
            None => tokio::time::sleep_until(deadline).await,
            Some(s) => loop {
                match tokio::time::timeout_at(deadline, s.message()).await {
                    Err(_) => break,
                    Ok(Ok(Some(resp))) if resp.canceled() => {
                        stream = None;
                        break;
                    }
                    Ok(Ok(Some(resp))) if !resp.events().is_empty() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        break;
                    }
                    Ok(Ok(Some(_))) => continue,
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        stream = None;
                        break;
                    }
                }
            },
        }
    }
}
