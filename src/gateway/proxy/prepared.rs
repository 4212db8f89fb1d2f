//! Protocol-level named prepared statements under transaction pooling.
//!
//! A client prepares `s1` on whichever server connection it holds for that
//! transaction and binds `s1` in a later one, on another. So the pooler
//! keeps each client's statements itself (name → the Parse that made it) and
//! prepares them on servers under a name of its own derived from the query
//! and parameter types (`meridian_<hash>`): clients running the same query
//! share one server statement, and a server that lacks it is sent the Parse
//! just before the Bind or Describe that needs it. A client's Close of a
//! statement is not passed on (other clients may use the server's); the
//! server is sent a Close of a name that never exists instead, whose
//! CloseComplete answers the client. A Parse of a statement the server
//! already has is answered the same way, its CloseComplete turned into
//! ParseComplete. Responses to the Parses the pooler adds are dropped.
//! (PgBouncer 1.21 and pgdog do the same; Debian 12's PgBouncer 1.18 cannot.)

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::Result;
use bytes::{BufMut, BytesMut};
use sha2::{Digest, Sha256};

use super::messages::{self, BIND, CLOSE, DESCRIBE, PARSE};
use super::pinning;

/// A statement name no server ever has: closing it does nothing but answer CloseComplete.
const NOOP: &str = "meridian_noop";

/// One client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<String, Statement>,
}

struct Statement {
    server_name: String,
    /// Its text, for what the pooler reads in it (`pinning`).
    query: String,
    /// The client's Parse, renamed to `server_name`.
    parse: BytesMut,
    /// What the pooler reads in `query`, read once at Parse.
    reading: pinning::Reading,
}

impl Statement {
    fn new(server_name: String, query: String, parse: BytesMut) -> Statement {
        let reading = pinning::read(&query);
        Statement { server_name, query, parse, reading }
    }
}

impl ClientStatements {
    /// The query of the client's statement `name` (None: unnamed or unknown).
    pub fn query_of(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(|s| s.query.as_str())
    }

    /// What the pooler read in the query of the client's statement `name`.
    pub fn reading_of(&self, name: &str) -> Option<pinning::Reading> {
        self.by_name.get(name).map(|s| s.reading)
    }
}

/// The statements one server connection has (or has been sent, unanswered).
#[derive(Default)]
pub struct ServerStatements {
    ready: HashSet<String>,
    pending: HashSet<String>,
}

impl ServerStatements {
    fn has(&self, name: &str) -> bool {
        self.ready.contains(name) || self.pending.contains(name)
    }

    /// Forgets everything: the server dropped its statements (DISCARD, DEALLOCATE).
    pub fn clear(&mut self) {
        self.ready.clear();
        self.pending.clear();
    }
}

/// What to do with the next ParseComplete or CloseComplete from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub fate: Fate,
    /// The server statement this answer confirms.
    pub parsed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Forward,
    Drop,
    AsParseComplete,
    /// Not an answer to edit: where a Sync (or Query, FunctionCall) ends a
    /// run of messages, answered by a ReadyForQuery. An error skips the rest
    /// of its run only; a client may have sent the next already.
    Ready,
}

/// The server-side name of a statement: the same query and types give the same name.
pub fn server_name(query: &str, types: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(query.as_bytes());
    h.update([0]);
    h.update(types);
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("meridian_{hex}")
}

/// Appends to `out` what the server must be sent for the client's `message`,
/// and to `expect` how to treat the ParseComplete/CloseComplete answers.
pub fn translate(
    message: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    out: &mut BytesMut,
    expect: &mut VecDeque<Expect>,
) -> Result<()> {
    match messages::tag(message) {
        PARSE => {
            let (name, query, types) = messages::parse_fields(message)?;
            if name.is_empty() {
                out.put_slice(message);
                expect.push_back(Expect { fate: Fate::Forward, parsed: None });
                return Ok(());
            }
            let server_name = server_name(query, types);
            let parse = messages::parse_named(message, &server_name)?;
            if server.has(&server_name) {
                out.put_slice(&messages::target_named(CLOSE, NOOP));
                expect.push_back(Expect { fate: Fate::AsParseComplete, parsed: None });
            } else {
                out.put_slice(&parse);
                server.pending.insert(server_name.clone());
                expect.push_back(Expect { fate: Fate::Forward, parsed: Some(server_name.clone()) });
            }
            client.by_name.insert(name.to_string(), Statement::new(server_name, query.to_string(), parse));
        }
        BIND => {
            let name = messages::bind_statement(message)?;
            match ensure(name, client, server, out, expect) {
                Some(server_name) => messages::put_bind_named(out, message, server_name)?,
                None => out.put_slice(message),
            }
        }
        DESCRIBE => {
            let (kind, name) = messages::target(message)?;
            match (kind, ensure(name, client, server, out, expect)) {
                (b'S', Some(server_name)) => out.put_slice(&messages::target_named(DESCRIBE, server_name)),
                _ => out.put_slice(message),
            }
        }
        CLOSE => {
            let (kind, name) = messages::target(message)?;
            if kind == b'S' && !name.is_empty() {
                client.by_name.remove(name);
                out.put_slice(&messages::target_named(CLOSE, NOOP));
            } else {
                out.put_slice(message);
            }
            expect.push_back(Expect { fate: Fate::Forward, parsed: None });
        }
        messages::SYNC | messages::QUERY | messages::FUNCTION_CALL => {
            out.put_slice(message);
            expect.push_back(Expect { fate: Fate::Ready, parsed: None });
        }
        _ => out.put_slice(message),
    }
    Ok(())
}

/// The server name for the client's statement `name`, sending its Parse
/// first if this server lacks it; None for the unnamed statement or one the
/// client never prepared (the server then answers as it would).
fn ensure<'c>(
    name: &str,
    client: &'c ClientStatements,
    server: &mut ServerStatements,
    out: &mut BytesMut,
    expect: &mut VecDeque<Expect>,
) -> Option<&'c str> {
    if name.is_empty() {
        return None;
    }
    let statement = client.by_name.get(name)?;
    if !server.has(&statement.server_name) {
        out.put_slice(&statement.parse);
        server.pending.insert(statement.server_name.clone());
        expect.push_back(Expect { fate: Fate::Drop, parsed: Some(statement.server_name.clone()) });
    }
    Some(&statement.server_name)
}

/// A ParseComplete or CloseComplete arrived: what to do with it, and the
/// server statement it proved valid, if it answered a Parse.
pub fn answered(server: &mut ServerStatements, expect: &mut VecDeque<Expect>) -> (Fate, Option<String>) {
    if expect.front().is_none_or(|e| e.fate == Fate::Ready) {
        return (Fate::Forward, None);
    }
    let Some(e) = expect.pop_front() else { return (Fate::Forward, None) };
    if let Some(name) = &e.parsed {
        server.pending.remove(name);
        server.ready.insert(name.clone());
    }
    (e.fate, e.parsed)
}

/// Answers, without a server, a batch that only prepares statements some
/// server has already accepted (`valid`) or closes statements, each followed
/// by Sync: the answers to send, or None when the batch needs a server.
///
/// This matters beyond saving a round trip: libpq's PQprepare waits for its
/// answer, so a client program driving many connections from one thread
/// (pgbench) would block on a full pool while the connections it holds
/// elsewhere wait for it.
pub fn answer_alone(
    batch: &[BytesMut],
    client: &mut ClientStatements,
    valid: &dyn Fn(&str) -> bool,
) -> Result<Option<BytesMut>> {
    let ends_with_sync = batch.last().is_some_and(|m| messages::tag(m) == messages::SYNC);
    let mut statements = Vec::new();
    for m in batch {
        match messages::tag(m) {
            messages::SYNC => {}
            PARSE => {
                let (name, query, types) = messages::parse_fields(m)?;
                let server_name = server_name(query, types);
                if name.is_empty() || !valid(&server_name) {
                    return Ok(None);
                }
                statements.push((PARSE, name.to_string(), Some((server_name, query.to_string(), m))));
            }
            CLOSE => match messages::target(m)? {
                (b'S', name) if !name.is_empty() => statements.push((CLOSE, name.to_string(), None)),
                _ => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    if !ends_with_sync {
        return Ok(None);
    }
    let mut out = BytesMut::new();
    for m in batch {
        match messages::tag(m) {
            messages::SYNC => out.put_slice(&messages::ready_for_query(b'I')),
            PARSE => out.put_slice(&[messages::PARSE_COMPLETE, 0, 0, 0, 4]),
            _ => out.put_slice(&[messages::CLOSE_COMPLETE, 0, 0, 0, 4]),
        }
    }
    for (kind, name, parsed) in statements {
        match (kind, parsed) {
            (PARSE, Some((server_name, query, m))) => {
                let parse = messages::parse_named(m, &server_name)?;
                client.by_name.insert(name, Statement::new(server_name, query, parse));
            }
            _ => {
                client.by_name.remove(&name);
            }
        }
    }
    Ok(Some(out))
}

/// An ErrorResponse arrived: the server skips to the next Sync, so nothing
/// sent after the failed message in its run is answered, and the Parses of
/// the run not yet answered failed. Runs after it are answered as usual.
pub fn failed(server: &mut ServerStatements, expect: &mut VecDeque<Expect>) {
    while let Some(e) = expect.front().filter(|e| e.fate != Fate::Ready) {
        if let Some(name) = &e.parsed {
            server.pending.remove(name);
        }
        expect.pop_front();
    }
}

/// A ReadyForQuery arrived: its run is over.
pub fn ready(expect: &mut VecDeque<Expect>) {
    while let Some(e) = expect.pop_front() {
        if e.fate == Fate::Ready {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn parse(name: &str, query: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::parse(name, query, [], &mut b).unwrap();
        b
    }

    fn bind(statement: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::bind(
            "",
            statement,
            [],
            Vec::<i32>::new(),
            |_, _| Ok::<_, Box<dyn std::error::Error + Sync + Send>>(postgres_protocol::IsNull::No),
            [],
            &mut b,
        )
        .map_err(|_| ())
        .unwrap();
        b
    }

    /// The messages in `out`, as (type, statement name) pairs.
    fn sent(out: &BytesMut) -> Vec<(char, String)> {
        let mut v = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let len = i32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            let m = &rest[..1 + len];
            let name = match m[0] {
                PARSE => messages::parse_fields(m).unwrap().0.to_string(),
                BIND => messages::bind_statement(m).unwrap().to_string(),
                CLOSE | DESCRIBE => messages::target(m).unwrap().1.to_string(),
                _ => String::new(),
            };
            v.push((m[0] as char, name));
            rest = &rest[1 + len..];
        }
        v
    }

    #[test]
    fn a_statement_follows_its_client_to_another_server() {
        let (mut client, mut a, mut b) = Default::default();
        let mut expect = VecDeque::new();
        let mut out = BytesMut::new();
        let q = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        let name = server_name(q, &[0, 0]);
        translate(&parse("P0_1", q), &mut client, &mut a, &mut out, &mut expect).unwrap();
        translate(&bind("P0_1"), &mut client, &mut a, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('P', name.clone()), ('B', name.clone())]);
        assert_eq!(
            answered(&mut a, &mut expect),
            (Fate::Forward, Some(name.clone())),
            "the client's own ParseComplete"
        );
        assert!(expect.is_empty());

        // The next transaction gets server b, which has never seen it.
        out.clear();
        translate(&bind("P0_1"), &mut client, &mut b, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('P', name.clone()), ('B', name.clone())]);
        assert_eq!(answered(&mut b, &mut expect).0, Fate::Drop, "the pooler's Parse is not answered to the client");

        // Back on a: no Parse again.
        out.clear();
        translate(&bind("P0_1"), &mut client, &mut a, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('B', name)]);
        assert!(expect.is_empty());
    }

    #[test]
    fn an_error_skips_only_its_own_run_of_pipelined_messages() {
        let (mut client, mut server) = (ClientStatements::default(), ServerStatements::default());
        let mut expect = VecDeque::new();
        let mut out = BytesMut::new();
        let sync = || BytesMut::from(&[messages::SYNC, 0, 0, 0, 4][..]);
        let (bad, good) = ("SELEC 1", "SELECT 2");
        let good_name = server_name(good, &[0, 0]);
        // The server already has the second query: its Parse becomes a no-op
        // Close whose CloseComplete the client must see as a ParseComplete.
        translate(&parse("s9", good), &mut client, &mut server, &mut out, &mut expect).unwrap();
        answered(&mut server, &mut expect);
        ready(&mut expect);
        out.clear();
        // Two runs in one write, as tokio-postgres sends a Close and the next prepare.
        for m in [parse("s1", bad), sync(), parse("s2", good), sync()] {
            translate(&m, &mut client, &mut server, &mut out, &mut expect).unwrap();
        }
        failed(&mut server, &mut expect); // the first run's Parse fails
        ready(&mut expect);
        assert!(!server.has(&server_name(bad, &[0, 0])), "a failed Parse leaves nothing on the server");
        assert_eq!(
            answered(&mut server, &mut expect),
            (Fate::AsParseComplete, None),
            "the second run is still answered as the client expects (before: cleared, forwarded as CloseComplete)"
        );
        ready(&mut expect);
        assert!(server.has(&good_name));
        assert_eq!(expect, VecDeque::new());
    }

    #[test]
    fn a_second_client_preparing_the_same_query_reuses_the_servers_statement() {
        let (mut c1, mut c2, mut server) = Default::default();
        let mut expect = VecDeque::new();
        let mut out = BytesMut::new();
        translate(&parse("s", "SELECT 1"), &mut c1, &mut server, &mut out, &mut expect).unwrap();
        answered(&mut server, &mut expect);
        out.clear();
        translate(&parse("other", "SELECT 1"), &mut c2, &mut server, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('C', NOOP.into())], "a no-op stands in for the Parse");
        assert_eq!(answered(&mut server, &mut expect), (Fate::AsParseComplete, None));
    }

    #[test]
    fn close_stays_with_the_client_and_unknown_or_unnamed_statements_pass() {
        let (mut client, mut server) = Default::default();
        let mut expect = VecDeque::new();
        let mut out = BytesMut::new();
        translate(&parse("s", "SELECT 1"), &mut client, &mut server, &mut out, &mut expect).unwrap();
        answered(&mut server, &mut expect);
        out.clear();
        translate(&messages::target_named(CLOSE, "s"), &mut client, &mut server, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('C', NOOP.into())]);
        assert!(client.query_of("s").is_none());
        out.clear();
        translate(&bind("s"), &mut client, &mut server, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('B', "s".into())], "closed: the server answers that it does not exist");
        out.clear();
        translate(&parse("", "SELECT 2"), &mut client, &mut server, &mut out, &mut expect).unwrap();
        translate(&bind(""), &mut client, &mut server, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out), vec![('P', String::new()), ('B', String::new())]);
    }

    #[test]
    fn preparing_a_statement_a_server_accepted_needs_no_server() {
        let mut client = ClientStatements::default();
        let sync = BytesMut::from(&[messages::SYNC, 0, 0, 0, 4][..]);
        let known = server_name("SELECT 1", &[0, 0]);
        let valid = |n: &str| n == known;
        let batch = vec![parse("s", "SELECT 1"), sync.clone()];
        let out = answer_alone(&batch, &mut client, &valid).unwrap().expect("answered alone");
        assert_eq!(&out[..], &[b'1', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']);
        assert_eq!(client.query_of("s"), Some("SELECT 1"));
        let close = vec![messages::target_named(CLOSE, "s"), sync.clone()];
        assert!(answer_alone(&close, &mut client, &valid).unwrap().is_some());
        assert_eq!(client.query_of("s"), None);
        // Not yet accepted by any server (its errors are the server's to tell), or no Sync: a server is needed.
        assert!(answer_alone(&[parse("t", "SELEC 1"), sync.clone()], &mut client, &valid).unwrap().is_none());
        assert!(answer_alone(&[parse("s", "SELECT 1")], &mut client, &valid).unwrap().is_none());
        assert!(answer_alone(&[parse("", "SELECT 1"), sync], &mut client, &valid).unwrap().is_none());
        assert_eq!(client.query_of("t"), None, "nothing remembered from a batch that needs a server");
    }

    #[test]
    fn a_failed_parse_is_sent_again_next_time() {
        let (mut client, mut server) = Default::default();
        let mut expect = VecDeque::new();
        let mut out = BytesMut::new();
        translate(&parse("s", "SELEC 1"), &mut client, &mut server, &mut out, &mut expect).unwrap();
        failed(&mut server, &mut expect);
        out.clear();
        translate(&bind("s"), &mut client, &mut server, &mut out, &mut expect).unwrap();
        assert_eq!(sent(&out).len(), 2, "Parse again, then Bind");
    }
}
