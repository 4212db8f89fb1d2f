//! What a failed pg_rewind allows: a data directory holding a valid copy is
//! never emptied because the upstream was unreachable or slow.
//!
//! pg_rewind fails for two kinds of reason. It could not talk to the source
//! (connection refused, timed out, the source hung or restarted), which says
//! nothing about the local copy: try again later and keep it. Or it proved
//! that the local history cannot be joined to the source's (the WAL back to
//! the divergence point is gone, the clusters are unrelated, the target lacks
//! checksums and wal_log_hints): only then may a fresh copy replace it. Only
//! the second kind is recognised by its message; anything not recognised
//! keeps the data, because a wrong "retry" costs a little time and a wrong
//! "copy afresh" can cost the last good copy.

/// What to do after pg_rewind failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRewindFailure {
    /// Keep the data; start it again as a standby and rewind on a later tick.
    KeepAndRetry,
    /// The local history cannot be repaired: make a fresh copy (beside the old
    /// data, swapped in once complete).
    FreshCopy,
}

/// pg_rewind's own words (PostgreSQL 15) for a divergence it cannot repair.
const UNREPAIRABLE: &[&str] = &[
    "could not find previous WAL record",
    "could not find common ancestor",
    "source and target clusters are from different systems",
    "clusters are not compatible with this version of pg_rewind",
    "target server needs to use either data checksums or",
];

/// Classifies a failed pg_rewind by what it printed.
pub fn after_rewind_failure(message: &str) -> AfterRewindFailure {
    // A connection problem is never proof, even if some other line matched.
    let connection = ["could not connect", "connection to server", "timeout expired", "server closed the connection"];
    if connection.iter().any(|c| message.contains(c)) {
        return AfterRewindFailure::KeepAndRetry;
    }
    // A WAL segment the rewind needs was removed locally.
    let wal_gone = message.contains("could not open file") && message.contains("pg_wal/");
    if wal_gone || UNREPAIRABLE.iter().any(|u| message.contains(u)) {
        AfterRewindFailure::FreshCopy
    } else {
        AfterRewindFailure::KeepAndRetry
    }
}

#[cfg(test)]
mod tests {
    use super::AfterRewindFailure::*;
    use super::*;

    #[test]
    fn only_proven_divergence_leads_to_a_fresh_copy() {
        let table = [
            // What the hung-primary incident printed: the data must stay.
            ("pg_rewind failed (exit status: 1) after 2.0s: pg_rewind: error: could not connect to server: timeout expired", KeepAndRetry),
            ("connection to server at \"127.0.1.12\", port 5432 failed: Connection refused", KeepAndRetry),
            ("pg_rewind: error: server closed the connection unexpectedly", KeepAndRetry),
            ("pg_rewind failed (signal: 9 (SIGKILL)) after 600.0s: ", KeepAndRetry),
            ("pg_rewind: error: could not find previous WAL record at 0/3000060", FreshCopy),
            ("pg_rewind: error: could not open file \"/d/pg_wal/000000010000000000000002\": No such file or directory", FreshCopy),
            ("pg_rewind: error: source and target clusters are from different systems", FreshCopy),
            ("pg_rewind: error: could not find common ancestor of the source and target cluster's timelines", FreshCopy),
            ("pg_rewind: fatal: something new in a later version", KeepAndRetry),
            ("pg_rewind: error: could not open file \"/d/global/pg_control\": Permission denied", KeepAndRetry),
            ("", KeepAndRetry),
        ];
        for (message, expected) in table {
            assert_eq!(after_rewind_failure(message), expected, "{message}");
        }
    }
}
