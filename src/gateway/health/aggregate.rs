//! From every observer's verdict to one per check, with Route 53's rules: a
//! check is healthy when more than `healthy_share` of the observers that report
//! on it say so; a calculated check is healthy when at least `min_healthy` of
//! its children are (then inverted if asked). Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cluster::HealthReport;
use crate::config::{CheckKind, HealthCheck, HealthConfig, MinHealthy};

/// One check's aggregate, as `meridian health` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct CheckStatus {
    pub name: String,
    pub kind: CheckKind,
    pub healthy: bool,
    /// No observer has anything to judge by yet: neither healthy nor unhealthy.
    #[serde(default)]
    pub pending: bool,
    /// Why, in a few words: "2 of 3 observers healthy (need more than 18%)".
    pub reason: String,
    pub observers: Vec<HealthReport>,
}

/// Every configured check's aggregate, by name.
pub fn aggregate(config: &HealthConfig, reports: &[HealthReport]) -> BTreeMap<String, CheckStatus> {
    let mut out = BTreeMap::new();
    for check in &config.checks {
        resolve(config, check, reports, &mut out, 0);
    }
    out
}

fn resolve(
    config: &HealthConfig,
    check: &HealthCheck,
    reports: &[HealthReport],
    out: &mut BTreeMap<String, CheckStatus>,
    depth: usize,
) -> bool {
    if let Some(done) = out.get(&check.name) {
        return done.healthy;
    }
    let status = if check.kind == CheckKind::Calculated {
        // Validation refuses cycles; the depth bound keeps a bad file from recursing forever.
        let children: Vec<(bool, bool)> = check
            .children
            .iter()
            .filter_map(|c| config.checks.iter().find(|k| &k.name == c))
            .map(|child| {
                let healthy = depth < 32 && resolve(config, child, reports, out, depth + 1);
                (healthy, out.get(&child.name).is_some_and(|c| c.pending))
            })
            .collect();
        let healthy_children = children.iter().filter(|(h, _)| *h).count();
        let need = check.min_healthy.unwrap_or(MinHealthy::All).required(children.len());
        let up = healthy_children >= need && !children.is_empty();
        // Undecided while the children that could still tip it have no data yet.
        let pending_children = children.iter().filter(|(_, p)| *p).count();
        let pending = !up && healthy_children + pending_children >= need && pending_children > 0;
        CheckStatus {
            name: check.name.clone(),
            kind: check.kind,
            healthy: up != check.invert && !pending,
            pending,
            reason: format!(
                "{healthy_children} of {} children healthy{} (need {need}){}",
                children.len(),
                if pending_children > 0 { format!(", {pending_children} pending") } else { String::new() },
                if check.invert { ", inverted" } else { "" }
            ),
            observers: Vec::new(),
        }
    } else {
        let mut observers: Vec<HealthReport> = reports.iter().filter(|r| r.check == check.name).cloned().collect();
        observers.sort_by(|a, b| a.observer.cmp(&b.observer));
        // Observers with nothing to judge by yet do not vote.
        let voting: Vec<&HealthReport> = observers.iter().filter(|r| !r.pending).collect();
        let healthy_count = voting.iter().filter(|r| r.healthy).count();
        let share = config.healthy_share;
        let healthy = !voting.is_empty() && healthy_count as f64 > share * voting.len() as f64;
        let pending = voting.is_empty() && !observers.is_empty();
        let reason = if observers.is_empty() {
            "no observer reports on it".to_string()
        } else if pending {
            format!("pending: no data yet ({})", observers[0].detail)
        } else {
            format!("{healthy_count} of {} observers healthy (need more than {:.0}%)", voting.len(), share * 100.0)
        };
        CheckStatus { name: check.name.clone(), kind: check.kind, healthy, pending, reason, observers }
    };
    let healthy = status.healthy;
    out.insert(check.name.clone(), status);
    healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, kind: CheckKind) -> HealthCheck {
        HealthCheck::new(name, kind, None)
    }

    fn report(check: &str, observer: &str, healthy: bool) -> HealthReport {
        HealthReport {
            check: check.into(),
            observer: observer.into(),
            healthy,
            pending: false,
            detail: String::new(),
            at_ms: 0,
        }
    }

    #[test]
    fn observers_with_no_data_yet_make_a_check_pending_not_unhealthy() {
        let config = HealthConfig {
            healthy_share: 0.18,
            checks: vec![check("lag", CheckKind::Postgres), {
                let mut c = check("all", CheckKind::Calculated);
                c.children = vec!["lag".into()];
                c
            }],
        };
        let pending = |o: &str| HealthReport {
            pending: true,
            detail: "no report from the leader yet".into(),
            ..report("lag", o, false)
        };
        let all_pending = aggregate(&config, &[pending("r1"), pending("r2")]);
        assert!(all_pending["lag"].pending && !all_pending["lag"].healthy);
        assert!(all_pending["lag"].reason.starts_with("pending: no data yet"), "{}", all_pending["lag"].reason);
        assert!(all_pending["all"].pending, "a calculated check waits for its pending children");
        let one_voted = aggregate(&config, &[pending("r1"), report("lag", "r2", true)]);
        assert!(!one_voted["lag"].pending && one_voted["lag"].healthy, "only observers with data vote");
        assert!(!one_voted["all"].pending && one_voted["all"].healthy);
        let failed = aggregate(&config, &[pending("r1"), report("lag", "r2", false)]);
        assert!(!failed["lag"].pending && !failed["lag"].healthy);
        assert!(!aggregate(&config, &[])["lag"].pending, "no reports at all is not pending: nobody probes it");
    }

    #[test]
    fn more_than_the_share_of_observers_must_agree() {
        let config = HealthConfig { healthy_share: 0.18, checks: vec![check("a", CheckKind::Tcp)] };
        let verdict = |rs: &[(&str, bool)]| {
            let reports: Vec<_> = rs.iter().map(|(o, h)| report("a", o, *h)).collect();
            aggregate(&config, &reports)["a"].healthy
        };
        assert!(!verdict(&[]), "no observer: not healthy");
        assert!(verdict(&[("x", true)]));
        assert!(!verdict(&[("x", false)]));
        // One of three is 33% > 18%: Route 53 keeps an endpoint healthy while any
        // sizeable minority of checkers can reach it.
        assert!(verdict(&[("x", true), ("y", false), ("z", false)]));
        let strict = HealthConfig { healthy_share: 0.5, ..config.clone() };
        let reports = [report("a", "x", true), report("a", "y", false)];
        assert!(!aggregate(&strict, &reports)["a"].healthy, "exactly half is not more than half");
    }

    #[test]
    fn calculated_checks_count_healthy_children() {
        let mut calc = check("c", CheckKind::Calculated);
        calc.children = vec!["a".into(), "b".into()];
        let config = |min: Option<MinHealthy>, invert: bool| HealthConfig {
            healthy_share: 0.18,
            checks: vec![
                check("a", CheckKind::Tcp),
                check("b", CheckKind::Tcp),
                HealthCheck { min_healthy: min, invert, ..calc.clone() },
            ],
        };
        let reports = [report("a", "x", true), report("b", "x", false)];
        assert!(!aggregate(&config(None, false), &reports)["c"].healthy, "default is all");
        assert!(aggregate(&config(Some(MinHealthy::Any), false), &reports)["c"].healthy);
        assert!(aggregate(&config(Some(MinHealthy::AtLeast(1)), false), &reports)["c"].healthy);
        assert!(!aggregate(&config(Some(MinHealthy::AtLeast(2)), false), &reports)["c"].healthy);
        assert!(aggregate(&config(None, true), &reports)["c"].healthy, "inverted");
    }
}
