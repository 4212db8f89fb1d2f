//! The etcd key layout (DESIGN.md "State in etcd"). The only place that spells keys.

/// Every key of one cluster lives under `/meridian/<cluster>/`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys { prefix: format!("/meridian/{cluster}/") }
    }
    /// The cluster's whole key range, for one consistent read of everything.
    pub fn prefix(&self) -> &str {
        &self.prefix
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
    /// The node making a fresh copy of the data now, under its agent's lease:
    /// at most one at a time, so the others keep theirs.
    pub fn recopy(&self) -> String {
        format!("{}recopy", self.prefix)
    }
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }
    pub fn dr(&self) -> String {
        format!("{}dr", self.prefix)
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
    /// The part of a full key after the prefix, e.g. `members/ap-south-1a`.
    pub fn relative<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)
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
    }
}
