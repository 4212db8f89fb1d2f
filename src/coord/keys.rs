//! The etcd key layout (DESIGN.md "State in etcd"). The only place that spells keys.

/// Every key of one cluster lives under `/meridian/<cluster>/`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    security: String,
    config: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/meridian/{cluster}/"),
            security: format!("/meridian-security/{cluster}/"),
            config: format!("/meridian-config/{cluster}/"),
        }
    }
    /// The cluster's whole key range, for one consistent read of everything.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Tokens and the audit log (see `token`).
    pub fn security_prefix(&self) -> &str {
        &self.security
    }
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }
    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
    /// Who created the cluster; taken once, by compare-and-swap, so only one node ever runs initdb.
    pub fn initialize(&self) -> String {
        format!("{}initialize", self.prefix)
    }
    /// The leader's last WAL position, permanent: after the leader is gone, the
    /// survivors measure their lag against it.
    pub fn optime(&self) -> String {
        format!("{}optime", self.prefix)
    }
    /// The standbys the leader vouches for (`cluster::SyncRecord`), permanent.
    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }
    /// The node making a fresh copy of the data now, under its agent's lease:
    /// at most one at a time, so the others keep theirs.
    pub fn recopy(&self) -> String {
        format!("{}recopy", self.prefix)
    }
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }
    /// A live gateway, under its lease: which switchover its proxies hold new
    /// transactions for (`cluster::GatewayPresence`).
    pub fn gateway(&self, region: &str) -> String {
        format!("{}gateways/{region}", self.prefix)
    }
    /// A node restart asked by `meridian rolling-restart`; one at a time.
    pub fn restart(&self) -> String {
        format!("{}restart", self.prefix)
    }
    pub fn dr(&self) -> String {
        format!("{}dr", self.prefix)
    }
    /// A `restore --replace` in progress, under its process's lease.
    pub fn restore(&self) -> String {
        format!("{}restore", self.prefix)
    }
    /// The current (or last) backup job; one at a time.
    pub fn backup_job(&self) -> String {
        format!("{}backup", self.prefix)
    }
    pub fn history_prefix(&self) -> String {
        format!("{}history/", self.prefix)
    }
    /// Zero-padded so that etcd's byte order is epoch order.
    pub fn history(&self, epoch: u64) -> String {
        format!("{}history/{epoch:020}", self.prefix)
    }
    pub fn health(&self, check: &str, observer: &str) -> String {
        format!("{}health/{check}/{observer}", self.prefix)
    }
    /// API tokens (their digests) and the audit log live under
    /// `/meridian-security/<cluster>/`, outside the cluster prefix: every
    /// agent reads that whole prefix each tick, and neither belongs in it.
    pub fn token(&self, id: &str) -> String {
        format!("{}tokens/{id}", self.security)
    }
    pub fn tokens_prefix(&self) -> String {
        format!("{}tokens/", self.security)
    }
    /// Zero-padded milliseconds first, so that etcd's byte order is time order.
    pub fn audit(&self, time_ms: u64, id: &str) -> String {
        format!("{}audit/{time_ms:020}-{id}", self.security)
    }
    pub fn audit_prefix(&self) -> String {
        format!("{}audit/", self.security)
    }
    /// The published cluster file (`meridian config apply`): `current`, and
    /// every version under `versions/`. Outside the cluster prefix too (files
    /// are kilobytes, and the agents read that prefix every tick).
    pub fn config_prefix(&self) -> &str {
        &self.config
    }
    pub fn config_current(&self) -> String {
        format!("{}current", self.config)
    }
    /// Zero-padded, so that etcd's byte order is version order.
    pub fn config_version(&self, version: u64) -> String {
        format!("{}versions/{version:020}", self.config)
    }

    /// The part of a full key after the prefix, e.g. `members/ap-south-1a`.
    pub fn relative<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)
    }

    /// A full key of this cluster, as a type; None for keys of other clusters
    /// and for keys meridian does not know.
    pub fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        Key::parse(self.relative(key)?)
    }
}

/// One key of a cluster, parsed once: what the snapshot dispatches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    Leader,
    Epoch,
    Initialize,
    Optime,
    Sync,
    Recopy,
    Switchover,
    Restart,
    Dr,
    Restore,
    BackupJob,
    Member { node: &'a str },
    Gateway { region: &'a str },
    History { epoch: u64 },
    Health { check: &'a str, observer: &'a str },
}

impl<'a> Key<'a> {
    /// From the part after the cluster prefix.
    pub fn parse(rel: &'a str) -> Option<Key<'a>> {
        let non_empty = |s: &'a str| (!s.is_empty() && !s.contains('/')).then_some(s);
        Some(match rel {
            "leader" => Key::Leader,
            "epoch" => Key::Epoch,
            "initialize" => Key::Initialize,
            "optime" => Key::Optime,
            "sync" => Key::Sync,
            "recopy" => Key::Recopy,
            "switchover" => Key::Switchover,
            "restart" => Key::Restart,
            "dr" => Key::Dr,
            "restore" => Key::Restore,
            "backup" => Key::BackupJob,
            _ => {
                let (kind, rest) = rel.split_once('/')?;
                match kind {
                    "members" => Key::Member { node: non_empty(rest)? },
                    "gateways" => Key::Gateway { region: non_empty(rest)? },
                    "history" => Key::History { epoch: rest.parse().ok()? },
                    "health" => {
                        let (check, observer) = rest.split_once('/')?;
                        Key::Health { check: non_empty(check)?, observer: non_empty(observer)? }
                    }
                    _ => return None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_design_layout() {
        let k = Keys::new("orders");
        assert_eq!(k.member("ap-south-1a"), "/meridian/orders/members/ap-south-1a");
        assert_eq!(k.leader(), "/meridian/orders/leader");
        assert_eq!(k.epoch(), "/meridian/orders/epoch");
        assert_eq!(k.dr(), "/meridian/orders/dr");
        assert_eq!(k.health("writer-tcp", "witness"), "/meridian/orders/health/writer-tcp/witness");
        assert!(k.history(9) < k.history(10), "history keys sort by epoch");
        assert_eq!(k.relative("/meridian/orders/members/x"), Some("members/x"));
        assert_eq!(k.relative("/meridian/other/leader"), None);
        assert_eq!(k.token("0123456789ab"), "/meridian-security/orders/tokens/0123456789ab");
        assert!(!k.token("x").starts_with(k.prefix()), "tokens stay out of the agents' snapshot");
        assert!(!k.audit(1, "x").starts_with(k.prefix()), "the audit log stays out of the agents' snapshot");
        assert!(k.audit(999, "z") < k.audit(1000, "a"), "audit keys sort by time");
    }

    #[test]
    fn every_key_spelled_here_parses_back_to_its_type() {
        let k = Keys::new("orders");
        let cases = [
            (k.leader(), Key::Leader),
            (k.epoch(), Key::Epoch),
            (k.initialize(), Key::Initialize),
            (k.optime(), Key::Optime),
            (k.sync(), Key::Sync),
            (k.recopy(), Key::Recopy),
            (k.switchover(), Key::Switchover),
            (k.restart(), Key::Restart),
            (k.dr(), Key::Dr),
            (k.member("ap-south-1a"), Key::Member { node: "ap-south-1a" }),
            (k.gateway("witness"), Key::Gateway { region: "witness" }),
            (k.history(42), Key::History { epoch: 42 }),
            (k.health("writer-tcp", "witness"), Key::Health { check: "writer-tcp", observer: "witness" }),
        ];
        for (full, want) in &cases {
            assert_eq!(k.parse(full), Some(*want), "{full}");
        }
        for junk in [
            "/meridian/other/leader",
            "/meridian/orders/leaderx",
            "/meridian/orders/members/",
            "/meridian/orders/members/a/b",
            "/meridian/orders/history/x",
            "/meridian/orders/health/only",
            "/meridian/orders/",
        ] {
            assert_eq!(k.parse(junk), None, "{junk}");
        }
    }
}
