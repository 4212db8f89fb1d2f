//! `lab freeze` / `lab thaw`: faults that are not a death. SIGSTOP of a
//! node's agent stands for a deadlocked or starved agent; SIGSTOP of its
//! PostgreSQL (the postmaster and every child) for a server stuck on its
//! storage. Both leave the processes alive and their sockets open, as a
//! real hang does. `thaw` sends SIGCONT to the same processes.

use std::path::Path;

use anyhow::{bail, Result};

use super::{Lab, Member};
use crate::process;

/// The pids a `agent:NODE` or `postgres:NODE` target names now.
fn pids(lab: &Lab, target: &str) -> Result<(String, Vec<u32>)> {
    let Some((kind, node)) = target.split_once(':') else {
        bail!("{target:?}: name agent:NODE or postgres:NODE");
    };
    if !lab.config.node_names().iter().any(|n| n == node) {
        bail!("{node:?} is not a node of this lab ({})", lab.config.node_names().join(", "));
    }
    let pids = match kind {
        "agent" => lab
            .running()
            .into_iter()
            .filter(|(m, _, _)| matches!(m, Member::Agent { node: n, .. } if n == node))
            .map(|(_, _, pid)| pid)
            .collect(),
        "postgres" => match lab.data_dir(node).and_then(|d| process::postmaster_pid(&d)) {
            Some(pm) => std::iter::once(pm).chain(process::children_of(pm)).collect(),
            None => Vec::new(),
        },
        other => bail!("{other:?}: freeze an agent (agent:NODE) or a server (postgres:NODE)"),
    };
    Ok((format!("{kind} of {node}"), pids))
}

pub async fn freeze(dir: &Path, target: &str) -> Result<()> {
    signal(dir, target, libc::SIGSTOP, "froze")
}

pub async fn thaw(dir: &Path, target: &str) -> Result<()> {
    signal(dir, target, libc::SIGCONT, "thawed")
}

fn signal(dir: &Path, target: &str, sig: i32, done: &str) -> Result<()> {
    let lab = Lab::open(dir)?;
    let (what, pids) = pids(&lab, target)?;
    if pids.is_empty() {
        println!("the {what} is not running");
        return Ok(());
    }
    for &pid in &pids {
        process::signal(pid, sig);
    }
    println!("{done} the {what} (pids {pids:?})");
    Ok(())
}
