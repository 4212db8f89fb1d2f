//! Whether a repository's WAL archive is complete: which segment files a
//! recovery needs between two points, across timeline switches, and which
//! of them the archive lacks. Pure (tested below).
//!
//! A timeline's history lists where each earlier timeline ended (its switch
//! point). The segment that holds a switch point is replayed from the new
//! timeline's copy (which begins with the old timeline's bytes), so timeline
//! `t` owns the segments below its successor's switch segment.

use std::collections::BTreeSet;

/// 16 MiB, PostgreSQL's default and the only size meridian creates.
pub const SEGMENT_SIZE: u64 = 16 << 20;
const SEGMENTS_PER_ID: u64 = 0x1_0000_0000 / SEGMENT_SIZE;

/// A segment's file name: timeline, then the segment number in two halves.
pub fn segment_name(tli: u32, segno: u64) -> String {
    format!("{tli:08X}{:08X}{:08X}", segno / SEGMENTS_PER_ID, segno % SEGMENTS_PER_ID)
}

/// The timeline and segment number of a segment's file name.
pub fn parse_segment(name: &str) -> Option<(u32, u64)> {
    let hex = name.get(..24).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
    if name.len() != 24 {
        return None;
    }
    let tli = u32::from_str_radix(&hex[..8], 16).ok()?;
    let hi = u64::from_str_radix(&hex[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&hex[16..], 16).ok()?;
    (lo < SEGMENTS_PER_ID).then_some((tli, hi * SEGMENTS_PER_ID + lo))
}

/// `X/Y` (PostgreSQL's LSN notation) to a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// One line of a timeline history file: timeline `parent` ended at `switch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub parent: u32,
    pub switch: u64,
}

/// A timeline history file's switches (`<parent>\t<X/Y>\t<reason>` lines).
pub fn parse_history(text: &str) -> Vec<Switch> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Switch { parent: f.next()?.parse().ok()?, switch: parse_lsn(f.next()?)? })
        })
        .collect()
}

/// The segments a recovery replays from segment `from` up to (not including)
/// the segment holding `to` on timeline `tli`, whose history is `history`.
pub fn needed(history: &[Switch], tli: u32, from: u64, to: u64) -> Vec<String> {
    let end = to / SEGMENT_SIZE;
    (from..end)
        .map(|seg| {
            let owner = history.iter().find(|s| seg < s.switch / SEGMENT_SIZE).map(|s| s.parent).unwrap_or(tli);
            segment_name(owner, seg)
        })
        .collect()
}

/// What of `needed` the archive (its segment files' names, checksums stripped) lacks.
pub fn missing(archived: &BTreeSet<String>, needed: &[String]) -> Vec<String> {
    needed.iter().filter(|n| !archived.contains(*n)).cloned().collect()
}

/// A repository file's WAL name: `000000010000000000000003-<sha1>.lz4` → the segment's name.
pub fn archived_name(file: &str) -> &str {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.split_once('-').map(|(n, _)| n).unwrap_or(base)
}

/// What a repository's archive holds of the chain a recovery replays: from
/// `first` (the oldest backup's start) to the newest segment of the newest
/// timeline, across its switches. `missing` names what a recovery through
/// that range would not find, history files included.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainCheck {
    pub timeline: u32,
    pub first: Option<String>,
    pub last: Option<String>,
    /// Segments the chain needs (and the archive was checked for).
    pub segments: usize,
    pub missing: Vec<String>,
}

impl ChainCheck {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

impl std::fmt::Display for ChainCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (first, last) = (self.first.as_deref().unwrap_or("-"), self.last.as_deref().unwrap_or("-"));
        if self.complete() {
            write!(f, "WAL chain complete: {} segments, {first} .. {last} (timeline {})", self.segments, self.timeline)
        } else {
            let shown: Vec<&str> = self.missing.iter().take(10).map(String::as_str).collect();
            write!(
                f,
                "WAL chain BROKEN between {first} and {last} (timeline {}): {} missing: {}{}",
                self.timeline,
                self.missing.len(),
                shown.join(", "),
                if self.missing.len() > shown.len() { ", ..." } else { "" }
            )
        }
    }
}

/// The newest timeline an archive (WAL file names, checksums stripped) knows of.
pub fn newest_timeline(archived: &BTreeSet<String>) -> Option<u32> {
    archived
        .iter()
        .filter_map(|n| match n.strip_suffix(".history") {
            Some(t) if t.len() == 8 => u32::from_str_radix(t, 16).ok(),
            _ => parse_segment(n).map(|(t, _)| t),
        })
        .max()
}

/// Checks the chain of timeline `tli` (whose history is `history`, `None`
/// when the archive lacks its history file) from segment `from` (default:
/// the oldest segment of the chain's timelines) to the newest segment any
/// of them holds.
pub fn check(archived: &BTreeSet<String>, tli: u32, history: Option<&[Switch]>, from: Option<u64>) -> ChainCheck {
    let switches = history.unwrap_or_default();
    let on_chain = |t: u32| t == tli || switches.iter().any(|s| s.parent == t);
    let segnos: Vec<u64> =
        archived.iter().filter_map(|n| parse_segment(n)).filter(|(t, _)| on_chain(*t)).map(|(_, s)| s).collect();
    let mut missing = Vec::new();
    if tli > 1 {
        let mut timelines: Vec<u32> = switches.iter().map(|s| s.parent).filter(|t| *t > 1).collect();
        timelines.push(tli);
        for t in timelines {
            let name = format!("{t:08X}.history");
            if !archived.contains(&name) {
                missing.push(name);
            }
        }
    }
    let (Some(lo), Some(hi)) = (from.or_else(|| segnos.iter().min().copied()), segnos.iter().max().copied()) else {
        return ChainCheck { timeline: tli, first: None, last: None, segments: 0, missing };
    };
    let need = needed(switches, tli, lo, (hi + 1) * SEGMENT_SIZE);
    missing.extend(self::missing(archived, &need));
    ChainCheck {
        timeline: tli,
        first: need.first().cloned(),
        last: need.last().cloned(),
        segments: need.len(),
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_positions() {
        assert_eq!(segment_name(1, 3), "000000010000000000000003");
        assert_eq!(segment_name(2, 256), "000000020000000100000000");
        assert_eq!(parse_segment("000000020000000100000000"), Some((2, 256)));
        assert_eq!(parse_segment("000000020000000100000000.partial"), None);
        assert_eq!(parse_segment("0000000200000001000001FF"), None, "beyond the last segment of an id");
        assert_eq!(parse_lsn("0/5000060"), Some(0x5000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(
            archived_name("15-1/0000000100000000/000000010000000000000003-ab12.lz4"),
            "000000010000000000000003"
        );
        assert_eq!(archived_name("00000002.history"), "00000002.history");
    }

    #[test]
    fn the_switch_segment_comes_from_the_new_timeline() {
        let history = parse_history("1\t0/5000060\tno recovery target specified\n\n2\t0/7A00000\tswitchover\n");
        assert_eq!(history, vec![Switch { parent: 1, switch: 0x5000060 }, Switch { parent: 2, switch: 0x7A00000 }]);
        let need = needed(&history, 3, 2, 0x9000010);
        assert_eq!(
            need,
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004",
                "000000020000000000000005",
                "000000020000000000000006",
                "000000030000000000000007",
                "000000030000000000000008",
            ]
        );
        let archived: BTreeSet<String> =
            need.iter().filter(|n| !n.ends_with('4')).cloned().chain(["000000010000000000000005".into()]).collect();
        assert_eq!(missing(&archived, &need), ["000000010000000000000004"], "the old timeline's copy of 5 is not 2's");
    }
    #[test]
    fn a_chain_is_checked_from_the_oldest_backup_across_switches_and_history_files() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        let history = parse_history("1\t0/5000060\tfailover\n");
        let mut archive = names(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005", // the old primary's copy past the switch: not on the chain
            "00000002.history",
            "000000020000000000000005",
            "000000020000000000000006",
        ]);
        assert_eq!(newest_timeline(&archive), Some(2));
        let ok = check(&archive, 2, Some(&history), Some(3));
        assert!(ok.complete(), "{ok}");
        assert_eq!(
            (ok.first.as_deref(), ok.last.as_deref(), ok.segments),
            (Some("000000010000000000000003"), Some("000000020000000000000006"), 4)
        );
        // Without a starting point: from the oldest segment on the chain.
        assert_eq!(check(&archive, 2, Some(&history), None).segments, 5);

        archive.remove("000000010000000000000004");
        archive.remove("00000002.history");
        let broken = check(&archive, 2, None, Some(3));
        assert_eq!(
            broken.missing,
            ["00000002.history", "000000020000000000000003", "000000020000000000000004"],
            "no history: timeline 2 owns every segment"
        );
        let broken = check(&archive, 2, Some(&history), Some(3));
        assert_eq!(broken.missing, ["00000002.history", "000000010000000000000004"]);
        assert!(broken.to_string().contains("BROKEN"), "{broken}");

        let empty = check(&BTreeSet::new(), 1, None, None);
        assert!(empty.complete() && empty.segments == 0);
    }
}
