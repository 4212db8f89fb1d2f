//! The CLI's HTTP client: tries each region's gateway in turn, so the CLI works
//! as long as any region with a gateway and an etcd quorum is reachable.

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

impl ApiClient {
    pub fn new(config: &Config) -> ApiClient {
        ApiClient { gateways: config.regions.iter().map(|r| (r.name.clone(), r.gateway.api)).collect() }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<T> {
        self.call(Method::GET, path, None, timeout).await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B, timeout: Duration) -> Result<T> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?), timeout).await
    }

    /// The first gateway that answers decides; one that is unreachable or cannot
    /// see etcd (503) is skipped. A 4xx is the caller's mistake and is returned as is.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T> {
        let mut failures = Vec::new();
        for (region, addr) in &self.gateways {
            match request(*addr, method.clone(), path, body.clone(), timeout).await {
                Ok((status, bytes)) if status.is_success() => {
                    return serde_json::from_slice(&bytes)
                        .with_context(|| format!("decode the answer of gateway {region} ({addr})"));
                }
                Ok((status, bytes)) => {
                    let msg = api_error(&bytes);
                    if status.is_client_error() {
                        bail!("{msg}");
                    }
                    failures.push(format!("{region} ({addr}): {msg}"));
                }
                Err(e) => failures.push(format!("{region} ({addr}): {e:#}")),
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
    let exchange = async {
        let stream = tokio::time::timeout(Duration::from_secs(1).min(timeout), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))?
            .context("connect")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
}
