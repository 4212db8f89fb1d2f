//! Pure decisions: what one node's agent should do next, given what it sees.
//! No I/O here; the agent observes, calls `decide`, and carries the action out.
//!
//! The safety rule comes first and overrides everything: a server running
//! read-write without holding `leader` (with a lease this agent has renewed
//! recently enough) is fenced, i.e. restarted as a standby. When etcd does
//! not answer, the leadership the last answer showed counts as long as the
//! lease it was held under is provably alive.
//!
//! When nobody holds `leader`, every standby ranks the same candidates with
//! `choose`: eligible are standbys with a fresh report, allowed by the
//! within/cross-region mode and within the lag budget of the last primary
//! position recorded in etcd (`optime`); the best has the most WAL, then is
//! not the former primary, then the preferred region, then the first name.
//! Only the best tries to take `leader`; etcd's transaction makes sure at most
//! one succeeds per epoch.

pub mod duties;
mod reason;
mod rewind;
pub mod sync;
pub mod view;
pub use reason::{FenceReason, NoFailover, Refusal, RefusalReason, WaitReason};
pub use rewind::{after_rewind_failure, AfterRewindFailure};

use crate::cluster::{
    DrSwitch, Epoch, Leader, Lsn, PromotionKind, RestoreRequest, RestoreStep, SwitchoverRequest, SyncRecord,
};
use crate::config::{FailoverMode, LagBudget, Synchronous};

/// The local server, as the agent last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// No PGDATA yet.
    Empty,
    /// PGDATA exists, no server running.
    Stopped,
    /// Running read-write.
    Primary,
    /// Running in recovery, streaming from `upstream` (None: configured with nowhere to stream from).
    Standby { upstream: Option<String> },
}

/// A standby that could be promoted, from its agent's fresh report.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub node: String,
    pub region: String,
    /// Its region's priority (lower is preferred).
    pub priority: u32,
    /// WAL received and flushed: a promotion replays all of it (ranks candidates).
    pub lsn: Lsn,
    /// WAL replayed. The budget is measured on it: what is received but not yet
    /// replayed must be replayed before a new primary accepts writes.
    pub replay_lsn: Lsn,
    pub lag_seconds: Option<f64>,
    /// The timeline it replays; None when unknown.
    pub timeline: Option<u32>,
    /// The etcd revision of its report: positions are compared only on
    /// reports written after the leader vanished (revisions, not clocks).
    pub reported_revision: i64,
    /// Its server hung as primary a short while ago (`MemberStatus::hung_recently`).
    pub hung_recently: bool,
}

/// The last primary position recorded in etcd (the `optime` key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastPrimary {
    pub node: String,
    pub region: String,
    pub lsn: Lsn,
}

/// The failover settings of the cluster file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub within_region: FailoverMode,
    pub cross_region: FailoverMode,
    pub max_lag: LagBudget,
    /// `[replication] synchronous`: what the `sync` record must vouch for.
    pub synchronous: Synchronous,
}

/// What etcd says, when it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    pub leader: Option<Leader>,
    /// `leader` is held by this agent's current lease (not a previous incarnation's).
    pub leader_is_my_lease: bool,
    /// The leader's agent reports a healthy primary, so it can serve a base backup.
    pub leader_ready: bool,
    /// The leader's timeline, from its report.
    pub leader_timeline: Option<u32>,
    pub epoch: Epoch,
    pub initialized_by: Option<String>,
    /// Standbys with fresh reports, this node included when it is one.
    pub candidates: Vec<Candidate>,
    pub last_primary: Option<LastPrimary>,
    /// The `sync` record of the current epoch's leader (None: none for this
    /// epoch, which vouches for nothing).
    pub sync: Option<SyncRecord>,
    /// The etcd revision at which this agent first saw no leader. Positions
    /// reported at or before it may have grown since, so candidates are
    /// compared only on reports written later (a revision is etcd's logical
    /// clock: no host's wall clock is involved).
    pub leaderless_since_revision: Option<i64>,
    /// A planned switchover in progress (aborted ones are left out).
    pub switchover: Option<SwitchoverRequest>,
    /// A DR switch not carried out yet.
    pub dr: Option<DrSwitch>,
    /// `meridian restore --replace` in progress.
    pub restore: Option<RestoreRequest>,
}

/// Everything `decide` looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub me: String,
    /// The node the cluster file says creates a new cluster.
    pub bootstrap_node: bool,
    pub local: Local,
    /// The local server's timeline (from its control file when stopped).
    pub local_timeline: Option<u32>,
    /// A running standby has not streamed from its upstream for a while.
    pub stalled: bool,
    /// None when etcd cannot be read (no quorum, partitioned, down).
    pub shared: Option<Shared>,
    /// This agent renewed its lease recently enough that etcd cannot have expired it.
    pub lease_fresh: bool,
    /// The last etcd snapshot that answered showed this node holding `leader`
    /// of the current epoch under the agent's current lease, and that lease
    /// stays provably alive for `view::SILENCE_SPARE` more.
    pub led_with_time_to_spare: bool,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to change.
    Keep,
    /// Create the cluster: take `initialize`, then `leader` with epoch 1, then initdb.
    Bootstrap,
    /// `meridian restore` left a promoted copy of another cluster's data here
    /// and named this node in `initialize`: take `leader` with epoch 1 and
    /// start read-write on it (no initdb).
    AdoptRestored,
    /// Copy the leader's data directory, then start as its standby.
    Clone { from: String },
    /// Nothing can be done now; the reason is shown in status.
    Wait { reason: WaitReason },
    /// Start (or keep) the server read-write: this node holds `leader`.
    StartPrimary,
    /// Start the server in recovery, streaming from `upstream` when there is one.
    StartStandby { upstream: Option<String> },
    /// Point a running standby at a new upstream.
    Follow { upstream: String },
    /// Take `leader` with the next epoch (unless already held) and promote.
    Promote { kind: PromotionKind, reason: String },
    /// Planned switchover, on the old primary: stop cleanly, wait until the
    /// target replayed the shutdown checkpoint, then release `leader`.
    HandOver { to: String },
    /// Declared disaster elsewhere: stop, release `leader`, wait as a standby.
    StepDown { reason: String },
    /// This node's history diverged from the leader's: rewind it, then follow.
    Rejoin { upstream: String },
    /// Restart a read-write server as a standby: it must not take writes.
    Fence { reason: FenceReason },
    /// A restore will replace this node's data: stop the server, leave it stopped.
    StopForRestore,
    /// `meridian restore --replace` put restored, promoted data here: take
    /// `leader` with the next epoch and start it read-write.
    TakeRestored,
}

pub fn decide(v: &NodeView) -> Action {
    match decide_unguarded(v) {
        // A promotion is armed with the lease's deadline: on a lease that is not
        // fresh the supervisor would stop the new primary at once, leaving
        // `leader` held by a stopped server. Take it only with a fresh lease.
        Action::Promote { .. } | Action::TakeRestored if !v.lease_fresh => {
            Action::Wait { reason: WaitReason::LeaseNotFresh }
        }
        action => action,
    }
}

fn decide_unguarded(v: &NodeView) -> Action {
    let holds_leader = v.shared.as_ref().is_some_and(|s| {
        s.leader_is_my_lease && s.leader.as_ref().is_some_and(|l| l.node == v.me && l.epoch == s.epoch)
    }) && v.lease_fresh;

    // etcd silent (an election, a cut network): `leader` is held under this
    // agent's lease, which only this agent releases, which etcd cannot expire
    // while it is fresh, and under which a live primary is never deposed (its
    // ports accept: `duties::leader_is_dead`). The leadership last seen stands
    // while the lease stays provably alive long enough to look once more, so
    // a short silence (an election) costs neither a fence nor a new timeline;
    // the supervisor's deadline backs it.
    if v.local == Local::Primary && v.shared.is_none() && v.lease_fresh && v.led_with_time_to_spare {
        return Action::Keep;
    }
    if v.local == Local::Primary && !holds_leader {
        let reason = match &v.shared {
            None => FenceReason::EtcdUnreachable,
            Some(_) if !v.lease_fresh => FenceReason::LeaseNotRenewed,
            Some(s) => match &s.leader {
                Some(l) if l.node != v.me => FenceReason::OtherLeader { node: l.node.clone(), epoch: l.epoch },
                Some(l) if l.epoch != s.epoch => FenceReason::StaleEpoch { held: l.epoch, current: s.epoch },
                _ => FenceReason::NotHeld,
            },
        };
        return Action::Fence { reason };
    }

    let Some(s) = &v.shared else {
        // Without etcd nothing may change; a stopped server comes up read-only.
        return match v.local {
            Local::Stopped => Action::StartStandby { upstream: None },
            _ => Action::Keep,
        };
    };

    if let Some(action) = s.restore.as_ref().and_then(|r| during_restore(v, s, r, holds_leader)) {
        return action;
    }

    if holds_leader {
        if let Some(dr) = s.dr.as_ref().filter(|d| d.target != v.me) {
            return Action::StepDown {
                reason: format!("the DR switch names {} in {} as the primary", dr.target, dr.active_region),
            };
        }
        if let (Some(sw), Local::Primary) = (&s.switchover, &v.local) {
            if sw.from == v.me && sw.to != v.me && sw.final_lsn.is_none() {
                return Action::HandOver { to: sw.to.clone() };
            }
        }
        return match &v.local {
            Local::Stopped => Action::StartPrimary,
            Local::Standby { .. } => {
                Action::Promote { kind: PromotionKind::Failover, reason: "this node holds leader".into() }
            }
            Local::Primary | Local::Empty => Action::Keep,
        };
    }

    // Operator requests decide who takes an empty leader seat.
    if s.leader.is_none() && matches!(v.local, Local::Standby { .. }) {
        // The old primary releases `leader` once the target has replayed its final
        // checkpoint. If `leader` is gone before that (the old primary died or lost
        // its lease while handing over), the request cannot finish as a switchover:
        // the ordinary failover rules below decide, with their budget.
        let replayed_final = |sw: &SwitchoverRequest| {
            let fin = sw.final_lsn?;
            s.candidates.iter().find(|c| c.node == sw.to).filter(|c| c.replay_lsn > fin).map(|_| ())
        };
        if let Some(sw) = s.switchover.as_ref().filter(|sw| replayed_final(sw).is_some()) {
            return if sw.to == v.me {
                Action::Promote {
                    kind: PromotionKind::Switchover,
                    reason: format!("planned switchover from {}", sw.from),
                }
            } else {
                Action::Wait { reason: WaitReason::SwitchoverInProgress { from: sw.from.clone(), to: sw.to.clone() } }
            };
        }
        if let Some(dr) = &s.dr {
            return if dr.target == v.me {
                Action::Promote {
                    kind: PromotionKind::Dr,
                    reason: format!("{} declared {} the active region", dr.set_by, dr.active_region),
                }
            } else {
                Action::Wait { reason: WaitReason::DrInProgress { target: dr.target.clone() } }
            };
        }
    }

    // Follow, rewind against or start as a standby of a leader only once it reports
    // a healthy primary: before that it may still be promoting and not yet keep
    // slots for its followers.
    let other_leader = s.leader.as_ref().filter(|l| l.node != v.me);
    if let (Some(l), false) = (other_leader, s.leader_ready) {
        let waiting = |to_copy| Action::Wait { reason: WaitReason::LeaderNotReady { leader: l.node.clone(), to_copy } };
        return match v.local {
            Local::Empty => waiting(true),
            Local::Stopped => Action::StartStandby { upstream: None },
            _ => waiting(false),
        };
    }
    let behind_leader = match (v.local_timeline, s.leader_timeline) {
        (Some(mine), Some(theirs)) => mine < theirs,
        _ => false,
    };
    match (&v.local, other_leader) {
        (Local::Empty, Some(l)) if s.leader_ready => Action::Clone { from: l.node.clone() },
        (Local::Empty, Some(l)) => {
            Action::Wait { reason: WaitReason::LeaderNotReady { leader: l.node.clone(), to_copy: true } }
        }
        (Local::Empty, None) => {
            let mine = s.initialized_by.as_deref() == Some(v.me.as_str());
            let unclaimed = s.initialized_by.is_none() && v.bootstrap_node;
            if s.leader.is_none() && s.epoch <= 1 && (mine || unclaimed) {
                Action::Bootstrap
            } else {
                Action::Wait { reason: WaitReason::NoData }
            }
        }
        // A timeline behind the leader's may have diverged (a former primary):
        // pg_rewind finds out, and is quick when nothing diverged.
        (Local::Stopped, Some(l)) if behind_leader => Action::Rejoin { upstream: l.node.clone() },
        (Local::Stopped, Some(l)) => Action::StartStandby { upstream: Some(l.node.clone()) },
        // Only a restore leaves data, `initialize` naming this node and no epoch yet:
        // a bootstrap takes epoch 1 before its initdb writes anything.
        (Local::Stopped, None)
            if s.leader.is_none() && s.epoch == 0 && s.initialized_by.as_deref() == Some(v.me.as_str()) =>
        {
            Action::AdoptRestored
        }
        (Local::Stopped, None) => Action::StartStandby { upstream: None },
        (Local::Primary, _) => Action::Keep,
        (Local::Standby { upstream }, Some(l)) if upstream.as_deref() != Some(l.node.as_str()) => {
            Action::Follow { upstream: l.node.clone() }
        }
        (Local::Standby { .. }, Some(l)) if v.stalled && behind_leader => Action::Rejoin { upstream: l.node.clone() },
        (Local::Standby { .. }, Some(_)) => Action::Keep,
        (Local::Standby { .. }, None) if s.epoch == 0 => Action::Keep,
        (Local::Standby { .. }, None)
            if s.candidates.iter().any(|c| s.leaderless_since_revision.is_none_or(|r| c.reported_revision <= r)) =>
        {
            Action::Wait { reason: WaitReason::FinalPositions }
        }
        (Local::Standby { .. }, None) => {
            match choose(&s.candidates, s.last_primary.as_ref(), s.sync.as_ref(), &v.policy) {
                Ok(best) if best.node == v.me => {
                    let last =
                        &furthest(s.last_primary.as_ref().expect("choose needs the last primary"), &s.candidates);
                    Action::Promote {
                    kind: PromotionKind::Failover,
                    reason: format!(
                        "leader {} is gone; this node has the most WAL of the eligible standbys ({} behind its last position)",
                        last.node,
                        crate::cluster::human_bytes(last.lsn.0.saturating_sub(best.lsn.0))
                    ),
                }
                }
                Ok(best) => Action::Wait { reason: WaitReason::OtherCandidate { node: best.node } },
                Err(why) => Action::Wait { reason: WaitReason::NoFailover { why } },
            }
        }
    }
}

/// While `meridian restore --replace` runs: the primary steps down, the
/// restore's node stops and stays stopped until its restored data is in
/// place, then takes `leader`; nobody else promotes in between. Once the
/// restored node leads, the ordinary rules bring the others along (a rewind
/// to the new timeline, or a fresh copy). None: the ordinary rules apply.
fn during_restore(v: &NodeView, s: &Shared, r: &RestoreRequest, holds_leader: bool) -> Option<Action> {
    let restored = matches!(r.state, RestoreStep::Restored { .. });
    let waiting = || Action::Wait { reason: WaitReason::RestoreInProgress { node: r.node.clone() } };
    if holds_leader {
        if r.node == v.me && restored {
            return None;
        }
        return Some(Action::StepDown {
            reason: format!("{} replaces the cluster's data with backup {} ({})", r.requested_by, r.backup, r.target),
        });
    }
    if r.node == v.me {
        return Some(match &v.local {
            Local::Primary | Local::Standby { .. } => Action::StopForRestore,
            Local::Stopped if restored && s.leader.is_none() => Action::TakeRestored,
            Local::Stopped | Local::Empty => waiting(),
        });
    }
    s.leader.is_none().then(waiting)
}

/// The standby to promote when the leader is gone, or why there is none.
///
/// With `[replication] synchronous`, the `sync` record decides first: when
/// it vouches for standbys and all of them report, a candidate must have at
/// least the WAL of the most advanced of them (which has every acknowledged
/// commit). When it vouches for none (the last primary ran asynchronously at
/// some point of its epoch) or one of them does not report, `remote` promotes
/// only the former primary itself, back from a fence or a crash: any other
/// promotion could lose acknowledged commits, and only an operator may accept
/// that (`meridian failover --to-region --allow-data-loss`).
/// `region` then falls back to the budget, as `off` always does: its
/// promise covers a failover within the region, not the region's loss.
pub fn choose(
    candidates: &[Candidate],
    last: Option<&LastPrimary>,
    sync: Option<&SyncRecord>,
    policy: &Policy,
) -> Result<Candidate, NoFailover> {
    let Some(last) = last else {
        return Err(NoFailover::NoLastPosition);
    };
    let last = &furthest(last, candidates);
    let (complete, unvouched) = match policy.synchronous {
        Synchronous::Off => (None, None),
        _ => match vouched_reference(candidates, sync) {
            Ok(c) => (Some(c), None),
            Err(why) => (None, Some(why)),
        },
    };
    let missing = match &unvouched {
        Some(NoFailover::SynchronousMissing { missing }) => missing.clone(),
        _ => Vec::new(),
    };
    // Unvouched, only the former primary itself surely has its acknowledged
    // commits (a promotion replays all the WAL it holds).
    let only_former = policy.synchronous == Synchronous::Remote && complete.is_none();
    if only_former && !candidates.iter().any(|c| c.node == last.node) {
        return Err(unvouched.unwrap_or(NoFailover::NotVouched { epoch: None }));
    }
    let mut refusals = Vec::new();
    let mut eligible: Vec<&Candidate> = Vec::new();
    // A copy on an older timeline than another candidate's may have diverged
    // (a former primary whose rewind has not succeeded yet): promoting it
    // could discard what the newer timeline acknowledged.
    let newest_timeline = candidates.iter().filter_map(|c| c.timeline).max();
    for c in candidates {
        if let (Some(mine), Some(newest)) = (c.timeline, newest_timeline) {
            if mine < newest {
                refusals.push(Refusal { node: c.node.clone(), why: RefusalReason::OlderTimeline { mine, newest } });
                continue;
            }
        }
        let same_region = c.region == last.region;
        let mode = if same_region { policy.within_region } else { policy.cross_region };
        if mode == FailoverMode::Manual {
            refusals.push(Refusal { node: c.node.clone(), why: RefusalReason::Manual { cross_region: !same_region } });
            continue;
        }
        if only_former && c.node != last.node {
            refusals.push(Refusal { node: c.node.clone(), why: RefusalReason::Unvouched { missing: missing.clone() } });
            continue;
        }
        if let Some(s) = complete.filter(|s| c.lsn < s.lsn) {
            refusals.push(Refusal {
                node: c.node.clone(),
                why: RefusalReason::BehindSynchronous { standby: s.node.clone(), behind_bytes: s.lsn.0 - c.lsn.0 },
            });
            continue;
        }
        if let Err(why) = within_budget(c, last, policy.max_lag) {
            refusals.push(Refusal { node: c.node.clone(), why });
            continue;
        }
        eligible.push(c);
    }
    // A node whose server hung as primary moments ago stands aside while
    // another may take over, though it has the most WAL: whatever hung it may
    // hang it again (and an unvouched `remote` cluster can promote only it).
    if eligible.iter().any(|c| !c.hung_recently) {
        eligible.retain(|c| !c.hung_recently);
    }
    // Among equals, the former primary ranks last: it lost `leader` to a crash, a
    // hang or a fence, and its restarted server has shown nothing yet.
    let was_primary = |c: &Candidate| c.node == last.node;
    eligible.sort_by(|a, b| {
        b.lsn
            .cmp(&a.lsn)
            .then(was_primary(a).cmp(&was_primary(b)))
            .then(a.priority.cmp(&b.priority))
            .then(a.node.cmp(&b.node))
    });
    match eligible.first() {
        Some(best) => Ok((*best).clone()),
        None if refusals.is_empty() => Err(NoFailover::NoStandbys),
        None => Err(NoFailover::Refused { refusals }),
    }
}

/// The most advanced of the standbys the `sync` record vouches for, which has
/// every commit the last primary acknowledged, provided all of them report
/// (any of them may be the one with the newest commits); else why there is
/// none.
pub fn vouched_reference<'a>(
    candidates: &'a [Candidate],
    sync: Option<&SyncRecord>,
) -> Result<&'a Candidate, NoFailover> {
    let vouched: &[String] = sync.map(|r| r.standbys.as_slice()).unwrap_or_default();
    let missing: Vec<String> = vouched.iter().filter(|n| !candidates.iter().any(|c| &c.node == *n)).cloned().collect();
    if !missing.is_empty() {
        return Err(NoFailover::SynchronousMissing { missing });
    }
    candidates
        .iter()
        .filter(|c| vouched.contains(&c.node))
        .max_by_key(|c| c.lsn)
        .ok_or(NoFailover::NotVouched { epoch: sync.map(|r| r.epoch) })
}

/// The furthest position the old primary is known to have reached: its last
/// recorded position (written once a second), or what a standby received
/// after that, whichever is further. Judging the budget against the recorded
/// position alone would understate the lag right after a burst of writes.
pub fn furthest(last: &LastPrimary, candidates: &[Candidate]) -> LastPrimary {
    let received = candidates.iter().map(|c| c.lsn).max().unwrap_or_default();
    LastPrimary { lsn: last.lsn.max(received), ..last.clone() }
}

/// Whether promoting `c` loses no more than the budget, by the last recorded primary position.
pub fn within_budget(c: &Candidate, last: &LastPrimary, budget: LagBudget) -> Result<(), RefusalReason> {
    match budget {
        LagBudget::Bytes(max) => {
            let behind = last.lsn.0.saturating_sub(c.replay_lsn.0);
            if behind > max {
                return Err(RefusalReason::ReplayBehind { behind_bytes: behind, budget_bytes: max });
            }
        }
        LagBudget::Time(max) => match c.lag_seconds {
            Some(s) if s <= max.as_secs_f64() => {}
            Some(s) => {
                let ms = |secs: f64| (secs * 1000.0).round() as u64;
                return Err(RefusalReason::TimeBehind { behind_ms: ms(s), budget_ms: max.as_millis() as u64 });
            }
            None => return Err(RefusalReason::LagUnknown),
        },
    }
    Ok(())
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
