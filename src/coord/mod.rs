//! etcd: the only shared state. Leases, the leader key, the epoch counter and
//! member reports, each changed by a single transaction so that a partitioned
//! minority can change nothing (every request requires an etcd leader).

mod config_store;
pub use config_store::PublishedConfig;
pub mod keys;
mod security;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use crate::cluster::{
    DrSwitch, Epoch, HealthReport, HistoryEntry, Leader, MemberStatus, Optime, StartPosition, SwitchoverRequest,
};
use crate::config::Config;
pub use keys::{Key, Keys};

/// An etcd lease id; keys put under it vanish when it is not renewed.
pub type LeaseId = i64;

/// No etcd member answered a request: etcd is out of reach for now (an
/// election, a partition, a restart). Callers log it as a warning; what
/// depends on etcd simply waits for the next pass.
#[derive(Debug, thiserror::Error)]
#[error("{what}: no etcd member answered ({failures})")]
pub struct Unavailable {
    what: String,
    failures: String,
}

/// The error, or one it was caused by, is `Unavailable`.
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unavailable>())
}

/// A connection to the cluster's etcd, with its key layout.
///
/// One client per member, and requests go to the member that answered last,
/// rotating to the next on failure (what etcd's Go client does). etcd-client's
/// own balanced channel keeps routing requests to a dead member
/// (etcdv3/etcd-client#39), which would make losing one region's etcd member
/// look like losing etcd.
#[derive(Clone)]
pub struct Coord {
    /// Replaced (by `current`) when the process's certificate is renewed.
    members: Arc<std::sync::RwLock<Arc<Members>>>,
    renewal: Arc<Renewal>,
    /// For each member report: the revision last seen and when this process
    /// first saw it (see `MemberStatus::is_fresh`).
    seen: Arc<std::sync::Mutex<std::collections::HashMap<String, (i64, std::time::Instant)>>>,
    /// Index of the member that answered last.
    preferred: Arc<AtomicUsize>,
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
    /// The last leader's last recorded position.
    pub optime: Option<Optime>,
    /// The standbys the leader of the recorded epoch vouches for.
    pub sync: Option<crate::cluster::SyncRecord>,
    pub switchover: Option<SwitchoverRequest>,
    pub restart: Option<crate::cluster::RestartRequest>,
    pub dr: Option<DrSwitch>,
    pub restore: Option<crate::cluster::RestoreRequest>,
    pub backup_job: Option<crate::backup::job::BackupJob>,
    /// Every gateway's live health verdicts.
    pub health: Vec<HealthReport>,
    /// The gateways alive now (their leases), and what they hold for.
    pub gateways: Vec<crate::cluster::GatewayPresence>,
}

/// One etcd member, as `member list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    pub id: u64,
    /// Empty until the member has started.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub learner: bool,
}

/// The `leader` key with the lease that keeps it alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderEntry {
    pub leader: Leader,
    pub lease: LeaseId,
}

impl Coord {
    /// Prepares a client per member (connections are made lazily, so a member
    /// that is down now does not prevent starting). A member that cannot see an
    /// etcd leader refuses requests rather than serve stale data.
    ///
    /// `https://` endpoints (the only kind a cluster file may name) are reached
    /// over TLS: the member's certificate must come from the cluster CA and
    /// name its address, and `identity`'s certificate is presented (etcd runs
    /// with client-certificate authentication). A renewed certificate is
    /// noticed within `RENEWAL_CHECK` and the clients are made anew with it,
    /// so rotation needs no restart here either.
    pub async fn connect(config: &Config, identity: &crate::tls::Identity) -> Result<Coord> {
        let tls = config.etcd.endpoints.iter().any(|e| e.starts_with("https://"));
        let renewal = Renewal {
            endpoints: config.etcd.endpoints.clone(),
            identity: identity.clone(),
            tls,
            seen: tokio::sync::Mutex::new((std::time::Instant::now(), cert_bytes(identity, tls))),
        };
        let members = renewal.clients().await?;
        Ok(Coord {
            members: Arc::new(std::sync::RwLock::new(Arc::new(members))),
            renewal: Arc::new(renewal),
            seen: Arc::default(),
            preferred: Arc::new(AtomicUsize::new(0)),
            keys: Keys::new(&config.cluster),
        })
    }

    /// The clients to use now, made anew first if the certificate was renewed.
    async fn current(&self) -> Arc<Members> {
        if let Some(renewed) = self.renewal.renewed().await {
            *self.members.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(renewed);
        }
        self.members.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One client per etcd member, with its URL.
type Members = Vec<(String, Client)>;

/// How often a process looks whether its certificate was renewed.
const RENEWAL_CHECK: Duration = Duration::from_secs(10);

/// What it takes to make the clients again with a renewed certificate.
struct Renewal {
    endpoints: Vec<String>,
    identity: crate::tls::Identity,
    tls: bool,
    /// When the certificate was last looked at, and what it held.
    seen: tokio::sync::Mutex<(std::time::Instant, Option<Vec<u8>>)>,
}

fn cert_bytes(identity: &crate::tls::Identity, tls: bool) -> Option<Vec<u8>> {
    tls.then(|| std::fs::read(identity.cert()).ok()).flatten()
}

impl Renewal {
    /// New clients if the certificate changed since last seen and makes a
    /// usable pair with its key (not half-written).
    async fn renewed(&self) -> Option<Members> {
        if !self.tls {
            return None;
        }
        let mut seen = self.seen.lock().await;
        if seen.0.elapsed() < RENEWAL_CHECK {
            return None;
        }
        seen.0 = std::time::Instant::now();
        let now = cert_bytes(&self.identity, self.tls);
        if now.is_none() || now == seen.1 || crate::tls::Reloading::open(&self.identity).is_err() {
            return None;
        }
        match self.clients().await {
            Ok(c) => {
                seen.1 = now;
                tracing::info!("TLS: etcd clients now present the renewed certificate of {}", self.identity.name);
                Some(c)
            }
            Err(e) => {
                tracing::warn!("TLS: keeping the etcd clients of {}: {e:#}", self.identity.name);
                None
            }
        }
    }

    async fn clients(&self) -> Result<Members> {
        let identity = &self.identity;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(1000))
            // Short, so that a blackholed member costs one second before the
            // next is tried: a primary's lease renewal must get through well
            // within the fencing margin even when its preferred member is cut off.
            .with_timeout(Duration::from_millis(1000))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        if self.tls {
            let read = |p: std::path::PathBuf| {
                std::fs::read(&p)
                    .with_context(|| format!("read {} (etcd needs {}'s certificate)", p.display(), identity.name))
            };
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(identity.ca())?))
                .identity(etcd_client::Identity::from_pem(read(identity.cert())?, read(identity.key())?));
            options = options.with_tls(tls);
        }
        let mut members = Vec::new();
        for url in &self.endpoints {
            let client = Client::connect([url], Some(options.clone()))
                .await
                .with_context(|| format!("prepare etcd client for {url}"))?;
            members.push((url.clone(), client));
        }
        Ok(members)
    }
}

impl Coord {
    /// Stamps how long ago this process saw each report's revision change;
    /// forgets reports that are gone (their lease expired).
    fn stamp_ages(&self, members: &mut [MemberStatus]) {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap();
        seen.retain(|node, _| members.iter().any(|m| &m.node == node));
        for m in members {
            let (revision, since) = seen.entry(m.node.clone()).or_insert((m.revision, now));
            if *revision != m.revision {
                *revision = m.revision;
                *since = now;
            }
            m.unchanged_ms = now.duration_since(*since).as_millis() as u64;
        }
    }

    /// Runs one request against the preferred member, then each other in turn.
    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let members = self.current().await;
        let n = members.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let (url, client) = &members[idx];
            match op(client.clone()).await {
                Ok(v) => {
                    if i > 0 {
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) => failures.push(format!("{url}: {}", short_error(&e))),
            }
        }
        Err(Unavailable { what: what.to_string(), failures: failures.join("; ") }.into())
    }

    /// One consistent read of the whole cluster prefix.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let prefix = self.keys.prefix().to_string();
        let resp = self
            .call("read cluster state from etcd", |c| {
                let prefix = prefix.clone();
                async move { c.kv_client().get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut snap = Snapshot { revision: resp.header().map(|h| h.revision()).unwrap_or(0), ..Snapshot::default() };
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            let Some(parsed) = self.keys.parse(key) else { continue };
            let value = kv.value();
            match parsed {
                Key::Leader => match serde_json::from_slice::<Leader>(value) {
                    Ok(leader) => snap.leader = Some(LeaderEntry { leader, lease: kv.lease() }),
                    Err(e) => tracing::warn!("ignoring malformed leader key: {e}"),
                },
                Key::Epoch => snap.epoch = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
                Key::Switchover => snap.switchover = serde_json::from_slice(value).ok(),
                Key::Restart => match serde_json::from_slice(value) {
                    Ok(r) => snap.restart = Some(r),
                    Err(e) => tracing::warn!("ignoring malformed restart request: {e}"),
                },
                Key::Dr => snap.dr = serde_json::from_slice(value).ok(),
                Key::Restore => match serde_json::from_slice(value) {
                    Ok(r) => snap.restore = Some(r),
                    Err(e) => tracing::warn!("ignoring malformed restore request: {e}"),
                },
                Key::BackupJob => match serde_json::from_slice(value) {
                    Ok(job) => snap.backup_job = Some(job),
                    Err(e) => tracing::warn!("ignoring malformed backup job: {e}"),
                },
                Key::Optime => snap.optime = serde_json::from_slice(value).ok(),
                Key::Sync => match serde_json::from_slice(value) {
                    Ok(r) => snap.sync = Some(r),
                    Err(e) => tracing::warn!("ignoring malformed sync record: {e}"),
                },
                Key::Initialize => snap.initialized_by = Some(String::from_utf8_lossy(value).into_owned()),
                Key::Health { .. } => match serde_json::from_slice::<HealthReport>(value) {
                    Ok(h) => snap.health.push(h),
                    Err(e) => tracing::warn!("ignoring malformed health report {key}: {e}"),
                },
                Key::Gateway { .. } => match serde_json::from_slice(value) {
                    Ok(g) => snap.gateways.push(g),
                    Err(e) => tracing::warn!("ignoring malformed gateway presence {key}: {e}"),
                },
                Key::Member { .. } => match serde_json::from_slice::<MemberStatus>(value) {
                    Ok(m) => snap.members.push(MemberStatus { revision: kv.mod_revision(), ..m }),
                    Err(e) => tracing::warn!("ignoring malformed member report {key}: {e}"),
                },
                // Read by `history()`; the slot is only compared against.
                Key::History { .. } | Key::Recopy => {}
            }
        }
        self.stamp_ages(&mut snap.members);
        Ok(snap)
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self.call("grant etcd lease", |c| async move { c.lease_client().grant(secs, None).await }).await?;
        Ok(resp.id())
    }

    /// Renews a lease once; returns the remaining TTL in seconds (0: it had expired).
    pub async fn renew_lease(&self, lease: LeaseId) -> Result<i64> {
        let resp = self
            .call("renew etcd lease", |c| async move {
                let renewed = async {
                    let (mut keeper, mut stream) = c.lease_client().keep_alive(lease).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match renewed.await {
                    // An expired lease is reported as NotFound by some paths, as TTL 0 by
                    // others, and etcd-client turns a TTL of 0 into a keep-alive error:
                    // for that one, ask etcd whether the lease still exists.
                    Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => Ok(None),
                    Err(e @ etcd_client::Error::LeaseKeepAliveError(_)) => {
                        match c.lease_client().time_to_live(lease, None).await {
                            Ok(r) if r.ttl() <= 0 => Ok(None),
                            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => Ok(None),
                            _ => Err(e),
                        }
                    }
                    other => other,
                }
            })
            .await?;
        Ok(resp.map(|r| r.ttl()).unwrap_or(0))
    }

    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.call("revoke etcd lease", |c| async move { c.lease_client().revoke(lease).await }).await?;
        Ok(())
    }

    /// Publishes this agent's report under its lease.
    pub async fn put_member(&self, status: &MemberStatus, lease: LeaseId) -> Result<()> {
        let value = serde_json::to_vec(status)?;
        let key = self.keys.member(&status.node);
        self.call("publish member status to etcd", |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.kv_client().put(key, value, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(())
    }

    /// Publishes a gateway's presence under its lease.
    pub async fn put_gateway(&self, presence: &crate::cluster::GatewayPresence, lease: LeaseId) -> Result<()> {
        let value = serde_json::to_vec(presence)?;
        let key = self.keys.gateway(&presence.region);
        self.call("publish the gateway's presence to etcd", |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.kv_client().put(key, value, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(())
    }

    /// Publishes a gateway's verdict on one check under the gateway's lease.
    pub async fn put_health(&self, report: &HealthReport, lease: LeaseId) -> Result<()> {
        let value = serde_json::to_vec(report)?;
        let key = self.keys.health(&report.check, &report.observer);
        self.call("publish a health verdict to etcd", |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.kv_client().put(key, value, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(())
    }

    /// Watches the whole cluster prefix from `revision` on. The stream ends or
    /// fails when the member loses its etcd leader (the watch requires one).
    pub async fn watch(&self, revision: i64) -> Result<etcd_client::WatchStream> {
        let prefix = self.keys.prefix().to_string();
        self.call("watch cluster state in etcd", |c| {
            let prefix = prefix.clone();
            async move {
                let options = WatchOptions::new().with_prefix().with_start_revision(revision);
                c.watch_client().watch(prefix, Some(options)).await
            }
        })
        .await
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
        let resp = self.txn("claim cluster initialization in etcd", txn).await?;
        if resp.succeeded() {
            return Ok(node.to_string());
        }
        Ok(first_get_value(&resp).unwrap_or_default())
    }

    /// Takes `leader` for epoch `expected + 1` in one transaction, only if nobody
    /// holds `leader` and `epoch` is still `expected`. Returns the new epoch, or
    /// None when another node got there first.
    ///
    /// `start`, when known, is recorded as the new epoch's `optime` in the same
    /// transaction: from the moment a node leads, the last position on record
    /// is its own, so a failover after it dies (even before its first pass as
    /// primary) judges against the right primary, never a previous epoch's.
    pub async fn acquire_leader(
        &self,
        node: &str,
        expected: Epoch,
        lease: LeaseId,
        start: Option<StartPosition>,
    ) -> Result<Option<Epoch>> {
        let epoch = expected + 1;
        let epoch_cmp = if expected == 0 {
            Compare::version(self.keys.epoch(), CompareOp::Equal, 0)
        } else {
            Compare::value(self.keys.epoch(), CompareOp::Equal, expected.to_string())
        };
        let leader = serde_json::to_vec(&Leader { node: node.to_string(), epoch })?;
        let mut ops = vec![
            TxnOp::put(self.keys.epoch(), epoch.to_string(), None),
            TxnOp::put(self.keys.leader(), leader, Some(PutOptions::new().with_lease(lease))),
        ];
        if let Some(start) = start {
            let optime = Optime {
                node: node.to_string(),
                region: start.region,
                epoch,
                lsn: start.lsn,
                timeline: start.timeline,
                at_ms: crate::cluster::now_ms(),
            };
            ops.push(TxnOp::put(self.keys.optime(), serde_json::to_vec(&optime)?, None));
        }
        let txn = Txn::new().when([Compare::version(self.keys.leader(), CompareOp::Equal, 0), epoch_cmp]).and_then(ops);
        let resp = self.txn("acquire leader in etcd", txn).await?;
        Ok(resp.succeeded().then_some(epoch))
    }

    /// Takes the fresh-copy slot for `node` under its lease, unless another
    /// node holds it; returns who holds it when it is not ours.
    pub async fn take_recopy(&self, node: &str, lease: LeaseId) -> Result<Option<String>> {
        let key = self.keys.recopy();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), node, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn("take the fresh-copy slot in etcd", txn).await?;
        if resp.succeeded() {
            return Ok(None);
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => {
                g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            }
            _ => None,
        });
        Ok(holder.filter(|h| h != node))
    }

    /// Gives the fresh-copy slot back if `node` holds it.
    pub async fn release_recopy(&self, node: &str) -> Result<()> {
        let key = self.keys.recopy();
        let txn =
            Txn::new().when([Compare::value(key.clone(), CompareOp::Equal, node)]).and_then([TxnOp::delete(key, None)]);
        self.txn("release the fresh-copy slot in etcd", txn).await?;
        Ok(())
    }

    /// Deletes `leader` only if it is still ours for this epoch (a clean step-down).
    pub async fn release_leader(&self, node: &str, epoch: Epoch) -> Result<bool> {
        let ours = serde_json::to_vec(&Leader { node: node.to_string(), epoch })?;
        let txn = Txn::new()
            .when([Compare::value(self.keys.leader(), CompareOp::Equal, ours)])
            .and_then([TxnOp::delete(self.keys.leader(), None)]);
        let resp = self.txn("release leader in etcd", txn).await?;
        Ok(resp.succeeded())
    }

    /// Whether `leader` is still ours for `epoch`, under `lease`.
    pub async fn holds_leader(&self, node: &str, epoch: Epoch, lease: LeaseId) -> Result<bool> {
        let ours = serde_json::to_vec(&Leader { node: node.to_string(), epoch })?;
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, ours), Compare::lease(key, CompareOp::Equal, lease)]);
        Ok(self.txn("check the leader key in etcd", txn).await?.succeeded())
    }

    /// Marks the switchover `old` as `aborted`, only if it is unchanged and
    /// `leader` is still ours for `epoch` under `lease`: one transaction, so
    /// the old primary restarts read-write only on etcd's word that nobody
    /// else can have been promoted meanwhile.
    pub async fn abort_switchover_as_leader(
        &self,
        node: &str,
        epoch: Epoch,
        lease: LeaseId,
        old: &SwitchoverRequest,
        aborted: &SwitchoverRequest,
    ) -> Result<bool> {
        let ours = serde_json::to_vec(&Leader { node: node.to_string(), epoch })?;
        let (leader, sw) = (self.keys.leader(), self.keys.switchover());
        let txn = Txn::new()
            .when([
                Compare::value(leader.clone(), CompareOp::Equal, ours),
                Compare::lease(leader, CompareOp::Equal, lease),
                Compare::value(sw.clone(), CompareOp::Equal, serde_json::to_vec(old)?),
            ])
            .and_then([TxnOp::put(sw, serde_json::to_vec(aborted)?, None)]);
        Ok(self.txn("abort the switchover as its leader in etcd", txn).await?.succeeded())
    }

    /// Records the leader's position, only while `leader` is still ours.
    pub async fn put_optime(&self, optime: &Optime) -> Result<bool> {
        let ours = serde_json::to_vec(&Leader { node: optime.node.clone(), epoch: optime.epoch })?;
        let txn = Txn::new().when([Compare::value(self.keys.leader(), CompareOp::Equal, ours)]).and_then([TxnOp::put(
            self.keys.optime(),
            serde_json::to_vec(optime)?,
            None,
        )]);
        Ok(self.txn("record the leader's position in etcd", txn).await?.succeeded())
    }

    /// Writes the `sync` record, only while `leader` is still this node's with
    /// the record's epoch. False: it is not (any more).
    pub async fn put_sync(&self, record: &crate::cluster::SyncRecord) -> Result<bool> {
        let ours = serde_json::to_vec(&Leader { node: record.node.clone(), epoch: record.epoch })?;
        let txn = Txn::new().when([Compare::value(self.keys.leader(), CompareOp::Equal, ours)]).and_then([TxnOp::put(
            self.keys.sync(),
            serde_json::to_vec(record)?,
            None,
        )]);
        Ok(self.txn("record the synchronous standbys in etcd", txn).await?.succeeded())
    }

    /// Removes `leader` if it is still exactly `entry`, and revokes its lease
    /// (which also removes that agent's report). For a leader known to be dead.
    pub async fn depose(&self, entry: &LeaderEntry) -> Result<bool> {
        let value = serde_json::to_vec(&entry.leader)?;
        let txn = Txn::new()
            .when([
                Compare::value(self.keys.leader(), CompareOp::Equal, value),
                Compare::lease(self.keys.leader(), CompareOp::Equal, entry.lease),
            ])
            .and_then([TxnOp::delete(self.keys.leader(), None)]);
        let deposed = self.txn("remove a dead leader from etcd", txn).await?.succeeded();
        if deposed {
            // Best effort: the lease would expire by itself anyway.
            let _ = self.revoke_lease(entry.lease).await;
        }
        Ok(deposed)
    }

    /// Creates the `switchover` request unless one is pending (an aborted one may be replaced).
    pub async fn request_switchover(
        &self,
        req: &SwitchoverRequest,
        replace_aborted: Option<&SwitchoverRequest>,
    ) -> Result<bool> {
        let key = self.keys.switchover();
        let cmp = match replace_aborted {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(old) => Compare::value(key.clone(), CompareOp::Equal, serde_json::to_vec(old)?),
        };
        // Not while a restore replaces the data.
        let no_restore = Compare::version(self.keys.restore(), CompareOp::Equal, 0);
        let txn = Txn::new().when([cmp, no_restore]).and_then([TxnOp::put(key, serde_json::to_vec(req)?, None)]);
        Ok(self.txn("request a switchover in etcd", txn).await?.succeeded())
    }

    /// Replaces `old` with `new` (None: deletes it), only if it is still `old`.
    pub async fn update_switchover(&self, old: &SwitchoverRequest, new: Option<&SwitchoverRequest>) -> Result<bool> {
        let key = self.keys.switchover();
        let op = match new {
            Some(n) => TxnOp::put(key.clone(), serde_json::to_vec(n)?, None),
            None => TxnOp::delete(key.clone(), None),
        };
        let txn = Txn::new().when([Compare::value(key, CompareOp::Equal, serde_json::to_vec(old)?)]).and_then([op]);
        Ok(self.txn("update the switchover request in etcd", txn).await?.succeeded())
    }

    /// Replaces the `restart` request `old` with `new` (None: no request),
    /// only if the key still holds `old`; not while a switchover or a restore
    /// is pending when a request is made.
    pub async fn put_restart(
        &self,
        old: Option<&crate::cluster::RestartRequest>,
        new: Option<&crate::cluster::RestartRequest>,
    ) -> Result<bool> {
        let key = self.keys.restart();
        let mut when = vec![match old {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(old) => Compare::value(key.clone(), CompareOp::Equal, serde_json::to_vec(old)?),
        }];
        if new.is_some() {
            when.push(Compare::version(self.keys.switchover(), CompareOp::Equal, 0));
            when.push(Compare::version(self.keys.restore(), CompareOp::Equal, 0));
        }
        let op = match new {
            Some(n) => TxnOp::put(key, serde_json::to_vec(n)?, None),
            None => TxnOp::delete(key, None),
        };
        let txn = Txn::new().when(when).and_then([op]);
        Ok(self.txn("write the restart request in etcd", txn).await?.succeeded())
    }

    /// Creates the `restore` request under `lease`, unless one exists or a
    /// switchover is pending.
    pub async fn request_restore(&self, req: &crate::cluster::RestoreRequest, lease: LeaseId) -> Result<bool> {
        let key = self.keys.restore();
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Equal, 0),
                Compare::version(self.keys.switchover(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key, serde_json::to_vec(req)?, Some(PutOptions::new().with_lease(lease)))]);
        Ok(self.txn("request a restore in etcd", txn).await?.succeeded())
    }

    /// Replaces the `restore` request `old` with `new` (keeping its lease;
    /// None: deletes it), only if it is still `old`.
    pub async fn update_restore(
        &self,
        old: &crate::cluster::RestoreRequest,
        new: Option<&crate::cluster::RestoreRequest>,
    ) -> Result<bool> {
        let key = self.keys.restore();
        let op = match new {
            Some(n) => TxnOp::put(key.clone(), serde_json::to_vec(n)?, Some(PutOptions::new().with_ignore_lease())),
            None => TxnOp::delete(key.clone(), None),
        };
        let txn = Txn::new().when([Compare::value(key, CompareOp::Equal, serde_json::to_vec(old)?)]).and_then([op]);
        Ok(self.txn("update the restore request in etcd", txn).await?.succeeded())
    }

    /// Writes the backup job `new` only if the key still holds `old` (None: no job yet).
    pub async fn put_backup_job(
        &self,
        old: Option<&crate::backup::job::BackupJob>,
        new: &crate::backup::job::BackupJob,
    ) -> Result<bool> {
        let key = self.keys.backup_job();
        let cmp = match old {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(old) => Compare::value(key.clone(), CompareOp::Equal, serde_json::to_vec(old)?),
        };
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(key, serde_json::to_vec(new)?, None)]);
        Ok(self.txn("write the backup job in etcd", txn).await?.succeeded())
    }

    /// Removes every key of the cluster: its prefix and its security prefix
    /// (tokens, audit). Returns how many keys were deleted.
    pub async fn delete_cluster(&self) -> Result<i64> {
        let mut deleted = 0;
        for prefix in [self.keys.prefix().to_string(), self.keys.security_prefix().to_string()] {
            let resp = self
                .call("delete the cluster's keys in etcd", |c| {
                    let prefix = prefix.clone();
                    async move { c.kv_client().delete(prefix, Some(etcd_client::DeleteOptions::new().with_prefix())).await }
                })
                .await?;
            deleted += resp.deleted();
        }
        Ok(deleted)
    }

    /// Sets the DR switch (replacing what it said before).
    pub async fn put_dr(&self, dr: &DrSwitch) -> Result<()> {
        let (key, value) = (self.keys.dr(), serde_json::to_vec(dr)?);
        self.call("set the DR switch in etcd", |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.kv_client().put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    /// Sets the DR switch only if nobody changed it after `revision` (a
    /// snapshot's): of several gateways acting on the same trigger, one wins.
    pub async fn put_dr_unchanged_since(&self, dr: &DrSwitch, revision: i64) -> Result<bool> {
        let key = self.keys.dr();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Less, revision + 1)])
            .and_then([TxnOp::put(key, serde_json::to_vec(dr)?, None)]);
        Ok(self.txn("set the DR switch in etcd", txn).await?.succeeded())
    }

    /// Marks the DR switch done, only if it is still `old`.
    pub async fn complete_dr(&self, old: &DrSwitch, epoch: Epoch) -> Result<bool> {
        let key = self.keys.dr();
        let done = DrSwitch { done_epoch: Some(epoch), ..old.clone() };
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, serde_json::to_vec(old)?)])
            .and_then([TxnOp::put(key, serde_json::to_vec(&done)?, None)]);
        Ok(self.txn("complete the DR switch in etcd", txn).await?.succeeded())
    }

    pub async fn put_history(&self, entry: &HistoryEntry) -> Result<()> {
        let key = self.keys.history(entry.epoch);
        let value = serde_json::to_vec(entry)?;
        self.call("record history in etcd", |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.kv_client().put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    /// Every promotion, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        let prefix = self.keys.history_prefix();
        let resp = self
            .call("read history from etcd", |c| {
                let prefix = prefix.clone();
                async move { c.kv_client().get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect())
    }

    /// Moves etcd's leadership away from the members in `avoid` (the primary's
    /// region), preferring the members in `prefer` (witness regions). Losing a
    /// region that holds both the primary and the etcd leader costs an etcd
    /// election first, and etcd restarts every lease's TTL when a new leader
    /// takes over: the failover would wait a whole TTL longer. Returns the new
    /// leader's name if it moved.
    pub async fn keep_etcd_leader_away(&self, avoid: &[String], prefer: &[String]) -> Result<Option<String>> {
        let status = self.call("read etcd status", |mut c| async move { c.status().await }).await?;
        let members = self.call("list etcd members", |mut c| async move { c.member_list().await }).await?;
        let in_list = |m: &etcd_client::Member, list: &[String]| m.client_urls().iter().any(|u| list.contains(u));
        let Some(leader) = members.members().iter().find(|m| m.id() == status.leader()) else { return Ok(None) };
        let candidates: Vec<&etcd_client::Member> = members.members().iter().filter(|m| !in_list(m, avoid)).collect();
        let preferred = candidates.iter().find(|m| in_list(m, prefer));
        let target = match preferred {
            Some(p) if p.id() != leader.id() => *p,
            Some(_) => return Ok(None),
            None if in_list(leader, avoid) => match candidates.first() {
                Some(c) => *c,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        // MoveLeader must be sent to the current leader.
        let members = self.current().await;
        let Some((_, client)) = members.iter().find(|(url, _)| leader.client_urls().contains(url)) else {
            return Ok(None);
        };
        client.clone().move_leader(target.id()).await.context("move etcd leadership")?;
        Ok(Some(target.name().to_string()))
    }

    /// etcd's members: (id, name, peer URLs, whether a learner).
    pub async fn etcd_members(&self) -> Result<Vec<EtcdMember>> {
        let list = self.call("list etcd members", |mut c| async move { c.member_list().await }).await?;
        Ok(list
            .members()
            .iter()
            .map(|m| EtcdMember {
                id: m.id(),
                name: m.name().to_string(),
                peer_urls: m.peer_urls().to_vec(),
                learner: m.is_learner(),
            })
            .collect())
    }

    /// Adds a member at `peer_url` as a learner (it replicates but does not
    /// vote until promoted, so adding it never changes the quorum); returns
    /// its id. A member already at that URL (an earlier try) is kept.
    pub async fn add_etcd_learner(&self, peer_url: &str) -> Result<u64> {
        if let Some(m) = self.etcd_members().await?.into_iter().find(|m| m.peer_urls.iter().any(|u| u == peer_url)) {
            return Ok(m.id);
        }
        let url = peer_url.to_string();
        // etcd refuses membership changes ("unhealthy cluster") until its
        // leader has been connected to a quorum for 5 s (strict reconfig
        // check): right after a start or an election. Try again meanwhile.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let added = self
                .call("add an etcd learner", |mut c| {
                    let url = url.clone();
                    async move {
                        c.member_add([url], Some(etcd_client::MemberAddOptions::new().with_is_learner())).await
                    }
                })
                .await;
            match added {
                Ok(resp) => return resp.member().map(|m| m.id()).context("etcd did not say which member it added"),
                Err(e) if format!("{e:#}").contains("unhealthy cluster") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Promotes every learner that has caught up with the leader (etcd
    /// refuses the others, which are tried again later); returns the names
    /// of those promoted.
    pub async fn promote_etcd_learners(&self) -> Result<Vec<String>> {
        let mut promoted = Vec::new();
        for m in self.etcd_members().await?.into_iter().filter(|m| m.learner) {
            let id = m.id;
            let done = self.call("promote an etcd learner", |mut c| async move { c.member_promote(id).await }).await;
            match done {
                Ok(_) => promoted.push(if m.name.is_empty() { m.peer_urls.join(",") } else { m.name }),
                Err(e) => tracing::debug!("etcd learner {} not promoted yet: {e:#}", m.name),
            }
        }
        Ok(promoted)
    }

    /// Removes the member at `peer_url`, if it is one; true if it was.
    pub async fn remove_etcd_member(&self, peer_url: &str) -> Result<bool> {
        let Some(m) = self.etcd_members().await?.into_iter().find(|m| m.peer_urls.iter().any(|u| u == peer_url)) else {
            return Ok(false);
        };
        let id = m.id;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match self.call("remove an etcd member", |mut c| async move { c.member_remove(id).await }).await {
                Ok(_) => return Ok(true),
                // As for adding: etcd's strict reconfig check, right after a start or an election.
                Err(e) if format!("{e:#}").contains("unhealthy cluster") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Is etcd answering with a quorum right now?
    pub async fn ping(&self) -> Result<()> {
        let key = self.keys.epoch();
        self.call("read from etcd", |c| {
            let key = key.clone();
            async move { c.kv_client().get(key, None).await }
        })
        .await?;
        Ok(())
    }

    /// A transaction. Retried on another member only when the first did not
    /// answer; a retried transaction whose first attempt did apply fails its
    /// comparisons, and the callers' next pass reads what actually happened.
    async fn txn(&self, what: &str, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.call(what, |c| {
            let txn = txn.clone();
            async move { c.kv_client().txn(txn).await }
        })
        .await
    }
}

/// The gist of an etcd-client error: tonic's full chain repeats itself at length.
fn short_error(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let msg = s.message();
            let detail = std::error::Error::source(s).map(|src| format!(" ({src})")).unwrap_or_default();
            format!("{:?}: {msg}{detail}", s.code())
        }
        other => other.to_string(),
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
