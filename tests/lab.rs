//! The lab end to end: a three-region cluster of real etcd, agents, gateways
//! and PostgreSQL, checked with psql, the status JSON and verify.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn lab_up_replicates_across_regions_and_reports_status() {
    let mut lab = TestLab::up(61, &[]);
    lab.expect_error("cannot execute CREATE TABLE in a read-only transaction");

    // `lab up` returns once health has settled: right away, every check has a
    // verdict from every gateway, and none is pending or unhealthy.
    let health = lab.json(&["health"]);
    for check in health["checks"].as_array().unwrap() {
        assert_eq!(check["pending"], false, "{check}");
        assert_eq!(check["healthy"], true, "{check}");
    }
    let table = text(&lab.meridian(&["health"]));
    assert!(!table.contains("UNHEALTHY") && !table.contains("pending"), "{table}");

    // The lab's CA and a certificate per node, gateway and etcd member, each key 0600.
    let tls = lab.path().join("tls");
    let certs: Vec<String> = ["node-ap-south-1a", "node-ap-northeast-1a", "gateway-witness", "etcd-witness"]
        .iter()
        .map(|d| tls.join(d).join("tls.crt").display().to_string())
        .collect();
    let mut args = vec!["ca", "show"];
    args.extend(certs.iter().map(String::as_str));
    let shown = lab.json(&args);
    for c in shown.as_array().unwrap() {
        assert!(c["issuer"].as_str().unwrap().contains("meridian cluster CA (lab)"), "{c}");
        assert_eq!(c["expiring"], false, "{c}");
    }
    use std::os::unix::fs::PermissionsExt;
    for key in [tls.join("ca/ca.key"), tls.join("node-ap-south-1a/tls.key")] {
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
    }

    let status = lab.status();
    assert_eq!(status["cluster"], "lab");
    assert_eq!(status["epoch"], 1, "the bootstrap epoch is 1");
    assert_eq!(status["primary"], "ap-south-1a");
    let primary = node(&status, "ap-south-1a");
    assert_eq!(primary["role"], "primary");
    assert_eq!(primary["healthy"], true);
    assert_eq!(primary["timeline"], 1);
    let replica = node(&status, "ap-northeast-1a");
    assert_eq!(replica["role"], "replica");
    assert_eq!(replica["region"], "ap-northeast-1");
    assert_eq!(replica["healthy"], true);

    // Roles as PostgreSQL itself sees them.
    assert_eq!(lab.psql("ap-south-1a", "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(lab.psql("ap-northeast-1a", "SELECT pg_is_in_recovery()"), "t");
    let refused = lab.try_psql("ap-northeast-1a", "CREATE TABLE nope (id int)").unwrap_err();
    assert!(refused.contains("read-only transaction"), "{refused}");

    // Rows written on the primary arrive in the other region.
    lab.psql(
        "ap-south-1a",
        "CREATE TABLE orders (id bigint PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 2000)",
    );
    lab.wait_rows("ap-northeast-1a", "orders", 2000, Duration::from_secs(10));
    // The replica streams over the replication role, not as a superuser; the
    // application role may not even see who replicates.
    assert_eq!(lab.psql("ap-south-1a", "SELECT count(*) FROM pg_stat_replication WHERE state IS NOT NULL"), "0");
    let sender = lab.psql_monitor(
        "ap-south-1a",
        "SELECT usename || ' ' || state || ' ' || application_name FROM pg_stat_replication",
    );
    assert_eq!(sender, "replicator streaming ap-northeast-1a");

    let verify = lab.json(&["verify", "--timeout", "10s"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["primary"], "ap-south-1a");
    let r = &verify["replicas"][0];
    assert_eq!(r["name"], "ap-northeast-1a");
    assert!(r["catch_up_ms"].as_f64().unwrap() < 10_000.0, "{r}");

    // Human output and metrics.
    let table = lab.meridian(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("primary ap-south-1a") && table.contains("replica"), "{table}");

    // lab up on a running lab changes nothing.
    let again = lab.run_lab(&["up", "--net", "61"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already running"), "{}", text(&again));
    assert_eq!(lab.status()["epoch"], 1);

    lab.finish();
}

#[test]
fn gateway_serves_metrics_and_health() {
    let lab = TestLab::up(62, &["--regions", "eu-west-1,us-east-1,ap-east-1"]);
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(lab.config()).unwrap()).unwrap();
    let regions = config["region"].as_array().unwrap();
    assert_eq!(regions.len(), 3, "three database regions need no witness");
    for region in regions {
        let api = region["gateway"]["api"].as_str().unwrap();
        let (status, health) = lab.https_get(api, "/healthz");
        assert_eq!(status, 200, "{health}");
        let (status, metrics) = lab.https_get(api, "/metrics");
        assert_eq!(status, 200, "{metrics}");
        assert!(metrics.contains("meridian_cluster_epoch{cluster=\"lab\"} 1"), "{metrics}");
        assert!(
            metrics.contains("meridian_node_role{node=\"eu-west-1a\",region=\"eu-west-1\",role=\"primary\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("meridian_node_lag_bytes{node=\"ap-east-1a\",region=\"ap-east-1\"}"), "{metrics}");
    }
    let status = lab.status();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
    assert!(status["nodes"].as_array().unwrap().iter().all(|n| n["healthy"] == true), "{status}");
    lab.finish();
}

#[test]
fn killed_replica_node_comes_back_and_catches_up() {
    let mut lab = TestLab::up(63, &[]);
    // SIGKILL of a postmaster: its own backends say so as they exit.
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE t (id bigint); INSERT INTO t SELECT generate_series(1, 1000)");

    // A dead agent means a stopped PostgreSQL (parent-death signal). A query
    // of the agent's in flight when it is killed ends its backend so.
    lab.expect_error("FATAL:  connection to client lost");
    let agent = pid_of(&lab, "agent-ap-northeast-1a");
    let postmaster = postmaster_pid(&lab, "ap-northeast-1a");
    unsafe { libc::kill(agent as i32, libc::SIGKILL) };
    wait_until("the replica's postmaster to exit after its agent died", Duration::from_secs(5), || {
        if alive(postmaster) {
            Err(format!("pid {postmaster} alive"))
        } else {
            Ok(())
        }
    });
    // No --dir: the lab is found from $MERIDIAN_CONFIG, as `lab up` told the user to export.
    let out = lab.meridian(&["lab", "start", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));

    // A PostgreSQL that dies under a live agent is restarted by it (and logged).
    lab.expect_error("PostgreSQL exited unexpectedly");
    let postmaster = postmaster_pid(&lab, "ap-northeast-1a");
    unsafe { libc::kill(postmaster as i32, libc::SIGKILL) };
    wait_until("the agent to restart its PostgreSQL", Duration::from_secs(15), || {
        let now = try_postmaster_pid(&lab, "ap-northeast-1a");
        match lab.try_psql("ap-northeast-1a", "SELECT pg_is_in_recovery()") {
            Ok(r) if now.is_some_and(|p| p != postmaster) && r == "t" => Ok(()),
            other => Err(format!("postmaster {now:?}: {other:?}")),
        }
    });
    let log = std::fs::read_to_string(lab.path().join("logs/agent-ap-northeast-1a.log")).unwrap();
    assert!(log.contains("PostgreSQL exited unexpectedly"), "{log}");

    // Now the whole node, as a fault.
    let out = lab.run_lab(&["kill", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("status to show the killed node as unknown", Duration::from_secs(10), || {
        let s = lab.try_status()?;
        let n = node(&s, "ap-northeast-1a");
        if n["role"] == "unknown" && n["healthy"] == false {
            Ok(())
        } else {
            Err(n.to_string())
        }
    });
    // The primary goes on taking writes meanwhile.
    lab.psql("ap-south-1a", "INSERT INTO t SELECT generate_series(1, 5000)");
    let verify = lab.meridian(&["verify", "--timeout", "2s"]);
    assert_eq!(verify.status.code(), Some(2), "verify must fail while a replica is down: {}", text(&verify));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("ap-northeast-1a"), "{}", text(&verify));

    let out = lab.run_lab(&["start", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_rows("ap-northeast-1a", "t", 6000, Duration::from_secs(20));
    let status = lab.status();
    assert_eq!(node(&status, "ap-northeast-1a")["role"], "replica");
    assert_eq!(status["epoch"], 1, "a replica restart is no failover");
    assert_eq!(lab.json(&["verify"])["ok"], true);
    lab.finish();
}

#[test]
fn lab_down_cleans_up_after_crashed_processes() {
    let lab = TestLab::up(64, &["--nodes-per-region", "2"]);
    assert_eq!(lab.status()["nodes"].as_array().unwrap().len(), 4);
    // Crash what `lab down` would normally stop: an agent, a gateway and an etcd member die
    // hard, and a stale pid file points at a pid that is not ours.
    for p in ["agent-ap-northeast-1b", "gateway-witness", "etcd-ap-south-1"] {
        unsafe { libc::kill(pid_of(&lab, p) as i32, libc::SIGKILL) };
    }
    std::fs::write(lab.path().join("pids").join("gateway-witness.pid"), format!("{}\n", std::process::id())).unwrap();
    let path = lab.path().display().to_string();
    let out = lab.run_lab(&["down"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!lab.path().exists());
    let left = processes_mentioning(&path);
    assert!(left.is_empty(), "left behind: {left:#?}");
    let again = lab.run_lab(&["down"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    // The test process itself (the stale pid) was not signalled: we are still here.
    std::mem::forget(lab);
}

#[test]
fn a_lost_region_leaves_the_cluster_answering_and_comes_back() {
    let mut lab = TestLab::up(65, &[]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    let out = lab.run_lab(&["kill", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let killed = String::from_utf8_lossy(&out.stdout).into_owned();
    for p in ["agent-ap-northeast-1a", "gateway-ap-northeast-1", "etcd-ap-northeast-1"] {
        assert!(killed.contains(p), "{p} not killed: {killed}");
    }
    // Two of three etcd members keep a quorum; the CLI skips the dead gateway.
    wait_until("the lost region's node to show as unknown", Duration::from_secs(15), || {
        let s = lab.try_status()?;
        if node(&s, "ap-northeast-1a")["role"] == "unknown" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let s = lab.status();
    assert_eq!(s["primary"], "ap-south-1a");
    assert_eq!(s["epoch"], 1);
    lab.psql("ap-south-1a", "CREATE TABLE during_outage (id int); INSERT INTO during_outage VALUES (1), (2), (3)");

    let out = lab.run_lab(&["start", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_rows("ap-northeast-1a", "during_outage", 3, Duration::from_secs(30));
    let verify = lab.json(&["verify"]);
    assert_eq!(verify["ok"], true, "{verify}");
    lab.finish();
}
