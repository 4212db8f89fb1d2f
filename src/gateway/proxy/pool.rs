//! Server connections for transaction pooling: one pool per user, database
//! and startup settings, holding at most its size of connections to the
//! port's backends. A client takes one for a transaction and gives it back
//! when the server says it is idle again.
//!
//! Connections follow the view: an idle connection to a node that is no
//! longer the writer (or no longer a usable reader) is closed when next
//! looked at, so after a switchover or failover the next transaction opens
//! one to the new primary. The pool logs in as the latest client that proved
//! itself (`login::Credentials`: the ClientKey its SCRAM proof revealed, kept
//! in memory only), and greets new clients with the parameters the server
//! announced to its first connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::login::{Credentials, Refused, ServerStream};
use super::prepared::ServerStatements;
use crate::gateway::routing::Backend;

/// Statements a pool remembers as accepted, at most.
const MAX_VALID_STATEMENTS: usize = 10_000;

/// What identifies a pool: clients that log in alike share its connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
    pub settings: Vec<(String, String)>,
}

/// One server connection, logged in and idle or lent to a client.
pub struct ServerConn {
    /// Boxed: the TLS state is over a kilobyte, and a connection moves in
    /// and out of its pool with every transaction.
    pub stream: Box<ServerStream>,
    /// Bytes read from the server and not yet forwarded.
    pub buf: BytesMut,
    pub backend: Backend,
    /// The server's BackendKeyData, for passing on a client's cancel.
    pub pid: i32,
    pub secret: i32,
    pub statements: ServerStatements,
    pub opened: Instant,
}

impl ServerConn {
    /// Says goodbye (Terminate) and closes, in the background: the server
    /// then logs no "connection reset", and a dead one costs nothing.
    pub fn close(mut self) {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let bye = async {
                self.stream.write_all(&[b'X', 0, 0, 0, 4]).await?;
                self.stream.shutdown().await
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
        });
    }
}

/// A pool's counters, for `/metrics`.
#[derive(Default)]
pub struct PoolStats {
    /// Connections open (idle and lent).
    pub open: AtomicU64,
    pub idle: AtomicU64,
    /// Clients waiting for a connection.
    pub waiting: AtomicU64,
}

struct State {
    idle: Vec<ServerConn>,
    /// Idle and lent.
    open: usize,
}

pub struct Pool {
    pub key: PoolKey,
    state: Mutex<State>,
    released: Notify,
    credentials: Mutex<Option<Credentials>>,
    /// The ParameterStatus messages of the first login, to greet clients with.
    greeting: Mutex<Option<Vec<u8>>>,
    /// Server statements (`prepared::server_name`) some server accepted: a
    /// client preparing one again is answered without a server.
    valid_statements: Mutex<std::collections::HashSet<String>>,
    pub stats: PoolStats,
}

impl Pool {
    fn new(key: PoolKey) -> Pool {
        Pool {
            key,
            state: Mutex::new(State { idle: Vec::new(), open: 0 }),
            released: Notify::new(),
            credentials: Mutex::default(),
            greeting: Mutex::default(),
            valid_statements: Mutex::default(),
            stats: PoolStats::default(),
        }
    }

    /// Remembers what the latest client that proved itself logs in with.
    pub fn set_credentials(&self, c: Credentials) {
        *lock(&self.credentials) = Some(c);
    }

    pub fn greeting(&self) -> Option<Vec<u8>> {
        lock(&self.greeting).clone()
    }

    /// An idle connection to a backend `usable` accepts (closing idle ones to
    /// others), or room to open one; None when the pool is full.
    fn take(&self, usable: &dyn Fn(&Backend) -> bool, size: usize) -> Option<Taken> {
        let mut st = lock(&self.state);
        // One verdict per backend, not per connection: idle connections mostly
        // share one, and each verdict reads the view and works out the routing.
        let mut verdicts: Vec<((std::net::SocketAddr, Option<crate::cluster::Epoch>), bool)> = Vec::new();
        let mut gone = Vec::new();
        let mut i = 0;
        while i < st.idle.len() {
            let backend = &st.idle[i].backend;
            let key = (backend.address, backend.epoch);
            let ok = match verdicts.iter().find(|(k, _)| *k == key) {
                Some((_, ok)) => *ok,
                None => {
                    let ok = usable(backend);
                    verdicts.push((key, ok));
                    ok
                }
            };
            if ok {
                i += 1;
            } else {
                gone.push(st.idle.remove(i));
            }
        }
        st.open -= gone.len();
        gone.into_iter().for_each(ServerConn::close);
        let taken = match st.idle.pop() {
            Some(c) => Some(Taken::Idle(Box::new(c))),
            None if st.open < size => {
                st.open += 1;
                Some(Taken::Room)
            }
            None => None,
        };
        self.publish(&st);
        taken
    }

    /// Gives a connection back: kept for the next transaction when `reusable`.
    pub fn give_back(&self, conn: ServerConn, reusable: bool) {
        let mut st = lock(&self.state);
        if reusable {
            st.idle.push(conn);
        } else {
            st.open -= 1;
            conn.close();
        }
        self.publish(&st);
        drop(st);
        self.released.notify_one();
    }

    /// Room taken for a connection that could not be opened.
    fn room_unused(&self) {
        let mut st = lock(&self.state);
        st.open -= 1;
        self.publish(&st);
        drop(st);
        self.released.notify_one();
    }

    fn publish(&self, st: &State) {
        self.stats.open.store(st.open as u64, Ordering::Relaxed);
        self.stats.idle.store(st.idle.len() as u64, Ordering::Relaxed);
    }

    /// A connection for one transaction: idle, or newly opened to `backend()`,
    /// or the next one given back. `usable` says which backends idle
    /// connections may go to now; `backend` picks one for a new connection
    /// (and may wait for a writer); `until` bounds the whole wait.
    pub async fn acquire<U, B, BF, L, LF>(
        &self,
        size: usize,
        usable: U,
        backend: B,
        log_in: L,
        until: tokio::time::Instant,
    ) -> Result<ServerConn, Refused>
    where
        U: Fn(&Backend) -> bool,
        B: Fn() -> BF,
        BF: std::future::Future<Output = Result<Backend, String>>,
        L: Fn(Backend, Credentials) -> LF,
        LF: std::future::Future<Output = Result<ServerConn, Refused>>,
    {
        loop {
            let released = self.released.notified();
            match self.take(&usable, size) {
                Some(Taken::Idle(c)) => return Ok(*c),
                Some(Taken::Room) => {
                    let opened = async {
                        let target = backend().await.map_err(|why| refused("57P03", &why))?;
                        let credentials = lock(&self.credentials)
                            .clone()
                            .ok_or_else(|| Refused::Gone(anyhow!("no client has logged in to this pool")))?;
                        log_in(target, credentials).await
                    }
                    .await;
                    if opened.is_err() {
                        self.room_unused();
                    }
                    return opened;
                }
                None => {
                    self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                    let woke = tokio::select! {
                        _ = released => true,
                        _ = tokio::time::sleep_until(until) => false,
                        // A backend may have become unusable with every connection idle.
                        _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => true,
                    };
                    self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                    if !woke {
                        return Err(refused(
                            "53300",
                            &format!("all {size} server connections of the pool for {} stayed busy", self.key.user),
                        ));
                    }
                }
            }
        }
    }

    pub fn statement_is_valid(&self, name: String) {
        let mut v = lock(&self.valid_statements);
        // Bounded: a client preparing endless distinct queries costs round trips, not memory.
        if v.len() < MAX_VALID_STATEMENTS {
            v.insert(name);
        }
    }

    pub fn is_valid_statement(&self, name: &str) -> bool {
        lock(&self.valid_statements).contains(name)
    }

    /// Records the greeting of a connection's login, the first time.
    pub fn keep_greeting(&self, greeting: &[u8]) {
        let mut g = lock(&self.greeting);
        if g.is_none() {
            *g = Some(greeting.to_vec());
        }
    }
}

enum Taken {
    Idle(Box<ServerConn>),
    Room,
}

fn refused(code: &str, message: &str) -> Refused {
    Refused::Client(super::messages::error(code, &format!("meridian: {message}"), "").to_vec())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every pool of one port.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    pub fn get(&self, key: PoolKey) -> Arc<Pool> {
        lock(&self.pools).entry(key.clone()).or_insert_with(|| Arc::new(Pool::new(key))).clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }
}

/// Reads what a server sends after AuthenticationOk up to ReadyForQuery:
/// the ParameterStatus messages (as sent, to greet clients with) and its
/// BackendKeyData.
/// An ErrorResponse from the server (no such database, too many
/// connections) comes back as it was sent, for the client.
pub async fn finish_login(stream: &mut ServerStream) -> Result<(Vec<u8>, i32, i32), Refused> {
    read_greeting(stream).await
}

async fn read_greeting(stream: &mut ServerStream) -> Result<(Vec<u8>, i32, i32), Refused> {
    let mut buf = BytesMut::new();
    let (mut greeting, mut key) = (Vec::new(), None);
    loop {
        let message = loop {
            let before = buf.len();
            if let Some(m) =
                Message::parse(&mut buf.clone()).context("parse the server's greeting").map_err(Refused::Gone)?
            {
                let len = 1 + i32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
                let raw = buf.split_to(len);
                break (raw, m);
            }
            if stream.read_buf(&mut buf).await.context("read the server's greeting").map_err(Refused::Gone)? == 0 {
                return Err(Refused::Gone(anyhow!(
                    "the server closed the connection after login ({before} bytes unread)"
                )));
            }
        };
        match message {
            (raw, Message::ParameterStatus(_)) => greeting.extend_from_slice(&raw),
            (_, Message::BackendKeyData(k)) => key = Some((k.process_id(), k.secret_key())),
            (_, Message::ReadyForQuery(_)) => {
                let (pid, secret) = key.context("the server sent no BackendKeyData").map_err(Refused::Gone)?;
                return Ok((greeting, pid, secret));
            }
            (_, Message::NoticeResponse(_)) => {}
            (raw, Message::ErrorResponse(_)) => return Err(Refused::Client(raw.to_vec())),
            (raw, _) => {
                return Err(Refused::Gone(anyhow!(
                    "unexpected message {:?} from the server after login",
                    raw[0] as char
                )))
            }
        }
    }
}
