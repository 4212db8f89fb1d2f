//! What a server says about itself: recovery state, WAL positions, timeline,
//! replication. One query, so the values are from one moment.

use anyhow::{Context, Result};

use crate::cluster::Lsn;

/// One observation of a running server.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalStatus {
    pub in_recovery: bool,
    /// A primary: the timeline it writes. A standby: the newest timeline it
    /// has WAL of (see `STATUS_SQL`).
    pub timeline: Option<u32>,
    /// Primary: current insert position. Standby: last received.
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Seconds since the last replayed transaction committed on the primary.
    pub replay_age_seconds: Option<f64>,
    /// The walreceiver's state (`streaming`, `catchup`, ...), None when it is not running.
    pub receiver_status: Option<String>,
    /// The host the walreceiver connects to.
    pub receiver_host: Option<String>,
    /// `pg_stat_archiver`: the last file archived, how long ago, and the last
    /// that failed if it failed after that.
    pub last_archived: Option<String>,
    pub last_archived_age_seconds: Option<f64>,
    pub archive_failing: Option<String>,
}

/// A standby's timeline is the newest of: the walreceiver's, the newest
/// timeline among the WAL segment files it holds, and its last restartpoint's.
/// The walreceiver's alone is gone when its upstream dies, and the last
/// restartpoint's lags a timeline the standby followed since (restartpoints
/// come every few minutes): a drill found every healthy standby reporting
/// the timeline before the last failover once the new primary hung, refused
/// as "older than another candidate's", and the hung node, back with its
/// fresh control file, was the only one left to promote.
const STATUS_SQL: &str = "
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END::text,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_flush_lsn() END::text,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text,
       CASE WHEN pg_is_in_recovery()
            THEN greatest(
                   (SELECT received_tli FROM pg_stat_wal_receiver),
                   (SELECT timeline_id FROM pg_control_checkpoint()),
                   (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir()
                     WHERE name ~ '^[0-9A-F]{24}$'))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT sender_host FROM pg_stat_wal_receiver),
       a.last_archived_wal,
       extract(epoch FROM now() - a.last_archived_time)::float8,
       CASE WHEN a.last_failed_time > coalesce(a.last_archived_time, '-infinity') THEN a.last_failed_wal END
  FROM pg_stat_archiver a";

pub async fn query(client: &tokio_postgres::Client) -> Result<LocalStatus> {
    let row = client.query_one(STATUS_SQL, &[]).await.context("query server status")?;
    let lsn = |i: usize| -> Result<Option<Lsn>> {
        let text: Option<String> = row.try_get(i)?;
        text.map(|t| t.parse::<Lsn>().map_err(anyhow::Error::msg)).transpose()
    };
    Ok(LocalStatus {
        in_recovery: row.try_get(0)?,
        write_lsn: lsn(1)?,
        flush_lsn: lsn(2)?,
        replay_lsn: lsn(3)?,
        timeline: row.try_get::<_, Option<i32>>(4)?.map(|t| t as u32),
        replay_age_seconds: row.try_get(5)?,
        receiver_status: row.try_get(6)?,
        receiver_host: row.try_get(7)?,
        last_archived: row.try_get(8)?,
        last_archived_age_seconds: row.try_get(9)?,
        archive_failing: row.try_get(10)?,
    })
}
