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
    /// For `backup` checks: the cluster file, the secrets and the CA pgBackRest reads the repository with.
    pub backup:
        Option<(std::sync::Arc<crate::config::Config>, std::sync::Arc<crate::config::Secrets>, std::path::PathBuf)>,
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
    if check.kind == CheckKind::Backup {
        return backup(check, ctx, snap).await;
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
        CheckKind::Backup => Err("backup checks are probed with the snapshot".into()),
    }
}

/// A `backup` check: the primary's archiver (from its report) and the
/// repository's last full backup (pgbackrest info, with the gateway's clock
/// against the backup's stop time: hours, not seconds).
async fn backup(check: &HealthCheck, ctx: &ProbeContext, snap: Option<&Snapshot>) -> Probed {
    let repository = check.target.clone().unwrap_or_default();
    let mut details = Vec::new();
    if let Some(max) = check.max_archive_age {
        let Some(primary) = snap.and_then(|s| s.members.iter().find(|m| m.role == Role::Primary && m.is_fresh()))
        else {
            return Probed::NoData("no primary reports its archiver".into());
        };
        let archive = primary.archive.as_ref();
        match archive.and_then(|a| a.last_archived_age_seconds) {
            None => return Probed::Failed(format!("{} has archived nothing yet", primary.node)),
            Some(age) if age > max.as_secs_f64() => {
                let failing =
                    archive.and_then(|a| a.failing.as_deref()).map(|f| format!(", failing on {f}")).unwrap_or_default();
                return Probed::Failed(format!(
                    "last WAL archived {age:.0}s ago (over {}){failing}",
                    humantime::format_duration(max)
                ));
            }
            Some(age) => details.push(format!("archived {age:.0}s ago")),
        }
    }
    if let Some(max) = check.max_full_age {
        let Some((config, secrets, ca)) = ctx.backup.clone() else {
            return Probed::Failed("the cluster file has no [backup]".into());
        };
        let name = repository.clone();
        let info = tokio::task::spawn_blocking(move || {
            crate::backup::repo::Repositories::open(&config, &secrets, &ca, Some(&name), None)?.info()
        })
        .await;
        let catalog = match info {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Probed::Failed(format!("{e:#}")),
            Err(e) => return Probed::Failed(format!("join pgbackrest info: {e}")),
        };
        let now = crate::cluster::now_ms() / 1000;
        match catalog.last(&repository, Some("full")) {
            None => return Probed::Failed(format!("{repository} holds no full backup")),
            Some(b) if now.saturating_sub(b.stopped_at) > max.as_secs() => {
                return Probed::Failed(format!(
                    "last full backup {} in {repository} is {} old (over {})",
                    b.label,
                    humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(b.stopped_at))),
                    humantime::format_duration(max)
                ))
            }
            Some(b) => details.push(format!("full backup {} {}s old", b.label, now.saturating_sub(b.stopped_at))),
        }
    }
    Probed::Passed(details.join(", "))
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
