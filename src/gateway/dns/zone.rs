//! What the zone says, from the cluster file, one snapshot and the aggregated
//! health verdicts. Pure: the DNS server turns this into records and bumps
//! the SOA serial whenever it changes.
//!
//! - `writer.<zone>`: the leader's address;
//! - `reader.<region>.<zone>`: the region's usable standbys, else the leader;
//! - `ns-<region>.<zone>`: each gateway's DNS address (the zone's NS set);
//! - each `[[dns.record]]`: Route 53 failover: the primary value while its
//!   check is healthy (or it has none), else the secondary; both when neither is.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::config::{Config, RecordTarget, RecordType};
use crate::coord::Snapshot;
use crate::gateway::routing;

/// The data of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    A(Vec<Ipv4Addr>),
    AAAA(Vec<Ipv6Addr>),
    CNAME(String),
    /// The name exists but the gateway cannot tell its value (no view of etcd):
    /// SERVFAIL, so that resolvers ask another gateway instead of caching a guess.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub ttl: u32,
    pub entry: Entry,
}

/// Every name of the zone (lowercase, fully qualified) and its answer.
pub type Names = BTreeMap<String, Answer>;

/// The zone's names. `snap` is `None` when the gateway's view of etcd is too old.
pub fn names(config: &Config, snap: Option<&Snapshot>, verdicts: &routing::Verdicts) -> Names {
    let zone = config.dns.zone.to_ascii_lowercase();
    let ttl = secs(config.dns.ttl);
    let mut out = Names::new();
    let ip_entry = |ips: Vec<IpAddr>| {
        let v4: Vec<Ipv4Addr> =
            ips.iter().filter_map(|ip| if let IpAddr::V4(a) = ip { Some(*a) } else { None }).collect();
        if v4.is_empty() {
            Entry::AAAA(ips.iter().filter_map(|ip| if let IpAddr::V6(a) = ip { Some(*a) } else { None }).collect())
        } else {
            Entry::A(v4)
        }
    };
    let leader = snap.map(|s| routing::leader_node(config, s));
    let writer = match &leader {
        None => Entry::Unknown("no current view of etcd".into()),
        Some(None) => Entry::A(Vec::new()),
        Some(Some(b)) => ip_entry(vec![b.address.ip()]),
    };
    out.insert(format!("writer.{zone}"), Answer { ttl, entry: writer.clone() });
    for r in &config.regions {
        let entry = match snap {
            None => writer.clone(),
            Some(s) => {
                let standbys = routing::readers(config, s, &r.name, config.proxy.max_reader_lag);
                if standbys.is_empty() {
                    writer.clone()
                } else {
                    ip_entry(standbys.iter().map(|b| b.address.ip()).collect())
                }
            }
        };
        out.insert(format!("reader.{}.{zone}", r.name), Answer { ttl, entry });
        out.insert(format!("ns-{}.{zone}", r.name), Answer { ttl, entry: ip_entry(vec![r.gateway.dns.ip()]) });
    }
    for rec in &config.dns.records {
        let ttl = rec.ttl.map(secs).unwrap_or(ttl);
        let healthy =
            |t: &RecordTarget| t.health_check.as_ref().is_none_or(|c| verdicts.get(c).copied().unwrap_or(false));
        let chosen: Vec<&RecordTarget> = match &rec.secondary {
            _ if healthy(&rec.primary) => vec![&rec.primary],
            Some(s) if healthy(s) => vec![s],
            Some(s) => vec![&rec.primary, s],
            None => vec![&rec.primary],
        };
        let entry = match rec.record_type {
            // A CNAME cannot have two values: the primary it is.
            RecordType::CNAME => Entry::CNAME(fqdn(&chosen[0].value)),
            RecordType::A => Entry::A(chosen.iter().filter_map(|t| t.value.parse().ok()).collect()),
            RecordType::AAAA => Entry::AAAA(chosen.iter().filter_map(|t| t.value.parse().ok()).collect()),
        };
        out.insert(format!("{}.{zone}", rec.name.to_ascii_lowercase()), Answer { ttl, entry });
    }
    out
}

fn secs(d: Duration) -> u32 {
    d.as_secs().min(u32::MAX as u64) as u32
}

fn fqdn(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Leader, Role};
    use crate::config::{DnsRecord, RecordTarget};
    use crate::coord::LeaderEntry;
    use crate::gateway::routing::tests::member;
    use crate::lab::topology::{lab_config, LabShape};

    fn setup() -> (Config, Snapshot) {
        let config = lab_config(&LabShape::default(), std::path::Path::new("/tmp/lab"));
        let snap = Snapshot {
            epoch: 1,
            leader: Some(LeaderEntry { leader: Leader { node: "ap-south-1a".into(), epoch: 1 }, lease: 7 }),
            members: vec![
                member("ap-south-1a", "ap-south-1", Role::Primary, 0),
                member("ap-northeast-1a", "ap-northeast-1", Role::Replica, 0),
            ],
            ..Snapshot::default()
        };
        (config, snap)
    }

    fn a(names: &Names, name: &str) -> Entry {
        names[&format!("{name}.lab.meridian.internal.")].entry.clone()
    }

    #[test]
    fn writer_and_readers_follow_the_snapshot() {
        let (config, mut snap) = setup();
        let n = names(&config, Some(&snap), &Default::default());
        assert_eq!(a(&n, "writer"), Entry::A(vec!["127.0.1.11".parse().unwrap()]));
        assert_eq!(a(&n, "reader.ap-northeast-1"), Entry::A(vec!["127.0.2.11".parse().unwrap()]));
        // No standby in the primary's region, none in the witness: the primary.
        assert_eq!(a(&n, "reader.ap-south-1"), a(&n, "writer"));
        assert_eq!(a(&n, "reader.witness"), a(&n, "writer"));
        assert_eq!(a(&n, "ns-witness"), Entry::A(vec!["127.0.3.2".parse().unwrap()]));
        assert_eq!(n["writer.lab.meridian.internal."].ttl, 5);
        snap.leader = None;
        let n = names(&config, Some(&snap), &Default::default());
        assert_eq!(a(&n, "writer"), Entry::A(vec![]), "no leader: the name has no address");
        let n = names(&config, None, &Default::default());
        assert!(matches!(a(&n, "writer"), Entry::Unknown(_)), "no view: cannot tell");
    }

    #[test]
    fn failover_records_follow_health_as_route53_does() {
        let (mut config, snap) = setup();
        let target = |v: &str, c: Option<&str>| RecordTarget { value: v.into(), health_check: c.map(String::from) };
        config.dns.records = vec![DnsRecord {
            name: "app".into(),
            record_type: RecordType::A,
            ttl: Some(Duration::from_secs(30)),
            primary: target("10.0.0.1", Some("p")),
            secondary: Some(target("10.0.0.2", Some("s"))),
        }];
        let verdicts = |p: bool, s: bool| routing::Verdicts::from([("p".to_string(), p), ("s".to_string(), s)]);
        let ips = |v: &[&str]| Entry::A(v.iter().map(|s| s.parse().unwrap()).collect());
        let answer = |p, s| a(&names(&config, Some(&snap), &verdicts(p, s)), "app");
        assert_eq!(answer(true, true), ips(&["10.0.0.1"]));
        assert_eq!(answer(true, false), ips(&["10.0.0.1"]));
        assert_eq!(answer(false, true), ips(&["10.0.0.2"]));
        assert_eq!(answer(false, false), ips(&["10.0.0.1", "10.0.0.2"]), "all unhealthy: all");
        let n = names(&config, Some(&snap), &verdicts(true, true));
        assert_eq!(n["app.lab.meridian.internal."].ttl, 30);
    }
}
