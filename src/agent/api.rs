//! The agent's HTTPS API: liveness and the node's latest report. Read-only:
//! nothing here runs a command or changes a setting, so it asks callers for
//! no credential; TLS (the node's certificate) keeps the report private on the wire.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::MemberStatus;

pub async fn serve(
    listener: TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    latest: watch::Receiver<Option<MemberStatus>>,
    shutdown: CancellationToken,
) {
    let app =
        Router::new().route("/healthz", get(|| async { "ok\n" })).route("/v1/member", get(member)).with_state(latest);
    if let Err(e) = crate::tls::serve_https(listener, tls, app, shutdown).await {
        tracing::error!("agent API stopped: {e}");
    }
}

async fn member(State(latest): State<watch::Receiver<Option<MemberStatus>>>) -> Response {
    match latest.borrow().clone() {
        Some(m) => Json(m).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no report yet\n").into_response(),
    }
}
