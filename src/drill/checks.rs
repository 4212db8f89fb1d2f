//! The checks after a round: which acknowledged ids the surviving primary
//! has, and whether every node holds the same data on the same timeline.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use anyhow::{Context, Result};

use super::report::Check;
use super::{workload, Drill};

/// The id range of one round key: `[key * 10^12, (key + 1) * 10^12)`.
pub fn id_range(key: u32) -> (i64, i64) {
    let lo = key as i64 * 1_000_000_000_000;
    (lo, lo + 1_000_000_000_000)
}

impl Drill {
    pub async fn present_ids(&self, node: &str, round: u32) -> Result<BTreeSet<i64>> {
        let (_, n) = self.config.node(node)?;
        let client =
            workload::connect(n.address, &self.credentials).await.map_err(|e| anyhow::anyhow!("{node}: {e}"))?;
        let (lo, hi) = id_range(round);
        let rows = client
            .query("SELECT id FROM meridian_drill WHERE id >= $1 AND id < $2", &[&lo, &hi])
            .await
            .with_context(|| format!("read the drill's rows on {node}"))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    /// Replication reaches every node (verify), every node holds the same rows,
    /// and every node is on the primary's timeline.
    pub async fn consistency(&self, round: u32) -> Vec<Check> {
        let mut checks = Vec::new();
        let verify: Result<crate::gateway::verify::VerifyReport> =
            self.api.post("/v1/verify", &serde_json::json!({ "timeout_ms": 30_000 }), Duration::from_secs(40)).await;
        match verify {
            Ok(v) => checks.push(Check::new(
                "replication reaches every node",
                v.ok,
                v.replicas
                    .iter()
                    .map(|r| match r.catch_up_ms {
                        Some(ms) => format!("{} {ms:.0}ms", r.name),
                        None => format!("{} {}", r.name, r.error.clone().unwrap_or_default()),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            Err(e) => checks.push(Check::new("replication reaches every node", false, format!("{e:#}"))),
        }
        let (lo, hi) = id_range(round);
        let mut sums = Vec::new();
        for (_, node) in self.config.nodes() {
            let sum = async {
                let c = workload::connect(node.address, &self.credentials).await.map_err(|e| anyhow::anyhow!(e))?;
                let row = c
                    .query_one(
                        "SELECT count(*), coalesce(md5(string_agg(id::text, ',' ORDER BY id)), '') FROM meridian_drill WHERE id >= $1 AND id < $2",
                        &[&lo, &hi],
                    )
                    .await?;
                anyhow::Ok(format!("{} rows {}", row.get::<_, i64>(0), &row.get::<_, String>(1)))
            }
            .await
            .unwrap_or_else(|e| format!("unreadable: {e:#}"));
            sums.push((node.name.clone(), sum));
        }
        let equal = sums.windows(2).all(|w| w[0].1 == w[1].1) && !sums.iter().any(|(_, s)| s.starts_with("unreadable"));
        checks.push(Check::new(
            "table checksums equal on every node",
            equal,
            sums.iter().map(|(n, s)| format!("{n}: {s}")).collect::<Vec<_>>().join("; "),
        ));
        match self.status().await {
            Ok(s) => {
                let primary_tl = s.nodes.iter().find(|n| Some(&n.name) == s.primary.as_ref()).and_then(|n| n.timeline);
                let same = s.nodes.iter().all(|n| n.timeline == primary_tl);
                checks.push(Check::new(
                    "one timeline everywhere",
                    same,
                    s.nodes
                        .iter()
                        .map(|n| {
                            format!("{} timeline {}", n.name, n.timeline.map_or("unknown".into(), |t| t.to_string()))
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                ));
            }
            Err(e) => checks.push(Check::new("one timeline everywhere", false, format!("{e:#}"))),
        }
        checks
    }
}

/// Watches, every 200 ms from the fault until the round's end, that no
/// standby's data directory loses its copy (`PG_VERSION` stays): automation
/// must never remove the last good copy, whatever the primary does.
pub struct DataWatch {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl DataWatch {
    pub fn start(dirs: Vec<(String, PathBuf)>) -> DataWatch {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut lost: Vec<String> = Vec::new();
            loop {
                for (node, dir) in &dirs {
                    if !lost.contains(node) && !dir.join("PG_VERSION").exists() {
                        lost.push(node.clone());
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => return lost,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        DataWatch { stop, task }
    }

    pub async fn check(self) -> Check {
        self.stop.cancel();
        match self.task.await {
            Ok(lost) if lost.is_empty() => {
                Check::new("every standby kept its data", true, "PG_VERSION present throughout".into())
            }
            Ok(lost) => Check::new(
                "every standby kept its data",
                false,
                format!("data directory emptied on {}", lost.join(", ")),
            ),
            Err(e) => Check::new("every standby kept its data", false, format!("the watch failed: {e}")),
        }
    }
}
