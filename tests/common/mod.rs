//! A lab for one integration test, started and stopped through the same
//! `meridian lab` commands users run. Each test picks its own `--net`, so tests
//! run in parallel without colliding. Component logs are scanned for ERROR
//! lines the test did not announce; the lab is always brought down, by pid.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_meridian");

/// The Python that has moto and boto3: scripts/setup makes this environment
/// with Debian's python3, which refuses `pip install` into the system (PEP 668).
pub const PYTHON: &str = "/opt/meridian/venv/bin/python3";

pub struct TestLab {
    pub dir: tempfile::TempDir,
    pub net: u8,
    /// Substrings of ERROR lines this test causes on purpose.
    expected_errors: Vec<String>,
    finished: bool,
}

impl TestLab {
    /// `lab up` with the given extra arguments; panics with the logs if it fails.
    pub fn up(net: u8, extra: &[&str]) -> TestLab {
        TestLab::up_with_env(net, extra, &[])
    }

    /// `lab up` with extra arguments and environment (passed on to the lab's processes).
    pub fn up_with_env(net: u8, extra: &[&str], env: &[(&str, &str)]) -> TestLab {
        let dir = tempfile::Builder::new().prefix("meridian-test-").tempdir_in("/tmp").expect("create a temp dir");
        let lab = TestLab { dir, net, expected_errors: Vec::new(), finished: false };
        let net_arg = net.to_string();
        let mut args = vec!["up", "--net", net_arg.as_str()];
        args.extend_from_slice(extra);
        let wan = std::env::var("MERIDIAN_TEST_WAN").unwrap_or_default();
        if !extra.contains(&"--hosts") && netns_requested() {
            args.extend_from_slice(&["--hosts", "netns"]);
            // MERIDIAN_TEST_WAN=20ms puts the regions a WAN apart as well.
            if !wan.is_empty() && !extra.contains(&"--wan-latency") {
                args.extend_from_slice(&["--wan-latency", wan.as_str()]);
            }
        }
        let mut cmd = Command::new(BIN);
        cmd.arg("lab").args(&args).arg("--dir").arg(lab.path()).env("CI", "true");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run meridian lab");
        if !out.status.success() {
            panic!("lab up failed: {}\n{}", text(&out), lab.log_tails());
        }
        lab
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the lab runs each process on a host of its own (`--hosts netns`).
    pub fn is_netns(&self) -> bool {
        std::fs::read_to_string(self.path().join("network.toml")).is_ok_and(|t| t.contains("hosts = \"netns\""))
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("meridian.toml")
    }

    /// Runs `meridian lab ARGS --dir <this lab>`.
    pub fn run_lab(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("lab").args(args).arg("--dir").arg(self.path()).env("CI", "true");
        cmd.output().expect("run meridian lab")
    }

    /// Runs `meridian ARGS` against this lab's cluster file.
    pub fn meridian(&self, args: &[&str]) -> Output {
        Command::new(BIN).args(args).env("MERIDIAN_CONFIG", self.config()).output().expect("run meridian")
    }

    /// `meridian ARGS --json`, which must succeed, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.meridian(&all);
        assert!(out.status.success(), "meridian {args:?} failed: {}", text(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("meridian {args:?} printed no JSON ({e}): {}", text(&out)))
    }

    pub fn status(&self) -> Value {
        self.json(&["status"])
    }

    /// Status for polling loops: right after a fault etcd may be electing a
    /// leader and the API answers 503 for a moment, which is not a failure.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = self.meridian(&["status", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// The address `host:port` of a node's PostgreSQL.
    pub fn node_addr(&self, node: &str) -> (String, u16) {
        let config: toml::Value = toml::from_str(&std::fs::read_to_string(self.config()).unwrap()).unwrap();
        for region in config["region"].as_array().unwrap() {
            for n in region.get("node").and_then(|n| n.as_array()).into_iter().flatten() {
                if n["name"].as_str() == Some(node) {
                    let addr: std::net::SocketAddr = n["address"].as_str().unwrap().parse().unwrap();
                    return (addr.ip().to_string(), addr.port());
                }
            }
        }
        panic!("no node {node} in the lab");
    }

    /// A gateway address of `region`: `which` is api, dns, writer or reader.
    pub fn gateway_addr(&self, region: &str, which: &str) -> (String, u16) {
        let config: toml::Value = toml::from_str(&std::fs::read_to_string(self.config()).unwrap()).unwrap();
        for r in config["region"].as_array().unwrap() {
            if r["name"].as_str() == Some(region) {
                let addr: std::net::SocketAddr = r["gateway"][which].as_str().unwrap().parse().unwrap();
                return (addr.ip().to_string(), addr.port());
            }
        }
        panic!("no region {region} in the lab");
    }

    /// GET over the API's TLS, as the CLI does: (status, body).
    pub fn https_get(&self, addr: &str, path: &str) -> (u16, String) {
        let config = meridian::config::Config::load(&self.config()).unwrap();
        let https = meridian::client::Https::for_cli(&config).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (status, body) = rt
            .block_on(meridian::client::request(
                addr.parse().unwrap(),
                Some(&https),
                hyper::Method::GET,
                path,
                None,
                Duration::from_secs(5),
            ))
            .unwrap_or_else(|e| panic!("GET https://{addr}{path}: {e:#}"));
        (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
    }

    /// The lab's cluster file with `edit` applied, written to `name` in the lab; its path.
    pub fn edited_config(&self, name: &str, edit: impl Fn(&mut toml::Table)) -> String {
        let mut file: toml::Table = toml::from_str(&std::fs::read_to_string(self.config()).unwrap()).unwrap();
        edit(&mut file);
        let path = self.path().join(name);
        std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
        path.display().to_string()
    }

    /// Runs SQL as `app` through a region's proxy port (`writer` or `reader`).
    pub fn try_psql_via(&self, region: &str, port: &str, sql: &str) -> Result<String, String> {
        let (host, port) = self.gateway_addr(region, port);
        run_psql(&host, port, "app", "app", Some(&self.path().join("pgpass")), sql)
    }

    /// `dig +short NAME` against a region's gateway, with the real dig; one line per answer.
    pub fn dig(&self, region: &str, name: &str) -> Vec<String> {
        let out = self.dig_raw(region, name, &["+short"]);
        out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }

    /// `dig NAME` against a region's gateway with extra options; the whole output.
    pub fn dig_raw(&self, region: &str, name: &str, options: &[&str]) -> String {
        let (ip, port) = self.gateway_addr(region, "dns");
        let fqdn = if name.is_empty() {
            "lab.meridian.internal.".to_string()
        } else {
            format!("{name}.lab.meridian.internal.")
        };
        let out = Command::new("dig")
            .arg(format!("@{ip}"))
            .args(["-p", &port.to_string(), "+time=1", "+tries=1"])
            .args(options)
            .arg(&fqdn)
            .output()
            .expect("run dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs SQL with the real psql as the lab's `app` role; returns its output or the error.
    pub fn try_psql(&self, node: &str, sql: &str) -> Result<String, String> {
        self.try_psql_as(node, "app", "app", &self.path().join("pgpass"), sql)
    }

    /// Runs SQL as the superuser over the node's unix socket (peer authentication,
    /// the way the agent connects), for things only a superuser may do.
    pub fn psql_superuser(&self, node: &str, sql: &str) -> String {
        let (_, port) = self.node_addr(node);
        let socket_dir = self.path().join("nodes").join(node).join("run");
        run_psql(&socket_dir.display().to_string(), port, "postgres", "postgres", None, sql)
            .unwrap_or_else(|e| panic!("psql as superuser on {node}: {sql}: {e}"))
    }

    /// Runs SQL as meridian's monitoring role (pg_monitor), with its password from
    /// the lab's secrets and, as a gateway does, a gateway's certificate over verified TLS.
    pub fn psql_monitor(&self, node: &str, sql: &str) -> String {
        let secrets: toml::Value =
            toml::from_str(&std::fs::read_to_string(self.path().join("secrets.toml")).unwrap()).unwrap();
        let passfile = self.path().join("test-monitor.pgpass");
        let line = format!("*:*:*:meridian:{}\n", secrets["monitor_password"].as_str().unwrap());
        std::fs::write(&passfile, line).unwrap();
        std::fs::set_permissions(&passfile, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let (host, port) = self.node_addr(node);
        let tls = self.path().join("tls");
        let gateway = std::fs::read_dir(&tls)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("gateway-"))
            .expect("a gateway certificate in the lab");
        let env = [
            ("PGSSLMODE", "verify-full".to_string()),
            ("PGSSLROOTCERT", tls.join("ca").join("ca.crt").display().to_string()),
            ("PGSSLCERT", gateway.join("tls.crt").display().to_string()),
            ("PGSSLKEY", gateway.join("tls.key").display().to_string()),
        ];
        run_psql_with(&host, port, "meridian", "postgres", Some(&passfile), &env, sql)
            .unwrap_or_else(|e| panic!("psql on {node}: {sql}: {e}"))
    }

    fn try_psql_as(&self, node: &str, user: &str, db: &str, passfile: &Path, sql: &str) -> Result<String, String> {
        let (host, port) = self.node_addr(node);
        run_psql(&host, port, user, db, Some(passfile), sql)
    }

    pub fn psql(&self, node: &str, sql: &str) -> String {
        self.try_psql(node, sql).unwrap_or_else(|e| panic!("psql on {node}: {sql}: {e}"))
    }

    /// Waits until `table` on `node` has exactly `rows` rows, without provoking
    /// "relation does not exist" errors while the table has not replicated yet.
    pub fn wait_rows(&self, node: &str, table: &str, rows: u64, timeout: Duration) {
        wait_until(&format!("{rows} rows in {table} on {node}"), timeout, || {
            match self.try_psql(node, &format!("SELECT to_regclass('{table}') IS NOT NULL")) {
                Ok(t) if t == "t" => {}
                other => return Err(format!("table not there yet: {other:?}")),
            }
            match self.try_psql(node, &format!("SELECT count(*) FROM {table}")) {
                Ok(n) if n == rows.to_string() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
    }

    /// Announces an ERROR log line this test causes on purpose.
    pub fn expect_error(&mut self, substring: &str) {
        self.expected_errors.push(substring.to_string());
    }

    /// Component logs: agents, gateways and PostgreSQL servers (etcd's own
    /// logs are left out: a killed peer makes it log errors by design).
    pub fn component_logs(&self) -> Vec<PathBuf> {
        let mut logs = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.path().join("logs")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("agent-") || name.starts_with("gateway-") {
                    logs.push(e.path());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.path().join("nodes")) {
            for e in entries.flatten() {
                logs.push(e.path().join("run").join("postgresql.log"));
            }
        }
        logs
    }

    /// ERROR lines (meridian's `ERROR` level, PostgreSQL's `ERROR:`/`FATAL:`/`PANIC:`) not announced.
    pub fn unexpected_errors(&self) -> Vec<String> {
        let mut found = Vec::new();
        for log in self.component_logs() {
            let Ok(text) = std::fs::read_to_string(&log) else { continue };
            let name = log.strip_prefix(self.path()).unwrap_or(&log).display().to_string();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let is_error = line.contains(" ERROR ")
                    || line.contains("ERROR:")
                    || line.contains("PANIC:")
                    || is_unexpected_fatal(line);
                if is_error && !self.expected_errors.iter().any(|e| line.contains(e.as_str())) {
                    // With the lines before it: CI shows only this report, not the lab's files.
                    let context =
                        lines[i.saturating_sub(4)..i].iter().map(|l| format!("      {l}\n")).collect::<String>();
                    found.push(format!("{name}: {line}\n    after:\n{context}"));
                }
            }
        }
        found
    }

    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for log in self.component_logs() {
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                out.push_str(&format!("--- {}\n{}\n", log.display(), tail.join("\n")));
            }
        }
        out
    }

    /// With MERIDIAN_TEST_KEEP_LOGS=<dir>, copies a failed test's component
    /// logs to `<dir>/<lab directory name>/` before the lab goes down.
    fn keep_logs(&self) {
        let Some(keep) = std::env::var_os("MERIDIAN_TEST_KEEP_LOGS") else { return };
        let to = Path::new(&keep).join(self.path().file_name().unwrap_or_default());
        let mut kept = 0;
        for log in self.component_logs() {
            let Ok(rel) = log.strip_prefix(self.path()) else { continue };
            let dest = to.join(rel.to_string_lossy().replace('/', "_"));
            if std::fs::create_dir_all(&to).is_ok() && std::fs::copy(&log, &dest).is_ok() {
                kept += 1;
            }
        }
        eprintln!("kept {kept} component logs in {}", to.display());
    }

    /// Checks the logs, brings the lab down, and checks nothing of it is left.
    pub fn finish(mut self) {
        let errors = self.unexpected_errors();
        self.finished = true;
        let out = self.run_lab(&["down"]);
        assert!(out.status.success(), "lab down failed: {}", text(&out));
        assert!(!self.path().exists(), "lab down left {} behind", self.path().display());
        let left = processes_mentioning(&self.path().display().to_string());
        assert!(left.is_empty(), "processes left behind: {left:#?}");
        if let Some(group) = lab_cgroup(self.net) {
            assert!(!group.exists(), "lab down left its cgroup {} behind", group.display());
        }
        let net_left = netns_leftovers(self.net);
        assert!(net_left.is_empty(), "lab down left network namespaces or links behind: {net_left:?}");
        assert!(errors.is_empty(), "unexpected ERROR lines in component logs:\n{}", errors.join("\n"));
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if !self.finished {
            if std::thread::panicking() {
                eprintln!("{}", self.log_tails());
                self.keep_logs();
            }
            let down = self.run_lab(&["down"]);
            // Should `lab down` itself fail, stop what mentions this lab's unique
            // directory by pid, so a broken teardown never leaks a lab.
            let left = processes_mentioning(&self.path().display().to_string());
            if !down.status.success() || !left.is_empty() {
                eprintln!("lab down failed ({}); stopping leftovers by pid: {left:#?}", text(&down));
                for p in &left {
                    let pid: i32 = p.split(':').next().unwrap().parse().unwrap();
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                // And its network, by the names only this lab's --net uses.
                for name in netns_leftovers(self.net) {
                    match name.strip_prefix("interface ") {
                        Some(link) => drop(Command::new("ip").args(["link", "del", link]).status()),
                        None => drop(Command::new("ip").args(["netns", "del", &name]).status()),
                    }
                }
            }
        }
    }
}

/// Whether MERIDIAN_TEST_HOSTS=netns asks to run every scenario on isolated hosts
/// (and MERIDIAN_TEST_WAN=<one-way delay>, a WAN apart).
pub fn netns_requested() -> bool {
    std::env::var("MERIDIAN_TEST_HOSTS").as_deref() == Ok("netns")
}

/// What a netns lab on `--net net` left: its namespaces (`mlab<net>-*`) and
/// the root end of its observer link (`mlab<net>`).
pub fn netns_leftovers(net: u8) -> Vec<String> {
    let prefix = format!("mlab{net}-");
    let mut out: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)).collect())
        .unwrap_or_default();
    let link = format!("mlab{net}");
    if Path::new("/sys/class/net").join(&link).exists() {
        out.push(format!("interface {link}"));
    }
    out
}

/// Where `lab up` (as root) puts this lab's cgroups: under the cgroup2 mount.
fn lab_cgroup(net: u8) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })?;
    Some(mount.join(format!("meridian-lab-{net}")))
}

/// The real psql, one command, unaligned tuples only; stdout or stderr.
pub fn run_psql(
    host: &str,
    port: u16,
    user: &str,
    db: &str,
    passfile: Option<&Path>,
    sql: &str,
) -> Result<String, String> {
    run_psql_with(host, port, user, db, passfile, &[], sql)
}

fn run_psql_with(
    host: &str,
    port: u16,
    user: &str,
    db: &str,
    passfile: Option<&Path>,
    env: &[(&str, String)],
    sql: &str,
) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-U",
        user,
        "-d",
        db,
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "3");
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(p) = passfile {
        cmd.env("PGPASSFILE", p);
    }
    let out = cmd.output().expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// FATAL lines are normal while a server starts or a client is refused; others are not.
fn is_unexpected_fatal(line: &str) -> bool {
    const NORMAL: &[&str] = &[
        "the database system is starting up",
        "the database system is not yet accepting connections",
        "the database system is shutting down",
        // What PostgreSQL says when a shutdown's SIGTERM meets a client still authenticating.
        "canceling authentication due to timeout",
        "terminating connection due to administrator command",
        "terminating walreceiver process due to administrator command",
        "could not receive data from WAL stream",
        // The same loss seen while sending feedback; over TLS: "SSL SYSCALL error: EOF detected".
        "could not send data to WAL stream",
        "could not connect to the primary server",
        "could not send end-of-streaming message to primary",
        // A walreceiver whose upstream went away between connecting and streaming
        // (over a WAN the handshake takes round trips, and the window is wider).
        "could not start WAL streaming",
        "could not receive database system identifier and timeline ID from the primary server",
        // An immediate shutdown (SIGQUIT) also stops the archive command running
        // then, and `lab kill` (SIGKILL) the node's archive command with its server.
        "archive command was terminated by signal 3",
        "archive command was terminated by signal 9",
        // A backend whose client (a killed psql, a probe cut off, a proxy's
        // server connection closed with its pool) went away while it wrote.
        "connection to client lost",
    ];
    line.contains("FATAL:") && !NORMAL.iter().any(|n| line.contains(n))
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Pids of processes whose command line mentions `s`.
pub fn processes_mentioning(s: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if cmd.contains(s) && !zombie {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

/// Polls `check` until it returns Some or the deadline passes; the panic says what was awaited
/// and what `check` last reported.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
}

/// The node entry of the status JSON.
pub fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {status}"))
}

pub fn pid_of(lab: &TestLab, process: &str) -> u32 {
    std::fs::read_to_string(lab.path().join("pids").join(format!("{process}.pid"))).unwrap().trim().parse().unwrap()
}

pub fn postmaster_pid(lab: &TestLab, node: &str) -> u32 {
    try_postmaster_pid(lab, node).unwrap_or_else(|| panic!("no postmaster.pid for {node}"))
}

/// The pid in a node's postmaster.pid, if the file exists (it does not while the server is down).
pub fn try_postmaster_pid(lab: &TestLab, node: &str) -> Option<u32> {
    let text = std::fs::read_to_string(lab.path().join("nodes").join(node).join("data").join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}
