//! `lab skew NODE OFFSET`: runs a node's agent with its wall clock off by
//! OFFSET (libfaketime; the monotonic clock is left alone, as on a host
//! whose NTP is broken), so tests and people can check that no decision
//! compares two hosts' clocks. The offset is kept in `<lab>/clock/<node>`
//! and applies every time the agent starts; `lab skew NODE 0` removes it.
//! The agent is restarted (SIGTERM: it stops its PostgreSQL first) to apply it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Lab, Member};
use crate::process;

/// Where Debian's `libfaketime` puts its thread-safe library.
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

fn offset_file(dir: &Path, node: &str) -> PathBuf {
    dir.join("clock").join(node)
}

/// The environment that skews the agent's clock, if one is set for it.
pub fn faketime_env(dir: &Path, node: &str) -> Vec<(String, String)> {
    let Ok(offset) = std::fs::read_to_string(offset_file(dir, node)) else { return Vec::new() };
    let Some(lib) = LIBFAKETIME.iter().find(|l| Path::new(l).exists()) else {
        tracing::warn!("no libfaketime ({}); {node} runs with the real clock", LIBFAKETIME.join(", "));
        return Vec::new();
    };
    vec![
        ("LD_PRELOAD".into(), lib.to_string()),
        ("FAKETIME".into(), offset.trim().to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Parses `+30s`, `-30s`, `-1m`, `0` into libfaketime's seconds offset.
fn parse_offset(s: &str) -> Result<i64> {
    let (sign, rest) = match s.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(0);
    }
    let d: Duration =
        humantime::parse_duration(rest).with_context(|| format!("{s:?} is not an offset like +30s or -1m"))?;
    if d.subsec_nanos() != 0 {
        bail!("{s:?}: libfaketime takes whole seconds");
    }
    Ok(sign * d.as_secs() as i64)
}

pub async fn skew(dir: &Path, node: &str, offset: &str) -> Result<()> {
    let secs = parse_offset(offset)?;
    let lab = Lab::open(dir)?;
    if !lab.config.node_names().iter().any(|n| n == node) {
        bail!("{node:?} is not a node of this lab ({})", lab.config.node_names().join(", "));
    }
    if secs != 0 && !LIBFAKETIME.iter().any(|l| Path::new(l).exists()) {
        bail!("lab skew needs libfaketime (Debian: faketime; scripts/setup installs it)");
    }
    let file = offset_file(dir, node);
    if secs == 0 {
        let _ = std::fs::remove_file(&file);
    } else {
        std::fs::create_dir_all(file.parent().expect("a clock directory"))?;
        std::fs::write(&file, format!("{secs:+}\n")).with_context(|| format!("write {}", file.display()))?;
    }
    let agent: Vec<u32> = lab
        .running()
        .into_iter()
        .filter(|(m, _, _)| matches!(m, Member::Agent { node: n, .. } if n == node))
        .map(|(_, _, pid)| pid)
        .collect();
    process::stop_all(&agent, Duration::from_secs(30)).await;
    super::start(dir, node, true).await?;
    println!(
        "{node}'s agent runs with its clock {}",
        if secs == 0 { "true".to_string() } else { format!("{secs:+}s off") }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    #[test]
    fn offsets_parse_to_seconds() {
        assert_eq!(parse_offset("-30s").unwrap(), -30);
        assert_eq!(parse_offset("+30s").unwrap(), 30);
        assert_eq!(parse_offset("2m").unwrap(), 120);
        assert_eq!(parse_offset("0").unwrap(), 0);
        assert!(parse_offset("soon").is_err());
        assert!(parse_offset("-1.5s").is_err());
    }
}
