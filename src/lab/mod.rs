//! `meridian lab`: a whole multi-region cluster on this machine, for demos and
//! tests. Each region gets a loopback /24 (see `topology`), three or more etcd
//! members, one agent per node and one gateway per region, all started as
//! detached processes through `process`.
//!
//! The lab directory holds everything, so `lab down` works even after the
//! command that started it, or the machine's processes, crashed:
//!
//! ```text
//! D/.meridian-lab        marker: this directory is a lab (down only deletes such a directory)
//! D/meridian.toml        the cluster file (export MERIDIAN_CONFIG=D/meridian.toml)
//! D/secrets.toml         passwords of meridian's roles (0600)
//! D/bootstrap.sql        creates the `app` role and database on the new primary (0600)
//! D/pgpass               the `app` password for psql (PGPASSFILE=D/pgpass, 0600)
//! D/admin.token          an admin API token for whoever ran `lab up` (0600; [api] token_file)
//! D/etcd/<region>/       etcd data
//! D/nodes/<node>/data    PGDATA;  D/nodes/<node>/run: socket, hba, server log
//! D/tls/ca/              the lab's cluster CA (ca.crt, ca.key 0600)
//! D/tls/<kind>-<name>/   tls.crt, tls.key (0600), ca.crt per node, gateway, etcd member,
//!                        and user-lab, with which the lab's commands (and tests) reach etcd
//! D/backup/<region>/     the second region's backup repository (a directory)
//! D/logs/<process>.log   s3-<region>, etcd-<region>, agent-<node>, gateway-<region>, wan
//! D/pids/<process>.pid
//! D/network.toml         loopback or netns, and the WAN between regions (netns only)
//! ```
//!
//! With `--hosts netns` every process but the S3 server runs in a network
//! namespace of its own (see `netns`), and the WAN relay (`wan`) runs in the
//! router's when the WAN has a delay.

mod clock;
mod down;
mod faults;
mod freeze;
pub mod membership;
pub mod netns;
pub mod partition;
pub mod s3;
pub mod topology;
mod up;
mod wait;
pub mod wan;

pub use clock::skew;
pub use down::down;
pub use faults::{heal, kill, partition, start};
pub use freeze::{freeze, thaw};
pub use up::up;
pub use wait::{wait_for, wait_for_etcd};

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::process::{self, ProcSpec};

const MARKER: &str = ".meridian-lab";
/// The certificate the lab's own commands reach etcd with (`user:lab`), in `D/tls/`.
pub const LAB_IDENTITY: &str = "user-lab";
/// The admin token `lab up` makes, relative to the lab directory.
pub const ADMIN_TOKEN: &str = "admin.token";
/// The Python with moto, the lab's S3 server (scripts/setup makes it).
pub const MOTO_PYTHON: &str = "/opt/meridian/venv/bin/python3";

/// One of the lab's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// The S3 server (moto, over TLS) holding a region's backup repository.
    S3 {
        region: String,
    },
    Etcd {
        region: String,
    },
    Agent {
        node: String,
        region: String,
    },
    Gateway {
        region: String,
    },
    /// The netns lab's WAN relay, in the router namespace (only when the WAN has a delay).
    Wan,
}

impl Member {
    /// The member's region; the WAN relay is between regions, in none.
    pub fn region(&self) -> &str {
        match self {
            Member::S3 { region }
            | Member::Etcd { region }
            | Member::Agent { region, .. }
            | Member::Gateway { region } => region,
            Member::Wan => "",
        }
    }
}

/// How the lab's hosts are connected (`D/network.toml`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Network {
    pub hosts: topology::Hosts,
    /// Between regions; netns only.
    pub wan: Option<wan::Wan>,
}

impl Network {
    const FILE: &str = "network.toml";

    fn load(dir: &Path) -> Result<Network> {
        let path = dir.join(Self::FILE);
        match std::fs::read_to_string(&path) {
            // Labs made before `--hosts` existed are loopback labs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Network::default()),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
            Ok(text) => toml::from_str(&text).with_context(|| format!("parse {}", path.display())),
        }
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let text = format!(
            "# How `meridian lab up` connected the lab's hosts; read by every `meridian lab` command.\n{}",
            toml::to_string(self).context("render network.toml")?
        );
        std::fs::write(dir.join(Self::FILE), text).with_context(|| format!("write {}", dir.join(Self::FILE).display()))
    }

    /// Whether packets between regions go through the WAN relay.
    pub fn has_delay(&self) -> bool {
        self.hosts == topology::Hosts::Netns && self.wan.is_some_and(|w| !w.latency.is_zero())
    }
}

/// Whether `dir` holds a lab (its marker file). A file, not merely a path:
/// the default lab directory has the marker's name, so a checkout that holds
/// `./.meridian-lab` is not itself a lab.
pub fn is_lab(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

/// A lab directory and its cluster file.
pub struct Lab {
    pub dir: PathBuf,
    pub config: Config,
    pub network: Network,
}

impl Lab {
    pub fn open(dir: &Path) -> Result<Lab> {
        let dir = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
        if !dir.join(MARKER).is_file() {
            bail!("no lab in {} (run `meridian lab up --dir {}` first)", dir.display(), dir.display());
        }
        let config = Config::load(&dir.join("meridian.toml"))?;
        let network = Network::load(&dir)?;
        Ok(Lab { dir, config, network })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("meridian.toml")
    }

    /// The lab's `--net`: the second octet of its addresses.
    pub fn net(&self) -> u8 {
        self.config
            .regions
            .first()
            .map(|r| r.gateway.api.ip())
            .and_then(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(v4.octets()[1]),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn region_names(&self) -> Vec<String> {
        self.config.regions.iter().map(|r| r.name.clone()).collect()
    }

    /// Every process of the lab, in start order: S3, etcd, agents, gateways.
    pub fn processes(&self) -> Vec<(Member, ProcSpec)> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("meridian"));
        let config = self.config_path().display().to_string();
        let netns = self.network.hosts == topology::Hosts::Netns;
        let groups = if netns { None } else { partition::Groups::detect(self.net()) };
        let spec = |name: String, program: PathBuf, args: Vec<OsString>, identity: String| ProcSpec {
            log: self.dir.join("logs").join(format!("{name}.log")),
            pid_file: self.dir.join("pids").join(format!("{name}.pid")),
            name,
            program,
            args,
            identity,
            cgroup: None,
            netns: None,
            env: Vec::new(),
        };

        let mut out = Vec::new();
        if self.network.has_delay() {
            let dir = self.dir.display().to_string();
            let args = ["lab", "wan-relay", "--dir", &dir].map(OsString::from).to_vec();
            out.push((Member::Wan, spec("wan".into(), exe.clone(), args, format!("wan-relay --dir {dir}"))));
        }
        for (repo, port) in self.s3_repositories() {
            let tls = self.config.tls_identity(&format!("repository-{}", repo.name));
            let dir = tls.dir.display().to_string();
            let mut args =
                ["lab", "s3", "--port", &port.to_string(), "--identity-dir", &dir].map(OsString::from).to_vec();
            if netns {
                // The hosts reach it on the observer link (`storage_host` in the repository).
                args.extend(["--also-listen".into(), topology::observer_ip(self.net()).to_string().into()]);
            }
            let identity = format!("--identity-dir {dir}");
            out.push((
                Member::S3 { region: repo.region.clone() },
                spec(format!("s3-{}", repo.region), exe.clone(), args, identity),
            ));
        }
        // The same command lines as the units of `meridian deploy systemd`.
        let config_file = self.config_path();
        let token = format!("meridian-{}", self.dir.display());
        let etcd_data = |region: &str| self.dir.join("etcd").join(region);
        for region in self.config.regions.iter().filter(|r| r.etcd.is_some()) {
            let data = etcd_data(&region.name);
            // A member without data while others have theirs joins the running
            // cluster: its region was added by `config apply`.
            let joining = !data.join("member").exists()
                && self.config.regions.iter().any(|r| etcd_data(&r.name).join("member").exists());
            let line =
                crate::deploy::etcd_command(Path::new("etcd"), &self.config, &region.name, &data, &token, joining)
                    .expect("the region has an etcd member");
            let identity = format!("--data-dir {}", data.display());
            let args = line.args.into_iter().map(OsString::from).collect();
            out.push((
                Member::Etcd { region: region.name.clone() },
                spec(format!("etcd-{}", region.name), line.program, args, identity),
            ));
        }
        for (region, node) in self.config.nodes() {
            let line = crate::deploy::agent_command(&exe, &config_file, &node.name);
            let identity = format!("--config {config} --node {}", node.name);
            let member = Member::Agent { node: node.name.clone(), region: region.name.clone() };
            let args = line.args.into_iter().map(OsString::from).collect();
            let mut agent = spec(format!("agent-{}", node.name), line.program, args, identity);
            agent.env = clock::faketime_env(&self.dir, &node.name);
            out.push((member, agent));
        }
        for region in &self.config.regions {
            let line = crate::deploy::gateway_command(&exe, &config_file, &region.name);
            let identity = format!("--config {config} --region {}", region.name);
            let args = line.args.into_iter().map(OsString::from).collect();
            out.push((
                Member::Gateway { region: region.name.clone() },
                spec(format!("gateway-{}", region.name), line.program, args, identity),
            ));
        }
        for (member, spec) in &mut out {
            if netns {
                // Each process on a host of its own.
                spec.netns = netns::namespace_of(self.net(), member).map(|ns| netns::path(&ns));
            } else if !matches!(member, Member::Wan) {
                // Each region's processes in the region's group, so partitions can tell them apart.
                spec.cgroup = groups.as_ref().map(|g| g.region_dir(member.region()));
            }
        }
        out
    }

    /// The processes that are running now, with their pids.
    pub fn running(&self) -> Vec<(Member, ProcSpec, u32)> {
        self.processes()
            .into_iter()
            .filter_map(|(m, s)| process::running_pid(&s.pid_file, &s.identity).map(|pid| (m, s, pid)))
            .collect()
    }

    /// The lab's S3 repositories (served by moto on 127.0.0.1), with their ports.
    pub fn s3_repositories(&self) -> Vec<(&crate::config::Repository, u16)> {
        let repos = self.config.backup.iter().flat_map(|b| &b.repositories);
        repos
            .filter_map(|r| match r.location() {
                Ok(crate::config::RepoLocation::S3 { port, .. }) => Some((r, port)),
                _ => None,
            })
            .collect()
    }

    /// The processes of a node or of a whole region. A region's S3 server is
    /// only chosen by `s3:REGION`: like a cloud's object store, it outlives
    /// the region's servers (and moto keeps its objects in memory only).
    fn select(&self, target: &str) -> Result<Vec<(Member, ProcSpec)>> {
        let all = self.processes();
        let chosen: Vec<_> = all
            .into_iter()
            .filter(|(m, _)| match (m, target.split_once(':')) {
                (Member::Etcd { region }, Some(("etcd", r))) => region == r,
                (Member::Gateway { region }, Some(("gateway", r))) => region == r,
                (Member::S3 { region }, Some(("s3", r))) => region == r,
                // The WAN relay: killed, every packet between regions is dropped (a WAN outage).
                (Member::Wan, None) => target == "wan",
                (Member::S3 { .. } | Member::Wan, _) => false,
                (_, Some(_)) => false,
                (Member::Agent { node, region }, None) => node == target || region == target,
                (other, None) => other.region() == target,
            })
            .collect();
        if chosen.is_empty() {
            let regions: Vec<&str> = self.config.regions.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "{target:?} is neither a node ({}) nor a region ({}), nor etcd:REGION, gateway:REGION or s3:REGION{}",
                self.config.node_names().join(", "),
                regions.join(", "),
                if self.network.has_delay() { ", nor wan (the WAN relay)" } else { "" }
            );
        }
        Ok(chosen)
    }

    fn data_dir(&self, node: &str) -> Option<PathBuf> {
        self.config.node(node).ok().map(|(_, n)| self.config.resolve(&n.data_dir))
    }
}
