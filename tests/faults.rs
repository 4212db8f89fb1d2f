//! Faults of a bad day that are not a clean death: a frozen agent and a hung
//! server. Each test watches every node through direct connections.

mod common;

use std::time::{Duration, Instant};

use common::*;

const NODES: [&str; 4] = ["ap-south-1a", "ap-south-1b", "ap-northeast-1a", "ap-northeast-1b"];

/// One pass over every node: tries an insert on each, directly. Returns the
/// nodes that acknowledged it (a standby refuses; a stopped or hung server
/// does not answer within psql's connect timeout).
fn writable_now(lab: &TestLab, id: u64) -> Vec<&'static str> {
    NODES
        .iter()
        .copied()
        .filter(|n| lab.try_psql(n, &format!("INSERT INTO probe VALUES ({id}, '{n}')")).is_ok())
        .collect()
}

/// Every pid of a node's PostgreSQL: the postmaster and its children.
fn server_pids(lab: &TestLab, node: &str) -> Vec<i32> {
    let pm = postmaster_pid(lab, node) as i32;
    let mut pids = vec![pm];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok());
        if ppid == Some(pm) {
            pids.push(pid);
        }
    }
    pids
}

fn signal(pids: &[i32], sig: i32) {
    for &p in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(p, sig) };
    }
}

/// Samples every node until a node other than `old` has acknowledged writes
/// for `settle`, or `deadline` passes. Panics on two writable nodes in one
/// pass, or on an acknowledgement by `old` after another node's first one.
/// Returns when the first write was acknowledged elsewhere, from `start`.
fn watch_failover(lab: &TestLab, old: &str, start: Instant, settle: Duration, deadline: Duration) -> Duration {
    let mut id = 1_000_000;
    let mut new_since: Option<Duration> = None;
    while start.elapsed() < deadline {
        id += 1;
        let acked = writable_now(lab, id);
        assert!(
            acked.len() <= 1,
            "split brain {:?} after the fault: {acked:?} all acknowledged writes",
            start.elapsed()
        );
        match acked.first() {
            Some(&n) if n == old => {
                assert!(new_since.is_none(), "{old} acknowledged a write after another node became the primary")
            }
            Some(_) => {
                let since = *new_since.get_or_insert(start.elapsed());
                if start.elapsed() - since >= settle {
                    return since;
                }
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no other node took writes within {deadline:?} of the fault");
}

fn wait_for_replica(lab: &TestLab, name: &str, timeout: Duration) {
    wait_until(&format!("{name} to be a healthy replica"), timeout, || {
        let s = lab.try_status()?;
        let n = node(&s, name);
        if n["role"] == "replica" && n["healthy"] == true {
            Ok(())
        } else {
            Err(n.to_string())
        }
    });
}

#[test]
fn a_frozen_primary_agent_is_fenced_by_its_supervisor_without_split_brain() {
    let mut lab = TestLab::up(92, &["--nodes-per-region", "2"]);
    lab.expect_error("cannot execute INSERT in a read-only transaction");
    lab.expect_error("terminating connection due to");
    lab.psql("ap-south-1a", "CREATE TABLE probe (id bigint, node text)");
    lab.wait_rows("ap-south-1b", "probe", 0, Duration::from_secs(10));
    let agent = pid_of(&lab, "agent-ap-south-1a") as i32;
    let start = Instant::now();
    signal(&[agent], libc::SIGSTOP);
    let first_new = watch_failover(&lab, "ap-south-1a", start, Duration::from_secs(5), Duration::from_secs(30));
    eprintln!("frozen agent: first write elsewhere {first_new:?} after the freeze");
    signal(&[agent], libc::SIGCONT);
    wait_for_replica(&lab, "ap-south-1a", Duration::from_secs(40));
    let s = lab.status();
    assert_eq!(s["epoch"], 2, "{s}");
    let primary = s["primary"].as_str().unwrap().to_string();
    // Everything the new primary acknowledged reached the old one once it followed.
    let on_primary = lab.psql(&primary, "SELECT count(*) FROM probe");
    lab.wait_rows("ap-south-1a", "probe", on_primary.parse().unwrap(), Duration::from_secs(10));
    lab.finish();
}

/// A two-per-region lab with a `probe` table holding `rows` rows on every
/// node, expecting the ERROR lines a hung primary causes.
fn hang_lab(net: u8, rows: u64) -> TestLab {
    let mut lab = TestLab::up(net, &["--nodes-per-region", "2"]);
    for e in [
        "cannot execute INSERT in a read-only transaction",
        "did not answer a probe",
        "failed to",
        "terminating connection due to",
    ] {
        lab.expect_error(e);
    }
    lab.psql("ap-south-1a", "CREATE TABLE probe (id bigint, node text)");
    lab.psql("ap-south-1a", &format!("INSERT INTO probe SELECT g, 'first' FROM generate_series(1, {rows}) g"));
    for n in &NODES[1..] {
        lab.wait_rows(n, "probe", rows, Duration::from_secs(10));
    }
    lab
}

#[test]
fn a_hung_primary_is_replaced_and_every_standby_keeps_its_data() {
    let lab = hang_lab(93, 0);
    let pids = server_pids(&lab, "ap-south-1a");
    assert!(pids.len() > 3, "a postmaster and its processes: {pids:?}");
    let start = Instant::now();
    signal(&pids, libc::SIGSTOP);
    let hang = Duration::from_secs(20);
    let standby_data = |n: &str| lab.path().join("nodes").join(n).join("data").join("PG_VERSION");
    let first_new = watch_failover(&lab, "ap-south-1a", start, Duration::from_secs(3), hang);
    eprintln!("hung primary: first write elsewhere {first_new:?} after the hang");
    // lease TTL (6 s) + 3 s
    assert!(first_new <= Duration::from_secs(9), "write gap {first_new:?} for a hung primary");
    while start.elapsed() < hang {
        for n in &NODES[1..] {
            assert!(standby_data(n).exists(), "{n} lost its data {:?} into the hang", start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&pids, libc::SIGCONT);
    wait_for_replica(&lab, "ap-south-1a", Duration::from_secs(60));
    let s = lab.status();
    assert_eq!(s["epoch"], 2, "{s}");
    let primary = s["primary"].as_str().unwrap().to_string();
    let on_primary: u64 = lab.psql(&primary, "SELECT count(*) FROM probe").parse().unwrap();
    assert!(on_primary > 0);
    for n in NODES {
        lab.wait_rows(n, "probe", on_primary, Duration::from_secs(15));
    }
    lab.finish();
}

/// etcd loses its quorum for 3 s (two of its three members killed, then
/// started again): what an etcd election, or a short cut between its
/// regions, looks like to an agent. The primary's reads of etcd fail, yet
/// its lease cannot have expired, so it goes on taking writes: no fence, no
/// failover, no new timeline. Before, the first failed read fenced it and it
/// promoted itself again on a new timeline (CI's netns test, right after a
/// WAN cut). The lease is 15 s here (provably alive 10 s after a renewal) so
/// that the outage and the members' restart surely fit in it.
#[test]
fn a_primary_takes_writes_through_a_short_loss_of_etcd_quorum() {
    let lab = TestLab::up(91, &["--lease-ttl", "15s"]);
    let before = lab.status();
    let primary = before["primary"].as_str().expect("a primary").to_string();
    let timeline = node(&before, &primary)["timeline"].clone();
    lab.psql(&primary, "CREATE TABLE quorum_probe (id bigint)");
    let members = ["etcd-ap-south-1", "etcd-witness"];
    signal(&members.map(|m| pid_of(&lab, m) as i32), libc::SIGKILL);
    let start = Instant::now();
    let (mut acked, mut failed) = (0, Vec::new());
    let mut write = |lab: &TestLab| match lab.try_psql(&primary, &format!("INSERT INTO quorum_probe VALUES ({acked})"))
    {
        Ok(_) => acked += 1,
        Err(e) => failed.push(format!("{:?}: {e}", start.elapsed())),
    };
    while start.elapsed() < Duration::from_secs(3) {
        write(&lab);
        std::thread::sleep(Duration::from_millis(100));
    }
    for region in ["ap-south-1", "witness"] {
        let out = lab.run_lab(&["start", region]);
        assert!(out.status.success(), "{}", text(&out));
    }
    write(&lab);
    let outage = start.elapsed();
    assert!(failed.is_empty(), "{acked} writes acknowledged in {outage:?} without etcd quorum, but {failed:?}");

    // The silence reached the agent (else this tested nothing) ...
    let agent_log = std::fs::read_to_string(lab.path().join(format!("logs/agent-{primary}.log"))).unwrap();
    assert!(
        agent_log.contains("etcd does not answer; still primary"),
        "the primary's agent never found etcd silent: {}",
        lab.log_tails()
    );
    assert!(!agent_log.contains("fencing:"), "the primary fenced: {}", lab.log_tails());
    // ... and changed nothing.
    let after = lab.status();
    assert_eq!(after["primary"].as_str(), Some(primary.as_str()), "{after}");
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(node(&after, &primary)["timeline"], timeline, "{after}");
    assert_eq!(lab.psql(&primary, "SELECT count(*) FROM quorum_probe"), acked.to_string());
    eprintln!("{acked} writes acknowledged through {outage:?} without etcd quorum");
    lab.finish();
}

#[test]
fn clocks_skewed_30_seconds_either_way_change_nothing() {
    let mut lab = TestLab::up(95, &["--nodes-per-region", "2"]);
    lab.expect_error("terminating connection due to");
    for (node, offset) in [("ap-south-1b", "-30s"), ("ap-northeast-1a", "+30s"), ("ap-northeast-1b", "-30s")] {
        let out = lab.run_lab(&["skew", node, offset]);
        assert!(out.status.success(), "{}", text(&out));
    }
    wait_until("every node healthy with skewed clocks", Duration::from_secs(20), || {
        let s = lab.try_status()?;
        let all = s["nodes"].as_array().unwrap().iter().all(|n| n["healthy"] == true);
        if all {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    // A switchover to a node 30 s behind.
    let out = lab.meridian(&["switchover", "--to", "ap-south-1b"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = lab.status();
    assert_eq!((s["primary"].as_str(), s["epoch"].as_u64()), (Some("ap-south-1b"), Some(2)), "{s}");
    lab.psql("ap-south-1b", "CREATE TABLE skew (region text)");
    let write_everywhere = |lab: &TestLab, regions: &[&str], timeout: Duration| {
        for r in regions {
            wait_until(&format!("a write through {r}'s writer port"), timeout, || {
                lab.try_psql_via(r, "writer", &format!("INSERT INTO skew VALUES ('{r}')"))
            });
        }
    };
    write_everywhere(&lab, &["ap-south-1", "ap-northeast-1", "witness"], Duration::from_secs(5));
    // The standbys have followed the new primary and replayed the writes (what
    // is tested is a failover with skewed clocks, not an asynchronous loss).
    for n in ["ap-northeast-1a", "ap-northeast-1b"] {
        lab.wait_rows(n, "skew", 3, Duration::from_secs(20));
    }
    // A failover to a region whose nodes are 30 s ahead and 30 s behind.
    let start = Instant::now();
    let out = lab.run_lab(&["kill", "ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));
    write_everywhere(&lab, &["ap-northeast-1", "witness"], Duration::from_secs(20));
    eprintln!("skewed failover: writes through every surviving writer port {:?} after the kill", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(15), "writes took {:?}", start.elapsed());
    let s = lab.status();
    assert_eq!(s["epoch"], 3, "{s}");
    assert!(s["primary"].as_str().unwrap().starts_with("ap-northeast-1"), "{s}");
    lab.finish();
}

/// The incident of issue 11: right after a failover the new primary hangs,
/// and the old primary comes back needing a rewind against it. Nobody may
/// empty a data directory for a leader that does not answer, and epoch 3 is
/// led by a server that answers.
#[test]
fn a_primary_hanging_right_after_a_failover_costs_no_copy() {
    let mut lab = hang_lab(96, 1);
    // The old primary may rejoin the second one before it hangs, then follow the
    // third while still on the second's timeline: the third's walsender refuses
    // the second timeline's last segment once ("requested WAL segment ... has
    // already been removed") until the agent sees the mismatch and rewinds
    // (seen once in CI, healed within 2 s; the assertions below are the promise).
    lab.expect_error("has already been removed");
    // The hung second primary's own timeline 2 is a dead branch: the third's
    // timeline (3: epoch N takes timeline N, see postgres/timeline.rs) does
    // not contain it, its walreceiver is refused, and the agent rewinds.
    lab.expect_error("is not in this server's history");
    // ... and the walsender that refused it may find its client gone already.
    lab.expect_error("walsender FATAL:  connection to client lost");
    let out = lab.run_lab(&["kill", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = wait_until("a new primary after the kill", Duration::from_secs(30), || {
        let s = lab.try_status()?;
        if s["epoch"] == 2 && s["primary"].is_string() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    let second = s["primary"].as_str().unwrap().to_string();
    // It hangs at once; the old primary comes back meanwhile and wants to rejoin it.
    let pids = server_pids(&lab, &second);
    signal(&pids, libc::SIGSTOP);
    let start = Instant::now();
    let out = lab.run_lab(&["start", "ap-south-1a"]);
    eprintln!("lab start during the hang: {}", text(&out));
    let others: Vec<&str> = NODES.iter().copied().filter(|n| *n != second).collect();
    let data = |n: &str| lab.path().join("nodes").join(n).join("data").join("PG_VERSION");
    let mut third = None;
    while start.elapsed() < Duration::from_secs(30) {
        for n in &others {
            assert!(data(n).exists(), "{n} lost its data {:?} into the hang of {second}", start.elapsed());
        }
        if third.is_none() {
            third =
                lab.try_status().ok().filter(|s| s["epoch"] == 3).and_then(|s| s["primary"].as_str().map(String::from));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for node in ["ap-south-1a", second.as_str()] {
        let agent_log = std::fs::read_to_string(lab.path().join(format!("logs/agent-{node}.log"))).unwrap_or_default();
        eprintln!(
            "{node} during the hang:\n{}",
            agent_log.lines().filter(|l| !l.contains("DEBUG")).rev().take(16).collect::<Vec<_>>().join("\n")
        );
    }
    let third = third.expect("a third primary while the second hung");
    if third == second {
        // Its supervisor killed the hung server and the agent started a new one,
        // which has the most WAL (the writes of epoch 2 exist only there): it
        // rightly leads again. Seen on the netns lab, where the WAN delays the others.
        let now = postmaster_pid(&lab, &second) as i32;
        assert!(!pids.contains(&now), "{second} leads epoch 3 with its hung server (postmaster {now})");
    }
    signal(&pids, libc::SIGCONT);
    for n in NODES {
        if n != third {
            wait_for_replica(&lab, n, Duration::from_secs(60));
        }
    }
    let rows: u64 = lab.psql(&third, "SELECT count(*) FROM probe").parse().unwrap();
    for n in NODES {
        lab.wait_rows(n, "probe", rows, Duration::from_secs(15));
    }
    // One timeline number per promotion: two standbys of timeline 1 promoted
    // one after the other once both chose 2, and the first's node never
    // streamed again (CI, the netns lab).
    let s = lab.status();
    let timeline = node(&s, &third)["timeline"].as_u64().unwrap();
    assert!(timeline >= s["epoch"].as_u64().unwrap(), "{third} leads epoch {} on timeline {timeline}", s["epoch"]);
    lab.finish();
}

/// A copy pg_rewind cannot repair (the WAL before the fork is gone) is
/// replaced by a fresh one made beside it; meanwhile it runs again on its own
/// timeline. PostgreSQL refuses to start it on the leader's, which it cannot
/// follow ("requested timeline 2 is not a child of this server's history";
/// CI saw "... does not contain minimum recovery point" after a hang).
#[test]
fn a_copy_that_cannot_be_rewound_runs_on_its_own_timeline_while_a_fresh_one_is_made() {
    use std::os::unix::fs::MetadataExt;
    let mut lab = TestLab::up(130, &[]);
    lab.expect_error("failed to rewind");
    lab.expect_error("terminating connection due to");
    let (old, new) = ("ap-south-1a", "ap-northeast-1a");
    lab.psql(old, "CREATE TABLE probe (id bigint, node text)");
    lab.psql(old, "INSERT INTO probe VALUES (1, 'first')");
    lab.wait_rows(new, "probe", 1, Duration::from_secs(10));
    let out = lab.run_lab(&["kill", old]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the standby to lead epoch 2", Duration::from_secs(30), || {
        let s = lab.try_status()?;
        if s["epoch"] == 2 && s["primary"] == new {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    lab.psql(new, "INSERT INTO probe VALUES (2, 'second')");

    // The old primary takes a write of its own past the fork, by hand, on a
    // socket only, without archiving, then loses the segment the fork is in.
    let data = lab.path().join("nodes").join(old).join("data");
    let socket = lab.path().join("by-hand");
    let owner = std::fs::metadata(&data).unwrap();
    std::fs::create_dir_all(&socket).unwrap();
    std::os::unix::fs::chown(&socket, Some(owner.uid()), Some(owner.gid())).unwrap();
    // As the data directory's owner (the lab's os_user), as PostgreSQL requires.
    let as_owner = |program: &str| {
        let mut cmd = std::process::Command::new(program);
        std::os::unix::process::CommandExt::uid(&mut cmd, owner.uid());
        std::os::unix::process::CommandExt::gid(&mut cmd, owner.gid());
        cmd
    };
    let pg_ctl = |args: &[&str]| {
        let out = as_owner("/usr/lib/postgresql/15/bin/pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-w", "-t", "60"])
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(out.status.success(), "pg_ctl {args:?}: {}", text(&out));
    };
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    let options = format!(
        "-c archive_mode=off -c listen_addresses='' -c ssl=off -c synchronous_standby_names='' -c unix_socket_directories={}",
        socket.display()
    );
    let log = socket.join("postgresql.log");
    pg_ctl(&["-l", &log.display().to_string(), "-o", &options, "start"]);
    let (_, port) = lab.node_addr(old);
    let written = as_owner("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", "app", "-h"])
        .arg(&socket)
        .args(["-p", &port.to_string()])
        .args(["-c", "INSERT INTO probe VALUES (3, 'lost')", "-c", "SELECT pg_switch_wal()", "-c", "CHECKPOINT"])
        .output()
        .expect("run psql");
    pg_ctl(&["-m", "fast", "stop"]);
    assert!(written.status.success(), "a write on the old primary by hand: {}", text(&written));
    let history = lab.path().join("nodes").join(new).join("data").join("pg_wal").join("00000002.history");
    let history_text = std::fs::read_to_string(&history).unwrap();
    let fork = history_text.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap().to_string();
    let (hi, lo) = fork.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let segment = data.join("pg_wal").join(format!("00000001{:08X}{:08X}", lsn >> 32, (lsn >> 24) & 0xFF));
    std::fs::remove_file(&segment).unwrap_or_else(|e| panic!("remove {}: {e}", segment.display()));
    // As after a short stream from the new leader: its history is in pg_wal.
    let copied = data.join("pg_wal").join("00000002.history");
    std::fs::copy(&history, &copied).unwrap();
    std::os::unix::fs::chown(&copied, Some(owner.uid()), Some(owner.gid())).unwrap();

    let out = lab.run_lab(&["start", old]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for_replica(&lab, old, Duration::from_secs(60));
    lab.wait_rows(old, "probe", 2, Duration::from_secs(15));
    assert_eq!(
        lab.psql(old, "SELECT count(*) FROM probe WHERE id = 3"),
        "0",
        "the lost write is gone with the old copy"
    );
    let agent_log = std::fs::read_to_string(lab.path().join(format!("logs/agent-{old}.log"))).unwrap();
    let after_rewind = agent_log.split("failed to rewind").nth(1).expect("a failed rewind in the agent's log");
    assert!(
        after_rewind.contains("making a fresh copy beside it")
            && after_rewind.contains("PostgreSQL running as standby with no upstream")
            && after_rewind.contains("swapped a fresh copy"),
        "the old copy did not run while the fresh one was made:\n{after_rewind}"
    );
    lab.finish();
}
