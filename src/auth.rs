//! Who may call the gateway API, and the record of what they did.
//!
//! A token is `mrd_<id>_<secret>`: the id (12 hex digits) names it in lists,
//! audit entries and revocations; the secret (256 random bits) is shown once,
//! when the token is made. etcd keeps only the SHA-256 of the whole token
//! (`coord::keys`, `tokens/<id>`): a reader of etcd cannot call the API with
//! what it finds there. A slow password hash is not needed for a secret of
//! 256 random bits. Comparison is in constant time.
//!
//! Everything here is pure; the gateway's middleware (`gateway::auth`) does the I/O.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::config::ApiRole;

const TOKEN_PREFIX: &str = "mrd_";
const ID_HEX: usize = 12;
const SECRET_BYTES: usize = 32;

/// A token as etcd keeps it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    pub id: String,
    pub role: ApiRole,
    /// SHA-256 of the whole token, hex.
    pub digest: String,
    /// Unix seconds.
    pub created: u64,
    pub expires: Option<u64>,
    pub revoked: Option<u64>,
    /// Who made it (`token:<id>`, `lab`, `bootstrap`).
    pub created_by: String,
    #[serde(default)]
    pub note: String,
}

/// A token as `token list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub role: ApiRole,
    pub created: u64,
    pub expires: Option<u64>,
    pub revoked: Option<u64>,
    pub created_by: String,
    pub note: String,
}

impl From<&StoredToken> for TokenInfo {
    fn from(t: &StoredToken) -> TokenInfo {
        TokenInfo {
            id: t.id.clone(),
            role: t.role,
            created: t.created,
            expires: t.expires,
            revoked: t.revoked,
            created_by: t.created_by.clone(),
            note: t.note.clone(),
        }
    }
}

/// A token just made: the secret, once, and what etcd keeps.
pub struct NewToken {
    pub secret: String,
    pub stored: StoredToken,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").field("stored", &self.stored).finish_non_exhaustive()
    }
}

pub fn new_token(role: ApiRole, now: u64, valid_for: Option<u64>, created_by: &str, note: &str) -> NewToken {
    let mut rng = rand::rng();
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex(&id);
    let token = format!("{TOKEN_PREFIX}{id}_{}", hex(&secret));
    NewToken {
        stored: StoredToken {
            id,
            role,
            digest: digest(&token),
            created: now,
            expires: valid_for.map(|v| now + v),
            revoked: None,
            created_by: created_by.into(),
            note: note.into(),
        },
        secret: token,
    }
}

/// The id of a well-formed token, without looking anything up.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexish = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexish(id, ID_HEX) && hexish(secret, SECRET_BYTES * 2)).then_some(id)
}

pub fn is_token_id(id: &str) -> bool {
    id.len() == ID_HEX && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a request was not let through: 401 or 403, each with one line to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401.
    Unauthenticated(String),
    /// 403.
    Forbidden(String),
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// `token:<id>` or `cert:<common name>`.
    pub who: String,
    pub role: ApiRole,
}

/// Checks a presented token against what etcd holds for its id (None: no such token).
pub fn check_token(token: &str, stored: Option<&StoredToken>, now: u64) -> Result<Caller, Denied> {
    let Some(id) = token_id(token) else {
        return Err(Denied::Unauthenticated("the token is malformed (expected mrd_<id>_<secret>)".into()));
    };
    let unknown = || Denied::Unauthenticated(format!("token {id} is not valid"));
    let stored = stored.ok_or_else(unknown)?;
    if stored.id != id || !constant_time_eq(stored.digest.as_bytes(), digest(token).as_bytes()) {
        return Err(unknown());
    }
    if let Some(at) = stored.revoked {
        return Err(Denied::Unauthenticated(format!("token {id} was revoked at {}", unix_time(at))));
    }
    if let Some(at) = stored.expires.filter(|&at| at <= now) {
        return Err(Denied::Unauthenticated(format!("token {id} expired at {}", unix_time(at))));
    }
    Ok(Caller { who: format!("token:{id}"), role: stored.role })
}

/// Whether `caller` may do what needs `required`.
pub fn authorize(caller: &Caller, required: ApiRole, what: &str) -> Result<(), Denied> {
    if caller.role >= required {
        return Ok(());
    }
    Err(Denied::Forbidden(format!("{} has role {}; {what} needs {required}", caller.who, caller.role)))
}

/// Equality that takes as long whatever the first difference (secrets, digests, SCRAM keys).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn unix_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// One audit record: every mutating API call and every automatic promotion.
/// Written once (create-only) and never changed; the API has no call that alters or removes one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// `token:<id>`, `cert:<name>`, `agent:<node>`, or `anonymous` for a refused call.
    pub who: String,
    pub role: Option<ApiRole>,
    /// The caller's address; None for an agent's own action.
    pub source: Option<String>,
    /// `POST /v1/switchover`, `promote`.
    pub action: String,
    /// The node, region or token the action is about.
    pub target: Option<String>,
    /// `ok`, or the refusal or error as the caller saw it.
    pub result: String,
    /// More about it (a promotion's reason).
    #[serde(default)]
    pub detail: Option<String>,
    /// The cluster's epoch after the action.
    pub epoch: Option<u64>,
    /// Which gateway or node wrote it.
    pub recorded_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_checks_only_against_its_own_digest_and_only_while_valid() {
        let t = new_token(ApiRole::Operator, 1000, Some(60), "lab", "");
        assert!(t.secret.starts_with("mrd_") && t.secret.len() == 4 + 12 + 1 + 64, "{}", t.secret);
        assert_eq!(token_id(&t.secret), Some(t.stored.id.as_str()));
        assert!(!t.stored.digest.contains(&t.secret[17..]), "etcd never holds the secret");
        assert!(!format!("{t:?}").contains(&t.secret), "Debug must not print the secret");

        let ok = check_token(&t.secret, Some(&t.stored), 1000).unwrap();
        assert_eq!(ok, Caller { who: format!("token:{}", t.stored.id), role: ApiRole::Operator });

        // Same id, another secret: refused, and the message names no secret.
        let forged = format!("mrd_{}_{}", t.stored.id, "0".repeat(64));
        let Err(Denied::Unauthenticated(msg)) = check_token(&forged, Some(&t.stored), 1000) else { panic!() };
        assert!(msg.contains("not valid") && !msg.contains(&"0".repeat(64)), "{msg}");
        assert!(matches!(check_token(&t.secret, None, 1000), Err(Denied::Unauthenticated(_))));
        assert!(
            matches!(check_token("Bearer nonsense", Some(&t.stored), 1000), Err(Denied::Unauthenticated(m)) if m.contains("malformed"))
        );

        let Err(Denied::Unauthenticated(msg)) = check_token(&t.secret, Some(&t.stored), 1060) else { panic!() };
        assert!(msg.contains("expired"), "{msg}");
        let revoked = StoredToken { revoked: Some(1010), ..t.stored.clone() };
        let Err(Denied::Unauthenticated(msg)) = check_token(&t.secret, Some(&revoked), 1020) else { panic!() };
        assert!(msg.contains("revoked"), "{msg}");
    }

    #[test]
    fn roles_include_the_ones_below_them() {
        let viewer = Caller { who: "token:a".into(), role: ApiRole::Viewer };
        let admin = Caller { who: "token:b".into(), role: ApiRole::Admin };
        assert!(authorize(&viewer, ApiRole::Viewer, "GET /v1/cluster").is_ok());
        let Err(Denied::Forbidden(msg)) = authorize(&viewer, ApiRole::Operator, "POST /v1/switchover") else {
            panic!()
        };
        assert_eq!(msg, "token:a has role viewer; POST /v1/switchover needs operator");
        for need in [ApiRole::Viewer, ApiRole::Operator, ApiRole::Admin] {
            assert!(authorize(&admin, need, "x").is_ok());
        }
    }

    #[test]
    fn tokens_are_unique() {
        let a = new_token(ApiRole::Viewer, 0, None, "t", "");
        let b = new_token(ApiRole::Viewer, 0, None, "t", "");
        assert_ne!(a.stored.id, b.stored.id);
        assert_ne!(a.secret, b.secret);
    }
}
