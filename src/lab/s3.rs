//! The lab's S3 server: moto, behind a TLS front with a certificate from the
//! lab's CA (`meridian lab s3`, one process in the lab's view).
//!
//! moto's server (werkzeug) closes every connection after its response
//! without a TLS close_notify, and pgBackRest 2.45 (OpenSSL 3) takes that for
//! an attack ("unexpected eof while reading") and gives up. So moto listens
//! in plain HTTP on loopback only, as this process's child, and this front
//! terminates TLS: it forwards bytes both ways and, when moto closes, closes
//! the TLS session properly. Nothing else is changed on the way.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::postgres::spawner::Spawner;
use crate::tls::{ClientAuth, Identity};

/// moto's own (plain) port, beside the front's: loopback only, never given to clients.
pub fn upstream_port(port: u16) -> u16 {
    port + 1000
}

/// Runs moto on `upstream_port(port)` and the TLS front on `127.0.0.1:port`
/// (and on `also:port`: the netns lab's observer link) until `shutdown`.
pub async fn serve(
    port: u16,
    also: Option<std::net::IpAddr>,
    identity: &Identity,
    python: &Path,
    shutdown: CancellationToken,
) -> Result<()> {
    let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port(port)));
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    let second = match also {
        Some(ip) => {
            let addr = SocketAddr::new(ip, port);
            Some(TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?)
        }
        None => None,
    };
    let accept_second = async |l: &Option<TcpListener>| match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    };
    let tls = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(identity, ClientAuth::None)?);
    let mut cmd = std::process::Command::new(python);
    cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &upstream.port().to_string()]);
    // moto dies with this process, whatever kills it.
    let mut moto =
        Spawner::start().spawn(cmd).await.with_context(|| format!("start moto with {}", python.display()))?;
    tracing::info!("S3 (moto, pid {}) on {upstream}, TLS front on {listen}", moto.id());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = async { tokio::select! { a = listener.accept() => a, a = accept_second(&second) => a } } => {
                let Ok((client, peer)) = accepted else { continue };
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(client, tls, upstream).await {
                        tracing::debug!("S3 connection from {peer}: {e:#}");
                    }
                });
            }
        }
        if let Ok(Some(status)) = moto.try_wait() {
            anyhow::bail!("moto exited ({status})");
        }
    }
    let _ = moto.kill();
    let _ = moto.wait();
    Ok(())
}

async fn relay(client: TcpStream, tls: tokio_rustls::TlsAcceptor, upstream: SocketAddr) -> Result<()> {
    let mut client = tokio::time::timeout(Duration::from_secs(10), tls.accept(client))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let mut moto = TcpStream::connect(upstream).await.with_context(|| format!("connect to moto on {upstream}"))?;
    // Ends when both sides are done; shutting the TLS side down sends close_notify.
    tokio::io::copy_bidirectional(&mut client, &mut moto).await.context("relay")?;
    Ok(())
}
