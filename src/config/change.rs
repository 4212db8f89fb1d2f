//! What changing the running cluster file to a new one changes, what each
//! change costs, and which changes are refused (`meridian config diff` and
//! `config apply`). Pure: two parsed files and the current primary in, a plan
//! out.
//!
//! Both files are compared field by field (regions and nodes matched by name,
//! other lists as a whole). Each changed field gets a cost:
//!
//! - `nothing`: meridian's processes take it as it is published;
//! - `reload`: PostgreSQL rereads its configuration (a `sighup` setting);
//! - `rolling-restart`: every PostgreSQL restarts, replicas first, then a
//!   switchover, then the old primary (a `postmaster` setting);
//! - `membership`: a node, a region or an etcd member joins or leaves.
//!
//! Refused, with the reason: renaming the cluster (every key lives under
//! its name), moving a node's data directory or address (remove the node and
//! add it under a new name), removing the primary's node or the region that
//! holds the primary (switch over first), removing the last node of a region
//! that keeps a priority, and changing more than one etcd member at a time.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Config;

/// PostgreSQL 15's settings of context `postmaster` (from its guc.c): a change
/// takes a restart. Every other setting takes a reload.
pub const RESTART_SETTINGS: &[&str] = &[
    "archive_mode",
    "autovacuum_freeze_max_age",
    "autovacuum_max_workers",
    "autovacuum_multixact_freeze_max_age",
    "bonjour",
    "bonjour_name",
    "data_sync_retry",
    "dynamic_shared_memory_type",
    "event_source",
    "external_pid_file",
    "huge_page_size",
    "huge_pages",
    "ignore_invalid_pages",
    "jit_provider",
    "logging_collector",
    "max_connections",
    "max_files_per_process",
    "max_locks_per_transaction",
    "max_logical_replication_workers",
    "max_pred_locks_per_transaction",
    "max_prepared_transactions",
    "max_replication_slots",
    "max_wal_senders",
    "max_worker_processes",
    "min_dynamic_shared_memory",
    "old_snapshot_threshold",
    "shared_buffers",
    "shared_memory_type",
    "shared_preload_libraries",
    "superuser_reserved_connections",
    "track_activity_query_size",
    "track_commit_timestamp",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_buffers",
    "wal_decode_buffer_size",
    "wal_level",
    "wal_log_hints",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cost {
    Nothing,
    Reload,
    RollingRestart,
    Membership,
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cost::Nothing => "nothing",
            Cost::Reload => "reload",
            Cost::RollingRestart => "rolling restart",
            Cost::Membership => "membership change",
        })
    }
}

/// One changed field: its path (`postgres.settings.work_mem`,
/// `region[ap-south-1].node[ap-south-1b]`), the values before and after (None
/// when absent), and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub cost: Cost,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Why the new file may not replace the running one; empty when it may.
    pub refused: Vec<String>,
}

impl Plan {
    /// The largest cost of any change (`nothing` when nothing changes).
    pub fn cost(&self) -> Cost {
        self.changes.iter().map(|c| c.cost).max().unwrap_or(Cost::Nothing)
    }
}

/// The plan for replacing `running` with `new`; `primary` is the node that
/// leads now, if any.
pub fn plan(running: &Config, new: &Config, primary: Option<&str>) -> Plan {
    let mut before = BTreeMap::new();
    let mut after = BTreeMap::new();
    flatten("", &keyed(running), &mut before);
    flatten("", &keyed(new), &mut after);
    let owners_before = owners(running);
    let owners_after = owners(new);
    let mut plan = Plan::default();
    // Whole regions and nodes that come or go: one change each, not one per field.
    for (owner, summary) in &owners_before {
        if !owners_after.contains_key(owner) {
            plan.changes.push(Change {
                path: owner.clone(),
                before: Some(summary.clone()),
                after: None,
                cost: Cost::Membership,
            });
        }
    }
    for (owner, summary) in &owners_after {
        if !owners_before.contains_key(owner) {
            plan.changes.push(Change {
                path: owner.clone(),
                before: None,
                after: Some(summary.clone()),
                cost: Cost::Membership,
            });
        }
    }
    let paths: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for path in paths {
        let (b, a) = (before.get(path), after.get(path));
        if b == a {
            continue;
        }
        // Inside a node or region that comes or goes: said above.
        let comes_or_goes = |o: &str| !(owners_before.contains_key(o) && owners_after.contains_key(o));
        if owner_chain(path).iter().any(|o| comes_or_goes(o)) {
            continue;
        }
        plan.changes.push(Change {
            path: path.clone(),
            before: b.map(render),
            after: a.map(render),
            cost: cost_of(path),
        });
    }
    plan.changes.sort_by(|x, y| x.path.cmp(&y.path));
    plan.refused = refusals(running, new, primary);
    plan
}

/// Every region and node of a config by its path, with a one-line summary.
fn owners(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for r in &config.regions {
        let kind = if r.nodes.is_empty() { "witness region" } else { "region" };
        out.insert(format!("region[{}]", r.name), format!("{kind}, gateway {}", r.gateway.api));
        for n in &r.nodes {
            out.insert(format!("region[{}].node[{}]", r.name, n.name), format!("node at {}", n.address));
        }
    }
    out
}

/// The config as JSON with regions and nodes as objects keyed by name, so a
/// reordered list is no change and a field of one node has a stable path.
fn keyed(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).expect("a config serializes");
    if let Some(obj) = v.as_object_mut() {
        obj.remove("source");
        let regions = obj.remove("region").unwrap_or(Value::Null);
        let mut by_name = serde_json::Map::new();
        for mut r in regions.as_array().cloned().unwrap_or_default() {
            let name = r["name"].as_str().unwrap_or_default().to_string();
            if let Some(ro) = r.as_object_mut() {
                ro.remove("name");
                let nodes = ro.remove("node").unwrap_or(Value::Null);
                let mut nodes_by_name = serde_json::Map::new();
                for mut n in nodes.as_array().cloned().unwrap_or_default() {
                    let node = n["name"].as_str().unwrap_or_default().to_string();
                    if let Some(no) = n.as_object_mut() {
                        no.remove("name");
                    }
                    nodes_by_name.insert(format!("node[{node}]"), n);
                }
                for (k, n) in nodes_by_name {
                    ro.insert(k, n);
                }
            }
            by_name.insert(format!("region[{name}]"), r);
        }
        for (k, r) in by_name {
            obj.insert(k, r);
        }
    }
    v
}

/// Leaves of `v` by dotted path; lists are leaves.
fn flatten(path: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten(&p, v, out);
            }
        }
        Value::Null => {}
        other => {
            out.insert(path.to_string(), other.clone());
        }
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The region and node a path lies in: `[region[r]]` or `[region[r], region[r].node[n]]`.
fn owner_chain(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if !path.starts_with("region[") {
        return out;
    }
    let Some(region_end) = path.find(']').map(|i| i + 1) else { return out };
    out.push(&path[..region_end]);
    if let Some(rest) = path[region_end..].strip_prefix(".node[") {
        if let Some(i) = rest.find(']') {
            out.push(&path[..region_end + ".node[".len() + i + 1]);
        }
    }
    out
}

fn cost_of(path: &str) -> Cost {
    if let Some(setting) = path.strip_prefix("postgres.settings.") {
        return if RESTART_SETTINGS.contains(&setting) { Cost::RollingRestart } else { Cost::Reload };
    }
    if path == "postgres.client_networks" {
        return Cost::Reload; // pg_hba.conf
    }
    if path.starts_with("region[") && path.ends_with("].priority") {
        return Cost::Nothing;
    }
    if path == "etcd.endpoints" || path.ends_with(".etcd") {
        return Cost::Membership;
    }
    if path.starts_with("region[") {
        // A node's or a gateway's addresses: the process moves.
        return Cost::Membership;
    }
    Cost::Nothing
}

/// The nodes a plan adds and removes, by name.
pub fn added_nodes(plan: &Plan) -> Vec<String> {
    node_changes(plan, |c| c.before.is_none())
}

pub fn removed_nodes(plan: &Plan) -> Vec<String> {
    node_changes(plan, |c| c.after.is_none())
}

/// The regions a plan adds and removes, by name (their nodes are in `added_nodes`/`removed_nodes`).
pub fn added_regions(plan: &Plan) -> Vec<String> {
    region_changes(plan, |c| c.before.is_none())
}

pub fn removed_regions(plan: &Plan) -> Vec<String> {
    region_changes(plan, |c| c.after.is_none())
}

fn region_changes(plan: &Plan, pick: impl Fn(&Change) -> bool) -> Vec<String> {
    plan.changes
        .iter()
        .filter(|c| c.cost == Cost::Membership && pick(c) && owner_chain(&c.path).len() == 1 && !c.path.contains('.'))
        .filter_map(|c| c.path.strip_prefix("region[").map(|n| n.trim_end_matches(']').to_string()))
        .collect()
}

fn node_changes(plan: &Plan, pick: impl Fn(&Change) -> bool) -> Vec<String> {
    plan.changes
        .iter()
        .filter(|c| c.cost == Cost::Membership && pick(c))
        .filter_map(|c| c.path.split_once("].node[").map(|(_, n)| n.trim_end_matches(']').to_string()))
        .collect()
}

/// The one etcd member a file adds or removes, with its region's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtcdChange {
    /// Added as a learner before the file is published; promoted once it has caught up.
    Add { region: String, url: String },
    /// Removed once the file is published.
    Remove { region: String, url: String },
}

/// What `apply` must do to etcd's membership for `new`: nothing, or add or
/// remove the member of a region that comes or goes. Any other change of
/// `etcd.endpoints` is not taken live (the reason). More than one member at
/// once is refused by `plan`.
pub fn etcd_change(running: &Config, new: &Config) -> Result<Option<EtcdChange>, String> {
    let region_of =
        |c: &Config, url: &str| c.regions.iter().find(|r| r.etcd.as_deref() == Some(url)).map(|r| r.name.clone());
    let has_region = |c: &Config, name: &str| c.regions.iter().any(|r| r.name == name);
    if let Some(url) = new.etcd.endpoints.iter().find(|e| !running.etcd.endpoints.contains(e)) {
        return match region_of(new, url) {
            Some(region) if !has_region(running, &region) => Ok(Some(EtcdChange::Add { region, url: url.clone() })),
            _ => Err(format!(
                "etcd.endpoints: adds {url}, which is not the etcd member of a region the file adds; \
                 changing etcd's members outside adding or removing a region is not built yet"
            )),
        };
    }
    if let Some(url) = running.etcd.endpoints.iter().find(|e| !new.etcd.endpoints.contains(e)) {
        return match region_of(running, url) {
            Some(region) if !has_region(new, &region) => Ok(Some(EtcdChange::Remove { region, url: url.clone() })),
            _ => Err(format!(
                "etcd.endpoints: removes {url}, which is not the etcd member of a region the file removes; \
                 changing etcd's members outside adding or removing a region is not built yet"
            )),
        };
    }
    Ok(None)
}

/// Settings a standby must run with at least the primary's value of (it
/// replays the primary's WAL; PostgreSQL pauses recovery otherwise). A
/// rolling restart restarts standbys first, which suits an increase only.
pub const AT_LEAST_PRIMARYS: &[&str] = &[
    "max_connections",
    "max_locks_per_transaction",
    "max_prepared_transactions",
    "max_wal_senders",
    "max_worker_processes",
];

/// Fields meridian's processes read once, when they start: a change is
/// refused until they can take it while they run.
const AT_START: &[&str] = &[
    "api.",
    "backup.",
    "etcd.",
    "failover.dr_trigger",
    "failover.lease_ttl",
    "failover.primary_probe_timeout",
    "object_store.",
    "postgres.auth_user",
    "postgres.bin_dir",
    "postgres.bootstrap_sql",
    "postgres.monitor_user",
    "postgres.os_user",
    "postgres.replication_user",
    "postgres.secrets_file",
    "tls.",
];

/// Whether the running processes take `c` while they run, or why not.
/// Taken: reloadable settings and client networks (agents reload
/// PostgreSQL), nodes that join or leave (agents clone or leave, gateways
/// route by the new file), and what agents and gateways read on every pass
/// (failover policy, routing, health checks, DNS, priorities).
pub fn taken_live(c: &Change) -> Result<(), String> {
    match c.cost {
        Cost::RollingRestart => {
            let setting = c.path.strip_prefix("postgres.settings.").unwrap_or(&c.path);
            if !AT_LEAST_PRIMARYS.contains(&setting) {
                return Ok(());
            }
            let number = |v: &Option<String>| v.as_deref().and_then(|v| v.trim_matches('"').parse::<i64>().ok());
            match (number(&c.before), number(&c.after)) {
                (Some(before), Some(after)) if after < before => Err(format!(
                    "{}: lowered from {before} to {after}; standbys must run with at least the primary's value, \
                     and a rolling restart restarts them first, so only an increase is taken live",
                    c.path
                )),
                (Some(_), None) => Err(format!(
                    "{}: removed, so PostgreSQL's default applies, which may be lower than the running value; \
                     set the value explicitly (an increase is taken live)",
                    c.path
                )),
                _ => Ok(()),
            }
        }
        Cost::Membership if owner_chain(&c.path).len() == 2 && (c.before.is_none() || c.after.is_none()) => Ok(()),
        // A whole region (its gateway, nodes and etcd member: see `etcd_change`).
        Cost::Membership
            if c.path.starts_with("region[") && owner_chain(&c.path).len() == 1 && !c.path.contains('.') =>
        {
            Ok(())
        }
        Cost::Membership if c.path == "etcd.endpoints" => Ok(()),
        Cost::Membership => Err(format!("{}: moving a gateway or changing etcd's members is not built yet", c.path)),
        _ if AT_START
            .iter()
            .any(|p| c.path == p.trim_end_matches('.') || (p.ends_with('.') && c.path.starts_with(p))) =>
        {
            Err(format!("{}: meridian's processes read this only when they start", c.path))
        }
        _ => Ok(()),
    }
}

fn refusals(running: &Config, new: &Config, primary: Option<&str>) -> Vec<String> {
    let mut why = Vec::new();
    if running.cluster != new.cluster {
        why.push(format!(
            "renames the cluster {:?} to {:?}: every key in etcd lives under its name; restore into a new cluster instead",
            running.cluster, new.cluster
        ));
    }
    for (_, old) in running.nodes() {
        let Ok((_, now)) = new.node(&old.name) else { continue };
        if old.data_dir != now.data_dir {
            why.push(format!(
                "moves node {}'s data directory ({} to {}): remove the node and add it under a new name",
                old.name,
                old.data_dir.display(),
                now.data_dir.display()
            ));
        }
        if old.address != now.address {
            why.push(format!(
                "moves node {}'s address ({} to {}): remove the node and add it under a new name",
                old.name, old.address, now.address
            ));
        }
    }
    if let Some(p) = primary {
        if running.node(p).is_ok() && new.node(p).is_err() {
            why.push(format!("removes node {p}, the primary: switch over to another node first"));
        }
        if let Ok((region, _)) = running.node(p) {
            if !new.regions.iter().any(|r| r.name == region.name) {
                why.push(format!("removes region {}, which holds the primary: switch over first", region.name));
            }
        }
    }
    let old_members: Vec<&String> = running.etcd.endpoints.iter().collect();
    let added = new.etcd.endpoints.iter().filter(|e| !old_members.contains(e)).count();
    let removed = running.etcd.endpoints.iter().filter(|e| !new.etcd.endpoints.contains(e)).count();
    if added + removed > 1 {
        why.push(format!(
            "changes {} etcd members at once ({added} added, {removed} removed): membership changes one member at a time, so quorum is never at risk",
            added + removed
        ));
    }
    if new.etcd.endpoints.len() < 3 && running.etcd.endpoints.len() >= 3 {
        why.push(format!(
            "leaves {} etcd member(s): fewer than 3 cannot lose one and keep a quorum",
            new.etcd.endpoints.len()
        ));
    }
    why
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::lab::topology::{lab_config, LabShape};

    fn lab(nodes_per_region: usize) -> Config {
        lab_config(&LabShape { net: 42, nodes_per_region, ..LabShape::default() }, Path::new("/tmp/lab"))
    }

    fn set(c: &mut Config, setting: &str, value: &str) {
        c.postgres.settings.insert(setting.into(), toml::Value::String(value.into()));
    }

    #[test]
    fn the_same_file_changes_nothing_and_settings_cost_a_reload_or_a_rolling_restart() {
        let running = lab(2);
        let p = plan(&running, &running.clone(), Some("ap-south-1a"));
        assert_eq!(p, Plan::default());
        assert_eq!(p.cost(), Cost::Nothing);

        let mut new = running.clone();
        set(&mut new, "work_mem", "64MB");
        let p = plan(&running, &new, Some("ap-south-1a"));
        assert_eq!(p.changes.len(), 1, "{p:?}");
        assert_eq!(p.changes[0].path, "postgres.settings.work_mem");
        assert_eq!((p.changes[0].before.as_deref(), p.changes[0].after.as_deref()), (None, Some("64MB")));
        assert_eq!(p.cost(), Cost::Reload);
        assert!(p.refused.is_empty());

        set(&mut new, "shared_buffers", "1GB");
        assert_eq!(plan(&running, &new, None).cost(), Cost::RollingRestart);

        let mut new = running.clone();
        new.failover.lease_ttl = std::time::Duration::from_secs(10);
        let p = plan(&running, &new, None);
        assert_eq!(p.changes.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["failover.lease_ttl"]);
        assert_eq!(p.cost(), Cost::Nothing);
    }

    #[test]
    fn a_node_or_region_that_comes_or_goes_is_one_membership_change() {
        let two = lab(2);
        let one = lab(1);
        let p = plan(&one, &two, Some("ap-south-1a"));
        // (The lab's health checks name nodes too: that list changes as well.)
        let paths: Vec<&str> = p.changes.iter().map(|c| c.path.as_str()).filter(|p| p.starts_with("region")).collect();
        assert_eq!(paths, ["region[ap-northeast-1].node[ap-northeast-1b]", "region[ap-south-1].node[ap-south-1b]"]);
        let nodes = p.changes.iter().filter(|c| c.path.starts_with("region"));
        assert!(nodes.clone().all(|c| c.cost == Cost::Membership && c.before.is_none()), "{p:?}");
        assert_eq!(p.cost(), Cost::Membership);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert_eq!(added_nodes(&p), ["ap-northeast-1b", "ap-south-1b"]);
        assert!(removed_nodes(&p).is_empty());
        // And back: removing standbys is allowed.
        let p = plan(&two, &one, Some("ap-south-1a"));
        assert_eq!(removed_nodes(&p), ["ap-northeast-1b", "ap-south-1b"]);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert!(p.changes.iter().filter(|c| c.path.starts_with("region")).all(|c| c.after.is_none()));

        // A region's order in the file is no change.
        let mut reordered = two.clone();
        reordered.regions.reverse();
        assert_eq!(plan(&two, &reordered, None), Plan::default());
    }

    #[test]
    fn unsafe_changes_are_refused_with_the_reason() {
        let running = lab(2);
        let refused = |new: &Config, primary: &str| plan(&running, new, Some(primary)).refused.join("; ");

        let mut new = running.clone();
        new.cluster = "other".into();
        assert!(refused(&new, "ap-south-1a").contains("renames the cluster"));

        let mut new = running.clone();
        new.regions[0].nodes[1].data_dir = "/elsewhere".into();
        assert!(refused(&new, "ap-south-1a").contains("moves node ap-south-1b's data directory"));

        let mut new = running.clone();
        new.regions[0].nodes[1].address = "10.42.1.99:5432".parse().unwrap();
        assert!(refused(&new, "ap-south-1a").contains("moves node ap-south-1b's address"));

        let mut new = running.clone();
        new.regions[0].nodes.remove(0);
        let why = refused(&new, "ap-south-1a");
        assert!(why.contains("removes node ap-south-1a, the primary"), "{why}");
        assert_eq!(refused(&new, "ap-south-1b"), "", "a standby may go");

        let mut new = running.clone();
        new.regions.remove(0);
        new.etcd.endpoints.remove(0);
        let why = refused(&new, "ap-south-1a");
        assert!(why.contains("removes region ap-south-1, which holds the primary"), "{why}");
        assert!(why.contains("leaves 2 etcd member(s)"), "{why}");

        let mut new = running.clone();
        new.etcd.endpoints = vec!["https://10.42.9.1:2379".into(), "https://10.42.9.2:2379".into()];
        assert!(refused(&new, "ap-south-1a").contains("etcd members at once"));
    }

    #[test]
    fn what_the_running_processes_take_live() {
        let running = lab(1);
        let live = |new: &Config| -> Vec<String> {
            plan(&running, new, Some("ap-south-1a")).changes.iter().filter_map(|c| taken_live(c).err()).collect()
        };
        // Taken: a node that joins, a reloadable setting, client networks, a priority, health checks.
        let two = lab(2);
        let mut new = two.clone();
        set(&mut new, "work_mem", "8MB");
        new.postgres.client_networks.push("10.9.0.0/16".into());
        new.regions[1].priority = Some(7);
        assert_eq!(live(&new), Vec::<String>::new());
        assert_eq!(
            plan(&running, &new, None).changes.iter().find(|c| c.path.ends_with("priority")).unwrap().cost,
            Cost::Nothing
        );
        // ...and one that leaves.
        assert!(plan(&two, &running, Some("ap-south-1a")).changes.iter().all(|c| taken_live(c).is_ok()));
        // A restart setting: published, pending until `meridian rolling-restart`;
        // of those a standby needs at least the primary's value of, only an increase.
        let mut new = running.clone();
        set(&mut new, "shared_buffers", "64MB");
        set(&mut new, "max_connections", "150");
        assert_eq!(live(&new), Vec::<String>::new());
        assert_eq!(plan(&running, &new, None).cost(), Cost::RollingRestart);
        let mut lower = new.clone();
        set(&mut lower, "max_connections", "120");
        let why = plan(&new, &lower, Some("ap-south-1a"))
            .changes
            .iter()
            .filter_map(|c| taken_live(c).err())
            .collect::<Vec<_>>();
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("postgres.settings.max_connections: lowered from 150 to 120"), "{why:?}");
        let mut unset = new.clone();
        unset.postgres.settings.remove("max_connections");
        let why = plan(&new, &unset, None).changes.iter().filter_map(|c| taken_live(c).err()).collect::<Vec<_>>();
        assert!(why[0].contains("removed, so PostgreSQL's default applies"), "{why:?}");
        // A region with its etcd member: taken, the member removed (or added) with it.
        let mut new = running.clone();
        let gone = new.regions.pop().unwrap();
        new.etcd.endpoints.retain(|e| Some(e) != gone.etcd.as_ref());
        new.health.checks.retain(|c| !c.name.contains(&gone.name));
        assert_eq!(live(&new), Vec::<String>::new());
        let url = gone.etcd.clone().unwrap();
        assert_eq!(
            etcd_change(&running, &new),
            Ok(Some(EtcdChange::Remove { region: gone.name.clone(), url: url.clone() }))
        );
        assert_eq!(etcd_change(&new, &running), Ok(Some(EtcdChange::Add { region: gone.name.clone(), url })));
        // An etcd member that comes or goes without its region: not yet.
        let mut new = running.clone();
        new.etcd.endpoints.push("https://127.42.9.1:2379".into());
        assert!(etcd_change(&running, &new).unwrap_err().contains("not the etcd member of a region the file adds"));
        assert_eq!(etcd_change(&running, &running), Ok(None));
        let mut new = running.clone();
        new.failover.lease_ttl = std::time::Duration::from_secs(9);
        new.regions[0].gateway.api = "127.42.1.3:8080".parse().unwrap();
        let why = live(&new).join("; ");
        assert!(why.contains("failover.lease_ttl: meridian's processes read this only when they start"), "{why}");
        assert!(why.contains("moving a gateway"), "{why}");
    }
}
