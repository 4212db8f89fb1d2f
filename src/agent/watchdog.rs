//! The fencing watchdog: the last line of defence against two writable nodes.
//!
//! The HA loop fences a primary whose lease is stale, but the loop can be
//! slow exactly when it matters: cut off from etcd, each etcd request waits
//! for its timeout on every member in turn. So this task, which does no I/O
//! but a signal, checks the lease's freshness every 100 ms and stops a
//! primary's postmaster at once (SIGQUIT: PostgreSQL's immediate shutdown)
//! when the lease can no longer be proven alive. That is two thirds into the
//! TTL, measured from when the last successful renewal was sent, so it always
//! happens before etcd can expire the lease and let another node be promoted.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::lease::LeaseKeeper;

const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Shared between the agent and its watchdog task.
#[derive(Clone, Default)]
pub struct Watchdog {
    /// The postmaster's pid while it runs read-write; 0 otherwise.
    primary_pid: Arc<AtomicU32>,
    /// Set when the watchdog stopped the server, so its exit is not taken for a crash.
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn start(lease: LeaseKeeper, shutdown: CancellationToken) -> Watchdog {
        let w = Watchdog::default();
        let task = w.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                }
                let pid = task.primary_pid.load(Ordering::SeqCst);
                if pid != 0 && !lease.is_fresh() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid as i32, libc::SIGQUIT) };
                    task.primary_pid.store(0, Ordering::SeqCst);
                    task.fired.store(true, Ordering::SeqCst);
                    tracing::warn!(
                        "fencing: the leader lease was not renewed in time; stopped PostgreSQL (pid {pid}) immediately"
                    );
                }
            }
        });
        w
    }

    /// The server runs read-write from now on.
    pub fn guard(&self, postmaster: u32) {
        self.primary_pid.store(postmaster, Ordering::SeqCst);
    }

    /// The server no longer runs read-write.
    pub fn release(&self) {
        self.primary_pid.store(0, Ordering::SeqCst);
    }

    /// Whether the watchdog stopped the server since the last call.
    pub fn take_fired(&self) -> bool {
        self.fired.swap(false, Ordering::SeqCst)
    }
}
