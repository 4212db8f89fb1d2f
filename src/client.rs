//! The CLI's HTTP client: tries each region's gateway in turn, so the CLI works
//! as long as any region with a gateway and an etcd quorum is reachable.
//!
//! Reads and verify may be repeated on the next gateway whatever went wrong.
//! Operator actions (switchover, failover) move on to the next gateway only
//! when the previous one could not even be connected to: once a gateway has
//! the request it may have started the action, and it must not run twice.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Config;

pub struct ApiClient {
    gateways: Vec<(String, SocketAddr)>,
}

/// Whether a failed request may have reached the gateway.
enum Failure {
    NotConnected(anyhow::Error),
    Sent(anyhow::Error),
}

impl ApiClient {
    pub fn new(config: &Config) -> ApiClient {
        ApiClient { gateways: config.regions.iter().map(|r| (r.name.clone(), r.gateway.api)).collect() }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<T> {
        self.call(Method::GET, path, None, timeout, true).await
    }

    /// A POST that may safely be repeated on another gateway (verify).
    pub async fn post<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B, timeout: Duration) -> Result<T> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?), timeout, true).await
    }

    /// An operator action: handed to exactly one gateway.
    pub async fn act<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B, timeout: Duration) -> Result<T> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?), timeout, false).await
    }

    /// The first gateway that answers decides; one that is unreachable or (for a
    /// repeatable request) cannot see etcd (503) is skipped. A 4xx is the
    /// caller's mistake and is returned as is.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        repeatable: bool,
    ) -> Result<T> {
        let mut failures = Vec::new();
        for (region, addr) in &self.gateways {
            let failed = match exchange(*addr, method.clone(), path, body.clone(), timeout).await {
                Ok((status, bytes)) if status.is_success() => {
                    return serde_json::from_slice(&bytes)
                        .with_context(|| format!("decode the answer of gateway {region} ({addr})"));
                }
                Ok((status, bytes)) if status.is_client_error() => bail!("{}", api_error(&bytes)),
                Ok((_, bytes)) => Failure::Sent(anyhow::anyhow!("{}", api_error(&bytes))),
                Err(f) => f,
            };
            match failed {
                Failure::NotConnected(e) => failures.push(format!("{region} ({addr}): {e:#}")),
                Failure::Sent(e) if repeatable => failures.push(format!("{region} ({addr}): {e:#}")),
                Failure::Sent(e) => {
                    bail!("{path} failed on gateway {region} ({addr}); not retried elsewhere, so that it cannot run twice: {e:#}")
                }
            }
        }
        bail!("no gateway could answer {path}: {}", failures.join("; "))
    }
}

fn api_error(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// One HTTP/1.1 request on a fresh connection, with a deadline for the whole exchange.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes)> {
    exchange(addr, method, path, body, timeout).await.map_err(|f| match f {
        Failure::NotConnected(e) | Failure::Sent(e) => e,
    })
}

async fn exchange(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), Failure> {
    let connect_timeout = Duration::from_secs(1).min(timeout);
    let stream = match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(Failure::NotConnected(anyhow::Error::new(e).context("connect"))),
        Err(_) => return Err(Failure::NotConnected(anyhow::anyhow!("connect timed out"))),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| Failure::NotConnected(e.into()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req =
        req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| Failure::NotConnected(e.into()))?;
    let answered = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    };
    match tokio::time::timeout(timeout, answered).await {
        Ok(r) => r.map_err(Failure::Sent),
        Err(_) => Err(Failure::Sent(anyhow::anyhow!("no answer within {timeout:?}"))),
    }
}
