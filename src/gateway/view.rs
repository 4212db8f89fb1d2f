//! The gateway's live view of the cluster: the latest consistent etcd snapshot
//! and when it was read. DNS and the proxy route from it; both must see a
//! change in etcd within a second, and must know when they can no longer see
//! etcd at all (the writer path then fails closed).
//!
//! One task keeps it current: it watches the cluster prefix and re-reads the
//! whole prefix after every change (the keyspace is small, and a full read at
//! one revision is what every decision needs), and at least once a second even
//! without changes, so that the read time proves etcd is still reachable.

use std::sync::Arc;
use std::time::Duration;

// tokio's clock, not std's: it is the one tests pause and advance.
use tokio::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::coord::{Coord, Snapshot};

/// Re-read at least this often, so that freshness means "etcd answered lately".
const REFRESH: Duration = Duration::from_secs(1);
/// Changes come in bursts (a promotion touches several keys): read once per burst.
const DEBOUNCE: Duration = Duration::from_millis(10);

#[derive(Clone, Default, Debug)]
pub struct View {
    pub snapshot: Arc<Snapshot>,
    /// When `snapshot` was read; `None` until etcd first answered.
    pub read_at: Option<Instant>,
}

impl View {
    /// The snapshot, if it was read within `max_age`.
    pub fn fresh(&self, max_age: Duration) -> Option<&Snapshot> {
        self.read_at.filter(|t| t.elapsed() <= max_age).map(|_| self.snapshot.as_ref())
    }
}

/// Starts the task that keeps the view current; it ends with `shutdown`.
pub fn spawn(coord: Coord, shutdown: CancellationToken) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::default());
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = follow(coord, tx) => {}
        }
    });
    rx
}

async fn follow(coord: Coord, tx: watch::Sender<View>) {
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
        tx.send_replace(View { snapshot: Arc::new(snap), read_at: Some(started) });
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
