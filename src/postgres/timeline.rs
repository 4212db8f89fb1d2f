//! One timeline number per history: a promotion takes a timeline no earlier
//! promotion took.
//!
//! PostgreSQL names a promoted server's new timeline one past the newest
//! history file it can find (in its archive or `pg_wal`), counting up from its
//! own timeline. Two standbys of timeline 1 promoted one after the other (the
//! first hung right after its promotion, before the second had seen its
//! history, and nothing was archived yet) both chose timeline 2: two
//! histories under one number. A former primary of the first then looked like
//! a follower on the leader's timeline, pg_rewind said "source and target
//! cluster are on the same timeline", and it could never stream again (CI,
//! the netns lab: "record with incorrect prev-link" every 5 s).
//!
//! So a promotion to epoch N takes timeline N or later: epochs are unique
//! and increase, and the bootstrap's epoch 1 runs on timeline 1. Before
//! `pg_promote`, placeholder history files fill every absent number below
//! the epoch. They stay: a standby's walreceiver fetches the history file of
//! every timeline number between its own and its primary's, and fails on a
//! missing one ("could not open file pg_wal/00000002.history"), so a primary
//! must hold one for each number it skipped. Their content is a valid history
//! that no chain the cluster follows refers to (a skipped number is a dead
//! branch or unused): PostgreSQL only checks that they exist.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::Server;

/// What a placeholder says, should anyone open one.
const PLACEHOLDER: &str = "1\t0/0\tplaceholder written by meridian: this timeline number was skipped so that each promotion has a number of its own\n";

/// The history file names to create so that the next promotion takes
/// timeline `at_least` or later: every number from 2 below it that has none.
pub fn placeholders_needed(at_least: u32, exists: impl Fn(&str) -> bool) -> Vec<String> {
    (2..at_least).map(history_file_name).filter(|name| !exists(name)).collect()
}

/// `00000002.history` for timeline 2.
pub fn history_file_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

impl Server {
    /// Writes the placeholders that make the next promotion take timeline
    /// `at_least` or later; returns them.
    pub fn reserve_timelines(&self, at_least: u32) -> Result<Vec<PathBuf>> {
        reserve_in(&self.data_dir.join("pg_wal"), at_least, |p| self.chown(p))
    }
}

fn reserve_in(wal_dir: &Path, at_least: u32, chown: impl Fn(&Path) -> Result<()>) -> Result<Vec<PathBuf>> {
    let mut made = Vec::new();
    for name in placeholders_needed(at_least, |n| wal_dir.join(n).exists()) {
        let path = wal_dir.join(name);
        let written = std::fs::write(&path, PLACEHOLDER).with_context(|| format!("write {}", path.display()));
        if written.is_ok() {
            made.push(path.clone());
        }
        if let Err(e) = written.and_then(|()| chown(&path)) {
            remove_placeholders(&made);
            return Err(e);
        }
    }
    Ok(made)
}

/// Removes placeholders (those of a write that failed midway).
fn remove_placeholders(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("failed to remove the timeline placeholder {}: {e}", p.display());
            }
        }
    }
}

/// Whether `path` is a placeholder this module wrote.
#[cfg(test)]
fn is_placeholder(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t == PLACEHOLDER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_absent_number_below_the_epoch_gets_a_placeholder() {
        assert_eq!(placeholders_needed(1, |_| false), Vec::<String>::new(), "epoch 1 is the bootstrap's timeline 1");
        assert_eq!(placeholders_needed(2, |_| false), Vec::<String>::new());
        assert_eq!(placeholders_needed(4, |_| false), vec!["00000002.history", "00000003.history"]);
        assert_eq!(placeholders_needed(4, |n| n == "00000002.history"), vec!["00000003.history"]);
        assert_eq!(history_file_name(26), "0000001A.history", "hexadecimal, as PostgreSQL names them");
    }

    #[test]
    fn placeholders_fill_the_gaps_and_real_histories_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pg_wal")).unwrap();
        std::fs::write(dir.path().join("pg_wal/00000002.history"), "1\t0/3000000\tno recovery target specified\n")
            .unwrap();
        let made = reserve_in(&dir.path().join("pg_wal"), 5, |_| Ok(())).unwrap();
        assert_eq!(made.len(), 2, "3 and 4; the real history of 2 is left alone");
        assert!(made.iter().all(|p| is_placeholder(p)));
        assert!(!is_placeholder(&dir.path().join("pg_wal/00000002.history")));
    }
}
