//! Fencing: keeps the postmaster's supervisor told how long the leader lease
//! is provably alive.
//!
//! The supervisor (`postgres::supervisor`, its own process) stops a primary's
//! server when the deadline it was last given passes, so fencing no longer
//! depends on this agent being scheduled: a frozen, deadlocked or starved
//! agent stops sending, and the server stops at the last deadline. That
//! deadline is two thirds into the TTL, measured from when the last
//! successful renewal was sent, so it always comes before etcd can expire the
//! lease and let another node be promoted. Every 100 ms, while the server runs
//! read-write, this task sends the current deadline (`arm`); a standby is
//! `disarm`ed.
//!
//! The pipe to the supervisor stays open for as long as the server runs,
//! standby or not: its end of input tells the supervisor the agent is gone.
//!
//! The self-probe (`probe`) runs on the agent's runtime; the lease keeper
//! does not. A probe that stops finishing (its task starved, or wedged) would
//! leave a hung primary's lease renewed for good: seen in CI, a new primary
//! frozen right after its promotion kept `leader` for 90 s with no probe
//! verdict at all. So this thread also checks, while armed, that the probe
//! finished within `starved_after` (its own timeout plus a lease TTL: a
//! runtime blocked for less fences nothing, as before); if not, it does what
//! the probe would have done (fence now, give up the lease, flag the hang).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::ChildStdin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::lease::LeaseKeeper;
use crate::postgres::supervisor::{monotonic_ns, Order};

const FEED_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Pipe {
    /// The supervisor's stdin, while a server runs.
    orders: Option<ChildStdin>,
    /// The server runs read-write: send deadlines.
    armed: bool,
    /// While armed: when it was armed or the self-probe last finished.
    probed_at: Option<Instant>,
}

/// Shared between the agent and its feeding task.
#[derive(Clone)]
pub struct Watchdog {
    pipe: Arc<Mutex<Pipe>>,
    lease: LeaseKeeper,
    /// How long the self-probe may go without finishing while armed.
    starved_after: Duration,
    /// Set when the primary's server counts as hung (read by the HA loop).
    hung: Arc<AtomicBool>,
}

impl Watchdog {
    /// Feeds from a thread of its own: a runtime whose workers are blocked
    /// must not stop the deadline from moving while the lease is renewed.
    /// `starved_after`: see the module's doc (`starved_after(config)` for an agent's).
    pub fn start(lease: LeaseKeeper, starved_after: Duration, shutdown: CancellationToken) -> Watchdog {
        let w = Watchdog { pipe: Arc::default(), lease, starved_after, hung: Arc::default() };
        let feeder = w.clone();
        let spawned = std::thread::Builder::new().name("fencing-feeder".into()).spawn(move || {
            let mut last = Instant::now();
            while !shutdown.is_cancelled() {
                std::thread::sleep(FEED_EVERY);
                // This thread stalled too (the whole agent was frozen): the
                // probe's silence meanwhile says nothing about its runtime.
                if last.elapsed() > FEED_EVERY + Duration::from_secs(1) {
                    feeder.probed();
                }
                last = Instant::now();
                feeder.feed();
            }
        });
        if let Err(e) = spawned {
            // Without a feeder the supervisor fences at the first deadline: safe, not quiet.
            tracing::error!("failed to start the fencing feeder's thread: {e}");
        }
        w
    }

    /// A new server runs under a supervisor listening on `orders`; disarmed.
    pub fn attach(&self, orders: ChildStdin) {
        // Never block the agent on a full pipe: a supervisor that does not read
        // would fence anyway, and this task must keep running.
        // SAFETY: fcntl on a pipe we own.
        unsafe {
            let fd = orders.as_raw_fd();
            libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK);
        }
        *self.pipe.lock().unwrap() = Pipe { orders: Some(orders), armed: false, probed_at: None };
    }

    /// The server is gone: closes the pipe.
    pub fn detach(&self) {
        *self.pipe.lock().unwrap() = Pipe::default();
    }

    /// The server runs read-write from now on: deadlines start at once.
    pub fn guard(&self) {
        let mut pipe = self.pipe.lock().unwrap();
        if !pipe.armed {
            pipe.probed_at = Some(Instant::now());
        }
        pipe.armed = true;
        drop(pipe);
        self.feed();
    }

    /// The self-probe finished (whatever it found, short of its timeout).
    pub fn probed(&self) {
        self.pipe.lock().unwrap().probed_at = Some(Instant::now());
    }

    /// The flag the HA loop reads: the primary's server counts as hung.
    pub fn hung(&self) -> Arc<AtomicBool> {
        self.hung.clone()
    }

    /// What the probe does on a hang, from wherever it is seen: stop the
    /// server now, stop renewing the lease (so `leader` expires even if
    /// nothing else works), and tell the HA loop.
    pub fn fence_hung(&self) {
        self.fence_now();
        self.lease.abandon();
        self.hung.store(true, Ordering::SeqCst);
    }

    /// Stops the server now: the deadline is in the past.
    pub fn fence_now(&self) {
        let mut pipe = self.pipe.lock().unwrap();
        if pipe.armed {
            // Unarmed without a `disarm`: no later deadline may overtake this one.
            pipe.armed = false;
            send(&mut pipe, Order::Arm { deadline_ns: 0 });
        }
    }

    pub fn is_armed(&self) -> bool {
        self.pipe.lock().unwrap().armed
    }

    /// The server no longer runs read-write.
    pub fn release(&self) {
        let mut pipe = self.pipe.lock().unwrap();
        pipe.armed = false;
        send(&mut pipe, Order::Disarm);
    }

    fn feed(&self) {
        let mut pipe = self.pipe.lock().unwrap();
        let unprobed = pipe.probed_at.map(|t| t.elapsed()).filter(|e| *e > self.starved_after);
        // Only a lease still renewed keeps the server up: without one, the
        // supervisor's deadline fences it anyway.
        if let Some(since) = unprobed.filter(|_| pipe.armed && self.lease.is_fresh()) {
            tracing::error!(
                "the primary's self-probe has not finished for {since:.1?} (its task is starved or stuck): taking the server for hung; stopping it and giving up leader"
            );
            drop(pipe);
            self.fence_hung();
            return;
        }
        if pipe.armed {
            let left = self.lease.fresh_until().saturating_duration_since(Instant::now());
            send(&mut pipe, Order::Arm { deadline_ns: monotonic_ns() + left.as_nanos() as u64 });
        }
    }
}

/// An agent's `starved_after`: the self-probe's timeout plus a lease TTL.
pub fn starved_after(config: &crate::config::Config) -> Duration {
    config.failover.probe_timeout() + config.failover.lease_ttl
}

/// Orders are shorter than PIPE_BUF, so a write is all or nothing.
fn send(pipe: &mut Pipe, order: Order) {
    let Some(orders) = pipe.orders.as_mut() else { return };
    match orders.write_all(order.line().as_bytes()) {
        Ok(()) => {}
        // Full: the supervisor is behind; the next feed carries a newer deadline.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        // It exited (it stopped the server); the HA loop reaps it.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => pipe.orders = None,
        Err(e) => tracing::warn!("failed to send the supervisor {order:?}: {e}"),
    }
}
