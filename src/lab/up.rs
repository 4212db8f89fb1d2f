//! `lab up`: the cluster file, the secrets, and every process started in
//! order, returning once the cluster is healthy.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::distr::{Alphanumeric, SampleString};

use super::down::{remove_lab_dir, stop_processes};
use super::topology::{lab_config, Hosts, LabShape};
use super::wait::{wait_for, wait_for_etcd, wait_for_http};
use super::{netns, Lab, Member, Network, MARKER};
use crate::ca::write_private;
use crate::cluster::Role;
use crate::config::{CheckKind, Config};
use crate::process::{self, ProcSpec};
use crate::progress::Progress;

/// `lab up`: writes the cluster file and starts everything, returning once the
/// primary runs and every replica streams.
pub async fn up(dir: &Path, shape: &LabShape) -> Result<()> {
    shape.check()?;
    let started = Instant::now();
    let dir = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
    let mut progress = Progress::new();
    if dir.join(MARKER).is_file() {
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

    let config = lab_config(shape, &dir);
    let network = Network { hosts: shape.hosts, wan: shape.wan };
    if shape.hosts == Hosts::Netns {
        anyhow::ensure!(
            unsafe { libc::geteuid() } == 0,
            "--hosts netns needs root (it makes network namespaces, veths, bridges and nftables rules); nothing was changed"
        );
        netns::check_free(shape.net)?;
    }
    check_addresses_free(&config, shape.net)?;
    progress.step(format!("writing the cluster file {}", dir.join("meridian.toml").display()));
    write_lab_files(&dir, &config)?;
    network.write(&dir)?;
    progress.step("making the cluster CA and a certificate per node, gateway and etcd member");
    write_certificates(&dir, &config)?;
    let lab = Lab::open(&dir)?;

    let result = async {
        if lab.network.hosts == Hosts::Netns {
            progress.step(match &lab.network.wan {
                Some(w) if lab.network.has_delay() => {
                    format!("making a namespace per process, a bridge per region and a router; WAN {w}")
                }
                _ => "making a namespace per process, a bridge per region and a router".to_string(),
            });
            let (net, config, delay) = (lab.net(), lab.config.clone(), lab.network.has_delay());
            tokio::task::spawn_blocking(move || netns::setup(net, &config, delay)).await??;
        }
        start_everything(&lab, &mut progress).await
    }
    .await;
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
    if let Some((_, relay)) = procs.iter().find(|(m, _)| matches!(m, Member::Wan)) {
        progress.step("starting the WAN relay on the router");
        process::start(relay)?;
        wait_relay_attached(lab, relay, Duration::from_secs(10)).await?;
    }
    let s3: Vec<_> = procs.iter().filter(|(m, _)| matches!(m, Member::S3 { .. })).collect();
    if !s3.is_empty() {
        progress.step(format!("starting the S3 server of {} backup repository(ies), over TLS", s3.len()));
        for (_, spec) in &s3 {
            process::start(spec)?;
        }
        for (repo, _) in lab.s3_repositories() {
            make_bucket(lab, repo, Duration::from_secs(30)).await?;
        }
    }
    let etcd: Vec<_> = procs.iter().filter(|(m, _)| matches!(m, Member::Etcd { .. })).collect();
    progress.step(format!("starting etcd ({} members) and waiting for a quorum", etcd.len()));
    for (_, spec) in &etcd {
        process::start(spec)?;
    }
    let coord = wait_for_etcd(&lab.config, Duration::from_secs(30)).await?;
    make_admin_token(lab, &coord).await?;

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
        wait_for_http(&lab.config, region.gateway.api, "/healthz", Duration::from_secs(30))
            .await
            .with_context(|| format!("gateway {}", region.name))?;
    }
    if !lab.config.health.checks.is_empty() {
        progress.step("waiting for every gateway's first health verdicts");
        wait_for_health_settled(lab, Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Until the relay holds the WAN device (before, every packet between regions is lost).
async fn wait_relay_attached(lab: &Lab, relay: &ProcSpec, timeout: Duration) -> Result<()> {
    let router = netns::router(lab.net());
    let deadline = Instant::now() + timeout;
    loop {
        let out = tokio::process::Command::new("ip")
            .args(["-n", &router, "-o", "link", "show", "dev", netns::WAN_DEVICE])
            .output()
            .await
            .context("run ip")?;
        let line = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && !line.contains("NO-CARRIER") {
            return Ok(());
        }
        if process::running_pid(&relay.pid_file, &relay.identity).is_none() {
            bail!("the WAN relay exited; see {}", relay.log.display());
        }
        if Instant::now() >= deadline {
            bail!(
                "the WAN relay did not attach to {} within {timeout:?}; see {}",
                netns::WAN_DEVICE,
                relay.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates the bucket of a lab S3 repository on its moto server (which keeps
/// objects in memory: a restarted server needs it again), waiting for the
/// server to answer over TLS with its certificate from the lab's CA.
pub(super) async fn make_bucket(lab: &Lab, repo: &crate::config::Repository, timeout: Duration) -> Result<()> {
    let crate::config::RepoLocation::S3 { bucket, port, .. } = repo.location().map_err(anyhow::Error::msg)? else {
        return Ok(());
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let https = crate::client::Https { tls: crate::tls::client_config(&lab.config.tls_ca_file(), None)?, token: None };
    let deadline = Instant::now() + timeout;
    let path = format!("/{bucket}");
    loop {
        let put = crate::client::request(addr, Some(&https), hyper::Method::PUT, &path, None, Duration::from_secs(5));
        let last = match put.await {
            Ok((status, _)) if status.is_success() || status == hyper::StatusCode::CONFLICT => return Ok(()),
            Ok((status, body)) => format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("the lab's S3 server on {addr} did not create bucket {bucket} within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An admin token for whoever ran `lab up`, straight into etcd (there is no
/// API to ask yet, and nobody to ask it), in `D/admin.token` (0600).
async fn make_admin_token(lab: &Lab, coord: &crate::coord::Coord) -> Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let new = crate::auth::new_token(crate::config::ApiRole::Admin, now, None, "lab", "made by lab up");
    coord.create_token(&new.stored).await?;
    write_private(&lab.dir.join(super::ADMIN_TOKEN), &format!("{}\n", new.secret))
}

/// Until every gateway has judged every probed check (none pending), so that
/// `meridian health` right after `lab up` shows verdicts, not first guesses.
async fn wait_for_health_settled(lab: &Lab, timeout: Duration) -> Result<()> {
    let gateways = lab.config.regions.len();
    let api = lab.config.regions[0].gateway.api;
    let https = crate::client::Https::for_cli(&lab.config)?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let get =
            crate::client::request(api, Some(&https), hyper::Method::GET, "/v1/health", None, Duration::from_secs(2));
        match get.await {
            Ok((status, body)) if status.is_success() => {
                let h: crate::gateway::api::HealthStatus =
                    serde_json::from_slice(&body).context("parse the gateway's health")?;
                let unsettled: Vec<String> = h
                    .checks
                    .iter()
                    .filter(|c| {
                        let observed = c.observers.len() >= gateways && c.observers.iter().all(|o| !o.pending);
                        c.pending || (c.kind != CheckKind::Calculated && !observed)
                    })
                    .map(|c| format!("{} ({})", c.name, c.reason))
                    .collect();
                if unsettled.is_empty() {
                    return Ok(());
                }
                last = unsettled.join(", ");
            }
            Ok((status, body)) => last = format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("health checks had not settled within {timeout:?}: {last}")
}

/// Another lab on the same --net would otherwise fail later with an obscure etcd error.
fn check_addresses_free(config: &Config, net: u8) -> Result<()> {
    let mut addrs: Vec<SocketAddr> =
        config.etcd.endpoints.iter().filter_map(|e| crate::config::parse_etcd_url(e).ok()).collect();
    for r in &config.regions {
        addrs.push(r.gateway.api);
        for n in &r.nodes {
            addrs.push(n.address);
        }
    }
    if let Some(b) = &config.backup {
        for r in &b.repositories {
            if let Ok(crate::config::RepoLocation::S3 { port, .. }) = r.location() {
                addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
                addrs.push(SocketAddr::from(([127, 0, 0, 1], super::s3::upstream_port(port))));
            }
        }
    }
    // The netns lab's own addresses live in its namespaces (`netns::check_free`).
    for addr in addrs.into_iter().filter(|a| a.ip().is_loopback()) {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!("{addr} is not free ({e}); another lab may use --net {net}: pick another --net or stop it");
        }
    }
    Ok(())
}

/// The lab's CA in `D/tls/ca` and, each made in its own directory, a key and
/// certificate per node, gateway and etcd member (`D/tls/<kind>-<name>`).
fn write_certificates(dir: &Path, config: &Config) -> Result<()> {
    use crate::ca::{self, Subject};
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let tls = dir.join("tls");
    let ca_dir = tls.join("ca");
    ca::init(&ca_dir, &config.cluster, 10 * YEAR)?;
    let mut subjects: Vec<(String, Subject)> =
        config.nodes().map(|(_, n)| (format!("node-{}", n.name), Subject::Node(n.name.clone()))).collect();
    for r in &config.regions {
        subjects.push((format!("gateway-{}", r.name), Subject::Gateway(r.name.clone())));
        if r.etcd.is_some() {
            subjects.push((format!("etcd-{}", r.name), Subject::Etcd(r.name.clone())));
        }
    }
    subjects.push((super::LAB_IDENTITY.to_string(), Subject::User("lab".into())));
    for r in config.backup.iter().flat_map(|b| &b.repositories) {
        if matches!(r.location(), Ok(crate::config::RepoLocation::S3 { .. })) {
            subjects.push((format!("repository-{}", r.name), Subject::Repository(r.name.clone())));
        }
    }
    for (sub, subject) in subjects {
        ca::issue(&ca_dir, &tls.join(sub), config, &subject, YEAR)?;
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
    let (repl, monitor, auth, app) = (password(), password(), password(), password());
    let mut secrets =
        format!("replication_password = \"{repl}\"\nmonitor_password = \"{monitor}\"\nauth_password = \"{auth}\"\n");
    if let Some(b) = &config.backup {
        secrets.push_str(&format!("backup_cipher_pass = \"{}\"\n", password()));
        for r in &b.repositories {
            if matches!(r.location(), Ok(crate::config::RepoLocation::S3 { .. })) {
                // moto takes any key; a real S3 would need the repository's own.
                secrets.push_str(&format!(
                    "\n[repository.{}]\ns3_key = \"lab-{}\"\ns3_key_secret = \"{}\"\n",
                    r.name,
                    r.name,
                    password()
                ));
            }
        }
        // The directory repositories' parent: PostgreSQL's user (pgBackRest) creates each in it.
        let backup = dir.join("backup");
        std::fs::create_dir_all(&backup).with_context(|| format!("create {}", backup.display()))?;
        std::fs::set_permissions(&backup, std::fs::Permissions::from_mode(0o700))?;
        if unsafe { libc::geteuid() } == 0 {
            let (uid, gid) = crate::postgres::lookup_user(&config.postgres.os_user)?;
            std::os::unix::fs::chown(&backup, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", backup.display()))?;
        }
    }
    write_private(&dir.join("secrets.toml"), &secrets)?;
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
    if config.backup.is_some() {
        let into = super::topology::restore_into_config(config, dir);
        let text = format!(
            "# A second cluster for `meridian restore --into`, written by `meridian lab up`. See docs/backup.md.\n{}",
            toml::to_string(&into).context("render the restore cluster file")?
        );
        std::fs::write(dir.join(super::topology::RESTORE_INTO), text)?;
    }
    std::fs::write(dir.join(MARKER), "a meridian lab directory; `meridian lab down` removes it\n")?;
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
    if lab.network.hosts == Hosts::Netns {
        match lab.network.wan.filter(|_| lab.network.has_delay()) {
            Some(w) => {
                println!("  hosts: a network namespace per process (mlab{}-*); WAN between regions: {w}", lab.net())
            }
            None => println!("  hosts: a network namespace per process (mlab{}-*); no WAN delay", lab.net()),
        }
    }
    for r in &c.regions {
        println!(
            "  region {:<16} gateway https://{}  dns {}  writer {}  reader {}",
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
