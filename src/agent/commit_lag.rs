//! The data-loss budget at commit (`[replication] max_commit_lag`), as
//! Aurora's `rds.global_db_rpo`: when no standby in another region has
//! replayed (or received) the WAL the primary wrote more than the budget ago,
//! the primary holds new commits — it names every remote standby in
//! `synchronous_standby_names` — until one has caught up; then it lets
//! commits go again.
//!
//! Lag is measured on the primary alone, by its own monotonic clock and WAL
//! positions, never by comparing two hosts' wall clocks: every tick the
//! primary logs (now, its WAL position); a standby at position P is missing
//! what was written since the first logged position past P, so its lag is
//! the age of that entry. A standby that stops answering stops advancing,
//! and its lag grows with time while the primary writes. Pure: the agent
//! feeds it positions and reads verdicts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::Lsn;

/// The primary's WAL positions over the last while, one per tick.
#[derive(Debug, Clone)]
pub struct PositionLog {
    samples: VecDeque<(Instant, Lsn)>,
    /// How far back to remember: lags beyond it read as "at least this".
    keep: Duration,
}

impl PositionLog {
    pub fn new(keep: Duration) -> PositionLog {
        PositionLog { samples: VecDeque::new(), keep }
    }

    /// Logs the primary's position at `now` (positions never go back; a
    /// smaller one starts the log again: a new timeline's server).
    pub fn record(&mut self, now: Instant, lsn: Lsn) {
        if self.samples.back().is_some_and(|(_, last)| lsn < *last) {
            self.samples.clear();
        }
        // Consecutive entries at the same position add nothing.
        if self.samples.back().is_some_and(|(_, last)| *last == lsn) && self.samples.len() >= 2 {
            let n = self.samples.len();
            if self.samples[n - 2].1 == lsn {
                self.samples.back_mut().expect("non-empty").0 = now;
                return;
            }
        }
        self.samples.push_back((now, lsn));
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) > self.keep {
            self.samples.pop_front();
        }
    }

    /// How long ago, at most, the primary wrote the oldest WAL a standby at
    /// `at` lacks: since the last logged position the standby has (the WAL
    /// after it was written after that entry). Zero when it has everything
    /// logged; at least the log's age when it lacks even the oldest entry.
    /// An upper bound, by up to one entry's spacing (a tick).
    pub fn lag(&self, now: Instant, at: Lsn) -> Duration {
        if self.samples.back().is_none_or(|(_, last)| *last <= at) {
            return Duration::ZERO;
        }
        let had = self.samples.iter().rev().find(|(_, lsn)| *lsn <= at);
        let since = had.or(self.samples.front()).map(|(when, _)| *when).unwrap_or(now);
        now.saturating_duration_since(since)
    }
}

/// Which position of a remote standby counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitLagBy {
    /// What it has replayed: what readers there see, and what a promotion there starts from at once.
    #[default]
    Replay,
    /// What it has received and flushed: safe on disk in the other region.
    Receive,
}

/// The guard's verdict for one tick, as the primary reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitHold {
    /// Commits wait for a remote standby now.
    pub holding: bool,
    /// `max_commit_lag`, in milliseconds.
    pub bound_ms: u64,
    /// The remote standby closest to the primary, and how far behind it is
    /// (None: no remote standby streams).
    pub best: Option<String>,
    pub best_lag_ms: Option<u64>,
}

impl PositionLog {
    /// How long the log goes back: all that is known of a standby that is not connected.
    pub fn age(&self, now: Instant) -> Duration {
        self.samples.front().map(|(when, _)| now.saturating_duration_since(*when)).unwrap_or_default()
    }
}

/// Whether to hold commits: `remotes` are the standbys in other regions with
/// their position as the primary sees it (None: not connected). Of a standby
/// that is not connected nothing is known but that it lacks what the log
/// holds: it counts as behind by the log's age, so a primary that has just
/// started holds only once it has waited the bound for a remote standby.
pub fn evaluate(log: &PositionLog, now: Instant, bound: Duration, remotes: &[(String, Option<Lsn>)]) -> CommitHold {
    let connected = remotes
        .iter()
        .filter_map(|(name, at)| at.map(|at| (name.clone(), log.lag(now, at))))
        .min_by_key(|(_, lag)| *lag);
    let holding = match &connected {
        Some((_, lag)) => *lag > bound,
        None => log.age(now) > bound,
    };
    let best = connected;
    CommitHold {
        holding,
        bound_ms: bound.as_millis() as u64,
        best_lag_ms: best.as_ref().map(|(_, lag)| lag.as_millis() as u64),
        best: best.map(|(name, _)| name),
    }
}

impl CommitHold {
    /// One line for `meridian status`, when holding.
    pub fn warning(&self, primary: &str) -> Option<String> {
        if !self.holding {
            return None;
        }
        let bound = self.bound_ms as f64 / 1000.0;
        Some(match (&self.best, self.best_lag_ms) {
            (Some(best), Some(lag)) => format!(
                "WARNING: primary {primary} holds commits: no standby in another region is within max_commit_lag {bound}s (closest: {best}, {:.1}s behind)",
                lag as f64 / 1000.0
            ),
            _ => format!(
                "WARNING: primary {primary} holds commits: no standby in another region streams (max_commit_lag {bound}s)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn lsn(n: u64) -> Lsn {
        Lsn(n)
    }

    /// A primary writing 100 bytes a second for `secs` seconds, logged every second.
    fn writing(secs: u64) -> (PositionLog, Instant) {
        let t0 = Instant::now();
        let mut log = PositionLog::new(Duration::from_secs(60));
        for i in 0..=secs {
            log.record(t0 + S * i as u32, lsn(1000 + 100 * i));
        }
        (log, t0 + S * secs as u32)
    }

    #[test]
    fn a_standbys_lag_is_the_age_of_the_first_wal_it_lacks() {
        let (log, now) = writing(20);
        assert_eq!(log.lag(now, lsn(3000)), Duration::ZERO, "caught up");
        assert_eq!(log.lag(now, lsn(3100)), Duration::ZERO, "ahead of the last entry: caught up");
        assert_eq!(log.lag(now, lsn(2950)), S, "lacks WAL written within the last second");
        assert_eq!(log.lag(now, lsn(2900)), S, "has the position of a second ago");
        assert_eq!(log.lag(now, lsn(2899)), 2 * S);
        assert_eq!(log.lag(now, lsn(1000)), 20 * S);
        assert_eq!(log.lag(now, lsn(0)), 20 * S, "beyond the log: at least its age");
    }

    #[test]
    fn the_guard_holds_when_no_remote_standby_is_within_the_bound_and_releases_when_one_is() {
        let (log, now) = writing(20);
        let bound = 5 * S;
        type Remotes<'a> = &'a [(&'a str, Option<u64>)];
        let table: [(Remotes, bool, Option<&str>); 6] = [
            (&[("b", Some(3000))], false, Some("b")),
            (&[("b", Some(2500))], false, Some("b")), // 5 s behind: within
            (&[("b", Some(2450))], true, Some("b")),  // 6 s behind
            (&[("b", None), ("c", Some(2900))], false, Some("c")),
            (&[("b", None)], true, None), // nobody streams, for longer than the bound
            (&[], true, None),            // no remote standby at all
        ];
        for (remotes, holding, best) in table {
            let remotes: Vec<(String, Option<Lsn>)> =
                remotes.iter().map(|(n, l)| (n.to_string(), l.map(lsn))).collect();
            let v = evaluate(&log, now, bound, &remotes);
            assert_eq!(v.holding, holding, "{remotes:?}: {v:?}");
            assert_eq!(v.best.as_deref(), best, "{remotes:?}");
        }
    }

    #[test]
    fn a_new_primary_waits_the_bound_for_a_remote_standby_before_it_holds() {
        let (log, now) = writing(3);
        let nobody = [("b".to_string(), None)];
        assert!(!evaluate(&log, now, 5 * S, &nobody).holding, "3 s of log: nothing is 5 s at risk yet");
        let (log, now) = writing(6);
        assert!(evaluate(&log, now, 5 * S, &nobody).holding, "6 s without a remote standby");
    }

    #[test]
    fn an_idle_primary_never_holds_for_a_standby_that_has_everything() {
        let t0 = Instant::now();
        let mut log = PositionLog::new(Duration::from_secs(60));
        for i in 0..100u32 {
            log.record(t0 + S * i, lsn(5000));
        }
        let v = evaluate(&log, t0 + 100 * S, 5 * S, &[("b".into(), Some(lsn(5000)))]);
        assert!(!v.holding, "{v:?}");
        assert_eq!(v.best_lag_ms, Some(0));
        assert!(log.samples.len() <= 2, "an idle primary's log stays small: {}", log.samples.len());
    }

    #[test]
    fn the_log_forgets_beyond_its_horizon_and_restarts_on_a_new_server() {
        let t0 = Instant::now();
        let mut log = PositionLog::new(Duration::from_secs(10));
        for i in 0..100u32 {
            log.record(t0 + S * i, lsn(1000 + u64::from(i)));
        }
        assert!(log.samples.len() <= 12, "{}", log.samples.len());
        // A position behind the last: a new server; the old log means nothing now.
        log.record(t0 + 100 * S, lsn(10));
        assert_eq!(log.lag(t0 + 100 * S, lsn(10)), Duration::ZERO);
        assert_eq!(log.samples.len(), 1);
    }
}
