//! etcd: the only shared state. Leases, the leader key, the epoch counter and
//! member reports, each changed by a single transaction so that a partitioned
//! minority can change nothing (every request requires an etcd leader).

pub mod keys;

use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use crate::cluster::{Epoch, Leader, MemberStatus};
use crate::config::Config;
pub use keys::Keys;

/// An etcd lease id; keys put under it vanish when it is not renewed.
pub type LeaseId = i64;

/// A connection to the cluster's etcd, with its key layout.
#[derive(Clone)]
pub struct Coord {
    client: Client,
    pub keys: Keys,
}

/// Everything under the cluster's prefix, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub leader: Option<LeaderEntry>,
    /// The last epoch ever granted; 0 before bootstrap.
    pub epoch: Epoch,
    pub members: Vec<MemberStatus>,
    /// The node that initialized the cluster, once one has.
    pub initialized_by: Option<String>,
}

/// The `leader` key with the lease that keeps it alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderEntry {
    pub leader: Leader,
    pub lease: LeaseId,
}

impl Coord {
    /// Connects to every endpoint; requests fail (rather than read stale data) when
    /// the member answering cannot see an etcd leader.
    pub async fn connect(config: &Config) -> Result<Coord> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        let client = Client::connect(&config.etcd.endpoints, Some(options))
            .await
            .with_context(|| format!("connect to etcd at {}", config.etcd.endpoints.join(", ")))?;
        Ok(Coord { client, keys: Keys::new(&config.cluster) })
    }

    /// One consistent read of the whole cluster prefix.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(self.keys.prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .context("read cluster state from etcd")?;
        let mut snap = Snapshot { revision: resp.header().map(|h| h.revision()).unwrap_or(0), ..Snapshot::default() };
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            let Some(rel) = self.keys.relative(key) else { continue };
            let value = kv.value();
            if rel == "leader" {
                match serde_json::from_slice::<Leader>(value) {
                    Ok(leader) => snap.leader = Some(LeaderEntry { leader, lease: kv.lease() }),
                    Err(e) => tracing::warn!("ignoring malformed leader key: {e}"),
                }
            } else if rel == "epoch" {
                snap.epoch = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            } else if rel == "initialize" {
                snap.initialized_by = Some(String::from_utf8_lossy(value).into_owned());
            } else if rel.starts_with("members/") {
                match serde_json::from_slice::<MemberStatus>(value) {
                    Ok(m) => snap.members.push(m),
                    Err(e) => tracing::warn!("ignoring malformed member report {key}: {e}"),
                }
            }
        }
        Ok(snap)
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let resp =
            self.client.lease_client().grant(ttl.as_secs().max(1) as i64, None).await.context("grant etcd lease")?;
        Ok(resp.id())
    }

    /// Renews a lease once; returns the remaining TTL in seconds (0: it had expired).
    pub async fn renew_lease(&self, lease: LeaseId) -> Result<i64> {
        let mut lc = self.client.lease_client();
        let (mut keeper, mut stream) = lc.keep_alive(lease).await.context("renew etcd lease")?;
        keeper.keep_alive().await.context("renew etcd lease")?;
        let resp = stream.message().await.context("renew etcd lease")?.context("etcd closed the lease stream")?;
        Ok(resp.ttl())
    }

    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.client.lease_client().revoke(lease).await.context("revoke etcd lease")?;
        Ok(())
    }

    /// Publishes this agent's report under its lease.
    pub async fn put_member(&self, status: &MemberStatus, lease: LeaseId) -> Result<()> {
        let value = serde_json::to_vec(status)?;
        self.client
            .kv_client()
            .put(self.keys.member(&status.node), value, Some(PutOptions::new().with_lease(lease)))
            .await
            .context("publish member status to etcd")?;
        Ok(())
    }

    /// Records which node creates the cluster. Only the first caller wins; the
    /// key is permanent so a wiped node never initializes a second cluster.
    /// Returns the node that holds it.
    pub async fn claim_initialize(&self, node: &str) -> Result<String> {
        let key = self.keys.initialize();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), node, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.kv_client().txn(txn).await.context("claim cluster initialization in etcd")?;
        if resp.succeeded() {
            return Ok(node.to_string());
        }
        Ok(first_get_value(&resp).unwrap_or_default())
    }

    /// Takes `leader` for epoch `expected + 1` in one transaction, only if nobody
    /// holds `leader` and `epoch` is still `expected`. Returns the new epoch, or
    /// None when another node got there first.
    pub async fn acquire_leader(&self, node: &str, expected: Epoch, lease: LeaseId) -> Result<Option<Epoch>> {
        let epoch = expected + 1;
        let epoch_cmp = if expected == 0 {
            Compare::version(self.keys.epoch(), CompareOp::Equal, 0)
        } else {
            Compare::value(self.keys.epoch(), CompareOp::Equal, expected.to_string())
        };
        let leader = serde_json::to_vec(&Leader { node: node.to_string(), epoch })?;
        let txn = Txn::new().when([Compare::version(self.keys.leader(), CompareOp::Equal, 0), epoch_cmp]).and_then([
            TxnOp::put(self.keys.epoch(), epoch.to_string(), None),
            TxnOp::put(self.keys.leader(), leader, Some(PutOptions::new().with_lease(lease))),
        ]);
        let resp = self.client.kv_client().txn(txn).await.context("acquire leader in etcd")?;
        Ok(resp.succeeded().then_some(epoch))
    }

    /// Deletes `leader` only if it is still ours for this epoch (a clean step-down).
    pub async fn release_leader(&self, node: &str, epoch: Epoch) -> Result<bool> {
        let ours = serde_json::to_vec(&Leader { node: node.to_string(), epoch })?;
        let txn = Txn::new()
            .when([Compare::value(self.keys.leader(), CompareOp::Equal, ours)])
            .and_then([TxnOp::delete(self.keys.leader(), None)]);
        let resp = self.client.kv_client().txn(txn).await.context("release leader in etcd")?;
        Ok(resp.succeeded())
    }

    /// Is etcd answering with a quorum right now?
    pub async fn ping(&self) -> Result<()> {
        self.client.kv_client().get(self.keys.epoch(), None).await.context("read from etcd")?;
        Ok(())
    }
}

fn first_get_value(resp: &etcd_client::TxnResponse) -> Option<String> {
    resp.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => {
            g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        }
        _ => None,
    })
}
