//! The API's door: every request but `/healthz` (and `/metrics` when
//! `[api] metrics_open`) needs a credential — a bearer token checked against
//! its digest in etcd, or a client certificate from the cluster CA whose
//! common name `[api] certificate_roles` maps to a role — and the role its
//! route needs. Missing or bad credentials: 401; too little role: 403; each
//! with one line. Every mutating call that got past authentication is
//! recorded in the audit log (etcd and this gateway's log) with its result.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::api::ApiError;
use super::Gateway;
use crate::auth::{self, ApiRole, AuditEntry, Caller, Denied};
use crate::tls::Peer;

/// Larger request bodies are refused (413): every API body is a few fields.
pub const MAX_BODY: usize = 64 * 1024;
/// How much of an answer is kept to record a failed call's reason.
const MAX_ANSWER: usize = 1 << 20;

/// The role a route needs; None for the open ones.
pub fn required(method: &Method, path: &str, metrics_open: bool) -> Option<ApiRole> {
    match (method, path) {
        (_, "/healthz") => None,
        (_, "/metrics") if metrics_open => None,
        (_, p) if p == "/v1/tokens" || p.starts_with("/v1/tokens/") => Some(ApiRole::Admin),
        (&Method::GET | &Method::HEAD, _) => Some(ApiRole::Viewer),
        // A plan reads: what a file would change.
        (&Method::POST, "/v1/config/plan") => Some(ApiRole::Viewer),
        (
            &Method::POST,
            "/v1/verify" | "/v1/switchover" | "/v1/failover" | "/v1/restart" | "/v1/backups" | "/v1/backups/verify",
        ) => Some(ApiRole::Operator),
        // Anything else that changes something: the highest bar.
        _ => Some(ApiRole::Admin),
    }
}

fn now() -> std::time::Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Who presents what: a bearer token first, else a mapped client certificate.
async fn authenticate(
    g: &Gateway,
    peer: &Peer,
    authorization: Option<header::HeaderValue>,
) -> Result<Caller, Result<Denied, ApiError>> {
    if let Some(value) = authorization {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Ok(Denied::Unauthenticated("the Authorization header must be `Bearer <token>`".into())))?
            .trim();
        let stored = match auth::token_id(token) {
            Some(id) => g.coord.token(id).await.map_err(|e| Err(super::api::unavailable(e)))?,
            None => None,
        };
        return auth::check_token(token, stored.as_ref(), now().as_secs()).map_err(Ok);
    }
    if let Some(name) = &peer.cert_name {
        return match g.config().api.certificate_roles.get(name) {
            Some(role) => Ok(Caller { who: format!("cert:{name}"), role: *role }),
            None => Err(Ok(Denied::Unauthenticated(format!(
                "client certificate {name:?} has no role ([api] certificate_roles) and no token was sent"
            )))),
        };
    }
    Err(Ok(Denied::Unauthenticated(
        "no credentials: send a token (--token-file, $MERIDIAN_TOKEN or [api] token_file) or a client certificate"
            .into(),
    )))
}

fn denied(d: Denied) -> Response {
    match d {
        Denied::Unauthenticated(m) => ApiError(StatusCode::UNAUTHORIZED, m).into_response(),
        Denied::Forbidden(m) => ApiError(StatusCode::FORBIDDEN, m).into_response(),
    }
}

pub async fn middleware(State(g): State<Gateway>, mut req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let Some(needed) = required(&method, &path, g.config().api.metrics_open) else {
        return next.run(req).await;
    };
    let peer = req.extensions().get::<Peer>().cloned();
    let Some(peer) = peer else {
        return ApiError(StatusCode::INTERNAL_SERVER_ERROR, "request without a peer".into()).into_response();
    };
    let what = format!("{method} {path}");
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    let caller = match authenticate(&g, &peer, authorization).await {
        Ok(c) => c,
        Err(Ok(d)) => {
            tracing::info!("refused {what} from {}: {d:?}", peer.addr);
            return denied(d);
        }
        Err(Err(e)) => return e.into_response(),
    };
    let mutating = !matches!(method, Method::GET | Method::HEAD);
    if let Err(d) = auth::authorize(&caller, needed, &what) {
        tracing::info!("refused {what} from {} ({}): {d:?}", peer.addr, caller.who);
        if mutating {
            let result = match &d {
                Denied::Forbidden(m) | Denied::Unauthenticated(m) => format!("refused: {m}"),
            };
            record(&g, &caller, &peer, &what, None, result).await;
        }
        return denied(d);
    }
    req.extensions_mut().insert(caller.clone());
    if !mutating {
        return next.run(req).await;
    }

    // Read the body once, to bound it and to name the action's target.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {} KiB", MAX_BODY / 1024))
                .into_response()
        }
    };
    let target = target_of(&path, &bytes);
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;

    let status = response.status();
    let (parts, body) = response.into_parts();
    let answer = axum::body::to_bytes(body, MAX_ANSWER).await.unwrap_or_default();
    let result = if status.is_success() {
        "ok".to_string()
    } else {
        let reason = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).trim().to_string());
        format!("{}: {reason}", status.as_u16())
    };
    record(&g, &caller, &peer, &what, target, result).await;
    Response::from_parts(parts, Body::from(answer))
}

/// What a call is about: the node, region or token named in its path or body.
fn target_of(path: &str, body: &[u8]) -> Option<String> {
    if let Some(id) = path.strip_prefix("/v1/tokens/").and_then(|r| r.split('/').next()) {
        return Some(format!("token:{id}"));
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    ["to", "node", "region", "role"].iter().find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(|s| format!("{k}:{s}")))
}

/// Writes one audit entry to this gateway's log and to etcd.
async fn record(g: &Gateway, caller: &Caller, peer: &Peer, action: &str, target: Option<String>, result: String) {
    let epoch = g.coord.snapshot().await.ok().map(|s| s.epoch);
    let entry = AuditEntry {
        time_ms: now().as_millis() as u64,
        who: caller.who.clone(),
        role: Some(caller.role),
        source: Some(peer.addr.to_string()),
        action: action.to_string(),
        target,
        result,
        detail: None,
        epoch,
        recorded_by: format!("gateway:{}", g.region),
    };
    audit(g, &entry).await;
}

pub async fn audit(g: &Gateway, entry: &AuditEntry) {
    tracing::info!(target: "meridian::audit", "{}", serde_json::to_string(entry).unwrap_or_default());
    if let Err(e) = g.coord.append_audit(entry).await {
        tracing::warn!("could not record the audit entry above in etcd: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_a_role_except_health_and_optionally_metrics() {
        assert_eq!(required(&Method::GET, "/healthz", false), None);
        assert_eq!(required(&Method::GET, "/metrics", false), Some(ApiRole::Viewer));
        assert_eq!(required(&Method::GET, "/metrics", true), None);
        assert_eq!(required(&Method::GET, "/v1/cluster", false), Some(ApiRole::Viewer));
        assert_eq!(required(&Method::GET, "/v1/audit", false), Some(ApiRole::Viewer));
        for p in ["/v1/switchover", "/v1/failover", "/v1/restart", "/v1/verify"] {
            assert_eq!(required(&Method::POST, p, false), Some(ApiRole::Operator), "{p}");
        }
        assert_eq!(required(&Method::GET, "/v1/tokens", false), Some(ApiRole::Admin));
        // A plan only reads; publishing a cluster file is the highest bar.
        assert_eq!(required(&Method::POST, "/v1/config/plan", false), Some(ApiRole::Viewer));
        assert_eq!(required(&Method::POST, "/v1/config", false), Some(ApiRole::Admin));
        assert_eq!(required(&Method::POST, "/v1/tokens/abc/revoke", false), Some(ApiRole::Admin));
        assert_eq!(required(&Method::POST, "/v1/anything-new", false), Some(ApiRole::Admin));
        assert_eq!(required(&Method::DELETE, "/v1/cluster", false), Some(ApiRole::Admin));
    }

    #[test]
    fn the_target_comes_from_the_path_or_the_body() {
        assert_eq!(target_of("/v1/tokens/0123/revoke", b""), Some("token:0123".into()));
        assert_eq!(target_of("/v1/switchover", br#"{"to":"b1","timeout_ms":5}"#), Some("to:b1".into()));
        assert_eq!(target_of("/v1/failover", br#"{"region":"eu"}"#), Some("region:eu".into()));
        assert_eq!(target_of("/v1/restart", br#"{"node":"b1","reason":"x"}"#), Some("node:b1".into()));
        assert_eq!(target_of("/v1/verify", br#"{"timeout_ms":5}"#), None);
        assert_eq!(target_of("/v1/verify", b"not json"), None);
    }
}
