//! The netns lab (`lab up --hosts netns`): every process on a host of its own,
//! regions a WAN apart, and nothing left behind by `lab down`, even after a
//! crash.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The TCP connect times (one round trip each) from inside namespace `ns` to `addr`, in ms, sorted.
fn connect_rtts(ns: &str, addr: &str, count: u32) -> Vec<f64> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = format!(
        "import socket, time\n\
         for _ in range({count}):\n\
         \x20   s = socket.socket(); t = time.perf_counter(); s.connect(('{host}', {port}))\n\
         \x20   print((time.perf_counter() - t) * 1000); s.close()\n"
    );
    let out = Command::new("ip").args(["netns", "exec", ns, PYTHON, "-c", &script]).output().unwrap();
    assert!(out.status.success(), "measure from {ns} to {addr}: {}", text(&out));
    let mut v: Vec<f64> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().unwrap()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The network namespace of a process (`net:[inode]`).
fn netns_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap().display().to_string()
}

fn drill(lab: &TestLab, scenario: &str) -> Value {
    let report_dir = lab.path().join(format!("drill-{scenario}"));
    let out = lab.meridian(&[
        "drill",
        "--json",
        "--report",
        report_dir.to_str().unwrap(),
        "--scenario",
        scenario,
        "--writers",
        "3",
        "--rate",
        "40",
    ]);
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("drill printed no JSON ({e}): {}", text(&out)));
    assert_eq!(out.status.code(), Some(0), "{scenario}: {}", serde_json::to_string_pretty(&report).unwrap());
    report
}

#[test]
fn isolated_hosts_a_wan_apart_fail_over_switch_over_and_survive_a_partition() {
    let mut lab = TestLab::up(120, &["--hosts", "netns", "--wan-latency", "20ms", "--synchronous", "remote"]);
    // A standby whose upstream is cut off or killed says so before it follows the new primary.
    lab.expect_error("could not receive data from WAL stream");
    lab.expect_error("terminating connection due to unexpected postmaster exit");

    // Every process on a host of its own: no two share a network stack, none shares ours.
    let mut stacks: BTreeMap<String, String> = BTreeMap::new();
    let ours = netns_of(std::process::id());
    for entry in std::fs::read_dir(lab.path().join("pids")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap().trim_end_matches(".pid").to_string();
        if name.starts_with("s3-") {
            continue; // the lab's S3 server stands outside, as a cloud's object store does
        }
        let ns = netns_of(pid_of(&lab, &name));
        assert_ne!(ns, ours, "{name} runs in the test's own network namespace");
        if let Some(other) = stacks.insert(ns.clone(), name.clone()) {
            assert!(name == "wan" || other == "wan", "{name} and {other} share the network namespace {ns}");
        }
    }
    assert!(stacks.len() >= 8, "etcd x3, gateways x3, agents x2 (and the relay): {stacks:?}");

    // What a packet sees: a round trip between regions takes twice the one-way delay; within a region, nothing.
    let (primary, _) = lab.node_addr("ap-south-1a");
    let (remote, _) = lab.node_addr("ap-northeast-1a");
    let across = connect_rtts("mlab120-ap-south-1a", &format!("{remote}:5432"), 20);
    let (p50, max) = (across[10], across[19]);
    assert!(
        (40.0..60.0).contains(&p50),
        "round trip between regions p50 {p50:.1} ms, want 40 ms (+ relay): {across:?}"
    );
    assert!(max < 100.0, "{across:?}");
    let (gateway, port) = lab.gateway_addr("ap-south-1", "api");
    let within = connect_rtts("mlab120-ap-south-1a", &format!("{gateway}:{port}"), 20);
    assert!(within[10] < 5.0, "round trip within a region p50 {:.1} ms: {within:?}", within[10]);
    assert_ne!(primary, remote);

    // Killing the relay is a WAN outage: nothing crosses between regions until it is back.
    let out = lab.run_lab(&["kill", "wan"]);
    assert!(out.status.success(), "{}", text(&out));
    let probe = format!(
        "import socket\ns = socket.socket(); s.settimeout(1)\ntry:\n    s.connect(('{remote}', 5432)); print('through')\nexcept OSError as e:\n    print('cut', e)\n"
    );
    let cut = Command::new("ip").args(["netns", "exec", "mlab120-ap-south-1a", PYTHON, "-c", &probe]).output().unwrap();
    assert!(String::from_utf8_lossy(&cut.stdout).starts_with("cut"), "with the relay killed: {}", text(&cut));
    let out = lab.run_lab(&["start", "wan"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("a connection across the WAN again", Duration::from_secs(10), || {
        let out = Command::new("ip").args(["netns", "exec", "mlab120-ap-south-1a", PYTHON, "-c", &probe]).output();
        let stdout = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        if stdout.starts_with("through") {
            Ok(())
        } else {
            Err(stdout)
        }
    });

    // The drill runs unchanged and says which network it ran on.
    let report = drill(&lab, "primary-region-partition");
    assert_eq!(report["network"]["hosts"], "netns", "{report}");
    assert_eq!(report["network"]["wan"]["latency"], "20ms", "{report}");
    let round = &report["rounds"][0];
    assert_eq!(round["missing_acknowledged"], 0, "synchronous = remote loses nothing: {round}");
    let html = std::fs::read_to_string(lab.path().join("drill-primary-region-partition/drill.html")).unwrap();
    assert!(html.contains("WAN 20 ms each way (40 ms round trip)"), "the report shows the WAN");

    for scenario in ["switchover", "primary-node-kill"] {
        let report = drill(&lab, scenario);
        let round = &report["rounds"][0];
        assert_eq!(round["missing_acknowledged"], 0, "{scenario}: {round}");
        assert!(round["rto_ms"].as_u64().unwrap() <= 10_000, "{scenario}: {round}");
    }
    assert_eq!(lab.json(&["verify"])["ok"], true);
    lab.finish();
}

#[test]
fn bad_netns_input_is_refused_and_a_crashed_netns_lab_is_removed_by_down() {
    let dir = tempfile::Builder::new().prefix("meridian-test-").tempdir_in("/tmp").unwrap();
    let target = dir.path().join("lab");
    let up = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["lab", "up", "--net", "121", "--dir", target.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "lab up {extra:?} should be refused");
        assert!(!target.exists(), "lab up {extra:?} left {} behind", target.display());
        assert!(netns_leftovers(121).is_empty(), "lab up {extra:?} left {:?}", netns_leftovers(121));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for (args, says) in [
        (&["--hosts", "netns", "--wan-latency", "forty"][..], "not a duration like 40ms"),
        (&["--hosts", "netns", "--wan-latency", "40ms", "--wan-loss", "2"], "percentage like 0.5%"),
        (&["--hosts", "netns", "--wan-latency", "40ms", "--wan-jitter", "50ms"], "must not exceed"),
        (&["--wan-latency", "40ms"], "needs --hosts netns"),
        (&["--hosts", "bridges"], "invalid value 'bridges'"),
    ] {
        let e = up(args);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    // A namespace of the lab's name already exists: refused, and it is left alone.
    let status = Command::new("ip").args(["netns", "add", "mlab121-router"]).status().unwrap();
    assert!(status.success());
    let out = Command::new(BIN)
        .args(["lab", "up", "--net", "121", "--hosts", "netns", "--dir", target.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = Command::new("ip").args(["netns", "del", "mlab121-router"]).status();
    assert!(!out.status.success());
    assert!(text(&out).contains("mlab121-router already exist"), "{}", text(&out));
    assert!(!target.exists());

    // A crash: every process of a netns lab SIGKILLed; `lab down` still removes every namespace.
    let lab = TestLab::up(121, &["--hosts", "netns", "--wan-latency", "5ms", "--no-backup"]);
    assert_eq!(netns_leftovers(121).len(), 10, "router, 3 etcd, 3 gateways, 2 nodes, the observer link");
    for entry in std::fs::read_dir(lab.path().join("pids")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        unsafe { libc::kill(pid_of(&lab, name.trim_end_matches(".pid")) as i32, libc::SIGKILL) };
    }
    let path = lab.path().display().to_string();
    wait_until("the lab's processes to die", Duration::from_secs(10), || {
        let left = processes_mentioning(&path);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    lab.finish();
}

/// The primary's commit-lag guard as `status --json` shows it.
fn commit_hold(lab: &TestLab) -> Result<Value, String> {
    let s = lab.try_status()?;
    let primary = s["primary"].as_str().ok_or("no primary")?.to_string();
    Ok(node(&s, &primary)["commit_hold"].clone())
}

#[test]
fn the_commit_lag_guard_holds_commits_while_the_remote_region_is_cut_off_and_lets_them_go_after() {
    let mut lab =
        TestLab::up(122, &["--hosts", "netns", "--wan-latency", "20ms", "--max-commit-lag", "3s", "--no-backup"]);
    lab.expect_error("could not receive data from WAL stream");
    lab.try_psql_via("ap-south-1", "writer", "CREATE TABLE guarded (id int PRIMARY KEY)").unwrap();
    wait_until("the guard to let commits go", Duration::from_secs(30), || match commit_hold(&lab)? {
        h if h["holding"] == false => Ok(()),
        h => Err(format!("{h}")),
    });
    lab.try_psql_via("ap-south-1", "writer", "INSERT INTO guarded VALUES (1)").unwrap();

    // The remote region cut off: within the budget (3 s) and a tick, commits are held.
    let out = lab.run_lab(&["partition", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the guard to hold commits", Duration::from_secs(20), || match commit_hold(&lab)? {
        h if h["holding"] == true => Ok(()),
        h => Err(format!("{h}")),
    });
    let status = text(&lab.meridian(&["status"]));
    assert!(status.contains("WARNING: primary ap-south-1a holds commits"), "{status}");
    let (writer, port) = lab.gateway_addr("ap-south-1", "writer");
    let passfile = lab.path().join("pgpass");
    let held = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let r = run_psql(&writer, port, "app", "app", Some(&passfile), "INSERT INTO guarded VALUES (2)");
        (r, started.elapsed())
    });
    // Held, not refused: still waiting well past a WAN round trip.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!held.is_finished(), "a commit went through while no remote standby was within the budget");

    // The region back: the held commit completes, and the guard lets commits go again (no deadlock).
    let out = lab.run_lab(&["heal"]);
    assert!(out.status.success(), "{}", text(&out));
    let (result, took) = held.join().unwrap();
    assert!(result.is_ok(), "the held commit failed: {result:?}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    wait_until("the guard to let commits go again", Duration::from_secs(30), || match commit_hold(&lab)? {
        h if h["holding"] == false => Ok(()),
        h => Err(format!("{h}")),
    });
    lab.try_psql_via("ap-south-1", "writer", "INSERT INTO guarded VALUES (3)").unwrap();
    let rows =
        lab.try_psql_via("ap-south-1", "writer", "SELECT string_agg(id::text, ',' ORDER BY id) FROM guarded").unwrap();
    assert_eq!(rows, "1,2,3");
    lab.finish();
}
