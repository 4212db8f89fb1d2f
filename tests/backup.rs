//! WAL archiving with pgBackRest against real labs: an S3 repository (moto
//! behind TLS from the lab's CA) and a directory repository, across failovers
//! and switchovers.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use meridian::backup::chain;

const REPOSITORIES: [u32; 2] = [1, 2];

/// The WAL file names (checksums stripped) in repository `repo`, listed with `node`'s configuration.
fn archived(lab: &TestLab, node: &str, repo: u32) -> Result<BTreeSet<String>, String> {
    let run = lab.path().join("nodes").join(node).join("run");
    let out = Command::new("pgbackrest")
        .arg(format!("--config={}", run.join("pgbackrest.conf").display()))
        .arg(format!("--config-include-path={}", run.join("pgbackrest/conf.d").display()))
        .args(["--stanza=lab", &format!("--repo={repo}"), "--log-level-file=off", "--log-level-console=error"])
        .args(["--output=json", "repo-ls", "--recurse", "archive/lab"])
        .output()
        .map_err(|e| format!("run pgbackrest: {e}"))?;
    if !out.status.success() {
        return Err(format!("repo{repo}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let listing: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parse repo-ls: {e}"))?;
    Ok(listing.keys().map(|k| chain::archived_name(k).to_string()).collect())
}

/// Closes the primary's current segment and returns (timeline, position after the switch).
fn switch_wal(lab: &TestLab, primary: &str) -> (u32, u64) {
    lab.psql_superuser(primary, "SELECT pg_switch_wal()");
    let row = lab.psql_superuser(primary, "SELECT pg_walfile_name(l) || ' ' || l FROM pg_current_wal_lsn() l");
    let (file, lsn) = row.split_once(' ').unwrap();
    let (tli, _) = chain::parse_segment(file).unwrap();
    (tli, chain::parse_lsn(lsn).unwrap())
}

/// The switches in the primary's history for timeline `tli` (none on timeline 1).
fn history(lab: &TestLab, primary: &str, tli: u32) -> Vec<chain::Switch> {
    if tli == 1 {
        return Vec::new();
    }
    let text = lab.psql_superuser(primary, &format!("SELECT pg_read_file('pg_wal/{tli:08X}.history')"));
    chain::parse_history(&text)
}

/// Until every repository holds every segment from the first up to `to`, and
/// the history file of every timeline after the first.
fn wait_chain_complete(lab: &TestLab, primary: &str, tli: u32, to: u64, timeout: Duration) {
    let switches = history(lab, primary, tli);
    let mut need = chain::needed(&switches, tli, 1, to);
    need.extend((2..=tli).map(|t| format!("{t:08X}.history")));
    wait_until(&format!("every repository to hold the WAL chain up to timeline {tli}"), timeout, || {
        for repo in REPOSITORIES {
            let missing = chain::missing(&archived(lab, primary, repo)?, &need);
            if !missing.is_empty() {
                return Err(format!("repo{repo} lacks {missing:?}"));
            }
        }
        Ok(())
    });
}

/// A signal by pid (a fresh machine may have no kill(1): procps is not in a minimal root).
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

fn wait_primary(lab: &TestLab, node: &str, timeout: Duration) {
    wait_until(&format!("{node} to be a healthy primary"), timeout, || {
        let s = lab.try_status()?;
        let n = common::node(&s, node);
        if s["primary"] == node && n["healthy"] == true {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
}

/// The gap other HA stacks have: a primary dies before archiving its last
/// segments; the standby had them by streaming. Here the standby held them
/// (its archive command succeeds only once every repository has a file) and
/// pushes them once promoted; then a switchover adds a third timeline.
#[test]
fn archiving_leaves_no_gap_across_a_failover_and_a_switchover() {
    let mut lab = TestLab::up(110, &[]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    let (tli, to) = switch_wal(&lab, "ap-south-1a");
    wait_chain_complete(&lab, "ap-south-1a", tli, to, Duration::from_secs(30));

    // The S3 repository stops answering: the primary can archive nothing more there.
    let s3 = pid_of(&lab, "s3-ap-south-1");
    signal(s3, libc::SIGSTOP);
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int)");
    for i in 0..3 {
        lab.psql(
            "ap-south-1a",
            &format!("INSERT INTO orders SELECT generate_series({}, {})", i * 100 + 1, i * 100 + 100),
        );
        lab.psql_superuser("ap-south-1a", "SELECT pg_switch_wal()");
    }
    lab.wait_rows("ap-northeast-1a", "orders", 300, Duration::from_secs(20));
    let unarchived = lab.psql_superuser("ap-south-1a", "SELECT last_archived_wal FROM pg_stat_archiver");
    let standby_held = lab.psql_superuser(
        "ap-northeast-1a",
        "SELECT count(*) FROM pg_ls_dir('pg_wal/archive_status') f WHERE f LIKE '%.ready'",
    );
    assert!(
        standby_held.parse::<u32>().unwrap() >= 3,
        "the standby keeps what repo1 lacks: {standby_held} .ready files"
    );

    // The primary's machine is lost with what it had not archived; S3 comes back.
    let out = lab.run_lab(&["kill", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    signal(s3, libc::SIGCONT);
    wait_primary(&lab, "ap-northeast-1a", Duration::from_secs(30));
    let (tli, to) = switch_wal(&lab, "ap-northeast-1a");
    assert_eq!(tli, 2);
    wait_chain_complete(&lab, "ap-northeast-1a", tli, to, Duration::from_secs(60));
    eprintln!("the dead primary had archived up to {unarchived}; the promoted standby pushed the rest");

    // The old primary rejoins; a switchover back makes timeline 3.
    let out = lab.run_lab(&["start", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lab.meridian(&["switchover", "--to", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_primary(&lab, "ap-south-1a", Duration::from_secs(30));
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(301, 400)");
    let (tli, to) = switch_wal(&lab, "ap-south-1a");
    assert_eq!(tli, 3);
    wait_chain_complete(&lab, "ap-south-1a", tli, to, Duration::from_secs(60));
    lab.finish();
}

/// A repository that already holds a WAL file with other content (as after
/// two servers wrote the same timeline) refuses the push; the primary keeps
/// its file, and status, the report and an ERROR line name a possible split brain.
#[test]
fn a_wal_file_archived_with_other_content_is_refused_and_raised_as_a_possible_split_brain() {
    let mut lab = TestLab::up(111, &[]);
    lab.expect_error("possible split brain");
    let primary = "ap-south-1a";
    let (tli, to) = switch_wal(&lab, primary);
    wait_chain_complete(&lab, primary, tli, to, Duration::from_secs(30));

    // Another server's version of the next segment reaches the repository first.
    let current = lab.psql_superuser(primary, "SELECT pg_walfile_name(pg_current_wal_lsn())");
    let (tli, segno) = chain::parse_segment(&current).unwrap();
    let next = chain::segment_name(tli, segno + 1);
    let previous = chain::segment_name(tli, segno - 1);
    let data = lab.path().join("nodes").join(primary).join("data");
    let forged_dir = lab.path().join("forged");
    std::fs::create_dir_all(&forged_dir).unwrap();
    let forged = forged_dir.join(&next);
    std::fs::copy(data.join("pg_wal").join(&previous), &forged).unwrap();
    let run = lab.path().join("nodes").join(primary).join("run");
    let out = Command::new("pgbackrest")
        .arg(format!("--config={}", run.join("pgbackrest.conf").display()))
        .arg(format!("--config-include-path={}", run.join("pgbackrest/conf.d").display()))
        .args(["--stanza=lab", "--no-archive-async", "--log-level-file=off", "--log-level-console=error"])
        .arg("archive-push")
        .arg(&forged)
        .output()
        .unwrap();
    assert!(out.status.success(), "push the forged segment: {}", text(&out));

    // The primary's own segment of that name now completes and is pushed.
    lab.psql(primary, "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)");
    lab.psql_superuser(primary, "SELECT pg_switch_wal()");
    lab.psql(primary, "INSERT INTO t SELECT generate_series(1, 1000)");
    lab.psql_superuser(primary, "SELECT pg_switch_wal()");
    let s = wait_until("the refused push to show in status", Duration::from_secs(60), || {
        let s = lab.try_status()?;
        match common::node(&s, primary)["archive"]["conflict"].as_str() {
            Some(c) if c.contains(&next) => Ok(s),
            _ => Err(s.to_string()),
        }
    });
    assert!(common::node(&s, primary)["archive"]["conflict"].as_str().unwrap().contains("checksum"), "{s}");
    let out = lab.meridian(&["status"]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains(&format!("possible split brain: node {primary} could not archive {next}")), "{shown}");
    // Nothing is lost or overwritten: the server keeps its file until an operator decides.
    let ready = lab.psql_superuser(
        primary,
        &format!("SELECT count(*) FROM pg_ls_dir('pg_wal/archive_status') f WHERE f = '{next}.ready'"),
    );
    assert_eq!(ready, "1", "the refused segment stays ready in pg_wal");
    lab.finish();
}
