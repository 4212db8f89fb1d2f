//! `meridian token create|list|revoke`: the API's credentials (admin role).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::auth::{unix_time, ApiRole, TokenInfo};
use crate::client::ApiClient;
use crate::gateway::api::CreatedToken;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Make a token; it is shown once, here, and only its digest is kept.
    Create {
        /// viewer (reads), operator (switchover, failover, verify, drills) or admin (tokens, configuration).
        #[arg(long)]
        role: ApiRole,
        /// How long it is valid (`30d`, `12h`); without it, until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Who or what it is for, shown by `token list`.
        #[arg(long, default_value = "")]
        note: String,
        /// Write the token to this file (created 0600) instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// The first token of a cluster, when no token exists to ask the API
        /// with: written straight into etcd with the client certificate in
        /// DIR (`tls.crt`, `tls.key`, `ca.crt`; `meridian ca issue --user NAME`).
        #[arg(long, value_name = "DIR")]
        bootstrap: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Every token: id, role, expiry, revocation; never a secret.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id; calls with it are refused from then on.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config)?;
    let t = Duration::from_secs(10);
    match args.command {
        Sub::Create { role, expires, note, out, bootstrap, json } => {
            if expires.is_some_and(|e| e.as_secs() == 0) {
                bail!("--expires must be at least one second");
            }
            let created = match bootstrap {
                Some(dir) => bootstrap_token(&config, &dir, role, expires, &note).await?,
                None => {
                    let body =
                        serde_json::json!({ "role": role, "expires_s": expires.map(|e| e.as_secs()), "note": note });
                    ApiClient::new(&config)?.act("/v1/tokens", &body, t).await?
                }
            };
            if let Some(out) = &out {
                crate::ca::write_private(out, &format!("{}\n", created.token))?;
            }
            if json {
                let mut v = serde_json::to_value(&created)?;
                if out.is_some() {
                    v["token"] = serde_json::Value::Null;
                }
                println!("{v}");
                return Ok(0);
            }
            let i = &created.info;
            let until = i.expires.map(unix_time).unwrap_or_else(|| "until revoked".into());
            match &out {
                Some(out) => println!("token {} ({}, valid {until}) written to {}", i.id, i.role, out.display()),
                None => {
                    println!("token {} ({}, valid {until}); it is shown only now:", i.id, i.role);
                    println!("{}", created.token);
                }
            }
            Ok(0)
        }
        Sub::List { json } => {
            let tokens: Vec<TokenInfo> = ApiClient::new(&config)?.get("/v1/tokens", t).await?;
            if json {
                println!("{}", serde_json::to_string(&tokens)?);
                return Ok(0);
            }
            println!(
                "{:<13} {:<9} {:<21} {:<21} {:<21} {:<16} NOTE",
                "ID", "ROLE", "CREATED", "EXPIRES", "REVOKED", "BY"
            );
            let at = |t: Option<u64>| t.map(unix_time).unwrap_or_else(|| "-".into());
            for i in &tokens {
                println!(
                    "{:<13} {:<9} {:<21} {:<21} {:<21} {:<16} {}",
                    i.id,
                    i.role.to_string(),
                    unix_time(i.created),
                    at(i.expires),
                    at(i.revoked),
                    i.created_by,
                    i.note
                );
            }
            Ok(0)
        }
        Sub::Revoke { id, json } => {
            if !crate::auth::is_token_id(&id) {
                bail!("{id:?} is not a token id (12 hex digits, as `meridian token list` shows)");
            }
            let info: TokenInfo =
                ApiClient::new(&config)?.act(&format!("/v1/tokens/{id}/revoke"), &serde_json::json!({}), t).await?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!(
                    "token {} ({}) revoked at {}",
                    info.id,
                    info.role,
                    info.revoked.map(unix_time).unwrap_or_default()
                );
            }
            Ok(0)
        }
    }
}

/// A token written straight into etcd (and the audit log) with a client
/// certificate: holding one already gives full access to etcd, so this grants
/// nothing more than that.
async fn bootstrap_token(
    config: &crate::config::Config,
    dir: &Path,
    role: ApiRole,
    expires: Option<Duration>,
    note: &str,
) -> Result<CreatedToken> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let identity = crate::tls::Identity { name, dir: dir.to_path_buf() };
    let cn = crate::ca::inspect(&identity.cert())?.subject;
    let coord = crate::coord::Coord::connect(config, &identity).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let who = format!("bootstrap:{cn}");
    let new = crate::auth::new_token(role, now.as_secs(), expires.map(|e| e.as_secs()), &who, note);
    coord.create_token(&new.stored).await?;
    let entry = crate::auth::AuditEntry {
        time_ms: now.as_millis() as u64,
        who,
        role: None,
        source: None,
        action: "token create --bootstrap".into(),
        target: Some(format!("token:{}", new.stored.id)),
        result: "ok".into(),
        detail: Some(format!("role {role}")),
        epoch: None,
        recorded_by: "cli".into(),
    };
    coord.append_audit(&entry).await?;
    Ok(CreatedToken { info: (&new.stored).into(), token: new.secret })
}
