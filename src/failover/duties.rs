//! The agent's decisions outside `decide`, pure like it: when to stop
//! restarting a crashing server, when a leader is dead, which standbys
//! commits wait for, how a switchover's wait ends, which requests in etcd
//! are carried out and must be cleared, and when a failed action is retried.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::cluster::{ActionFailure, DrSwitch, Epoch, Lsn, MemberStatus, Role, SwitchoverRequest};

/// A server that crashes more often than this within `CRASH_WINDOW` is left stopped.
pub const MAX_CRASHES: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(300);

/// Recent unexpected exits of the server, for bounded restarts.
#[derive(Debug, Clone, Default)]
pub struct Crashes(VecDeque<Instant>);

impl Crashes {
    /// Records a crash at `now` and forgets those older than the window.
    pub fn record(&mut self, now: Instant) {
        self.0.push_back(now);
        while self.0.front().is_some_and(|t| now.saturating_duration_since(*t) > CRASH_WINDOW) {
            self.0.pop_front();
        }
    }

    /// Too many crashes within the window: leave the server stopped.
    pub fn gave_up(&self, now: Instant) -> bool {
        self.0.iter().filter(|t| now.saturating_duration_since(**t) <= CRASH_WINDOW).count() >= MAX_CRASHES
    }
}

/// What a TCP connection attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Accepted: something listens.
    Accepted,
    /// Actively refused: nothing listens there (the host is up).
    Refused,
    /// No answer in time: a partition, or a hung host.
    Silent,
}

/// A leader is dead, and may be removed before its lease expires, only when
/// both its agent API and its PostgreSQL port actively refuse connections:
/// no agent means no PostgreSQL (parent-death signal). Silence proves nothing
/// (a partition drops packets); it leaves the lease to expire as usual.
pub fn leader_is_dead(api: Probe, postgres: Probe) -> bool {
    api == Probe::Refused && postgres == Probe::Refused
}

/// The standbys of `me` that may be named synchronous: fresh, healthy
/// replicas that stream from it now.
pub fn streaming_standbys<'a>(members: &'a [MemberStatus], me: &str) -> Vec<&'a str> {
    members
        .iter()
        .filter(|m| m.role == Role::Replica && m.healthy && m.upstream.as_deref() == Some(me) && m.is_fresh())
        .map(|m| m.node.as_str())
        .collect()
}

/// Where the old primary's wait for the switchover target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// The target has replayed past the final checkpoint: release `leader`.
    Done,
    /// Not yet; look again shortly.
    Waiting,
    /// The deadline passed first.
    TimedOut,
}

/// `final_lsn` is where the old primary's shutdown checkpoint record starts:
/// the target has replayed it only when its replay position lies beyond.
pub fn hand_over(replayed: Option<Lsn>, final_lsn: Lsn, now: Instant, deadline: Instant) -> HandOver {
    if replayed.is_some_and(|r| r > final_lsn) {
        HandOver::Done
    } else if now >= deadline {
        HandOver::TimedOut
    } else {
        HandOver::Waiting
    }
}

/// After a switchover timed out: the old primary may take writes again only
/// if etcd confirmed, by compare-and-swap, that it still holds `leader` of its
/// epoch under its lease, and that lease is still fresh. Otherwise it stays a
/// standby and the HA loop follows whoever leads.
pub fn restart_read_write(still_leader: bool, lease_fresh: bool) -> bool {
    still_leader && lease_fresh
}

/// A request in etcd that has been carried out (or can no longer be) and must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Delete the switchover request.
    ClearSwitchover(SwitchoverRequest),
    /// Mark the DR switch done in this epoch.
    CompleteDr(DrSwitch, Epoch),
}

/// What the leader of `epoch`, running read-write, still has to clear: a
/// switchover request that does not come from it (it was the target and is
/// promoted, or the primary changed under it, so nobody can carry it out), and
/// a DR switch that names it. Idempotent: called every tick until etcd shows
/// nothing left, so one failed write is repaired on the next.
pub fn completions(
    me: &str,
    leader_epoch: Option<Epoch>,
    switchover: Option<&SwitchoverRequest>,
    dr: Option<&DrSwitch>,
) -> Vec<Completion> {
    let Some(epoch) = leader_epoch else { return vec![] };
    let mut out = Vec::new();
    if let Some(sw) = switchover.filter(|sw| sw.aborted.is_none() && sw.from != me) {
        out.push(Completion::ClearSwitchover(sw.clone()));
    }
    if let Some(d) = dr.filter(|d| d.done_epoch.is_none() && d.target == me) {
        out.push(Completion::CompleteDr(d.clone(), epoch));
    }
    out
}

/// Retries of a failed action: 1 s, doubling, at most a minute.
pub fn retry_after(attempts: u32) -> Duration {
    let secs = 1u64 << attempts.saturating_sub(1).min(6);
    Duration::from_secs(secs.min(60))
}

/// The last failed action, shown in the node's report until an action
/// succeeds, and paused before it is tried again.
#[derive(Debug, Clone, Default)]
pub struct Failures {
    last: Option<(ActionFailure, Instant)>,
}

impl Failures {
    /// Whether `action` may be tried at `now` (not within the pause after it failed).
    pub fn may_try(&self, action: &str, now: Instant) -> bool {
        !matches!(&self.last, Some((f, retry_at)) if f.action == action && now < *retry_at)
    }

    /// `action` failed at `now`. `transient` (etcd out of reach) is shown but
    /// retried at once: a failover must not wait on a pause.
    pub fn failed(&mut self, action: &str, error: String, transient: bool, now: Instant) {
        let attempts = match &self.last {
            Some((f, _)) if f.action == action => f.attempts + 1,
            _ => 1,
        };
        let pause = if transient { Duration::ZERO } else { retry_after(attempts) };
        let failure =
            ActionFailure { action: action.to_string(), error, attempts, retry_in_ms: pause.as_millis() as u64 };
        self.last = Some((failure, now + pause));
    }

    /// An action succeeded: whatever failed before is no longer the news.
    pub fn succeeded(&mut self) {
        self.last = None;
    }

    pub fn current(&self) -> Option<&ActionFailure> {
        self.last.as_ref().map(|(f, _)| f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_give_up_after_five_within_the_window() {
        let t0 = Instant::now();
        let mut c = Crashes::default();
        for i in 0..4 {
            c.record(t0 + Duration::from_secs(i));
        }
        assert!(!c.gave_up(t0 + Duration::from_secs(4)), "four crashes are restarted");
        c.record(t0 + Duration::from_secs(4));
        assert!(c.gave_up(t0 + Duration::from_secs(4)), "the fifth within the window gives up");
        assert!(!c.gave_up(t0 + CRASH_WINDOW + Duration::from_secs(1)), "old crashes age out");
        let mut spread = Crashes::default();
        for i in 0..10 {
            spread.record(t0 + CRASH_WINDOW / 2 * i);
        }
        assert!(!spread.gave_up(t0 + CRASH_WINDOW / 2 * 9), "crashes far apart never give up");
    }

    #[test]
    fn only_refusal_on_both_ports_proves_a_dead_leader() {
        use Probe::*;
        for (api, pg, dead) in [
            (Refused, Refused, true),
            (Refused, Silent, false),
            (Silent, Refused, false),
            (Accepted, Refused, false),
            (Refused, Accepted, false),
            (Silent, Silent, false),
        ] {
            assert_eq!(leader_is_dead(api, pg), dead, "{api:?} {pg:?}");
        }
    }

    #[test]
    fn hand_over_ends_past_the_checkpoint_or_at_the_deadline() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(5);
        let fin = Lsn(1000);
        assert_eq!(hand_over(Some(Lsn(1001)), fin, t0, deadline), HandOver::Done);
        assert_eq!(hand_over(Some(Lsn(1000)), fin, t0, deadline), HandOver::Waiting, "at the record is not past it");
        assert_eq!(hand_over(None, fin, t0, deadline), HandOver::Waiting);
        assert_eq!(hand_over(Some(Lsn(999)), fin, deadline, deadline), HandOver::TimedOut);
        assert_eq!(hand_over(Some(Lsn(2000)), fin, deadline, deadline), HandOver::Done, "caught up wins the tie");
        assert!(restart_read_write(true, true));
        assert!(!restart_read_write(false, true) && !restart_read_write(true, false));
    }

    fn sw(from: &str, to: &str) -> SwitchoverRequest {
        SwitchoverRequest {
            from: from.into(),
            to: to.into(),
            requested_by: "t".into(),
            requested_at_ms: 0,
            timeout_ms: 1000,
            final_lsn: Some(Lsn(5)),
            aborted: None,
        }
    }

    fn dr(target: &str) -> DrSwitch {
        DrSwitch {
            active_region: "r2".into(),
            target: target.into(),
            allow_data_loss: false,
            set_by: "t".into(),
            at_ms: 0,
            lost_bytes_estimate: 0,
            done_epoch: None,
            trigger: None,
        }
    }

    #[test]
    fn the_new_leader_clears_what_it_carried_out() {
        let s = sw("a", "b");
        assert_eq!(completions("b", Some(3), Some(&s), None), vec![Completion::ClearSwitchover(s.clone())]);
        assert!(completions("b", None, Some(&s), None).is_empty(), "only a leader clears");
        assert!(completions("a", Some(3), Some(&s), None).is_empty(), "the old primary's own request stays");
        let aborted = SwitchoverRequest { aborted: Some("late".into()), ..s.clone() };
        assert!(completions("b", Some(3), Some(&aborted), None).is_empty(), "an aborted request is a record");
        assert_eq!(
            completions("c", Some(4), Some(&s), None),
            vec![Completion::ClearSwitchover(s.clone())],
            "a request from a former primary can never be carried out"
        );
        let d = dr("b");
        assert_eq!(completions("b", Some(3), None, Some(&d)), vec![Completion::CompleteDr(d.clone(), 3)]);
        assert!(completions("c", Some(3), None, Some(&d)).is_empty(), "a DR switch naming another stays");
        let done = DrSwitch { done_epoch: Some(3), ..d };
        assert!(completions("b", Some(3), None, Some(&done)).is_empty());
    }

    #[test]
    fn a_failure_is_shown_until_an_action_succeeds_and_retried_after_a_growing_pause() {
        let t0 = Instant::now();
        let mut f = Failures::default();
        assert!(f.may_try("clone", t0) && f.current().is_none());
        f.failed("clone", "refused".into(), false, t0);
        assert_eq!(f.current().map(|c| (c.attempts, c.retry_in_ms)), Some((1, 1000)));
        assert!(!f.may_try("clone", t0 + Duration::from_millis(999)), "paused");
        assert!(f.may_try("rewind", t0), "another action is not paused");
        assert!(f.may_try("clone", t0 + Duration::from_secs(1)));
        f.failed("clone", "refused again".into(), false, t0 + Duration::from_secs(1));
        let c = f.current().unwrap();
        assert_eq!((c.attempts, c.retry_in_ms, c.error.as_str()), (2, 2000, "refused again"));
        assert!(!f.may_try("clone", t0 + Duration::from_millis(2999)));
        f.failed("promote", "etcd".into(), true, t0);
        assert_eq!(f.current().map(|c| (c.attempts, c.retry_in_ms)), Some((1, 0)), "a new action counts anew");
        assert!(f.may_try("promote", t0), "etcd out of reach is retried at once");
        f.succeeded();
        assert!(f.current().is_none(), "gone once an action succeeds");
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|a| retry_after(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_after(0).as_secs(), 1);
    }
}
