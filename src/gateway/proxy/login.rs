//! Logging a client in at the proxy, then the proxy in at PostgreSQL, so that
//! both legs can be TLS. The client's SCRAM verifier comes from the node the
//! connection goes to, through `meridian_auth.scram_verifier(name)` (the one
//! thing `postgres.auth_user` may run); the proxy checks the client's proof
//! with it, keeps the ClientKey the proof reveals, and signs its own login to
//! PostgreSQL with that key over a verified TLS connection, bound to the
//! server's certificate. No password is stored or seen anywhere.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use rand::RngCore;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::scram::{self, ClientExchange, ScramError, ServerExchange, Verifier};
use super::{error_response, ClientStream, SSL_REQUEST};
use crate::config::{Config, Secrets};
use crate::tls::{PgTls, Reloading};

/// SASL messages are a few hundred bytes; anything far larger is not one.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;
const LOOKUP: &str = "SELECT meridian_auth.scram_verifier($1), pg_is_in_recovery()";
/// A lookup on a hung server must not hold the client's connection for ever.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What logs in to a server as a client that proved itself: its startup
/// packet and the ClientKey its SCRAM proof revealed (kept in memory only).
#[derive(Clone)]
pub struct Credentials {
    pub startup: Vec<u8>,
    pub client_key: [u8; 32],
    pub verifier: Verifier,
}

/// A server stream after login, TLS to PostgreSQL.
pub type ServerStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The parameters of a startup packet the proxy needs.
#[derive(Debug, PartialEq, Eq)]
pub struct StartupParams {
    pub user: String,
    pub replication: bool,
    /// The database (the user's name when not given, as PostgreSQL does).
    pub database: String,
    /// Every other parameter (options, client_encoding, ...), sorted, without
    /// `application_name`: what a pooled server connection must have been started with.
    pub settings: Vec<(String, String)>,
}

impl StartupParams {
    /// From a protocol 3 startup packet (length, version, then name/value pairs).
    pub fn parse(packet: &[u8]) -> Result<StartupParams> {
        let mut fields = packet.get(8..).unwrap_or_default().split(|b| *b == 0);
        let (mut user, mut replication, mut database, mut settings) = (None, false, None, Vec::new());
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            if k.is_empty() {
                break;
            }
            let text = || String::from_utf8(v.to_vec()).context("a startup parameter is not UTF-8");
            match k {
                b"user" => user = Some(text()?),
                b"database" => database = Some(text()?),
                b"replication" => replication = !matches!(v, b"false" | b"off" | b"no" | b"0"),
                b"application_name" => {}
                _ => settings.push((String::from_utf8_lossy(k).into_owned(), text()?)),
            }
        }
        let user = user.filter(|u| !u.is_empty()).ok_or_else(|| anyhow!("the startup packet names no user"))?;
        settings.sort();
        let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        Ok(StartupParams { user, replication, database, settings })
    }
}

/// How a login through the proxy ended, when it did not succeed.
#[derive(Debug)]
pub enum Refused {
    /// Tell the client this (a FATAL ErrorResponse, ready to send) and close.
    Client(Vec<u8>),
    /// The client broke off or broke the protocol: close without a word.
    Gone(anyhow::Error),
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Refused {
        Refused::Gone(e)
    }
}

/// What every login of one gateway's proxies shares.
pub struct Authenticator {
    user: String,
    password: String,
    /// The lookup connections: the gateway's certificate, as pg_hba asks.
    lookup_tls: PgTls,
    /// Logins to PostgreSQL: the cluster CA, no client certificate (the
    /// client's own role logs in, not the gateway).
    server_tls: tokio_rustls::TlsConnector,
    /// The certificate the proxy presents, for channel binding.
    certificate: Option<Arc<Reloading>>,
    /// Makes mock salts for unknown users stable within this process.
    mock_secret: [u8; 32],
    /// One lookup connection per node, made on first use.
    lookups: Mutex<HashMap<SocketAddr, Arc<tokio_postgres::Client>>>,
}

impl Authenticator {
    pub fn new(
        config: &Config,
        secrets: &Secrets,
        lookup_tls: PgTls,
        ca: &std::path::Path,
        certificate: Option<Arc<Reloading>>,
    ) -> Result<Authenticator> {
        let client = crate::tls::client_config(ca, None)?;
        let mut mock_secret = [0u8; 32];
        rand::rng().fill_bytes(&mut mock_secret);
        Ok(Authenticator {
            user: config.postgres.auth_user.clone(),
            password: secrets.auth_password.clone(),
            lookup_tls,
            server_tls: tokio_rustls::TlsConnector::from(client),
            certificate,
            mock_secret,
            lookups: Mutex::default(),
        })
    }

    /// The SCRAM verifier of `user` on the node at `node`, or `None` when the
    /// role may not log in through the proxy.
    /// With `writable`, a node in recovery (a standby: an old primary restarted
    /// as one before the gateway's view shows it) is an error: the writer
    /// port logs nobody in to a server that cannot take writes.
    pub async fn verifier(&self, node: SocketAddr, user: &str, writable: bool) -> Result<Option<Verifier>> {
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.look_up(node, user, writable)).await {
            Ok(found) => found,
            Err(_) => {
                // Whatever the connection waits on, the next login starts afresh.
                self.lookups.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
                bail!("no answer within {LOOKUP_TIMEOUT:?}")
            }
        }
    }

    async fn look_up(&self, node: SocketAddr, user: &str, writable: bool) -> Result<Option<Verifier>> {
        let cached = self.lookups.lock().unwrap_or_else(|p| p.into_inner()).get(&node).cloned();
        let client = match cached {
            Some(c) if !c.is_closed() => c,
            _ => self.connect_lookup(node).await?,
        };
        let row = match client.query_opt(LOOKUP, &[&user]).await {
            Ok(row) => row,
            // The node restarted since: one fresh connection, then give up.
            Err(_) if client.is_closed() => self.connect_lookup(node).await?.query_opt(LOOKUP, &[&user]).await?,
            Err(e) => return Err(e).context("look up the login"),
        };
        if writable && row.as_ref().is_some_and(|r| r.get::<_, bool>(1)) {
            bail!("{node} is in recovery: a standby, not the primary");
        }
        let text: Option<String> = row.and_then(|r| r.get(0));
        Ok(text.as_deref().and_then(Verifier::parse))
    }

    async fn connect_lookup(&self, node: SocketAddr) -> Result<Arc<tokio_postgres::Client>> {
        let mut c = tokio_postgres::Config::new();
        c.host(node.ip().to_string())
            .port(node.port())
            .user(&self.user)
            .password(&self.password)
            .dbname("postgres")
            .application_name("meridian-proxy-auth")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(3));
        let (client, conn) = c
            .connect(self.lookup_tls.0.clone())
            .await
            .with_context(|| format!("connect as {} to look up logins", self.user))?;
        tokio::spawn(conn);
        let client = Arc::new(client);
        self.lookups.lock().unwrap_or_else(|p| p.into_inner()).insert(node, client.clone());
        Ok(client)
    }

    /// Authenticates the client with `verifier` (a mock when `None`) and, when
    /// its proof holds, logs in to `node` as the same role. Returns the server
    /// stream with AuthenticationOk consumed, and the messages that finish the
    /// client's login (SASL final and AuthenticationOk), to send before relaying.
    pub async fn login(
        &self,
        client: &mut dyn ClientStream,
        encrypted: bool,
        startup: &[u8],
        params: &StartupParams,
        verifier: Option<Verifier>,
        node: SocketAddr,
    ) -> Result<(ServerStream, Vec<u8>), Refused> {
        let (credentials, finish) = self.authenticate(client, encrypted, startup, params, verifier).await?;
        let server = self.server_side(node, &credentials).await?;
        Ok((server, finish))
    }

    /// Authenticates the client with `verifier` (a mock when `None`): what
    /// logs in as it to a server, and the messages that finish its login
    /// (SASL final and AuthenticationOk).
    pub async fn authenticate(
        &self,
        client: &mut dyn ClientStream,
        encrypted: bool,
        startup: &[u8],
        params: &StartupParams,
        verifier: Option<Verifier>,
    ) -> Result<(Credentials, Vec<u8>), Refused> {
        let refused = || {
            let msg = format!("password authentication failed for user \"{}\"", params.user);
            Refused::Client(error_response("28P01", &msg))
        };
        let known = verifier.is_some();
        let verifier = verifier.unwrap_or_else(|| Verifier::mock(&self.mock_secret, &params.user));
        let proven = match self.client_side(client, encrypted, verifier.clone()).await? {
            Ok(p) if known => p,
            Ok(_) | Err(ScramError::Refused) => return Err(refused()),
            Err(e @ ScramError::Protocol(_)) => return Err(Refused::Client(error_response("08P01", &e.to_string()))),
        };
        let mut finish = auth_message(AUTH_SASL_FINAL, proven.server_final.as_bytes());
        finish.extend(auth_message(0, b""));
        Ok((Credentials { startup: startup.to_vec(), client_key: proven.client_key, verifier }, finish))
    }

    /// Logs in to `node` as the client `credentials` came from (the pooler's server connections).
    pub async fn log_in_as(&self, node: SocketAddr, credentials: &Credentials) -> Result<ServerStream, Refused> {
        self.server_side(node, credentials).await
    }

    /// The SCRAM exchange with the client; `Ok(Err)` when it failed in a way
    /// the client is told of.
    async fn client_side(
        &self,
        client: &mut dyn ClientStream,
        encrypted: bool,
        verifier: Verifier,
    ) -> Result<Result<scram::Proven, ScramError>, Refused> {
        let end_points: Vec<Vec<u8>> = match (&self.certificate, encrypted) {
            (Some(cert), true) => cert.recent().iter().filter_map(|c| scram::end_point(c)).collect(),
            _ => Vec::new(),
        };
        let mut mechanisms = Vec::new();
        if !end_points.is_empty() {
            mechanisms.extend_from_slice(scram::SCRAM_PLUS.as_bytes());
            mechanisms.push(0);
        }
        mechanisms.extend_from_slice(scram::SCRAM.as_bytes());
        mechanisms.extend_from_slice(&[0, 0]);
        client.write_all(&auth_message(AUTH_SASL, &mechanisms)).await.context("send AuthenticationSASL")?;
        let initial = read_password_message(client).await?;
        let Some((mechanism, first)) = split_initial_response(&initial) else {
            return Ok(Err(ScramError::Protocol("malformed SASLInitialResponse".into())));
        };
        let (exchange, server_first) = match ServerExchange::start(verifier, &mechanism, first, &end_points) {
            Ok(pair) => pair,
            Err(e) => return Ok(Err(e)),
        };
        client
            .write_all(&auth_message(AUTH_SASL_CONTINUE, server_first.as_bytes()))
            .await
            .context("send AuthenticationSASLContinue")?;
        let last = read_password_message(client).await?;
        Ok(exchange.finish(&last))
    }

    /// Connects to `node` over verified TLS and logs in with `client_key`.
    async fn server_side(&self, node: SocketAddr, credentials: &Credentials) -> Result<ServerStream, Refused> {
        let (startup, client_key, verifier) = (&credentials.startup, credentials.client_key, &credentials.verifier);
        let unreachable = |e: anyhow::Error| {
            Refused::Client(error_response("08006", &format!("meridian: cannot log in to {node}: {e:#}")))
        };
        let mut server = self.connect(node).await.map_err(unreachable)?;
        server.write_all(startup).await.context("send the startup packet").map_err(unreachable)?;
        let binding = {
            let (_, conn) = server.get_ref();
            conn.peer_certificates().and_then(|c| c.first()).and_then(|c| scram::end_point(c))
        };
        let mut exchange: Option<ClientExchange> = None;
        loop {
            let (raw, message) = read_backend_message(&mut server).await.map_err(unreachable)?;
            let protocol = |why: String| unreachable(anyhow!("{why}"));
            match message {
                Message::AuthenticationOk => return Ok(server),
                // Anything the server refuses (no such database, too many
                // connections) reaches the client as the server said it.
                Message::ErrorResponse(_) => return Err(Refused::Client(raw)),
                Message::AuthenticationSasl(_) => {
                    // Type, length, code, then NUL-terminated mechanism names.
                    let plus = raw[9..].split(|b| *b == 0).any(|m| m == scram::SCRAM_PLUS.as_bytes());
                    let (ex, mechanism, first) =
                        ClientExchange::start(client_key, verifier, binding.clone().filter(|_| plus));
                    let mut buf = BytesMut::new();
                    frontend::sasl_initial_response(mechanism, first.as_bytes(), &mut buf)
                        .context("encode SASLInitialResponse")?;
                    server.write_all(&buf).await.context("send SASLInitialResponse").map_err(unreachable)?;
                    exchange = Some(ex);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let ex = exchange.as_mut().ok_or_else(|| protocol("SASL continue before SASL".into()))?;
                    let last = ex.respond(body.data()).map_err(|e| protocol(e.to_string()))?;
                    let mut buf = BytesMut::new();
                    frontend::sasl_response(last.as_bytes(), &mut buf).context("encode SASLResponse")?;
                    server.write_all(&buf).await.context("send SASLResponse").map_err(unreachable)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let ex = exchange.as_ref().ok_or_else(|| protocol("SASL final before SASL".into()))?;
                    ex.verify(body.data()).map_err(|e| protocol(e.to_string()))?;
                }
                _ => {
                    return Err(protocol(
                        "the server asks for a password method other than SCRAM; the proxy can only pass SCRAM logins (set password_encryption = scram-sha-256 and the role's password again)"
                            .into(),
                    ))
                }
            }
        }
    }

    /// TCP, SSLRequest, then TLS verifying that the certificate names the node's address.
    async fn connect(&self, node: SocketAddr) -> Result<ServerStream> {
        let mut tcp = tokio::time::timeout(super::CONNECT_TIMEOUT, TcpStream::connect(node))
            .await
            .map_err(|_| anyhow!("no answer within {:?}", super::CONNECT_TIMEOUT))??;
        tcp.set_nodelay(true)?;
        let mut request = 8i32.to_be_bytes().to_vec();
        request.extend(SSL_REQUEST.to_be_bytes());
        tcp.write_all(&request).await?;
        let mut answer = [0u8];
        tcp.read_exact(&mut answer).await.context("read the answer to SSLRequest")?;
        if answer[0] != b'S' {
            bail!("the server does not offer TLS (ssl = off?)");
        }
        let name = ServerName::IpAddress(node.ip().into());
        self.server_tls.connect(name, tcp).await.context("TLS handshake with the server")
    }
}

/// An authentication request (`R`) with `code` and `payload`.
fn auth_message(code: i32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend(((8 + payload.len()) as i32).to_be_bytes());
    out.extend(code.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A `p` message from the client (SASLInitialResponse or SASLResponse), its body.
async fn read_password_message(client: &mut (impl AsyncRead + Unpin + ?Sized)) -> Result<Vec<u8>> {
    let mut head = [0u8; 5];
    client.read_exact(&mut head).await.context("read the client's SASL message")?;
    let len = i32::from_be_bytes(head[1..5].try_into().expect("4 bytes"));
    if head[0] != b'p' {
        bail!("expected a password message, got type {:?}", head[0] as char);
    }
    if !(4..=MAX_AUTH_MESSAGE as i32).contains(&len) {
        bail!("SASL message length {len} is out of bounds");
    }
    let mut body = vec![0u8; len as usize - 4];
    client.read_exact(&mut body).await.context("read the client's SASL message")?;
    Ok(body)
}

/// SASLInitialResponse: mechanism, then the length of the data (-1: none), then the data.
fn split_initial_response(body: &[u8]) -> Option<(String, &[u8])> {
    let nul = body.iter().position(|b| *b == 0)?;
    let mechanism = std::str::from_utf8(&body[..nul]).ok()?.to_string();
    let len = i32::from_be_bytes(body.get(nul + 1..nul + 5)?.try_into().ok()?);
    let data = body.get(nul + 5..)?;
    (len >= 0 && len as usize == data.len()).then_some((mechanism, data))
}

/// One backend message during login: its bytes as sent, and parsed.
async fn read_backend_message(server: &mut (impl AsyncWrite + AsyncRead + Unpin)) -> Result<(Vec<u8>, Message)> {
    let mut head = [0u8; 5];
    server.read_exact(&mut head).await.context("read the server's answer")?;
    let len = i32::from_be_bytes(head[1..5].try_into().expect("4 bytes"));
    if !(4..=MAX_AUTH_MESSAGE as i32).contains(&len) {
        bail!("server message length {len} is out of bounds");
    }
    let mut raw = head.to_vec();
    raw.resize(1 + len as usize, 0);
    server.read_exact(&mut raw[5..]).await.context("read the server's answer")?;
    let message = Message::parse(&mut BytesMut::from(&raw[..]))
        .context("parse the server's answer")?
        .ok_or_else(|| anyhow!("incomplete server message"))?;
    Ok((raw, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196608i32.to_be_bytes().to_vec();
        for (k, v) in pairs {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn the_startup_packet_gives_the_user_and_replication() {
        let p = StartupParams::parse(&startup(&[
            ("user", "app"),
            ("database", "shop"),
            ("client_encoding", "UTF8"),
            ("application_name", "psql"),
            ("DateStyle", "ISO"),
        ]))
        .unwrap();
        let settings = vec![("DateStyle".into(), "ISO".into()), ("client_encoding".into(), "UTF8".into())];
        assert_eq!(p, StartupParams { user: "app".into(), replication: false, database: "shop".into(), settings });
        assert_eq!(StartupParams::parse(&startup(&[("user", "app")])).unwrap().database, "app");
        let p = StartupParams::parse(&startup(&[("replication", "database"), ("user", "r")])).unwrap();
        assert!(p.replication);
        assert!(StartupParams::parse(&startup(&[("database", "app")])).is_err(), "no user");
        assert!(StartupParams::parse(&startup(&[("user", "")])).is_err());
        assert!(StartupParams::parse(&[0, 0, 0, 8]).is_err());
    }

    #[test]
    fn a_sasl_initial_response_splits_into_mechanism_and_data() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend(5i32.to_be_bytes());
        body.extend(b"n,,ab");
        assert_eq!(split_initial_response(&body), Some(("SCRAM-SHA-256".into(), &b"n,,ab"[..])));
        body.push(b'x');
        assert_eq!(split_initial_response(&body), None, "length and data disagree");
        assert_eq!(split_initial_response(b"SCRAM"), None);
    }

    #[test]
    fn auth_messages_count_their_length() {
        let m = auth_message(AUTH_SASL_FINAL, b"v=xyz");
        assert_eq!(m[0], b'R');
        assert_eq!(i32::from_be_bytes(m[1..5].try_into().unwrap()) as usize, m.len() - 1);
        assert_eq!(i32::from_be_bytes(m[5..9].try_into().unwrap()), 12);
    }
}
