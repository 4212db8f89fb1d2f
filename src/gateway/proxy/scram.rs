//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as the proxy speaks it: the server side
//! towards a client, checked against the verifier PostgreSQL stores, and the
//! client side towards PostgreSQL, signed with the ClientKey the client's own
//! proof revealed. This is how PgBouncer's auth_query passes SCRAM through a
//! proxy that terminates TLS: the proxy never learns the password, only the
//! ClientKey of one login, which is what the server's check needs.
//!
//! Channel binding (`tls-server-end-point`, RFC 5929) is offered to clients
//! when their TLS certificate allows it and used towards the server whenever
//! it offers it, so each TLS leg is bound to its own certificate. Pure: no I/O.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::auth::constant_time_eq;

pub const SCRAM: &str = "SCRAM-SHA-256";
pub const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// PostgreSQL's SCRAM_RAW_NONCE_LEN.
const NONCE_BYTES: usize = 18;
/// PostgreSQL's default for scram_iterations; used for mock verifiers.
const MOCK_ITERATIONS: u32 = 4096;

/// Why an exchange failed. `Refused` is a wrong password (or a user that
/// cannot log in: the two look the same to the client); `Protocol` a message
/// no conforming client sends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("password authentication failed")]
    Refused,
    #[error("SCRAM protocol violation: {0}")]
    Protocol(String),
}

fn protocol(why: impl Into<String>) -> ScramError {
    ScramError::Protocol(why.into())
}

/// What `pg_authid.rolpassword` holds for a SCRAM password:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier { .. }")
    }
}

impl Verifier {
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok().filter(|s| !s.is_empty())?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A verifier no proof matches, for a user that does not exist or may not
    /// log in through the proxy. Its salt depends only on `secret` and the
    /// name, as PostgreSQL's mock does, so a client cannot tell such a user
    /// from a real one by asking twice.
    pub fn mock(secret: &[u8; 32], user: &str) -> Verifier {
        let salt = Sha256::new().chain_update(secret).chain_update(user.as_bytes()).finalize();
        let mut stored_key = [0u8; 32];
        rand::rng().fill_bytes(&mut stored_key);
        Verifier { iterations: MOCK_ITERATIONS, salt: salt[..16].to_vec(), stored_key, server_key: stored_key }
    }
}

/// `tls-server-end-point` channel binding data for a certificate: its hash
/// with the hash of its signature algorithm (SHA-256 for MD5 and SHA-1), as
/// RFC 5929 and PostgreSQL define it. `None` when the algorithm has no hash
/// (Ed25519); channel binding is then not offered.
pub fn end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::oid_registry as oids;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let alg = &cert.signature_algorithm.algorithm;
    let sha256 = [
        oids::OID_SIG_ECDSA_WITH_SHA256,
        oids::OID_PKCS1_SHA256WITHRSA,
        oids::OID_PKCS1_SHA1WITHRSA,
        oids::OID_PKCS1_MD5WITHRSAENC,
    ];
    if sha256.contains(alg) {
        Some(Sha256::digest(cert_der).to_vec())
    } else if *alg == oids::OID_SIG_ECDSA_WITH_SHA384 || *alg == oids::OID_PKCS1_SHA384WITHRSA {
        Some(Sha384::digest(cert_der).to_vec())
    } else if *alg == oids::OID_SIG_ECDSA_WITH_SHA512 || *alg == oids::OID_PKCS1_SHA512WITHRSA {
        Some(Sha512::digest(cert_der).to_vec())
    } else {
        None
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn nonce() -> String {
    let mut raw = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// The value of `key=` at the start of `attr`.
fn attr(attr: &str, key: char) -> Result<&str, ScramError> {
    attr.strip_prefix(key)
        .and_then(|r| r.strip_prefix('='))
        .ok_or_else(|| protocol(format!("expected attribute '{key}' in {attr:?}")))
}

/// The proxy as the SCRAM server of one client login, after the client's first message.
pub struct ServerExchange {
    verifier: Verifier,
    /// The gs2 header exactly as the client sent it; its final message must repeat it.
    gs2_header: String,
    /// The certificate hashes the client may have bound to (the proxy's
    /// current certificate and the one before it, around a rotation).
    binding: Option<Vec<Vec<u8>>>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// A client proved it knows the password.
#[derive(Debug)]
pub struct Proven {
    /// Recovered from the client's proof: what the server-side login signs with.
    pub client_key: [u8; 32],
    /// The server-final message (`v=...`) to send the client.
    pub server_final: String,
}

impl ServerExchange {
    /// Takes the client's SASLInitialResponse (`mechanism`, `client_first`)
    /// and returns the server-first message to send. `end_points` are the
    /// proxy certificates' bindings when the client came over TLS and
    /// `SCRAM-SHA-256-PLUS` was offered, else empty.
    pub fn start(
        verifier: Verifier,
        mechanism: &str,
        client_first: &[u8],
        end_points: &[Vec<u8>],
    ) -> Result<(ServerExchange, String), ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| protocol("client-first message is not UTF-8"))?;
        let mut parts = text.splitn(3, ',');
        let (flag, authzid, bare) = match (parts.next(), parts.next(), parts.next()) {
            (Some(f), Some(a), Some(b)) => (f, a, b),
            _ => return Err(protocol("malformed client-first message")),
        };
        if !authzid.is_empty() {
            return Err(protocol("authorization identities are not supported"));
        }
        let plus = mechanism == SCRAM_PLUS;
        let binding = match flag {
            "p=tls-server-end-point" if plus && !end_points.is_empty() => Some(end_points.to_vec()),
            f if f.starts_with("p=") => return Err(protocol(format!("unsupported channel binding {f:?}"))),
            // The client can bind but believes the server cannot: true only if
            // PLUS was not offered (RFC 5802 §6: else this is a downgrade).
            "y" if end_points.is_empty() && !plus => None,
            "y" => return Err(protocol("the client supports channel binding but thinks the proxy does not; it does")),
            "n" if !plus => None,
            _ => return Err(protocol(format!("channel binding flag {flag:?} does not match mechanism {mechanism}"))),
        };
        if mechanism != SCRAM && mechanism != SCRAM_PLUS {
            return Err(protocol(format!("unsupported SASL mechanism {mechanism:?}")));
        }
        let mut attrs = bare.split(',');
        // libpq sends an empty user name (PostgreSQL takes it from the startup packet).
        attr(attrs.next().unwrap_or(""), 'n')?;
        let client_nonce = attr(attrs.next().unwrap_or(""), 'r')?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(protocol("invalid client nonce"));
        }
        if attrs.next().is_some() {
            return Err(protocol("unsupported extension in the client-first message"));
        }
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
        let gs2_header = format!("{flag},{authzid},");
        let exchange =
            ServerExchange { verifier, gs2_header, binding, client_first_bare: bare.to_string(), server_first, nonce };
        let first = exchange.server_first.clone();
        Ok((exchange, first))
    }

    /// Checks the client-final message: channel binding, nonce and proof.
    pub fn finish(self, client_final: &[u8]) -> Result<Proven, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| protocol("client-final message is not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or_else(|| protocol("no proof in client-final"))?;
        let mut attrs = without_proof.split(',');
        let cbind = B64
            .decode(attr(attrs.next().unwrap_or(""), 'c')?)
            .map_err(|_| protocol("channel binding is not base64"))?;
        let nonce = attr(attrs.next().unwrap_or(""), 'r')?;
        if attrs.next().is_some() {
            return Err(protocol("unsupported extension in the client-final message"));
        }
        let header = self.gs2_header.as_bytes();
        let bound = match &self.binding {
            None => cbind == header,
            Some(points) => {
                cbind.starts_with(header) && points.iter().any(|p| constant_time_eq(&cbind[header.len()..], p))
            }
        };
        if !bound {
            return Err(protocol("channel binding does not match this connection"));
        }
        if nonce != self.nonce {
            return Err(protocol("nonce does not match"));
        }
        let proof: [u8; 32] =
            B64.decode(proof).ok().and_then(|p| p.try_into().ok()).ok_or_else(|| protocol("malformed client proof"))?;
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, self.server_first);
        let signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &signature);
        if !constant_time_eq(&Sha256::digest(client_key), &self.verifier.stored_key) {
            return Err(ScramError::Refused);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(Proven { client_key, server_final: format!("v={}", B64.encode(server_signature)) })
    }
}

/// The proxy as the SCRAM client of PostgreSQL, signing with a ClientKey.
pub struct ClientExchange {
    client_key: [u8; 32],
    server_key: [u8; 32],
    /// gs2 header plus channel binding data, as sent in `c=`.
    cbind: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl ClientExchange {
    /// The mechanism and client-first message. `binding` is the server
    /// certificate's end point when the server offered `SCRAM-SHA-256-PLUS`.
    pub fn start(
        client_key: [u8; 32],
        verifier: &Verifier,
        binding: Option<Vec<u8>>,
    ) -> (ClientExchange, &'static str, String) {
        let nonce = nonce();
        let (mechanism, mut cbind) = match &binding {
            Some(_) => (SCRAM_PLUS, b"p=tls-server-end-point,,".to_vec()),
            None => (SCRAM, b"n,,".to_vec()),
        };
        let header = String::from_utf8(cbind.clone()).expect("ASCII");
        cbind.extend(binding.unwrap_or_default());
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("{header}{client_first_bare}");
        let exchange = ClientExchange {
            client_key,
            server_key: verifier.server_key,
            cbind,
            client_first_bare,
            nonce,
            auth_message: None,
        };
        (exchange, mechanism, first)
    }

    /// The client-final message answering the server's first message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(server_first).map_err(|_| protocol("server-first message is not UTF-8"))?;
        let nonce = attr(text.split(',').next().unwrap_or(""), 'r')?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(protocol("the server's nonce does not extend the proxy's"));
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&self.cbind));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let proof = xor(&self.client_key, &hmac(&stored_key, &[auth_message.as_bytes()]));
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server knows the verifier too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final).map_err(|_| protocol("server-final message is not UTF-8"))?;
        if let Ok(e) = attr(text, 'e') {
            return Err(protocol(format!("the server refused: {e}")));
        }
        let auth_message = self.auth_message.as_ref().ok_or_else(|| protocol("server-final before server-first"))?;
        let expected = hmac(&self.server_key, &[auth_message.as_bytes()]);
        let got = B64.decode(attr(text, 'v')?).map_err(|_| protocol("server signature is not base64"))?;
        if !constant_time_eq(&got, &expected) {
            return Err(protocol("the server's signature does not match its verifier"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
