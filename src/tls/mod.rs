//! TLS on meridian's own links (the gateway and agent APIs, the CLI's
//! client, health probes), from the files the cluster CA made (`crate::ca`).
//!
//! Every process finds its certificate in `<tls.dir>/<identity>/` (`tls.crt`,
//! `tls.key`, and `ca.crt`, its trust anchor), where the identity is
//! `node-<name>`, `gateway-<region>` or `etcd-<region>`. A certificate is read
//! again when its file changes (checked at most once a second, on the next
//! handshake), so `ca rotate` needs no restart: a new file whose key does not
//! match its certificate (half-written) is ignored until it does, and the old
//! certificate keeps serving. The trust anchor is read once at start.
//!
//! One crypto provider for everything: aws-lc-rs, which object_store links already.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

mod serve;
pub use serve::{connect, serve_https, served_certificate, Peer, Served};

/// How often a certificate file is looked at for a rotation.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Where one process's certificate, key and trust anchor are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `node-<name>`, `gateway-<region>`, `etcd-<region>`.
    pub name: String,
    pub dir: PathBuf,
}

impl Identity {
    pub fn new(tls_dir: &Path, name: impl Into<String>) -> Identity {
        let name = name.into();
        Identity { dir: tls_dir.join(&name), name }
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join(crate::ca::LEAF_CERT)
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join(crate::ca::LEAF_KEY)
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join(crate::ca::CA_CERT)
    }
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Clients are not asked (the agent's read-only API).
    None,
    /// A certificate from the cluster CA is checked when presented; a client
    /// without one may still authenticate otherwise (a token).
    Optional,
}

/// A certificate and key read from files, read again when they change.
pub struct Reloading {
    identity: Identity,
    state: Mutex<State>,
}

struct State {
    key: Arc<CertifiedKey>,
    /// The pair served before the last reload: a connection that began
    /// before it may still bind to it (the SQL proxy's SCRAM channel binding).
    previous: Option<Arc<CertifiedKey>>,
    /// (inode, mtime, length) of the certificate and key files when read.
    stamp: Stamp,
    checked: Instant,
}

type Stamp = [(u64, i64, u64); 2];

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl Reloading {
    pub fn open(identity: &Identity) -> Result<Arc<Reloading>> {
        let stamp = stamp(identity)?;
        let key = read_pair(identity)?;
        Ok(Arc::new(Reloading {
            identity: identity.clone(),
            state: Mutex::new(State { key, previous: None, stamp, checked: Instant::now() }),
        }))
    }

    /// The certificate to present now, after reading the files again if they
    /// changed and make a matching pair.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            if let Ok(now) = stamp(&self.identity) {
                if now != state.stamp {
                    match read_pair(&self.identity) {
                        Ok(key) => {
                            state.previous = Some(std::mem::replace(&mut state.key, key));
                            state.stamp = now;
                            tracing::info!("TLS: reloaded the certificate of {}", self.identity.name);
                        }
                        // Half-written or mismatched: keep serving the old pair, try again later.
                        Err(e) => tracing::warn!("TLS: not reloading {}: {e:#}", self.identity.name),
                    }
                }
            }
        }
        state.key.clone()
    }

    /// The leaf certificates served recently: the current one, then the one
    /// before the last reload.
    pub fn recent(&self) -> Vec<CertificateDer<'static>> {
        let current = self.current();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        [Some(&current), state.previous.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|k| k.cert.first().cloned())
            .collect()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for Reloading {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn stamp(identity: &Identity) -> Result<Stamp> {
    let one = |p: PathBuf| -> Result<(u64, i64, u64)> {
        let m = std::fs::metadata(&p).with_context(|| format!("read {}", p.display()))?;
        Ok((m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.len()))
    };
    Ok([one(identity.cert())?, one(identity.key())?])
}

fn read_pair(identity: &Identity) -> Result<Arc<CertifiedKey>> {
    let (cert, key) = (identity.cert(), identity.key());
    let chain = read_certs(&cert)?;
    let private =
        PrivateKeyDer::from_pem_file(&key).with_context(|| format!("read the private key {}", key.display()))?;
    let pair = CertifiedKey::from_der(chain, private, &provider())
        .with_context(|| format!("{} and {} do not make a usable pair", cert.display(), key.display()))?;
    Ok(Arc::new(pair))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The trust anchors in a PEM file (the cluster CA's certificate).
pub fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in
        read_certs(ca).context("read the cluster CA certificate (run `meridian ca init`, see docs/security.md)")?
    {
        store.add(cert).with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
    }
    Ok(Arc::new(store))
}

/// A server config presenting `identity`'s certificate (reloaded on rotation).
pub fn server_config(identity: &Identity, clients: ClientAuth) -> Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match clients {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(&identity.ca())?, provider())
                .allow_unauthenticated()
                .build()
                .context("build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Reloading::open(identity)?);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A server config for the SQL proxy: `resolver`'s certificate (which the
/// proxy also needs for channel binding), no client certificates, and ALPN
/// `postgresql` (libpq 17's direct TLS negotiates it; older clients send none).
pub fn proxy_server_config(resolver: Arc<Reloading>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting the cluster CA in `ca`, presenting `identity`'s
/// certificate when given.
pub fn client_config(ca: &Path, identity: Option<&Identity>) -> Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    Ok(Arc::new(match identity {
        Some(id) => builder.with_client_cert_resolver(Reloading::open(id)?),
        None => builder.with_no_client_auth(),
    }))
}

/// TLS for a PostgreSQL client (tokio-postgres): the server's certificate must
/// come from the cluster CA and name the address connected to; `identity`'s
/// certificate is presented when given (pg_hba asks meridian's roles for one).
#[derive(Clone)]
pub struct PgTls(pub tokio_postgres_rustls::MakeRustlsConnect);

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PgTls")
    }
}

pub fn postgres(ca: &Path, identity: Option<&Identity>) -> Result<PgTls> {
    let config = client_config(ca, identity)?;
    Ok(PgTls(tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone())))
}

/// The common name of a peer's certificate (`node:a1`, `operator:alice`), if it sent one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests;
