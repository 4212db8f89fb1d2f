//! Operator actions: planned switchover and declared-disaster failover. The
//! gateway validates, writes the request to etcd, and watches the agents carry
//! it out, timing each step. Agents never act on a request that is not in etcd,
//! so a gateway that dies midway leaves a request they finish (or abort) alone.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::Gateway;
use crate::cluster::{human_bytes, now_ms, DrSwitch, Epoch, MemberStatus, Role, SwitchoverRequest};
use crate::coord::Snapshot;
use crate::failover;

/// How long past an agent's deadline the gateway keeps watching for its outcome.
const OBSERVE_GRACE: Duration = Duration::from_secs(10);

/// A refusal the operator should read (HTTP 409), as opposed to an outage (503).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    /// Duration of this step alone.
    pub ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationReport {
    pub kind: String,
    pub from: Option<String>,
    pub to: String,
    pub epoch: Epoch,
    pub lost_bytes_estimate: u64,
    pub steps: Vec<Step>,
    pub total_ms: u64,
}

/// Records step durations as conditions become true.
struct Clock {
    started: Instant,
    last: Instant,
    steps: Vec<Step>,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock { started: now, last: now, steps: Vec::new() }
    }
    fn step(&mut self, what: impl Into<String>) {
        let now = Instant::now();
        self.steps.push(Step { step: what.into(), ms: now.duration_since(self.last).as_millis() as u64 });
        self.last = now;
    }
    fn total_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

fn fresh(m: &MemberStatus) -> bool {
    m.is_fresh()
}

fn report<'a>(s: &'a Snapshot, node: &str) -> Option<&'a MemberStatus> {
    s.members.iter().find(|m| m.node == node && fresh(m))
}

/// Polls etcd until `ready` says yes, or fails with `what` at the deadline.
async fn until<T>(g: &Gateway, deadline: Instant, what: &str, ready: impl Fn(&Snapshot) -> Option<T>) -> Result<T> {
    loop {
        if let Ok(s) = g.coord.snapshot().await {
            if let Some(v) = ready(&s) {
                return Ok(v);
            }
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `node`'s fresh report, if it is a healthy replica streaming from `leader`;
/// else the refusal that says what it is.
fn streaming_replica<'a>(s: &'a Snapshot, node: &str, leader: &str) -> Result<&'a MemberStatus, Refused> {
    let Some(r) = report(s, node) else {
        return Err(Refused(format!("{node} has no fresh report; is its agent running?")));
    };
    if r.role != Role::Replica || !r.healthy || r.upstream.as_deref() != Some(leader) {
        return Err(Refused(format!(
            "{node} is not a healthy replica streaming from {leader} (role {}, {})",
            r.role,
            r.detail.clone().unwrap_or_else(|| "no detail".into())
        )));
    }
    Ok(r)
}

/// Planned switchover to `to`, RPO 0.
pub async fn switchover(g: &Gateway, to: &str, timeout: Duration) -> Result<OperationReport> {
    g.config().node(to).map_err(|e| Refused(format!("{e:#}")))?;
    let s = g.coord.snapshot().await?;
    let Some(leader) = s.leader.as_ref().map(|l| l.leader.clone()) else {
        return Err(Refused("there is no primary to switch over from".into()).into());
    };
    if leader.node == to {
        return Err(Refused(format!("{to} is already the primary")).into());
    }
    streaming_replica(&s, to, &leader.node)?;
    if let Some(r) = &s.restore {
        return Err(Refused(format!(
            "a restore is replacing the cluster's data (onto {}); try again after it",
            r.node
        ))
        .into());
    }
    let replace = match &s.switchover {
        Some(sw) if sw.aborted.is_none() => {
            return Err(Refused(format!("a switchover from {} to {} is already in progress", sw.from, sw.to)).into())
        }
        other => other.clone(),
    };
    let mut clock = Clock::new();
    // The old primary gives up at the request's deadline; watch a little longer
    // so that its decision, not our own timeout, is what gets reported.
    let deadline = Instant::now() + timeout + OBSERVE_GRACE;
    let request = SwitchoverRequest {
        from: leader.node.clone(),
        to: to.to_string(),
        requested_by: format!("gateway {}", g.region),
        requested_at_ms: now_ms(),
        timeout_ms: timeout.as_millis() as u64,
        final_lsn: None,
        aborted: None,
    };
    if !g.coord.request_switchover(&request, replace.as_ref()).await? {
        return Err(Refused("another switchover was requested at the same time".into()).into());
    }
    clock.step(format!("validated {to} and requested the switchover"));

    let from = leader.node.clone();
    let stopped = until(g, deadline, "the old primary to stop cleanly", |s| match &s.switchover {
        Some(sw) if sw.aborted.is_some() => Some(Err(sw.aborted.clone().unwrap_or_default())),
        Some(sw) if sw.final_lsn.is_some() => Some(Ok(sw.final_lsn)),
        None => Some(Ok(None)), // already finished by the target
        _ => None,
    })
    .await?;
    let final_lsn = match stopped {
        Ok(lsn) => lsn,
        Err(why) => {
            clear_aborted(g).await;
            return Err(Refused(format!("switchover aborted; {from} stays primary: {why}")).into());
        }
    };
    clock.step(format!(
        "{from} stopped cleanly{}",
        final_lsn.map(|l| format!(" (final checkpoint {l}); writes paused")).unwrap_or_default()
    ));
    // Until the target takes over, the old primary may still abort and come back.
    let outcome = until(g, deadline, &format!("{to} to replay the final checkpoint"), |s| {
        if let Some(sw) = s.switchover.as_ref().filter(|sw| sw.aborted.is_some()) {
            return Some(Err(sw.aborted.clone().unwrap_or_default()));
        }
        (s.leader.as_ref().is_none_or(|l| l.leader.node != from)).then_some(Ok(()))
    })
    .await?;
    if let Err(why) = outcome {
        clear_aborted(g).await;
        return Err(Refused(format!("switchover aborted; {from} stays primary: {why}")).into());
    }
    clock.step(format!("{to} replayed the final checkpoint; {from} released leader"));
    let epoch = until(g, deadline, &format!("{to} to be promoted"), |s| {
        let l = s.leader.as_ref()?;
        let r = report(s, to)?;
        (l.leader.node == to && r.role == Role::Primary && r.healthy).then_some(l.leader.epoch)
    })
    .await?;
    clock.step(format!("{to} promoted (epoch {epoch}); writes resume"));
    // The old primary rejoins; worth waiting for, but the switchover is done either way.
    let rejoin_deadline =
        Instant::now() + Duration::from_secs(30).min(deadline.saturating_duration_since(Instant::now()));
    if until(g, rejoin_deadline, &format!("{from} to follow"), |s| {
        report(s, &from)
            .filter(|r| r.role == Role::Replica && r.healthy && r.upstream.as_deref() == Some(to))
            .map(|_| ())
    })
    .await
    .is_ok()
    {
        clock.step(format!("{from} follows {to} as a replica"));
    }
    Ok(OperationReport {
        kind: "switchover".into(),
        from: Some(from),
        to: to.to_string(),
        epoch,
        lost_bytes_estimate: 0,
        total_ms: clock.total_ms(),
        steps: clock.steps,
    })
}

/// Restarts one replica's PostgreSQL (`meridian rolling-restart` asks for one
/// node at a time): writes a `restart` request naming it, waits until its
/// agent reports the request carried out and the node streams from the
/// primary again, healthy, then deletes the request. The primary's node is
/// refused: switch over first.
pub async fn restart_node(g: &Gateway, node: &str, reason: &str, timeout: Duration) -> Result<OperationReport> {
    g.config().node(node).map_err(|e| Refused(format!("{e:#}")))?;
    let s = g.coord.snapshot().await?;
    let Some(leader) = s.leader.as_ref().map(|l| l.leader.clone()) else {
        return Err(Refused("there is no primary: a restart now could cost the only running copy".into()).into());
    };
    if leader.node == node {
        return Err(Refused(format!("{node} is the primary: switch over to another node first")).into());
    }
    streaming_replica(&s, node, &leader.node)?;
    if let Some(sw) = s.switchover.as_ref().filter(|sw| sw.aborted.is_none()) {
        return Err(Refused(format!("a switchover from {} to {} is in progress", sw.from, sw.to)).into());
    }
    // A request left by a gateway that died midway may be replaced once carried
    // out, or once it cannot be (its node runs the primary, or does not report:
    // its next start is the restart).
    let replace = match &s.restart {
        Some(r)
            if report(&s, &r.node)
                .is_some_and(|m| m.role == Role::Replica && m.restarted_for.as_deref() != Some(r.id.as_str())) =>
        {
            return Err(Refused(format!("a restart of {} is in progress ({})", r.node, r.reason)).into())
        }
        other => other.clone(),
    };
    let mut clock = Clock::new();
    let deadline = Instant::now() + timeout;
    let request = crate::cluster::RestartRequest {
        id: format!("{}-{node}-{}", now_ms(), std::process::id()),
        node: node.to_string(),
        reason: reason.to_string(),
        requested_by: format!("gateway {}", g.region),
        requested_at_ms: now_ms(),
    };
    if !g.coord.put_restart(replace.as_ref(), Some(&request)).await? {
        return Err(Refused("another restart or a switchover was requested at the same time".into()).into());
    }
    clock.step(format!("asked {node} to restart"));
    let leader_node = leader.node.clone();
    let done = until(g, deadline, &format!("{node} to restart and stream from {leader_node} again"), |s| {
        let r = report(s, node)?;
        let carried_out = r.restarted_for.as_deref() == Some(request.id.as_str());
        (carried_out && r.role == Role::Replica && r.healthy && r.upstream.as_deref() == Some(leader_node.as_str()))
            .then_some(())
    })
    .await;
    // Carried out or not, the request goes: a node that restarts later on its own takes it anyway.
    let _ = g.coord.put_restart(Some(&request), None).await;
    done?;
    clock.step(format!("{node} restarted and streams from {leader_node}"));
    Ok(OperationReport {
        kind: "restart".into(),
        from: None,
        to: node.to_string(),
        epoch: leader.epoch,
        lost_bytes_estimate: 0,
        total_ms: clock.total_ms(),
        steps: clock.steps,
    })
}

/// Removes an aborted switchover request once its outcome has been reported.
async fn clear_aborted(g: &Gateway) {
    if let Ok(Some(sw)) = g.coord.snapshot().await.map(|s| s.switchover) {
        if sw.aborted.is_some() {
            let _ = g.coord.update_switchover(&sw, None).await;
        }
    }
}

/// A declared disaster: make `region` active and promote its best node.
pub async fn failover_to_region(
    g: &Gateway,
    region: &str,
    allow_data_loss: bool,
    timeout: Duration,
    trigger: Option<String>,
) -> Result<OperationReport> {
    let config = g.config();
    let r = config.region(region).map_err(|e| Refused(format!("{e:#}")))?;
    if r.nodes.is_empty() {
        return Err(Refused(format!("region {region} has no database nodes")).into());
    }
    let s = g.coord.snapshot().await?;
    let current = s.leader.as_ref().map(|l| l.leader.clone());
    if let Some(l) = &current {
        if r.nodes.iter().any(|n| n.name == l.node) {
            return Err(Refused(format!("{} in {region} is already the primary", l.node)).into());
        }
    }
    // The best standby of the region, by WAL received (what a promotion ends up with).
    let mut candidates: Vec<&MemberStatus> = s
        .members
        .iter()
        .filter(|m| fresh(m) && m.region == region && matches!(m.role, Role::Replica | Role::Fenced))
        .collect();
    candidates.sort_by(|a, b| b.write_lsn.cmp(&a.write_lsn).then(a.node.cmp(&b.node)));
    let Some(best) = candidates.first() else {
        return Err(Refused(format!("region {region} has no running standby to promote")).into());
    };
    // Loss against the live primary's position if it still reports, else its last recorded one.
    let reference = current
        .as_ref()
        .and_then(|l| report(&s, &l.node))
        .and_then(|m| m.write_lsn)
        .or(s.optime.as_ref().map(|o| o.lsn));
    let received = best.write_lsn.or(best.replay_lsn).unwrap_or_default();
    // A standby may have received more than the primary last recorded.
    let furthest_received = s
        .members
        .iter()
        .filter(|m| fresh(m) && matches!(m.role, Role::Replica | Role::Fenced))
        .filter_map(|m| m.write_lsn)
        .max();
    let reference = reference.max(furthest_received);
    let lost = reference.map(|r| r.0.saturating_sub(received.0)).unwrap_or(0);
    // The same budget rule as automatic failover (on replayed WAL); the loss
    // estimate is on received WAL, which the promotion replays.
    if let Some(reference) = reference {
        let candidate = failover::Candidate {
            node: best.node.clone(),
            region: region.to_string(),
            priority: r.priority.unwrap_or(u32::MAX),
            lsn: received,
            replay_lsn: best.replay_lsn.unwrap_or_default(),
            lag_seconds: best.lag_seconds,
            timeline: best.timeline,
            reported_revision: best.revision,
            hung_recently: best.hung_recently,
        };
        let last = failover::LastPrimary { node: String::new(), region: String::new(), lsn: reference };
        if let Err(why) = failover::within_budget(&candidate, &last, g.config().failover.max_lag_on_failover) {
            if !allow_data_loss {
                return Err(Refused(format!(
                    "{} is beyond the data-loss budget: {why}; estimated loss {} of acknowledged WAL; pass --allow-data-loss to promote it anyway",
                    best.node,
                    human_bytes(lost)
                ))
                .into());
            }
        }
    }
    // With synchronous replication and the primary gone, the `sync` record
    // says whether the standby surely has every acknowledged commit (what the
    // budget, measured on positions the primary recorded once a second,
    // cannot see: commits acknowledged while it ran asynchronously).
    if current.is_none() && config.replication.synchronous != crate::config::Synchronous::Off && !allow_data_loss {
        let candidates: Vec<failover::Candidate> =
            s.members.iter().filter_map(|m| failover::view::candidate(&config, m)).collect();
        let sync = s.sync.as_ref().filter(|r| r.epoch == s.epoch);
        let former = s.optime.as_ref().is_some_and(|o| o.node == best.node);
        match failover::vouched_reference(&candidates, sync) {
            _ if former => {}
            Ok(v) if received >= v.lsn => {}
            Ok(v) => {
                return Err(Refused(format!(
                    "{} has {} less WAL than {}, which holds every commit the last primary acknowledged; pass --allow-data-loss to promote it anyway",
                    best.node,
                    human_bytes(v.lsn.0.saturating_sub(received.0)),
                    v.node
                ))
                .into())
            }
            Err(why) => {
                return Err(Refused(format!("{} may lack acknowledged commits: {why}", best.node)).into());
            }
        }
    }
    let mut clock = Clock::new();
    let deadline = Instant::now() + timeout;
    let target = best.node.clone();
    let dr = DrSwitch {
        active_region: region.to_string(),
        target: target.clone(),
        allow_data_loss,
        set_by: format!("gateway {}", g.region),
        at_ms: now_ms(),
        lost_bytes_estimate: lost,
        done_epoch: None,
        trigger: trigger.clone(),
    };
    if trigger.is_some() {
        if !g.coord.put_dr_unchanged_since(&dr, s.revision).await? {
            return Err(Refused("the DR switch changed meanwhile (another gateway acted on the trigger)".into()).into());
        }
    } else {
        g.coord.put_dr(&dr).await?;
    }
    clock.step(format!("DR switch set to {region}; promoting {target} (estimated loss {})", human_bytes(lost)));
    if let Some(old) = &current {
        let old = old.node.clone();
        until(g, deadline, &format!("{old} to step down or lose its lease"), |s| {
            s.leader.as_ref().is_none_or(|l| l.leader.node != old).then_some(())
        })
        .await?;
        clock.step(format!("{old} no longer holds leader"));
    }
    let epoch = until(g, deadline, &format!("{target} to be promoted"), |s| {
        let l = s.leader.as_ref()?;
        let r = report(s, &target)?;
        (l.leader.node == target && r.role == Role::Primary && r.healthy).then_some(l.leader.epoch)
    })
    .await?;
    clock.step(format!("{target} promoted (epoch {epoch})"));
    Ok(OperationReport {
        kind: "dr".into(),
        from: current.map(|l| l.node).or(s.optime.as_ref().map(|o| o.node.clone())),
        to: target,
        epoch,
        lost_bytes_estimate: lost,
        total_ms: clock.total_ms(),
        steps: clock.steps,
    })
}
