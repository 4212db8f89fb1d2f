//! What a round's record means: the write gap (RTO), acknowledged writes
//! missing afterwards (RPO), and acknowledgements from a node that was not the
//! leader at the time (split brain). Pure, so each rule is tested on its own.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::report::Check;
use crate::cluster::HistoryEntry;

/// One acknowledged insert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub id: i64,
    pub writer: u32,
    /// When the client sent the INSERT and when the commit came back (ms since the Unix epoch).
    pub sent_ms: u64,
    pub ack_ms: u64,
    /// The node that committed it (its `cluster_name`).
    pub node: String,
}

/// RTO as clients saw it: from the last acknowledgement at or before the fault
/// to the first after it. `None` if nothing was acknowledged after the fault.
pub fn write_gap(acks: &[Ack], fault_ms: u64) -> Option<u64> {
    let before = acks.iter().filter(|a| a.ack_ms <= fault_ms).map(|a| a.ack_ms).max().unwrap_or(fault_ms);
    let after = acks.iter().filter(|a| a.ack_ms > fault_ms).map(|a| a.ack_ms).min()?;
    Some(after - before)
}

/// The longest gap between consecutive acknowledgements in `[from, to]`: for
/// rounds without a failover, where the fault may delay writes at any time.
pub fn longest_gap(acks: &[Ack], from_ms: u64, to_ms: u64) -> u64 {
    let mut times: Vec<u64> = acks.iter().map(|a| a.ack_ms).filter(|t| (from_ms..=to_ms).contains(t)).collect();
    times.sort_unstable();
    let mut edges = vec![from_ms];
    edges.extend(times);
    edges.push(to_ms);
    edges.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0)
}

/// The leaders of a round in order: the one before it, then each promotion
/// recorded in history (oldest first), with when that promotion began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Succession {
    pub node: String,
    /// When the promotion that made it leader began (0 for the round's first leader).
    pub from_ms: u64,
}

pub fn succession(initial: &str, promotions: &[HistoryEntry]) -> Vec<Succession> {
    let mut out = vec![Succession { node: initial.to_string(), from_ms: 0 }];
    out.extend(promotions.iter().map(|p| Succession { node: p.to.clone(), from_ms: p.started_at_ms }));
    out
}

/// Acknowledgements that prove two primaries took writes: one from a node
/// that never led during the round, or one from a leader for a write sent
/// after its successor had already acknowledged a write (and before the node
/// could have become leader again). Clock-free but for `slack_ms`: every time
/// here is the drill's own clock.
pub fn split_brain<'a>(acks: &'a [Ack], leaders: &[Succession], slack_ms: u64) -> Vec<&'a Ack> {
    let mut bad: Vec<&Ack> = acks.iter().filter(|a| !leaders.iter().any(|l| l.node == a.node)).collect();
    for (k, pair) in leaders.windows(2).enumerate() {
        let (old, new) = (&pair[0], &pair[1]);
        if old.node == new.node {
            continue;
        }
        // The successor's first acknowledged write after its promotion began.
        let Some(first_new) =
            acks.iter().filter(|a| a.node == new.node && a.sent_ms + slack_ms >= new.from_ms).map(|a| a.ack_ms).min()
        else {
            continue;
        };
        // Until the old node could lead again.
        let again = leaders[k + 2..].iter().find(|l| l.node == old.node).map(|l| l.from_ms).unwrap_or(u64::MAX);
        bad.extend(acks.iter().filter(|a| a.node == old.node && a.sent_ms > first_new + slack_ms && a.sent_ms < again));
    }
    bad.sort_by_key(|a| a.id);
    bad.dedup_by_key(|a| a.id);
    bad
}

/// Acknowledged ids that the surviving primary does not have.
pub fn missing(acks: &[Ack], present: &BTreeSet<i64>) -> Vec<i64> {
    let mut out: Vec<i64> = acks.iter().map(|a| a.id).filter(|id| !present.contains(id)).collect();
    out.sort_unstable();
    out
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`.
pub fn percentile(values: &[u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

/// Counts of `times` per bucket of `bucket_ms` from `start_ms` to `end_ms`.
pub fn per_bucket(times: impl Iterator<Item = u64>, start_ms: u64, end_ms: u64, bucket_ms: u64) -> Vec<u32> {
    let n = (end_ms.saturating_sub(start_ms) / bucket_ms + 1) as usize;
    let mut out = vec![0u32; n];
    for t in times.filter(|t| (start_ms..=end_ms).contains(t)) {
        out[((t - start_ms) / bucket_ms) as usize] += 1;
    }
    out
}

/// The promise to clients that keep their connections: every writer kept
/// its connection and failed at most `allowed` transactions.
pub fn client_check(writers: &[super::workload::WriterOutcome], allowed: u32) -> Check {
    let over: Vec<String> = writers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.failed > allowed || w.connection_lost)
        .map(|(i, w)| {
            let first = w.first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default();
            let lost = if w.connection_lost { ", connection lost" } else { "" };
            format!("writer {i} via {}: {} failed{lost}{first}", w.endpoint, w.failed)
        })
        .collect();
    let name = if allowed == 0 { "no client saw an error" } else { "each client failed at most one transaction" };
    let per: Vec<String> = writers.iter().map(|w| w.failed.to_string()).collect();
    let detail = if over.is_empty() {
        format!("{} persistent connections kept; failed per writer {}", writers.len(), per.join("/"))
    } else {
        over.join("; ")
    };
    Check::new(name, over.is_empty(), detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::PromotionKind;

    fn ack(id: i64, sent: u64, at: u64, node: &str) -> Ack {
        Ack { id, writer: 0, sent_ms: sent, ack_ms: at, node: node.into() }
    }

    fn promotion(to: &str, started: u64) -> HistoryEntry {
        HistoryEntry {
            epoch: 2,
            kind: PromotionKind::Failover,
            from: Some("a".into()),
            to: to.into(),
            reason: String::new(),
            lsn: None,
            lost_bytes_estimate: None,
            started_at_ms: started,
            finished_at_ms: started + 100,
        }
    }

    #[test]
    fn the_write_gap_spans_the_fault() {
        let acks = [ack(1, 90, 100, "a"), ack(2, 190, 200, "a"), ack(3, 2900, 3000, "b"), ack(4, 3090, 3100, "b")];
        assert_eq!(write_gap(&acks, 250), Some(2800));
        assert_eq!(write_gap(&acks, 4000), None, "nothing after the fault");
        assert_eq!(longest_gap(&acks, 0, 3200), 2800);
        assert_eq!(longest_gap(&[], 0, 500), 500, "no write at all is one long gap");
    }

    #[test]
    fn the_old_leader_acknowledging_after_its_successor_is_split_brain() {
        let leaders = succession("a", &[promotion("b", 1000)]);
        let clean = [
            ack(1, 900, 950, "a"),   // the old leader, before the switch
            ack(2, 1100, 1400, "a"), // the old leader after the promotion began, before b took writes: fine
            ack(3, 1500, 1550, "b"), // the new leader
        ];
        assert!(split_brain(&clean, &leaders, 0).is_empty());
        let mut dirty = clean.to_vec();
        dirty.push(ack(4, 1600, 1650, "a")); // a write sent to a after b acknowledged one
        dirty.push(ack(5, 1700, 1750, "c")); // a node that never led
        let bad: Vec<i64> = split_brain(&dirty, &leaders, 0).iter().map(|a| a.id).collect();
        assert_eq!(bad, [4, 5]);
        assert_eq!(split_brain(&dirty[..4], &leaders, 100).len(), 0, "within the slack");
        // a leads again later: its writes then are fine.
        let back = succession("a", &[promotion("b", 1000), promotion("a", 2000)]);
        let later = [ack(3, 1500, 1550, "b"), ack(6, 2100, 2150, "a")];
        assert!(split_brain(&later, &back, 0).is_empty());
    }

    #[test]
    fn missing_ids_percentiles_and_buckets() {
        let acks = [ack(1, 0, 1, "a"), ack(2, 0, 2, "a"), ack(3, 0, 3, "a")];
        assert_eq!(missing(&acks, &BTreeSet::from([1, 3])), [2]);
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 50.0), Some(3));
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 99.0), Some(5));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(per_bucket([0u64, 50, 150, 999].into_iter(), 0, 300, 100), [2, 1, 0, 0]);
    }

    #[test]
    fn the_client_promise_counts_failures_and_lost_connections_per_writer() {
        use super::super::workload::WriterOutcome;
        let w = |failed, connection_lost| WriterOutcome {
            endpoint: "127.0.0.1:6432".into(),
            failed,
            connection_lost,
            first_error: None,
        };
        assert!(client_check(&[w(0, false), w(0, false)], 0).passed);
        let one = client_check(&[w(0, false), w(1, false)], 0);
        assert!(!one.passed && one.detail.contains("writer 1 via 127.0.0.1:6432: 1 failed"), "{}", one.detail);
        assert!(client_check(&[w(1, false), w(0, false)], 1).passed, "a failover may cost one each");
        assert!(!client_check(&[w(2, false)], 1).passed);
        let lost = client_check(&[w(1, true)], 1);
        assert!(!lost.passed && lost.detail.contains("connection lost"), "a lost connection breaks the promise");
    }
}
