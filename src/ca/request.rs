//! Certificates for separate hosts without moving a private key: the host
//! makes its key and a request (`request`), the CA's host signs it (`sign`),
//! and the host puts the certificate in place (`accept`).
//!
//! The CA trusts a request for two things only: the public key, and which
//! member it is for (its common name, `node:a1`). The names and addresses
//! the certificate carries come from the CA host's cluster file, exactly as
//! `issue` would write them, so a request cannot claim an address it is not
//! given. Until `accept`, the host keeps serving its current pair: the new
//! key waits beside it as `request.key`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rcgen::{CertificateParams, CertificateSigningRequestParams, DnType, DnValue, KeyPair};

use super::{leaf_params, load_issuer, name, place, write_private, Subject, CA_CERT, LEAF_CERT, LEAF_KEY};
use crate::config::Config;

pub const REQUEST_KEY: &str = "request.key";
pub const REQUEST_CSR: &str = "request.csr";

/// Makes a key (0600) and a signing request for `subject` in `dir`; returns the request's path.
pub fn request(dir: &Path, config: &Config, subject: &Subject) -> Result<PathBuf> {
    subject.alt_names(config)?; // the subject must exist in the cluster file
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key = KeyPair::generate().context("generate a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&subject.common_name());
    let csr = params.serialize_request(&key).context("make the signing request")?;
    write_private(&dir.join(REQUEST_KEY), &key.serialize_pem())?;
    let path = dir.join(REQUEST_CSR);
    std::fs::write(&path, csr.pem().context("encode the request")?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Signs a request with the CA in `ca_dir`: the certificate names what the
/// cluster file gives the member the request names. Returns the subject and
/// the certificate (PEM).
pub fn sign(ca_dir: &Path, csr: &Path, config: &Config, valid: Duration) -> Result<(Subject, String)> {
    let pem = std::fs::read_to_string(csr).with_context(|| format!("read {}", csr.display()))?;
    let request = CertificateSigningRequestParams::from_pem(&pem)
        .with_context(|| format!("{} is not a valid signing request (its signature is checked)", csr.display()))?;
    let cn = request
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            DnValue::Utf8String(s) => Some(s.clone()),
            DnValue::PrintableString(p) => Some(p.as_str().to_string()),
            _ => None,
        })
        .context("the request names no common name")?;
    let Some(subject) = Subject::from_common_name(&cn) else {
        bail!("the request is for {cn:?}, which is not a member of this cluster (node:, gateway:, etcd:, user:)");
    };
    let (issuer, _) = load_issuer(ca_dir)?;
    let params = leaf_params(config, &subject, valid)?;
    let cert = params.signed_by(&request.public_key, &issuer).context("sign the certificate")?;
    Ok((subject, cert.pem()))
}

/// Puts a signed certificate in place beside the key `request` made in `dir`,
/// with the CA's certificate; refuses one that does not match that key or
/// does not come from `ca_cert`.
pub fn accept(dir: &Path, cert: &Path, ca_cert: &Path) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    let key_path = dir.join(REQUEST_KEY);
    let key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("read {} (run `meridian ca request` on this host first)", key_path.display()))?;
    let cert_pem = std::fs::read_to_string(cert).with_context(|| format!("read {}", cert.display()))?;
    let ca_pem = std::fs::read_to_string(ca_cert).with_context(|| format!("read {}", ca_cert.display()))?;
    if !super::signed_by(cert, ca_cert)? {
        bail!("{} is not signed by the CA in {}", cert.display(), ca_cert.display());
    }
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parse the certificate")?;
    let private = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).context("parse the key")?;
    rustls::sign::CertifiedKey::from_der(vec![der], private, &crate::tls::provider())
        .context("the certificate is not for the key this host requested it with")?;
    // The key before the certificate, as `issue` does: readers never see a new certificate with an old key.
    place(dir, CA_CERT, &ca_pem, false)?;
    place(dir, LEAF_KEY, &key, true)?;
    place(dir, LEAF_CERT, &cert_pem, false)?;
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(dir.join(REQUEST_CSR));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_signed_with_the_names_the_cluster_file_gives_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::lab::topology::lab_config(&Default::default(), Path::new("/tmp/ca-request"));
        let year = Duration::from_secs(365 * 24 * 3600);
        let ca = dir.path().join("ca");
        super::super::init(&ca, "lab", year).unwrap();
        let node = config.node_names()[0].clone();
        let host = dir.path().join("host");
        let csr = request(&host, &config, &Subject::Node(node.clone())).unwrap();
        assert!(!host.join(LEAF_KEY).exists(), "the serving key is not touched before accept");

        let (subject, pem) = sign(&ca, &csr, &config, year).unwrap();
        assert_eq!(subject, Subject::Node(node.clone()));
        let signed = dir.path().join("signed.crt");
        std::fs::write(&signed, pem).unwrap();
        let info = super::super::inspect(&signed).unwrap();
        let (_, n) = config.node(&node).unwrap();
        assert_eq!(info.dns_names, vec![node.clone()]);
        assert!(info.ip_addresses.contains(&n.address.ip().to_string()), "{info:?}");

        // Another host's request key does not go with this certificate.
        let other = dir.path().join("other");
        request(&other, &config, &Subject::Node(node.clone())).unwrap();
        let err = accept(&other, &signed, &ca.join(CA_CERT)).unwrap_err();
        assert!(format!("{err:#}").contains("not for the key"), "{err:#}");

        accept(&host, &signed, &ca.join(CA_CERT)).unwrap();
        assert!(crate::tls::Reloading::open(&crate::tls::Identity { name: "x".into(), dir: host.clone() }).is_ok());
        assert!(!host.join(REQUEST_KEY).exists());

        // A request for something that is not a member of the cluster is refused.
        let stranger = dir.path().join("stranger");
        std::fs::create_dir_all(&stranger).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = name("root");
        std::fs::write(stranger.join("r.csr"), params.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
        let err = sign(&ca, &stranger.join("r.csr"), &config, year).unwrap_err();
        assert!(format!("{err:#}").contains("not a member"), "{err:#}");
    }
}
