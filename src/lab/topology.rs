//! The lab's addressing plan (DESIGN.md "Lab"): region i owns `127.<net>.<i>.0/24`
//! (`10.<net>.<i>.0/24` on the netns lab), with etcd at `.1`, the gateway at
//! `.2` and node k at `.10 + k`. Pure: a shape in, a cluster file out.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::*;

pub const WITNESS: &str = "witness";
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;

/// Where the lab's processes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Hosts {
    /// One network stack, each process on its own loopback address (`127.<net>.<region>.<host>`).
    #[default]
    Loopback,
    /// One network namespace per process (`10.<net>.<region>.<host>`), one
    /// bridge per region, a router namespace between regions (see `netns`).
    Netns,
}

impl std::fmt::Display for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hosts::Loopback => "loopback",
            Hosts::Netns => "netns",
        })
    }
}

/// What `lab up` was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct LabShape {
    /// The second octet of every lab address, so parallel labs never collide.
    pub net: u8,
    /// Loopback addresses in one network stack, or a namespace per process.
    pub hosts: Hosts,
    /// Between regions on the netns lab: delay, jitter, loss.
    pub wan: Option<super::wan::Wan>,
    /// Database regions, the first one preferred for the primary.
    pub regions: Vec<String>,
    pub nodes_per_region: usize,
    /// Failover settings written into the lab's cluster file.
    pub failover: FailoverConfig,
    /// The DR trigger object: `file://<dir>/dr/trigger` when not set.
    pub trigger_object: Option<String>,
    /// When set, the trigger object's appearance also fails over to this region.
    pub dr_trigger_region: Option<String>,
    /// An S3-compatible endpoint for `s3://` trigger objects.
    pub s3_endpoint: Option<String>,
    /// `[replication] synchronous`.
    pub synchronous: Synchronous,
    /// `[replication] max_commit_lag`.
    pub max_commit_lag: Option<Duration>,
    /// `[proxy] pool_mode`.
    pub pool_mode: PoolMode,
    /// `[backup]` with a repository in each of the first two regions: the
    /// first on the lab's S3 server (moto, over TLS), the second a directory.
    pub backup: bool,
}

impl Default for LabShape {
    fn default() -> Self {
        LabShape {
            net: 0,
            regions: vec!["ap-south-1".into(), "ap-northeast-1".into()],
            nodes_per_region: 1,
            failover: FailoverConfig::default(),
            trigger_object: None,
            dr_trigger_region: None,
            s3_endpoint: None,
            synchronous: Synchronous::Off,
            max_commit_lag: None,
            pool_mode: PoolMode::Session,
            backup: true,
            hosts: Hosts::Loopback,
            wan: None,
        }
    }
}

impl LabShape {
    /// Database regions, plus a witness when there are fewer than three, so that
    /// etcd always has three members in three regions.
    pub fn all_regions(&self) -> Vec<String> {
        let mut all = self.regions.clone();
        if all.len() < 3 {
            all.push(WITNESS.into());
        }
        all
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.regions.is_empty(), "--regions needs at least one region");
        anyhow::ensure!(self.regions.len() <= 9, "--regions: the lab has room for at most 9 regions");
        anyhow::ensure!((1..=9).contains(&self.nodes_per_region), "--nodes-per-region must be between 1 and 9");
        for r in &self.regions {
            anyhow::ensure!(is_dns_label(r), "--regions: {r:?} must be lowercase letters, digits and '-'");
            anyhow::ensure!(r != WITNESS, "--regions: {WITNESS:?} is reserved for the lab's witness region");
        }
        let mut sorted = self.regions.clone();
        sorted.sort();
        sorted.dedup();
        anyhow::ensure!(sorted.len() == self.regions.len(), "--regions lists a region twice");
        if let Some(t) = &self.trigger_object {
            t.parse::<ObjectUrl>().map_err(|e| anyhow::anyhow!("--trigger-object: {e}"))?;
        }
        if let Some(r) = &self.dr_trigger_region {
            anyhow::ensure!(self.regions.contains(r), "--dr-trigger-region: {r:?} is not one of --regions");
        }
        anyhow::ensure!(
            self.wan.is_none() || self.hosts == Hosts::Netns,
            "--wan-latency needs --hosts netns: on loopback every process shares one network stack"
        );
        if let Some(endpoint) = self.s3_endpoint.as_deref().filter(|_| self.hosts == Hosts::Netns) {
            anyhow::ensure!(
                !is_loopback_endpoint(endpoint),
                "--s3-endpoint {endpoint}: the isolated hosts have loopbacks of their own and cannot reach this \
                 machine's; serve it on the lab's observer address {} (made by `lab up`) or another routed address",
                observer_ip(self.net)
            );
        }
        Ok(())
    }
}

/// Whether an endpoint URL (`http://127.0.0.1:9000`, `https://localhost/…`) names a loopback host.
fn is_loopback_endpoint(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The bucket of the lab's S3 repository.
pub const LAB_BUCKET: &str = "meridian-backup";

/// The lab's S3 server (moto) listens on 127.0.0.1 and is reached as
/// `localhost`: pgBackRest 2.45 verifies an S3 server's certificate by DNS
/// name only, and `localhost` is the one name every machine resolves. So labs
/// tell their servers apart by port.
pub fn s3_port(net: u8) -> u16 {
    19000 + net as u16
}

/// A loopback lab's address.
pub fn region_ip(net: u8, region_index: usize, host: u8) -> Ipv4Addr {
    host_ip(Hosts::Loopback, net, region_index, host)
}

/// Host `host` of region `region_index` (0-based).
pub fn host_ip(hosts: Hosts, net: u8, region_index: usize, host: u8) -> Ipv4Addr {
    let first = match hosts {
        Hosts::Loopback => 127,
        Hosts::Netns => 10,
    };
    Ipv4Addr::new(first, net, region_index as u8 + 1, host)
}

pub fn etcd_client_url(hosts: Hosts, net: u8, region_index: usize) -> String {
    format!("https://{}:{ETCD_CLIENT_PORT}", host_ip(hosts, net, region_index, 1))
}

/// The netns lab's outside: the CLI, tests and the lab's S3 server, on the
/// root namespace's end of the link to the router.
pub fn observer_ip(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 0, 1)
}

/// Node k (0-based) of a region: the region name plus a letter, as cloud zones are named.
pub fn node_name(region: &str, k: usize) -> String {
    format!("{region}{}", (b'a' + k as u8) as char)
}

/// Where the lab keeps one node's PGDATA and run directory.
pub fn node_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join("nodes").join(node)
}

/// The cluster file for a lab of this shape whose state lives in `dir`.
pub fn lab_config(shape: &LabShape, dir: &Path) -> Config {
    let (net, hosts) = (shape.net, shape.hosts);
    let all = shape.all_regions();
    let addr = |ri: usize, host: u8, port: u16| SocketAddr::new(host_ip(hosts, net, ri, host).into(), port);
    let regions: Vec<Region> = all
        .iter()
        .enumerate()
        .map(|(ri, name)| {
            let is_db = ri < shape.regions.len();
            let nodes = if is_db {
                (0..shape.nodes_per_region)
                    .map(|k| {
                        let name = node_name(name, k);
                        let nd = node_dir(dir, &name);
                        Node {
                            address: addr(ri, 11 + k as u8, 5432),
                            api: addr(ri, 11 + k as u8, 8008),
                            data_dir: nd.join("data"),
                            run_dir: Some(nd.join("run")),
                            name,
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Region {
                name: name.clone(),
                priority: is_db.then_some(ri as u32 + 1),
                etcd: Some(etcd_client_url(hosts, net, ri)),
                gateway: GatewayAddrs {
                    api: addr(ri, 2, 8080),
                    dns: addr(ri, 2, 5353),
                    writer: addr(ri, 2, 6432),
                    reader: addr(ri, 2, 6433),
                },
                nodes,
            }
        })
        .collect();
    let mut settings = BTreeMap::new();
    // Small and quick: the lab runs many servers on two cores.
    settings.insert("shared_buffers".to_string(), toml::Value::String("32MB".into()));
    settings.insert("max_connections".to_string(), toml::Value::Integer(50));
    let trigger =
        shape.trigger_object.clone().unwrap_or_else(|| format!("file://{}", dir.join("dr/trigger").display()));
    let mut failover = shape.failover.clone();
    failover.dr_trigger =
        shape.dr_trigger_region.as_ref().map(|region| DrTrigger { object: trigger.clone(), region: region.clone() });
    let (health, records) = lab_routing(shape, &regions, &trigger);
    Config {
        cluster: "lab".into(),
        etcd: EtcdConfig { endpoints: (0..all.len()).map(|ri| etcd_client_url(hosts, net, ri)).collect() },
        dns: DnsConfig { zone: "lab.meridian.internal.".into(), records, ..DnsConfig::default() },
        health,
        proxy: ProxyConfig { pool_mode: shape.pool_mode, ..ProxyConfig::default() },
        object_store: ObjectStoreConfig { s3_endpoint: shape.s3_endpoint.clone(), s3_region: None },
        replication: ReplicationConfig {
            synchronous: shape.synchronous,
            max_commit_lag: shape.max_commit_lag,
            ..ReplicationConfig::default()
        },
        failover,
        postgres: PostgresConfig {
            secrets_file: Some(PathBuf::from("secrets.toml")),
            bootstrap_sql: Some(PathBuf::from("bootstrap.sql")),
            client_networks: vec![match hosts {
                // Loopback clients connect from 127.0.0.1 whatever address they target.
                Hosts::Loopback => "127.0.0.1/32".into(),
                // The lab's hosts, and whoever runs the CLI, on the observer link.
                Hosts::Netns => format!("10.{net}.0.0/16"),
            }],
            settings,
            ..PostgresConfig::default()
        },
        tls: TlsConfig::default(),
        backup: shape.backup.then(|| lab_backup(shape, dir)),
        api: ApiConfig {
            token_file: Some(PathBuf::from(super::ADMIN_TOKEN)),
            // The lab's own client certificate (D/tls/user-lab) is its operator's.
            certificate_roles: [("user:lab".to_string(), ApiRole::Admin)].into(),
            ..ApiConfig::default()
        },
        regions,
        source: Some(dir.join("meridian.toml")),
    }
}

/// One repository per database region (the first two): the first region's
/// in the lab's S3 server, the second's in a directory of the lab.
/// The file `meridian lab up` writes for trying `meridian restore --into`:
/// the lab's cluster under another name (`lab-restored`, its own etcd
/// prefix in the same etcd), each node on the next port of its address, with
/// data under `D/restored/`. Its agents are started by hand; nothing starts
/// its gateways.
pub fn restore_into_config(lab: &Config, dir: &Path) -> Config {
    let mut c = lab.clone();
    c.cluster = format!("{}-restored", lab.cluster);
    let bump = |a: SocketAddr| SocketAddr::new(a.ip(), a.port() + 1);
    for r in &mut c.regions {
        r.gateway = GatewayAddrs {
            api: bump(r.gateway.api),
            dns: bump(r.gateway.dns),
            writer: bump(r.gateway.writer),
            reader: bump(r.gateway.reader),
        };
        for n in &mut r.nodes {
            let nd = dir.join("restored").join(&n.name);
            n.address = bump(n.address);
            n.api = bump(n.api);
            n.data_dir = nd.join("data");
            n.run_dir = Some(nd.join("run"));
        }
    }
    c.source = Some(dir.join(RESTORE_INTO));
    c
}

/// Where `lab up` writes `restore_into_config`.
pub const RESTORE_INTO: &str = "restore-into.toml";

fn lab_backup(shape: &LabShape, dir: &Path) -> BackupConfig {
    let repositories = shape
        .regions
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, region)| Repository {
            name: region.clone(),
            region: region.clone(),
            url: if i == 0 {
                format!("s3://{LAB_BUCKET}/{region}")
            } else {
                format!("file://{}", dir.join("backup").join(region).display())
            },
            endpoint: (i == 0).then(|| format!("https://localhost:{}", s3_port(shape.net))),
            s3_region: "us-east-1".into(),
            ca_file: None,
            // The lab's S3 server runs outside the namespaces, on the observer link.
            storage_host: (i == 0 && shape.hosts == Hosts::Netns).then(|| observer_ip(shape.net).into()),
        })
        .collect();
    BackupConfig {
        run_on: RunOn::PreferStandby,
        clone_from: CloneFrom::Primary,
        full_every: Duration::from_secs(7 * 24 * 3600),
        diff_every: None,
        incr_every: None,
        retention_full: 2,
        encrypt: true,
        archive_timeout: Duration::from_secs(60),
        schedule_delay: Duration::from_secs(300),
        process_max: 2,
        pgbackrest: PathBuf::from("/usr/bin/pgbackrest"),
        repositories,
    }
}

/// The lab's health checks and DNS records, the reference architecture in
/// miniature: every node has a `postgres` check, and `app.<zone>` is a failover
/// record whose primary (the first region's proxy) is guarded by an inverted
/// `object-exists` check on the trigger object, so that uploading it switches
/// `app` to the second region.
fn lab_routing(shape: &LabShape, regions: &[Region], trigger: &str) -> (HealthConfig, Vec<DnsRecord>) {
    let mut checks = vec![HealthCheck {
        interval: Duration::from_millis(500),
        failure_threshold: 2,
        invert: true,
        ..HealthCheck::new("dr-trigger", CheckKind::ObjectExists, Some(trigger.to_string()))
    }];
    for n in regions.iter().flat_map(|r| &r.nodes) {
        checks.push(HealthCheck {
            interval: Duration::from_secs(2),
            max_lag: Some(LagBudget::Bytes(16 << 20)),
            ..HealthCheck::new(&format!("node-{}", n.name), CheckKind::Postgres, Some(n.address.to_string()))
        });
    }
    let mut records = Vec::new();
    if shape.regions.len() >= 2 {
        let value = |ri: usize| regions[ri].gateway.writer.ip().to_string();
        records.push(DnsRecord {
            name: "app".into(),
            record_type: RecordType::A,
            ttl: None,
            primary: RecordTarget { value: value(0), health_check: Some("dr-trigger".into()) },
            secondary: Some(RecordTarget { value: value(1), health_check: None }),
        });
    }
    (HealthConfig { healthy_share: crate::config::DEFAULT_HEALTHY_SHARE, checks }, records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lab_is_two_database_regions_and_a_witness() {
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        assert_eq!(c.validate(), vec![]);
        let names: Vec<&str> = c.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ap-south-1", "ap-northeast-1", "witness"]);
        assert_eq!(c.regions[0].nodes[0].address.to_string(), "127.0.1.11:5432");
        assert_eq!(c.regions[1].nodes[0].name, "ap-northeast-1a");
        assert_eq!(c.regions[2].gateway.api.to_string(), "127.0.3.2:8080");
        assert_eq!(c.etcd.endpoints[2], "https://127.0.3.1:2379");
        assert!(c.regions[2].nodes.is_empty());
    }

    #[test]
    fn net_and_node_count_shape_the_addresses() {
        let shape = LabShape {
            net: 42,
            regions: vec!["eu".into(), "us".into(), "ap".into()],
            nodes_per_region: 2,
            ..LabShape::default()
        };
        let c = lab_config(&shape, Path::new("/tmp/lab"));
        assert_eq!(c.validate(), vec![]);
        assert_eq!(c.regions.len(), 3, "three database regions need no witness");
        assert_eq!(c.regions[2].nodes[1].address.to_string(), "127.42.3.12:5432");
        assert_eq!(c.regions[2].nodes[1].name, "apb");
    }

    #[test]
    fn the_netns_lab_uses_routable_addresses_and_reaches_s3_on_the_observer_link() {
        let shape = LabShape { net: 42, hosts: Hosts::Netns, ..LabShape::default() };
        let c = lab_config(&shape, Path::new("/tmp/lab"));
        assert_eq!(c.validate(), vec![]);
        assert_eq!(c.regions[0].nodes[0].address.to_string(), "10.42.1.11:5432");
        assert_eq!(c.etcd.endpoints[2], "https://10.42.3.1:2379");
        assert_eq!(c.postgres.client_networks, ["10.42.0.0/16"]);
        let s3 = &c.backup.as_ref().unwrap().repositories[0];
        assert_eq!(s3.storage_host, Some("10.42.0.1".parse().unwrap()));
        // The loopback lab's S3 server is reached as itself.
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        assert_eq!(c.backup.as_ref().unwrap().repositories[0].storage_host, None);
    }

    fn netns(s3_endpoint: &str) -> LabShape {
        LabShape { hosts: Hosts::Netns, s3_endpoint: Some(s3_endpoint.into()), ..LabShape::default() }
    }

    #[test]
    fn bad_shapes_are_refused() {
        // What the isolated hosts can reach, and any endpoint on loopback.
        assert!(netns("http://10.42.0.1:9000").check().is_ok());
        assert!(LabShape { s3_endpoint: Some("http://127.0.0.1:9000".into()), ..LabShape::default() }.check().is_ok());
        let bad = [
            LabShape { regions: vec![], ..LabShape::default() },
            LabShape { regions: vec!["a".into(), "a".into()], ..LabShape::default() },
            LabShape { regions: vec!["Upper".into()], ..LabShape::default() },
            LabShape { regions: vec!["witness".into()], ..LabShape::default() },
            LabShape { nodes_per_region: 0, ..LabShape::default() },
            LabShape { wan: Some(crate::lab::wan::Wan::parse("40ms", None, None).unwrap()), ..LabShape::default() },
            netns("http://127.0.0.1:9000"),
            netns("https://localhost/bucket"),
            netns("http://[::1]:9000"),
        ];
        for shape in bad {
            assert!(shape.check().is_err(), "{shape:?} should be refused");
        }
    }
}
