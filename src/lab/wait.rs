//! Waiting on the lab's processes and the cluster's state, with a deadline,
//! saying what was awaited when it times out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::config::Config;
use crate::coord::Coord;
use crate::process::{self, ProcSpec};

/// Connects to etcd and waits until it answers with a quorum.
pub async fn wait_for_etcd(config: &Config, timeout: Duration) -> Result<Coord> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match Coord::connect(config, &config.tls_identity(super::LAB_IDENTITY)).await {
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

/// Until `https://addr/path` answers 200, verified against the lab's CA.
pub(super) async fn wait_for_http(config: &Config, addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
    let https = crate::client::Https::for_cli(config)?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match crate::client::request(addr, Some(&https), hyper::Method::GET, path, None, Duration::from_secs(2)).await {
            Ok((status, _)) if status.is_success() => return Ok(()),
            Ok((status, body)) => last = format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("https://{addr}{path} did not answer 200 within {timeout:?}: {last}")
}
