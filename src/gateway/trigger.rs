//! The trigger-object DR switch (`failover.dr_trigger`): the reference
//! architecture's manual disaster failover, where an operator uploads a file to
//! the object store. Every gateway watches the object; when it appears, one of
//! them (the first to set the DR switch by compare-and-swap) performs
//! `failover --to-region` with the usual lag budget. The object's URL and
//! version are recorded in the DR switch, so the same upload never acts twice;
//! a new upload (a new version) acts again.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::operations::{self, Refused};
use super::Gateway;
use crate::cluster::{now_ms, DrSwitch};
use crate::config::DrTrigger;
use crate::objects::ObjectRef;

const POLL: Duration = Duration::from_millis(500);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn watch(g: Gateway, trigger: DrTrigger, shutdown: CancellationToken) {
    let object = match ObjectRef::open(&trigger.object, &g.config().object_store) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("failed to {e:#}; the DR trigger is not watched");
            return;
        }
    };
    let mut last_note: Option<String> = None;
    let mut note = |msg: String, error: bool| {
        if last_note.as_ref() != Some(&msg) {
            if error {
                tracing::warn!("{msg}");
            } else {
                tracing::info!("{msg}");
            }
            last_note = Some(msg);
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let version = match object.version().await {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                note(format!("failed to {e:#}"), true);
                continue;
            }
        };
        let id = format!("{} {version}", trigger.object);
        let snap = g.view.borrow().snapshot.clone();
        if snap.dr.as_ref().and_then(|d| d.trigger.as_deref()) == Some(id.as_str()) {
            continue;
        }
        // Already active there: record that this upload is handled.
        if let Some(l) = routing_leader_in(&g, &snap, &trigger.region) {
            let dr = DrSwitch {
                active_region: trigger.region.clone(),
                target: l.clone(),
                allow_data_loss: false,
                set_by: format!("trigger object (gateway {})", g.region),
                at_ms: now_ms(),
                lost_bytes_estimate: 0,
                done_epoch: Some(snap.epoch),
                trigger: Some(id.clone()),
            };
            match g.coord.put_dr_unchanged_since(&dr, snap.revision).await {
                Ok(_) => {
                    note(format!("trigger {id} appeared; {l} in {} is already the primary", trigger.region), false)
                }
                Err(e) => note(format!("failed to {e:#}"), true),
            }
            continue;
        }
        tracing::warn!("trigger {id} appeared: failing over to {}", trigger.region);
        match operations::failover_to_region(&g, &trigger.region, false, FAILOVER_TIMEOUT, Some(id.clone())).await {
            Ok(report) => {
                tracing::warn!("DR failover by trigger done: {} is primary (epoch {})", report.to, report.epoch)
            }
            Err(e) => match e.downcast_ref::<Refused>() {
                Some(r) => note(format!("trigger {id}: DR failover to {} refused: {}", trigger.region, r.0), true),
                None => note(format!("trigger {id}: DR failover to {} failed: {e:#}", trigger.region), true),
            },
        }
    }
}

/// The leader, if it is in `region`.
fn routing_leader_in(g: &Gateway, snap: &crate::coord::Snapshot, region: &str) -> Option<String> {
    let l = &snap.leader.as_ref()?.leader;
    let config = g.config();
    let (r, _) = config.node(&l.node).ok()?;
    (r.name == region).then(|| l.node.clone())
}
