//! The HTTP API: `GET /v1/cluster`, `POST /v1/verify`, `GET /healthz`, `GET /metrics`.
//! Errors are JSON `{"error": "..."}` with a status code, so the CLI can show them as one line.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
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
        .route("/metrics", get(metrics))
        .with_state(gateway)
}

pub async fn serve(listener: TcpListener, gateway: Gateway, shutdown: CancellationToken) -> anyhow::Result<()> {
    axum::serve(listener, router(gateway)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

/// An error as the API returns it.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn unavailable(e: anyhow::Error) -> ApiError {
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

/// Every health check's aggregate and each observer's verdict, from one etcd read.
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct HealthStatus {
    pub healthy_share: f64,
    pub checks: Vec<super::health::aggregate::CheckStatus>,
}

async fn health(State(g): State<Gateway>) -> Result<Json<HealthStatus>, ApiError> {
    let snap = g.coord.snapshot().await.map_err(unavailable)?;
    let checks = super::health::aggregate::aggregate(&g.config.health, &snap.health).into_values().collect();
    Ok(Json(HealthStatus { healthy_share: g.config.health.healthy_share, checks }))
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
    let counters: [(&str, &str, ProxyCounter); 4] = [
        ("meridian_proxy_connections_total", "Connections relayed to a backend.", |s| s.relayed.load(Relaxed)),
        ("meridian_proxy_refused_total", "Connections refused (no backend, no view of etcd).", |s| {
            s.refused.load(Relaxed)
        }),
        ("meridian_proxy_cut_total", "Writer relays cut because the backend lost the leadership.", |s| {
            s.cut.load(Relaxed)
        }),
        ("meridian_proxy_active", "Connections open now.", |s| s.active.load(Relaxed)),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(body, "# HELP {name} {help}");
        let _ = writeln!(body, "# TYPE {name} {}", if name.ends_with("_total") { "counter" } else { "gauge" });
        for (port, stats) in &g.proxy_stats {
            let port = if *port == super::proxy::Port::Writer { "writer" } else { "reader" };
            let _ = writeln!(body, "{name}{{region=\"{}\",port=\"{port}\"}} {}", g.region, value(stats));
        }
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
    let gauges: [(&str, &str, NodeGauge); 3] = [
        ("meridian_node_lag_bytes", "WAL bytes the node has not replayed.", |n| n.lag_bytes.map(|b| b as f64)),
        ("meridian_node_lag_seconds", "Seconds since the last replayed commit, 0 when caught up.", |n| n.lag_seconds),
        ("meridian_node_healthy", "1 when the node is a serving primary or a streaming standby.", |n| {
            Some(f64::from(u8::from(n.healthy)))
        }),
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
            }],
        };
        let text = render_metrics(&s);
        assert!(text.contains("meridian_cluster_epoch{cluster=\"lab\"} 3\n"));
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
