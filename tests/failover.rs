//! Failover scenarios against real labs: each test names the fault it injects.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Waits until `node` is the primary of an epoch above `after_epoch`; returns the status.
fn wait_for_new_primary(lab: &TestLab, node: &str, after_epoch: u64, timeout: Duration) -> Value {
    wait_until(&format!("{node} to become primary after epoch {after_epoch}"), timeout, || {
        let s = lab.try_status()?;
        if s["primary"] == node && s["epoch"].as_u64().unwrap_or(0) > after_epoch {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

fn wait_for_role(lab: &TestLab, node_name: &str, role: &str, timeout: Duration) {
    wait_until(&format!("{node_name} to be a healthy {role}"), timeout, || {
        let s = lab.try_status()?;
        let n = node(&s, node_name);
        if n["role"] == role && n["healthy"] == true {
            Ok(())
        } else {
            Err(n.to_string())
        }
    });
}

/// Pauses WAL replay on a standby and waits until it is really paused: the call
/// only requests a pause, and replay stops at its next check.
fn pause_replay(lab: &TestLab, node: &str) {
    lab.psql_superuser(node, "SELECT pg_wal_replay_pause()");
    wait_until(&format!("replay to be paused on {node}"), Duration::from_secs(10), || {
        match lab.psql_superuser(node, "SELECT pg_get_wal_replay_pause_state()").as_str() {
            "paused" => Ok(()),
            other => Err(other.to_string()),
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
        std::thread::sleep(Duration::from_millis(250));
        // While etcd elects a new leader the API may answer 503 for a moment.
        let Ok(s) = lab.try_status() else { continue };
        assert_eq!(s["primary"], "ap-south-1a", "{s}");
        assert_eq!(s["epoch"], 1, "{s}");
        lab.psql(
            "ap-south-1a",
            &format!("CREATE TABLE IF NOT EXISTS t (id int); INSERT INTO t VALUES ({observations})"),
        );
        observations += 1;
    }
    assert!(observations > 10, "only {observations} observations");
    assert_eq!(lab.json(&["history"]), serde_json::json!([]));
    let out = lab.run_lab(&["start", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.finish();
}

#[test]
fn switchover_there_and_back_loses_nothing() {
    let lab = TestLab::up(74, &[]);
    lab.psql(
        "ap-south-1a",
        "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 1000)",
    );

    let out = lab.meridian(&["switchover", "--to", "ap-northeast-1a", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["from"].as_str(), report["to"].as_str(), report["epoch"].as_u64()),
        (Some("ap-south-1a"), Some("ap-northeast-1a"), Some(2)),
        "{report}"
    );
    assert_eq!(report["lost_bytes_estimate"], 0);
    assert!(report["steps"].as_array().unwrap().len() >= 4, "each step is reported: {report}");
    assert_eq!(
        lab.psql("ap-northeast-1a", "SELECT count(*) FROM orders"),
        "1000",
        "rows written before the switchover"
    );
    lab.psql("ap-northeast-1a", "INSERT INTO orders SELECT generate_series(1001, 2000)");

    // And back, with the human output.
    let out = lab.meridian(&["switchover", "--to", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("stopped cleanly") && printed.contains("promoted (epoch 3)"), "{printed}");
    assert_eq!(lab.psql("ap-south-1a", "SELECT count(*) FROM orders"), "2000");
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(2001, 3000)");
    lab.wait_rows("ap-northeast-1a", "orders", 3000, Duration::from_secs(20));

    let history = lab.json(&["history"]);
    let kinds: Vec<(&str, u64)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["kind"].as_str().unwrap(), h["lost_bytes_estimate"].as_u64().unwrap()))
        .collect();
    assert_eq!(kinds, [("switchover", 0), ("switchover", 0)]);

    // Refusals leave everything as it was.
    let out = lab.meridian(&["switchover", "--to", "ap-south-1a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already the primary"), "{}", text(&out));
    let out = lab.meridian(&["switchover", "--to", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named"), "{}", text(&out));
    assert_eq!(lab.status()["epoch"], 3);
    lab.finish();
}

#[test]
fn cross_region_manual_waits_for_an_operator() {
    let mut lab = TestLab::up(75, &["--cross-region", "manual"]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 100)");
    lab.wait_rows("ap-northeast-1a", "orders", 100, Duration::from_secs(10));
    let out = lab.run_lab(&["kill", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));

    let s = wait_until("status to say why there is no primary", Duration::from_secs(20), || {
        let s = lab.try_status()?;
        let reason = s["reason"].as_str().unwrap_or_default().to_string();
        if reason.contains("cross-region failover is manual") {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(s["primary"], Value::Null);
    // Well past the lease: still nobody promotes by itself.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(s) = lab.try_status() else { continue };
        assert_eq!((s["primary"].clone(), s["epoch"].clone()), (Value::Null, serde_json::json!(1)), "{s}");
    }

    let out = lab.meridian(&["failover", "--to-region", "ap-northeast-1", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["kind"].as_str(), report["to"].as_str()), (Some("dr"), Some("ap-northeast-1a")), "{report}");
    assert_eq!(lab.psql("ap-northeast-1a", "SELECT count(*) FROM orders"), "100");
    lab.psql("ap-northeast-1a", "INSERT INTO orders VALUES (101)");
    assert_eq!(last_history(&lab)["kind"], "dr");
    lab.finish();
}

/// Waits until the primary vouches for exactly `want` (`status --json` `vouched`).
fn wait_vouched(lab: &TestLab, want: &[&str], timeout: Duration) {
    wait_until(&format!("the primary to vouch for {want:?}"), timeout, || {
        let s = lab.try_status()?;
        if s["primary"].is_string() && s["vouched"] == serde_json::json!(want) {
            Ok(())
        } else {
            Err(format!("primary {} vouched {}", s["primary"], s["vouched"]))
        }
    });
}

#[test]
fn synchronous_remote_never_promotes_a_standby_that_missed_asynchronous_commits() {
    // Patroni's non-strict mode: with its remote standby gone the primary goes on
    // asynchronously. Commits it then acknowledges are on no standby, so the
    // standby that comes back must not be promoted when the primary dies; the
    // primary itself, back, is.
    let mut lab = TestLab::up(129, &["--synchronous", "remote"]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int)");
    wait_vouched(&lab, &["ap-northeast-1a"], Duration::from_secs(20));
    assert!(lab.meridian(&["status"]).stdout.starts_with(b"cluster"));
    let out = lab.meridian(&["status"]);
    assert!(text(&out).contains("synchronous: every acknowledged commit is on ap-northeast-1a"), "{}", text(&out));

    let out = lab.run_lab(&["kill", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    // The record empties before the server goes asynchronous.
    wait_vouched(&lab, &[], Duration::from_secs(20));
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(1, 100)");
    let out = lab.run_lab(&["kill", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lab.run_lab(&["start", "ap-northeast-1a", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out));

    let s = wait_until("status to say why nobody is promoted", Duration::from_secs(30), || {
        let s = lab.try_status()?;
        let standby = node(&s, "ap-northeast-1a");
        if s["reason"].as_str().unwrap_or_default().contains("ran asynchronously") && standby["role"] == "replica" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(s["primary"], Value::Null, "{s}");
    // Well past the lease: the standby that missed the commits stays a standby.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(s) = lab.try_status() else { continue };
        assert_eq!((s["primary"].clone(), s["epoch"].clone()), (Value::Null, serde_json::json!(1)), "{s}");
    }

    // An operator is told what a manual failover would cost, and must say so.
    let out = lab.meridian(&["failover", "--to-region", "ap-northeast-1", "--timeout", "5s"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("may lack acknowledged commits"), "{}", text(&out));
    assert_eq!(lab.status()["primary"], Value::Null);

    // The former primary comes back with every commit it acknowledged, and leads again.
    let out = lab.run_lab(&["start", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for_new_primary(&lab, "ap-south-1a", 1, Duration::from_secs(40));
    assert_eq!(lab.psql("ap-south-1a", "SELECT count(*) FROM orders"), "100");
    lab.wait_rows("ap-northeast-1a", "orders", 100, Duration::from_secs(20));
    wait_vouched(&lab, &["ap-northeast-1a"], Duration::from_secs(20));
    let h = last_history(&lab);
    assert_eq!((h["to"].as_str(), h["epoch"].as_u64()), (Some("ap-south-1a"), Some(2)), "{h}");
    lab.finish();
}

#[test]
fn failover_refused_for_lag_beyond_the_budget_and_taken_with_allow_data_loss() {
    let mut lab = TestLab::up(76, &[]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE big (id int, pad text)");
    lab.wait_rows("ap-northeast-1a", "big", 0, Duration::from_secs(10));
    // Build replay lag on the standby: about 40MB of WAL it receives but does not replay.
    pause_replay(&lab, "ap-northeast-1a");
    lab.psql("ap-south-1a", "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 150000) g");
    // Received (so nothing acknowledged is lost with the primary), but not replayed.
    let written = lab.psql_superuser("ap-south-1a", "SELECT pg_current_wal_lsn()");
    wait_until("the standby to receive all the WAL", Duration::from_secs(30), || {
        let got = lab.psql_superuser("ap-northeast-1a", &format!("SELECT pg_last_wal_receive_lsn() >= '{written}'"));
        if got == "t" {
            Ok(())
        } else {
            Err(format!("received < {written}"))
        }
    });
    wait_until("the standby to report more than 16MB of replay lag", Duration::from_secs(20), || {
        let s = lab.try_status()?;
        let lag = node(&s, "ap-northeast-1a")["lag_bytes"].as_u64().unwrap_or(0);
        if lag > 16 << 20 {
            Ok(())
        } else {
            Err(format!("lag {lag}"))
        }
    });
    let out = lab.run_lab(&["kill", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));

    wait_until("status to name the lag budget", Duration::from_secs(20), || {
        let s = lab.try_status()?;
        let reason = s["reason"].as_str().unwrap_or_default().to_string();
        if reason.contains("beyond the 16MB budget") {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(lab.status()["epoch"], 1, "no automatic promotion beyond the budget");

    let out = lab.meridian(&["failover", "--to-region", "ap-northeast-1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("beyond the data-loss budget")
            && stderr.contains("--allow-data-loss")
            && stderr.contains("estimated loss"),
        "{stderr}"
    );
    assert_eq!(lab.status()["epoch"], 1, "a refused failover changes nothing");

    let out = lab.meridian(&[
        "failover",
        "--to-region",
        "ap-northeast-1",
        "--allow-data-loss",
        "--json",
        "--timeout",
        "120s",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The estimate is on received WAL, and the standby received everything: none.
    assert_eq!(report["lost_bytes_estimate"], 0, "{report}");
    assert_eq!(lab.psql("ap-northeast-1a", "SELECT pg_is_in_recovery()"), "f");
    // Received WAL is replayed by the promotion: here nothing acknowledged was actually lost.
    assert_eq!(lab.psql("ap-northeast-1a", "SELECT count(*) FROM big"), "150000");
    let h = last_history(&lab);
    assert_eq!(h["kind"], "dr");
    assert_eq!(h["lost_bytes_estimate"], 0, "{h}");
    lab.finish();
}

#[test]
fn region_partition() {
    let mut lab = TestLab::up(77, &[]);
    lab.expect_error("cannot execute INSERT in a read-only transaction");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 100)");
    lab.wait_rows("ap-northeast-1a", "orders", 100, Duration::from_secs(10));
    let out = lab.run_lab(&["partition", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));

    // Watched from outside the partition (this process is in no region's group):
    // never two writable nodes; the isolated primary fences, the majority promotes.
    let writable = |n: &str| lab.try_psql(n, "SELECT NOT pg_is_in_recovery()").is_ok_and(|r| r == "t");
    let started = Instant::now();
    let (mut old_fenced, mut new_writable) = (None, None);
    while started.elapsed() < Duration::from_secs(30) && (old_fenced.is_none() || new_writable.is_none()) {
        let (old, new) = (writable("ap-south-1a"), writable("ap-northeast-1a"));
        assert!(!(old && new), "split brain: both nodes writable {:?} after the partition", started.elapsed());
        if !old && old_fenced.is_none() {
            old_fenced = Some(started.elapsed());
        }
        if new && new_writable.is_none() {
            new_writable = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (old_fenced, new_writable) =
        (old_fenced.expect("the old primary fenced"), new_writable.expect("a new primary"));
    assert!(old_fenced < new_writable, "fenced at {old_fenced:?}, new primary at {new_writable:?}");
    eprintln!("partition: old primary read-only after {old_fenced:?}, new primary writable after {new_writable:?}");
    // The fenced node may be restarting as a standby (its supervisor stopped it when
    // the lease ran out, then the agent starts it in recovery): until it answers, it
    // refuses connections; once it answers, it refuses the write as read-only.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let refused = match lab.try_psql("ap-south-1a", "INSERT INTO orders VALUES (0)") {
            Ok(out) => panic!("split brain: the isolated node took a write: {out}"),
            Err(e) => e,
        };
        if refused.contains("read-only") {
            break;
        }
        let restarting = ["starting up", "shutting down", "Connection refused", "No such file"];
        assert!(
            restarting.iter().any(|r| refused.contains(r)),
            "the isolated node refuses writes for an unexpected reason: {refused}"
        );
        assert!(
            Instant::now() < deadline,
            "the isolated node did not answer as a read-only standby in 20 s: {refused}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.psql("ap-northeast-1a", "INSERT INTO orders SELECT generate_series(101, 200)");

    let out = lab.run_lab(&["heal"]);
    assert!(out.status.success(), "{}", text(&out));
    let tables = std::process::Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("meridian_lab_77"), "heal left rules behind");
    wait_for_role(&lab, "ap-south-1a", "replica", Duration::from_secs(40));
    lab.wait_rows("ap-south-1a", "orders", 200, Duration::from_secs(10));
    let s = lab.status();
    assert_eq!((s["primary"].as_str(), s["epoch"].as_u64()), (Some("ap-northeast-1a"), Some(2)), "{s}");
    lab.finish();
}

#[test]
fn switchover_that_cannot_complete_leaves_the_old_primary_as_it_was() {
    let lab = TestLab::up(78, &[]);
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 100)");
    lab.wait_rows("ap-northeast-1a", "orders", 100, Duration::from_secs(10));
    // The target cannot replay the old primary's final checkpoint while replay is paused.
    pause_replay(&lab, "ap-northeast-1a");
    let out = lab.meridian(&["switchover", "--to", "ap-northeast-1a", "--timeout", "3s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("switchover aborted; ap-south-1a stays primary"), "{stderr}");
    wait_until("the old primary to take writes again", Duration::from_secs(20), || {
        lab.try_psql("ap-south-1a", "INSERT INTO orders VALUES (101)").map(|_| ())
    });
    // Its report catches up with it within a tick.
    wait_until("status to show the old primary as primary of epoch 1 again", Duration::from_secs(10), || {
        let s = lab.try_status()?;
        match (s["primary"].as_str(), s["epoch"].as_u64()) {
            (Some("ap-south-1a"), Some(1)) => Ok(()),
            _ => Err(s.to_string()),
        }
    });
    assert_eq!(lab.json(&["history"]), serde_json::json!([]));
    lab.psql_superuser("ap-northeast-1a", "SELECT pg_wal_replay_resume()");
    lab.wait_rows("ap-northeast-1a", "orders", 101, Duration::from_secs(20));
    // A new switchover may replace the aborted one, and now it completes.
    wait_for_role(&lab, "ap-northeast-1a", "replica", Duration::from_secs(20));
    let out = lab.meridian(&["switchover", "--to", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(lab.status()["primary"], "ap-northeast-1a");
    lab.finish();
}
