//! `[tls]` and `[api]`: where each process finds its certificates, and who may
//! call the gateway API. TLS has no off switch: every process needs its
//! certificate (`meridian ca issue`, or `lab up`), see docs/security.md.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, Problem};
use crate::tls::Identity;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsConfig {
    /// Holds one directory per process of this host, `<dir>/<identity>/`
    /// (`node-<name>`, `gateway-<region>`, `etcd-<region>`) with `tls.crt`,
    /// `tls.key` (0600) and `ca.crt`. Relative to the cluster file's directory.
    #[serde(default = "default_tls_dir")]
    pub dir: PathBuf,
    /// The cluster CA's certificate, which the CLI trusts. Default: `<dir>/ca/ca.crt`.
    pub ca_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { dir: default_tls_dir(), ca_file: None }
    }
}

fn default_tls_dir() -> PathBuf {
    PathBuf::from("tls")
}

/// What a credential allows; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    /// Reads: status, history, health, audit, metrics.
    Viewer,
    /// Actions: switchover, failover, verify, drills.
    Operator,
    /// Tokens, the CA, configuration, restores.
    Admin,
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Operator => "operator",
            ApiRole::Admin => "admin",
        })
    }
}

impl std::str::FromStr for ApiRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(ApiRole::Viewer),
            "operator" => Ok(ApiRole::Operator),
            "admin" => Ok(ApiRole::Admin),
            _ => Err(format!("{s:?} is not a role (viewer, operator, admin)")),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiConfig {
    /// A file (0600) holding the token the CLI sends, when neither
    /// `--token-file` nor `$MERIDIAN_TOKEN` gives one. Relative to the cluster file.
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` without a credential (for a scraper without one).
    #[serde(default)]
    pub metrics_open: bool,
    /// Client certificates from the cluster CA, by common name, and the role
    /// each is given (`"user:alice" = "operator"`): an alternative to tokens.
    #[serde(default)]
    pub certificate_roles: BTreeMap<String, ApiRole>,
    /// Audit entries older than this are removed by the gateways (checked
    /// every 10 minutes). None (the default): kept for ever.
    #[serde(default, with = "super::humantime_serde::option")]
    pub audit_retention: Option<std::time::Duration>,
}

impl Config {
    /// Where the process `name` (`node-a1`, `gateway-eu`) finds its certificate.
    pub fn tls_identity(&self, name: &str) -> Identity {
        Identity::new(&self.resolve(&self.tls.dir), name)
    }

    /// The cluster CA's certificate as the CLI trusts it.
    pub fn tls_ca_file(&self) -> PathBuf {
        match &self.tls.ca_file {
            Some(f) => self.resolve(f),
            None => self.resolve(&self.tls.dir).join("ca").join(crate::ca::CA_CERT),
        }
    }
}

pub(super) fn validate(config: &Config, problems: &mut Vec<Problem>) {
    if config.api.audit_retention.is_some_and(|r| r < std::time::Duration::from_secs(24 * 3600)) {
        problems.push(Problem {
            at: "api.audit_retention".into(),
            message: "must be at least 1d: the audit log is for looking back".into(),
        });
    }
    for name in config.api.certificate_roles.keys() {
        // A node's or gateway's certificate must never carry an operator's rights.
        if ["node:", "gateway:", "etcd:"].iter().any(|p| name.starts_with(p)) {
            problems.push(Problem {
                at: format!("api.certificate_roles.{name:?}"),
                message: "names a cluster member's certificate; give roles to people's certificates (`meridian ca issue --user NAME` makes `user:NAME`)".into(),
            });
        }
    }
}
