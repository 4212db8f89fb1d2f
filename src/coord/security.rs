//! API tokens and the audit log in etcd (`Keys::token`, `Keys::audit`).
//! Tokens are created once and only ever changed to revoked; audit entries
//! are created once and never changed.

use anyhow::{bail, Result};
use etcd_client::{Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp};

use super::Coord;
use crate::auth::{AuditEntry, StoredToken};

impl Coord {
    /// Stores a new token; fails if its id is taken (one in 2^48: make another).
    pub async fn create_token(&self, token: &StoredToken) -> Result<()> {
        let key = self.keys.token(&token.id);
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            serde_json::to_vec(token)?,
            None,
        )]);
        if !self.txn("store a token in etcd", txn).await?.succeeded() {
            bail!("token id {} is already taken", token.id);
        }
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<StoredToken>> {
        let key = self.keys.token(id);
        let resp = self
            .call("read a token from etcd", |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    pub async fn tokens(&self) -> Result<Vec<StoredToken>> {
        let prefix = self.keys.tokens_prefix();
        let resp = self
            .call("read tokens from etcd", |c| {
                let prefix = prefix.clone();
                async move { c.kv_client().get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect())
    }

    /// Marks a token revoked (kept, so lists and audits still name it).
    /// Returns the token as it now is; None if there is no such token.
    pub async fn revoke_token(&self, id: &str, at: u64) -> Result<Option<StoredToken>> {
        let Some(old) = self.token(id).await? else { return Ok(None) };
        if old.revoked.is_some() {
            return Ok(Some(old));
        }
        let key = self.keys.token(id);
        let new = StoredToken { revoked: Some(at), ..old.clone() };
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, serde_json::to_vec(&old)?)])
            .and_then([TxnOp::put(key, serde_json::to_vec(&new)?, None)]);
        if !self.txn("revoke a token in etcd", txn).await?.succeeded() {
            bail!("token {id} changed while being revoked; try again");
        }
        Ok(Some(new))
    }

    /// Appends one audit entry (create-only: an existing key is never overwritten).
    pub async fn append_audit(&self, entry: &AuditEntry) -> Result<()> {
        let suffix: u32 = rand::random();
        let key = self.keys.audit(entry.time_ms, &format!("{suffix:08x}"));
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            serde_json::to_vec(entry)?,
            None,
        )]);
        if !self.txn("record an audit entry in etcd", txn).await?.succeeded() {
            bail!("an audit entry with the same key exists; not overwritten");
        }
        Ok(())
    }

    /// Audit entries from `since_ms` on, oldest first, at most `limit` (the newest ones).
    pub async fn audit(&self, since_ms: u64, limit: i64) -> Result<Vec<AuditEntry>> {
        let (from, end) = (self.keys.audit(since_ms, ""), prefix_end(&self.keys.audit_prefix()));
        let resp = self
            .call("read the audit log from etcd", |c| {
                let (from, end) = (from.clone(), end.clone());
                async move {
                    let options = GetOptions::new()
                        .with_range(end)
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(limit);
                    c.kv_client().get(from, Some(options)).await
                }
            })
            .await?;
        let mut entries: Vec<AuditEntry> =
            resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
        entries.reverse();
        Ok(entries)
    }
}

impl Coord {
    /// Removes audit entries older than `before_ms`; returns how many.
    pub async fn trim_audit(&self, before_ms: u64) -> Result<i64> {
        let (from, end) = (self.keys.audit_prefix(), self.keys.audit(before_ms, ""));
        let resp = self
            .call("trim the audit log in etcd", |c| {
                let (from, end) = (from.clone(), end.clone());
                async move { c.kv_client().delete(from, Some(etcd_client::DeleteOptions::new().with_range(end))).await }
            })
            .await?;
        Ok(resp.deleted())
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}
