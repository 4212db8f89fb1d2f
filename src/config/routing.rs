//! The routing part of the cluster file: health checks (Route 53's semantics),
//! user-defined DNS failover records, the SQL proxy, object stores and the
//! trigger-object DR switch. Validated with the rest in `Config::validate`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{humantime_serde, is_dns_label, Config, LagBudget, Problem, DEFAULT_HEALTHY_SHARE};

/// `[health]`: checks every gateway runs, and how their results combine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthConfig {
    /// A check is healthy when more than this share of observers (gateways) say so.
    #[serde(default = "default_share")]
    pub healthy_share: f64,
    #[serde(rename = "check", default)]
    pub checks: Vec<HealthCheck>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { healthy_share: DEFAULT_HEALTHY_SHARE, checks: Vec::new() }
    }
}

fn default_share() -> f64 {
    DEFAULT_HEALTHY_SHARE
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// A TCP connection to `target` (host:port) succeeds.
    Tcp,
    /// GET `target` (an http:// URL, or https:// verified against the cluster CA) answers `expect_status` (default: any 2xx or 3xx),
    /// and its body's first 5120 bytes contain `body_contains` when set.
    Http,
    /// The monitor role connects to `target` (host:port) and runs `query`;
    /// with `max_lag`, a standby further behind the leader's reported position fails.
    Postgres,
    /// An object exists at `target` (`file:///path` or `s3://bucket/key`).
    ObjectExists,
    /// Healthy when at least `min_healthy` of `children` are (aggregated results).
    Calculated,
    /// Backups and archiving are recent: `target` names a `[[backup.repository]]`;
    /// the primary archived within `max_archive_age` and that repository holds a
    /// full backup younger than `max_full_age` (each when set).
    Backup,
}

impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Postgres => "postgres",
            CheckKind::ObjectExists => "object-exists",
            CheckKind::Calculated => "calculated",
            CheckKind::Backup => "backup",
        })
    }
}

/// One `[[health.check]]`. Fields apply per kind; `validate` says which are missing or stray.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthCheck {
    pub name: String,
    pub kind: CheckKind,
    /// What to check: host:port, URL or object URL, depending on the kind.
    pub target: Option<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long one probe may take before it counts as a failure.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive results needed to change an observer's verdict, either way.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Report healthy when the probe fails and unhealthy when it succeeds.
    #[serde(default)]
    pub invert: bool,
    pub expect_status: Option<u16>,
    pub body_contains: Option<String>,
    pub query: Option<String>,
    pub max_lag: Option<LagBudget>,
    #[serde(default)]
    pub children: Vec<String>,
    pub min_healthy: Option<MinHealthy>,
    /// `backup`: the primary's last archived WAL file may be at most this old.
    #[serde(default, with = "humantime_serde::option")]
    pub max_archive_age: Option<Duration>,
    /// `backup`: the repository's last full backup may be at most this old.
    #[serde(default, with = "humantime_serde::option")]
    pub max_full_age: Option<Duration>,
}

impl HealthCheck {
    /// A check with every optional field at its default.
    pub fn new(name: &str, kind: CheckKind, target: Option<String>) -> HealthCheck {
        HealthCheck {
            name: name.to_string(),
            kind,
            target,
            interval: default_interval(),
            timeout: default_timeout(),
            failure_threshold: default_failure_threshold(),
            invert: false,
            expect_status: None,
            body_contains: None,
            query: None,
            max_lag: None,
            children: Vec::new(),
            min_healthy: None,
            max_archive_age: None,
            max_full_age: None,
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_failure_threshold() -> u32 {
    3
}

/// How many children a calculated check needs: a number, `"all"` or `"any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinHealthy {
    All,
    Any,
    AtLeast(u32),
}

impl MinHealthy {
    pub fn required(self, children: usize) -> usize {
        match self {
            MinHealthy::All => children,
            MinHealthy::Any => 1.min(children),
            MinHealthy::AtLeast(n) => n as usize,
        }
    }
}

impl<'de> Deserialize<'de> for MinHealthy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(MinHealthy::AtLeast(n)),
            Raw::S(s) if s == "all" => Ok(MinHealthy::All),
            Raw::S(s) if s == "any" => Ok(MinHealthy::Any),
            Raw::S(s) => Err(serde::de::Error::custom(format!("{s:?}: expected a number, \"all\" or \"any\""))),
        }
    }
}

impl Serialize for MinHealthy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MinHealthy::All => s.serialize_str("all"),
            MinHealthy::Any => s.serialize_str("any"),
            MinHealthy::AtLeast(n) => s.serialize_u32(*n),
        }
    }
}

/// Record types a failover record can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RecordType {
    #[default]
    A,
    AAAA,
    CNAME,
}

/// One `[[dns.record]]`: a Route 53 failover record. The primary value is
/// answered while its health check is healthy (or it has none), else the
/// secondary; when both are unhealthy, both are answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsRecord {
    /// Relative to the zone: `app` answers `app.<zone>`.
    pub name: String,
    #[serde(rename = "type", default)]
    pub record_type: RecordType,
    /// Overrides `dns.ttl` for this record.
    #[serde(default, with = "humantime_serde::option")]
    pub ttl: Option<Duration>,
    pub primary: RecordTarget,
    pub secondary: Option<RecordTarget>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordTarget {
    /// An IPv4 address (A), IPv6 address (AAAA) or domain name (CNAME).
    pub value: String,
    /// The health check that guards this value; none means always healthy.
    pub health_check: Option<String>,
}

/// `[proxy]`: how the gateways' SQL proxies route.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// The reader port uses a standby only within this lag, else the primary.
    #[serde(default = "default_reader_lag")]
    pub max_reader_lag: LagBudget,
    /// How long a new connection waits for a leader (during a switchover or a
    /// failover) before it is refused.
    #[serde(default = "default_leader_wait", with = "humantime_serde")]
    pub leader_wait: Duration,
    /// `session`: a client keeps one server connection while connected (bytes
    /// are relayed); `transaction`: a client holds a server connection only
    /// for a transaction, and switchovers happen between its transactions.
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Server connections per user and database in transaction mode.
    #[serde(default = "default_pool_size")]
    pub default_pool_size: usize,
    /// Overrides of `default_pool_size`: `"user@database"` or `"user"`.
    #[serde(default)]
    pub pool_sizes: std::collections::BTreeMap<String, usize>,
    /// Client connections each port accepts at once; more are refused (53300).
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
}

/// `proxy.pool_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Session,
    Transaction,
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            _ => Err(format!("{s:?} is not session or transaction")),
        }
    }
}

impl ProxyConfig {
    /// The server connections the pool of `user` and `database` may open.
    pub fn pool_size(&self, user: &str, database: &str) -> usize {
        if self.pool_sizes.is_empty() {
            return self.default_pool_size; // asked with every lent connection: no key built in vain
        }
        self.pool_sizes
            .get(&format!("{user}@{database}"))
            .or_else(|| self.pool_sizes.get(user))
            .copied()
            .unwrap_or(self.default_pool_size)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_reader_lag: default_reader_lag(),
            leader_wait: default_leader_wait(),
            pool_mode: PoolMode::default(),
            default_pool_size: default_pool_size(),
            pool_sizes: Default::default(),
            max_client_conn: default_max_client_conn(),
        }
    }
}

fn default_pool_size() -> usize {
    20
}
fn default_max_client_conn() -> usize {
    1000
}

fn default_reader_lag() -> LagBudget {
    LagBudget::Bytes(16 * 1024 * 1024)
}
fn default_leader_wait() -> Duration {
    Duration::from_secs(15)
}

/// `[object_store]`: where `s3://` URLs go. Credentials come from the usual
/// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment, never from this file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObjectStoreConfig {
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); AWS when absent.
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
}

/// `[replication]`: how commits wait for standbys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplicationConfig {
    #[serde(default)]
    pub synchronous: Synchronous,
    /// The data-loss budget at commit (off when absent): when no standby in
    /// another region has replayed (or received: `commit_lag_by`) the WAL
    /// written longer ago than this, the primary holds new commits until one
    /// has (see `agent::commit_lag`).
    #[serde(default, with = "crate::config::humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub max_commit_lag: Option<std::time::Duration>,
    /// `replay` (default) or `receive`.
    #[serde(default)]
    pub commit_lag_by: crate::agent::commit_lag::CommitLagBy,
}

/// Which standbys a commit waits for: none, any one standby of the primary's
/// own region, or any one standby in another region (zero loss when a whole
/// region is lost, at the cost of a cross-region round trip per commit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Off,
    Region,
    Remote,
}

impl std::str::FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Synchronous::Off),
            "region" => Ok(Synchronous::Region),
            "remote" => Ok(Synchronous::Remote),
            _ => Err(format!("{s:?} is not off, region or remote")),
        }
    }
}

impl std::fmt::Display for Synchronous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Synchronous::Off => "off",
            Synchronous::Region => "region",
            Synchronous::Remote => "remote",
        })
    }
}

/// `synchronous_standby_names` for `primary`: `ANY 1 (...)` over the
/// standbys among `streaming` that the mode names (by application_name, which
/// is the node name), or `None` when the mode is off or none of them streams.
/// Only streaming standbys are named, so that a lost region makes the primary
/// asynchronous instead of unavailable (Patroni's non-strict synchronous mode);
/// while one is named, no commit is acknowledged before it has the WAL.
pub fn synchronous_standby_names(config: &Config, primary: &str, streaming: &[&str]) -> Option<String> {
    let (own, _) = config.node(primary).ok()?;
    let mut names: Vec<String> = config
        .nodes()
        .filter(|(r, n)| {
            n.name != primary
                && streaming.contains(&n.name.as_str())
                && match config.replication.synchronous {
                    Synchronous::Off => false,
                    Synchronous::Region => r.name == own.name,
                    Synchronous::Remote => r.name != own.name,
                }
        })
        .map(|(_, n)| format!("\"{}\"", n.name))
        .collect();
    names.sort();
    (!names.is_empty()).then(|| format!("ANY 1 ({})", names.join(", ")))
}

/// `synchronous_standby_names` while the commit-lag guard holds commits:
/// `ANY 1 (...)` over every standby in another region than `primary`'s,
/// streaming or not; None when there is none.
pub fn remote_standby_names(config: &Config, primary: &str) -> Option<String> {
    let (own, _) = config.node(primary).ok()?;
    let mut names: Vec<String> =
        config.nodes().filter(|(r, _)| r.name != own.name).map(|(_, n)| format!("\"{}\"", n.name)).collect();
    names.sort();
    (!names.is_empty()).then(|| format!("ANY 1 ({})", names.join(", ")))
}

/// `failover.dr_trigger`: the reference architecture's manual DR switch. When
/// `object` appears, the gateways fail over to `region` (within the lag budget).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrTrigger {
    pub object: String,
    pub region: String,
}

/// A parsed object URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectUrl {
    /// `file:///absolute/path`
    Local(PathBuf),
    /// `s3://bucket/key`
    S3 { bucket: String, key: String },
}

impl std::str::FromStr for ObjectUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!("{url:?}: a file URL needs an absolute path (file:///dir/object)"));
            }
            return Ok(ObjectUrl::Local(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() || key.is_empty() {
                return Err(format!("{url:?}: an S3 URL needs a bucket and a key (s3://bucket/key)"));
            }
            return Ok(ObjectUrl::S3 { bucket: bucket.into(), key: key.into() });
        }
        Err(format!("{url:?} is neither file:///path nor s3://bucket/key"))
    }
}

/// Labels of the zone that meridian itself answers; records may not take them.
const RESERVED_NAMES: [&str; 3] = ["writer", "reader", "ns"];

/// Adds the routing sections' problems to `p`.
pub(super) fn validate(c: &Config, p: &mut Vec<Problem>) {
    let mut push = |at: String, message: String| p.push(Problem { at, message });
    let x = &c.proxy;
    if x.default_pool_size == 0 {
        push("proxy.default_pool_size".into(), "must be at least 1".into());
    }
    for (key, size) in &x.pool_sizes {
        if *size == 0 {
            push(format!("proxy.pool_sizes.{key:?}"), "must be at least 1".into());
        }
        if key.is_empty() || key.matches('@').count() > 1 || key.starts_with('@') || key.ends_with('@') {
            push(format!("proxy.pool_sizes.{key:?}"), "must be \"user\" or \"user@database\"".into());
        }
    }
    if x.max_client_conn == 0 {
        push("proxy.max_client_conn".into(), "must be at least 1".into());
    }
    let h = &c.health;
    if !(0.0..1.0).contains(&h.healthy_share) {
        push("health.healthy_share".into(), "must be at least 0 and below 1 (Route 53 uses 0.18)".into());
    }
    let names: HashMap<&str, &HealthCheck> = h.checks.iter().map(|k| (k.name.as_str(), k)).collect();
    let mut seen = HashSet::new();
    for (i, k) in h.checks.iter().enumerate() {
        let at = format!("health.check[{i}]");
        if !is_check_name(&k.name) {
            push(format!("{at}.name"), format!("{:?} must be lowercase letters, digits, '-' and '_'", k.name));
        }
        if !seen.insert(k.name.as_str()) {
            push(format!("{at}.name"), format!("duplicate check name {:?}", k.name));
        }
        if k.interval < Duration::from_millis(100) {
            push(format!("{at}.interval"), "must be at least 100ms".into());
        }
        if k.timeout.is_zero() {
            push(format!("{at}.timeout"), "must be more than 0".into());
        }
        if !(1..=10).contains(&k.failure_threshold) {
            push(format!("{at}.failure_threshold"), "must be between 1 and 10 (Route 53's range)".into());
        }
        let calculated = k.kind == CheckKind::Calculated;
        match (&k.target, calculated) {
            (None, false) => push(format!("{at}.target"), format!("missing: a {} check needs a target", k.kind)),
            (Some(_), true) => push(format!("{at}.target"), "a calculated check has children, not a target".into()),
            (Some(t), false) => {
                if let Err(m) = check_target(k.kind, t) {
                    push(format!("{at}.target"), m);
                }
            }
            (None, true) => {}
        }
        let stray = |field: &str, set: bool, allowed: &[CheckKind]| {
            (set && !allowed.contains(&k.kind))
                .then(|| (format!("{at}.{field}"), format!("does not apply to a {} check", k.kind)))
        };
        let strays = [
            stray("expect_status", k.expect_status.is_some(), &[CheckKind::Http]),
            stray("body_contains", k.body_contains.is_some(), &[CheckKind::Http]),
            stray("query", k.query.is_some(), &[CheckKind::Postgres]),
            stray("max_lag", k.max_lag.is_some(), &[CheckKind::Postgres]),
            stray("children", !k.children.is_empty(), &[CheckKind::Calculated]),
            stray("min_healthy", k.min_healthy.is_some(), &[CheckKind::Calculated]),
            stray("max_archive_age", k.max_archive_age.is_some(), &[CheckKind::Backup]),
            stray("max_full_age", k.max_full_age.is_some(), &[CheckKind::Backup]),
        ];
        for (at, m) in strays.into_iter().flatten() {
            push(at, m);
        }
        if k.kind == CheckKind::Backup {
            match (&c.backup, &k.target) {
                (None, _) => push(format!("{at}.kind"), "a backup check needs a [backup] section".into()),
                (Some(b), Some(t)) if !b.repositories.iter().any(|r| &r.name == t) => {
                    push(format!("{at}.target"), format!("no [[backup.repository]] is named {t:?}"))
                }
                (Some(b), _) => {
                    if let Some(age) = k.max_archive_age.filter(|a| *a <= b.archive_timeout) {
                        push(
                            format!("{at}.max_archive_age"),
                            format!(
                                "{} is not above backup.archive_timeout ({}): a quiet primary archives only that often",
                                humantime::format_duration(age),
                                humantime::format_duration(b.archive_timeout)
                            ),
                        );
                    }
                }
            }
            if k.max_archive_age.is_none() && k.max_full_age.is_none() {
                push(at.clone(), "a backup check needs max_archive_age, max_full_age or both".into());
            }
            if k.interval < Duration::from_secs(10) {
                push(
                    format!("{at}.interval"),
                    "must be at least 10s for a backup check (it reads the repository)".into(),
                );
            }
        }
        if matches!(k.max_lag, Some(LagBudget::Time(_))) {
            push(format!("{at}.max_lag"), "must be a size (16MB): lag is measured in WAL bytes here".into());
        }
        if calculated {
            if k.children.is_empty() {
                push(format!("{at}.children"), "missing: a calculated check needs children".into());
            }
            for (ci, child) in k.children.iter().enumerate() {
                if !names.contains_key(child.as_str()) {
                    push(format!("{at}.children[{ci}]"), format!("no check is named {child:?}"));
                }
            }
            if let Some(MinHealthy::AtLeast(n)) = k.min_healthy {
                if n == 0 || n as usize > k.children.len() {
                    push(
                        format!("{at}.min_healthy"),
                        format!("must be between 1 and {} (the children)", k.children.len()),
                    );
                }
            }
            if reaches(&names, &k.name, &k.name, &mut HashSet::new()) {
                push(format!("{at}.children"), format!("{:?} depends on itself", k.name));
            }
        }
    }
    let zone_names: Vec<&str> = c.regions.iter().map(|r| r.name.as_str()).collect();
    let mut record_names = HashSet::new();
    for (i, r) in c.dns.records.iter().enumerate() {
        let at = format!("dns.record[{i}]");
        let labels: Vec<&str> = r.name.split('.').collect();
        if r.name.ends_with('.') || !labels.iter().all(|l| is_dns_label(l)) {
            push(format!("{at}.name"), format!("{:?} must be a name relative to the zone (app, db.orders)", r.name));
        } else if RESERVED_NAMES.contains(&labels[labels.len() - 1]) || zone_names.contains(&r.name.as_str()) {
            push(format!("{at}.name"), format!("{:?} is answered by meridian itself; choose another name", r.name));
        }
        if !record_names.insert(r.name.as_str()) {
            push(format!("{at}.name"), format!("duplicate record name {:?}", r.name));
        }
        let targets = std::iter::once(("primary", &r.primary)).chain(r.secondary.as_ref().map(|s| ("secondary", s)));
        for (side, t) in targets {
            if let Err(m) = record_value(r.record_type, &t.value) {
                push(format!("{at}.{side}.value"), m);
            }
            if let Some(check) = &t.health_check {
                if !names.contains_key(check.as_str()) {
                    push(format!("{at}.{side}.health_check"), format!("no check is named {check:?}"));
                }
            }
        }
    }
    if let Some(t) = &c.failover.dr_trigger {
        if let Err(m) = t.object.parse::<ObjectUrl>() {
            push("failover.dr_trigger.object".into(), m);
        }
        match c.regions.iter().find(|r| r.name == t.region) {
            None => push("failover.dr_trigger.region".into(), format!("no region is named {:?}", t.region)),
            Some(r) if r.nodes.is_empty() => {
                push("failover.dr_trigger.region".into(), format!("{:?} has no database nodes", t.region))
            }
            Some(_) => {}
        }
    }
    if let Some(e) = &c.object_store.s3_endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            push("object_store.s3_endpoint".into(), format!("{e:?} must be an http:// or https:// URL"));
        }
    }
}

/// Check names become etcd key segments: keep them plain.
fn is_check_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_target(kind: CheckKind, t: &str) -> Result<(), String> {
    match kind {
        CheckKind::Tcp | CheckKind::Postgres => match t.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
            _ => Err(format!("{t:?} must be host:port")),
        },
        CheckKind::Http => {
            if t.starts_with("http://") || t.starts_with("https://") {
                Ok(())
            } else {
                Err(format!("{t:?} must be an http:// or https:// URL"))
            }
        }
        CheckKind::ObjectExists => t.parse::<ObjectUrl>().map(|_| ()),
        CheckKind::Calculated | CheckKind::Backup => Ok(()),
    }
}

fn record_value(t: RecordType, v: &str) -> Result<(), String> {
    match t {
        RecordType::A => v.parse::<Ipv4Addr>().map(|_| ()).map_err(|_| format!("{v:?} is not an IPv4 address")),
        RecordType::AAAA => v.parse::<Ipv6Addr>().map(|_| ()).map_err(|_| format!("{v:?} is not an IPv6 address")),
        RecordType::CNAME => {
            let name = v.strip_suffix('.').unwrap_or(v);
            if !name.is_empty() && name.split('.').all(|l| !l.is_empty() && l.len() <= 63) {
                Ok(())
            } else {
                Err(format!("{v:?} is not a domain name"))
            }
        }
    }
}

/// Whether `goal` is reachable from `from`'s children (a cycle through calculated checks).
fn reaches<'a>(names: &HashMap<&str, &'a HealthCheck>, from: &str, goal: &str, seen: &mut HashSet<&'a str>) -> bool {
    let Some(k) = names.get(from) else { return false };
    for child in &k.children {
        if child == goal {
            return true;
        }
        if seen.insert(child.as_str()) && reaches(names, child, goal, seen) {
            return true;
        }
    }
    false
}
