//! The proxy's SCRAM against postgres-protocol's client (what tokio-postgres
//! speaks, checked against PostgreSQL by that project) and against itself.

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::password::scram_sha_256;

use super::*;

fn verifier(password: &str) -> Verifier {
    Verifier::parse(&scram_sha_256(password.as_bytes())).expect("postgres-protocol makes a valid verifier")
}

/// One login of postgres-protocol's client with `password` against the proxy's server side.
fn login(
    password: &str,
    stored: &Verifier,
    binding: ChannelBinding,
    mechanism: &str,
    end_points: &[Vec<u8>],
) -> Result<Proven, ScramError> {
    let mut client = ScramSha256::new(password.as_bytes(), binding);
    let (server, first) = ServerExchange::start(stored.clone(), mechanism, client.message(), end_points)?;
    client.update(first.as_bytes()).expect("the client accepts the server-first message");
    let proven = server.finish(client.message())?;
    client.finish(proven.server_final.as_bytes()).expect("the client accepts the proxy's signature");
    Ok(proven)
}

#[test]
fn the_right_password_is_accepted_and_a_wrong_one_refused() {
    let v = verifier("correct horse");
    let proven = login("correct horse", &v, ChannelBinding::unsupported(), SCRAM, &[]).unwrap();
    assert_eq!(
        Sha256::digest(proven.client_key).as_slice(),
        v.stored_key,
        "the recovered ClientKey hashes to StoredKey"
    );
    assert_eq!(
        login("battery staple", &v, ChannelBinding::unsupported(), SCRAM, &[]).unwrap_err(),
        ScramError::Refused
    );
}

#[test]
fn a_mock_verifier_refuses_every_password_with_a_stable_salt() {
    let secret = [7u8; 32];
    let (a, b) = (Verifier::mock(&secret, "nobody"), Verifier::mock(&secret, "nobody"));
    assert_eq!(a.salt, b.salt, "asking twice must not reveal the user is unknown");
    assert_ne!(a.salt, Verifier::mock(&secret, "someone").salt);
    assert_eq!(login("", &a, ChannelBinding::unsupported(), SCRAM, &[]).unwrap_err(), ScramError::Refused);
}

#[test]
fn channel_binding_must_name_the_proxys_certificate() {
    let v = verifier("pw");
    let ours = vec![1u8; 32];
    let previous = vec![2u8; 32];
    let points = [ours.clone(), previous.clone()];
    login("pw", &v, ChannelBinding::tls_server_end_point(ours), SCRAM_PLUS, &points).unwrap();
    // Around a rotation the client may have seen the certificate before.
    login("pw", &v, ChannelBinding::tls_server_end_point(previous), SCRAM_PLUS, &points).unwrap();
    // A man in the middle with another certificate.
    let err = login("pw", &v, ChannelBinding::tls_server_end_point(vec![3u8; 32]), SCRAM_PLUS, &points).unwrap_err();
    assert_eq!(err, protocol("channel binding does not match this connection"));
}

#[test]
fn a_downgrade_of_channel_binding_is_refused() {
    let v = verifier("pw");
    let points = [vec![1u8; 32]];
    // PLUS was offered, the client says it thinks the server cannot bind.
    let err = login("pw", &v, ChannelBinding::unrequested(), SCRAM, &points).unwrap_err();
    assert!(matches!(err, ScramError::Protocol(ref m) if m.contains("thinks the proxy does not")), "{err}");
    // Without TLS (nothing offered) the same client is fine.
    login("pw", &v, ChannelBinding::unrequested(), SCRAM, &[]).unwrap();
    // Binding asked for with the plain mechanism, and the other way round.
    assert!(login("pw", &v, ChannelBinding::tls_server_end_point(vec![1; 32]), SCRAM, &points).is_err());
    assert!(login("pw", &v, ChannelBinding::unsupported(), SCRAM_PLUS, &points).is_err());
}

#[test]
fn the_recovered_client_key_logs_in_to_a_server_with_the_same_verifier() {
    let v = verifier("s3cret");
    let key = login("s3cret", &v, ChannelBinding::unsupported(), SCRAM, &[]).unwrap().client_key;
    for binding in [None, Some(vec![9u8; 32])] {
        let points: Vec<Vec<u8>> = binding.iter().cloned().collect();
        let (mut client, mechanism, first) = ClientExchange::start(key, &v, binding.clone());
        let (server, server_first) = ServerExchange::start(v.clone(), mechanism, first.as_bytes(), &points).unwrap();
        let last = client.respond(server_first.as_bytes()).unwrap();
        let proven = server.finish(last.as_bytes()).expect("the server accepts the proxy's proof");
        client.verify(proven.server_final.as_bytes()).expect("the proxy accepts the server's signature");
        assert!(client.verify(b"v=AAAA").is_err(), "a forged server signature is refused");
        assert!(client.verify(b"e=invalid-proof").is_err());
    }
}

#[test]
fn malformed_messages_are_protocol_errors_not_panics() {
    let v = verifier("pw");
    for first in [
        &b""[..],
        b"n",
        b"n,,",
        b"n,a=x,n=,r=abc",
        b"q,,n=,r=abc",
        b"n,,n=,r=",
        b"n,,r=abc",
        b"n,,n=,r=a,b,m=x",
        b"\xff\xfe",
    ] {
        assert!(
            matches!(ServerExchange::start(v.clone(), SCRAM, first, &[]), Err(ScramError::Protocol(_))),
            "{first:?}"
        );
    }
    assert!(ServerExchange::start(v.clone(), "SCRAM-SHA-1", b"n,,n=,r=abc", &[]).is_err());
    let (server, _) = ServerExchange::start(v.clone(), SCRAM, b"n,,n=,r=abc", &[]).unwrap();
    assert!(matches!(server.finish(b"c=biws,r=abc"), Err(ScramError::Protocol(_))), "no proof");
    let (server, first) = ServerExchange::start(v.clone(), SCRAM, b"n,,n=,r=abc", &[]).unwrap();
    let nonce = first.split(',').next().unwrap();
    assert!(matches!(server.finish(format!("c=biws,{nonce},p=AAAA").as_bytes()), Err(ScramError::Protocol(_))));
    let (server, _) = ServerExchange::start(v, SCRAM, b"n,,n=,r=abc", &[]).unwrap();
    assert!(matches!(server.finish(b"c=biws,r=abcdef,p=AAAA"), Err(ScramError::Protocol(_))), "wrong nonce");
}

#[test]
fn verifiers_that_are_not_scram_are_not_parsed() {
    assert!(Verifier::parse("md5c4ca4238a0b923820dcc509a6f75849b").is_none());
    assert!(Verifier::parse("SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA").is_none());
    assert!(Verifier::parse("SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA").is_none(), "keys are 32 bytes");
    assert!(Verifier::parse("").is_none());
}

#[test]
fn the_end_point_of_an_ecdsa_sha256_certificate_is_its_sha256() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x".into()]).unwrap().self_signed(&key).unwrap();
    let der = cert.der().to_vec();
    assert_eq!(end_point(&der), Some(Sha256::digest(&der).to_vec()));
    assert_eq!(end_point(b"not a certificate"), None);
}

#[test]
fn a_replayed_proof_is_refused() {
    // An eavesdropper (or a logging middlebox) that captured a whole good
    // exchange replays the client's first and final messages on a new login:
    // the server's nonce is new, so the old proof does not match it.
    let v = verifier("correct horse");
    let mut client = ScramSha256::new(b"correct horse", ChannelBinding::unsupported());
    let client_first = client.message().to_vec();
    let (server, first) = ServerExchange::start(v.clone(), SCRAM, &client_first, &[]).unwrap();
    client.update(first.as_bytes()).unwrap();
    let client_final = client.message().to_vec();
    server.finish(&client_final).expect("the original login succeeds");

    let (again, _) = ServerExchange::start(v.clone(), SCRAM, &client_first, &[]).unwrap();
    assert!(again.finish(&client_final).is_err(), "the same client-final message on a new exchange is refused");
}
