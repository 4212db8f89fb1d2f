//! The drill's workload: writers inserting rows with unique ids through the
//! writer endpoints (the gateways' proxies) and recording every acknowledged
//! id with its times and the node that committed it; a reader per database
//! region measuring how stale its reader endpoint is.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::analysis::Ack;
use crate::cluster::now_ms;

pub const TABLE_DDL: &str =
    "CREATE TABLE IF NOT EXISTS meridian_drill (id bigint PRIMARY KEY, writer int NOT NULL, at_ms bigint NOT NULL)";
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A persistent connection's statement may wait out a failover inside the
/// proxy (its `leader_wait`, 15 s by default) before it is answered.
const PERSISTENT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_EVERY: Duration = Duration::from_millis(250);

/// How to reach the database as the application: over TLS, verified against the cluster CA.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub dbname: String,
    pub tls: crate::tls::PgTls,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("dbname", &self.dbname).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub writers: u32,
    /// Inserts per second per writer; 0 means as fast as acknowledgements come.
    pub rate: f64,
    /// Writer endpoints, tried in turn by each writer.
    pub writer_endpoints: Vec<SocketAddr>,
    /// (region, reader endpoint) per database region.
    pub reader_endpoints: Vec<(String, SocketAddr)>,
    pub credentials: Credentials,
    /// The primary at the start, watched directly for its WAL position.
    pub primary: SocketAddr,
    /// Ids of this round are `round * 10^12 + writer * 10^9 + sequence`.
    pub round: u32,
    /// Each writer keeps the one connection it opened (as an application with a
    /// connection pool of its own does) instead of opening a new one after an error.
    pub persistent: bool,
}

/// What one writer went through.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriterOutcome {
    /// The writer endpoint it used first.
    pub endpoint: String,
    /// Failed inserts and connection attempts.
    pub failed: u32,
    /// With persistent connections: its connection closed (the writer then stops).
    pub connection_lost: bool,
    /// What its first failure said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Everything the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub acks: Vec<Ack>,
    /// (when, what) for every failed attempt.
    pub errors: Vec<(u64, String)>,
    /// (when, region, staleness in ms): how far the reader endpoint's newest
    /// row trails the newest acknowledged one.
    pub staleness: Vec<(u64, String, u64)>,
    /// The furthest WAL position seen on the round's first primary while it
    /// was writable: what a failover is measured against.
    pub old_primary_lsn: Option<crate::cluster::Lsn>,
    /// Per writer, by index.
    pub writers: Vec<WriterOutcome>,
}

pub struct Workload {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pub record: Arc<Mutex<Record>>,
}

/// How a drill's client logs in to `addr`: TLS required, the drill's
/// application name, a connect timeout. Connect with `c.tls`.
pub fn client_config(addr: SocketAddr, c: &Credentials) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(&c.user)
        .password(&c.password)
        .dbname(&c.dbname)
        .application_name("meridian-drill")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(CONNECT_TIMEOUT);
    config
}

pub async fn connect(addr: SocketAddr, c: &Credentials) -> Result<Client, String> {
    let config = client_config(addr, c);
    let (client, conn) = match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(c.tls.0.clone())).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(pg_error(&e)),
        Err(_) => return Err(format!("no connection to {addr} within {CONNECT_TIMEOUT:?}")),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

impl Workload {
    pub fn start(spec: WorkloadSpec) -> Workload {
        let stop = CancellationToken::new();
        let writers = (0..spec.writers as usize)
            .map(|w| WriterOutcome {
                endpoint: spec.writer_endpoints[w % spec.writer_endpoints.len()].to_string(),
                ..WriterOutcome::default()
            })
            .collect();
        let record = Arc::new(Mutex::new(Record { writers, ..Record::default() }));
        let mut tasks = Vec::new();
        for w in 0..spec.writers {
            tasks.push(tokio::spawn(writer(spec.clone(), w, record.clone(), stop.clone())));
        }
        tasks.push(tokio::spawn(wal_watch(spec.clone(), record.clone(), stop.clone())));
        for (region, addr) in spec.reader_endpoints.clone() {
            tasks.push(tokio::spawn(reader(spec.clone(), region, addr, record.clone(), stop.clone())));
        }
        Workload { stop, tasks, record }
    }

    /// The first acknowledgement after `since_ms` from a node other than `not_node`.
    pub fn acked_elsewhere_since(&self, since_ms: u64, not_node: &str) -> Option<Ack> {
        let r = self.record.lock().unwrap();
        r.acks.iter().find(|a| a.ack_ms > since_ms && a.node != not_node).cloned()
    }

    pub fn acks_since(&self, since_ms: u64) -> usize {
        self.record.lock().unwrap().acks.iter().filter(|a| a.ack_ms > since_ms).count()
    }

    /// Stops every client and returns what they saw.
    pub async fn stop(self) -> Record {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let r = self.record.lock().unwrap().clone();
        r
    }
}

async fn writer(spec: WorkloadSpec, w: u32, record: Arc<Mutex<Record>>, stop: CancellationToken) {
    let mut endpoint = w as usize % spec.writer_endpoints.len();
    let mut client: Option<Client> = None;
    let mut seq: i64 = 0;
    let period = (spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.rate));
    let mut ticker = tokio::time::interval(period.unwrap_or(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fail = |what: String| {
        let mut r = record.lock().unwrap();
        let outcome = &mut r.writers[w as usize];
        outcome.failed += 1;
        outcome.first_error.get_or_insert_with(|| what.clone());
        r.errors.push((now_ms(), what));
    };
    let statement_timeout = if spec.persistent { PERSISTENT_STATEMENT_TIMEOUT } else { STATEMENT_TIMEOUT };
    let mut connected_once = false;
    loop {
        if period.is_some() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
        } else if stop.is_cancelled() {
            return;
        }
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            Some(_) if spec.persistent => {
                fail("the connection closed; a persistent writer does not reconnect".into());
                record.lock().unwrap().writers[w as usize].connection_lost = true;
                return;
            }
            _ if spec.persistent && connected_once => return,
            _ => {
                let addr = spec.writer_endpoints[endpoint];
                match tokio::select! { r = connect(addr, &spec.credentials) => r, _ = stop.cancelled() => return } {
                    Ok(c) => {
                        connected_once = true;
                        client.insert(c)
                    }
                    Err(e) => {
                        fail(format!("connect {addr}: {e}"));
                        client = None;
                        endpoint = (endpoint + 1) % spec.writer_endpoints.len();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        seq += 1;
        let id = spec.round as i64 * 1_000_000_000_000 + w as i64 * 1_000_000_000 + seq;
        let sent_ms = now_ms();
        let (writer_id, at) = (w as i32, sent_ms as i64);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&id, &writer_id, &at];
        let insert = c.query_one(
            "INSERT INTO meridian_drill (id, writer, at_ms) VALUES ($1, $2, $3) RETURNING current_setting('cluster_name')",
            &params,
        );
        match tokio::time::timeout(statement_timeout, insert).await {
            Ok(Ok(row)) => {
                let node: String = row.get(0);
                record.lock().unwrap().acks.push(Ack { id, writer: w, sent_ms, ack_ms: now_ms(), node });
            }
            Ok(Err(e)) => {
                fail(format!("insert: {}", pg_error(&e)));
                // Read-only after a fence, or a dead session: start over on a new
                // connection, unless the application keeps its connections.
                if !spec.persistent {
                    client = None;
                }
            }
            Err(_) => {
                fail(format!("insert: no answer within {statement_timeout:?}"));
                if !spec.persistent {
                    client = None;
                }
            }
        }
    }
}

/// Samples the first primary's WAL position directly (not through the proxy,
/// which moves on) while it is writable. A partitioned primary keeps taking
/// writes until it fences itself; what it wrote is lost in a failover, and
/// etcd cannot know how much, but the drill, outside the partition, can.
async fn wal_watch(spec: WorkloadSpec, record: Arc<Mutex<Record>>, stop: CancellationToken) {
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => match connect(spec.primary, &spec.credentials).await {
                Ok(c) => client.insert(c),
                Err(_) => continue,
            },
        };
        let query =
            c.query_one("SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END", &[]);
        match tokio::time::timeout(Duration::from_secs(1), query).await {
            Ok(Ok(row)) => {
                if let Some(lsn) = row.get::<_, Option<String>>(0).and_then(|l| l.parse().ok()) {
                    let mut r = record.lock().unwrap();
                    r.old_primary_lsn = r.old_primary_lsn.max(Some(lsn));
                }
            }
            _ => client = None,
        }
    }
}

async fn reader(
    spec: WorkloadSpec,
    region: String,
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    stop: CancellationToken,
) {
    let lo = spec.round as i64 * 1_000_000_000_000;
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(READ_EVERY) => {}
        }
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => match connect(addr, &spec.credentials).await {
                Ok(c) => client.insert(c),
                Err(_) => continue,
            },
        };
        let newest_acked = record.lock().unwrap().acks.iter().map(|a| a.sent_ms).max();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lo];
        let query = c.query_one("SELECT coalesce(max(at_ms), 0) FROM meridian_drill WHERE id >= $1", &params);
        match tokio::time::timeout(STATEMENT_TIMEOUT, query).await {
            Ok(Ok(row)) => {
                let visible: i64 = row.get(0);
                if let Some(newest) = newest_acked {
                    let stale = newest.saturating_sub(visible.max(0) as u64);
                    record.lock().unwrap().staleness.push((now_ms(), region.clone(), stale));
                }
            }
            _ => client = None,
        }
    }
}
