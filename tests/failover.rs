//! Failover scenarios against real labs: each test names the fault it injects.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Waits until `node` is the primary of an epoch above `after_epoch`; returns the status.
fn wait_for_new_primary(lab: &TestLab, node: &str, after_epoch: u64, timeout: Duration) -> Value {
    wait_until(&format!("{node} to become primary after epoch {after_epoch}"), timeout, || {
        let s = lab.meridian(&["status", "--json"]);
        let s: Value = serde_json::from_slice(&s.stdout).map_err(|e| format!("status: {e}"))?;
        if s["primary"] == node && s["epoch"].as_u64().unwrap_or(0) > after_epoch {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

fn wait_for_role(lab: &TestLab, node_name: &str, role: &str, timeout: Duration) {
    wait_until(&format!("{node_name} to be a healthy {role}"), timeout, || {
        let s = lab.status();
        let n = node(&s, node_name);
        if n["role"] == role && n["healthy"] == true {
            Ok(())
        } else {
            Err(n.to_string())
        }
    });
}

fn last_history(lab: &TestLab) -> Value {
    let h = lab.json(&["history"]);
    h.as_array().and_then(|a| a.last().cloned()).unwrap_or(Value::Null)
}

#[test]
fn in_region_failover() {
    let mut lab = TestLab::up(70, &["--nodes-per-region", "2"]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 100)");
    lab.wait_rows("ap-south-1b", "orders", 100, Duration::from_secs(10));

    let out = lab.run_lab(&["kill", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = wait_for_new_primary(&lab, "ap-south-1b", 1, Duration::from_secs(20));
    assert_eq!(s["epoch"], 2);
    assert_eq!(lab.psql("ap-south-1b", "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(lab.psql("ap-south-1b", "SELECT count(*) FROM orders"), "100");
    lab.psql("ap-south-1b", "INSERT INTO orders VALUES (101)");
    let h = last_history(&lab);
    assert_eq!(
        (h["kind"].as_str(), h["from"].as_str(), h["to"].as_str(), h["epoch"].as_u64()),
        (Some("failover"), Some("ap-south-1a"), Some("ap-south-1b"), Some(2)),
        "{h}"
    );
    // The other region's replicas follow the new primary.
    wait_for_role(&lab, "ap-northeast-1a", "replica", Duration::from_secs(20));
    lab.wait_rows("ap-northeast-1b", "orders", 101, Duration::from_secs(20));

    // The old primary comes back as a replica of the new one, with no manual step.
    let out = lab.run_lab(&["start", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for_role(&lab, "ap-south-1a", "replica", Duration::from_secs(30));
    lab.wait_rows("ap-south-1a", "orders", 101, Duration::from_secs(10));
    assert_eq!(lab.psql("ap-south-1a", "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(lab.json(&["verify"])["ok"], true);
    lab.finish();
}

#[test]
fn region_loss() {
    let mut lab = TestLab::up(71, &[]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 100)");
    lab.wait_rows("ap-northeast-1a", "orders", 100, Duration::from_secs(10));

    let out = lab.run_lab(&["kill", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for_new_primary(&lab, "ap-northeast-1a", 1, Duration::from_secs(30));
    assert_eq!(lab.psql("ap-northeast-1a", "SELECT count(*) FROM orders"), "100");
    lab.psql("ap-northeast-1a", "INSERT INTO orders VALUES (101)");

    let out = lab.run_lab(&["start", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for_role(&lab, "ap-south-1a", "replica", Duration::from_secs(30));
    lab.wait_rows("ap-south-1a", "orders", 101, Duration::from_secs(10));
    lab.finish();
}

#[test]
fn killing_the_primarys_agent_stops_its_postgres_and_fails_over() {
    let mut lab = TestLab::up(72, &[]);
    lab.expect_error("terminating connection due to administrator command");
    let postmaster = postmaster_pid(&lab, "ap-south-1a");
    unsafe { libc::kill(pid_of(&lab, "agent-ap-south-1a") as i32, libc::SIGKILL) };
    wait_until("the primary's postmaster to exit with its agent", Duration::from_secs(5), || {
        if alive(postmaster) {
            Err(format!("pid {postmaster} alive"))
        } else {
            Ok(())
        }
    });
    assert!(lab.try_psql("ap-south-1a", "SELECT 1").is_err(), "the old primary must take no writes");
    wait_for_new_primary(&lab, "ap-northeast-1a", 1, Duration::from_secs(30));
    lab.finish();
}

#[test]
fn losing_one_etcd_member_causes_no_failover() {
    let lab = TestLab::up(73, &[]);
    // The primary's own region's member: its agent must renew through another one.
    unsafe { libc::kill(pid_of(&lab, "etcd-ap-south-1") as i32, libc::SIGKILL) };
    let started = Instant::now();
    let mut observations = 0;
    // Longer than the 6 s lease: a primary that could not renew would have been replaced by now.
    while started.elapsed() < Duration::from_secs(10) {
        let s = lab.status();
        assert_eq!(s["primary"], "ap-south-1a", "{s}");
        assert_eq!(s["epoch"], 1, "{s}");
        lab.psql(
            "ap-south-1a",
            &format!("CREATE TABLE IF NOT EXISTS t (id int); INSERT INTO t VALUES ({observations})"),
        );
        observations += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(observations > 10, "only {observations} observations");
    assert_eq!(lab.json(&["history"]), serde_json::json!([]));
    let out = lab.run_lab(&["start", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.finish();
}
