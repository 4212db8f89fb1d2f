//! What a statement does to its session, read from its text: whether it
//! leaves state on the server connection that outlives the transaction (so a
//! transaction-pooled client must keep that connection: it is *pinned*), and
//! whether it begins or ends a transaction.
//!
//! The rules are RDS Proxy's and PgBouncer's: `SET` (not `SET LOCAL`),
//! temporary tables, session advisory locks, `LISTEN`, `WITH HOLD` cursors,
//! SQL-level `PREPARE`, `LOAD`, and what drops the pooler's prepared
//! statements (`DEALLOCATE`, `DISCARD`). A reported setting the server
//! announces after login (ParameterStatus) pins too, so a `SET` hidden in a
//! function is caught when the server tells. Reading is lexical: quotes,
//! dollar quotes and comments are skipped, and what is not recognised does
//! not pin.

use std::fmt;
use std::sync::LazyLock;

use aho_corasick::AhoCorasick;

/// Why a session is pinned to its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Set,
    TemporaryTable,
    AdvisoryLock,
    Listen,
    HoldCursor,
    Prepare,
    Load,
    Deallocate,
    /// The server reported a changed setting.
    ReportedSetting,
}

impl Pin {
    /// A short name for `/metrics` labels.
    pub fn label(self) -> &'static str {
        match self {
            Pin::Set => "set",
            Pin::TemporaryTable => "temporary_table",
            Pin::AdvisoryLock => "advisory_lock",
            Pin::Listen => "listen",
            Pin::HoldCursor => "hold_cursor",
            Pin::Prepare => "prepare",
            Pin::Load => "load",
            Pin::Deallocate => "deallocate",
            Pin::ReportedSetting => "reported_setting",
        }
    }

    pub const ALL: [Pin; 9] = [
        Pin::Set,
        Pin::TemporaryTable,
        Pin::AdvisoryLock,
        Pin::Listen,
        Pin::HoldCursor,
        Pin::Prepare,
        Pin::Load,
        Pin::Deallocate,
        Pin::ReportedSetting,
    ];
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pin::Set => "SET outside a transaction's scope (use SET LOCAL)",
            Pin::TemporaryTable => "a temporary table",
            Pin::AdvisoryLock => "a session advisory lock (use pg_advisory_xact_lock)",
            Pin::Listen => "LISTEN",
            Pin::HoldCursor => "a WITH HOLD cursor",
            Pin::Prepare => "SQL-level PREPARE (use the protocol's prepared statements)",
            Pin::Load => "LOAD",
            Pin::Deallocate => "DEALLOCATE or DISCARD",
            Pin::ReportedSetting => "a setting the server reported as changed",
        })
    }
}

/// How the first statement of a text bears on the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    Begin,
    Commit,
    Rollback,
    Other,
}

/// What the pooler reads in a text: the first reason it pins its session,
/// if any, and whether any of its statements opens a transaction block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub pins: Option<Pin>,
    pub begins: bool,
}

/// Reads `sql` once for both questions (a prepared statement's reading is
/// kept with it, so its executions are not read again).
pub fn read(sql: &str) -> Reading {
    if !LOOK_WORDS.is_match(sql) {
        return Reading::default();
    }
    let statements = statements(sql);
    Reading {
        pins: statements.iter().find_map(|words| statement_pins(words)),
        begins: statements.iter().any(|w| boundary_of(w) == Boundary::Begin),
    }
}

/// What the first statement of `sql` does to the transaction.
pub fn boundary(sql: &str) -> Boundary {
    if !BOUNDARY_WORDS.is_match(sql) {
        return Boundary::Other;
    }
    statements(sql).first().map(|w| boundary_of(w)).unwrap_or(Boundary::Other)
}

/// Text without any of these (in any case, anywhere, even inside a longer
/// word) can neither pin nor begin a block: each rule below needs one of them
/// as a word. Most statements of a workload have none, and are not lexed at all.
static LOOK_WORDS: LazyLock<AhoCorasick> = LazyLock::new(|| {
    words(&[
        "SET",
        "TEMP",
        "LISTEN",
        "DECLARE",
        "PREPARE",
        "LOAD",
        "DEALLOCATE",
        "DISCARD",
        "ADVISORY",
        "BEGIN",
        "START",
    ])
});
static BOUNDARY_WORDS: LazyLock<AhoCorasick> =
    LazyLock::new(|| words(&["BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"]));

fn words(w: &[&str]) -> AhoCorasick {
    AhoCorasick::builder().ascii_case_insensitive(true).build(w).expect("a handful of fixed words")
}

fn boundary_of(words: &[String]) -> Boundary {
    let w = |i: usize| words.get(i).map(String::as_str);
    match (w(0), w(1)) {
        (Some("BEGIN"), _) | (Some("START"), Some("TRANSACTION")) => Boundary::Begin,
        (Some("COMMIT" | "END"), next) if next != Some("PREPARED") => Boundary::Commit,
        (Some("ROLLBACK" | "ABORT"), next) if !matches!(next, Some("PREPARED" | "TO")) => Boundary::Rollback,
        _ => Boundary::Other,
    }
}

fn statement_pins(words: &[String]) -> Option<Pin> {
    let w = |i: usize| words.get(i).map(String::as_str);
    let pin = match w(0)? {
        "SET" => match w(1) {
            Some("LOCAL" | "TRANSACTION" | "CONSTRAINTS") => None,
            _ => Some(Pin::Set),
        },
        "CREATE" => {
            let temp = |i| matches!(w(i), Some("TEMP" | "TEMPORARY"));
            (temp(1) || (matches!(w(1), Some("GLOBAL" | "LOCAL")) && temp(2))).then_some(Pin::TemporaryTable)
        }
        "LISTEN" => Some(Pin::Listen),
        "DECLARE" => words.windows(2).any(|p| p[0] == "WITH" && p[1] == "HOLD").then_some(Pin::HoldCursor),
        "PREPARE" => Some(Pin::Prepare),
        "LOAD" => Some(Pin::Load),
        "DEALLOCATE" | "DISCARD" => Some(Pin::Deallocate),
        _ => None,
    };
    pin.or_else(|| {
        words.iter().enumerate().find_map(|(i, word)| match word.as_str() {
            "PG_ADVISORY_LOCK" | "PG_ADVISORY_LOCK_SHARED" | "PG_TRY_ADVISORY_LOCK" | "PG_TRY_ADVISORY_LOCK_SHARED" => {
                Some(Pin::AdvisoryLock)
            }
            // set_config(name, value, is_local): pins unless is_local is literally true.
            "SET_CONFIG" => (words.get(i + 1..i + 4).is_none_or(|a| a.last().map(String::as_str) != Some("TRUE")))
                .then_some(Pin::Set),
            "INTO" if matches!(w(i + 1), Some("TEMP" | "TEMPORARY")) => Some(Pin::TemporaryTable),
            _ => None,
        })
    })
}

/// The statements of `sql`, each as its words and literal values in upper
/// case (string literals as one `'` word, so `set_config`'s arguments count);
/// quotes, dollar quotes and comments skipped.
fn statements(sql: &str) -> Vec<Vec<String>> {
    let b = sql.as_bytes();
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b';' => {
                out.push(Vec::new());
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in PostgreSQL.
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' | b'"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == c && b.get(i + 1) == Some(&c) {
                        i += 2; // a doubled quote inside
                    } else if b[i] == c {
                        i += 1;
                        break;
                    } else {
                        i += 1;
                    }
                }
                if c == b'\'' {
                    out.last_mut().expect("one at least").push("'".into());
                }
            }
            b'$' => {
                // $tag$ ... $tag$ (a parameter $1 has a digit after the dollar).
                let tag_end = b[i + 1..].iter().position(|x| !(x.is_ascii_alphanumeric() || *x == b'_'));
                match tag_end.map(|n| i + 1 + n) {
                    Some(end) if b[end] == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &b[i..=end];
                        let body = end + 1;
                        i = b[body..]
                            .windows(tag.len())
                            .position(|w| w == tag)
                            .map(|p| body + p + tag.len())
                            .unwrap_or(b.len());
                        out.last_mut().expect("one at least").push("'".into());
                    }
                    _ => i += 1,
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$') {
                    i += 1;
                }
                out.last_mut().expect("one at least").push(sql[start..i].to_ascii_uppercase());
            }
            _ => i += 1,
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_pins_and_transaction_scoped_state_does_not() {
        let cases: &[(&str, Option<Pin>)] = &[
            ("SELECT 1", None),
            ("INSERT INTO t VALUES ('SET x = 1')", None),
            ("set search_path = app", Some(Pin::Set)),
            ("SET SESSION statement_timeout = 5", Some(Pin::Set)),
            ("SET LOCAL statement_timeout = 5", None),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
            ("BEGIN; SET LOCAL x = 1; COMMIT", None),
            ("create temp table x (a int)", Some(Pin::TemporaryTable)),
            ("CREATE GLOBAL TEMPORARY TABLE x (a int)", Some(Pin::TemporaryTable)),
            ("CREATE TABLE temp (a int)", None),
            ("SELECT * INTO TEMP t FROM x", Some(Pin::TemporaryTable)),
            ("SELECT pg_advisory_lock(1)", Some(Pin::AdvisoryLock)),
            ("select pg_try_advisory_lock_shared(1, 2)", Some(Pin::AdvisoryLock)),
            ("SELECT pg_advisory_xact_lock(1)", None),
            ("LISTEN jobs", Some(Pin::Listen)),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Some(Pin::HoldCursor)),
            ("DECLARE c CURSOR FOR SELECT 1", None),
            ("PREPARE p AS SELECT 1", Some(Pin::Prepare)),
            ("DISCARD ALL", Some(Pin::Deallocate)),
            ("DEALLOCATE ALL", Some(Pin::Deallocate)),
            ("LOAD 'auto_explain'", Some(Pin::Load)),
            ("SELECT set_config('a.b', 'c', false)", Some(Pin::Set)),
            ("SELECT set_config('a.b', 'c', true)", None),
            ("SELECT 1; SET x = 2", Some(Pin::Set)),
            ("-- SET x = 1\nSELECT 1", None),
            ("/* SET /* nested */ x */ SELECT 1", None),
            ("SELECT $$ SET x = 1 $$, $1", None),
            ("SELECT $f$ LISTEN x $f$", None),
            ("SELECT \"SET\" FROM t", None),
        ];
        for (sql, want) in cases {
            assert_eq!(read(sql).pins, *want, "{sql}");
        }
    }

    proptest::proptest! {
        /// The quick look only skips text that the lexer would find nothing in.
        #[test]
        fn the_quick_look_changes_no_answer(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "set", "SET", "local", "session", "temp", "TEMPORARY", "create", "table", "listen", "declare", "c",
                "cursor", "with", "hold", "for", "prepare", "load", "deallocate", "discard", "all",
                "pg_advisory_lock", "set_config", "into", "begin", "start", "transaction", "commit", "end",
                "rollback", "abort", "to", "select", "1", "true", "false", "'x'", "$$", "--", "\n", "/*", "*/",
                ";", "(", ")", ",", "\"", "x", "preparedness", "offset", "unloaded",
            ]), 0..12)
        ) {
            let sql = parts.join(" ");
            let lexed = statements(&sql);
            proptest::prop_assert_eq!(read(&sql).pins, lexed.iter().find_map(|w| statement_pins(w)), "{}", sql);
            proptest::prop_assert_eq!(
                read(&sql).begins,
                lexed.iter().any(|w| boundary_of(w) == Boundary::Begin),
                "{}", sql
            );
            proptest::prop_assert_eq!(
                boundary(&sql),
                lexed.first().map(|w| boundary_of(w)).unwrap_or(Boundary::Other),
                "{}", sql
            );
        }
    }

    #[test]
    fn transaction_boundaries_are_recognised() {
        assert_eq!(boundary("BEGIN"), Boundary::Begin);
        assert_eq!(boundary("start transaction read only"), Boundary::Begin);
        assert_eq!(boundary("commit"), Boundary::Commit);
        assert_eq!(boundary("END"), Boundary::Commit);
        assert_eq!(boundary("ROLLBACK"), Boundary::Rollback);
        assert_eq!(boundary("abort"), Boundary::Rollback);
        assert_eq!(boundary("ROLLBACK TO SAVEPOINT a"), Boundary::Other);
        assert_eq!(boundary("COMMIT PREPARED 'x'"), Boundary::Other);
        assert_eq!(boundary("SELECT 1"), Boundary::Other);
        assert_eq!(boundary(""), Boundary::Other);
        assert!(read("SELECT 1; BEGIN; INSERT INTO t VALUES (1)").begins);
        assert!(!read("INSERT INTO t VALUES ('BEGIN')").begins);
    }
}
