//! Network partitions for the lab.
//!
//! On loopback every client connects from 127.0.0.1 whatever address it
//! targets, so rules on source addresses cannot tell regions apart. Instead,
//! each region's processes run in their own cgroup v2 group
//! (`<cgroup2 mount>/meridian-lab-<net>/<region>`; PostgreSQL inherits its
//! agent's), and nftables drops by the sending socket's group: a partitioned
//! region's processes may not reach other regions' addresses, and other
//! regions' processes may not reach its addresses. Processes outside every
//! group (the CLI, tests, psql) see both sides, like an outside observer.
//! Dropping (not rejecting) makes a partition look like one: connections time
//! out, they are not refused.
//!
//! Needs root (cgroups and nftables). Without it the lab runs without groups
//! and `lab partition` says so and does nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::topology::region_ip;

/// nftables resolves `socket cgroupv2` paths relative to this directory.
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where the lab's cgroups live, when partitions are possible here.
#[derive(Debug, Clone)]
pub struct Groups {
    /// The cgroup v2 mount point, e.g. /sys/fs/cgroup/unified.
    mount: PathBuf,
    net: u8,
}

impl Groups {
    /// Some when running as root with a cgroup v2 mount under /sys/fs/cgroup.
    pub fn detect(net: u8) -> Option<Groups> {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })?;
        mount.starts_with(NFT_CGROUP_ROOT).then_some(Groups { mount, net })
    }

    fn base(&self) -> String {
        format!("meridian-lab-{}", self.net)
    }

    /// The directory of a region's group.
    pub fn region_dir(&self, region: &str) -> PathBuf {
        self.mount.join(self.base()).join(region)
    }

    /// The same group as nftables names it.
    fn nft_path(&self, region: &str) -> String {
        let rel = self.mount.strip_prefix(NFT_CGROUP_ROOT).unwrap_or(Path::new(""));
        rel.join(self.base()).join(region).display().to_string()
    }

    fn table(&self) -> String {
        format!("meridian_lab_{}", self.net)
    }

    /// Cuts `region` (index `ri` in the lab's region list) off from every other region.
    pub fn partition(&self, regions: &[String], ri: usize) -> Result<()> {
        let net = self.net;
        let this = &regions[ri];
        let own = format!("{}/24", region_ip(net, ri, 0));
        let lab = format!("127.{net}.0.0/16");
        let mut script = format!(
            "table inet {t}\nadd chain inet {t} output {{ type filter hook output priority 0; policy accept; }}\n",
            t = self.table()
        );
        script.push_str(&format!(
            "add rule inet {} output socket cgroupv2 level 2 \"{}\" ip daddr {lab} ip daddr != {own} drop comment \"{this} out\"\n",
            self.table(),
            self.nft_path(this)
        ));
        for other in regions.iter().filter(|r| *r != this) {
            script.push_str(&format!(
                "add rule inet {} output socket cgroupv2 level 2 \"{}\" ip daddr {own} drop comment \"{this} in from {other}\"\n",
                self.table(),
                self.nft_path(other)
            ));
        }
        nft(None, &script)
    }

    /// Removes every partition rule of this lab.
    pub fn heal(&self) -> Result<()> {
        if self.has_rules() {
            nft(None, &format!("delete table inet {}\n", self.table()))?;
        }
        Ok(())
    }

    pub fn has_rules(&self) -> bool {
        Command::new("nft")
            .args(["list", "table", "inet", &self.table()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Removes one region's group (a region removed while the lab runs); call
    /// after its processes are gone.
    pub fn remove_region(&self, region: &str) {
        let dir = self.region_dir(region);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!("failed to remove cgroup {}: {e}", dir.display());
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Removes the lab's groups; call after its processes are gone. A group
    /// stays busy until the kernel has reaped its last process (a killed etcd,
    /// say), so removal is retried for a moment.
    pub fn remove(&self, regions: &[String]) {
        let mut dirs: Vec<PathBuf> = regions.iter().map(|r| self.region_dir(r)).collect();
        dirs.push(self.mount.join(self.base()));
        for dir in dirs {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(50))
                    }
                    Err(e) => {
                        tracing::warn!("failed to remove cgroup {}: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

/// Runs an nft script atomically, in network namespace `ns` when given.
pub(super) fn nft(ns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft (install nftables: scripts/setup)")?;
    child.stdin.take().expect("piped").write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft failed: {}\nscript:\n{script}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
