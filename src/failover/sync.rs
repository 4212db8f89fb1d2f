//! The `sync` record (`cluster::SyncRecord`): which standbys the primary
//! vouches for, so that an automatic failover never promotes a standby that
//! lacks a commit the primary acknowledged (Patroni's `/sync` key, for
//! `ANY 1` sets).
//!
//! The primary names its synchronous standbys only among those streaming now
//! (non-strict: a lost region makes it asynchronous instead of unavailable).
//! Commits acknowledged while it runs asynchronously are on no standby, and a
//! set that changes may leave the newest commits on a standby no longer
//! named. The record stays true through both by its order of writes:
//!
//! - before `synchronous_standby_names` widens, the record widens (a superset
//!   still holds every acknowledged commit on one of its members);
//! - before it empties, the record empties (nothing vouched);
//! - the record narrows to the new set, or leaves empty, only once a standby
//!   of the new set has flushed past a position taken after the new set took
//!   effect: it then has every commit acknowledged before, and every later
//!   one is on a member of the set.
//!
//! Pure: the agent (`agent::primary`) reads the server and etcd and writes.

use std::collections::BTreeSet;

use crate::cluster::Lsn;

/// The names in a `synchronous_standby_names` value as the agent writes it
/// (`ANY 1 ("a", "b")`); empty for none.
pub fn names_in(value: Option<&str>) -> BTreeSet<String> {
    let Some(value) = value else { return BTreeSet::new() };
    value.split('"').skip(1).step_by(2).filter(|n| !n.is_empty()).map(str::to_string).collect()
}

/// The record to write before setting `wanted` in place of `current`, or
/// None when the recorded one stays true. `recorded` empty: it vouches for
/// nothing, and widening cannot change that (commits may be on no standby).
pub fn record_before(
    recorded: &[String],
    current: &BTreeSet<String>,
    wanted: &BTreeSet<String>,
) -> Option<Vec<String>> {
    if recorded.is_empty() {
        return None;
    }
    if wanted.is_empty() {
        return Some(Vec::new());
    }
    let mut need: BTreeSet<String> = recorded.iter().cloned().collect();
    need.extend(current.iter().cloned());
    need.extend(wanted.iter().cloned());
    let need: Vec<String> = need.into_iter().collect();
    let mut had = recorded.to_vec();
    had.sort();
    (need != had).then_some(need)
}

/// Whether the record may become exactly `set`, in effect since the server
/// was at `since` (taken after its reload): true once a member of `set` has
/// flushed at least that far, by `flushed` (`pg_stat_replication`:
/// application name and flush position).
pub fn may_narrow(set: &BTreeSet<String>, since: Lsn, flushed: &[(String, Lsn)]) -> bool {
    flushed.iter().any(|(name, lsn)| set.contains(name) && *lsn >= since)
}

/// Whether `recorded` already says exactly `set`.
pub fn records(recorded: &[String], set: &BTreeSet<String>) -> bool {
    recorded.len() == set.len() && recorded.iter().all(|n| set.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }
    fn vec(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn names_are_read_back_from_the_value_the_agent_writes() {
        assert_eq!(names_in(Some(r#"ANY 1 ("b1", "c1")"#)), set(&["b1", "c1"]));
        assert_eq!(names_in(Some(r#"ANY 1 ("ap-northeast-1a")"#)), set(&["ap-northeast-1a"]));
        assert_eq!(names_in(None), set(&[]));
        assert_eq!(names_in(Some("")), set(&[]));
    }

    #[test]
    fn the_record_widens_or_empties_before_the_server_and_never_vouches_by_widening() {
        // (recorded, in the server, wanted, the record to write first, why)
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], Option<&'a [&'a str]>, &'a str);
        let cases: &[Case] = &[
            (&["b1"], &["b1"], &["b1"], None, "unchanged"),
            (&["b1"], &["b1"], &["b1", "c1"], Some(&["b1", "c1"]), "a standby joins: widen first"),
            (&["b1", "c1"], &["b1", "c1"], &["b1"], None, "one leaves: the wider record stays true"),
            (&["b1"], &["b1"], &[], Some(&[]), "asynchronous: vouch for nothing first"),
            (&[], &[], &["b1"], None, "after asynchronous commits a new standby vouches for nothing yet"),
            (&[], &[], &[], None, "nothing to nothing"),
            (&["b1"], &["c1"], &["b1"], Some(&["b1", "c1"]), "a name in the server but not the record is added"),
            (&["c1", "b1"], &["b1", "c1"], &["b1", "c1"], None, "order does not matter"),
        ];
        for (recorded, current, wanted, want, why) in cases {
            let got = record_before(&vec(recorded), &set(current), &set(wanted));
            assert_eq!(got, want.map(vec), "{why}");
        }
    }

    #[test]
    fn the_record_narrows_only_once_a_member_flushed_past_the_change() {
        let s = set(&["b1", "c1"]);
        assert!(!may_narrow(&s, Lsn(100), &[]), "no standby streams");
        assert!(!may_narrow(&s, Lsn(100), &[("b1".into(), Lsn(99))]), "behind the change");
        assert!(!may_narrow(&s, Lsn(100), &[("a2".into(), Lsn(500))]), "a standby outside the set");
        assert!(may_narrow(&s, Lsn(100), &[("b1".into(), Lsn(99)), ("c1".into(), Lsn(100))]));
        assert!(records(&vec(&["c1", "b1"]), &s));
        assert!(!records(&vec(&["b1"]), &s));
        assert!(!records(&[], &s));
    }
}
