//! Published versions of the cluster file (`meridian config apply`,
//! `Keys::config_current`): `current` is the version that runs, and every
//! version is kept under `versions/` for `config show --version N`.

use anyhow::Result;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::Coord;
use crate::config::change::Cost;

/// One published cluster file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedConfig {
    /// 1 for the first published file, then one more each time.
    pub version: u64,
    /// The file as the operator wrote it (TOML).
    pub text: String,
    /// Who applied it (the API caller).
    pub applied_by: String,
    pub at_ms: u64,
    /// What the change from the version before cost.
    pub cost: Cost,
    /// The changed fields, one per line (`path: before -> after`).
    pub summary: String,
    /// Nodes this version removes whose data directories their agents empty
    /// once they have left (`config apply --purge`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purge: Vec<String>,
}

impl Coord {
    /// The version that runs, if one was ever published.
    pub async fn published_config(&self) -> Result<Option<PublishedConfig>> {
        self.get_config(self.keys.config_current(), "read the published cluster file from etcd").await
    }

    /// Version `version`, if it was published.
    pub async fn published_config_version(&self, version: u64) -> Result<Option<PublishedConfig>> {
        self.get_config(self.keys.config_version(version), "read a published cluster file from etcd").await
    }

    async fn get_config(&self, key: String, what: &str) -> Result<Option<PublishedConfig>> {
        let resp = self
            .call(what, |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(serde_json::from_slice(kv.value())?)),
            None => Ok(None),
        }
    }

    /// Publishes `new` as the running version, only if `previous` still is
    /// (None: nothing was published yet). False when someone else published first.
    pub async fn publish_config(&self, previous: Option<&PublishedConfig>, new: &PublishedConfig) -> Result<bool> {
        let current = self.keys.config_current();
        let unchanged = match previous {
            Some(p) => Compare::value(current.clone(), CompareOp::Equal, serde_json::to_vec(p)?),
            None => Compare::version(current.clone(), CompareOp::Equal, 0),
        };
        let value = serde_json::to_vec(new)?;
        let txn = Txn::new().when([unchanged]).and_then([
            TxnOp::put(self.keys.config_version(new.version), value.clone(), None),
            TxnOp::put(current, value, None),
        ]);
        Ok(self.txn("publish the cluster file in etcd", txn).await?.succeeded())
    }
}
