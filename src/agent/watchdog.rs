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

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::ChildStdin;
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
}

/// Shared between the agent and its feeding task.
#[derive(Clone)]
pub struct Watchdog {
    pipe: Arc<Mutex<Pipe>>,
    lease: LeaseKeeper,
}

impl Watchdog {
    /// Feeds from a thread of its own: a runtime whose workers are blocked
    /// must not stop the deadline from moving while the lease is renewed.
    pub fn start(lease: LeaseKeeper, shutdown: CancellationToken) -> Watchdog {
        let w = Watchdog { pipe: Arc::default(), lease };
        let feeder = w.clone();
        let spawned = std::thread::Builder::new().name("fencing-feeder".into()).spawn(move || {
            while !shutdown.is_cancelled() {
                std::thread::sleep(FEED_EVERY);
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
        *self.pipe.lock().unwrap() = Pipe { orders: Some(orders), armed: false };
    }

    /// The server is gone: closes the pipe.
    pub fn detach(&self) {
        *self.pipe.lock().unwrap() = Pipe::default();
    }

    /// The server runs read-write from now on: deadlines start at once.
    pub fn guard(&self) {
        self.pipe.lock().unwrap().armed = true;
        self.feed();
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
        if pipe.armed {
            let left = self.lease.fresh_until().saturating_duration_since(Instant::now());
            send(&mut pipe, Order::Arm { deadline_ns: monotonic_ns() + left.as_nanos() as u64 });
        }
    }
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
