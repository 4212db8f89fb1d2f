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
/// pushes them once promoted; then a rejoin and a switchover add a third
/// timeline, a DR failover a fourth; `backup verify` checks the whole chain.
#[test]
fn archiving_leaves_no_gap_across_a_failover_a_switchover_and_a_dr_failover() {
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

    // A DR failover to the other region makes timeline 4.
    let out = lab.meridian(&["failover", "--to-region", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_primary(&lab, "ap-northeast-1a", Duration::from_secs(30));
    lab.psql("ap-northeast-1a", "INSERT INTO orders SELECT generate_series(401, 500)");
    let (tli, to) = switch_wal(&lab, "ap-northeast-1a");
    assert_eq!(tli, 4);
    wait_chain_complete(&lab, "ap-northeast-1a", tli, to, Duration::from_secs(60));

    // backup verify sees the same complete chain, across every switch...
    let out = lab.meridian(&["backup", "verify", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let verified: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in verified.as_array().unwrap() {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["chain"]["timeline"], 4, "{r}");
        assert_eq!(r["chain"]["missing"].as_array().unwrap().len(), 0, "{r}");
    }
    // ...and names a segment taken out of the middle of it.
    let dir = lab.path().join("backup/ap-northeast-1/archive/lab/15-1/0000000200000000");
    let file = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let segment = chain::archived_name(file.file_name().unwrap().to_str().unwrap()).to_string();
    let aside = lab.path().join("segment-aside");
    std::fs::rename(&file, &aside).unwrap();
    let out = lab.meridian(&["backup", "verify", "--repository", "ap-northeast-1", "--json"]);
    std::fs::rename(&aside, &file).unwrap();
    assert!(!out.status.success(), "verify passed without {segment}: {}", text(&out));
    let verified: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified[0]["chain"]["missing"], serde_json::json!([segment]), "{verified}");
    assert!(verified[0]["report"].as_str().unwrap().contains("WAL chain BROKEN"), "{verified}");
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
    // Each status is one read; the agent re-reports the conflict on every archiver attempt.
    wait_until("status to say possible split brain", Duration::from_secs(15), || {
        let out = lab.meridian(&["status"]);
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        if shown.contains(&format!("possible split brain: node {primary} could not archive {next}")) {
            Ok(())
        } else {
            Err(shown)
        }
    });
    // Nothing is lost or overwritten: the server keeps its file until an operator decides.
    let ready = lab.psql_superuser(
        primary,
        &format!("SELECT count(*) FROM pg_ls_dir('pg_wal/archive_status') f WHERE f = '{next}.ready'"),
    );
    assert_eq!(ready, "1", "the refused segment stays ready in pg_wal");
    lab.finish();
}

/// Now, as `--to-time` takes it; a time strictly after every commit already acknowledged.
fn now_rfc3339() -> String {
    std::thread::sleep(Duration::from_millis(20));
    let t = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(20));
    t
}

/// A copy of the lab's cluster file in the lab directory (so relative paths
/// still resolve) whose secrets file is `secrets`, derived from the lab's.
fn cluster_file_with_secrets(lab: &TestLab, name: &str, edit: impl FnOnce(&mut toml::Table)) -> std::path::PathBuf {
    let dir = lab.path();
    let mut secrets: toml::Table = toml::from_str(&std::fs::read_to_string(dir.join("secrets.toml")).unwrap()).unwrap();
    edit(&mut secrets);
    let secrets_file = format!("{name}-secrets.toml");
    std::fs::write(dir.join(&secrets_file), toml::to_string(&secrets).unwrap()).unwrap();
    std::fs::set_permissions(dir.join(&secrets_file), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(lab.config()).unwrap();
    let text = text.replace("secrets_file = \"secrets.toml\"", &format!("secrets_file = \"{secrets_file}\""));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A second target cluster for restore, beside the lab's `restore-into.toml`.
fn another_restore_target(lab: &TestLab, n: u16) -> std::path::PathBuf {
    let text = std::fs::read_to_string(lab.path().join("restore-into.toml")).unwrap();
    let text = text
        .replace("cluster = \"lab-restored\"", &format!("cluster = \"lab-restored{n}\""))
        .replace("/restored/", &format!("/restored{n}/"))
        .replace(":5433\"", &format!(":{}\"", 5433 + n))
        .replace(":8009\"", &format!(":{}\"", 8009 + n));
    let path = lab.path().join(format!("restore-into-{n}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn restore(source: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("--config").arg(source).arg("restore").args(args).env("CI", "true").output().unwrap()
}

/// The restored cluster's first agent, stopped by pid when dropped.
struct RestoredAgent(std::process::Child);

impl RestoredAgent {
    fn start(lab: &TestLab, config: &std::path::Path, log: &str) -> RestoredAgent {
        let log = std::fs::File::create(lab.path().join("logs").join(log)).unwrap();
        // On the netns lab the node's address lives in its namespace: the restored agent runs there too.
        let mut cmd = if lab.is_netns() {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &format!("mlab{}-ap-south-1a", lab.net), BIN]);
            c
        } else {
            Command::new(BIN)
        };
        let child = cmd
            .arg("--config")
            .arg(config)
            .args(["agent", "--node", "ap-south-1a"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        RestoredAgent(child)
    }
}

impl Drop for RestoredAgent {
    fn drop(&mut self) {
        signal(self.0.id(), libc::SIGINT);
        let _ = self.0.wait();
    }
}

/// The rows of `orders` in a restored cluster, as (count, min, max).
fn restored_rows(lab: &TestLab, port: u16) -> String {
    let (host, _) = lab.node_addr("ap-south-1a");
    wait_until("the restored cluster to answer", Duration::from_secs(30), || {
        run_psql(
            &host,
            port,
            "app",
            "app",
            Some(&lab.path().join("pgpass")),
            "SELECT count(*), min(id), max(id) FROM orders",
        )
    })
}

fn data_dir_is_empty(lab: &TestLab, restored: &str) -> bool {
    let d = lab.path().join(restored).join("ap-south-1a").join("data");
    std::fs::read_dir(&d).map(|mut e| e.next().is_none()).unwrap_or(true)
}

/// PITR with every database server of the cluster stopped, from the second
/// region's repository with only its credentials (pilot-light DR): to a time
/// after a switchover (timeline 2) and to a time before it (timeline 1).
/// Every row acknowledged before the target is there, none after it. Bad
/// input first: each refused with its reason, nothing written.
#[test]
fn point_in_time_recovery_across_a_timeline_switch_from_one_surviving_repository() {
    let mut lab = TestLab::up(112, &[]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int PRIMARY KEY)");
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(1, 100)");
    let out = lab.meridian(&["backup", "create", "--repository", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = lab.json(&["backup", "list"]);
    let label = list["backups"][0]["label"].as_str().unwrap().to_string();
    // A standby on the primary's host takes it; on separate hosts (netns) the
    // primary does, since pgBackRest reads what a standby lacks from the primary's files.
    let taker = if lab.is_netns() { "ap-south-1a" } else { "ap-northeast-1a" };
    assert_eq!(list["backups"][0]["node"], taker, "who took it: {list}");
    let before_switch = now_rfc3339();
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(101, 200)");
    lab.wait_rows("ap-northeast-1a", "orders", 200, Duration::from_secs(20));
    let out = lab.meridian(&["switchover", "--to", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_primary(&lab, "ap-northeast-1a", Duration::from_secs(30));
    lab.psql("ap-northeast-1a", "INSERT INTO orders SELECT generate_series(201, 300)");
    let after_switch = now_rfc3339();
    lab.psql("ap-northeast-1a", "INSERT INTO orders SELECT generate_series(301, 400)");
    let (tli, to) = switch_wal(&lab, "ap-northeast-1a");
    assert_eq!(tli, 2);
    wait_chain_complete(&lab, "ap-northeast-1a", tli, to, Duration::from_secs(60));

    // Every database server goes.
    for node in ["ap-south-1a", "ap-northeast-1a"] {
        let out = lab.run_lab(&["kill", node]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let into = lab.path().join("restore-into.toml");
    let into_arg = into.display().to_string();
    let pilot = cluster_file_with_secrets(&lab, "pilot", |s| {
        s.remove("repository");
    });
    let wrong = cluster_file_with_secrets(&lab, "wrong", |s| {
        s["repository"]["ap-south-1"]["s3_key_secret"] = toml::Value::String("not-the-secret".into());
    });

    // Bad input: refused with its reason; the data directory stays empty, etcd untouched.
    let main = lab.config();
    let main_arg = main.display().to_string();
    let cases: Vec<(&std::path::Path, Vec<&str>, &str)> = vec![
        (
            &pilot,
            vec!["--backup", "20200101-000000F", "--repository", "ap-northeast-1"],
            "no backup \"20200101-000000F\"",
        ),
        (
            &pilot,
            vec!["--to-time", "2020-01-01T00:00:00Z", "--repository", "ap-northeast-1"],
            "before the restore window",
        ),
        (&pilot, vec!["--to-time", "2999-01-01T00:00:00Z", "--repository", "ap-northeast-1"], "in the future"),
        (&pilot, vec!["--latest", "--repository", "nowhere"], "no repository named \"nowhere\""),
        (&pilot, vec!["--latest", "--repository", "ap-south-1"], "[repository.ap-south-1]"),
        (&wrong, vec!["--latest", "--repository", "ap-south-1"], "read repository ap-south-1"),
        (&main, vec!["--latest", "--into", &main_arg], "must name a new cluster"),
    ];
    for (source, mut args, says) in cases {
        if !args.contains(&"--into") {
            args.extend(["--into", &into_arg]);
        }
        let started = std::time::Instant::now();
        let out = restore(source, &args);
        eprintln!("refused in {:?}: {args:?}", started.elapsed());
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: want {says:?} in: {}", text(&out));
        assert!(data_dir_is_empty(&lab, "restored"), "{args:?} left data behind");
    }
    // An unreachable repository.
    let out = lab.run_lab(&["kill", "s3:ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let started = std::time::Instant::now();
    let out = restore(&lab.config(), &["--latest", "--repository", "ap-south-1", "--into", &into_arg]);
    eprintln!("unreachable repository refused in {:?}", started.elapsed());
    assert!(!out.status.success() && text(&out).contains("read repository ap-south-1"), "{}", text(&out));
    assert!(data_dir_is_empty(&lab, "restored"));

    let out = lab.run_lab(&["start", "s3:ap-south-1"]);
    assert!(out.status.success(), "{}", text(&out));

    // After the switch, on timeline 2: rows 1..300, not 301..400.
    let out =
        restore(&pilot, &["--to-time", &after_switch, "--repository", "ap-northeast-1", "--into", &into_arg, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backup"], label.as_str(), "{report}");
    assert_eq!(report["timeline"], 3, "a timeline after the source's two: {report}");
    let agent = RestoredAgent::start(&lab, &into, "restored-agent.log");
    assert_eq!(restored_rows(&lab, 5433), "300|1|300");
    drop(agent);

    // Before the switch, on timeline 1: rows 1..100.
    let into2 = another_restore_target(&lab, 2);
    let out = restore(
        &pilot,
        &["--to-time", &before_switch, "--repository", "ap-northeast-1", "--into", &into2.display().to_string()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let agent = RestoredAgent::start(&lab, &into2, "restored2-agent.log");
    assert_eq!(restored_rows(&lab, 5435), "100|1|100");
    let stanza = lab.path().join("backup/ap-northeast-1/archive/lab-restored2");
    wait_until("the restored cluster's stanza", Duration::from_secs(30), || {
        stanza.exists().then_some(()).ok_or_else(|| "not yet".to_string())
    });

    // destroy: refused while the cluster runs, and without --yes off a terminal.
    let destroy = |config: &std::path::Path, args: &[&str]| {
        Command::new(BIN).arg("--config").arg(config).arg("destroy").args(args).env("CI", "true").output().unwrap()
    };
    let out = destroy(&into2, &["--yes", "--repositories"]);
    assert!(!out.status.success() && text(&out).contains("is not stopped"), "{}", text(&out));
    let out = destroy(&main, &["--yes"]);
    assert!(!out.status.success() && text(&out).contains("is not stopped"), "{}", text(&out));
    drop(agent);
    let out = destroy(&into2, &["--repositories"]);
    assert!(!out.status.success() && text(&out).contains("--yes"), "{}", text(&out));
    assert!(stanza.exists());
    // Once its agent's lease is gone, it goes, backups included; the source's stay.
    let out = wait_until("destroy to find lab-restored2 stopped", Duration::from_secs(30), || {
        let out = destroy(&into2, &["--yes", "--repositories", "--json"]);
        if out.status.success() {
            Ok(out)
        } else {
            Err(text(&out))
        }
    });
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(done["etcd_keys"].as_i64().unwrap() > 0, "{done}");
    assert!(!stanza.exists(), "the stanza is gone from the directory repository");
    assert!(!lab.path().join("restored2").join("ap-south-1a").join("data").exists());
    assert!(lab.path().join("backup/ap-northeast-1/archive/lab").exists(), "the source's archive stays");

    // A restored cluster's prefix is taken: restoring into it again is refused.
    let out = restore(&pilot, &["--latest", "--repository", "ap-northeast-1", "--into", &into_arg]);
    assert!(!out.status.success() && text(&out).contains("not empty"), "{}", text(&out));
    // After destroy, the name is free again.
    let out = restore(&pilot, &["--latest", "--repository", "ap-northeast-1", "--into", &into2.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    lab.finish();
}

/// `clone_from = "repository"`: a wiped replica is rebuilt from its region's
/// repository, replays the archived WAL and then streams; where the region's
/// repository holds no backup, the node copies from the primary instead.
/// Neither keeps the archive's restore_command once it streams.
#[test]
fn a_wiped_replica_is_rebuilt_from_its_regions_repository_or_else_from_the_primary() {
    let mut lab = TestLab::up(113, &["--nodes-per-region", "2"]);
    // `lab kill` of a standby with a connection open (a gateway's probe).
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    lab.psql("ap-south-1a", "CREATE TABLE orders AS SELECT generate_series(1, 100000) id");
    let out = lab.meridian(&["backup", "create", "--repository", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let label = lab.json(&["backup", "list"])["backups"][0]["label"].as_str().unwrap().to_string();
    // Written after the backup: the rebuilt node needs the archive (and then streaming) for it.
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(100001, 300000)");
    let (tli, to) = switch_wal(&lab, "ap-south-1a");
    wait_chain_complete(&lab, "ap-south-1a", tli, to, Duration::from_secs(30));
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(300001, 310000)");

    let config = std::fs::read_to_string(lab.config()).unwrap();
    assert!(config.contains("clone_from = \"primary\""), "the lab's default");
    std::fs::write(lab.config(), config.replace("clone_from = \"primary\"", "clone_from = \"repository\"")).unwrap();
    for node in ["ap-northeast-1b", "ap-south-1b"] {
        let out = lab.run_lab(&["kill", node]);
        assert!(out.status.success(), "{}", text(&out));
        let data = lab.path().join("nodes").join(node).join("data");
        for e in std::fs::read_dir(&data).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap()
            } else {
                std::fs::remove_file(&p).unwrap()
            }
        }
        let out = lab.run_lab(&["start", node]);
        assert!(out.status.success(), "{}", text(&out));
    }
    for node in ["ap-northeast-1b", "ap-south-1b"] {
        lab.wait_rows(node, "orders", 310_000, Duration::from_secs(60));
        let auto =
            std::fs::read_to_string(lab.path().join("nodes").join(node).join("data/postgresql.auto.conf")).unwrap();
        assert!(!auto.contains("restore_command"), "{node} streams without the archive: {auto}");
    }
    let log = |node: &str| std::fs::read_to_string(lab.path().join("logs").join(format!("agent-{node}.log"))).unwrap();
    let far = log("ap-northeast-1b");
    assert!(far.contains(&format!("built from backup {label} of repository ap-northeast-1")), "{far}");
    let pg = std::fs::read_to_string(lab.path().join("nodes/ap-northeast-1b/run/postgresql.log")).unwrap();
    assert!(pg.contains("from archive"), "ap-northeast-1b replayed archived WAL");
    let near = log("ap-south-1b");
    assert!(
        near.contains("failed to build this node from repository ap-south-1")
            && near.contains("copying a base backup from ap-south-1a instead"),
        "{near}"
    );
    lab.finish();
}

/// `restore --replace`: a `restore` SIGKILLed midway changes nothing (its
/// request goes with its lease; the cluster carries on with every row); bad
/// input is refused; then the cluster's data is replaced by the backup
/// recovered to a time T: the primary steps down, the restored data leads in
/// the next epoch with a `restore` entry in history, the standby rewinds to
/// it, the previous data is kept, and the archive's chain continues on the
/// new timeline.
#[test]
fn restore_replace_makes_the_restored_data_the_clusters_and_a_killed_restore_changes_nothing() {
    let mut lab = TestLab::up(114, &[]);
    // The standby, ahead of the restore point on its own timeline, first follows the
    // restored primary as any standby follows a new one; the primary refuses a
    // history it does not have, and the agent rewinds the standby.
    lab.expect_error("is not in this server's history");
    lab.psql("ap-south-1a", "CREATE TABLE orders (id int PRIMARY KEY)");
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(1, 100)");
    let out = lab.meridian(&["backup", "create", "--repository", "ap-northeast-1"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(101, 200)");
    let t = now_rfc3339();
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(201, 300)");
    let (tli, to) = switch_wal(&lab, "ap-south-1a");
    wait_chain_complete(&lab, "ap-south-1a", tli, to, Duration::from_secs(30));
    lab.wait_rows("ap-northeast-1a", "orders", 300, Duration::from_secs(20));
    let replace = |extra: &[&str]| {
        let mut args = vec!["--to-time", t.as_str(), "--repository", "ap-northeast-1", "--replace"];
        args.extend_from_slice(extra);
        restore(&lab.config(), &args)
    };

    // Bad input: refused with its reason; the cluster untouched.
    for (extra, says) in [(vec![], "--yes"), (vec!["--yes", "--node", "nowhere"], "nowhere")] {
        let out = replace(&extra);
        assert!(!out.status.success() && text(&out).contains(says), "{extra:?}: want {says:?}: {}", text(&out));
    }
    let out = restore(&lab.config(), &["--to-time", "2999-01-01T00:00:00Z", "--replace", "--yes"]);
    assert!(!out.status.success() && text(&out).contains("in the future"), "{}", text(&out));
    let out = restore(&lab.config(), &["--latest", "--repository", "elsewhere", "--replace", "--yes"]);
    assert!(!out.status.success() && text(&out).contains("no repository named \"elsewhere\""), "{}", text(&out));
    let s = lab.status();
    assert_eq!((s["primary"].as_str(), s["epoch"].as_u64()), (Some("ap-south-1a"), Some(1)), "{s}");

    // A restore killed midway: the request goes with its lease, the cluster with all its rows comes back.
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(lab.config())
        .args(["restore", "--to-time", &t, "--repository", "ap-northeast-1", "--replace", "--yes"])
        .env("CI", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the primary to step down for the restore", Duration::from_secs(20), || {
        let s = lab.try_status()?;
        if s["primary"].is_null() {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    wait_until("a primary again, the restore's lease gone", Duration::from_secs(60), || {
        let s = lab.try_status()?;
        if !s["primary"].is_null() && s["nodes"].as_array().unwrap().iter().all(|n| n["healthy"] == true) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let primary = lab.status()["primary"].as_str().unwrap().to_string();
    assert_eq!(lab.psql(&primary, "SELECT count(*) FROM orders"), "300", "nothing lost to the killed restore");
    let epoch_before = lab.status()["epoch"].as_u64().unwrap();

    // The real thing.
    let out = replace(&["--yes", "--json", "--node", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["node"], "ap-south-1a", "{report}");
    assert!(report["epoch"].as_u64().unwrap() > epoch_before, "{report}");
    let previous = std::path::PathBuf::from(report["previous_data"].as_str().unwrap());
    assert!(previous.join("PG_VERSION").exists(), "the previous data is kept: {report}");
    assert_eq!(lab.psql("ap-south-1a", "SELECT count(*), min(id), max(id) FROM orders"), "200|1|200");
    lab.wait_rows("ap-northeast-1a", "orders", 200, Duration::from_secs(60));
    wait_until("ap-northeast-1a to follow the restored primary", Duration::from_secs(60), || {
        let s = lab.try_status()?;
        let n = common::node(&s, "ap-northeast-1a");
        if n["healthy"] == true && n["timeline"] == common::node(&s, "ap-south-1a")["timeline"] {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let history = lab.json(&["history"]);
    let last = history.as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["kind"].as_str(), last["to"].as_str()), (Some("restore"), Some("ap-south-1a")), "{last}");
    // Writes go on, and the archive's chain continues on the restored timeline.
    lab.psql("ap-south-1a", "INSERT INTO orders SELECT generate_series(1001, 1100)");
    let (tli, to) = switch_wal(&lab, "ap-south-1a");
    assert_eq!(tli, report["timeline"].as_u64().unwrap() as u32);
    wait_chain_complete(&lab, "ap-south-1a", tli, to, Duration::from_secs(60));
    let out = lab.meridian(&["backup", "verify", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.finish();
}
