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
        #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
        valid: Duration,
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
        Sub::Issue { ca: ca_dir, out, node, gateway, etcd, user, valid } => {
            let subject = match (node, gateway, etcd, user) {
                (Some(n), None, None, None) => Subject::Node(n),
                (None, Some(r), None, None) => Subject::Gateway(r),
                (None, None, Some(r), None) => Subject::Etcd(r),
                (None, None, None, Some(u)) => Subject::User(u),
                _ => anyhow::bail!("name exactly one of --node, --gateway, --etcd, --user"),
            };
            let config = super::load_config(config)?;
            let cert = ca::issue(&ca_dir, &out, &config, &subject, valid)?;
            let info = ca::inspect(&cert)?;
            println!(
                "issued {} for {} ({} {}), valid {} days",
                cert.display(),
                subject.common_name(),
                info.dns_names.join(" "),
                info.ip_addresses.join(" "),
                info.days_left
            );
            Ok(0)
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
