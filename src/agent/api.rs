//! The agent's HTTP API: liveness and the node's latest report.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::MemberStatus;

pub async fn serve(listener: TcpListener, latest: watch::Receiver<Option<MemberStatus>>, shutdown: CancellationToken) {
    let app =
        Router::new().route("/healthz", get(|| async { "ok\n" })).route("/v1/member", get(member)).with_state(latest);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!("agent API stopped: {e}");
    }
}

async fn member(State(latest): State<watch::Receiver<Option<MemberStatus>>>) -> Response {
    match latest.borrow().clone() {
        Some(m) => Json(m).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no report yet\n").into_response(),
    }
}
