//! `meridian ca init|issue|show`: the cluster CA and its certificates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::ca::{self, Subject};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Create the cluster's CA (certificate and private key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// How long the CA is valid.
        #[arg(long, default_value = "10y", value_parser = humantime::parse_duration)]
        valid: Duration,
    },
    /// Make a key and a certificate signed by the CA for one node, gateway or etcd member, in OUT.
    Issue {
        /// The CA's directory (from `ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// Where the key is made and the certificate written (tls.key, tls.crt, ca.crt).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, group = "subject")]
        node: Option<String>,
        #[arg(long, group = "subject")]
        gateway: Option<String>,
        /// The etcd member of this region.
        #[arg(long, group = "subject")]
        etcd: Option<String>,
        /// A person or tool (`user:NAME`): a client certificate for the API
        /// (`[api] certificate_roles`) or etcd.
        #[arg(long, group = "subject")]
        user: Option<String>,
        /// The S3 server of this backup repository (`[[backup.repository]]` name),
        /// when it is self-hosted and trusts the cluster CA.
        #[arg(long, group = "subject")]
        repository: Option<String>,
        #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
        valid: Duration,
    },
    /// On a host: make a key (kept here, 0600) and a signing request for one member, in OUT.
    Request {
        /// Where the key and `request.csr` are written (the member's directory under `[tls] dir`).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, group = "who")]
        node: Option<String>,
        #[arg(long, group = "who")]
        gateway: Option<String>,
        #[arg(long, group = "who")]
        etcd: Option<String>,
        #[arg(long, group = "who")]
        user: Option<String>,
    },
    /// On the CA's host: sign a request with the names the cluster file gives its member.
    Sign {
        #[arg(long)]
        ca: PathBuf,
        /// The request (`request.csr`) copied from the host.
        #[arg(long)]
        csr: PathBuf,
        /// Where the certificate is written (copy it back to the host with `ca.crt`).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
        valid: Duration,
    },
    /// On the host: put the signed certificate in place beside the requested key.
    Accept {
        /// The member's directory, where `ca request` made the key.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        /// The cluster CA's certificate.
        #[arg(long)]
        ca_cert: PathBuf,
    },
    /// Renew every certificate of this host (under `[tls] dir`) with new keys,
    /// in place, and wait until each running process presents its new one.
    Rotate {
        /// The CA's directory (from `ca init`).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
        valid: Duration,
        /// How long to wait for the processes to pick the new certificates up.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Names and expiry of certificates; exit 2 when one expires within 30 days.
    Show {
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Path, args: Args) -> Result<i32> {
    match args.command {
        Sub::Init { dir, valid } => {
            let cluster = super::load_config(config).map(|c| c.cluster).unwrap_or_else(|_| "meridian".into());
            let cert = ca::init(&dir, &cluster, valid)?;
            println!(
                "created the cluster CA {} (its key {} is 0600: keep it off the nodes)",
                cert.display(),
                dir.join(ca::CA_KEY).display()
            );
            Ok(0)
        }
        Sub::Issue { ca: ca_dir, out, node, gateway, etcd, user, repository, valid } => {
            let subject = match repository {
                Some(r) => Subject::Repository(r),
                None => subject(node, gateway, etcd, user)?,
            };
            let config = super::load_config(config)?;
            let cert = ca::issue(&ca_dir, &out, &config, &subject, valid)?;
            made("issued", &cert, &subject)
        }
        Sub::Request { out, node, gateway, etcd, user } => {
            let subject = subject(node, gateway, etcd, user)?;
            let config = super::load_config(config)?;
            let csr = ca::request(&out, &config, &subject)?;
            println!(
                "made a key ({}, 0600, stays here) and {} for {}: sign it with `meridian ca sign` where the CA is, then `meridian ca accept` here",
                out.join(ca::REQUEST_KEY).display(),
                csr.display(),
                subject.common_name()
            );
            Ok(0)
        }
        Sub::Sign { ca: ca_dir, csr, out, valid } => {
            let config = super::load_config(config)?;
            let (subject, pem) = ca::sign(&ca_dir, &csr, &config, valid)?;
            std::fs::write(&out, pem).map_err(|e| anyhow::anyhow!("write {}: {e}", out.display()))?;
            made("signed", &out, &subject)
        }
        Sub::Accept { dir, cert, ca_cert } => {
            ca::accept(&dir, &cert, &ca_cert)?;
            println!(
                "{} now holds the new certificate and key; running processes pick them up by themselves",
                dir.display()
            );
            Ok(0)
        }
        Sub::Rotate { ca: ca_dir, valid, wait, json } => {
            let config = super::load_config(config)?;
            rotate(&config, &ca_dir, valid, wait, json).await
        }
        Sub::Show { files, json } => {
            anyhow::ensure!(!files.is_empty(), "name at least one certificate file");
            let infos = files.iter().map(|f| ca::inspect(f)).collect::<Result<Vec<_>>>()?;
            if json {
                println!("{}", serde_json::to_string(&infos)?);
            } else {
                for i in &infos {
                    let warn = if i.days_left < 0 {
                        "  EXPIRED"
                    } else if i.expiring {
                        "  EXPIRES SOON"
                    } else {
                        ""
                    };
                    println!("{}: {} (issuer {}), {} days left{warn}", i.path, i.subject, i.issuer, i.days_left);
                    println!("  names: {} {}", i.dns_names.join(" "), i.ip_addresses.join(" "));
                }
            }
            Ok(if infos.iter().any(|i| i.expiring) { super::EXIT_PROBLEMS } else { 0 })
        }
    }
}

/// One listener that should present a renewed certificate.
#[derive(serde::Serialize)]
struct Pickup {
    identity: String,
    listener: String,
    address: std::net::SocketAddr,
    /// `new`, `old` (still the previous certificate at the deadline), or `not running`.
    result: String,
}

async fn rotate(
    config: &crate::config::Config,
    ca_dir: &Path,
    valid: Duration,
    wait: Duration,
    json: bool,
) -> Result<i32> {
    let tls_dir = config.resolve(&config.tls.dir);
    let renewed = ca::rotate(ca_dir, &tls_dir, config, valid)?;
    if !json {
        for r in &renewed {
            println!(
                "renewed {} (serial {}, until {})",
                r.identity,
                r.serial,
                crate::auth::unix_time(r.not_after.max(0) as u64)
            );
        }
    }
    // What listens with each certificate, on this host.
    let mut checks = Vec::new();
    for r in &renewed {
        let listeners: Vec<(&str, std::net::SocketAddr, bool)> = match Subject::from_identity(&r.identity) {
            Some(Subject::Node(n)) => {
                let (_, node) = config.node(&n)?;
                vec![("agent API", node.api, false), ("PostgreSQL", node.address, true)]
            }
            Some(Subject::Gateway(g)) => {
                let gw = config.region(&g)?.gateway;
                vec![
                    ("gateway API", gw.api, false),
                    ("writer proxy", gw.writer, true),
                    ("reader proxy", gw.reader, true),
                ]
            }
            Some(Subject::Etcd(e)) => {
                let url = config.region(&e)?.etcd.clone().unwrap_or_default();
                match crate::config::parse_etcd_url(&url) {
                    Ok(addr) => vec![("etcd", addr, false)],
                    Err(_) => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        let identity = config.tls_identity(&r.identity);
        // Present the renewed certificate itself (etcd asks every client for one).
        let tls = crate::tls::client_config(&identity.ca(), Some(&identity))?;
        for (listener, addr, postgres) in listeners {
            checks.push((r.identity.clone(), r.serial.clone(), listener, addr, postgres, tls.clone()));
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut results = Vec::new();
    for (identity, serial, listener, addr, postgres, tls) in checks {
        let result = loop {
            match crate::tls::served_certificate(addr, &tls, postgres, Duration::from_secs(3)).await.map(|s| s.serial) {
                Ok(s) if s == serial => break "new".to_string(),
                Ok(_) if tokio::time::Instant::now() < deadline => {}
                Ok(_) => break "old".to_string(),
                Err(e) if format!("{e:#}").contains("Connection refused") => break "not running".to_string(),
                Err(_) if tokio::time::Instant::now() < deadline => {}
                Err(e) => break format!("unreachable: {e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if !json {
            println!("  {identity:<24} {listener:<13} {addr:<22} {result}");
        }
        results.push(Pickup { identity, listener: listener.to_string(), address: addr, result });
    }
    let failed = results.iter().filter(|p| p.result != "new" && p.result != "not running").count();
    if json {
        println!("{}", serde_json::json!({ "renewed": renewed, "listeners": results }));
    } else if failed > 0 {
        println!("{failed} listener(s) still present the old certificate after {}", humantime::format_duration(wait));
    } else {
        println!("every running process presents its new certificate; nothing was restarted");
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// The one member named by `--node`, `--gateway`, `--etcd` or `--user`.
fn subject(
    node: Option<String>,
    gateway: Option<String>,
    etcd: Option<String>,
    user: Option<String>,
) -> Result<Subject> {
    Ok(match (node, gateway, etcd, user) {
        (Some(n), None, None, None) => Subject::Node(n),
        (None, Some(r), None, None) => Subject::Gateway(r),
        (None, None, Some(r), None) => Subject::Etcd(r),
        (None, None, None, Some(u)) => Subject::User(u),
        _ => anyhow::bail!("name exactly one of --node, --gateway, --etcd, --user (or, for `ca issue`, --repository)"),
    })
}

/// "issued FILE for node:a1 (names addresses), valid N days".
fn made(verb: &str, cert: &Path, subject: &Subject) -> Result<i32> {
    let info = ca::inspect(cert)?;
    println!(
        "{verb} {} for {} ({} {}), valid {} days",
        cert.display(),
        subject.common_name(),
        info.dns_names.join(" "),
        info.ip_addresses.join(" "),
        info.days_left
    );
    Ok(0)
}
