//! The CLI's HTTPS client: tries each region's gateway in turn, so the CLI works
//! as long as any region with a gateway and an etcd quorum is reachable.
//! Every gateway must present a certificate from the cluster CA
//! (`[tls] ca_file`) naming its address; the token goes as `Authorization: Bearer`.
//!
//! The token comes from, in order: `--token-file FILE`, `$MERIDIAN_TOKEN`,
//! the cluster file's `[api] token_file`. A token file must not be readable
//! by others. There is deliberately no `--token TOKEN`: a secret on the
//! command line is visible to every user in `ps` and stays in shell history.
//!
//! Reads and verify may be repeated on the next gateway whatever went wrong.
//! Operator actions (switchover, failover) move on to the next gateway only
//! when the previous one could not even be connected to: once a gateway has
//! the request it may have started the action, and it must not run twice.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Config;

/// The environment variable a token may come in.
pub const TOKEN_ENV: &str = "MERIDIAN_TOKEN";

static TOKEN_FILE: OnceLock<PathBuf> = OnceLock::new();

/// The global `--token-file`, set once at start.
pub fn set_token_file(path: PathBuf) {
    let _ = TOKEN_FILE.set(path);
}

/// The token to send, if any (see the module's documentation for the order).
pub fn token(config: &Config) -> Result<Option<String>> {
    if let Some(path) = TOKEN_FILE.get() {
        return read_token_file(path).map(Some);
    }
    if let Ok(t) = std::env::var(TOKEN_ENV) {
        return Ok(Some(t.trim().to_string()));
    }
    match &config.api.token_file {
        Some(p) => read_token_file(&config.resolve(p)).map(Some),
        None => Ok(None),
    }
}

fn read_token_file(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("read the token file {}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "token file {} is readable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read the token file {}", path.display()))?;
    Ok(text.trim().to_string())
}

pub struct ApiClient {
    gateways: Vec<(String, SocketAddr)>,
    https: Https,
}

/// How to reach meridian's HTTPS listeners: the CA that must have signed
/// them, and the token to present, if any.
#[derive(Clone)]
pub struct Https {
    pub tls: Arc<rustls::ClientConfig>,
    pub token: Option<String>,
}

impl Https {
    /// As the CLI: trusting the cluster CA, with the caller's token.
    pub fn for_cli(config: &Config) -> Result<Https> {
        Ok(Https { tls: crate::tls::client_config(&config.tls_ca_file(), None)?, token: token(config)? })
    }
}

/// Whether a failed request may have reached the gateway.
enum Failure {
    NotConnected(anyhow::Error),
    Sent(anyhow::Error),
}

impl ApiClient {
    pub fn new(config: &Config) -> Result<ApiClient> {
        Ok(ApiClient {
            gateways: config.regions.iter().map(|r| (r.name.clone(), r.gateway.api)).collect(),
            https: Https::for_cli(config)?,
        })
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
            let failed = match exchange(*addr, Some(&self.https), method.clone(), path, body.clone(), timeout).await {
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

/// One HTTP/1.1 request on a fresh connection, with a deadline for the whole
/// exchange: over verified TLS when `https` is given, plain otherwise (a
/// user's `http://` health check).
pub async fn request(
    addr: SocketAddr,
    https: Option<&Https>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes)> {
    exchange(addr, https, method, path, body, timeout).await.map_err(|f| match f {
        Failure::NotConnected(e) | Failure::Sent(e) => e,
    })
}

async fn exchange(
    addr: SocketAddr,
    https: Option<&Https>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), Failure> {
    let connect_timeout = Duration::from_secs(1).min(timeout);
    let handshake = match https {
        Some(h) => {
            let stream = crate::tls::connect(addr, &h.tls, connect_timeout).await.map_err(Failure::NotConnected)?;
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map(|(s, c)| {
                tokio::spawn(c);
                s
            })
        }
        None => {
            let stream = match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Failure::NotConnected(anyhow::Error::new(e).context("connect"))),
                Err(_) => return Err(Failure::NotConnected(anyhow::anyhow!("connect timed out"))),
            };
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map(|(s, c)| {
                tokio::spawn(c);
                s
            })
        }
    };
    let mut sender = handshake.map_err(|e| Failure::NotConnected(e.into()))?;
    let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    if let Some(token) = https.and_then(|h| h.token.as_deref()) {
        req = req.header("authorization", format!("Bearer {token}"));
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
