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
    let api = ApiClient::new(&config)?;
    let t = Duration::from_secs(10);
    match args.command {
        Sub::Create { role, expires, note, out, json } => {
            if expires.is_some_and(|e| e.as_secs() == 0) {
                bail!("--expires must be at least one second");
            }
            let body = serde_json::json!({ "role": role, "expires_s": expires.map(|e| e.as_secs()), "note": note });
            let created: CreatedToken = api.act("/v1/tokens", &body, t).await?;
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
            let tokens: Vec<TokenInfo> = api.get("/v1/tokens", t).await?;
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
            let info: TokenInfo = api.act(&format!("/v1/tokens/{id}/revoke"), &serde_json::json!({}), t).await?;
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
