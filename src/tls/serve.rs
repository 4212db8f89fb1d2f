//! HTTPS for an axum router: a TLS handshake per accepted connection (with a
//! deadline, so a silent client holds nothing), then hyper's HTTP/1.1 on top.
//! Each request carries the `Peer` it came from (address, and the common name
//! of its client certificate if it sent one), for authentication and the audit log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{client, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// How long a client has to finish the TLS handshake, and then to send its headers.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long open connections get to finish after shutdown is asked for.
const DRAIN: Duration = Duration::from_secs(5);

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The common name of the client certificate, verified against the cluster CA.
    pub cert_name: Option<String>,
}

pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: axum::Router,
    shutdown: CancellationToken,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let mut connections = JoinSet::new();
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("accept on {:?}: {e}", listener.local_addr().ok());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let (acceptor, router, shutdown) = (acceptor.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                // Closed before saying anything: a TCP liveness probe (the standbys'
                // check of a leader's API, a load balancer's). Every second, forever:
                // not worth a log line.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!("a connection from {addr} closed before its TLS handshake");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::info!("refused a TLS connection from {addr}: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!("refused a connection from {addr}: no TLS handshake within {HANDSHAKE:?}");
                    return;
                }
            };
            let cert_name = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(super::common_name);
            let service = TowerToHyperService::new(router.layer(axum::Extension(Peer { addr, cert_name })));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await;
    Ok(())
}

/// A verified TLS connection to `addr`: the server's certificate must come
/// from the cluster CA and name the address as a SAN.
pub async fn connect(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    timeout: Duration,
) -> Result<client::TlsStream<TcpStream>> {
    let connected = async {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        TlsConnector::from(tls.clone())
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .context("TLS handshake")
    };
    tokio::time::timeout(timeout, connected)
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out after {timeout:?}"))?
}

/// What a server's certificate says, as it presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Hex, `ab:cd:…`.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// The certificate a server presents, verified against `tls`'s roots by
/// address; `postgres` first asks for TLS the way PostgreSQL clients do
/// (SSLRequest, then 'S').
pub async fn served_certificate(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    postgres: bool,
    timeout: Duration,
) -> Result<Served> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = async {
        let mut tcp = TcpStream::connect(addr).await.context("connect")?;
        if postgres {
            const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
            tcp.write_all(&SSL_REQUEST).await.context("send SSLRequest")?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).await.context("read the answer to SSLRequest")?;
            anyhow::ensure!(answer[0] == b'S', "the server does not offer TLS (answered {:?})", answer[0] as char);
        }
        let stream = TlsConnector::from(tls.clone())
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .context("TLS handshake")?;
        let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).context("no certificate")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).context("parse the certificate")?;
        Ok(Served { serial: parsed.raw_serial_as_string(), not_after: parsed.validity().not_after.timestamp() })
    };
    tokio::time::timeout(timeout, served).await.map_err(|_| anyhow::anyhow!("no TLS handshake within {timeout:?}"))?
}
