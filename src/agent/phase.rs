//! What the HA loop is doing, and a thread that says so when it takes long.
//!
//! Every part of a pass marks itself (`Phases::enter`). A thread of its own
//! (so a runtime whose workers are stuck cannot silence it) looks every few
//! seconds and logs a WARN when one part has run for longer than
//! `SLOW_AFTER`, and again every `SLOW_AFTER` while it lasts. A base backup or
//! a rewind may rightly take that long; anything else doing so is a bug, and
//! the line names the await it is stuck in.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A phase running this long is reported.
pub const SLOW_AFTER: Duration = Duration::from_secs(30);
const LOOK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Current {
    what: String,
    since: Instant,
    /// How many times this phase was reported as slow.
    warned: u32,
}

/// The HA loop's current phase, shared with the reporting thread.
#[derive(Clone)]
pub struct Phases(Arc<Mutex<Current>>);

impl Phases {
    /// Starts the thread that reports slow phases until `shutdown`.
    pub fn start(shutdown: CancellationToken) -> Phases {
        let phases =
            Phases(Arc::new(Mutex::new(Current { what: "starting".into(), since: Instant::now(), warned: 0 })));
        let shared = phases.clone();
        let spawned = std::thread::Builder::new().name("ha-loop-phases".into()).spawn(move || {
            while !shutdown.is_cancelled() {
                std::thread::sleep(LOOK_EVERY);
                if let Some(line) = shared.overdue(Instant::now()) {
                    tracing::warn!("{line}");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("failed to start the HA loop's phase reporter: {e}");
        }
        phases
    }

    /// Marks the start of `what`.
    pub fn enter(&self, what: impl Into<String>) {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *c = Current { what: what.into(), since: Instant::now(), warned: 0 };
    }

    /// The line to log when the current phase has run past its next report time.
    fn overdue(&self, now: Instant) -> Option<String> {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ran = now.saturating_duration_since(c.since);
        if ran < SLOW_AFTER * (c.warned + 1) {
            return None;
        }
        c.warned += 1;
        Some(format!(
            "the HA loop has been in \"{}\" for {} s (only a base backup or a rewind should take this long)",
            c.what,
            ran.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_phase_is_reported_once_per_period_and_a_new_phase_starts_afresh() {
        let p = Phases(Arc::new(Mutex::new(Current { what: "x".into(), since: Instant::now(), warned: 0 })));
        let t0 = p.0.lock().unwrap().since;
        assert_eq!(p.overdue(t0 + SLOW_AFTER - Duration::from_millis(1)), None);
        let line = p.overdue(t0 + SLOW_AFTER).expect("reported at SLOW_AFTER");
        assert!(line.contains("\"x\" for 30 s"), "{line}");
        assert_eq!(p.overdue(t0 + SLOW_AFTER + LOOK_EVERY), None, "reported twice in one period");
        assert!(p.overdue(t0 + SLOW_AFTER * 2).is_some(), "not reported again a period later");
        p.enter("y");
        assert_eq!(p.overdue(Instant::now()), None);
    }
}
