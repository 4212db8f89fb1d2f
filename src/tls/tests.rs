//! HTTPS with the cluster CA's certificates, against a real listener on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ca::{self, Subject};
use crate::config::Config;

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn config() -> Config {
    crate::lab::topology::lab_config(&Default::default(), Path::new("/tmp/tls-test"))
}

/// A CA in `<dir>/ca` and the first region's gateway certificate in `<dir>/gateway-<r>`.
fn gateway_identity(dir: &Path, config: &Config) -> Identity {
    ca::init(&dir.join("ca"), "lab", YEAR).unwrap();
    let region = config.regions[0].name.clone();
    let id = Identity::new(dir, format!("gateway-{region}"));
    ca::issue(&dir.join("ca"), &id.dir, config, &Subject::Gateway(region), YEAR).unwrap();
    id
}

/// Serves `/peer` (who the server thinks called) on 127.0.0.1 until the token is cancelled.
/// It listens on the gateway's API address (any port): the certificate names that address.
async fn server(id: &Identity, config: &Config) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind((config.regions[0].gateway.api.ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route(
        "/peer",
        get(|Extension(p): Extension<Peer>| async move { p.cert_name.unwrap_or_else(|| "anonymous".into()) }),
    );
    let tls = server_config(id, ClientAuth::Optional).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_https(listener, tls, router, stop.clone()).map(|r| r.unwrap()));
    (addr, stop, task)
}

use futures_util::FutureExt;

async fn get_peer(addr: SocketAddr, tls: &Arc<ClientConfig>) -> Result<String> {
    let stream = connect(addr, tls, Duration::from_secs(5)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/peer").header("host", addr.to_string()).body(Empty::<Bytes>::new())?;
    let body = sender.send_request(req).await?.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn serial(cert: &rustls::pki_types::CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert.as_ref()).unwrap().1.raw_serial_as_string()
}

#[tokio::test]
async fn clients_of_the_cluster_ca_connect_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config();
    let id = gateway_identity(dir.path(), &config);
    let (addr, stop, task) = server(&id, &config).await;

    let ours = client_config(&dir.path().join("ca").join(ca::CA_CERT), None).unwrap();
    assert_eq!(get_peer(addr, &ours).await.unwrap(), "anonymous");

    // A client certificate from the cluster CA is seen by its common name.
    let node = config.node_names()[0].clone();
    let client_id = Identity::new(dir.path(), format!("node-{node}"));
    ca::issue(&dir.path().join("ca"), &client_id.dir, &config, &Subject::Node(node.clone()), YEAR).unwrap();
    let with_cert = client_config(&client_id.ca(), Some(&client_id)).unwrap();
    assert_eq!(get_peer(addr, &with_cert).await.unwrap(), format!("node:{node}"));

    // A client trusting another CA refuses the server.
    let other = dir.path().join("other");
    ca::init(&other, "other", YEAR).unwrap();
    let foreign = client_config(&other.join(ca::CA_CERT), None).unwrap();
    let err = format!("{:#}", get_peer(addr, &foreign).await.unwrap_err());
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");

    // A client certificate from another CA is refused by the server.
    let config_other = config.clone();
    let stranger = Identity::new(dir.path(), "stranger");
    ca::issue(&other, &stranger.dir, &config_other, &Subject::Node(node), YEAR).unwrap();
    let mut wrong_cert = (*client_config(&id.ca(), None).unwrap()).clone();
    wrong_cert.client_auth_cert_resolver = Reloading::open(&stranger).unwrap();
    assert!(get_peer(addr, &Arc::new(wrong_cert)).await.is_err(), "a foreign client certificate is refused");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await.expect("closed");
    assert!(!String::from_utf8_lossy(&buf).contains("anonymous"), "plain HTTP must not be served");

    // The server still serves after all that.
    assert_eq!(get_peer(addr, &ours).await.unwrap(), "anonymous");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config();
    let id = gateway_identity(dir.path(), &config);
    let (addr, stop, task) = server(&id, &config).await;
    let client = client_config(&id.ca(), None).unwrap();

    let served = || async {
        let stream = connect(addr, &client, Duration::from_secs(5)).await.unwrap();
        serial(&stream.get_ref().1.peer_certificates().unwrap()[0])
    };
    let before = served().await;
    let on_disk_before = serial(&read_certs(&id.cert()).unwrap()[0]);
    assert_eq!(before, on_disk_before);

    ca::issue(&dir.path().join("ca"), &id.dir, &config, &Subject::Gateway(config.regions[0].name.clone()), YEAR)
        .unwrap();
    let rotated = serial(&read_certs(&id.cert()).unwrap()[0]);
    assert_ne!(rotated, before);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if served().await == rotated {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the rotated certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A half-written pair (a key that does not match) is not taken; the last good one serves on.
    std::fs::write(id.key(), ca_key_of_another(dir.path())).unwrap();
    tokio::time::sleep(RELOAD_CHECK + Duration::from_millis(200)).await;
    assert_eq!(served().await, rotated, "a mismatched pair must not replace the working one");
    stop.cancel();
    task.await.unwrap();
}

fn ca_key_of_another(dir: &Path) -> String {
    let other = dir.join("another");
    ca::init(&other, "x", YEAR).unwrap();
    std::fs::read_to_string(other.join(ca::CA_KEY)).unwrap()
}
