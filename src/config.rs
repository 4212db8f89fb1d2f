//! The `meridian.toml` schema: one file describes the whole cluster, and every
//! process (agent, gateway, CLI, lab) reads the same file and picks its part by
//! `--node` / `--region`.
//!
//! Loading never stops at the first problem: unknown fields are collected
//! (through `serde_ignored`, instead of `deny_unknown_fields`, which would stop
//! at the first one; every ignored key is still an error) and `validate()` returns every semantic problem,
//! each with the path of the field it concerns, so `meridian config check`
//! can list them all at once. See `docs/config.md` for the reference.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

mod backup;
pub mod change;
mod routing;
mod security;
pub use backup::*;
pub use routing::*;
pub use security::*;

/// The environment variable naming the cluster file when `--config` is absent.
pub const CONFIG_ENV: &str = "MERIDIAN_CONFIG";
/// Route 53's default share of observers that must see a check healthy.
pub const DEFAULT_HEALTHY_SHARE: f64 = 0.18;

/// The whole cluster, as written in `meridian.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The logical database's name; every etcd key lives under `/meridian/<cluster>/`.
    pub cluster: String,
    pub etcd: EtcdConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub object_store: ObjectStoreConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    /// Archiving and base backups; none without this section.
    pub backup: Option<BackupConfig>,
    #[serde(rename = "region", default)]
    pub regions: Vec<Region>,
    /// Where the file was read from; relative paths in it resolve against its directory.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdConfig {
    /// Client URLs of every etcd member (`https://IP:port`).
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsConfig {
    /// The zone the gateways answer for, with the trailing dot.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// TTL of every answer; low so clients follow a failover quickly.
    #[serde(default = "default_dns_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// User-defined failover records (`[[dns.record]]`).
    #[serde(rename = "record", default)]
    pub records: Vec<DnsRecord>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { zone: default_zone(), ttl: default_dns_ttl(), records: Vec::new() }
    }
}

fn default_zone() -> String {
    "meridian.internal.".to_string()
}
fn default_dns_ttl() -> Duration {
    Duration::from_secs(5)
}

/// Whether a failover of a given kind happens by itself or only by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    Automatic,
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverConfig {
    /// TTL of the leader lease. Every agent renews it four times per TTL
    /// (retrying every 250 ms after a failure); a primary is fenced once its
    /// last successful renewal is two thirds of the TTL old.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    #[serde(default = "automatic")]
    pub within_region: FailoverMode,
    #[serde(default = "automatic")]
    pub cross_region: FailoverMode,
    /// The data-loss budget: a standby further behind is never promoted automatically.
    #[serde(default = "default_lag_budget")]
    pub max_lag_on_failover: LagBudget,
    /// The trigger object of the manual DR switch, if used.
    pub dr_trigger: Option<DrTrigger>,
    /// How long the primary's own server (a query) and its storage (an
    /// fsync) may take to answer a probe before the agent takes it for hung, stops it and gives up
    /// `leader`. Default: half the lease TTL (see `probe_timeout`).
    #[serde(default, with = "humantime_serde::option")]
    pub primary_probe_timeout: Option<Duration>,
}

impl FailoverConfig {
    /// The primary's self-probe bound: short enough that a hung primary is
    /// replaced within the TTL and a few seconds, long enough that a busy disk
    /// is not taken for a hung one.
    pub fn probe_timeout(&self) -> Duration {
        self.primary_probe_timeout.unwrap_or(self.lease_ttl / 2)
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            lease_ttl: default_lease_ttl(),
            within_region: FailoverMode::Automatic,
            cross_region: FailoverMode::Automatic,
            max_lag_on_failover: default_lag_budget(),
            dr_trigger: None,
            primary_probe_timeout: None,
        }
    }
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(6)
}
fn automatic() -> FailoverMode {
    FailoverMode::Automatic
}
fn default_lag_budget() -> LagBudget {
    LagBudget::Bytes(16 * 1024 * 1024)
}

/// How far behind a standby may be and still be promoted: WAL bytes or replay time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagBudget {
    Bytes(u64),
    Time(Duration),
}

impl fmt::Display for LagBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LagBudget::Bytes(b) => write!(f, "{}", format_bytes(*b)),
            LagBudget::Time(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl std::str::FromStr for LagBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(bytes) = parse_bytes(s) {
            return Ok(LagBudget::Bytes(bytes));
        }
        humantime::parse_duration(s)
            .map(LagBudget::Time)
            .map_err(|_| format!("{s:?} is neither a size (16MB, 512kB) nor a duration (5s, 500ms)"))
    }
}

impl<'de> Deserialize<'de> for LagBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for LagBudget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Parses PostgreSQL-style sizes: `16MB`, `512kB`, `1GB`, `8192` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit (use B, kB, MB, GB or TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)];
    for (unit, size) in UNITS {
        if b >= size && b % size == 0 {
            return format!("{}{unit}", b / size);
        }
    }
    format!("{b}B")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresConfig {
    /// Where `postgres`, `initdb`, `pg_basebackup`, `pg_rewind` live.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// The OS user PostgreSQL runs as when meridian runs as root (PostgreSQL refuses root).
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// The role standbys stream with: LOGIN REPLICATION, nothing else.
    #[serde(default = "default_replication_user")]
    pub replication_user: String,
    /// The role gateways use for status, health and `verify`: pg_monitor plus its own schema.
    #[serde(default = "default_monitor_user")]
    pub monitor_user: String,
    /// The role the SQL proxies look up a client's SCRAM verifier with: it may
    /// only run `meridian_auth.scram_verifier(name)`, nothing else.
    #[serde(default = "default_auth_user")]
    pub auth_user: String,
    /// A TOML file (mode 0600) with `replication_password`, `monitor_password` and `auth_password`.
    /// Relative to the cluster file's directory.
    pub secrets_file: Option<PathBuf>,
    /// SQL run once on the new primary right after the cluster is created
    /// (application roles and databases). Relative to the cluster file's directory.
    pub bootstrap_sql: Option<PathBuf>,
    /// Networks (CIDR) from which application roles may connect with SCRAM.
    #[serde(default)]
    pub client_networks: Vec<String>,
    /// Cluster-wide server settings, written to `postgresql.auto.conf` before every start.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            bin_dir: default_bin_dir(),
            os_user: default_os_user(),
            replication_user: default_replication_user(),
            monitor_user: default_monitor_user(),
            auth_user: default_auth_user(),
            secrets_file: None,
            bootstrap_sql: None,
            client_networks: Vec::new(),
            settings: BTreeMap::new(),
        }
    }
}

fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn default_os_user() -> String {
    "postgres".into()
}
fn default_replication_user() -> String {
    "replicator".into()
}
fn default_monitor_user() -> String {
    "meridian".into()
}
fn default_auth_user() -> String {
    "meridian_auth".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    /// Lower is preferred when choosing where a new primary goes. Required for
    /// regions with nodes; a witness region has none.
    pub priority: Option<u32>,
    /// Client URL of this region's etcd member, if it has one (one of `etcd.endpoints`).
    pub etcd: Option<String>,
    pub gateway: GatewayAddrs,
    #[serde(rename = "node", default)]
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct GatewayAddrs {
    /// HTTP API (what the CLI talks to).
    pub api: SocketAddr,
    /// Authoritative DNS (UDP and TCP).
    pub dns: SocketAddr,
    /// SQL proxy to the current leader.
    pub writer: SocketAddr,
    /// SQL proxy to a local standby.
    pub reader: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Where PostgreSQL listens; other nodes and gateways connect here.
    pub address: SocketAddr,
    /// The agent's HTTP API.
    pub api: SocketAddr,
    /// PGDATA.
    pub data_dir: PathBuf,
    /// Socket directory, pg_hba/pg_ident, passfile and server log. Default: `<data_dir>.run`.
    pub run_dir: Option<PathBuf>,
}

impl Node {
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let mut s = self.data_dir.clone().into_os_string();
            s.push(".run");
            PathBuf::from(s)
        })
    }
}

/// Whether two nodes share a host: the same address, or both on loopback (a
/// lab on one machine). A backup from a standby reads a few files from the
/// primary's data directory, so it needs this.
pub fn same_host(a: &Node, b: &Node) -> bool {
    a.address.ip() == b.address.ip() || (a.address.ip().is_loopback() && b.address.ip().is_loopback())
}

/// One problem found in a cluster file, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub at: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// What `Config::parse` found: the config if it deserialized, and every problem.
pub struct Checked {
    pub config: Option<Config>,
    pub problems: Vec<Problem>,
}

impl Config {
    /// Parses and validates, collecting every problem rather than stopping at the first.
    pub fn parse(text: &str) -> Checked {
        let mut problems = Vec::new();
        let de = match toml::Deserializer::parse(text) {
            Ok(de) => de,
            Err(e) => {
                problems.push(Problem { at: location(text, e.span()), message: e.message().to_string() });
                return Checked { config: None, problems };
            }
        };
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
        for path in unknown {
            problems.push(Problem { at: bracket_indices(&path), message: "unknown field".into() });
        }
        match parsed {
            Ok(config) => {
                problems.extend(config.validate());
                Checked { config: Some(config), problems }
            }
            Err(e) => {
                problems.push(Problem { at: location(text, e.span()), message: e.message().to_string() });
                Checked { config: None, problems }
            }
        }
    }

    /// Reads, parses and validates a cluster file; any problem is an error naming all of them.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read cluster file {} (pass --config or set {CONFIG_ENV})", path.display()))?;
        let checked = Config::parse(&text);
        if !checked.problems.is_empty() {
            let list: Vec<String> = checked.problems.iter().map(|p| format!("  {p}")).collect();
            bail!(
                "{} has {} problem(s); run `meridian config check`:\n{}",
                path.display(),
                list.len(),
                list.join("\n")
            );
        }
        let mut config = checked.config.expect("no problems means a config");
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Every semantic problem: duplicates, clashes, missing pieces, impossible values.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut push = |at: String, message: String| p.push(Problem { at, message });

        if !is_dns_label(&self.cluster) {
            push("cluster".into(), format!("{:?} must be lowercase letters, digits and '-'", self.cluster));
        }
        if self.etcd.endpoints.is_empty() {
            push("etcd.endpoints".into(), "at least one endpoint is required".into());
        }
        for (i, e) in self.etcd.endpoints.iter().enumerate() {
            if let Err(m) = parse_etcd_url(e) {
                push(format!("etcd.endpoints[{i}]"), m);
            }
        }
        if !self.dns.zone.ends_with('.') || self.dns.zone.len() < 2 {
            push("dns.zone".into(), format!("{:?} must be a domain ending with '.'", self.dns.zone));
        }
        if self.failover.lease_ttl < Duration::from_secs(2) {
            push("failover.lease_ttl".into(), "must be at least 2s (etcd lease granularity is one second)".into());
        }
        if let Some(t) = self.failover.primary_probe_timeout {
            if t < Duration::from_millis(200) || t >= self.failover.lease_ttl {
                push(
                    "failover.primary_probe_timeout".into(),
                    format!("{t:?} must be at least 200ms and below lease_ttl ({:?})", self.failover.lease_ttl),
                );
            }
        }
        if let Some(bound) = self.replication.max_commit_lag {
            if bound < Duration::from_secs(1) {
                push(
                    "replication.max_commit_lag".into(),
                    format!("{bound:?} must be at least 1s (the primary measures lag once a second)"),
                );
            }
            let commit = self.postgres.settings.get("synchronous_commit").and_then(|v| v.as_str());
            if matches!(commit, Some("off" | "local")) {
                push(
                    "replication.max_commit_lag".into(),
                    "holds commits by synchronous replication, which postgres.settings.synchronous_commit = off or local skips".into(),
                );
            }
            let regions_with_nodes = self.regions.iter().filter(|r| !r.nodes.is_empty()).count();
            if regions_with_nodes < 2 {
                push(
                    "replication.max_commit_lag".into(),
                    "needs database nodes in at least two regions: it holds commits until a standby in another region has them".into(),
                );
            }
        }
        for (i, n) in self.postgres.client_networks.iter().enumerate() {
            if parse_cidr(n).is_none() {
                push(format!("postgres.client_networks[{i}]"), format!("{n:?} is not a CIDR like 10.0.0.0/8"));
            }
        }
        for key in self.postgres.settings.keys() {
            if MANAGED_SETTINGS.contains(&key.as_str()) {
                push(format!("postgres.settings.{key}"), "is managed by meridian per node; remove it".into());
            }
        }
        if self.regions.is_empty() {
            push("region".into(), "at least one [[region]] is required".into());
        }

        let mut region_names: HashMap<&str, usize> = HashMap::new();
        let mut node_names: HashMap<&str, String> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        let mut data_dirs: HashMap<&Path, String> = HashMap::new();
        let mut etcd_regions = 0;
        let mut claim = |addr: SocketAddr, at: String, p: &mut Vec<Problem>| {
            if let Some(prev) = addrs.get(&addr) {
                p.push(Problem { at, message: format!("address {addr} is already used by {prev}") });
            } else {
                addrs.insert(addr, at);
            }
        };
        let mut p2 = Vec::new();
        for (ri, r) in self.regions.iter().enumerate() {
            let at = format!("region[{ri}]");
            if !is_dns_label(&r.name) {
                p2.push(Problem {
                    at: format!("{at}.name"),
                    message: format!("{:?} must be lowercase letters, digits and '-'", r.name),
                });
            }
            if let Some(prev) = region_names.insert(&r.name, ri) {
                p2.push(Problem {
                    at: format!("{at}.name"),
                    message: format!("duplicate region name {:?} (also region[{prev}])", r.name),
                });
            }
            if !r.nodes.is_empty() && r.priority.is_none() {
                p2.push(Problem {
                    at: format!("{at}.priority"),
                    message: "missing: a region with nodes needs a priority (1 is preferred)".into(),
                });
            }
            if let Some(url) = &r.etcd {
                etcd_regions += 1;
                if !self.etcd.endpoints.contains(url) {
                    p2.push(Problem {
                        at: format!("{at}.etcd"),
                        message: format!("{url:?} is not one of etcd.endpoints"),
                    });
                }
            }
            let g = &r.gateway;
            claim(g.api, format!("{at}.gateway.api"), &mut p2);
            claim(g.dns, format!("{at}.gateway.dns"), &mut p2);
            claim(g.writer, format!("{at}.gateway.writer"), &mut p2);
            claim(g.reader, format!("{at}.gateway.reader"), &mut p2);
            for (ni, n) in r.nodes.iter().enumerate() {
                let at = format!("{at}.node[{ni}]");
                if !is_dns_label(&n.name) {
                    p2.push(Problem {
                        at: format!("{at}.name"),
                        message: format!("{:?} must be lowercase letters, digits and '-'", n.name),
                    });
                }
                if let Some(prev) = node_names.insert(&n.name, at.clone()) {
                    p2.push(Problem {
                        at: format!("{at}.name"),
                        message: format!("duplicate node name {:?} (also {prev})", n.name),
                    });
                }
                claim(n.address, format!("{at}.address"), &mut p2);
                claim(n.api, format!("{at}.api"), &mut p2);
                if n.address.ip().is_unspecified() {
                    p2.push(Problem {
                        at: format!("{at}.address"),
                        message: "must be an address other nodes can reach, not 0.0.0.0".into(),
                    });
                }
                if let Some(prev) = data_dirs.insert(&n.data_dir, at.clone()) {
                    p2.push(Problem {
                        at: format!("{at}.data_dir"),
                        message: format!("{} is already the data directory of {prev}", n.data_dir.display()),
                    });
                }
                let socket = n.run_dir().join(format!(".s.PGSQL.{}", n.address.port()));
                if socket.as_os_str().len() > 100 {
                    p2.push(Problem {
                        at: format!("{at}.run_dir"),
                        message: format!(
                            "socket path {} is longer than the 100 bytes a unix socket allows; set a shorter run_dir",
                            socket.display()
                        ),
                    });
                }
            }
        }
        for (i, e) in self.etcd.endpoints.iter().enumerate() {
            if let Ok(addr) = parse_etcd_url(e) {
                claim(addr, format!("etcd.endpoints[{i}]"), &mut p2);
            }
        }
        if etcd_regions < 3 {
            p2.push(Problem {
                at: "region".into(),
                message: format!("{etcd_regions} region(s) have an etcd member; at least three are needed so that losing one region keeps a quorum (add a witness region with `etcd = ...`)"),
            });
        }
        if self.regions.iter().all(|r| r.nodes.is_empty()) && !self.regions.is_empty() {
            p2.push(Problem {
                at: "region".into(),
                message: "no region has a [[region.node]]; the cluster needs at least one database node".into(),
            });
        }
        p.extend(p2);
        routing::validate(self, &mut p);
        security::validate(self, &mut p);
        backup::validate(self, &mut p);
        p
    }

    /// Resolves a path written in the cluster file against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        match (&self.source, p.is_absolute()) {
            (Some(src), false) => src.parent().unwrap_or(Path::new(".")).join(p),
            _ => p.to_path_buf(),
        }
    }

    pub fn node(&self, name: &str) -> Result<(&Region, &Node)> {
        self.regions.iter().find_map(|r| r.nodes.iter().find(|n| n.name == name).map(|n| (r, n))).with_context(|| {
            format!("no node named {name:?} in the cluster file (nodes: {})", self.node_names().join(", "))
        })
    }

    pub fn region(&self, name: &str) -> Result<&Region> {
        self.regions.iter().find(|r| r.name == name).with_context(|| {
            let names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
            format!("no region named {name:?} in the cluster file (regions: {})", names.join(", "))
        })
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&Region, &Node)> {
        self.regions.iter().flat_map(|r| r.nodes.iter().map(move |n| (r, n)))
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes().map(|(_, n)| n.name.clone()).collect()
    }

    /// The node that initializes a brand-new cluster: the first node of the
    /// most preferred region. Every other node waits for a leader and copies it.
    pub fn bootstrap_node(&self) -> Option<&Node> {
        self.regions
            .iter()
            .filter(|r| !r.nodes.is_empty())
            .min_by_key(|r| r.priority.unwrap_or(u32::MAX))
            .and_then(|r| r.nodes.first())
    }

    pub fn secrets(&self) -> Result<Secrets> {
        let path = self
            .postgres
            .secrets_file
            .as_ref()
            .map(|p| self.resolve(p))
            .context("postgres.secrets_file is not set in the cluster file; it must name a 0600 file with replication_password, monitor_password and auth_password")?;
        Secrets::load(&path)
    }
}

/// Settings meridian sets itself, per node or for safety; users may not override them.
pub const MANAGED_SETTINGS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "hba_file",
    "ident_file",
    "cluster_name",
    "primary_conninfo",
    "primary_slot_name",
    "hot_standby",
    "wal_level",
    "recovery_target_timeline",
    // TLS with the node's certificate, always on.
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    // Set from [replication] synchronous and max_commit_lag.
    "synchronous_standby_names",
    // Archiving belongs to [backup]: every node archives through pgBackRest, or none does.
    "archive_mode",
    "archive_command",
    "archive_timeout",
    "restore_command",
];

/// Passwords, kept out of the cluster file so it can be shared and committed.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    pub replication_password: String,
    pub monitor_password: String,
    pub auth_password: String,
    /// The key every backup repository is encrypted with (`[backup] encrypt`).
    #[serde(default)]
    pub backup_cipher_pass: Option<String>,
    /// Credentials of each `s3://` backup repository, by its name: `[repository.NAME]`.
    #[serde(default, rename = "repository")]
    pub repositories: BTreeMap<String, RepositorySecrets>,
}

/// An S3 repository's access key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySecrets {
    pub s3_key: String,
    pub s3_key_secret: String,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Secrets> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).with_context(|| format!("read secrets file {}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "secrets file {} is readable by others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            );
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("read secrets file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("secrets file {}: {}", path.display(), e.message()))
    }
}

/// `region.1.colour` (serde_ignored's form) to `region[1].colour` (ours).
fn bracket_indices(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if !out.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// `line L, column C` for a byte span, or `file` when there is none.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else { return "file".into() };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    format!("line {line}, column {col}")
}

pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `https://IP:port` (what etcd endpoints look like) to a socket address.
/// etcd is reached over TLS only, with the cluster CA's certificates.
pub fn parse_etcd_url(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} must start with https:// (etcd is reached over TLS only)"))?;
    rest.trim_end_matches('/').parse().map_err(|_| format!("{url:?} must be https://IP:PORT"))
}

/// Parses `a.b.c.d/len` (or a bare address, as /32 or /128).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
        None => {
            let ip: IpAddr = s.parse().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

pub(crate) mod humantime_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a duration (like 5s or 500ms)")))
    }
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| {
                    humantime::parse_duration(&s)
                        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a duration (like 5s or 500ms)")))
                })
                .transpose()
        }
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
