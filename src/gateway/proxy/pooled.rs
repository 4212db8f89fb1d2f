//! One client session under transaction pooling.
//!
//! The client keeps its connection to the proxy; a server connection is
//! taken from the pool when the client sends something while it holds none,
//! and given back once the server has answered everything sent (one
//! ReadyForQuery per Query, Sync or FunctionCall) and says it is idle (`I`).
//! A transaction block (`T`, `E`) keeps it. So a switchover or failover
//! happens between a client's transactions: its next one goes to the new
//! primary.
//!
//! What cannot move between server connections pins the session to the one
//! it has (`pinning`): it is then never given back, and closed when the
//! client leaves. Named prepared statements do move (`prepared`).
//!
//! When the server of a transaction goes away (the primary died, or lost the
//! leadership), the client is told with a retryable error and stays
//! connected: a request in flight gets SQLSTATE 08006 ("may or may not have
//! committed"); inside a block, every later statement fails (25P02) until the
//! client rolls back, and a COMMIT fails with 40001 (nothing of it was
//! committed). A pinned session loses its state with its server, so it is
//! closed (57P01) saying why.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, ReusableBoxFuture};

use super::messages::{self, Reader, Seen, ServerScan};
use super::pinning::{self, Boundary, Pin};
use super::pool::{Pool, ServerConn};
use super::prepared::{self, ClientStatements, Expect, Fate};
use super::{ClientStream, Port, Proxy};

/// Where a client's cancel request goes: the server it holds now, if any.
pub type CancelSlot = Mutex<Option<(std::net::SocketAddr, i32, i32)>>;

/// A client message longer than this is refused (PostgreSQL's own bound is 1 GB).
pub const MAX_CLIENT_MESSAGE: usize = 256 * 1024 * 1024;

/// Reported settings that describe the server, not the session: a change
/// neither pins the session nor reaches the client.
const SERVER_STATE: [&str; 1] = ["in_hot_standby"];

const RETRY_HINT: &str = "retry the transaction: the next one runs on the current primary";

/// The server connection a client holds, and what is owed on it.
struct Held {
    conn: ServerConn,
    scan: ServerScan,
    /// ReadyForQuery answers the server still owes.
    owed: usize,
    /// The server's last transaction status.
    status: u8,
    /// A request in flight opens a transaction block.
    begins: bool,
    /// How to treat the coming ParseComplete and CloseComplete.
    expect: VecDeque<Expect>,
    /// Extended-protocol messages were sent since the last Sync: the client
    /// is in the middle of a run, whose answers only this server can give.
    open_run: bool,
    /// Counted as lent until the server's first answer (see `Lend`).
    lend: Option<Lend>,
}

/// A transaction a proxy lent a server connection to, until the server's
/// first answer: only then can the server's own count of open transactions
/// see it. A leader's lend holds up the gateway's saying it holds new
/// transactions for a switchover, a standby's its saying it avoids that
/// standby for a rolling restart (`presence`): either way the node counts
/// open transactions once every gateway has said so, then stops. Before, a
/// request sent just before could reach its server just after the count,
/// and be cut by the shutdown (seen under heavy load: 08006, on the writer
/// port at a switchover and on the reader port at a standby's restart).
pub struct Lend {
    stats: Arc<super::ProxyStats>,
    /// `None`: a leader's connection; else the standby's address.
    standby: Option<std::net::SocketAddr>,
}

impl Lend {
    /// Counts a lend; taken *before* the view is looked at again, so that a
    /// gateway that saw the change and then no lend outstanding is never wrong.
    fn take(stats: &Arc<super::ProxyStats>, backend: &super::routing::Backend) -> Lend {
        let standby = backend.epoch.is_none().then_some(backend.address);
        match standby {
            None => {
                stats.leader_lends.fetch_add(1, Ordering::SeqCst);
            }
            Some(address) => {
                *stats.standby_lends.lock().unwrap_or_else(|p| p.into_inner()).entry(address).or_default() += 1
            }
        }
        Lend { stats: stats.clone(), standby }
    }
}

impl Drop for Lend {
    fn drop(&mut self) {
        match self.standby {
            None => {
                self.stats.leader_lends.fetch_sub(1, Ordering::SeqCst);
            }
            Some(address) => {
                let mut lends = self.stats.standby_lends.lock().unwrap_or_else(|p| p.into_inner());
                if let std::collections::hash_map::Entry::Occupied(mut n) = lends.entry(address) {
                    *n.get_mut() -= 1;
                    if *n.get() == 0 {
                        n.remove();
                    }
                }
            }
        }
    }
}

impl Held {
    /// Nothing owed, no transaction, no run begun: free for another client.
    fn idle(&self) -> bool {
        self.owed == 0 && self.status == b'I' && !self.open_run
    }
}

/// Whether a run of extended-protocol messages is still open after `batch`
/// (`open`: whether one was before it). A read can end anywhere, so a batch
/// may end after a Parse whose Describe and Sync come in the next one (a
/// client catching up after a pause sends its Close, Sync and next Parse at
/// once); the run's answers, ParseComplete included, come from the server
/// that was sent its first message. COPY data and the like open nothing.
fn run_open_after(batch: &[BytesMut], open: bool) -> bool {
    batch.iter().fold(open, |open, m| match messages::tag(m) {
        messages::SYNC | messages::QUERY | messages::FUNCTION_CALL => false,
        messages::PARSE
        | messages::BIND
        | messages::DESCRIBE
        | messages::EXECUTE
        | messages::CLOSE
        | messages::FLUSH => true,
        _ => open,
    })
}

pub struct Session<'a> {
    pub proxy: &'a Proxy,
    pub pool: Arc<Pool>,
    pub client: Reader<Box<dyn ClientStream>>,
    pub cancel: Arc<CancelSlot>,
    statements: ClientStatements,
    held: Option<Held>,
    /// The server of this client's open transaction went away (its name).
    lost: Option<String>,
    /// The server of this client's unfinished run went away (its name, and
    /// why), outside a transaction block: the run's Sync is answered with an error.
    broken_run: Option<(String, String)>,
    pinned: Option<Pin>,
    /// Kept between transactions (not made anew for each): what goes to
    /// the server, and what the scan of its answer found.
    scratch: BytesMut,
    seen: Vec<Seen>,
}

/// A session keeps a buffer this large at most between transactions (a
/// bulk load's batches are not kept for an idle client).
const KEEP_SCRATCH: usize = 16 * 1024;

enum Event {
    Client(Result<Option<BytesMut>>),
    Server(std::io::Result<usize>),
    ViewChanged,
    Shutdown,
}

impl<'a> Session<'a> {
    pub fn new(proxy: &'a Proxy, pool: Arc<Pool>, client: Box<dyn ClientStream>, cancel: Arc<CancelSlot>) -> Self {
        Session {
            proxy,
            pool,
            client: Reader::new(client, MAX_CLIENT_MESSAGE),
            cancel,
            statements: ClientStatements::default(),
            held: None,
            lost: None,
            broken_run: None,
            pinned: None,
            scratch: BytesMut::new(),
            seen: Vec::new(),
        }
    }

    /// Serves the client until it leaves, breaks the protocol, or shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let result = self.serve(&shutdown).await;
        if let Some(h) = self.held.take() {
            // Idle and unpinned: as good as given back between transactions.
            let reusable = h.idle() && self.pinned.is_none() && result.is_ok();
            self.give_back(h, reusable);
        }
        result
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> Result<()> {
        // Made once, not per event: each one made anew waits in (and then
        // leaves) a queue behind a lock, several times a transaction.
        let mut view_changed = ReusableBoxFuture::new(next_view_change(self.proxy.view.clone()));
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        loop {
            let event = {
                let held = &mut self.held;
                tokio::select! {
                    m = self.client.next() => Event::Client(m),
                    r = read_server(held), if held.is_some() => Event::Server(r),
                    (view, changed) = &mut view_changed, if held.is_some() => {
                        view_changed.set(next_view_change(view));
                        match changed {
                            Ok(()) => Event::ViewChanged,
                            Err(_) => Event::Shutdown,
                        }
                    }
                    _ = &mut cancelled => Event::Shutdown,
                }
            };
            match event {
                Event::Client(m) => {
                    let Some(first) = m? else { return Ok(()) };
                    let mut batch = vec![first];
                    while let Some(m) = self.client.buffered()? {
                        batch.push(m);
                    }
                    if !self.on_client(batch).await? {
                        return Ok(());
                    }
                }
                Event::Server(Ok(0)) | Event::Server(Err(_)) => {
                    let node = self.held.as_ref().map(|h| h.conn.backend.node.clone()).unwrap_or_default();
                    if !self.server_lost(&format!("{node} closed the connection")).await? {
                        return Ok(());
                    }
                }
                Event::Server(Ok(_)) => self.on_server().await?,
                Event::ViewChanged => {
                    let gone = self.held.as_ref().filter(|h| !self.proxy.still_leader(&h.conn.backend));
                    if let Some(h) = gone {
                        let why = format!("{} is no longer the primary", h.conn.backend.node);
                        self.proxy.stats.cut.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("cut a pooled writer connection: {why}");
                        if !self.server_lost(&why).await? {
                            return Ok(());
                        }
                    }
                }
                Event::Shutdown => return Ok(()),
            }
        }
    }

    /// Handles a batch of client messages; false when the client said goodbye.
    async fn on_client(&mut self, batch: Vec<BytesMut>) -> Result<bool> {
        let (batch, terminate) = match batch.iter().position(|m| messages::tag(m) == messages::TERMINATE) {
            Some(i) => (batch[..i].to_vec(), true),
            None => (batch, false),
        };
        let batch = match self.broken_run.clone() {
            Some((node, why)) => match batch.iter().position(|m| messages::tag(m) == messages::SYNC) {
                // Still inside the broken run: its Sync answers for all of it.
                None => return Ok(!terminate),
                Some(i) => {
                    self.broken_run = None;
                    let mut out = messages::error("08006", &lost_during_request(&node, &why), RETRY_HINT);
                    out.extend_from_slice(&messages::ready_for_query(b'I'));
                    send(self.client.get_mut(), &out).await.context("tell the client")?;
                    batch[i + 1..].to_vec()
                }
            },
            None => batch,
        };
        if batch.is_empty() {
            return Ok(!terminate);
        }
        if self.lost.is_some() && !self.answer_lost(&batch).await? {
            return Ok(!terminate);
        }
        let mut begins = false;
        for m in &batch {
            let reading = reading_of(&self.statements, m);
            begins |= reading.begins;
            if let Some(pin) = reading.pins {
                self.pin(pin);
                if pin == Pin::Deallocate {
                    if let Some(h) = self.held.as_mut() {
                        h.conn.statements.clear();
                    }
                }
            }
        }
        if self.held.is_none() {
            if let Some(answer) =
                prepared::answer_alone(&batch, &mut self.statements, &|n| self.pool.is_valid_statement(n))?
            {
                send(self.client.get_mut(), &answer).await.context("answer the client")?;
                return Ok(!terminate);
            }
            match self.proxy.acquire(&self.pool).await {
                Ok((conn, lend)) => {
                    *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((conn.backend.address, conn.pid, conn.secret));
                    self.held = Some(Held {
                        lend: Some(lend),
                        conn,
                        scan: ServerScan::default(),
                        owed: 0,
                        status: b'I',
                        begins: false,
                        expect: VecDeque::new(),
                        open_run: false,
                    });
                    self.proxy.stats.transactions.fetch_add(1, Ordering::Relaxed);
                }
                Err(super::login::Refused::Client(error)) => {
                    let mut out = BytesMut::new();
                    for _ in 0..answers_owed(&batch) {
                        out.extend_from_slice(&error);
                        out.extend_from_slice(&messages::ready_for_query(b'I'));
                    }
                    send(self.client.get_mut(), &out).await.context("answer the client")?;
                    return Ok(!terminate);
                }
                Err(super::login::Refused::Gone(e)) => return Err(e),
            }
        }
        let pinned_deallocate = self.pinned == Some(Pin::Deallocate);
        let h = self.held.as_mut().expect("acquired above");
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        for m in &batch {
            let kind = messages::tag(m);
            if matches!(kind, messages::QUERY | messages::SYNC | messages::FUNCTION_CALL) {
                h.owed += 1;
            }
            if pinned_deallocate && kind == messages::QUERY {
                h.conn.statements.clear();
            }
            prepared::translate(m, &mut self.statements, &mut h.conn.statements, &mut out, &mut h.expect)?;
        }
        h.begins |= begins;
        h.open_run = run_open_after(&batch, h.open_run);
        let sent = send(&mut h.conn.stream, &out).await;
        if out.capacity() <= KEEP_SCRATCH {
            self.scratch = out;
        }
        if let Err(e) = sent {
            let why = format!("{}: {e}", h.conn.backend.node);
            return self.server_lost(&why).await;
        }
        Ok(!terminate)
    }

    /// Forwards what the server sent; gives the connection back when it is idle.
    async fn on_server(&mut self) -> Result<()> {
        let h = self.held.as_mut().expect("reading a held connection");
        // The server has read the request: a switchover's count sees it now.
        h.lend = None;
        let mut seen = std::mem::take(&mut self.seen);
        seen.clear();
        let ready = h.scan.scan(&h.conn.buf, &mut seen).context("read the server's messages")?;
        let mut out = h.conn.buf.split_to(ready);
        let mut edits = Vec::new();
        let mut pin = None;
        // A FATAL error: the server is about to close (a fast shutdown ends
        // sessions with 57P01). Not passed on as it is: the client's
        // connection stays, and it learns of the loss as a retryable error.
        let mut closing = None;
        for s in seen.drain(..) {
            match s {
                Seen::Complete { kind: _, offset } => {
                    let (fate, valid) = prepared::answered(&mut h.conn.statements, &mut h.expect);
                    if let Some(name) = valid {
                        self.pool.statement_is_valid(name);
                    }
                    match fate {
                        Fate::Forward | Fate::Ready => {}
                        Fate::Drop => edits.push((offset, 5, None)),
                        Fate::AsParseComplete => edits.push((offset, 5, Some(messages::PARSE_COMPLETE))),
                    }
                }
                Seen::Error { fatal: true, code, message, offset, len } => {
                    edits.push((offset, len, None));
                    closing = Some(format!("{}: {message} ({code})", h.conn.backend.node));
                }
                Seen::Error { code, message, .. } => {
                    tracing::debug!("{} answered an error ({code}): {message}", h.conn.backend.node);
                    prepared::failed(&mut h.conn.statements, &mut h.expect)
                }
                // The server's own state, not the session's: a standby promoted
                // under a reader's transaction says so to every session. Pinning
                // there kept readers on the new primary for good (CI, twice); the
                // client's session is with the proxy, whose servers come and go.
                Seen::Parameter { name, offset, len } if SERVER_STATE.contains(&name.as_str()) => {
                    tracing::debug!("{} reported {name} changed; not passed on", h.conn.backend.node);
                    edits.push((offset, len, None));
                }
                Seen::Parameter { .. } => pin = Some(Pin::ReportedSetting),
                Seen::Ready(status) => {
                    prepared::ready(&mut h.expect);
                    h.owed = h.owed.saturating_sub(1);
                    h.status = status;
                    if h.owed == 0 {
                        h.begins = false;
                    }
                }
            }
        }
        self.seen = seen;
        messages::edit_messages(&mut out, &edits);
        let idle = h.idle();
        if let Some(p) = pin {
            self.pin(p);
        }
        send(self.client.get_mut(), &out).await.context("write to the client")?;
        if let Some(why) = closing {
            return match self.server_lost(&why).await? {
                true => Ok(()),
                false => Err(anyhow::anyhow!("the session ended with its server: {why}")),
            };
        }
        if idle && self.pinned.is_none() {
            let h = self.held.take().expect("held above");
            self.give_back(h, true);
        }
        Ok(())
    }

    /// The held server went away. Tells the client what became of its
    /// requests; false when the session must end (pinned, or mid-message).
    async fn server_lost(&mut self, why: &str) -> Result<bool> {
        let Some(h) = self.held.take() else { return Ok(true) };
        let node = h.conn.backend.node.clone();
        let mid_message = h.scan.in_message();
        let (owed, in_block, open_run) = (h.owed, h.status != b'I' || h.begins, h.open_run);
        self.give_back(h, false);
        if self.pinned.is_some() || mid_message {
            self.proxy.stats.lost_sessions.fetch_add(1, Ordering::Relaxed);
            let why = match self.pinned {
                Some(p) => format!(
                    "meridian: this session was pinned to its server connection ({p}) and that connection is gone ({why}); reconnect"
                ),
                None => format!("meridian: the server connection broke in the middle of a reply ({why}); reconnect"),
            };
            let _ = send(self.client.get_mut(), &super::error_response("57P01", &why)).await;
            return Ok(false);
        }
        if open_run && !in_block {
            // Inside a block the run's Sync is answered as the block's loss is.
            self.broken_run = Some((node.clone(), why.to_string()));
        }
        if owed == 0 && !in_block {
            return Ok(true); // between transactions: nothing was lost (or answered at the run's Sync)
        }
        self.proxy.stats.lost_transactions.fetch_add(1, Ordering::Relaxed);
        let mut out = BytesMut::new();
        let status = if in_block { b'E' } else { b'I' };
        for _ in 0..owed {
            out.extend_from_slice(&messages::error("08006", &lost_during_request(&node, why), RETRY_HINT));
            out.extend_from_slice(&messages::ready_for_query(status));
        }
        if in_block {
            self.lost = Some(node);
        }
        send(self.client.get_mut(), &out).await.context("tell the client")?;
        Ok(true)
    }

    /// The client's transaction was lost with its server: answers its batch
    /// as PostgreSQL answers a failed transaction. True when the batch must
    /// go on to a server (a ROLLBACK: outside a transaction it only warns).
    async fn answer_lost(&mut self, batch: &[BytesMut]) -> Result<bool> {
        let node = self.lost.clone().unwrap_or_default();
        let first = batch.iter().find_map(|m| self.sql_of(m)).map(pinning::boundary).unwrap_or(Boundary::Other);
        let (error, status) = match first {
            Boundary::Rollback => {
                self.lost = None;
                return Ok(true);
            }
            Boundary::Commit => {
                self.lost = None;
                let msg = format!("meridian: this transaction was lost with its server ({node} went away); nothing of it was committed");
                (messages::error("40001", &msg, RETRY_HINT), b'I')
            }
            _ => {
                let msg = format!(
                    "current transaction is aborted: its server ({node}) went away; roll back and retry the transaction"
                );
                (messages::error("25P02", &msg, "ROLLBACK, then run the transaction again"), b'E')
            }
        };
        let mut out = BytesMut::new();
        for _ in 0..answers_owed(batch) {
            out.extend_from_slice(&error);
            out.extend_from_slice(&messages::ready_for_query(status));
        }
        send(self.client.get_mut(), &out).await.context("answer the client")?;
        Ok(false)
    }

    fn sql_of<'m>(&'m self, m: &'m [u8]) -> Option<&'m str> {
        sql_of(&self.statements, m)
    }

    fn pin(&mut self, pin: Pin) {
        if self.pinned.is_none() {
            self.pinned = Some(pin);
            self.proxy.stats.pinned(pin);
            tracing::debug!("a {} session is pinned to its server connection: {pin}", self.proxy.port.name());
        }
    }

    fn give_back(&self, h: Held, reusable: bool) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // A pinned connection carries the session's state: never to another client.
        self.pool.give_back(h.conn, reusable && self.pinned.is_none() && h.expect.is_empty());
    }
}

/// What a client is told of a request whose server went away under it.
fn lost_during_request(node: &str, why: &str) -> String {
    format!("meridian: the connection to {node} was lost during this request ({why}); it may or may not have committed")
}

/// The SQL a message carries: a Query's text, a Parse's query, or the query
/// of the statement a Bind names.
fn sql_of<'m>(statements: &'m ClientStatements, m: &'m [u8]) -> Option<&'m str> {
    match messages::tag(m) {
        messages::QUERY => messages::query_text(m).ok(),
        messages::PARSE => messages::parse_fields(m).ok().map(|(_, q, _)| q),
        messages::BIND => statements.query_of(messages::bind_statement(m).ok()?),
        _ => None,
    }
}

/// What the pooler reads in a message's SQL; a Bind's was read at its Parse.
fn reading_of(statements: &ClientStatements, m: &[u8]) -> pinning::Reading {
    match messages::tag(m) {
        messages::BIND => messages::bind_statement(m).ok().and_then(|name| statements.reading_of(name)),
        _ => sql_of(statements, m).map(pinning::read),
    }
    .unwrap_or_default()
}

/// How many ReadyForQuery answers a batch asks for.
fn answers_owed(batch: &[BytesMut]) -> usize {
    batch
        .iter()
        .filter(|m| matches!(messages::tag(m), messages::QUERY | messages::SYNC | messages::FUNCTION_CALL))
        .count()
}

/// Resolves when the view changes (Err: the gateway is stopping), giving the receiver back.
async fn next_view_change(
    mut view: tokio::sync::watch::Receiver<super::View>,
) -> (tokio::sync::watch::Receiver<super::View>, Result<(), tokio::sync::watch::error::RecvError>) {
    let changed = view.changed().await;
    (view, changed)
}

async fn read_server(held: &mut Option<Held>) -> std::io::Result<usize> {
    match held {
        Some(h) => h.conn.stream.read_buf(&mut h.conn.buf).await,
        None => std::future::pending().await,
    }
}

impl Proxy {
    /// Whether `backend` still leads the current epoch (writer port; a
    /// standby of the reader port always is): a held connection to one that
    /// does not is cut.
    pub(super) fn still_leader(&self, backend: &super::routing::Backend) -> bool {
        if self.port == Port::Reader || backend.epoch.is_none() {
            return true;
        }
        let current = self.view.borrow();
        let Some(snap) = current.routable() else { return true };
        super::routing::leader_node(&current.config, snap)
            .is_some_and(|l| l.node == backend.node && l.epoch == backend.epoch)
    }
}

impl Proxy {
    /// Transaction mode: authenticates the client at the proxy, greets it
    /// as its pool's server greeted the pool, and serves it with pooled
    /// server connections.
    pub(super) async fn pooled(
        &self,
        logins: &super::login::Authenticator,
        mut client: Box<dyn ClientStream>,
        startup: &super::Startup,
        backend: &mut super::routing::Backend,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let port = self.port.name();
        let Some(params) = self.startup_params(&mut client, startup).await? else { return Ok(()) };
        let Some(verifier) = self.look_up(logins, &mut client, &params, backend).await? else { return Ok(()) };
        let known = verifier.is_some();
        let authenticated = logins.authenticate(client.as_mut(), startup.encrypted, &startup.bytes, &params, verifier);
        let (credentials, finish) = match tokio::time::timeout(super::STARTUP_TIMEOUT, authenticated).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(super::login::Refused::Client(message))) => {
                self.stats.login_failed.fetch_add(1, Ordering::Relaxed);
                let why =
                    if known { "wrong password or a protocol error" } else { "no SCRAM password the proxy may use" };
                tracing::info!("refused a {port} login as {:?}: {why}", params.user);
                send(&mut client, &message).await?;
                return Ok(());
            }
            Ok(Err(super::login::Refused::Gone(e))) => return Err(e),
            Err(_) => anyhow::bail!("the login did not finish within {:?}", super::STARTUP_TIMEOUT),
        };
        let key = super::pool::PoolKey { user: params.user, database: params.database, settings: params.settings };
        let pool = self.stats.pools.get(key);
        pool.set_credentials(credentials);
        let greeting = match pool.greeting() {
            Some(g) => g,
            // The pool's first client: a server login proves the database
            // exists and the role may connect, and gives the greeting.
            None => match self.acquire(&pool).await {
                Ok((conn, _lend)) => {
                    pool.give_back(conn, true);
                    pool.greeting().unwrap_or_default()
                }
                // Any ErrorResponse before ReadyForQuery fails the client's connection.
                Err(super::login::Refused::Client(message)) => {
                    send(&mut client, &message).await?;
                    return Ok(());
                }
                Err(super::login::Refused::Gone(e)) => return Err(e),
            },
        };
        let cancel_key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
        let mut hello = BytesMut::from(&finish[..]);
        hello.extend_from_slice(&greeting);
        hello.extend_from_slice(&messages::backend_key_data(cancel_key.0, cancel_key.1));
        hello.extend_from_slice(&messages::ready_for_query(b'I'));
        send(&mut client, &hello).await.context("greet the client")?;
        let slot: Arc<CancelSlot> = Arc::default();
        self.cancels.lock().unwrap_or_else(|p| p.into_inner()).insert(cancel_key, slot.clone());
        self.stats.relayed.fetch_add(1, Ordering::Relaxed);
        let served = Session::new(self, pool, client, slot).run(shutdown).await;
        self.cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(&cancel_key);
        served
    }

    /// A server connection from `pool` for one transaction (see `Pool::acquire`).
    /// An idle one whose server has said something or closed since (a FATAL
    /// at shutdown, a crash) is closed and another taken: a request is only
    /// ever sent to a connection that looked alive.
    pub(super) async fn acquire(&self, pool: &Pool) -> Result<(ServerConn, Lend), super::login::Refused> {
        let config = self.config();
        let size = config.proxy.pool_size(&pool.key.user, &pool.key.database);
        let until = tokio::time::Instant::now() + config.proxy.leader_wait;
        loop {
            let mut conn = pool
                .acquire(
                    size,
                    |b| self.serves_new_transactions(b),
                    || self.pick(),
                    |backend, credentials| self.open_server(pool, backend, credentials, until),
                    until,
                )
                .await?;
            use futures_util::FutureExt;
            if conn.stream.read_buf(&mut conn.buf).now_or_never().is_some() {
                tracing::debug!("an idle connection to {} had closed; taking another", conn.backend.node);
                pool.give_back(conn, false);
                continue;
            }
            // Counted first, then looked at again, as the gateway's
            // presence looks at the view and then at the count.
            let lend = Lend::take(&self.stats, &conn.backend);
            if self.serves_new_transactions(&conn.backend) {
                return Ok((conn, lend));
            }
            drop(lend);
            tracing::debug!("{} stopped taking new transactions while one was lent; waiting", conn.backend.node);
            pool.give_back(conn, true);
        }
    }

    /// Opens a server connection for `pool`; while the backend refuses
    /// (stopping, starting, dead but still named by the view, a standby
    /// now), asks again once the view changes, until `until`, as `pick`
    /// waits for a writer.
    async fn open_server(
        &self,
        pool: &Pool,
        mut backend: super::routing::Backend,
        credentials: super::login::Credentials,
        until: tokio::time::Instant,
    ) -> Result<ServerConn, super::login::Refused> {
        loop {
            match self.open_server_once(pool, backend.clone(), &credentials).await {
                Err(super::login::Refused::Client(m)) if passing_refusal(&m) && tokio::time::Instant::now() < until => {
                    let mut view = self.view.clone();
                    tokio::select! {
                        _ = view.changed() => {}
                        _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                        _ = tokio::time::sleep_until(until) => {}
                    }
                    backend = match self.pick().await {
                        Ok(b) => b,
                        Err(_) => return Err(super::login::Refused::Client(m)),
                    };
                }
                other => return other,
            }
        }
    }

    async fn open_server_once(
        &self,
        pool: &Pool,
        backend: super::routing::Backend,
        credentials: &super::login::Credentials,
    ) -> Result<ServerConn, super::login::Refused> {
        let Some(security) = &self.security else {
            return Err(super::login::Refused::Gone(anyhow::anyhow!("transaction pooling needs the proxy's TLS")));
        };
        // Bounded like a client's own login: a server that accepts the
        // connection and then says nothing must not hold the transaction.
        let login = async {
            let mut stream = security.logins.log_in_as(backend.address, credentials).await?;
            let greeted = super::pool::finish_login(&mut stream).await?;
            Ok::<_, super::login::Refused>((stream, greeted))
        };
        let unreachable = |why: String| {
            let msg = format!("meridian {}: cannot open a session on {}: {why}", self.port.name(), backend.node);
            super::login::Refused::Client(messages::error("08006", &msg, "").to_vec())
        };
        let started = std::time::Instant::now();
        let (stream, (greeting, pid, secret)) = match tokio::time::timeout(super::STARTUP_TIMEOUT, login).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(super::login::Refused::Gone(e))) => return Err(unreachable(format!("{e:#}"))),
            Ok(Err(refused)) => return Err(refused),
            Err(_) => return Err(unreachable(format!("no answer within {:?}", super::STARTUP_TIMEOUT))),
        };
        if self.port == Port::Writer && reports(&greeting, "in_hot_standby", "on") {
            let msg = format!("meridian writer: {} is a standby now; the transaction was not started", backend.node);
            return Err(super::login::Refused::Client(messages::error("57P03", &msg, RETRY_HINT).to_vec()));
        }
        pool.keep_greeting(&greeting);
        tracing::debug!(
            "opened a {} server connection to {} in {:.1?}",
            self.port.name(),
            backend.node,
            started.elapsed()
        );
        Ok(ServerConn {
            stream: Box::new(stream),
            buf: BytesMut::with_capacity(16 * 1024),
            backend,
            pid,
            secret,
            statements: Default::default(),
            opened: std::time::Instant::now(),
        })
    }

    /// Whether a new transaction may go to `backend`: the writer of a fresh
    /// view (none while a switchover is in progress: new transactions wait),
    /// or for the reader port a usable standby, or the writer it falls back to
    /// while there is none (so reads return to a standby once one is back).
    pub(in crate::gateway) fn serves_new_transactions(&self, backend: &super::routing::Backend) -> bool {
        let current = self.view.borrow();
        let config = &current.config;
        let Some(snap) = current.routable() else {
            // Reads are safe on any standby: those of the last view, as `pick`
            // takes; never the primary, whose switchover this view may miss.
            return self.port == Port::Reader
                && super::routing::readers(config, &current.snapshot, &self.region, config.proxy.max_reader_lag)
                    .iter()
                    .any(|r| r.node == backend.node);
        };
        let writer = super::routing::writer(config, snap);
        let is_writer = writer.as_ref().is_ok_and(|w| w.node == backend.node && w.epoch == backend.epoch);
        match self.port {
            Port::Writer => is_writer,
            Port::Reader => {
                let readers = super::routing::readers(config, snap, &self.region, config.proxy.max_reader_lag);
                if readers.is_empty() {
                    is_writer
                } else {
                    readers.iter().any(|r| r.node == backend.node)
                }
            }
        }
    }

    /// A cancel request with a key this proxy gave: passed to the server its
    /// client holds now (none: nothing runs, nothing to cancel). True when the key was the proxy's.
    pub(super) async fn cancel_pooled(&self, pid: i32, key: i32) -> bool {
        let slot = self.cancels.lock().unwrap_or_else(|p| p.into_inner()).get(&(pid, key)).cloned();
        let Some(slot) = slot else { return false };
        let target = *slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((address, server_pid, server_key)) = target {
            let mut packet = Vec::with_capacity(16);
            packet.extend(16i32.to_be_bytes());
            packet.extend(super::CANCEL_REQUEST.to_be_bytes());
            packet.extend(server_pid.to_be_bytes());
            packet.extend(server_key.to_be_bytes());
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(super::CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address)).await
            {
                let _ = s.write_all(&packet).await;
            }
        }
        true
    }
}

/// A refusal that passes: the server cannot take connections now (57P03:
/// starting, stopping, a standby for the writer port; 57P01: shutting down)
/// or cannot be reached (08006, the proxy's own).
fn passing_refusal(message: &[u8]) -> bool {
    message.first() == Some(&messages::ERROR_RESPONSE)
        && messages::error_field(message, b'C').is_some_and(|c| ["57P03", "57P01", "08006"].contains(&c.as_str()))
}

/// Whether a login's ParameterStatus messages report `name` = `value`.
fn reports(greeting: &[u8], name: &str, value: &str) -> bool {
    let mut rest = greeting;
    while rest.len() >= 5 {
        let len = 1 + i32::from_be_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
        let Some(m) = rest.get(..len) else { return false };
        if let Ok((n, after)) = messages::cstr(messages::body(m)) {
            if n == name && messages::cstr(after).is_ok_and(|(v, _)| v == value) {
                return true;
            }
        }
        rest = &rest[len..];
    }
    false
}

/// Writes and flushes: TLS streams may hold written bytes until flushed.
async fn send<W: tokio::io::AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(tags: &[u8]) -> Vec<BytesMut> {
        tags.iter().map(|t| BytesMut::from(&[*t, 0, 0, 0, 4][..])).collect()
    }

    #[test]
    fn a_run_stays_open_until_its_sync_whatever_the_batches() {
        let table: &[(&[u8], bool, bool)] = &[
            // A Close and its Sync, then the next Parse, read together (the drill's catch-up).
            (b"CSP", false, true),
            (b"DS", true, false),
            (b"PBDES", false, false),
            (b"PBD", false, true),
            (b"E", true, true),
            (b"S", true, false),
            (b"Q", false, false),
            // Parse and Flush: the answer comes before any Sync.
            (b"PH", false, true),
            // COPY data after a Query opens nothing; its CopyDone neither.
            (b"dc", false, false),
            (b"d", true, true),
            (b"F", true, false),
        ];
        for (tags, before, after) in table {
            assert_eq!(
                run_open_after(&messages(tags), *before),
                *after,
                "{} after an {} run",
                String::from_utf8_lossy(tags),
                if *before { "open" } else { "closed" }
            );
        }
    }

    #[test]
    fn lends_are_counted_per_leader_and_per_standby_until_answered() {
        let stats = Arc::new(super::super::ProxyStats::default());
        let backend = |epoch, port| super::super::routing::Backend {
            node: "n".into(),
            address: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            epoch,
        };
        let standby = |stats: &super::super::ProxyStats, port| {
            stats.standby_lends.lock().unwrap().get(&std::net::SocketAddr::from(([127, 0, 0, 1], port))).copied()
        };
        let leader = Lend::take(&stats, &backend(Some(3), 1));
        let reads = [Lend::take(&stats, &backend(None, 2)), Lend::take(&stats, &backend(None, 2))];
        let other = Lend::take(&stats, &backend(None, 3));
        assert_eq!(stats.leader_lends.load(Ordering::SeqCst), 1);
        assert_eq!((standby(&stats, 2), standby(&stats, 3)), (Some(2), Some(1)));
        drop(leader);
        drop(reads);
        assert_eq!(stats.leader_lends.load(Ordering::SeqCst), 0);
        assert_eq!((standby(&stats, 2), standby(&stats, 3)), (None, Some(1)), "an answered standby leaves no entry");
        drop(other);
        assert!(stats.standby_lends.lock().unwrap().is_empty());
    }
}
