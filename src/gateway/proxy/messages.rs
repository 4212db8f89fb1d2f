//! Framing the PostgreSQL protocol for the pooler: whole frontend messages
//! read from a client, backend messages scanned on their way back, and the
//! few messages the pooler writes itself. Headers and the messages the proxy
//! writes come from `postgres-protocol`; what it splices by hand is only the
//! statement name inside Parse, Bind, Describe and Close (that crate encodes
//! frontend messages but does not parse them).

use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use postgres_protocol::message::backend::Header;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frontend message types the pooler looks into.
pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';
pub const FUNCTION_CALL: u8 = b'F';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';

/// Backend message types it looks into.
pub const READY_FOR_QUERY: u8 = b'Z';
pub const PARAMETER_STATUS: u8 = b'S';
pub const ERROR_RESPONSE: u8 = b'E';
pub const PARSE_COMPLETE: u8 = b'1';
pub const CLOSE_COMPLETE: u8 = b'3';

/// Whole messages from a stream. `next` is cancel-safe: what was read stays
/// buffered, so it can sit in a `select!` beside the server's side.
pub struct Reader<R> {
    inner: R,
    buf: BytesMut,
    /// A longer message is refused: it is garbage or an attack.
    max_message: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R, max_message: usize) -> Reader<R> {
        Reader { inner, buf: BytesMut::with_capacity(16 * 1024), max_message }
    }

    /// The next whole message (type, length, body); None when the peer closed between messages.
    pub async fn next(&mut self) -> Result<Option<BytesMut>> {
        loop {
            if let Some(m) = self.buffered()? {
                return Ok(Some(m));
            }
            if self.inner.read_buf(&mut self.buf).await.context("read")? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("the connection closed in the middle of a message");
            }
        }
    }

    /// A whole message already read, if any; never waits.
    pub fn buffered(&mut self) -> Result<Option<BytesMut>> {
        let Some(header) = Header::parse(&self.buf).context("parse a message header")? else { return Ok(None) };
        let total = 1 + header.len() as usize;
        if header.len() < 4 || total > self.max_message {
            bail!("message of type {:?} with length {} is out of bounds", header.tag() as char, header.len());
        }
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(total)))
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// A message's type byte.
pub fn tag(message: &[u8]) -> u8 {
    message[0]
}

/// A message's body (after type and length).
pub fn body(message: &[u8]) -> &[u8] {
    &message[5..]
}

/// The NUL-terminated string at the start of `bytes`, and what follows it.
pub fn cstr(bytes: &[u8]) -> Result<(&str, &[u8])> {
    let nul = bytes.iter().position(|b| *b == 0).context("a string without its NUL")?;
    let s = std::str::from_utf8(&bytes[..nul]).context("a string that is not UTF-8")?;
    Ok((s, &bytes[nul + 1..]))
}

/// The text of a simple Query.
pub fn query_text(message: &[u8]) -> Result<&str> {
    Ok(cstr(body(message))?.0)
}

/// Parse: the statement name, the query, and the rest (parameter types) as sent.
pub fn parse_fields(message: &[u8]) -> Result<(&str, &str, &[u8])> {
    let (name, rest) = cstr(body(message))?;
    let (query, types) = cstr(rest)?;
    Ok((name, query, types))
}

/// Bind: the statement name (after the portal's).
pub fn bind_statement(message: &[u8]) -> Result<&str> {
    let (_portal, rest) = cstr(body(message))?;
    Ok(cstr(rest)?.0)
}

/// Describe or Close: 'S' (statement) or 'P' (portal), and the name.
pub fn target(message: &[u8]) -> Result<(u8, &str)> {
    let b = body(message);
    let kind = *b.first().context("an empty Describe or Close")?;
    Ok((kind, cstr(&b[1..])?.0))
}

/// Parse with another statement name, the query and types unchanged.
pub fn parse_named(message: &[u8], name: &str) -> Result<BytesMut> {
    let (_, query, types) = parse_fields(message)?;
    let mut body = BytesMut::with_capacity(message.len() + name.len());
    put_cstr(&mut body, name);
    put_cstr(&mut body, query);
    body.put_slice(types);
    Ok(frame(PARSE, &body))
}

/// Appends to `out` the Bind `message` with another statement name, the
/// rest unchanged (written in place: a Bind goes out with every execution).
pub fn put_bind_named(out: &mut BytesMut, message: &[u8], name: &str) -> Result<()> {
    let (portal, rest) = cstr(body(message))?;
    let (old, after) = cstr(rest)?;
    let len = message.len() - 1 - old.len() + name.len();
    out.reserve(len + 1);
    out.put_u8(BIND);
    out.put_i32(i32::try_from(len).context("a Bind too long to rename")?);
    put_cstr(out, portal);
    put_cstr(out, name);
    out.put_slice(after);
    Ok(())
}

/// Describe or Close (`kind_of_message`) of statement `name`.
pub fn target_named(kind_of_message: u8, name: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(name.len() + 7);
    let written = match kind_of_message {
        DESCRIBE => frontend::describe(b'S', name, &mut buf),
        _ => frontend::close(b'S', name, &mut buf),
    };
    written.expect("a statement name the proxy made has no NUL");
    buf
}

/// ReadyForQuery with `status` (`I`, `T` or `E`).
pub fn ready_for_query(status: u8) -> [u8; 6] {
    [READY_FOR_QUERY, 0, 0, 0, 5, status]
}

/// BackendKeyData.
pub fn backend_key_data(pid: i32, key: i32) -> BytesMut {
    let mut body = BytesMut::with_capacity(8);
    body.put_i32(pid);
    body.put_i32(key);
    frame(b'K', &body)
}

/// An ErrorResponse of severity ERROR (the session goes on), with a hint.
pub fn error(code: &str, message: &str, hint: &str) -> BytesMut {
    let mut body = BytesMut::new();
    for (field, value) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', message), (b'H', hint)] {
        if value.is_empty() {
            continue;
        }
        body.put_u8(field);
        put_cstr(&mut body, &value.replace('\0', " "));
    }
    body.put_u8(0);
    frame(ERROR_RESPONSE, &body)
}

/// One field of an ErrorResponse (`C` code, `M` message, `V` severity).
pub fn error_field(message: &[u8], wanted: u8) -> Option<String> {
    let mut fields = body(message);
    while let Some((&field, rest)) = fields.split_first() {
        if field == 0 {
            break;
        }
        let (value, after) = cstr(rest).ok()?;
        if field == wanted {
            return Some(value.to_string());
        }
        fields = after;
    }
    None
}

fn frame(kind: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(kind);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
    out
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// What the scan of the server's bytes found, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// ReadyForQuery with its status byte.
    Ready(u8),
    /// A ParameterStatus after login: a reported setting changed (by the
    /// session, or by the server's own state, as `in_hot_standby` when a
    /// standby is promoted), at `offset` and `len` bytes long.
    Parameter { name: String, offset: usize, len: usize },
    /// An ErrorResponse: its SQLSTATE, its message, and whether it is FATAL
    /// or PANIC (the server closes the connection after it), at `offset`
    /// and `len` bytes long.
    Error { code: String, message: String, fatal: bool, offset: usize, len: usize },
    /// ParseComplete or CloseComplete, at `offset` in the scanned bytes (the
    /// pooler may drop or rewrite it: see `ServerScan::take`).
    Complete { kind: u8, offset: usize },
}

/// Walks the server's bytes message by message without holding whole
/// messages: rows of any size pass through as they arrive; only the small
/// messages the pooler acts on are looked into.
#[derive(Default)]
pub struct ServerScan {
    /// Bytes of the current (large, uninteresting) message still to pass.
    passing: usize,
}

impl ServerScan {
    /// Whether part of a message has been passed on and the rest not.
    pub fn in_message(&self) -> bool {
        self.passing > 0
    }

    /// Scans `buf`, returning how many bytes from its start are whole
    /// messages or parts of passing ones (ready to forward) and what was seen.
    pub fn scan(&mut self, buf: &[u8], seen: &mut Vec<Seen>) -> Result<usize> {
        let mut at = 0;
        loop {
            if self.passing > 0 {
                let n = self.passing.min(buf.len() - at);
                at += n;
                self.passing -= n;
                if self.passing > 0 {
                    return Ok(at);
                }
            }
            let rest = &buf[at..];
            if rest.len() < 5 {
                return Ok(at);
            }
            let kind = rest[0];
            let len = i32::from_be_bytes(rest[1..5].try_into().expect("4 bytes"));
            if len < 4 {
                bail!("the server sent a message of type {:?} with length {len}", kind as char);
            }
            let total = 1 + len as usize;
            match kind {
                READY_FOR_QUERY | PARAMETER_STATUS | ERROR_RESPONSE | PARSE_COMPLETE | CLOSE_COMPLETE => {
                    if rest.len() < total {
                        return Ok(at);
                    }
                    let m = &rest[..total];
                    seen.push(match kind {
                        READY_FOR_QUERY => Seen::Ready(*m.get(5).context("a ReadyForQuery without status")?),
                        PARAMETER_STATUS => {
                            Seen::Parameter { name: cstr(body(m))?.0.to_string(), offset: at, len: total }
                        }
                        ERROR_RESPONSE => {
                            let field = |f| error_field(m, f).unwrap_or_default();
                            Seen::Error {
                                code: field(b'C'),
                                message: field(b'M'),
                                fatal: matches!(field(b'V').as_str(), "FATAL" | "PANIC"),
                                offset: at,
                                len: total,
                            }
                        }
                        _ => Seen::Complete { kind, offset: at },
                    });
                    at += total;
                }
                _ => {
                    at += 5;
                    self.passing = total - 5;
                }
            }
        }
    }
}

/// Drops messages from `out`, or rewrites one as an empty message of another
/// type (ParseComplete for CloseComplete); `edits` are (offset, length,
/// replacement type or None to drop), in increasing offset order.
pub fn edit_messages(out: &mut BytesMut, edits: &[(usize, usize, Option<u8>)]) {
    if edits.is_empty() {
        return;
    }
    let mut edited = BytesMut::with_capacity(out.len());
    let mut from = 0;
    for &(offset, len, replacement) in edits {
        edited.put_slice(&out[from..offset]);
        if let Some(kind) = replacement {
            edited.put_slice(&[kind, 0, 0, 0, 4]);
        }
        from = offset + len;
    }
    edited.put_slice(&out[from..]);
    *out = edited;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_msg(name: &str, query: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::parse(name, query, [23u32], &mut b).unwrap();
        b
    }

    #[tokio::test]
    async fn the_reader_yields_whole_messages_across_short_reads_and_refuses_huge_ones() {
        let mut wire = parse_msg("s1", "SELECT $1").to_vec();
        wire.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        let (a, mut b) = tokio::io::duplex(3); // three bytes at a time
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            b.write_all(&wire).await.unwrap();
        });
        let mut r = Reader::new(a, 1024);
        let first = r.next().await.unwrap().unwrap();
        assert_eq!(parse_fields(&first).unwrap().0, "s1");
        assert_eq!(tag(&r.next().await.unwrap().unwrap()), SYNC);
        writer.await.unwrap();
        assert!(r.next().await.unwrap().is_none(), "a clean close between messages");

        let (a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            b.write_all(&[b'Q', 0, 1, 0, 0]).await.unwrap();
        });
        let e = Reader::new(a, 1024).next().await.unwrap_err();
        assert!(format!("{e:#}").contains("out of bounds"), "{e:#}");
    }

    #[test]
    fn statement_names_are_spliced_without_touching_the_rest() {
        let p = parse_msg("s1", "SELECT $1");
        let renamed = parse_named(&p, "mp_abc").unwrap();
        assert_eq!(parse_fields(&renamed).unwrap(), ("mp_abc", "SELECT $1", parse_fields(&p).unwrap().2));
        assert_eq!(i32::from_be_bytes(renamed[1..5].try_into().unwrap()) as usize, renamed.len() - 1);

        let mut b = BytesMut::new();
        frontend::bind(
            "portal",
            "s1",
            [1i16],
            [Some(7)],
            |v: Option<i32>, buf| {
                buf.put_i32(v.unwrap());
                Ok::<_, Box<dyn std::error::Error + Sync + Send>>(postgres_protocol::IsNull::No)
            },
            [1i16],
            &mut b,
        )
        .map_err(|_| ())
        .unwrap();
        let mut renamed = BytesMut::from(&b"tail"[..]);
        put_bind_named(&mut renamed, &b, "mp_abc").unwrap();
        assert_eq!(&renamed[..4], b"tail", "appended");
        let renamed = renamed.split_off(4);
        assert_eq!(
            i32::from_be_bytes(renamed[1..5].try_into().unwrap()) as usize,
            renamed.len() - 1,
            "the length counts itself and the body"
        );
        assert_eq!(bind_statement(&renamed).unwrap(), "mp_abc");
        assert_eq!(&renamed[renamed.len() - 12..], &b[b.len() - 12..], "parameters unchanged");
        assert_eq!(cstr(body(&renamed)).unwrap().0, "portal");

        let d = target_named(DESCRIBE, "mp_abc");
        assert_eq!(target(&d).unwrap(), (b'S', "mp_abc"));
    }

    #[test]
    fn the_scan_passes_rows_by_length_and_sees_the_small_messages() {
        let mut wire = BytesMut::new();
        wire.put_slice(&[PARSE_COMPLETE, 0, 0, 0, 4]);
        wire.put_u8(b'D'); // a DataRow of 100 bytes of body
        wire.put_i32(104);
        wire.put_slice(&[7u8; 100]);
        wire.put_slice(&error("40001", "m", "h"));
        wire.put_u8(PARAMETER_STATUS);
        wire.put_i32(4 + 15 + 4);
        wire.put_slice(b"in_hot_standby\0off\0");
        wire.put_slice(&ready_for_query(b'I'));
        let mut scan = ServerScan::default();
        let mut seen = Vec::new();
        // Fed in pieces, the bytes ready to forward never cut a small message.
        let mut forwarded = 0;
        for end in [3, 8, 50, 120, wire.len() - 2, wire.len()] {
            forwarded += scan.scan(&wire[forwarded..end], &mut seen).unwrap();
        }
        assert_eq!(forwarded, wire.len());
        // Offsets count from the start of the bytes each call scanned.
        let error_len = error("40001", "m", "h").len();
        assert_eq!(
            seen,
            vec![
                Seen::Complete { kind: PARSE_COMPLETE, offset: 0 },
                Seen::Error { code: "40001".into(), message: "m".into(), fatal: false, offset: 0, len: error_len },
                Seen::Parameter { name: "in_hot_standby".into(), offset: error_len, len: 24 },
                Seen::Ready(b'I')
            ]
        );
    }

    #[test]
    fn completions_are_dropped_or_rewritten_in_place() {
        let mut out = BytesMut::new();
        out.put_slice(&[PARSE_COMPLETE, 0, 0, 0, 4, CLOSE_COMPLETE, 0, 0, 0, 4, b'2', 0, 0, 0, 4]);
        edit_messages(&mut out, &[(0, 5, None), (5, 5, Some(PARSE_COMPLETE))]);
        assert_eq!(&out[..], &[PARSE_COMPLETE, 0, 0, 0, 4, b'2', 0, 0, 0, 4]);
    }

    #[test]
    fn an_error_response_carries_its_code_and_hint() {
        let e = error("08006", "gone", "retry the transaction");
        assert_eq!(error_field(&e, b'C').as_deref(), Some("08006"));
        assert_eq!(error_field(&e, b'V').as_deref(), Some("ERROR"));
        assert!(e.windows(3).any(|w| w == b"Hre"));
    }
}
