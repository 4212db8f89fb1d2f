//! `verify`: write a marker row on the primary and time how long each replica
//! takes to show it ("validate cross-region replication"). It reads the row on
//! every replica itself rather than trusting reported positions.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Gateway;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Every replica showed the marker in time.
    pub ok: bool,
    pub primary: String,
    pub marker: i64,
    /// The primary's WAL position right after the marker committed.
    pub lsn: String,
    pub replicas: Vec<ReplicaCatchUp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaCatchUp {
    pub name: String,
    pub region: String,
    pub caught_up: bool,
    /// From the marker's commit on the primary to its first sighting here.
    pub catch_up_ms: Option<f64>,
    /// Why it did not catch up (unreachable, timed out).
    pub error: Option<String>,
}

pub async fn run(g: &Gateway, timeout: Duration) -> Result<VerifyReport> {
    let status = g.status().await?;
    let Some(primary) = status.primary.clone() else {
        bail!("no primary to write the marker on: {}", status.reason.unwrap_or_default());
    };
    let config = g.config();
    let (_, pnode) = config.node(&primary)?;
    let client = connect(g, pnode.address).await.with_context(|| format!("connect to primary {primary}"))?;
    let deadline = Instant::now() + timeout;
    // Connect to every replica first, so catch-up times measure replication, not connection setup.
    let replicas: Vec<_> = config
        .nodes()
        .filter(|(_, n)| n.name != primary)
        .map(|(r, n)| (n.name.clone(), r.name.clone(), n.address))
        .collect();
    let conns =
        futures_util::future::join_all(replicas.iter().map(|(_, _, addr)| connect_until(g, *addr, deadline))).await;
    let marker: i64 = rand::random::<i64>().abs();
    client
        .execute(
            "INSERT INTO meridian.verify (id, written_by) VALUES ($1, $2)",
            &[&marker, &format!("gateway {}", g.region)],
        )
        .await
        .context("write the marker row on the primary")?;
    let committed = Instant::now();
    let lsn: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    // Keep the table small; markers older than a day prove nothing new.
    let _ = client.execute("DELETE FROM meridian.verify WHERE written_at < now() - interval '1 day'", &[]).await;

    let waits = replicas.into_iter().zip(conns).map(|((name, region, _), conn)| async move {
        let result = match conn {
            Ok(c) => wait_for_marker(&c, marker, committed, deadline).await,
            Err(e) => Err(e),
        };
        ReplicaCatchUp {
            name,
            region,
            caught_up: result.is_ok(),
            catch_up_ms: result.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
            error: result.err().map(|e| format!("{e:#}")),
        }
    });
    let replicas = futures_util::future::join_all(waits).await;
    Ok(VerifyReport { ok: replicas.iter().all(|r| r.caught_up), primary, marker, lsn, replicas })
}

/// Retries a connection (a replica may be restarting) until the deadline.
async fn connect_until(g: &Gateway, addr: std::net::SocketAddr, deadline: Instant) -> Result<tokio_postgres::Client> {
    loop {
        match tokio::time::timeout_at(deadline.into(), connect(g, addr)).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) if Instant::now() >= deadline => return Err(e.context("gave up at the deadline")),
            Err(_) => bail!("could not connect to {addr} before the deadline"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_for_marker(
    client: &tokio_postgres::Client,
    marker: i64,
    since: Instant,
    deadline: Instant,
) -> Result<Duration> {
    loop {
        let seen: bool = client
            .query_one("SELECT EXISTS (SELECT 1 FROM meridian.verify WHERE id = $1)", &[&marker])
            .await
            .context("look for the marker")?
            .get(0);
        if seen {
            return Ok(since.elapsed());
        }
        if Instant::now() >= deadline {
            bail!("the marker did not arrive before the deadline");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn connect(g: &Gateway, addr: std::net::SocketAddr) -> Result<tokio_postgres::Client> {
    let mut c = tokio_postgres::Config::new();
    c.host(addr.ip().to_string())
        .port(addr.port())
        .user(&g.config().postgres.monitor_user)
        .password(&g.secrets.monitor_password)
        .dbname("postgres")
        .application_name("meridian-gateway")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = c.connect(g.pg_tls.0.clone()).await.with_context(|| format!("connect to {addr}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
