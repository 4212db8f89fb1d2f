//! Waking the HA loop early. The loop passes once a second; a planned
//! switchover is a relay of steps between two agents (the old primary stops,
//! the target reports its replay, the old primary releases `leader`, the
//! target promotes), and waiting out a tick at each hand-off made up most of
//! its write pause. A watch on the keys those steps write wakes the loop at
//! once. Reports (`members/*`) are left out: every agent writes one every
//! second, and waking on them would only make every loop run more often.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::coord::{Coord, Key};

/// Does a change to this key call for a pass of the HA loop now?
///
/// Not `restore`: a restore is not a race against the clock, and its
/// step-down keeps the tick's pace (conservatively: a faster one together
/// with another change made `restore --replace` choose a timeline number a
/// diverged node already had, in tests; see `postgres::timeline`).
pub fn wakes(key: Option<Key<'_>>) -> bool {
    matches!(key, Some(Key::Leader | Key::Switchover | Key::Dr | Key::Restart))
}

/// Watches the cluster's keys until `shutdown` and notifies `wake` when one
/// that `wakes` changes. Without a watch (etcd unreachable) the loop simply
/// keeps its tick; the watch is set up again after a pause.
pub fn start(coord: Coord, wake: Arc<Notify>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        while !shutdown.is_cancelled() {
            // Revision 0: from now on. A change missed between two watches is
            // seen by the next tick's snapshot anyway.
            let mut stream = match coord.watch(0).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("failed to {e:#}; the HA loop keeps its tick");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                match message {
                    Ok(Some(resp)) if resp.canceled() => break,
                    Ok(Some(resp)) => {
                        let relevant = resp.events().iter().any(|e| {
                            e.kv().and_then(|kv| kv.key_str().ok()).is_some_and(|k| wakes(coord.keys.parse(k)))
                        });
                        if relevant {
                            wake.notify_one();
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::Keys;

    #[test]
    fn the_relay_keys_wake_the_loop_and_reports_do_not() {
        let k = Keys::new("c");
        for key in [k.leader(), k.switchover(), k.dr(), k.restart()] {
            assert!(wakes(k.parse(&key)), "{key} wakes the loop");
        }
        for key in [k.member("a"), k.optime(), k.sync(), k.history(3), k.health("writer-tcp", "w"), k.restore()] {
            assert!(!wakes(k.parse(&key)), "{key} does not");
        }
        assert!(!wakes(k.parse("/meridian/other/leader")), "another cluster's keys do not");
    }
}
