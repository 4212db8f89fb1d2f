use super::*;
use crate::lab::topology::{lab_config, LabShape};

fn config() -> Config {
    lab_config(&LabShape::default(), std::path::Path::new("/tmp/lab"))
}

fn member(node: &str, region: &str, role: Role, lsn: u64, lag: u64) -> MemberStatus {
    MemberStatus {
        node: node.into(),
        region: region.into(),
        role,
        timeline: Some(1),
        write_lsn: Some(Lsn(lsn)),
        flush_lsn: Some(Lsn(lsn)),
        replay_lsn: Some(Lsn(lsn)),
        lag_bytes: Some(lag),
        lag_seconds: Some(0.0),
        upstream: None,
        epoch_seen: 1,
        healthy: true,
        detail: None,
        waiting: None,
        failure: None,
        cert_not_after: None,
        archive: None,
        commit_hold: None,
        updated_at_ms: 0,
        config_version: 0,
        pending_restart: Vec::new(),
        restarted_for: None,
        hung_recently: false,
        unchanged_ms: 0,
        revision: 1,
    }
}

#[test]
fn lsn_round_trips_in_postgres_notation() {
    for (text, value) in [("0/0", 0u64), ("0/3000148", 0x3000148), ("16/B374D848", 0x16_B374_D848)] {
        let lsn: Lsn = text.parse().unwrap();
        assert_eq!(lsn, Lsn(value));
        assert_eq!(lsn.to_string(), text);
    }
    assert!("3000148".parse::<Lsn>().is_err());
    assert!("1FFFFFFFF/0".parse::<Lsn>().is_err());
    assert_eq!(serde_json::to_string(&Lsn(0x3000148)).unwrap(), "\"0/3000148\"");
}

#[test]
fn status_joins_config_with_reports_and_names_the_primary() {
    let c = config();
    let leader = Leader { node: "ap-south-1a".into(), epoch: 1 };
    let members = [member("ap-south-1a", "ap-south-1", Role::Primary, 0x3000148, 0)];
    let s = ClusterStatus::build(&c, Some(&leader), 1, &members);
    assert_eq!(s.primary.as_deref(), Some("ap-south-1a"));
    assert_eq!(s.reason, None);
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.nodes[1].name, "ap-northeast-1a");
    assert_eq!(s.nodes[1].role, Role::Unknown, "a node with no report is unknown");
    assert!(!s.nodes[1].healthy);
}

#[test]
fn no_primary_says_why() {
    let c = config();
    let members = [member("ap-south-1a", "ap-south-1", Role::Primary, 1, 0)];
    let cases: Vec<(Option<Leader>, Epoch, &str)> = vec![
        (None, 0, "not been bootstrapped"),
        (None, 3, "no node holds the leader lease"),
        (Some(Leader { node: "ap-south-1a".into(), epoch: 2 }), 3, "stale epoch 2"),
        (Some(Leader { node: "ap-northeast-1a".into(), epoch: 3 }), 3, "not running as primary"),
    ];
    for (leader, epoch, want) in cases {
        let s = ClusterStatus::build(&c, leader.as_ref(), epoch, &members);
        assert_eq!(s.primary, None);
        let reason = s.reason.unwrap();
        assert!(reason.contains(want), "{reason:?} should contain {want:?}");
    }
}

#[test]
fn table_has_a_row_per_node_and_aligned_columns() {
    let c = config();
    let leader = Leader { node: "ap-south-1a".into(), epoch: 1 };
    let members = [
        member("ap-south-1a", "ap-south-1", Role::Primary, 0x3000148, 0),
        member("ap-northeast-1a", "ap-northeast-1", Role::Replica, 0x3000000, 328),
    ];
    let text = ClusterStatus::build(&c, Some(&leader), 1, &members).render();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "cluster lab  epoch 1  primary ap-south-1a");
    assert!(lines[1].starts_with("REGION"));
    assert!(lines[2].starts_with("ap-south-1 ") && lines[2].contains("primary") && lines[2].contains("0/3000148"));
    assert!(lines[3].contains("replica") && lines[3].contains("328B"));
    let col = lines[1].find("ROLE").unwrap();
    assert_eq!(&lines[2][col..col + 7], "primary");
    assert_eq!(&lines[3][col..col + 7], "replica");
}

#[test]
fn json_has_the_documented_fields() {
    let c = config();
    let members = [member("ap-south-1a", "ap-south-1", Role::Primary, 1, 0)];
    let s = ClusterStatus::build(&c, Some(&Leader { node: "ap-south-1a".into(), epoch: 1 }), 1, &members);
    let v = serde_json::to_value(&s).unwrap();
    for k in ["cluster", "epoch", "primary", "nodes"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    for k in ["name", "region", "role", "timeline", "lsn", "lag_bytes", "lag_seconds", "healthy"] {
        assert!(v["nodes"][0].get(k).is_some(), "missing nodes[].{k}");
    }
    assert_eq!(v["nodes"][0]["role"], "primary");
    assert_eq!(v["nodes"][1]["role"], "unknown");
}

#[test]
fn human_bytes_picks_units() {
    assert_eq!(human_bytes(0), "0B");
    assert_eq!(human_bytes(2048), "2.0kB");
    assert_eq!(human_bytes(16 << 20), "16.0MB");
}

#[test]
fn a_stale_report_is_unknown_and_not_primary() {
    let c = config();
    let leader = Leader { node: "ap-south-1a".into(), epoch: 1 };
    let mut members = [member("ap-south-1a", "ap-south-1", Role::Primary, 1, 0)];
    // Its author's clock plays no part: a report stamped far in the past or
    // future is as fresh as this process saw it rewritten.
    members[0].updated_at_ms = 0;
    members[0].unchanged_ms = STALE_REPORT_MS;
    let fresh = ClusterStatus::build(&c, Some(&leader), 1, &members);
    assert_eq!(fresh.nodes[0].role, Role::Primary);
    members[0].updated_at_ms = u64::MAX;
    members[0].unchanged_ms = STALE_REPORT_MS + 2500;
    let stale = ClusterStatus::build(&c, Some(&leader), 1, &members);
    assert_eq!(stale.nodes[0].role, Role::Unknown);
    assert!(!stale.nodes[0].healthy);
    assert_eq!(stale.nodes[0].detail.as_deref(), Some("report not rewritten for 5.5s (was primary)"));
    assert_eq!(stale.primary, None);
}

#[test]
fn no_primary_quotes_why_no_standby_takes_over() {
    let c = config();
    let mut m = member("ap-northeast-1a", "ap-northeast-1", Role::Replica, 1, 0);
    use crate::failover::{NoFailover, Refusal, RefusalReason, WaitReason};
    let refusal = Refusal { node: "ap-northeast-1a".into(), why: RefusalReason::Manual { cross_region: true } };
    m.waiting = Some(WaitReason::NoFailover { why: NoFailover::Refused { refusals: vec![refusal] } });
    // Matched on the type, never on the text: a detail saying the same words counts for nothing.
    m.detail = Some("no leader, and no automatic failover: something else".into());
    let s = ClusterStatus::build(&c, None, 1, &[m.clone()]);
    assert_eq!(
        s.reason.as_deref(),
        Some("no node holds the leader lease; no automatic failover: ap-northeast-1a: cross-region failover is manual")
    );
}

#[test]
fn a_failed_action_shows_in_status_until_it_succeeds() {
    let c = config();
    let mut m = member("ap-northeast-1a", "ap-northeast-1", Role::Starting, 1, 0);
    m.failure = Some(ActionFailure {
        action: "copy a base backup from ap-south-1a".into(),
        error: "pg_basebackup failed (exit status: 1): could not connect".into(),
        attempts: 3,
        retry_in_ms: 3500,
    });
    let s = ClusterStatus::build(&c, None, 1, &[m.clone()]);
    let node = s.nodes.iter().find(|n| n.name == "ap-northeast-1a").unwrap();
    assert_eq!(node.failure, m.failure, "the JSON carries the failure");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["nodes"][1]["failure"]["attempts"], 3, "{json}");
    let table = s.render();
    assert!(
        table.contains("failed to copy a base backup from ap-south-1a (3x, next try in 4s): pg_basebackup failed"),
        "{table}"
    );
    m.failure = None;
    let s = ClusterStatus::build(&c, None, 1, &[m]);
    assert!(!s.render().contains("failed to"), "gone once the action succeeded");
}

#[test]
fn a_certificate_is_warned_about_within_thirty_days_of_its_end() {
    let day = 86_400;
    assert_eq!(certificate_warning(1000 + 31 * day, 1000), None);
    assert_eq!(
        certificate_warning(1000 + 29 * day, 1000).unwrap(),
        "expires in 29 days; renew it (`meridian ca rotate`, or `ca issue` on its host)"
    );
    assert!(certificate_warning(1000, 1000).unwrap().contains("has expired"));
    assert!(certificate_warning(10, 1000).unwrap().contains("has expired"));
}
