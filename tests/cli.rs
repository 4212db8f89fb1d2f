//! The CLI without a cluster: config check, config discovery, one-line errors.

mod common;

use std::process::Command;

use common::{text, BIN};

const GOOD: &str = r#"
cluster = "orders"
[etcd]
endpoints = ["https://127.0.1.1:2379", "https://127.0.2.1:2379", "https://127.0.3.1:2379"]
[[region]]
name = "a"
priority = 1
etcd = "https://127.0.1.1:2379"
gateway = { api = "127.0.1.2:8080", dns = "127.0.1.2:5353", writer = "127.0.1.2:6432", reader = "127.0.1.2:6433" }
  [[region.node]]
  name = "a1"
  address = "127.0.1.11:5432"
  api = "127.0.1.11:8008"
  data_dir = "/var/lib/meridian/a1"
[[region]]
name = "b"
priority = 2
etcd = "https://127.0.2.1:2379"
gateway = { api = "127.0.2.2:8080", dns = "127.0.2.2:5353", writer = "127.0.2.2:6432", reader = "127.0.2.2:6433" }
[[region]]
name = "c"
etcd = "https://127.0.3.1:2379"
gateway = { api = "127.0.3.2:8080", dns = "127.0.3.2:5353", writer = "127.0.3.2:6432", reader = "127.0.3.2:6433" }
"#;

#[test]
fn config_check_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, GOOD).unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok (cluster \"orders\", 3 regions, 1 nodes)"),
        "{}",
        text(&out)
    );

    let bad = dir.path().join("bad.toml");
    let broken = GOOD
        .replace("name = \"b\"", "name = \"a\"")
        .replace("address = \"127.0.1.11:5432\"", "address = \"127.0.1.2:8080\"\ncolour = \"red\"")
        .replace("etcd = \"https://127.0.3.1:2379\"\n", "");
    std::fs::write(&bad, broken).unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        "region[0].node[0].colour: unknown field",
        "region[1].name: duplicate region name \"a\" (also region[0])",
        "region[0].node[0].address: address 127.0.1.2:8080 is already used by region[0].gateway.api",
        "2 region(s) have an etcd member",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    let json = Command::new(BIN).args(["config", "check", "--json"]).arg(&bad).output().unwrap();
    assert_eq!(json.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 4, "{v}");
}

#[test]
fn commands_find_the_config_and_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    // No --config, no MERIDIAN_CONFIG, no ./meridian.toml.
    let out = Command::new(BIN).arg("status").current_dir(dir.path()).env_remove("MERIDIAN_CONFIG").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line, no backtrace: {stderr}");
    assert!(
        stderr.starts_with("error: read cluster file meridian.toml (pass --config or set MERIDIAN_CONFIG)"),
        "{stderr}"
    );

    // ./meridian.toml is found, but the cluster CA the CLI must verify gateways against is not.
    std::fs::write(dir.path().join("meridian.toml"), GOOD).unwrap();
    let out = Command::new(BIN).arg("status").current_dir(dir.path()).env_remove("MERIDIAN_CONFIG").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster CA") && stderr.contains("tls/ca/ca.crt"), "{stderr}");

    // With the CA: its gateways are not running, and the error names each one tried.
    let ca = Command::new(BIN).args(["ca", "init", "--dir", "tls/ca"]).current_dir(dir.path()).output().unwrap();
    assert!(ca.status.success(), "{}", text(&ca));
    let out = Command::new(BIN).arg("status").current_dir(dir.path()).env_remove("MERIDIAN_CONFIG").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no gateway could answer /v1/cluster")
            && stderr.contains("a (127.0.1.2:8080)")
            && stderr.contains("c (127.0.3.2:8080)"),
        "{stderr}"
    );

    // $MERIDIAN_CONFIG wins over ./meridian.toml, and --config over both.
    let other = dir.path().join("other.toml");
    let out = Command::new(BIN).arg("status").current_dir(dir.path()).env("MERIDIAN_CONFIG", &other).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("other.toml"), "{}", text(&out));
    let flag = dir.path().join("flag.toml");
    let out =
        Command::new(BIN).arg("status").arg("--config").arg(&flag).env("MERIDIAN_CONFIG", &other).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("flag.toml"), "{}", text(&out));
}

#[test]
fn lab_refuses_bad_shapes_and_unknown_targets() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["lab", "up", "--regions", "a,a", "--dir"])
        .arg(dir.path().join("lab"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--regions lists a region twice"), "{}", text(&out));
    let out = Command::new(BIN).args(["lab", "kill", "x", "--dir"]).arg(dir.path().join("none")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lab in"), "{}", text(&out));
}

/// A checkout that holds the default lab directory (`./.meridian-lab`) and a
/// cluster file is not itself a lab: `lab down` there must not take the
/// directory named like the marker for the marker, and must delete nothing.
#[test]
fn a_directory_holding_the_default_lab_dir_is_not_a_lab() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".meridian-lab")).unwrap();
    std::fs::write(dir.path().join("meridian.toml"), "cluster = \"x\"\n").unwrap();
    std::fs::write(dir.path().join("precious"), "keep me\n").unwrap();
    let out = Command::new(BIN).args(["lab", "down", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no lab in"), "{}", text(&out));
    // Found from the cluster file's directory, without --dir: the same.
    let out = Command::new(BIN)
        .args(["lab", "down"])
        .current_dir(dir.path())
        .env("MERIDIAN_CONFIG", dir.path().join("meridian.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.path().join("precious").exists() && dir.path().join("meridian.toml").exists(), "nothing deleted");
}

/// `ca init`, `ca issue`, `ca show` from the command line, against a lab's
/// cluster file (no lab running): keys 0600, names from the file, clear refusals.
#[test]
fn ca_init_issue_and_show() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meridian.toml");
    std::fs::write(&config, GOOD).unwrap();
    let ca = dir.path().join("ca");
    let run = |args: &[&str]| Command::new(BIN).args(args).env("MERIDIAN_CONFIG", &config).output().unwrap();
    let out = run(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(ca.join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let again = run(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"), "{}", text(&again));

    let node_dir = dir.path().join("node");
    let out = run(&["ca", "issue", "--ca", ca.to_str().unwrap(), "--out", node_dir.to_str().unwrap(), "--node", "a1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(node_dir.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let out = run(&["ca", "show", "--json", node_dir.join("tls.crt").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(shown[0]["subject"].as_str().unwrap().contains("node:a1"), "{shown}");
    assert_eq!(shown[0]["expiring"], false);

    let soon = dir.path().join("soon");
    let out = run(&[
        "ca",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        soon.to_str().unwrap(),
        "--node",
        "a1",
        "--valid",
        "7d",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["ca", "show", soon.join("tls.crt").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "a certificate expiring within 30 days: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("EXPIRES SOON"), "{}", text(&out));

    let out = run(&["ca", "issue", "--ca", ca.to_str().unwrap(), "--out", soon.to_str().unwrap(), "--node", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named \"nope\""), "{}", text(&out));
    let out = run(&["ca", "issue", "--ca", ca.to_str().unwrap(), "--out", soon.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exactly one of --node, --gateway, --etcd"),
        "{}",
        text(&out)
    );

    // A host's key stays on the host: request there, sign where the CA is, accept there.
    let host = dir.path().join("host-a1");
    let out = run(&["ca", "request", "--out", host.to_str().unwrap(), "--node", "a1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(host.join("request.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let signed = dir.path().join("a1.crt");
    let (csr, signed_s) = (host.join("request.csr"), signed.to_str().unwrap().to_string());
    let out = run(&["ca", "sign", "--ca", ca.to_str().unwrap(), "--csr", csr.to_str().unwrap(), "--out", &signed_s]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node:a1"), "{}", text(&out));
    let ca_cert = ca.join("ca.crt");
    let out = run(&[
        "ca",
        "accept",
        "--dir",
        host.to_str().unwrap(),
        "--cert",
        &signed_s,
        "--ca-cert",
        ca_cert.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(host.join("tls.crt").is_file() && !host.join("request.key").exists());
    assert_eq!(std::fs::metadata(host.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
    // Accepting again (the request key is gone) is refused with the reason.
    let out = run(&[
        "ca",
        "accept",
        "--dir",
        host.to_str().unwrap(),
        "--cert",
        &signed_s,
        "--ca-cert",
        ca_cert.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca request"), "{}", text(&out));
}

/// `meridian deploy systemd` writes units that `systemd-analyze verify` (Debian's
/// systemd) accepts without a word, each running what the lab runs.
#[test]
fn deploy_systemd_writes_units_that_systemd_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meridian.toml");
    std::fs::write(&config, GOOD).unwrap();
    let units = dir.path().join("units");
    for what in [["--node", "a1"], ["--gateway", "a"], ["--gateway", "c"], ["--etcd", "b"]] {
        let out = Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "deploy", "systemd"])
            .args(what)
            .args(["--binary", BIN, "--out", units.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{what:?}: {}", text(&out));
    }
    let files: Vec<_> = std::fs::read_dir(&units).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 4, "{files:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .expect("systemd-analyze (scripts/setup installs systemd)");
    assert!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify: {}", text(&out));
    let agent = std::fs::read_to_string(units.join("meridian-agent-a1.service")).unwrap();
    let exec = format!("ExecStart={BIN} agent --config {} --node a1\n", config.display());
    assert!(agent.contains(&exec), "{agent}");
    assert!(agent.contains("User=postgres\n") && agent.contains("ProtectSystem=strict\n"), "{agent}");

    // Bad input: a clear error, nothing written.
    for (what, says) in [
        (&["--node", "zz"][..], "zz"),
        (&["--etcd", "nowhere"], "nowhere"),
        (&[], "say which process"),
        (&["--node", "a1", "--gateway", "a"], "cannot be used with"),
    ] {
        let out = Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "deploy", "systemd"])
            .args(what)
            .args(["--out", dir.path().join("bad").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success() && text(&out).contains(says), "{what:?}: {}", text(&out));
        assert!(!dir.path().join("bad").exists(), "{what:?} wrote something");
    }
}
