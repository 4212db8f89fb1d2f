//! The cluster CA: one self-made certificate authority per cluster that signs
//! a certificate for every node, gateway and etcd member, with the names and
//! addresses peers use to reach it as subject alternative names.
//!
//! Private keys are made where they are used: `issue` generates the key in
//! the directory the certificate is for and writes it 0600; the CA's key stays
//! in the CA directory (0600) and is only read to sign. Nothing here sends a
//! key anywhere. Certificates are ECDSA P-256 (rcgen's default), read back for
//! their expiry with x509-parser.
//!
//! On disk:
//!
//! ```text
//! <ca>/ca.crt       the CA certificate (public; every process trusts it)
//! <ca>/ca.key       the CA's private key (0600)
//! <out>/ca.crt      a copy, so a process finds its trust anchor beside its own
//! <out>/tls.crt     the leaf certificate
//! <out>/tls.key     its private key (0600), made here
//! ```
//!
//! The gateway and agent APIs serve with them (`crate::tls`, which reloads a
//! renewed file without a restart); PostgreSQL, etcd and the SQL proxy do not
//! use them yet.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::Config;

mod request;
pub use request::{accept, request, sign, REQUEST_CSR, REQUEST_KEY};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const LEAF_CERT: &str = "tls.crt";
pub const LEAF_KEY: &str = "tls.key";
/// A certificate this close to expiry is warned about.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a certificate is for; decides its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node(String),
    Gateway(String),
    Etcd(String),
    /// A person or tool (`user:<name>`): a client certificate only, no
    /// addresses; what it may do on the API is `[api] certificate_roles`.
    User(String),
    /// A self-hosted S3 server holding a backup repository (`[[backup.repository]]`
    /// by name): a server certificate naming its endpoint's host.
    Repository(String),
}

impl Subject {
    /// The common name: `node:<name>`, `gateway:<region>`, `etcd:<region>`.
    pub fn common_name(&self) -> String {
        match self {
            Subject::Node(n) => format!("node:{n}"),
            Subject::Gateway(r) => format!("gateway:{r}"),
            Subject::Etcd(r) => format!("etcd:{r}"),
            Subject::User(n) => format!("user:{n}"),
            Subject::Repository(n) => format!("repository:{n}"),
        }
    }

    /// The DNS names and addresses peers reach it by, from the cluster file.
    pub fn alt_names(&self, config: &Config) -> Result<(Vec<String>, Vec<IpAddr>)> {
        Ok(match self {
            Subject::Node(n) => {
                let (_, node) = config.node(n)?;
                (vec![n.clone()], dedup(vec![node.address.ip(), node.api.ip()]))
            }
            Subject::Gateway(r) => {
                let g = config.region(r)?.gateway;
                // Certificates name hosts without DNS's trailing dot (what clients verify against).
                let zone = config.dns.zone.trim_end_matches('.');
                let names = vec![format!("gateway-{r}"), format!("writer.{zone}"), format!("reader.{r}.{zone}")];
                (names, dedup(vec![g.api.ip(), g.dns.ip(), g.writer.ip(), g.reader.ip()]))
            }
            Subject::Etcd(r) => {
                let url = config.region(r)?.etcd.clone().with_context(|| format!("region {r} has no etcd member"))?;
                let addr = crate::config::parse_etcd_url(&url).map_err(anyhow::Error::msg)?;
                // etcd checks that a peer's certificate names the address the peer
                // connects from; on loopback that is 127.0.0.1 whatever it targets.
                let mut ips = vec![addr.ip()];
                if addr.ip().is_loopback() {
                    ips.push(IpAddr::from([127, 0, 0, 1]));
                }
                (vec![format!("etcd-{r}")], dedup(ips))
            }
            Subject::User(n) => {
                if !crate::config::is_dns_label(n) {
                    bail!("{n:?} is not a user name (lowercase letters, digits and '-')");
                }
                (Vec::new(), Vec::new())
            }
            Subject::Repository(n) => {
                let repo = config
                    .backup
                    .iter()
                    .flat_map(|b| &b.repositories)
                    .find(|r| &r.name == n)
                    .with_context(|| format!("no [[backup.repository]] named {n:?} in the cluster file"))?;
                match repo.location().map_err(anyhow::Error::msg)? {
                    crate::config::RepoLocation::S3 { host, .. } => {
                        // pgBackRest 2.45 matches the DNS name; other clients may connect by address.
                        let mut ips = if host == "localhost" { vec![IpAddr::from([127, 0, 0, 1])] } else { Vec::new() };
                        let mut names = vec![host];
                        if let Some(ip) = repo.storage_host {
                            // pgBackRest checks the address it connects to (`repo-storage-host`)
                            // against the certificate's DNS names only: name it there too.
                            names.push(ip.to_string());
                            ips.push(ip);
                        }
                        (names, ips)
                    }
                    crate::config::RepoLocation::Posix { .. } => {
                        bail!("repository {n:?} is a directory; only an s3:// repository's server has a certificate")
                    }
                }
            }
        })
    }
}

fn dedup(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort();
    ips.dedup();
    ips
}

/// Creates a CA in `dir` (refusing to replace one) valid for `valid`.
pub fn init(dir: &Path, cluster: &str, valid: Duration) -> Result<PathBuf> {
    if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
        bail!(
            "{} already holds a CA; refusing to replace it (rotating the CA itself is not supported yet)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key = KeyPair::generate().context("generate the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("meridian cluster CA ({cluster})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, valid);
    let cert = params.self_signed(&key).context("sign the CA certificate")?;
    write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
    std::fs::write(dir.join(CA_CERT), cert.pem()).with_context(|| format!("write {}", dir.join(CA_CERT).display()))?;
    Ok(dir.join(CA_CERT))
}

/// Issues a certificate for `subject` into `out`, with a key made there,
/// signed by the CA in `ca_dir`, valid for `valid`. Replaces what `out` held
/// (that is how certificates are renewed).
pub fn issue(ca_dir: &Path, out: &Path, config: &Config, subject: &Subject, valid: Duration) -> Result<PathBuf> {
    let (issuer, ca_pem) = load_issuer(ca_dir)?;
    let params = leaf_params(config, subject, valid)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let key = KeyPair::generate().context("generate a key")?;
    let cert = params.signed_by(&key, &issuer).context("sign the certificate")?;
    // Each file is written beside and renamed into place, the key before the
    // certificate: a reader sees the old pair, or a key that does not match yet
    // (which `tls::Reloading` and the agent ignore), or the new pair.
    let place = |name: &str, text: &str, private: bool| place(out, name, text, private);
    place(CA_CERT, &ca_pem, false)?;
    place(LEAF_KEY, &key.serialize_pem(), true)?;
    place(LEAF_CERT, &cert.pem(), false)?;
    Ok(out.join(LEAF_CERT))
}

/// The CA's signer and its certificate (PEM), from `ca_dir`.
fn load_issuer(ca_dir: &Path) -> Result<(Issuer<'static, KeyPair>, String)> {
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("read the CA key {} (run `meridian ca init` first)", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).with_context(|| format!("parse {}", ca_key_path.display()))?;
    let ca_pem = std::fs::read_to_string(ca_dir.join(CA_CERT))
        .with_context(|| format!("read {}", ca_dir.join(CA_CERT).display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("load the CA certificate")?;
    Ok((issuer, ca_pem))
}

/// What a certificate for `subject` says: its name, the SANs the cluster file
/// gives it (never what a requester asks for), its uses and validity.
fn leaf_params(config: &Config, subject: &Subject, valid: Duration) -> Result<CertificateParams> {
    let (dns, ips) = subject.alt_names(config)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&subject.common_name());
    params.subject_alt_names = dns
        .iter()
        .map(|d| Ok(SanType::DnsName(d.clone().try_into().with_context(|| format!("{d:?} is not a DNS name"))?)))
        .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
        .collect::<Result<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    // Every member is a server to some peers and a client of others (replication, etcd peers, probes).
    params.extended_key_usages = match subject {
        // A person or tool only ever connects.
        Subject::User(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        // An S3 server only ever answers.
        Subject::Repository(_) => vec![ExtendedKeyUsagePurpose::ServerAuth],
        _ => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, valid);
    Ok(params)
}

/// Writes `dir/name` beside (`name.new`) and renames it into place.
fn place(dir: &Path, name: &str, text: &str, private: bool) -> Result<()> {
    let (tmp, dest) = (dir.join(format!("{name}.new")), dir.join(name));
    if private {
        write_private(&tmp, text)?;
    } else {
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("rename {} into place", dest.display()))
}

impl Subject {
    /// From the common name a certificate or request carries (`node:a1`).
    pub fn from_common_name(cn: &str) -> Option<Subject> {
        let (kind, rest) = cn.split_once(':')?;
        Subject::from_identity(&format!("{kind}-{rest}"))
    }

    /// From the name of its directory under `[tls] dir` (`node-a1`, `gateway-eu`, `etcd-eu`, `user-lab`).
    pub fn from_identity(name: &str) -> Option<Subject> {
        let (kind, rest) = name.split_once('-')?;
        let rest = rest.to_string();
        match kind {
            "node" => Some(Subject::Node(rest)),
            "gateway" => Some(Subject::Gateway(rest)),
            "etcd" => Some(Subject::Etcd(rest)),
            "user" => Some(Subject::User(rest)),
            "repository" => Some(Subject::Repository(rest)),
            _ => None,
        }
    }
}

/// One certificate renewed by `rotate`.
#[derive(Debug, Clone, Serialize)]
pub struct Renewed {
    /// The directory's name under `[tls] dir`: `node-a1`, `gateway-eu`, ...
    pub identity: String,
    pub serial: String,
    pub not_after: i64,
}

/// Renews, in place and with new keys, every certificate found under
/// `tls_dir` (one directory per process of this host), signed by the CA in
/// `ca_dir`. The processes pick the files up by themselves (see `crate::tls`).
pub fn rotate(ca_dir: &Path, tls_dir: &Path, config: &Config, valid: Duration) -> Result<Vec<Renewed>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(tls_dir).with_context(|| format!("read {}", tls_dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if path.join(LEAF_CERT).is_file() {
            if let Some(subject) = Subject::from_identity(&name) {
                found.push((name, path, subject));
            }
        }
    }
    if found.is_empty() {
        bail!("{} holds no certificates to renew (directories like node-<name>, gateway-<region>)", tls_dir.display());
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut renewed = Vec::new();
    for (identity, dir, subject) in found {
        let cert = issue(ca_dir, &dir, config, &subject, valid).with_context(|| format!("renew {identity}"))?;
        let info = inspect(&cert)?;
        renewed.push(Renewed { identity, serial: serial_of(&cert)?, not_after: info.not_after });
    }
    Ok(renewed)
}

/// The serial number of a certificate file, hex.
pub fn serial_of(path: &Path) -> Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).with_context(|| format!("{} is not PEM", path.display()))?;
    let cert = pem.parse_x509().with_context(|| format!("parse {}", path.display()))?;
    Ok(cert.raw_serial_as_string())
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    dn.push(DnType::OrganizationName, "meridian");
    dn
}

fn set_validity(params: &mut CertificateParams, valid: Duration) {
    // A minute back: a peer whose clock is a little behind still accepts it.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::seconds(valid.as_secs() as i64);
}

/// Writes a private file (keys, passwords), 0600 from the moment it exists;
/// the lab writes its secrets with it too.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// What `ca show` says about one certificate.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertInfo {
    pub path: String,
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// Whole days until it expires (negative: expired).
    pub days_left: i64,
    /// Expires within `WARN_BEFORE` (or has).
    pub expiring: bool,
}

/// Reads a PEM certificate's names and expiry.
pub fn inspect(path: &Path) -> Result<CertInfo> {
    let pem_text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem_text)
        .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
    let cert = pem.parse_x509().map_err(|e| anyhow::anyhow!("parse {}: {e}", path.display()))?;
    let (mut dns_names, mut ip_addresses) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => ip_addresses.push(match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")).to_string(),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes")).to_string(),
                    _ => format!("{b:?}"),
                }),
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after.timestamp();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let left = not_after - now;
    Ok(CertInfo {
        path: path.display().to_string(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        ip_addresses,
        not_after,
        days_left: left.div_euclid(86_400),
        expiring: left < WARN_BEFORE.as_secs() as i64,
    })
}

/// Whether the certificate at `leaf` was signed by the CA certificate at `ca`.
pub fn signed_by(leaf: &Path, ca: &Path) -> Result<bool> {
    let leaf_pem = std::fs::read(leaf).with_context(|| format!("read {}", leaf.display()))?;
    let ca_pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
    let (_, leaf_pem) = x509_parser::pem::parse_x509_pem(&leaf_pem).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_pem).map_err(|e| anyhow::anyhow!("{e}"))?;
    let leaf = leaf_pem.parse_x509().map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca = ca_pem.parse_x509().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(leaf.verify_signature(Some(ca.public_key())).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config() -> Config {
        crate::lab::topology::lab_config(&Default::default(), Path::new("/tmp/ca-test"))
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_ca_signs_certificates_with_the_names_peers_use() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let config = config();
        let year = Duration::from_secs(365 * 24 * 3600);
        init(&ca, "lab", year).unwrap();
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600, "the CA key is private");
        let err = init(&ca, "lab", year).unwrap_err().to_string();
        assert!(err.contains("refusing to replace"), "{err}");

        let node = config.node_names()[0].clone();
        let (_, n) = config.node(&node).unwrap();
        let out = dir.path().join("node");
        let leaf =
            issue(&ca, &out, &config, &Subject::Node(node.clone()), Duration::from_secs(90 * 24 * 3600)).unwrap();
        assert_eq!(mode(&out.join(LEAF_KEY)), 0o600, "the node's key is private, made where it is used");
        assert!(signed_by(&leaf, &ca.join(CA_CERT)).unwrap(), "signed by the cluster CA");
        let info = inspect(&leaf).unwrap();
        assert!(info.subject.contains(&format!("node:{node}")), "{info:?}");
        assert_eq!(info.dns_names, vec![node.clone()]);
        assert!(info.ip_addresses.contains(&n.address.ip().to_string()), "{info:?}");
        assert!((88..=90).contains(&info.days_left) && !info.expiring, "{info:?}");

        // Another CA's certificate is not ours.
        let other = dir.path().join("other");
        init(&other, "other", year).unwrap();
        assert!(!signed_by(&leaf, &other.join(CA_CERT)).unwrap());

        let region = config.regions[0].name.clone();
        let gw = issue(&ca, &dir.path().join("gw"), &config, &Subject::Gateway(region.clone()), year).unwrap();
        let info = inspect(&gw).unwrap();
        assert!(info.dns_names.contains(&format!("writer.{}", config.dns.zone.trim_end_matches('.'))), "{info:?}");
        let etcd = issue(&ca, &dir.path().join("etcd"), &config, &Subject::Etcd(region), year).unwrap();
        // Its own address and, on loopback, 127.0.0.1 (where etcd sees peers connect from).
        assert_eq!(inspect(&etcd).unwrap().ip_addresses, vec!["127.0.0.1".to_string(), "127.0.1.1".to_string()]);
        let user = issue(&ca, &dir.path().join("user"), &config, &Subject::User("alice".into()), year).unwrap();
        let info = inspect(&user).unwrap();
        assert!(info.subject.contains("user:alice") && info.ip_addresses.is_empty() && info.dns_names.is_empty());
        assert!(issue(&ca, &dir.path().join("bad"), &config, &Subject::User("Bad Name".into()), year).is_err());

        let short =
            issue(&ca, &dir.path().join("short"), &config, &Subject::Node(node), Duration::from_secs(86_400)).unwrap();
        assert!(inspect(&short).unwrap().expiring, "a day left is within the 30-day warning");
        let unknown = issue(&ca, &dir.path().join("x"), &config, &Subject::Node("nope".into()), year).unwrap_err();
        assert!(format!("{unknown:#}").contains("no node named"), "{unknown:#}");
        let no_ca = issue(&dir.path().join("none"), &out, &config, &Subject::Gateway("witness".into()), year);
        assert!(format!("{:#}", no_ca.unwrap_err()).contains("meridian ca init"));
    }
}
