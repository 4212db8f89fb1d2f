//! The SQL proxy: a writer port that serves the current leader and a reader
//! port that serves a usable standby of the gateway's region (else the
//! leader). It reads the client's startup packet, picks the backend from the
//! gateway's view of etcd, logs the client in itself and then either relays
//! bytes to a server connection of the client's own (`pool_mode =
//! "session"`) or lends it pooled server connections a transaction at a time
//! (`"transaction"`, `pooled`).
//!
//! TLS on both legs: the proxy answers SSLRequest with 'S' and terminates TLS
//! with the gateway's certificate (clients may verify it against the cluster
//! CA, `sslmode=verify-full`, by the gateway's address or `writer.<zone>`); a
//! startup packet without TLS is refused with an error the client shows. It
//! speaks TLS to PostgreSQL too, verifying the node's certificate. A
//! pass-through proxy cannot do that: libpq's default SCRAM channel binding
//! binds the client's proof to the certificate it sees (the proxy's), so
//! the proxy authenticates the client with SCRAM against the role's verifier
//! (`login`) and logs in to the server as the same role with the keys the
//! proof gave. GSSENCRequest gets 'N'; a CancelRequest (pid and key only,
//! which libpq 15 sends without TLS) is passed on. Without TLS configured
//! (routing tests against fake backends) the startup packet goes on as it
//! came and authentication is the backend's business.
//!
//! Fencing rules: writes go only to the leader of the current epoch once it
//! runs as primary; while there is none (a switchover or a failover in
//! progress) new connections wait, up to `proxy.leader_wait`; a gateway whose
//! view of etcd is older than half the lease TTL refuses writer connections
//! rather than guess; and a relay to a node that lost the leadership is cut.

pub mod login;
mod messages;
mod pending;
mod pinning;
pub mod pool;
mod pooled;
mod prepared;
mod scram;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::routing::{self, Backend};
use super::view::View;
use crate::config::{Config, PoolMode};

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3: i32 = 196608;
/// PostgreSQL's own bound on a startup packet.
const MAX_STARTUP_PACKET: usize = 10_000;
/// A client must get through SSL negotiation and its startup packet in this time.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Relay buffers: large enough that bulk results move in few system calls.
const RELAY_BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Writer,
    Reader,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Writer => "writer",
            Port::Reader => "reader",
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct ProxyStats {
    pub relayed: AtomicU64,
    pub refused: AtomicU64,
    pub active: AtomicU64,
    pub cut: AtomicU64,
    pub login_failed: AtomicU64,
    /// Transaction mode: server connections lent to clients (a transaction each, or a pinned session).
    pub transactions: AtomicU64,
    /// Transactions whose server went away under them (the client was told to retry).
    pub lost_transactions: AtomicU64,
    /// Sessions closed because their server went away while pinned or mid-reply.
    pub lost_sessions: AtomicU64,
    /// Sessions pinned to their server connection, by reason (`pinning::Pin::ALL`'s order).
    pub pinned_by: [AtomicU64; pinning::Pin::ALL.len()],
    /// Transaction mode's server connections.
    pub pools: pool::Pools,
    /// Transactions lent a leader's connection whose server has not answered yet (`pooled::Lend`).
    pub leader_lends: AtomicU64,
    /// The same for standbys' connections, by standby.
    pub standby_lends: std::sync::Mutex<std::collections::HashMap<SocketAddr, u64>>,
}

impl ProxyStats {
    fn pinned(&self, pin: pinning::Pin) {
        let i = pinning::Pin::ALL.iter().position(|p| *p == pin).expect("every pin is in ALL");
        self.pinned_by[i].fetch_add(1, Ordering::Relaxed);
    }

    /// (label, sessions pinned for it) for `/metrics`.
    pub fn pinned_counts(&self) -> Vec<(&'static str, u64)> {
        pinning::Pin::ALL.iter().zip(&self.pinned_by).map(|(p, n)| (p.label(), n.load(Ordering::Relaxed))).collect()
    }
}

/// What every connection of one port shares.
pub struct Proxy {
    pub region: String,
    pub port: Port,
    pub view: watch::Receiver<View>,
    pub stats: Arc<ProxyStats>,
    /// Spreads reader connections over the usable standbys.
    next_reader: AtomicUsize,
    /// TLS with the gateway's certificate, required of every client, and the
    /// logins on both legs; None only in tests of routing, which speak plain
    /// to fake backends.
    security: Option<Security>,
    /// Transaction mode: the key each client was given (BackendKeyData) →
    /// the server it holds now, for its cancel requests.
    cancels: std::sync::Mutex<std::collections::HashMap<(i32, i32), Arc<pooled::CancelSlot>>>,
    /// Connections that have not sent their startup packet yet (see `pending`).
    pending: pending::Pending,
}

/// What a proxy needs to speak TLS and SCRAM.
pub struct Security {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub logins: Arc<login::Authenticator>,
}

/// A client connection, plain or TLS (also the server leg once logged in).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

impl Proxy {
    pub fn new(region: String, port: Port, view: watch::Receiver<View>, security: Option<Security>) -> Proxy {
        Proxy {
            region,
            port,
            view,
            stats: Arc::default(),
            next_reader: AtomicUsize::new(0),
            security,
            cancels: Default::default(),
            pending: Default::default(),
        }
    }

    /// The cluster file in force (see `view`).
    fn config(&self) -> Arc<Config> {
        self.view.borrow().config.clone()
    }

    /// Accepts connections until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
        loop {
            let (client, peer) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!("failed to accept a {} connection: {e}", self.port.name());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(entry) = self.pending.enter(peer.ip()) else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "closed a {} connection from {peer}: too many from there without a startup packet",
                    self.port.name()
                );
                continue;
            };
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                proxy.stats.active.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = proxy.handle(client, entry, shutdown).await {
                    tracing::debug!("{} connection from {peer}: {e:#}", proxy.port.name());
                }
                proxy.stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn handle(&self, client: TcpStream, entry: pending::Entry, shutdown: CancellationToken) -> Result<()> {
        client.set_nodelay(true)?;
        let (mut client, startup) = match tokio::time::timeout(
            STARTUP_TIMEOUT,
            read_startup(client, self.security.as_ref().map(|s| &s.acceptor)),
        )
        .await
        {
            Ok(Ok(Some(pair))) => pair,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("no startup packet within {STARTUP_TIMEOUT:?}"),
        };
        drop(entry);
        if startup.is_cancel {
            self.forward_cancel(&startup.bytes).await;
            return Ok(());
        }
        let config = self.config();
        // Clients past their startup packet: those still without one are bounded apart.
        let clients = self.stats.active.load(Ordering::Relaxed).saturating_sub(self.pending.total() as u64);
        if clients > config.proxy.max_client_conn as u64 {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let msg = format!(
                "meridian {}: too many client connections (proxy.max_client_conn = {})",
                self.port.name(),
                config.proxy.max_client_conn
            );
            client.write_all(&error_response("53300", &msg)).await?;
            return Ok(());
        }
        let mut backend = match self.pick().await {
            Ok(b) => b,
            Err(why) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!("refused a {} connection: {why}", self.port.name());
                client.write_all(&error_response("57P03", &format!("meridian {}: {why}", self.port.name()))).await?;
                return Ok(());
            }
        };
        if let (Some(security), PoolMode::Transaction) = (&self.security, config.proxy.pool_mode) {
            return self.pooled(&security.logins, client, &startup, &mut backend, shutdown).await;
        }
        let server: Box<dyn ClientStream> = match &self.security {
            Some(security) => match self.log_in(&security.logins, &mut client, &startup, &mut backend).await? {
                Some(server) => Box::new(server),
                None => return Ok(()),
            },
            None => match self.connect_plain(&mut client, &startup, &backend).await? {
                Some(server) => Box::new(server),
                None => return Ok(()),
            },
        };
        self.relay(client, server, &backend, shutdown).await
    }

    /// Logs the client in and the proxy in to `backend` as the same role;
    /// `None` when the client was refused (and told why).
    async fn log_in(
        &self,
        logins: &login::Authenticator,
        client: &mut Box<dyn ClientStream>,
        startup: &Startup,
        backend: &mut Backend,
    ) -> Result<Option<login::ServerStream>> {
        let port = self.port.name();
        let Some(params) = self.startup_params(client, startup).await? else { return Ok(None) };
        let Some(verifier) = self.look_up(logins, client, &params, backend).await? else { return Ok(None) };
        let why = match verifier {
            Some(_) => "wrong password or a protocol error",
            None => "no SCRAM password the proxy may use: no such role, not LOGIN, a superuser, a replication role, one of meridian's, past VALID UNTIL, or an MD5 password",
        };
        let login =
            logins.login(client.as_mut(), startup.encrypted, &startup.bytes, &params, verifier, backend.address);
        match tokio::time::timeout(STARTUP_TIMEOUT, login).await {
            Ok(Ok((server, finish))) => {
                client.write_all(&finish).await.context("finish the client's login")?;
                Ok(Some(server))
            }
            Ok(Err(login::Refused::Client(message))) => {
                self.stats.login_failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!("refused a {port} login as {:?} to {}: {why}", params.user, backend.node);
                client.write_all(&message).await?;
                Ok(None)
            }
            Ok(Err(login::Refused::Gone(e))) => Err(e),
            Err(_) => bail!("the login did not finish within {STARTUP_TIMEOUT:?}"),
        }
    }

    /// The startup packet's parameters, or None when the client was refused (and told why).
    async fn startup_params(
        &self,
        client: &mut Box<dyn ClientStream>,
        startup: &Startup,
    ) -> Result<Option<login::StartupParams>> {
        let port = self.port.name();
        match login::StartupParams::parse(&startup.bytes) {
            Ok(p) if !p.replication => Ok(Some(p)),
            Ok(_) => {
                let msg =
                    format!("meridian {port}: the proxy does not carry replication connections; connect to a node");
                client.write_all(&error_response("08P01", &msg)).await?;
                Ok(None)
            }
            Err(e) => {
                client.write_all(&error_response("08P01", &format!("meridian {port}: {e:#}"))).await?;
                Ok(None)
            }
        }
    }

    /// The client's SCRAM verifier (`Some(None)`: the role may not log in
    /// here); None when the lookup failed and the client was told.
    async fn look_up(
        &self,
        logins: &login::Authenticator,
        client: &mut Box<dyn ClientStream>,
        params: &login::StartupParams,
        backend: &mut Backend,
    ) -> Result<Option<Option<scram::Verifier>>> {
        let port = self.port.name();
        // A backend that is stopping or starting (a switchover's old primary
        // before this gateway's view shows the request) is asked again once
        // the view changes, within `leader_wait`, as `pick` waits for a leader.
        let deadline = tokio::time::Instant::now() + self.config().proxy.leader_wait;
        let looked_up = loop {
            match logins.verifier(backend.address, &params.user, self.port == Port::Writer).await {
                Err(e) if passing(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(
                        "{} cannot look up logins now ({e:#}); waiting for the view to change",
                        backend.node
                    );
                    let mut view = self.view.clone();
                    tokio::select! {
                        _ = view.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    match self.pick().await {
                        Ok(b) => *backend = b,
                        Err(_) => break Err(e),
                    }
                }
                other => break other,
            }
        };
        match looked_up {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("failed to look up a login on {}: {e:#}", backend.node);
                let msg =
                    format!("meridian {port}: cannot check logins on {} ({}): {e:#}", backend.node, backend.address);
                client.write_all(&error_response("08006", &msg)).await?;
                Ok(None)
            }
        }
    }

    /// Without TLS (routing tests against fake backends): the startup packet
    /// goes on as it came, and authentication is the backend's business.
    async fn connect_plain(
        &self,
        client: &mut Box<dyn ClientStream>,
        startup: &Startup,
        backend: &Backend,
    ) -> Result<Option<TcpStream>> {
        let mut server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.address)).await {
            Ok(Ok(s)) => s,
            failed => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {CONNECT_TIMEOUT:?}"),
                };
                let msg = format!(
                    "meridian {}: cannot reach {} ({}): {why}",
                    self.port.name(),
                    backend.node,
                    backend.address
                );
                client.write_all(&error_response("08006", &msg)).await?;
                return Ok(None);
            }
        };
        server.set_nodelay(true)?;
        server.write_all(&startup.bytes).await.context("send the startup packet")?;
        Ok(Some(server))
    }

    /// Relays both ways until either side closes, the backend loses the
    /// leadership (writer connections are cut), or shutdown.
    async fn relay(
        &self,
        mut client: Box<dyn ClientStream>,
        mut server: Box<dyn ClientStream>,
        backend: &Backend,
        shutdown: CancellationToken,
    ) -> Result<()> {
        self.stats.relayed.fetch_add(1, Ordering::Relaxed);
        let relay = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, RELAY_BUFFER, RELAY_BUFFER);
        tokio::select! {
            r = relay => { r.context("relay")?; }
            _ = self.until_not_leader(backend) => {
                self.stats.cut.fetch_add(1, Ordering::Relaxed);
                tracing::info!("cut a writer connection to {}: it no longer holds the leadership", backend.node);
            }
            _ = shutdown.cancelled() => {}
        }
        Ok(())
    }

    /// The backend for a new connection, waiting (bounded) while there is no writer.
    async fn pick(&self) -> Result<Backend, String> {
        let leader_wait = self.config().proxy.leader_wait;
        let deadline = tokio::time::Instant::now() + leader_wait;
        let mut view = self.view.clone();
        loop {
            let current = view.borrow_and_update().clone();
            let config = &current.config;
            let why =
                match current.routable() {
                    Some(snap) => {
                        if self.port == Port::Reader {
                            let max_lag = config.proxy.max_reader_lag;
                            let readers = routing::readers(config, snap, &self.region, max_lag);
                            if !readers.is_empty() {
                                let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
                                return Ok(readers[i].clone());
                            }
                        }
                        let writer = match config.proxy.pool_mode {
                            PoolMode::Session => routing::writer_for_sessions(config, snap),
                            PoolMode::Transaction => routing::writer(config, snap),
                        };
                        match writer {
                            Ok(b) => return Ok(b),
                            Err(why) => why.to_string(),
                        }
                    }
                    None if self.port == Port::Reader => {
                        // Reads are safe on any standby: use the last known ones.
                        let readers =
                            routing::readers(config, &current.snapshot, &self.region, config.proxy.max_reader_lag);
                        match readers.first() {
                            Some(b) => return Ok(b.clone()),
                            None => return Err("this gateway cannot see etcd and knows no standby".into()),
                        }
                    }
                    None => return Err(
                        "this gateway cannot see etcd, so it cannot know the primary; refusing rather than guessing"
                            .into(),
                    ),
                };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("no primary to route to within {}: {why}", humantime::format_duration(leader_wait)));
                }
                changed = view.changed() => if changed.is_err() { return Err("the gateway is stopping".into()) },
                // Staleness changes without a view change.
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Resolves when `backend`, a leader, is no longer the leader of the current
    /// epoch in a fresh view. Never resolves for standbys.
    async fn until_not_leader(&self, backend: &Backend) {
        if backend.epoch.is_none() {
            return std::future::pending().await;
        }
        let mut view = self.view.clone();
        loop {
            if view.changed().await.is_err() {
                return std::future::pending().await;
            }
            let current = view.borrow_and_update().clone();
            if let Some(snap) = current.routable() {
                let leader = routing::leader_node(&current.config, snap);
                if leader.as_ref().map(|l| (&l.node, l.epoch)) != Some((&backend.node, backend.epoch)) {
                    return;
                }
            }
        }
    }

    /// A cancel request carries only a backend pid and key; the proxy does not
    /// know which node issued them, so it passes it to every node (a node that
    /// did not issue the key ignores it).
    async fn forward_cancel(&self, packet: &[u8]) {
        if packet.len() == 16 {
            let word = |i: usize| i32::from_be_bytes(packet[i..i + 4].try_into().expect("4 bytes"));
            if self.cancel_pooled(word(8), word(12)).await {
                return;
            }
        }
        let nodes: Vec<SocketAddr> = self.config().nodes().map(|(_, n)| n.address).collect();
        let sends = nodes.into_iter().map(|addr| async move {
            if let Ok(Ok(mut s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                let _ = s.write_all(packet).await;
            }
        });
        futures_util::future::join_all(sends).await;
    }
}

/// The client's startup packet, after any SSL/GSSAPI negotiation.
struct Startup {
    bytes: Vec<u8>,
    is_cancel: bool,
    /// The client switched to TLS before sending it.
    encrypted: bool,
}

/// Reads packets until a startup or cancel packet, switching to TLS when the
/// client asks for it; `None` if the client left or was refused.
async fn read_startup(
    client: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Option<(Box<dyn ClientStream>, Startup)>> {
    let mut client: Box<dyn ClientStream> = Box::new(client);
    let mut encrypted = false;
    loop {
        let mut len = [0u8; 4];
        if client.read_exact(&mut len).await.is_err() {
            return Ok(None);
        }
        let len = i32::from_be_bytes(len);
        if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
            bail!("invalid startup packet length {len}");
        }
        let mut bytes = vec![0u8; len as usize];
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        client.read_exact(&mut bytes[4..]).await.context("read the startup packet")?;
        let code = i32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
        match code {
            SSL_REQUEST if !encrypted && tls.is_some() => {
                client.write_all(b"S").await?;
                let acceptor = tls.expect("checked");
                // Nothing the client sent after the request may be read before
                // the handshake: the stream is plain until here.
                client = Box::new(acceptor.accept(client).await.context("TLS handshake")?);
                encrypted = true;
            }
            SSL_REQUEST | GSSENC_REQUEST => client.write_all(b"N").await?,
            CANCEL_REQUEST => return Ok(Some((client, Startup { bytes, is_cancel: true, encrypted }))),
            PROTOCOL_3 if tls.is_some() && !encrypted => {
                let msg = "meridian: this proxy requires TLS (connect with sslmode=require, or verify-full with the cluster CA)";
                client.write_all(&error_response("28000", msg)).await?;
                return Ok(None);
            }
            PROTOCOL_3 => return Ok(Some((client, Startup { bytes, is_cancel: false, encrypted }))),
            other => {
                let msg = format!("meridian: unsupported frontend protocol {}.{}", other >> 16, other & 0xffff);
                client.write_all(&error_response("08P01", &msg)).await?;
                return Ok(None);
            }
        }
    }
}

/// A FATAL ErrorResponse, which libpq shows as the connection error.
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(field);
        body.extend_from_slice(value.replace('\0', " ").as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A lookup error that passes: the server is stopping or starting (a
/// switchover, a restart), refuses connections for a moment, or is a
/// standby where the writer port expected the primary.
fn passing(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    [
        "the database system is shutting down",
        "the database system is starting up",
        "Connection refused",
        "is in recovery",
    ]
    .iter()
    .any(|p| text.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_is_a_well_formed_message() {
        let e = error_response("57P03", "no primary");
        assert_eq!(e[0], b'E');
        let len = i32::from_be_bytes(e[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, e.len() - 1, "length counts itself but not the type byte");
        assert!(e.ends_with(b"no primary\0\0"));
        assert!(e.windows(7).any(|w| w == b"C57P03\0"));
    }
}
