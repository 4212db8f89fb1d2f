//! The published cluster file: `GET /v1/config[?version=N]` (`meridian config
//! show`), `POST /v1/config/plan` (`config diff`), `POST /v1/config` (`config
//! apply`). Until a file is published, the running one is the file this
//! gateway started with, as version 0.
//!
//! What `apply` publishes: what the running processes take while they run
//! (`config::change::taken_live`: reloadable settings, nodes that join or
//! leave, policies and routing); agents (`agent::published`) and gateways
//! (`view`) take it within two seconds. Everything else is refused with the
//! reason, as is any change `config::change::plan` refuses.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::operations::Refused;
use super::Gateway;
use crate::config::change::{self, Cost, Plan};
use crate::config::Config;
use crate::coord::PublishedConfig;

/// The running file: the published version, or this gateway's own as version 0.
pub async fn running(g: &Gateway) -> Result<PublishedConfig> {
    if let Some(p) = g.coord.published_config().await? {
        return Ok(p);
    }
    Ok(PublishedConfig {
        version: 0,
        text: g.started_with.to_string(),
        applied_by: format!("the file gateway {} started with (nothing published yet)", g.region),
        at_ms: 0,
        cost: Cost::Nothing,
        summary: String::new(),
        purge: Vec::new(),
    })
}

pub async fn version(g: &Gateway, version: u64) -> Result<PublishedConfig> {
    if version == 0 {
        let r = running(g).await?;
        if r.version == 0 {
            return Ok(r);
        }
        return Err(Refused(
            "version 0 is the file the processes started with; it is not kept once one is published".into(),
        )
        .into());
    }
    g.coord
        .published_config_version(version)
        .await?
        .ok_or_else(|| Refused(format!("no version {version} was published")).into())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The new cluster file (TOML).
    pub text: String,
    /// Apply only if this is still the running version (what `diff` showed).
    #[serde(default)]
    pub expect_version: Option<u64>,
    /// Nodes the file removes empty their data directories once they have left.
    #[serde(default)]
    pub purge: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlanAnswer {
    /// The running version the plan is against.
    pub running_version: u64,
    /// The version published by `apply`; None for a plan or when nothing changed.
    pub published: Option<u64>,
    pub plan: Plan,
    /// Changes that are allowed but that meridian does not yet take while it runs.
    pub not_live: Vec<String>,
    /// The etcd member the file adds (as a learner, before publishing) or
    /// removes (after publishing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<change::EtcdChange>,
}

/// Parses `text` (every problem, or Refused) and plans it against the running file.
async fn plan_against_running(g: &Gateway, text: &str) -> Result<(PublishedConfig, Config, PlanAnswer)> {
    let checked = Config::parse(text);
    let Some(mut new) = checked.config.filter(|_| checked.problems.is_empty()) else {
        let problems: Vec<String> = checked.problems.iter().map(|p| p.to_string()).collect();
        return Err(Refused(format!("the new file has {} problem(s): {}", problems.len(), problems.join("; "))).into());
    };
    new.source = g.config().source.clone();
    let current = running(g).await?;
    let mut old = Config::parse(&current.text).config.context("the running cluster file does not parse")?;
    old.source = g.config().source.clone();
    let primary = g.coord.snapshot().await?.leader.map(|l| l.leader.node);
    let plan = change::plan(&old, &new, primary.as_deref());
    let mut not_live: Vec<String> = plan.changes.iter().filter_map(|c| change::taken_live(c).err()).collect();
    let etcd = change::etcd_change(&old, &new).unwrap_or_else(|why| {
        not_live.push(why);
        None
    });
    let answer = PlanAnswer { running_version: current.version, published: None, plan, not_live, etcd };
    Ok((current, new, answer))
}

pub async fn plan(g: &Gateway, req: &PlanRequest) -> Result<PlanAnswer> {
    Ok(plan_against_running(g, &req.text).await?.2)
}

pub async fn apply(g: &Gateway, req: &PlanRequest, who: &str) -> Result<PlanAnswer> {
    let (current, _, mut answer) = plan_against_running(g, &req.text).await?;
    if let Some(expected) = req.expect_version {
        if expected != current.version {
            return Err(Refused(format!(
                "the running file is version {}, not {expected}: someone applied meanwhile; diff again",
                current.version
            ))
            .into());
        }
    }
    if !answer.plan.refused.is_empty() {
        return Err(Refused(format!("refused: {}", answer.plan.refused.join("; "))).into());
    }
    if !answer.not_live.is_empty() {
        return Err(Refused(format!("not applied, nothing changed: {}", answer.not_live.join("; "))).into());
    }
    if answer.plan.changes.is_empty() {
        return Ok(answer);
    }
    let summary = answer
        .plan
        .changes
        .iter()
        .map(|c| {
            format!(
                "{}: {} -> {}",
                c.path,
                c.before.as_deref().unwrap_or("(none)"),
                c.after.as_deref().unwrap_or("(none)")
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let new = PublishedConfig {
        version: current.version + 1,
        text: req.text.clone(),
        applied_by: who.to_string(),
        at_ms: crate::cluster::now_ms(),
        cost: answer.plan.cost(),
        summary,
        purge: Vec::new(),
    };
    let purge = if req.purge { change::removed_nodes(&answer.plan) } else { Vec::new() };
    if req.purge && purge.is_empty() {
        return Err(Refused("--purge, but the file removes no node".into()).into());
    }
    let new = PublishedConfig { purge, ..new };
    // A new region's etcd member joins as a learner first: it must be a
    // member before it can start, and a learner does not vote, so the quorum
    // is what it was until a gateway promotes it (`promote_learners`).
    if let Some(change::EtcdChange::Add { region, url }) = &answer.etcd {
        let peer = crate::deploy::peer_url(url);
        let id = g.coord.add_etcd_learner(&peer).await?;
        tracing::info!("added region {region}'s etcd member {peer} as a learner (id {id:x})");
    }
    let previous = (current.version > 0).then_some(&current);
    if !g.coord.publish_config(previous, &new).await? {
        return Err(Refused("someone published another version meanwhile; diff again".into()).into());
    }
    tracing::info!("published cluster file version {} ({}), applied by {who}", new.version, new.cost);
    // A region that goes takes its member with it; the others still make a quorum (`plan` keeps 3).
    if let Some(change::EtcdChange::Remove { region, url }) = &answer.etcd {
        let peer = crate::deploy::peer_url(url);
        if g.coord.remove_etcd_member(&peer).await? {
            tracing::info!("removed region {region}'s etcd member {peer}");
        }
    }
    answer.published = Some(new.version);
    Ok(answer)
}

/// Every few seconds, promotes etcd learners that have caught up (a region's
/// member added by `apply`). Any gateway may do it; etcd refuses a learner
/// that is behind, and a promotion done twice fails harmlessly.
pub async fn promote_learners(coord: crate::coord::Coord, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
        match coord.promote_etcd_learners().await {
            Ok(names) => {
                for n in names {
                    tracing::info!("promoted etcd learner {n} to a voting member");
                }
            }
            Err(e) => tracing::debug!("failed to {e:#}"),
        }
    }
}
