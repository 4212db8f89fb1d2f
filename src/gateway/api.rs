//! The HTTPS API: `GET /v1/cluster`, `POST /v1/verify`, `GET /healthz`, `GET /metrics`, tokens,
//! the audit log and backups (`/v1/backups...`). Every route but `/healthz` needs a credential and a role (`super::auth`).
//! Errors are JSON `{"error": "..."}` with a status code, so the CLI can show them as one line.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Gateway;
use crate::cluster::{ClusterStatus, Role};

pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/cluster", get(cluster))
        .route("/v1/verify", post(verify))
        .route("/v1/history", get(history))
        .route("/v1/health", get(health))
        .route("/v1/switchover", post(switchover))
        .route("/v1/failover", post(failover))
        .route("/v1/restart", post(restart))
        .route("/v1/audit", get(audit))
        .route("/v1/config", get(show_config).post(apply_config))
        .route("/v1/config/plan", post(plan_config))
        .route("/v1/backups", get(list_backups).post(create_backup))
        .route("/v1/backups/job", get(backup_job))
        .route("/v1/backups/status", get(backup_status))
        .route("/v1/backups/verify", post(verify_backups))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(gateway.clone(), super::auth::middleware))
        .with_state(gateway)
}

/// Serves the API over TLS with the gateway's certificate; client
/// certificates from the cluster CA are checked when presented.
pub async fn serve(listener: TcpListener, gateway: Gateway, shutdown: CancellationToken) -> anyhow::Result<()> {
    let identity = gateway.config().tls_identity(&format!("gateway-{}", gateway.region));
    let tls = crate::tls::server_config(&identity, crate::tls::ClientAuth::Optional)?;
    crate::tls::serve_https(listener, tls, router(gateway), shutdown).await
}

/// An error as the API returns it.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

pub(super) fn unavailable(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
}

/// A refusal is the operator's to read (409); anything else is an outage (503).
fn refused_or_unavailable(e: anyhow::Error) -> ApiError {
    match e.downcast_ref::<super::operations::Refused>() {
        Some(r) => ApiError(StatusCode::CONFLICT, r.0.clone()),
        None => unavailable(e),
    }
}

fn timeout(ms: u64) -> Result<Duration, ApiError> {
    if ms == 0 || ms > 3_600_000 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "timeout must be between 1ms and 1h".into()));
    }
    Ok(Duration::from_millis(ms))
}

#[derive(Deserialize)]
struct SwitchoverRequest {
    to: String,
    timeout_ms: u64,
}

async fn switchover(
    State(g): State<Gateway>,
    Json(req): Json<SwitchoverRequest>,
) -> Result<Json<super::operations::OperationReport>, ApiError> {
    let t = timeout(req.timeout_ms)?;
    super::operations::switchover(&g, &req.to, t).await.map(Json).map_err(refused_or_unavailable)
}

#[derive(Deserialize)]
struct RestartRequest {
    node: String,
    reason: String,
    timeout_ms: u64,
}

async fn restart(
    State(g): State<Gateway>,
    Json(req): Json<RestartRequest>,
) -> Result<Json<super::operations::OperationReport>, ApiError> {
    let t = timeout(req.timeout_ms)?;
    if req.reason.len() > 200 || req.reason.chars().any(char::is_control) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "reason: at most 200 characters, no control characters".into()));
    }
    super::operations::restart_node(&g, &req.node, &req.reason, t).await.map(Json).map_err(refused_or_unavailable)
}

#[derive(Deserialize)]
struct FailoverRequest {
    region: String,
    allow_data_loss: bool,
    timeout_ms: u64,
}

async fn failover(
    State(g): State<Gateway>,
    Json(req): Json<FailoverRequest>,
) -> Result<Json<super::operations::OperationReport>, ApiError> {
    let t = timeout(req.timeout_ms)?;
    super::operations::failover_to_region(&g, &req.region, req.allow_data_loss, t, None)
        .await
        .map(Json)
        .map_err(refused_or_unavailable)
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u64>,
}

async fn show_config(
    State(g): State<Gateway>,
    Query(q): Query<VersionQuery>,
) -> Result<Json<crate::coord::PublishedConfig>, ApiError> {
    let shown = match q.version {
        Some(v) => super::config_api::version(&g, v).await,
        None => super::config_api::running(&g).await,
    };
    shown.map(Json).map_err(refused_or_unavailable)
}

async fn plan_config(
    State(g): State<Gateway>,
    Json(req): Json<super::config_api::PlanRequest>,
) -> Result<Json<super::config_api::PlanAnswer>, ApiError> {
    super::config_api::plan(&g, &req).await.map(Json).map_err(refused_or_unavailable)
}

async fn apply_config(
    State(g): State<Gateway>,
    Extension(caller): Extension<crate::auth::Caller>,
    Json(req): Json<super::config_api::PlanRequest>,
) -> Result<Json<super::config_api::PlanAnswer>, ApiError> {
    super::config_api::apply(&g, &req, &caller.who).await.map(Json).map_err(refused_or_unavailable)
}

async fn create_backup(
    State(g): State<Gateway>,
    Extension(caller): Extension<crate::auth::Caller>,
    Json(req): Json<super::backup::CreateRequest>,
) -> Result<Json<crate::backup::job::BackupJob>, ApiError> {
    super::backup::create(&g, req.backup_type, req.repository.as_deref(), &caller.who)
        .await
        .map(Json)
        .map_err(refused_or_unavailable)
}

async fn backup_job(State(g): State<Gateway>) -> Result<Json<Option<crate::backup::job::BackupJob>>, ApiError> {
    super::backup::job(&g).await.map(Json).map_err(refused_or_unavailable)
}

async fn list_backups(State(g): State<Gateway>) -> Result<Json<crate::backup::catalog::Catalog>, ApiError> {
    super::backup::catalog(&g).await.map(Json).map_err(refused_or_unavailable)
}

async fn backup_status(State(g): State<Gateway>) -> Result<Json<super::backup::BackupStatus>, ApiError> {
    super::backup::status(&g).await.map(Json).map_err(refused_or_unavailable)
}

async fn verify_backups(
    State(g): State<Gateway>,
    Json(req): Json<super::backup::VerifyRequest>,
) -> Result<Json<Vec<crate::backup::repo::Verified>>, ApiError> {
    super::backup::verify(&g, req.repository).await.map(Json).map_err(refused_or_unavailable)
}

/// Healthy when this gateway can read etcd with a quorum.
async fn healthz(State(g): State<Gateway>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), g.coord.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("etcd: {e:#}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "etcd did not answer within 2s\n").into_response(),
    }
}

async fn cluster(State(g): State<Gateway>) -> Result<Json<ClusterStatus>, ApiError> {
    g.status().await.map(Json).map_err(unavailable)
}

async fn history(State(g): State<Gateway>) -> Result<Json<Vec<crate::cluster::HistoryEntry>>, ApiError> {
    g.coord.history().await.map(Json).map_err(unavailable)
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    since_ms: u64,
    limit: Option<i64>,
}

/// The audit log, oldest first (the newest `limit`, 1000 by default).
async fn audit(
    State(g): State<Gateway>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<crate::auth::AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(1000);
    if !(1..=100_000).contains(&limit) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "limit must be between 1 and 100000".into()));
    }
    g.coord.audit(q.since_ms, limit).await.map(Json).map_err(unavailable)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    role: crate::auth::ApiRole,
    /// Seconds until it expires; None: never.
    expires_s: Option<u64>,
    #[serde(default)]
    note: String,
}

/// A new token: the secret is in this answer and nowhere else.
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    pub info: crate::auth::TokenInfo,
}

async fn create_token(
    State(g): State<Gateway>,
    Extension(caller): Extension<crate::auth::Caller>,
    Json(req): Json<TokenRequest>,
) -> Result<Json<CreatedToken>, ApiError> {
    if req.expires_s == Some(0) || req.note.len() > 200 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "expires_s must be positive and note at most 200 bytes".into()));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let new = crate::auth::new_token(req.role, now, req.expires_s, &caller.who, &req.note);
    g.coord.create_token(&new.stored).await.map_err(unavailable)?;
    Ok(Json(CreatedToken { info: (&new.stored).into(), token: new.secret }))
}

async fn list_tokens(State(g): State<Gateway>) -> Result<Json<Vec<crate::auth::TokenInfo>>, ApiError> {
    let mut tokens: Vec<crate::auth::TokenInfo> =
        g.coord.tokens().await.map_err(unavailable)?.iter().map(Into::into).collect();
    tokens.sort_by_key(|t| t.created);
    Ok(Json(tokens))
}

async fn revoke_token(
    State(g): State<Gateway>,
    Path(id): Path<String>,
) -> Result<Json<crate::auth::TokenInfo>, ApiError> {
    if !crate::auth::is_token_id(&id) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("{id:?} is not a token id (12 hex digits)")));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    match g.coord.revoke_token(&id, now).await.map_err(unavailable)? {
        Some(t) => Ok(Json((&t).into())),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no token {id}"))),
    }
}

/// Every health check's aggregate and each observer's verdict, from one etcd read.
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct HealthStatus {
    pub healthy_share: f64,
    pub checks: Vec<super::health::aggregate::CheckStatus>,
    /// Every node's certificate (as its agent reports it) and this gateway's.
    #[serde(default)]
    pub certificates: Vec<CertificateExpiry>,
}

/// When one certificate ends, and the warning within 30 days of it.
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct CertificateExpiry {
    /// `node:a1`, `gateway:eu`.
    pub subject: String,
    /// Unix seconds.
    pub not_after: u64,
    pub warning: Option<String>,
}

async fn health(State(g): State<Gateway>) -> Result<Json<HealthStatus>, ApiError> {
    let snap = g.coord.snapshot().await.map_err(unavailable)?;
    let checks = super::health::aggregate::aggregate(&g.config().health, &snap.health).into_values().collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let own = crate::ca::inspect(&g.identity.cert())
        .ok()
        .map(|i| (format!("gateway:{}", g.region), i.not_after.max(0) as u64));
    let certificates = snap
        .members
        .iter()
        .filter_map(|m| m.cert_not_after.map(|t| (format!("node:{}", m.node), t)))
        .chain(own)
        .chain(g.etcd_certs.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .map(|(subject, not_after)| CertificateExpiry {
            warning: crate::cluster::certificate_warning(not_after, now),
            subject,
            not_after,
        })
        .collect();
    Ok(Json(HealthStatus { healthy_share: g.config().health.healthy_share, checks, certificates }))
}

#[derive(Deserialize)]
struct VerifyRequest {
    /// How long to wait for every replica, in milliseconds.
    timeout_ms: u64,
}

async fn verify(State(g): State<Gateway>, Json(req): Json<VerifyRequest>) -> Result<Response, ApiError> {
    if req.timeout_ms == 0 || req.timeout_ms > 3_600_000 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "timeout must be between 1ms and 1h".into()));
    }
    let report = super::verify::run(&g, Duration::from_millis(req.timeout_ms)).await.map_err(unavailable)?;
    Ok(Json(report).into_response())
}

async fn metrics(State(g): State<Gateway>) -> Result<Response, ApiError> {
    let status = g.status().await.map_err(unavailable)?;
    let mut body = render_metrics(&status);
    let counters: [(&str, &str, ProxyCounter); 8] = [
        ("meridian_proxy_connections_total", "Connections relayed to a backend.", |s| s.relayed.load(Relaxed)),
        ("meridian_proxy_refused_total", "Connections refused (no backend, no view of etcd).", |s| {
            s.refused.load(Relaxed)
        }),
        ("meridian_proxy_cut_total", "Writer relays cut because the backend lost the leadership.", |s| {
            s.cut.load(Relaxed)
        }),
        (
            "meridian_proxy_login_failed_total",
            "Logins the proxy refused (wrong password, unknown role, not allowed).",
            |s| s.login_failed.load(Relaxed),
        ),
        ("meridian_proxy_active", "Connections open now.", |s| s.active.load(Relaxed)),
        (
            "meridian_proxy_transactions_total",
            "Transaction mode: server connections lent to a client (a transaction, or a pinned session).",
            |s| s.transactions.load(Relaxed),
        ),
        (
            "meridian_proxy_lost_transactions_total",
            "Transaction mode: transactions whose server went away under them (the client was told to retry).",
            |s| s.lost_transactions.load(Relaxed),
        ),
        (
            "meridian_proxy_lost_sessions_total",
            "Transaction mode: sessions closed because their server went away while pinned or mid-reply.",
            |s| s.lost_sessions.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(body, "# HELP {name} {help}");
        let _ = writeln!(body, "# TYPE {name} {}", if name.ends_with("_total") { "counter" } else { "gauge" });
        for (port, stats) in &g.proxy_stats {
            let port = if *port == super::proxy::Port::Writer { "writer" } else { "reader" };
            let _ = writeln!(body, "{name}{{region=\"{}\",port=\"{port}\"}} {}", g.region, value(stats));
        }
    }
    render_pool_metrics(&mut body, &g.region, &g.proxy_stats);
    let etcd = g.etcd_certs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !etcd.is_empty() {
        let _ = writeln!(body, "# HELP meridian_etcd_certificate_expiry_timestamp_seconds When each etcd member's certificate expires (Unix time), as it presents it.");
        let _ = writeln!(body, "# TYPE meridian_etcd_certificate_expiry_timestamp_seconds gauge");
        for (subject, t) in etcd {
            let member = subject.trim_start_matches("etcd:");
            let _ = writeln!(body, "meridian_etcd_certificate_expiry_timestamp_seconds{{member=\"{member}\"}} {t}");
        }
    }
    if let Ok(info) = crate::ca::inspect(&g.identity.cert()) {
        let _ = writeln!(body, "# HELP meridian_gateway_certificate_expiry_timestamp_seconds When this gateway's certificate expires (Unix time).");
        let _ = writeln!(body, "# TYPE meridian_gateway_certificate_expiry_timestamp_seconds gauge");
        let _ = writeln!(
            body,
            "meridian_gateway_certificate_expiry_timestamp_seconds{{region=\"{}\"}} {}",
            g.region, info.not_after
        );
    }
    Ok(([("content-type", "text/plain; version=0.0.4")], body).into_response())
}

/// Reads one proxy counter.
type ProxyCounter = fn(&super::proxy::ProxyStats) -> u64;

/// Reads one per-node value for a gauge.
type NodeGauge = fn(&crate::cluster::NodeStatus) -> Option<f64>;

/// Prometheus text format: per-node role, lag and health; the cluster's epoch.
pub fn render_metrics(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP meridian_cluster_epoch The last fencing epoch granted.");
    let _ = writeln!(out, "# TYPE meridian_cluster_epoch gauge");
    let _ = writeln!(out, "meridian_cluster_epoch{{cluster=\"{}\"}} {}", s.cluster, s.epoch);
    let _ = writeln!(out, "# HELP meridian_cluster_has_primary 1 when a node holds leader and runs as primary.");
    let _ = writeln!(out, "# TYPE meridian_cluster_has_primary gauge");
    let _ =
        writeln!(out, "meridian_cluster_has_primary{{cluster=\"{}\"}} {}", s.cluster, u8::from(s.primary.is_some()));
    if let Some(v) = &s.vouched {
        let _ = writeln!(
            out,
            "# HELP meridian_cluster_sync_vouched_standbys Standbys the primary vouches for (synchronous replication); 0: a failover could lose acknowledged commits."
        );
        let _ = writeln!(out, "# TYPE meridian_cluster_sync_vouched_standbys gauge");
        let _ = writeln!(out, "meridian_cluster_sync_vouched_standbys{{cluster=\"{}\"}} {}", s.cluster, v.len());
    }
    let _ = writeln!(out, "# HELP meridian_node_role 1 for the role the node reports, 0 for the others.");
    let _ = writeln!(out, "# TYPE meridian_node_role gauge");
    for n in &s.nodes {
        for role in [Role::Primary, Role::Replica, Role::Fenced, Role::Starting, Role::Stopped, Role::Unknown] {
            let _ = writeln!(
                out,
                "meridian_node_role{{node=\"{}\",region=\"{}\",role=\"{role}\"}} {}",
                n.name,
                n.region,
                u8::from(n.role == role)
            );
        }
    }
    let gauges: [(&str, &str, NodeGauge); 8] = [
        ("meridian_node_lag_bytes", "WAL bytes the node has not replayed.", |n| n.lag_bytes.map(|b| b as f64)),
        ("meridian_node_lag_seconds", "Seconds since the last replayed commit, 0 when caught up.", |n| n.lag_seconds),
        ("meridian_node_healthy", "1 when the node is a serving primary or a streaming standby.", |n| {
            Some(f64::from(u8::from(n.healthy)))
        }),
        (
            "meridian_node_certificate_expiry_timestamp_seconds",
            "When the node's certificate expires (Unix time).",
            |n| n.cert_not_after.map(|t| t as f64),
        ),
        (
            "meridian_node_archive_conflict",
            "1 when a repository refused the node's WAL file for other content (a possible split brain).",
            |n| n.archive.as_ref().map(|a| f64::from(u8::from(a.conflict.is_some()))),
        ),
        (
            "meridian_node_commit_hold",
            "1 while the primary holds commits: no standby in another region within max_commit_lag.",
            |n| n.commit_hold.as_ref().map(|h| f64::from(u8::from(h.holding))),
        ),
        (
            "meridian_node_remote_commit_lag_seconds",
            "How far behind the primary's closest standby in another region is (max_commit_lag only).",
            |n| n.commit_hold.as_ref().and_then(|h| h.best_lag_ms).map(|ms| ms as f64 / 1000.0),
        ),
        (
            "meridian_node_archive_age_seconds",
            "Seconds since the node's server last archived a WAL file (a primary: pushed to every repository).",
            |n| n.archive.as_ref().and_then(|a| a.last_archived_age_seconds),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for n in &s.nodes {
            if let Some(v) = value(n) {
                let _ = writeln!(out, "{name}{{node=\"{}\",region=\"{}\"}} {v}", n.name, n.region);
            }
        }
    }
    out
}

/// Transaction mode: pinned sessions by reason, and each pool's connections.
fn render_pool_metrics(
    body: &mut String,
    region: &str,
    stats: &[(super::proxy::Port, std::sync::Arc<super::proxy::ProxyStats>)],
) {
    let port_name = |p: &super::proxy::Port| if *p == super::proxy::Port::Writer { "writer" } else { "reader" };
    let _ = writeln!(
        body,
        "# HELP meridian_proxy_pinned_total Transaction mode: sessions pinned to their server connection, by reason."
    );
    let _ = writeln!(body, "# TYPE meridian_proxy_pinned_total counter");
    for (port, s) in stats {
        for (reason, n) in s.pinned_counts() {
            let _ = writeln!(
                body,
                "meridian_proxy_pinned_total{{region=\"{region}\",port=\"{}\",reason=\"{reason}\"}} {n}",
                port_name(port)
            );
        }
    }
    type PoolGauge = fn(&super::proxy::pool::PoolStats) -> u64;
    let gauges: [(&str, &str, PoolGauge); 3] = [
        ("meridian_proxy_pool_server_connections", "Transaction mode: server connections open (idle and lent).", |p| {
            p.open.load(Relaxed)
        }),
        ("meridian_proxy_pool_idle_server_connections", "Transaction mode: server connections idle.", |p| {
            p.idle.load(Relaxed)
        }),
        ("meridian_proxy_pool_waiting_clients", "Transaction mode: clients waiting for a server connection.", |p| {
            p.waiting.load(Relaxed)
        }),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(body, "# HELP {name} {help}");
        let _ = writeln!(body, "# TYPE {name} gauge");
        for (port, s) in stats {
            for pool in s.pools.all() {
                let _ = writeln!(
                    body,
                    "{name}{{region=\"{region}\",port=\"{}\",user=\"{}\",database=\"{}\"}} {}",
                    port_name(port),
                    pool.key.user.replace(['"', '\\', '\n'], "_"),
                    pool.key.database.replace(['"', '\\', '\n'], "_"),
                    value(&pool.stats)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeStatus;

    #[test]
    fn metrics_are_prometheus_text_with_one_sample_per_node_and_role() {
        let s = ClusterStatus {
            cluster: "lab".into(),
            epoch: 3,
            primary: Some("a".into()),
            reason: None,
            backups: Vec::new(),
            etcd_learners: Vec::new(),
            vouched: Some(vec!["b".into()]),
            gateways: Vec::new(),
            leaving: Vec::new(),
            nodes: vec![NodeStatus {
                name: "a".into(),
                region: "r1".into(),
                role: Role::Primary,
                timeline: Some(1),
                lsn: None,
                lag_bytes: Some(0),
                lag_seconds: Some(0.0),
                healthy: true,
                detail: None,
                waiting: None,
                failure: None,
                cert_not_after: None,
                archive: None,
                commit_hold: Some(crate::agent::commit_lag::CommitHold {
                    holding: true,
                    bound_ms: 5000,
                    best: Some("b".into()),
                    best_lag_ms: Some(7250),
                }),
                config_version: 0,
                pending_restart: Vec::new(),
            }],
        };
        let text = render_metrics(&s);
        assert!(text.contains("meridian_node_commit_hold{node=\"a\",region=\"r1\"} 1\n"), "{text}");
        assert!(text.contains("meridian_node_remote_commit_lag_seconds{node=\"a\",region=\"r1\"} 7.25\n"), "{text}");
        assert!(text.contains("meridian_cluster_epoch{cluster=\"lab\"} 3\n"));
        assert!(text.contains("meridian_cluster_sync_vouched_standbys{cluster=\"lab\"} 1\n"), "{text}");
        assert!(text.contains("meridian_node_role{node=\"a\",region=\"r1\",role=\"primary\"} 1\n"));
        assert!(text.contains("meridian_node_role{node=\"a\",region=\"r1\",role=\"replica\"} 0\n"));
        assert!(text.contains("meridian_node_lag_bytes{node=\"a\",region=\"r1\"} 0\n"));
        assert!(text.contains("meridian_node_healthy{node=\"a\",region=\"r1\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
