//! `meridian lab`: a whole multi-region cluster on this machine, for demos and
//! tests. Each region gets a loopback /24 (see `topology`), three or more etcd
//! members, one agent per node and one gateway per region, all started as
//! detached processes through `process`.
//!
//! The lab directory holds everything, so `lab down` works even after the
//! command that started it, or the machine's processes, crashed:
//!
//! ```text
//! D/.meridian-lab        marker: this directory is a lab (down only deletes such a directory)
//! D/meridian.toml        the cluster file (export MERIDIAN_CONFIG=D/meridian.toml)
//! D/secrets.toml         passwords of meridian's roles (0600)
//! D/bootstrap.sql        creates the `app` role and database on the new primary (0600)
//! D/pgpass               the `app` password for psql (PGPASSFILE=D/pgpass, 0600)
//! D/etcd/<region>/       etcd data
//! D/nodes/<node>/data    PGDATA;  D/nodes/<node>/run: socket, hba, server log
//! D/logs/<process>.log   etcd-<region>, agent-<node>, gateway-<region>
//! D/pids/<process>.pid
//! ```

mod clock;
mod freeze;
pub mod partition;
pub mod topology;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::distr::{Alphanumeric, SampleString};

use crate::cluster::Role;
use crate::config::Config;
use crate::coord::Coord;
use crate::process::{self, ProcSpec};
use crate::progress::Progress;
use topology::{lab_config, LabShape};

const MARKER: &str = ".meridian-lab";

/// One of the lab's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Etcd { region: String },
    Agent { node: String, region: String },
    Gateway { region: String },
}

impl Member {
    pub fn region(&self) -> &str {
        match self {
            Member::Etcd { region } | Member::Agent { region, .. } | Member::Gateway { region } => region,
        }
    }
}

/// A lab directory and its cluster file.
pub struct Lab {
    pub dir: PathBuf,
    pub config: Config,
}

impl Lab {
    pub fn open(dir: &Path) -> Result<Lab> {
        let dir = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
        if !dir.join(MARKER).exists() {
            bail!("no lab in {} (run `meridian lab up --dir {}` first)", dir.display(), dir.display());
        }
        let config = Config::load(&dir.join("meridian.toml"))?;
        Ok(Lab { dir, config })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("meridian.toml")
    }

    /// The lab's `--net`: the second octet of its addresses.
    pub fn net(&self) -> u8 {
        self.config
            .regions
            .first()
            .map(|r| r.gateway.api.ip())
            .and_then(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(v4.octets()[1]),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn region_names(&self) -> Vec<String> {
        self.config.regions.iter().map(|r| r.name.clone()).collect()
    }

    /// Every process of the lab, in start order: etcd, agents, gateways.
    pub fn processes(&self) -> Vec<(Member, ProcSpec)> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("meridian"));
        let config = self.config_path().display().to_string();
        let groups = partition::Groups::detect(self.net());
        let spec = |name: String, program: PathBuf, args: Vec<OsString>, identity: String| ProcSpec {
            log: self.dir.join("logs").join(format!("{name}.log")),
            pid_file: self.dir.join("pids").join(format!("{name}.pid")),
            name,
            program,
            args,
            identity,
            cgroup: None,
            env: Vec::new(),
        };

        let mut out = Vec::new();
        let etcd_regions: Vec<(&str, &str)> =
            self.config.regions.iter().filter_map(|r| r.etcd.as_deref().map(|u| (r.name.as_str(), u))).collect();
        let initial_cluster: Vec<String> =
            etcd_regions.iter().map(|(name, url)| format!("{name}={}", peer_url(url))).collect();
        for (name, url) in &etcd_regions {
            let data = self.dir.join("etcd").join(name);
            let args: Vec<OsString> = [
                "--name",
                name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                &peer_url(url),
                "--initial-advertise-peer-urls",
                &peer_url(url),
                "--initial-cluster",
                &initial_cluster.join(","),
                "--initial-cluster-token",
                &format!("meridian-{}", self.dir.display()),
                "--initial-cluster-state",
                "new",
                // A member that rejoins after a partition must not depose a healthy leader.
                "--pre-vote",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ]
            .iter()
            .map(OsString::from)
            .collect();
            let identity = format!("--data-dir {}", data.display());
            out.push((
                Member::Etcd { region: name.to_string() },
                spec(format!("etcd-{name}"), PathBuf::from("etcd"), args, identity),
            ));
        }
        for (region, node) in self.config.nodes() {
            let args = ["agent", "--config", &config, "--node", &node.name].map(OsString::from).to_vec();
            let identity = format!("--config {config} --node {}", node.name);
            let member = Member::Agent { node: node.name.clone(), region: region.name.clone() };
            let mut agent = spec(format!("agent-{}", node.name), exe.clone(), args, identity);
            agent.env = clock::faketime_env(&self.dir, &node.name);
            out.push((member, agent));
        }
        for region in &self.config.regions {
            let args = ["gateway", "--config", &config, "--region", &region.name].map(OsString::from).to_vec();
            let identity = format!("--config {config} --region {}", region.name);
            out.push((
                Member::Gateway { region: region.name.clone() },
                spec(format!("gateway-{}", region.name), exe.clone(), args, identity),
            ));
        }
        // Each region's processes in the region's group, so partitions can tell them apart.
        for (member, spec) in &mut out {
            spec.cgroup = groups.as_ref().map(|g| g.region_dir(member.region()));
        }
        out
    }

    /// The processes that are running now, with their pids.
    pub fn running(&self) -> Vec<(Member, ProcSpec, u32)> {
        self.processes()
            .into_iter()
            .filter_map(|(m, s)| process::running_pid(&s.pid_file, &s.identity).map(|pid| (m, s, pid)))
            .collect()
    }

    /// The processes of a node or of a whole region.
    fn select(&self, target: &str) -> Result<Vec<(Member, ProcSpec)>> {
        let all = self.processes();
        let chosen: Vec<_> = all
            .into_iter()
            .filter(|(m, _)| match (m, target.split_once(':')) {
                (Member::Etcd { region }, Some(("etcd", r))) => region == r,
                (Member::Gateway { region }, Some(("gateway", r))) => region == r,
                (_, Some(_)) => false,
                (Member::Agent { node, region }, None) => node == target || region == target,
                (other, None) => other.region() == target,
            })
            .collect();
        if chosen.is_empty() {
            let regions: Vec<&str> = self.config.regions.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "{target:?} is neither a node ({}) nor a region ({}), nor etcd:REGION or gateway:REGION",
                self.config.node_names().join(", "),
                regions.join(", ")
            );
        }
        Ok(chosen)
    }

    fn data_dir(&self, node: &str) -> Option<PathBuf> {
        self.config.node(node).ok().map(|(_, n)| self.config.resolve(&n.data_dir))
    }
}

fn peer_url(client_url: &str) -> String {
    client_url.replace(&format!(":{}", topology::ETCD_CLIENT_PORT), &format!(":{}", topology::ETCD_PEER_PORT))
}

/// `lab up`: writes the cluster file and starts everything, returning once the
/// primary runs and every replica streams.
pub async fn up(dir: &Path, shape: &LabShape) -> Result<()> {
    shape.check()?;
    let started = Instant::now();
    let dir = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
    let mut progress = Progress::new();
    if dir.join(MARKER).exists() {
        let lab = Lab::open(&dir)?;
        let running = lab.running();
        let total = lab.processes().len();
        if running.len() == total {
            println!("the lab in {} is already running ({total} processes); nothing changed", dir.display());
            return Ok(());
        }
        if !running.is_empty() {
            let names: BTreeSet<String> = running.iter().map(|(_, s, _)| s.name.clone()).collect();
            let missing: Vec<String> =
                lab.processes().into_iter().map(|(_, s)| s.name).filter(|n| !names.contains(n)).collect();
            bail!(
                "the lab in {} is partly running ({} of {total} processes; not running: {}); use `meridian lab start NODE|REGION` or `meridian lab down` first",
                dir.display(),
                running.len(),
                missing.join(", ")
            );
        }
        progress.step(format!("removing a stopped lab's leftovers in {}", dir.display()));
        remove_lab_dir(&dir)?;
    } else if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} exists and is not a lab directory; choose another --dir", dir.display());
    }

    progress.step(format!("writing the cluster file {}", dir.join("meridian.toml").display()));
    let config = lab_config(shape, &dir);
    check_addresses_free(&config, shape.net)?;
    write_lab_files(&dir, &config)?;
    let lab = Lab::open(&dir)?;

    let result = start_everything(&lab, &mut progress).await;
    if let Err(e) = result {
        progress.fail();
        eprintln!("stopping what was started; logs are kept in {}", dir.join("logs").display());
        stop_processes(&lab).await;
        return Err(e);
    }
    progress.done();
    print_summary(&lab, started.elapsed());
    Ok(())
}

async fn start_everything(lab: &Lab, progress: &mut Progress) -> Result<()> {
    let procs = lab.processes();
    let etcd: Vec<_> = procs.iter().filter(|(m, _)| matches!(m, Member::Etcd { .. })).collect();
    progress.step(format!("starting etcd ({} members) and waiting for a quorum", etcd.len()));
    for (_, spec) in &etcd {
        process::start(spec)?;
    }
    let coord = wait_for_etcd(&lab.config, Duration::from_secs(30)).await?;

    let agents: Vec<_> = procs.iter().filter(|(m, _)| matches!(m, Member::Agent { .. })).collect();
    progress.step(format!("starting {} agents; the primary initializes the cluster", agents.len()));
    for (_, spec) in &agents {
        process::start(spec)?;
    }
    let agent_specs: Vec<&ProcSpec> = agents.iter().map(|(_, s)| s).collect();
    wait_for(&coord, Duration::from_secs(60), "a primary", &agent_specs, |s| {
        let leader = s.leader.as_ref()?;
        s.members.iter().any(|m| m.node == leader.leader.node && m.role == Role::Primary && m.healthy).then_some(())
    })
    .await?;

    progress.step("copying base backups; waiting for every replica to stream");
    let nodes = lab.config.node_names();
    wait_for(&coord, Duration::from_secs(90), "every node to be healthy", &agent_specs, |s| {
        nodes.iter().all(|n| s.members.iter().any(|m| &m.node == n && m.healthy)).then_some(())
    })
    .await?;

    let gateways: Vec<_> = procs.iter().filter(|(m, _)| matches!(m, Member::Gateway { .. })).collect();
    progress.step(format!("starting {} gateways", gateways.len()));
    for (_, spec) in &gateways {
        process::start(spec)?;
    }
    for region in &lab.config.regions {
        wait_for_http(region.gateway.api, "/healthz", Duration::from_secs(30))
            .await
            .with_context(|| format!("gateway {}", region.name))?;
    }
    Ok(())
}

/// Connects to etcd and waits until it answers with a quorum.
pub async fn wait_for_etcd(config: &Config, timeout: Duration) -> Result<Coord> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match Coord::connect(config).await {
            Ok(c) => match c.ping().await {
                Ok(()) => return Ok(c),
                Err(e) => last = format!("{e:#}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("etcd did not reach a quorum within {timeout:?}: {last}")
}

/// Fails, quoting its log, if one of `started` is no longer running: waiting
/// on would only end in a timeout that hides the cause.
fn check_alive(started: &[&ProcSpec]) -> Result<()> {
    for spec in started {
        if process::running_pid(&spec.pid_file, &spec.identity).is_none() {
            let log = std::fs::read_to_string(&spec.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
            bail!("{} exited; the end of {}:\n    {tail}", spec.name, spec.log.display());
        }
    }
    Ok(())
}

/// Polls the cluster state until `ready` returns Some, or fails naming what it
/// awaited; fails at once if one of `started` dies meanwhile.
pub async fn wait_for<T>(
    coord: &Coord,
    timeout: Duration,
    what: &str,
    started: &[&ProcSpec],
    ready: impl Fn(&crate::coord::Snapshot) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        check_alive(started)?;
        if let Ok(s) = coord.snapshot().await {
            if let Some(v) = ready(&s) {
                return Ok(v);
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = last
        .map(|s| {
            let members: Vec<String> = s
                .members
                .iter()
                .map(|m| {
                    format!("{} {} healthy={} {}", m.node, m.role, m.healthy, m.detail.clone().unwrap_or_default())
                })
                .collect();
            format!("leader {:?}, epoch {}, members [{}]", s.leader.map(|l| l.leader.node), s.epoch, members.join("; "))
        })
        .unwrap_or_else(|| "etcd did not answer".into());
    bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
}

async fn wait_for_http(addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match crate::client::request(addr, hyper::Method::GET, path, None, Duration::from_secs(2)).await {
            Ok((status, _)) if status.is_success() => return Ok(()),
            Ok((status, body)) => last = format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("http://{addr}{path} did not answer 200 within {timeout:?}: {last}")
}

/// Another lab on the same --net would otherwise fail later with an obscure etcd error.
fn check_addresses_free(config: &Config, net: u8) -> Result<()> {
    let mut addrs: Vec<SocketAddr> =
        config.etcd.endpoints.iter().filter_map(|e| crate::config::parse_http_url(e).ok()).collect();
    for r in &config.regions {
        addrs.push(r.gateway.api);
        for n in &r.nodes {
            addrs.push(n.address);
        }
    }
    for addr in addrs {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!("{addr} is not free ({e}); another lab may use --net {net}: pick another --net or stop it");
        }
    }
    Ok(())
}

fn write_lab_files(dir: &Path, config: &Config) -> Result<()> {
    for sub in ["etcd", "nodes", "logs", "pids", "dr"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("create {}", dir.join(sub).display()))?;
    }
    // PostgreSQL runs as its own user and must traverse to its node directory.
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.to_path_buf(), dir.join("nodes")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut rng = rand::rng();
    let mut password = || Alphanumeric.sample_string(&mut rng, 32);
    let (repl, monitor, app) = (password(), password(), password());
    write_private(
        &dir.join("secrets.toml"),
        &format!("replication_password = \"{repl}\"\nmonitor_password = \"{monitor}\"\n"),
    )?;
    let verifier = postgres_protocol::password::scram_sha_256(app.as_bytes());
    write_private(
        &dir.join("bootstrap.sql"),
        &format!("CREATE ROLE app WITH LOGIN PASSWORD '{verifier}';\nCREATE DATABASE app OWNER app;\n"),
    )?;
    write_private(&dir.join("pgpass"), &crate::postgres::files::pgpass_line("app", &app))?;
    let text = format!(
        "# The lab's cluster file, written by `meridian lab up`. See docs/config.md.\n{}",
        toml::to_string(config).context("render the cluster file")?
    );
    std::fs::write(dir.join("meridian.toml"), text)?;
    std::fs::write(dir.join(MARKER), "a meridian lab directory; `meridian lab down` removes it\n")?;
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn print_summary(lab: &Lab, took: Duration) {
    let c = &lab.config;
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "meridian".into());
    println!(
        "lab {:?} is up in {:.1}s ({} regions, {} nodes) in {}",
        c.cluster,
        took.as_secs_f64(),
        c.regions.len(),
        c.nodes().count(),
        lab.dir.display()
    );
    for r in &c.regions {
        println!(
            "  region {:<16} gateway http://{}  dns {}  writer {}  reader {}",
            r.name, r.gateway.api, r.gateway.dns, r.gateway.writer, r.gateway.reader
        );
        for n in &r.nodes {
            println!("    node {:<18} postgres {}", n.name, n.address);
        }
    }
    let first = c.nodes().next().map(|(_, n)| n.address).expect("the lab has nodes");
    println!("next:");
    println!("  export MERIDIAN_CONFIG={}", lab.config_path().display());
    println!("  {exe} status");
    println!("  {exe} verify");
    println!("  PGPASSFILE={} psql -h {} -p {} -U app app", lab.dir.join("pgpass").display(), first.ip(), first.port());
    let gw = c.regions[0].gateway;
    println!(
        "  PGPASSFILE={} psql -h {} -p {} -U app app    (through the proxy: always the primary)",
        lab.dir.join("pgpass").display(),
        gw.writer.ip(),
        gw.writer.port()
    );
    println!("  dig @{} -p {} +short writer.{}", gw.dns.ip(), gw.dns.port(), c.dns.zone);
    println!("  {exe} health");
    if let Some(t) = c.health.checks.iter().find(|k| k.name == "dr-trigger").and_then(|k| k.target.as_deref()) {
        let action =
            if c.failover.dr_trigger.is_some() { "moves app.<zone> and the primary" } else { "moves app.<zone>" };
        match t.strip_prefix("file://") {
            Some(path) => println!("  touch {path}    (the DR trigger: {action} to the second region)"),
            None => println!("  upload {t}    (the DR trigger: {action} to the second region)"),
        }
    }
    println!("  {exe} lab kill NODE|REGION --dir {0}    {exe} lab start NODE|REGION --dir {0}", lab.dir.display());
    println!("  {exe} lab down --dir {}", lab.dir.display());
}

/// Stops every process of the lab by pid (gateways and agents first, whose agents
/// stop their PostgreSQL; then any orphaned postmaster; etcd last).
async fn stop_processes(lab: &Lab) {
    // A frozen server (`lab freeze postgres:NODE`) would hold its agent's stop
    // for every grace period in turn: continue it first.
    for (_, n) in lab.config.nodes() {
        if let Some(pm) = lab.data_dir(&n.name).and_then(|d| process::postmaster_pid(&d)) {
            for pid in std::iter::once(pm).chain(process::children_of(pm)) {
                process::signal(pid, libc::SIGCONT);
            }
        }
    }
    let running = lab.running();
    let front: Vec<u32> =
        running.iter().filter(|(m, _, _)| !matches!(m, Member::Etcd { .. })).map(|(_, _, p)| *p).collect();
    process::stop_all(&front, Duration::from_secs(30)).await;
    let postmasters: Vec<u32> = lab
        .config
        .nodes()
        .filter_map(|(_, n)| lab.data_dir(&n.name))
        .filter_map(|d| process::postmaster_pid(&d))
        .collect();
    for pid in &postmasters {
        process::signal(*pid, libc::SIGQUIT);
    }
    process::stop_all(&postmasters, Duration::from_secs(10)).await;
    // Stopped together, etcd members each wait seconds for their peers (leader
    // transfer). The lab's etcd data is thrown away, or restarted from disk
    // (which etcd is built to survive), so a short grace before SIGKILL will do.
    let etcd: Vec<u32> =
        running.iter().filter(|(m, _, _)| matches!(m, Member::Etcd { .. })).map(|(_, _, p)| *p).collect();
    for pid in &etcd {
        process::signal(*pid, libc::SIGTERM);
    }
    for pid in process::wait_gone(&etcd, Duration::from_secs(1)).await {
        process::signal(pid, libc::SIGKILL);
    }
    let stuck = process::wait_gone(&etcd, Duration::from_secs(5)).await;
    if !stuck.is_empty() {
        tracing::error!("etcd pids {stuck:?} are still alive after SIGKILL");
    }
    if let Some(groups) = partition::Groups::detect(lab.net()) {
        if let Err(e) = groups.heal() {
            tracing::error!("failed to remove the lab's partition rules: {e:#}");
        }
        groups.remove(&lab.region_names());
    }
}

/// `lab down`: stops everything and removes the lab directory. Safe to repeat.
pub async fn down(dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir)?;
    if !dir.join(MARKER).exists() {
        println!("no lab in {}; nothing to do", dir.display());
        return Ok(());
    }
    let lab = Lab::open(&dir)?;
    let n = lab.running().len();
    stop_processes(&lab).await;
    let left = lab.running();
    if !left.is_empty() {
        let names: Vec<String> = left.iter().map(|(_, s, p)| format!("{} (pid {p})", s.name)).collect();
        bail!("could not stop {}; the lab directory is kept", names.join(", "));
    }
    let listening = still_listening(&lab.config).await;
    remove_lab_dir(&dir)?;
    println!("stopped {n} processes and removed {}", dir.display());
    if !listening.is_empty() {
        bail!("something still listens on {} after the lab stopped", listening.join(", "));
    }
    Ok(())
}

async fn still_listening(config: &Config) -> Vec<String> {
    let mut addrs: Vec<SocketAddr> =
        config.etcd.endpoints.iter().filter_map(|e| crate::config::parse_http_url(e).ok()).collect();
    for r in &config.regions {
        addrs.extend([r.gateway.api, r.gateway.dns, r.gateway.writer, r.gateway.reader]);
        for n in &r.nodes {
            addrs.extend([n.address, n.api]);
        }
    }
    let mut out = Vec::new();
    for addr in addrs {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            out.push(addr.to_string());
        }
    }
    out
}

fn remove_lab_dir(dir: &Path) -> Result<()> {
    anyhow::ensure!(dir.join(MARKER).exists(), "{} is not a lab directory; refusing to delete it", dir.display());
    std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
}

pub use clock::skew;
pub use freeze::{freeze, thaw};

/// `lab kill NODE|REGION`: SIGKILL the processes of a node (its agent and
/// PostgreSQL) or of a whole region (agents, gateway, etcd member).
pub async fn kill(dir: &Path, target: &str) -> Result<()> {
    let lab = Lab::open(dir)?;
    let chosen = lab.select(target)?;
    let mut killed = Vec::new();
    let mut pids = Vec::new();
    for (member, spec) in &chosen {
        if let Some(pid) = process::running_pid(&spec.pid_file, &spec.identity) {
            // The postmaster first: it would die of the parent-death signal anyway,
            // but a SIGKILL to both makes the fault instantaneous.
            if let Member::Agent { node, .. } = member {
                if let Some(pm) = lab.data_dir(node).and_then(|d| process::postmaster_pid(&d)) {
                    process::signal(pm, libc::SIGKILL);
                    pids.push(pm);
                    killed.push(format!("postgres {node} (pid {pm})"));
                }
            }
            process::signal(pid, libc::SIGKILL);
            pids.push(pid);
            killed.push(format!("{} (pid {pid})", spec.name));
        }
    }
    let stuck = process::wait_gone(&pids, Duration::from_secs(10)).await;
    anyhow::ensure!(stuck.is_empty(), "pids {stuck:?} survived SIGKILL");
    if killed.is_empty() {
        println!("nothing of {target} was running");
    } else {
        println!("killed {}", killed.join(", "));
    }
    Ok(())
}

/// `lab start NODE|REGION`: starts what of a node or region is not running,
/// and waits until it is back (etcd answering, node healthy, gateway serving).
pub async fn start(dir: &Path, target: &str) -> Result<()> {
    let lab = Lab::open(dir)?;
    let chosen = lab.select(target)?;
    let mut progress = Progress::new();
    let mut started = Vec::new();
    let mut started_specs: Vec<&ProcSpec> = Vec::new();
    for (member, spec) in &chosen {
        if process::running_pid(&spec.pid_file, &spec.identity).is_none() {
            progress.step(format!("starting {}", spec.name));
            process::start(spec)?;
            started.push(member.clone());
            started_specs.push(spec);
        }
    }
    if started.is_empty() {
        progress.done();
        println!("everything of {target} is already running");
        return Ok(());
    }
    progress.step(format!("waiting for {target} to be back"));
    let result = async {
        let coord = wait_for_etcd(&lab.config, Duration::from_secs(30)).await?;
        // Reports from before the restart (still in etcd until their lease
        // expires) do not count: only ones written after this revision do.
        // Revisions, not clocks: a node may run with a skewed clock.
        let since = coord.snapshot().await?.revision;
        for member in &started {
            match member {
                Member::Etcd { .. } => {}
                Member::Agent { node, .. } => {
                    wait_for(&coord, Duration::from_secs(90), &format!("{node} to be healthy"), &started_specs, |s| {
                        s.members.iter().any(|m| &m.node == node && m.healthy && m.revision > since).then_some(())
                    })
                    .await?;
                }
                Member::Gateway { region } => {
                    wait_for_http(lab.config.region(region)?.gateway.api, "/healthz", Duration::from_secs(30)).await?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            progress.done();
            println!("started {}", chosen.iter().map(|(_, s)| s.name.as_str()).collect::<Vec<_>>().join(", "));
            Ok(())
        }
        Err(e) => {
            progress.fail();
            Err(e)
        }
    }
}

/// `lab partition REGION`: cut a region off from every other region.
pub async fn partition(dir: &Path, region: &str) -> Result<()> {
    let lab = Lab::open(dir)?;
    let regions = lab.region_names();
    let Some(ri) = regions.iter().position(|r| r == region) else {
        bail!("no region named {region:?} in the lab (regions: {})", regions.join(", "));
    };
    let Some(groups) = partition::Groups::detect(lab.net()) else {
        bail!("lab partition needs root and cgroup v2 (it places each region in its own cgroup and drops its traffic with nftables); nothing was changed");
    };
    let outside: Vec<String> = lab
        .running()
        .into_iter()
        .filter(|(m, _, pid)| m.region() == region && !in_group(*pid, &groups.region_dir(region)))
        .map(|(_, s, _)| s.name)
        .collect();
    if !outside.is_empty() {
        bail!(
            "{} started outside the region's cgroup (the lab was started without root?); restart the lab as root",
            outside.join(", ")
        );
    }
    groups.partition(&regions, ri)?;
    println!(
        "partitioned {region}: its processes cannot reach other regions, nor they it (`meridian lab heal` to undo)"
    );
    Ok(())
}

/// `lab heal`: remove every partition.
pub async fn heal(dir: &Path) -> Result<()> {
    let lab = Lab::open(dir)?;
    match partition::Groups::detect(lab.net()) {
        Some(groups) if groups.has_rules() => {
            groups.heal()?;
            println!("healed: every region reaches every other again");
        }
        _ => println!("no partition to heal"),
    }
    Ok(())
}

/// Whether `pid` runs in the cgroup `dir`.
fn in_group(pid: u32, dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
}
