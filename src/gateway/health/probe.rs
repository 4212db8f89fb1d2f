//! One probe of one check: did the endpoint answer as it should? Each says
//! passed or failed with a detail, or that it has no data to judge by yet
//! (a replica's lag before the leader's first report); `invert` and the
//! failure threshold are applied by the caller.

use std::time::Duration;

use hyper::Method;

use crate::cluster::Role;
use crate::config::{CheckKind, HealthCheck, LagBudget};
use crate::coord::Snapshot;
use crate::objects::ObjectRef;

/// What probes need besides the check itself.
pub struct ProbeContext {
    pub monitor_user: String,
    pub monitor_password: String,
    /// The object behind an `object-exists` check, opened once.
    pub object: Option<ObjectRef>,
    /// How `https://` targets are reached (the cluster CA); None if it could not be loaded.
    pub https: Option<crate::client::Https>,
    /// TLS for `postgres` checks: required, verified, with the gateway's certificate.
    pub pg_tls: crate::tls::PgTls,
}

/// Route 53 searches the first 5120 bytes of the body.
const BODY_SEARCH_BYTES: usize = 5120;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    Passed(String),
    Failed(String),
    /// Nothing to judge by yet: neither healthy nor unhealthy.
    NoData(String),
}

impl From<Result<String, String>> for Probed {
    fn from(r: Result<String, String>) -> Probed {
        match r {
            Ok(d) => Probed::Passed(d),
            Err(d) => Probed::Failed(d),
        }
    }
}

pub async fn probe(check: &HealthCheck, ctx: &ProbeContext, snap: Option<&Snapshot>) -> Probed {
    if check.kind == CheckKind::Postgres {
        let target = check.target.as_deref().unwrap_or_default();
        return postgres(check, ctx, target, snap).await.unwrap_or_else(Probed::Failed);
    }
    probe_plain(check, ctx).await.into()
}

async fn probe_plain(check: &HealthCheck, ctx: &ProbeContext) -> Result<String, String> {
    let target = check.target.as_deref().unwrap_or_default();
    match check.kind {
        CheckKind::Tcp => {
            let stream = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("connect: {e}"))?;
            drop(stream);
            Ok("connected".into())
        }
        CheckKind::Http => http(check, ctx, target).await,
        CheckKind::Postgres => Err("postgres checks are probed with the snapshot".into()),
        CheckKind::ObjectExists => {
            let object = ctx.object.as_ref().ok_or("the object store could not be opened")?;
            match object.version().await {
                Ok(Some(v)) => Ok(format!("exists (version {v})")),
                Ok(None) => Err("does not exist".into()),
                Err(e) => Err(format!("{e:#}")),
            }
        }
        CheckKind::Calculated => Err("calculated checks are not probed".into()),
    }
}

async fn http(check: &HealthCheck, ctx: &ProbeContext, url: &str) -> Result<String, String> {
    let (rest, https, default_port) = match url.strip_prefix("https://") {
        Some(rest) => (rest, Some(ctx.https.as_ref().ok_or("the cluster CA could not be loaded")?), 443),
        None => (url.strip_prefix("http://").ok_or("not an http:// or https:// URL")?, None, 80),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:{default_port}") };
    let addr = tokio::net::lookup_host(&authority)
        .await
        .map_err(|e| format!("resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let (status, body) = crate::client::request(addr, https, Method::GET, path, None, check.timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let status_ok = match check.expect_status {
        Some(s) => status.as_u16() == s,
        None => status.is_success() || status.is_redirection(),
    };
    if !status_ok {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    if let Some(needle) = &check.body_contains {
        let head = &body[..body.len().min(BODY_SEARCH_BYTES)];
        if !String::from_utf8_lossy(head).contains(needle.as_str()) {
            return Err(format!("HTTP {}, body lacks {needle:?}", status.as_u16()));
        }
    }
    Ok(format!("HTTP {}", status.as_u16()))
}

async fn postgres(
    check: &HealthCheck,
    ctx: &ProbeContext,
    target: &str,
    snap: Option<&Snapshot>,
) -> Result<Probed, String> {
    let (host, port) = target.rsplit_once(':').ok_or("target is not host:port")?;
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .port(port.parse().map_err(|_| "bad port")?)
        .user(&ctx.monitor_user)
        .password(&ctx.monitor_password)
        .dbname("postgres")
        .application_name("meridian-health")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(check.timeout.max(Duration::from_millis(100)));
    let (client, conn) = c.connect(ctx.pg_tls.0.clone()).await.map_err(|e| format!("connect: {e}"))?;
    let conn = tokio::spawn(conn);
    let result = async {
        client
            .simple_query(check.query.as_deref().unwrap_or("SELECT 1"))
            .await
            .map_err(|e| format!("query: {}", e.as_db_error().map(|d| d.message().to_string()).unwrap_or(e.to_string())))?;
        let Some(LagBudget::Bytes(max)) = check.max_lag else { return Ok(Probed::Passed("query ran".to_string())) };
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text",
                &[],
            )
            .await
            .map_err(|e| format!("read the WAL position: {e}"))?;
        let (standby, lsn): (bool, Option<String>) = (row.get(0), row.get(1));
        if !standby {
            return Ok(Probed::Passed("primary".into()));
        }
        let replayed: crate::cluster::Lsn = lsn.and_then(|l| l.parse().ok()).ok_or("no replay position")?;
        // Against the leader's last report: the gateway cannot ask the leader on every probe.
        let leader_lsn = snap
            .and_then(|s| {
                let l = s.leader.as_ref()?;
                s.members.iter().find(|m| m.node == l.leader.node && m.role == Role::Primary)
            })
            .and_then(|m| m.write_lsn);
        let Some(leader_lsn) = leader_lsn else {
            return Ok(Probed::NoData("no report from the leader to measure lag against yet".into()));
        };
        let lag = leader_lsn.0.saturating_sub(replayed.0);
        if lag > max {
            return Ok(Probed::Failed(format!("standby {} behind (max {})", crate::cluster::human_bytes(lag), crate::cluster::human_bytes(max))));
        }
        Ok(Probed::Passed(format!("standby {} behind", crate::cluster::human_bytes(lag))))
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}
