//! Whether the gateway's runtime still runs tasks, checked from a thread of
//! its own. A gateway whose workers are all stuck (a deadlock: one froze every
//! proxy of a gateway in a drill, see `View::routable`) serves nothing, yet
//! its leases live on, renewed from their own threads: its presence keeps a
//! switchover waiting for it, its health verdicts stay published. So a
//! gateway that has not run a trivial task for `FROZEN_AFTER` exits with
//! `FROZEN_EXIT`: its leases lapse, and its supervisor (systemd's
//! `Restart=on-failure`) starts it afresh. Crash rather than linger.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Long enough that no stall of a loaded machine (seen: 8 s of I/O pressure
/// during a build) ends a healthy gateway; short next to a lease's lapse.
pub const FROZEN_AFTER: Duration = Duration::from_secs(20);

/// The exit status of a gateway that found its runtime frozen (EX_SOFTWARE).
pub const FROZEN_EXIT: i32 = 70;

/// How often a task is sent to the runtime.
const EVERY: Duration = Duration::from_millis(500);

/// Starts the checker for the runtime of `handle`: every `EVERY` it spawns a
/// task that answers at once; when none has answered for `frozen_after`, it
/// calls `frozen` with the time since the last answer, once, and stops. It
/// also stops at `shutdown`.
pub fn start(
    handle: tokio::runtime::Handle,
    frozen_after: Duration,
    shutdown: CancellationToken,
    frozen: impl FnOnce(Duration) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("runtime-check".into()).spawn(move || {
        let (tx, rx) = mpsc::channel::<()>();
        let mut answered = Instant::now();
        while !shutdown.is_cancelled() {
            let tx = tx.clone();
            handle.spawn(async move {
                let _ = tx.send(());
            });
            let asked = Instant::now();
            // Wait out the period, taking every answer that comes.
            while let Some(left) = EVERY.checked_sub(asked.elapsed()) {
                match rx.recv_timeout(left) {
                    Ok(()) => answered = Instant::now(),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            if answered.elapsed() >= frozen_after && !shutdown.is_cancelled() {
                frozen(answered.elapsed());
                return;
            }
        }
    })?;
    Ok(())
}

/// Ends the gateway (`FROZEN_EXIT`) when the runtime of `handle` (`what`:
/// "runtime", "proxy runtime") has run no task for `FROZEN_AFTER`.
pub fn exit_when_frozen(
    handle: tokio::runtime::Handle,
    what: &'static str,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    start(handle, FROZEN_AFTER, shutdown, move |since| {
        tracing::error!(
            "this gateway's {what} has run no task for {since:.1?} (a deadlock or a stall): exiting with status {FROZEN_EXIT}, so that its leases lapse and its supervisor starts it afresh"
        );
        std::process::exit(FROZEN_EXIT);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    /// The time `frozen` was called after the start, or None within `wait`.
    fn frozen_within(rt: &tokio::runtime::Runtime, frozen_after: Duration, wait: Duration) -> Option<Duration> {
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        let stop = CancellationToken::new();
        start(rt.handle().clone(), frozen_after, stop.clone(), move |_| {
            let _ = tx.send(started.elapsed());
        })
        .unwrap();
        let got = rx.recv_timeout(wait).ok();
        stop.cancel();
        got
    }

    #[test]
    fn a_runtime_whose_workers_are_all_stuck_is_reported_once_and_a_busy_one_is_not() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // Busy but answering: both workers hogged 50 ms at a time, in turns with other tasks.
        for _ in 0..2 {
            rt.spawn(async {
                for _ in 0..30 {
                    std::thread::sleep(Duration::from_millis(50));
                    tokio::task::yield_now().await;
                }
            });
        }
        assert_eq!(frozen_within(&rt, Duration::from_secs(1), Duration::from_secs(3)), None, "a busy runtime answers");

        // Both workers blocked until the barrier (a deadlock, for the checker).
        let barrier = Arc::new(Barrier::new(3));
        for _ in 0..2 {
            let b = barrier.clone();
            rt.spawn(async move {
                b.wait();
            });
        }
        let at =
            frozen_within(&rt, Duration::from_secs(1), Duration::from_secs(5)).expect("a stuck runtime is reported");
        assert!(at >= Duration::from_secs(1) && at < Duration::from_secs(3), "reported after {at:?}");
        barrier.wait();
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}
