//! The API and the agents' APIs refuse what they must, each with one clear
//! line, and the cluster keeps serving: no credential, a forged, revoked or
//! expired token, a viewer on a mutating call, plain HTTP, a foreign CA,
//! oversized and malformed bodies. What got past authentication is in the audit log.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hyper::{Method, StatusCode};
use meridian::client::{request, Https};
use meridian::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Api {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Api {
    fn call(&self, token: Option<&str>, method: Method, path: &str, body: Option<Vec<u8>>) -> (StatusCode, String) {
        let https = Https { tls: self.tls.clone(), token: token.map(String::from) };
        let (status, bytes) = self
            .rt
            .block_on(request(self.addr, Some(&https), method, path, body, Duration::from_secs(20)))
            .unwrap_or_else(|e| panic!("{path}: {e:#}"));
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Asserts the status and that the error is one JSON line mentioning `says`.
    fn refused(&self, token: Option<&str>, method: Method, path: &str, body: &str, want: StatusCode, says: &str) {
        let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
        let (status, text) = self.call(token, method.clone(), path, body);
        assert_eq!(status, want, "{method} {path}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let line = error["error"].as_str().unwrap_or_else(|| panic!("no error field: {text}"));
        assert!(line.contains(says) && !line.contains('\n'), "{method} {path}: {line:?} should say {says:?}");
    }
}

fn token_of(lab: &TestLab, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let v = lab.json(&all);
    v["token"].as_str().expect("the new token").to_string()
}

#[test]
fn the_api_refuses_bad_credentials_and_bad_input_and_keeps_serving() {
    let lab = TestLab::up(101, &[]);
    let config = Config::load(&lab.config()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let tls = meridian::tls::client_config(&config.tls_ca_file(), None).unwrap();
    let api = Api { rt, addr: config.regions[0].gateway.api, tls };
    let admin = std::fs::read_to_string(lab.path().join("admin.token")).unwrap().trim().to_string();
    let switchover = r#"{"to":"ap-northeast-1a","timeout_ms":10000}"#;

    // Only /healthz is open.
    assert_eq!(api.call(None, Method::GET, "/healthz", None).0, StatusCode::OK);
    api.refused(None, Method::GET, "/v1/cluster", "", StatusCode::UNAUTHORIZED, "no credentials");
    api.refused(None, Method::GET, "/metrics", "", StatusCode::UNAUTHORIZED, "no credentials");
    api.refused(None, Method::POST, "/v1/switchover", switchover, StatusCode::UNAUTHORIZED, "no credentials");

    // Forged and malformed tokens.
    let forged = format!("mrd_{}_{}", &admin[4..16], "0".repeat(64));
    api.refused(Some(&forged), Method::POST, "/v1/switchover", switchover, StatusCode::UNAUTHORIZED, "not valid");
    api.refused(Some("hunter2"), Method::GET, "/v1/cluster", "", StatusCode::UNAUTHORIZED, "malformed");

    // A viewer reads but does not act.
    let viewer = token_of(&lab, &["--role", "viewer", "--note", "security test"]);
    assert_eq!(api.call(Some(&viewer), Method::GET, "/v1/cluster", None).0, StatusCode::OK);
    api.refused(Some(&viewer), Method::POST, "/v1/switchover", switchover, StatusCode::FORBIDDEN, "needs operator");
    api.refused(Some(&viewer), Method::GET, "/v1/tokens", "", StatusCode::FORBIDDEN, "needs admin");
    let out = lab.meridian(&["switchover", "--to", "ap-northeast-1a"]);
    assert!(out.status.success(), "the admin token of the lab may: {}", text(&out));

    // The first token of a cluster, straight into etcd with a client certificate.
    let lab_cert = lab.path().join("tls").join(meridian::lab::LAB_IDENTITY);
    let boot = lab.json(&["token", "create", "--role", "viewer", "--bootstrap", lab_cert.to_str().unwrap()]);
    let boot = boot["token"].as_str().unwrap().to_string();
    assert_eq!(api.call(Some(&boot), Method::GET, "/v1/cluster", None).0, StatusCode::OK);

    // A client certificate mapped to a role in [api] certificate_roles stands in for a token;
    // a cluster member's certificate has no role there.
    let as_cert = |id: &str, path: &str| {
        let identity = config.tls_identity(id);
        let tls = meridian::tls::client_config(&config.tls_ca_file(), Some(&identity)).unwrap();
        let (status, body) = api
            .rt
            .block_on(request(
                api.addr,
                Some(&Https { tls, token: None }),
                Method::GET,
                path,
                None,
                Duration::from_secs(10),
            ))
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(as_cert(meridian::lab::LAB_IDENTITY, "/v1/tokens").0, StatusCode::OK, "user:lab is the lab's admin");
    let node_id = format!("node-{}", config.node_names()[0]);
    let (status, body) = as_cert(&node_id, "/v1/cluster");
    assert!(status == StatusCode::UNAUTHORIZED && body.contains("has no role"), "{status} {body}");

    // An operator acts but does not make tokens.
    let operator = token_of(&lab, &["--role", "operator"]);
    api.refused(
        Some(&operator),
        Method::POST,
        "/v1/tokens",
        r#"{"role":"admin"}"#,
        StatusCode::FORBIDDEN,
        "needs admin",
    );

    // Revoked and expired tokens stop working at once.
    let id = &viewer[4..16];
    let out = lab.meridian(&["token", "revoke", id]);
    assert!(out.status.success(), "{}", text(&out));
    api.refused(Some(&viewer), Method::GET, "/v1/cluster", "", StatusCode::UNAUTHORIZED, "revoked");
    let short = token_of(&lab, &["--role", "viewer", "--expires", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = api.call(Some(&short), Method::GET, "/v1/cluster", None);
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "a token valid for 1s still worked after 10s");
        std::thread::sleep(Duration::from_millis(200));
    }
    api.refused(Some(&short), Method::GET, "/v1/cluster", "", StatusCode::UNAUTHORIZED, "expired");

    // Oversized and malformed bodies, and a role that does not exist.
    let huge = format!(r#"{{"to":"{}","timeout_ms":1}}"#, "x".repeat(100 * 1024));
    api.refused(Some(&admin), Method::POST, "/v1/switchover", &huge, StatusCode::PAYLOAD_TOO_LARGE, "over 64 KiB");
    let (status, _) = api.call(Some(&admin), Method::POST, "/v1/switchover", Some(b"{not json".to_vec()));
    assert!(status.is_client_error(), "malformed JSON: {status}");
    let (status, _) = api.call(Some(&admin), Method::POST, "/v1/tokens", Some(br#"{"role":"root"}"#.to_vec()));
    assert!(status.is_client_error(), "an unknown role: {status}");
    api.refused(
        Some(&admin),
        Method::POST,
        "/v1/tokens/nothex/revoke",
        "{}",
        StatusCode::BAD_REQUEST,
        "not a token id",
    );

    // The audit log has no call that changes it.
    let before = lab.json(&["audit"]).as_array().unwrap().len();
    for method in [Method::DELETE, Method::POST, Method::PUT] {
        let (status, _) = api.call(Some(&admin), method.clone(), "/v1/audit", Some(b"{}".to_vec()));
        assert!(!status.is_success(), "{method} /v1/audit answered {status}");
    }
    let audit = lab.json(&["audit"]);
    let entries = audit.as_array().unwrap();
    assert!(entries.len() >= before, "audit entries disappeared");
    let has = |action: &str, result: &str| {
        entries.iter().any(|e| e["action"] == action && e["result"].as_str().unwrap_or("").starts_with(result))
    };
    assert!(has("POST /v1/switchover", "ok"), "the switchover is audited: {audit}");
    assert!(has("POST /v1/switchover", "refused"), "the viewer's refused switchover is audited: {audit}");
    assert!(has("promote (switchover)", "ok"), "the promotion is audited by the agent: {audit}");
    assert!(has("token create --bootstrap", "ok"), "the bootstrap token is audited: {audit}");
    assert!(
        entries.iter().any(|e| e["target"] == format!("token:{id}") && e["result"] == "ok"),
        "the revocation is audited: {audit}"
    );
    assert!(!audit.to_string().contains(&admin[17..]), "no secret in the audit log");

    // Plain HTTP and a foreign CA get nothing, on the gateway and on an agent.
    let agent_api = config.nodes().next().unwrap().1.api;
    for addr in [api.addr, agent_api] {
        let answer = api.rt.block_on(async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        assert!(!answer.contains("200 OK"), "plain HTTP to {addr} was served: {answer}");
        let other = tempfile::tempdir().unwrap();
        meridian::ca::init(other.path(), "other", Duration::from_secs(3600)).unwrap();
        let foreign =
            Https { tls: meridian::tls::client_config(&other.path().join("ca.crt"), None).unwrap(), token: None };
        let err = api
            .rt
            .block_on(request(addr, Some(&foreign), Method::GET, "/healthz", None, Duration::from_secs(5)))
            .expect_err("a client of another CA must not trust the server");
        assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    }
    let (status, body) = api.call(None, Method::GET, "/healthz", None);
    assert_eq!(status, StatusCode::OK, "still serving: {body}");
    let agent = api.rt.block_on(request(
        agent_api,
        Some(&Https { tls: api.tls.clone(), token: None }),
        Method::GET,
        "/v1/member",
        None,
        Duration::from_secs(5),
    ));
    assert_eq!(agent.expect("the agent API over TLS").0, StatusCode::OK);

    // etcd: TLS only, and only with a client certificate from the cluster CA.
    let etcd: SocketAddr = config.etcd.endpoints[0].trim_start_matches("https://").parse().unwrap();
    let version = |tls: std::sync::Arc<rustls::ClientConfig>| {
        let https = Https { tls, token: None };
        api.rt.block_on(request(etcd, Some(&https), Method::GET, "/version", None, Duration::from_secs(5)))
    };
    let lab_id = config.tls_identity(meridian::lab::LAB_IDENTITY);
    let (status, body) = version(meridian::tls::client_config(&config.tls_ca_file(), Some(&lab_id)).unwrap())
        .expect("etcd with the lab's certificate");
    assert!(status.is_success() && String::from_utf8_lossy(&body).contains("etcdserver"), "{status}");
    assert!(version(api.tls.clone()).is_err(), "etcd without a client certificate must refuse");
    let other = tempfile::tempdir().unwrap();
    meridian::ca::init(&other.path().join("ca"), "other", Duration::from_secs(3600)).unwrap();
    let stranger = meridian::tls::Identity::new(other.path(), "user-x");
    meridian::ca::issue(
        &other.path().join("ca"),
        &stranger.dir,
        &config,
        &meridian::ca::Subject::User("x".into()),
        Duration::from_secs(3600),
    )
    .unwrap();
    let mut foreign = (*api.tls).clone();
    foreign.client_auth_cert_resolver = meridian::tls::Reloading::open(&stranger).unwrap();
    assert!(version(std::sync::Arc::new(foreign)).is_err(), "etcd with another CA's client certificate must refuse");
    let plain = api.rt.block_on(request(etcd, None, Method::GET, "/version", None, Duration::from_secs(5)));
    assert!(plain.is_err(), "plain HTTP to etcd must get no answer: {plain:?}");

    // Retention ([api] audit_retention) removes only what is older than its bound.
    let coord = api.rt.block_on(meridian::coord::Coord::connect(&config, &lab_id)).unwrap();
    let kept = lab.json(&["audit"]).as_array().unwrap().len();
    assert_eq!(api.rt.block_on(coord.trim_audit(1)).unwrap(), 0, "nothing is older than 1970");
    assert_eq!(lab.json(&["audit"]).as_array().unwrap().len(), kept);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(api.rt.block_on(coord.trim_audit(now_ms + 1)).unwrap() as usize >= kept);
    assert!(lab.json(&["audit"]).as_array().unwrap().is_empty());

    // A token file others can read is refused by the CLI.
    let loose = lab.path().join("loose.token");
    std::fs::write(&loose, format!("{admin}\n")).unwrap();
    let out = Command::new(BIN)
        .args(["--token-file", loose.to_str().unwrap(), "status"])
        .env("MERIDIAN_CONFIG", lab.config())
        .output()
        .unwrap();
    assert!(!out.status.success() && text(&out).contains("readable by others"), "{}", text(&out));
    lab.finish();
}

use std::process::Command;

/// psql with a connection string; its output or its error.
/// The network namespace psql runs in: on the netns lab, a node's host, so its
/// connections come from a cluster address as a standby's would (each test is
/// its own process under nextest).
static FROM_HOST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn psql(conninfo: &str, passfile: &std::path::Path, sql: &str) -> Result<String, String> {
    let mut cmd = match FROM_HOST.lock().unwrap().as_deref() {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "psql"]);
            c
        }
        None => Command::new("psql"),
    };
    let out = cmd
        .args(["-X", "-A", "-t", "-d", conninfo, "-c", sql])
        .env("PGPASSFILE", passfile)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
fn postgres_links_need_tls_and_a_cluster_certificate() {
    let mut lab = TestLab::up(102, &[]);
    let config = Config::load(&lab.config()).unwrap();
    let (_, primary) = config.nodes().next().unwrap();
    let (host, port) = (primary.address.ip().to_string(), primary.address.port());
    let other_node = config.nodes().nth(1).unwrap().1.name.clone();
    if lab.is_netns() {
        *FROM_HOST.lock().unwrap() = Some(format!("mlab{}-{other_node}", lab.net));
    }
    let tls = lab.path().join("tls");
    let ca = tls.join("ca").join("ca.crt");
    let cert = tls.join(format!("node-{other_node}"));
    // The replication password, as the standby's agent keeps it.
    let passfile = lab.path().join("nodes").join(&other_node).join("run").join("pgpass");
    let repl =
        |extra: &str| format!("host={host} port={port} user=replicator dbname=postgres replication=true {extra}");
    for refused in [
        "sslmode=disable: pg_hba.conf rejects replication connection",
        "sslmode=require: connection requires a valid client certificate",
    ] {
        let (mode, says) = refused.split_once(": ").unwrap();
        lab.expect_error(says);
        let err = psql(&repl(mode), &passfile, "IDENTIFY_SYSTEM").expect_err(refused);
        assert!(err.contains(says), "{refused}: {err}");
    }

    // A client certificate from another CA is refused; so is a server the client cannot verify.
    let other = tempfile::tempdir().unwrap();
    meridian::ca::init(&other.path().join("ca"), "other", Duration::from_secs(3600)).unwrap();
    meridian::ca::issue(
        &other.path().join("ca"),
        &other.path().join("leaf"),
        &config,
        &meridian::ca::Subject::Node(other_node.clone()),
        Duration::from_secs(3600),
    )
    .unwrap();
    let foreign = format!(
        "sslmode=require sslcert={} sslkey={}",
        other.path().join("leaf/tls.crt").display(),
        other.path().join("leaf/tls.key").display()
    );
    lab.expect_error("certificate verify failed");
    let err = psql(&repl(&foreign), &passfile, "IDENTIFY_SYSTEM").expect_err("a foreign client certificate");
    assert!(err.contains("certificate") || err.contains("unknown ca"), "{err}");
    let wrong_ca = format!("sslmode=verify-full sslrootcert={}", other.path().join("ca/ca.crt").display());
    let err = psql(&repl(&wrong_ca), &passfile, "IDENTIFY_SYSTEM").expect_err("a server from another CA");
    assert!(err.contains("certificate verify failed"), "{err}");

    // As the standbys connect: the server verified by address, the node's certificate presented.
    let ours = format!(
        "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        ca.display(),
        cert.join("tls.crt").display(),
        cert.join("tls.key").display()
    );
    let system = psql(&repl(&ours), &passfile, "IDENTIFY_SYSTEM").expect("replication as a standby does it");
    assert!(system.contains('|'), "{system}");
    let replicas = lab.psql_superuser(
        &primary.name,
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl AND s.client_dn LIKE '%CN=node:%'",
    );
    assert_eq!(replicas, "1", "the standby streams over TLS with its certificate");

    // The monitoring role, too, needs a certificate (gateways present theirs).
    let monitor_pass = lab.path().join("monitor.pgpass");
    let secrets: toml::Value =
        toml::from_str(&std::fs::read_to_string(lab.path().join("secrets.toml")).unwrap()).unwrap();
    meridian::ca::write_private(
        &monitor_pass,
        &format!("*:*:*:meridian:{}\n", secrets["monitor_password"].as_str().unwrap()),
    )
    .unwrap();
    let err = psql(
        &format!("host={host} port={port} user=meridian dbname=postgres sslmode=require"),
        &monitor_pass,
        "SELECT 1",
    )
    .expect_err("the monitor role without a certificate");
    assert!(err.contains("valid client certificate"), "{err}");
    lab.expect_error("pg_hba.conf rejects connection");
    let plain = format!("host={host} port={port} user=meridian dbname=postgres sslmode=disable");
    let err = psql(&plain, &monitor_pass, "SELECT 1").expect_err("the monitor role without TLS");
    assert!(err.contains("pg_hba.conf rejects"), "{err}");

    // The proxy: TLS required, and verifiable by the writer's DNS name against the cluster CA.
    let gw = config.regions[0].gateway.writer;
    let app_pass = lab.path().join("pgpass");
    let zone = config.dns.zone.trim_end_matches('.');
    let err = psql(
        &format!("host={} port={} user=app dbname=app sslmode=disable", gw.ip(), gw.port()),
        &app_pass,
        "SELECT 1",
    )
    .expect_err("plain text to the proxy");
    assert!(err.contains("requires TLS"), "{err}");
    let verified = format!(
        "host=writer.{zone} hostaddr={} port={} user=app dbname=app sslmode=verify-full sslrootcert={}",
        gw.ip(),
        gw.port(),
        ca.display()
    );
    assert_eq!(psql(&verified, &app_pass, "SELECT 42").unwrap(), "42");
    let wrong = format!(
        "host={} port={} user=app dbname=app sslmode=verify-full sslrootcert={}",
        gw.ip(),
        gw.port(),
        other.path().join("ca/ca.crt").display()
    );
    let err = psql(&wrong, &app_pass, "SELECT 1").expect_err("the proxy verified against another CA");
    assert!(err.contains("certificate verify failed"), "{err}");

    // An oversized or malformed startup packet to the proxy: refused, and the proxy serves on.
    for garbage in [&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0][..], b"GET / HTTP/1.1\r\n\r\n"] {
        let mut s = std::net::TcpStream::connect(gw).unwrap();
        std::io::Write::write_all(&mut s, garbage).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut buf);
        assert!(buf.len() < 1024, "the proxy answered garbage with {} bytes", buf.len());
    }
    assert_eq!(psql(&verified, &app_pass, "SELECT 7").unwrap(), "7");

    the_proxy_logs_clients_in_and_speaks_tls_to_postgres(&mut lab, &config, &verified, &primary.name);

    // An application cannot log in to a node without TLS, from anywhere.
    lab.expect_error("no pg_hba.conf entry");
    let plain_app = format!("host={host} port={port} user=app dbname=app sslmode=disable");
    let err = psql(&plain_app, &app_pass, "SELECT 1").expect_err("an application login without TLS");
    assert!(err.contains("no pg_hba.conf entry"), "{err}");

    // After all that the cluster serves and replicates.
    let out = lab.meridian(&["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.finish();
}

/// The proxy is the SCRAM server of its clients and their SCRAM client at
/// PostgreSQL, over TLS on both legs: what PostgreSQL would refuse, it refuses.
fn the_proxy_logs_clients_in_and_speaks_tls_to_postgres(
    lab: &mut TestLab,
    config: &Config,
    verified: &str,
    primary: &str,
) {
    let app_pass = lab.path().join("pgpass");
    // channel_binding=require: the client's exchange is bound to the proxy's certificate.
    let bound = format!("{verified} channel_binding=require");
    let leg = psql(&bound, &app_pass, "SELECT ssl, client_dn IS NULL FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert_eq!(leg.unwrap(), "t|t", "the proxy's leg to PostgreSQL is TLS, and presents no certificate of its own");
    let reader = config.regions[0].gateway.reader;
    let to_reader = verified
        .replace(&format!("port={}", config.regions[0].gateway.writer.port()), &format!("port={}", reader.port()));
    assert_eq!(psql(&to_reader, &app_pass, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").unwrap(), "t");

    lab.psql_superuser(
        primary,
        "CREATE ROLE expired LOGIN PASSWORD 'pw-expired' VALID UNTIL '2000-01-01';
         CREATE ROLE boss SUPERUSER LOGIN PASSWORD 'pw-boss';
         CREATE ROLE nologin PASSWORD 'pw-nologin';
         SET password_encryption = 'md5'; CREATE ROLE legacy LOGIN PASSWORD 'pw-legacy'; RESET password_encryption;
         CREATE ROLE fresh LOGIN PASSWORD 'pw-fresh';",
    );
    let secrets: toml::Value =
        toml::from_str(&std::fs::read_to_string(lab.path().join("secrets.toml")).unwrap()).unwrap();
    let mut logins = vec![
        ("app", "not-the-password".to_string()),
        ("nobody", "pw".to_string()),
        ("expired", "pw-expired".to_string()),
        ("boss", "pw-boss".to_string()),
        ("nologin", "pw-nologin".to_string()),
        ("legacy", "pw-legacy".to_string()),
        ("postgres", "pw".to_string()),
    ];
    for (role, key) in
        [("meridian", "monitor_password"), ("meridian_auth", "auth_password"), ("replicator", "replication_password")]
    {
        logins.push((role, secrets[key].as_str().unwrap().to_string()));
    }
    let passfile = lab.path().join("roles.pgpass");
    let as_role = |role: &str, password: &str| {
        meridian::ca::write_private(&passfile, &format!("*:*:*:{role}:{password}\n")).unwrap();
        psql(
            &verified.replace("user=app dbname=app", &format!("user={role} dbname=app")),
            &passfile,
            "SELECT current_user",
        )
    };
    for (role, password) in &logins {
        let err = as_role(role, password).expect_err(role);
        assert!(err.contains(&format!("password authentication failed for user \"{role}\"")), "{role}: {err}");
    }
    let failed = https_metrics(lab, config)
        .lines()
        .find(|l| l.starts_with("meridian_proxy_login_failed_total") && l.contains("port=\"writer\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("a login_failed counter for the writer port");
    assert!(failed >= logins.len() as u64, "{failed} refusals counted, {} made", logins.len());

    // A role that may: logged in; a new password counts at the next login.
    assert_eq!(as_role("fresh", "pw-fresh").unwrap(), "fresh");
    lab.psql_superuser(primary, "ALTER ROLE fresh PASSWORD 'pw-fresh-2'");
    assert!(as_role("fresh", "pw-fresh").is_err(), "the old password after a change");
    assert_eq!(as_role("fresh", "pw-fresh-2").unwrap(), "fresh");

    // What PostgreSQL refuses after the login reaches the client as it said it.
    lab.expect_error("database \"nosuchdb\" does not exist");
    let err =
        psql(&verified.replace("dbname=app", "dbname=nosuchdb"), &app_pass, "SELECT 1").expect_err("no such database");
    assert!(err.contains("database \"nosuchdb\" does not exist"), "{err}");
    let err = psql(&format!("{verified} replication=database"), &app_pass, "IDENTIFY_SYSTEM").expect_err("replication");
    assert!(err.contains("does not carry replication"), "{err}");
}

/// `ca rotate` renews every certificate with new keys, every process presents
/// its new one without a restart, and clients connecting all along (new TLS
/// handshakes through the proxy, replication) never fail.
#[test]
fn rotating_every_certificate_needs_no_restart_and_loses_no_connection() {
    let lab = TestLab::up(103, &[]);
    let config = Config::load(&lab.config()).unwrap();
    let gw = config.regions[0].gateway.writer;
    let app_pass = lab.path().join("pgpass");
    let ca = lab.path().join("tls/ca/ca.crt");
    let conninfo = format!(
        "host={} port={} user=app dbname=app sslmode=verify-full sslrootcert={}",
        gw.ip(),
        gw.port(),
        ca.display()
    );
    psql(&conninfo, &app_pass, "CREATE TABLE rotation (id serial PRIMARY KEY, at timestamptz DEFAULT now())").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, conninfo, app_pass) = (stop.clone(), conninfo.clone(), app_pass.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match psql(&conninfo, &app_pass, "INSERT INTO rotation DEFAULT VALUES") {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    let pids_before = pids(&lab, &config);

    let out = lab.meridian(&[
        "ca",
        "rotate",
        "--ca",
        lab.path().join("tls/ca").to_str().unwrap(),
        "--valid",
        "20d",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listeners = report["listeners"].as_array().unwrap();
    assert!(listeners.len() >= 10, "{report}");
    for l in listeners {
        assert_eq!(l["result"], "new", "{l}");
    }
    assert!(listeners.iter().any(|l| l["listener"] == "PostgreSQL"), "{report}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = writer.join().unwrap();
    assert!(ok > 5 && failed.is_empty(), "{ok} inserts, failures during the rotation: {failed:#?}");

    // Nothing restarted; everything still serves with the new certificates.
    assert_eq!(pids_before, pids(&lab, &config), "a process or a postmaster was restarted");
    // Agents and gateways make their etcd clients anew with their renewed certificates.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let logs: Vec<_> = std::fs::read_dir(lab.path().join("logs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().unwrap().to_string_lossy().starts_with("agent-")
                    || p.file_name().unwrap().to_string_lossy().starts_with("gateway-")
            })
            .collect();
        let pending: Vec<_> = logs
            .iter()
            .filter(|p| {
                !std::fs::read_to_string(p).unwrap().contains("etcd clients now present the renewed certificate")
            })
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still on the old etcd client certificate after 40 s: {pending:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = lab.meridian(&["verify"]);
    assert!(out.status.success(), "replication over the renewed certificates: {}", text(&out));
    let status = lab.meridian(&["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("WARNING: the certificate of node") && shown.contains("expires in 20 days"), "{shown}");
    let health = lab.json(&["health"]);
    let certs = health["certificates"].as_array().unwrap();
    assert!(certs.len() > config.node_names().len(), "every node's and the gateway's: {health}");
    let subject = |c: &&serde_json::Value| c["subject"].as_str().unwrap_or("").to_string();
    // The etcd members' are looked at once a minute: present, renewed or not yet.
    assert!(certs.iter().any(|c| subject(&c).starts_with("etcd:")), "{health}");
    let ours = certs.iter().filter(|c| !subject(c).starts_with("etcd:"));
    assert!(ours.clone().count() > config.node_names().len());
    assert!(ours.into_iter().all(|c| c["warning"].as_str().is_some_and(|w| w.contains("20 days"))), "{health}");
    let metrics = https_metrics(&lab, &config);
    assert!(metrics.contains("meridian_node_certificate_expiry_timestamp_seconds{node="), "{metrics}");
    assert!(metrics.contains("meridian_gateway_certificate_expiry_timestamp_seconds{region="), "{metrics}");
    assert!(metrics.contains("meridian_etcd_certificate_expiry_timestamp_seconds{member="), "{metrics}");
    lab.finish();
}

/// Every lab process's pid and every postmaster's, sorted.
fn pids(lab: &TestLab, config: &Config) -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir(lab.path().join("pids"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap().trim().to_string())
        .collect();
    for (_, n) in config.nodes() {
        let pm = std::fs::read_to_string(n.data_dir.join("postmaster.pid")).expect("a running postmaster");
        all.push(pm.lines().next().unwrap().to_string());
    }
    all.sort();
    all
}

/// The first gateway's /metrics, with the lab's admin token.
fn https_metrics(lab: &TestLab, config: &Config) -> String {
    let https = Https::for_cli(config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = config.regions[0].gateway.api;
    let (status, body) =
        rt.block_on(request(addr, Some(&https), Method::GET, "/metrics", None, Duration::from_secs(10))).unwrap();
    assert!(lab.path().exists() && status.is_success(), "{status}");
    String::from_utf8_lossy(&body).into_owned()
}
