//! The drill's report: JSON for machines (`drill.json`), and one HTML page
//! with an SVG timeline per round for people (`drill.html`, no scripts, no
//! external files).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::analysis;
use super::scenario::Scenario;
use super::workload::Record;
use super::DrillOptions;
use crate::config::{Config, Synchronous};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, passed: bool, detail: String) -> Check {
        Check { name: name.to_string(), passed, detail }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

impl Event {
    pub fn at(at_ms: u64, what: &str) -> Event {
        Event { at_ms, what: what.to_string() }
    }
}

/// Per-bucket counts for the timeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    pub bucket_ms: u64,
    pub acks: Vec<u32>,
    pub errors: Vec<u32>,
    /// Worst reader staleness per bucket (ms), any region.
    pub staleness_ms: Vec<u64>,
}

impl Series {
    pub fn build(record: &Record, start_ms: u64, end_ms: u64) -> Series {
        let bucket_ms = 250;
        let acks = analysis::per_bucket(record.acks.iter().map(|a| a.ack_ms), start_ms, end_ms, bucket_ms);
        let errors = analysis::per_bucket(record.errors.iter().map(|e| e.0), start_ms, end_ms, bucket_ms);
        let mut staleness_ms = vec![0u64; acks.len()];
        for (t, _, s) in &record.staleness {
            if (start_ms..=end_ms).contains(t) {
                let i = ((t - start_ms) / bucket_ms) as usize;
                staleness_ms[i] = staleness_ms[i].max(*s);
            }
        }
        Series { bucket_ms, acks, errors, staleness_ms }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    pub scenario: Scenario,
    pub old_primary: String,
    pub new_primary: Option<String>,
    pub epoch_before: u64,
    pub epoch_after: Option<u64>,
    pub start_ms: u64,
    pub fault_ms: u64,
    pub end_ms: u64,
    /// The write gap clients saw (for rounds without failover: the longest gap during the fault).
    pub rto_ms: Option<u64>,
    pub acknowledged: usize,
    pub rows_on_primary: Option<usize>,
    pub missing_acknowledged: usize,
    pub missing_sample: Vec<i64>,
    /// WAL the old primary wrote beyond the promoted node's position, measured by the drill.
    pub wal_lost_bytes: u64,
    /// What history recorded as the estimated loss at promotion.
    pub wal_lost_estimate: u64,
    pub errors: usize,
    /// What each writer went through (failed attempts, a lost connection).
    #[serde(default)]
    pub writers: Vec<super::workload::WriterOutcome>,
    /// Whether the writers kept their connections (`--connections persistent`).
    #[serde(default)]
    pub persistent: bool,
    /// Commit latency away from the fault.
    pub commit_p50_ms: Option<u64>,
    pub commit_p99_ms: Option<u64>,
    /// From the fault until every node was healthy again (the old primary rejoined).
    pub redundancy_ms: Option<u64>,
    pub recovered: bool,
    pub passed: bool,
    pub checks: Vec<Check>,
    pub events: Vec<Event>,
    pub series: Series,
    /// What a `restore` round restored and how long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<super::restore::RestoreOutcome>,
}

impl RoundReport {
    /// A round that could not even start (no healthy cluster).
    pub fn failed(round: u32, scenario: Scenario, why: String) -> RoundReport {
        let now = crate::cluster::now_ms();
        RoundReport {
            round,
            scenario,
            old_primary: String::new(),
            new_primary: None,
            epoch_before: 0,
            epoch_after: None,
            start_ms: now,
            fault_ms: now,
            end_ms: now,
            rto_ms: None,
            acknowledged: 0,
            rows_on_primary: None,
            missing_acknowledged: 0,
            missing_sample: Vec::new(),
            wal_lost_bytes: 0,
            wal_lost_estimate: 0,
            errors: 0,
            writers: Vec::new(),
            persistent: false,
            commit_p50_ms: None,
            commit_p99_ms: None,
            redundancy_ms: None,
            recovered: false,
            passed: false,
            checks: vec![Check::new("round ran", false, why)],
            events: Vec::new(),
            series: Series::default(),
            restore: None,
        }
    }

    /// Client errors, per writer when there were any.
    pub fn client_summary(&self) -> String {
        let lost = self.writers.iter().filter(|w| w.connection_lost).count();
        let mut out = format!("{} client errors", self.errors);
        if self.errors > 0 && !self.writers.is_empty() {
            let per: Vec<String> = self.writers.iter().map(|w| w.failed.to_string()).collect();
            out.push_str(&format!(" (per writer {})", per.join("/")));
        }
        if self.persistent {
            out.push_str(&format!(", {lost} of {} persistent connections lost", self.writers.len()));
        }
        out
    }

    pub fn one_line(&self) -> String {
        let secs = |ms: Option<u64>| ms.map(|m| format!("{:.2}s", m as f64 / 1000.0)).unwrap_or("-".into());
        let failed: Vec<&str> = self.checks.iter().filter(|c| !c.passed).map(|c| c.name.as_str()).collect();
        let verdict =
            if failed.is_empty() { "all checks passed".to_string() } else { format!("FAILED: {}", failed.join(", ")) };
        if let Some(r) = &self.restore {
            return format!(
                "{} restored from {} to {} in {} (answering after {}), {} acknowledged during the round, {verdict}",
                r.backup,
                r.repository,
                r.target,
                secs(Some(r.restore_ms)),
                secs(r.serving_ms),
                self.acknowledged,
            );
        }
        format!(
            "{} -> {}: RTO {}, {} acknowledged, {} lost ({} WAL bytes), {}, redundancy after {}, {}",
            self.old_primary,
            self.new_primary.as_deref().unwrap_or("none"),
            secs(self.rto_ms),
            self.acknowledged,
            self.missing_acknowledged,
            self.wal_lost_bytes,
            self.client_summary(),
            secs(self.redundancy_ms),
            verdict
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub rounds: usize,
    pub passed: usize,
    pub rto_p50_ms: Option<u64>,
    pub rto_p99_ms: Option<u64>,
    pub rto_max_ms: Option<u64>,
    pub acknowledged: usize,
    pub lost_acknowledged: usize,
    pub wal_lost_bytes: u64,
    pub commit_p50_ms: Option<u64>,
    pub commit_p99_ms: Option<u64>,
    pub redundancy_p50_ms: Option<u64>,
    pub split_brain_rounds: usize,
    pub failed_checks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub cluster: String,
    pub synchronous: Synchronous,
    pub writers: u32,
    pub rate_per_writer: f64,
    pub seed: u64,
    /// On a lab: its hosts (loopback or netns) and the WAN between regions.
    #[serde(default)]
    pub network: Option<crate::lab::Network>,
    pub summary: Summary,
    pub rounds: Vec<RoundReport>,
}

impl DrillReport {
    pub fn new(config: &Config, options: &DrillOptions, rounds: Vec<RoundReport>) -> DrillReport {
        let of = |f: fn(&RoundReport) -> Option<u64>| rounds.iter().filter_map(f).collect::<Vec<u64>>();
        let rtos = of(|r| r.rto_ms);
        let redundancy = of(|r| r.redundancy_ms);
        let commit50 = of(|r| r.commit_p50_ms);
        let commit99 = of(|r| r.commit_p99_ms);
        let summary = Summary {
            rounds: rounds.len(),
            passed: rounds.iter().filter(|r| r.passed).count(),
            rto_p50_ms: analysis::percentile(&rtos, 50.0),
            rto_p99_ms: analysis::percentile(&rtos, 99.0),
            rto_max_ms: rtos.iter().max().copied(),
            acknowledged: rounds.iter().map(|r| r.acknowledged).sum(),
            lost_acknowledged: rounds.iter().map(|r| r.missing_acknowledged).sum(),
            wal_lost_bytes: rounds.iter().map(|r| r.wal_lost_bytes).sum(),
            commit_p50_ms: analysis::percentile(&commit50, 50.0),
            commit_p99_ms: commit99.iter().max().copied(),
            redundancy_p50_ms: analysis::percentile(&redundancy, 50.0),
            split_brain_rounds: rounds
                .iter()
                .filter(|r| r.checks.iter().any(|c| c.name == "no split brain" && !c.passed))
                .count(),
            failed_checks: rounds
                .iter()
                .flat_map(|r| {
                    r.checks.iter().filter(|c| !c.passed).map(move |c| format!("round {}: {}", r.round, c.name))
                })
                .collect(),
        };
        DrillReport {
            cluster: config.cluster.clone(),
            synchronous: config.replication.synchronous,
            writers: options.writers,
            rate_per_writer: options.rate,
            seed: options.seed,
            network: None,
            summary,
            rounds,
        }
    }

    /// "hosts netns, WAN 20 ms each way (40 ms round trip)", on a lab.
    pub fn network_line(&self) -> Option<String> {
        let n = self.network.as_ref()?;
        Some(match &n.wan {
            Some(w) => format!("hosts {}, WAN {w}", n.hosts),
            None if n.hosts == crate::lab::topology::Hosts::Netns => format!("hosts {}, no WAN delay", n.hosts),
            None => format!("hosts {} (one network stack, no WAN delay)", n.hosts),
        })
    }

    /// Every round passed every check.
    pub fn passed(&self) -> bool {
        !self.rounds.is_empty() && self.rounds.iter().all(|r| r.passed)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("drill.json"), serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", dir.join("drill.json").display()))?;
        std::fs::write(dir.join("drill.html"), self.html())
            .with_context(|| format!("write {}", dir.join("drill.html").display()))?;
        Ok(())
    }

    pub fn text(&self) -> String {
        let s = &self.summary;
        let secs = |ms: Option<u64>| ms.map(|m| format!("{:.2}s", m as f64 / 1000.0)).unwrap_or("-".into());
        let mut out = String::new();
        for r in &self.rounds {
            let _ = writeln!(out, "round {:>2} {:<26} {}", r.round, r.scenario.name(), r.one_line());
        }
        let _ = writeln!(
            out,
            "summary: {}/{} rounds passed\n  RTO p50 {} p99 {} max {}\n  {} acknowledged, {} lost, {} WAL bytes lost\n  commit p50 {}ms p99 {}ms; redundancy p50 {}\n  split brain in {} round(s); synchronous = {}",
            s.passed,
            s.rounds,
            secs(s.rto_p50_ms),
            secs(s.rto_p99_ms),
            secs(s.rto_max_ms),
            s.acknowledged,
            s.lost_acknowledged,
            s.wal_lost_bytes,
            s.commit_p50_ms.map(|v| v.to_string()).unwrap_or("-".into()),
            s.commit_p99_ms.map(|v| v.to_string()).unwrap_or("-".into()),
            secs(s.redundancy_p50_ms),
            s.split_brain_rounds,
            self.synchronous
        );
        if let Some(line) = self.network_line() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>meridian drill: {}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}\
             table{{border-collapse:collapse}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}}\
             pre{{white-space:pre-wrap;overflow-wrap:anywhere}}td{{overflow-wrap:anywhere}}\
             .ok{{color:#1a7f37}}.bad{{color:#cf222e;font-weight:bold}}svg{{border:1px solid #ccc;background:#fff}}\
             </style></head><body>",
            esc(&self.cluster)
        );
        let s = &self.summary;
        let _ = write!(
            h,
            "<h1>Drill of cluster {}</h1><p>{} writers at {} inserts/s each; synchronous = {}; seed {}.</p>\
             <p class=\"{}\">{}/{} rounds passed.</p><pre>{}</pre>",
            esc(&self.cluster),
            self.writers,
            self.rate_per_writer,
            self.synchronous,
            self.seed,
            if self.passed() { "ok" } else { "bad" },
            s.passed,
            s.rounds,
            esc(&self.text())
        );
        for r in &self.rounds {
            let _ = write!(
                h,
                "<h2>Round {}: {}</h2><p>{}</p><table><tr><th>check</th><th></th><th>detail</th></tr>",
                r.round,
                r.scenario.name(),
                esc(&r.one_line())
            );
            for c in &r.checks {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                    esc(&c.name),
                    if c.passed { "ok" } else { "bad" },
                    if c.passed { "passed" } else { "FAILED" },
                    esc(&c.detail)
                );
            }
            h.push_str("</table>");
            if let Some(x) = &r.restore {
                let _ = write!(
                    h,
                    "<p>Restore of {} from repository {} to {} into cluster {}: {:.1} s, answering SQL after {}.</p>\
                     <table><tr><th>step</th><th>ms</th></tr>",
                    esc(&x.backup),
                    esc(&x.repository),
                    esc(&x.target),
                    esc(&x.cluster),
                    x.restore_ms as f64 / 1000.0,
                    x.serving_ms.map(|m| format!("{:.1} s", m as f64 / 1000.0)).unwrap_or("-".into())
                );
                for (step, ms) in &x.steps {
                    let _ = write!(h, "<tr><td>{}</td><td>{ms}</td></tr>", esc(step));
                }
                h.push_str("</table>");
            }
            h.push_str(&timeline_svg(r));
        }
        h.push_str("</body></html>\n");
        h
    }
}

/// Acknowledged writes per second (bars), errors (red marks), the worst reader
/// staleness (line) and the round's events (dashed lines), against seconds
/// since the workload started.
fn timeline_svg(r: &RoundReport) -> String {
    let (w, hgt, left, top, bottom) = (1000.0, 260.0, 50.0, 20.0, 40.0);
    let plot_h = hgt - top - bottom;
    let n = r.series.acks.len().max(1);
    let per_sec = 1000.0 / r.series.bucket_ms.max(1) as f64;
    let max_rate = r.series.acks.iter().map(|a| *a as f64 * per_sec).fold(1.0, f64::max);
    let max_stale = r.series.staleness_ms.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bw = (w - left - 10.0) / n as f64;
    let x_of = |ms: u64| left + (ms.saturating_sub(r.start_ms) as f64 / r.series.bucket_ms.max(1) as f64) * bw;
    let mut s = String::new();
    let _ = write!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" font-size=\"11\">");
    for (i, a) in r.series.acks.iter().enumerate() {
        let bh = *a as f64 * per_sec / max_rate * plot_h;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4c8bf5\"/>",
            left + i as f64 * bw,
            top + plot_h - bh,
            bw.max(0.5),
            bh
        );
    }
    for (i, e) in r.series.errors.iter().enumerate().filter(|(_, e)| **e > 0) {
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"6\" fill=\"#cf222e\"><title>{e} errors</title></rect>",
            left + i as f64 * bw,
            top + plot_h + 2.0,
            bw.max(1.0)
        );
    }
    let points: Vec<String> = r
        .series
        .staleness_ms
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!("{:.1},{:.1}", left + (i as f64 + 0.5) * bw, top + plot_h - *v as f64 / max_stale * plot_h)
        })
        .collect();
    let _ =
        write!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"#8250df\" stroke-width=\"1.5\"/>", points.join(" "));
    for (k, e) in r.events.iter().enumerate() {
        let x = x_of(e.at_ms);
        // Labels near the right edge run leftwards, so they are not cut off.
        let (tx, anchor) = if x > w - 220.0 { (x - 3.0, "end") } else { (x + 3.0, "start") };
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#444\" stroke-dasharray=\"3,3\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" fill=\"#444\" text-anchor=\"{anchor}\">{}</text>",
            top + plot_h,
            top + 12.0 + (k % 4) as f64 * 12.0,
            esc(&e.what)
        );
    }
    let secs = (r.end_ms.saturating_sub(r.start_ms)) as f64 / 1000.0;
    let _ = write!(
        s,
        "<text x=\"{left}\" y=\"{:.1}\">0 s</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{secs:.1} s</text>\
         <text x=\"5\" y=\"{top}\">{max_rate:.0}/s</text>\
         <text x=\"{left}\" y=\"{:.1}\" fill=\"#4c8bf5\">acknowledged writes/s</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#cf222e\">errors</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#8250df\">reader staleness (max {max_stale:.0} ms)</text></svg>",
        hgt - 8.0,
        w - 10.0,
        hgt - 8.0,
        hgt - 22.0,
        left + 160.0,
        hgt - 22.0,
        left + 220.0,
        hgt - 22.0
    );
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
