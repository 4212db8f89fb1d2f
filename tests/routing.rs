//! Traffic steering against real labs: DNS answers with the real `dig`, the
//! proxy with the real `psql`, health checks through `meridian health`, and
//! the trigger-object DR switch on the filesystem and on moto's S3 server.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const PRIMARY: &str = "ap-south-1a";

fn ip_of(lab: &TestLab, node: &str) -> String {
    lab.node_addr(node).0
}

fn soa_serial(lab: &TestLab, region: &str) -> u64 {
    let soa = lab.dig_raw(region, "", &["+short", "SOA"]);
    // "ns-... hostmaster... SERIAL refresh retry expire minimum"
    soa.split_whitespace().nth(2).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no SOA serial in {soa:?}"))
}

/// Where a session through `region`'s `port` lands: (in recovery, server address).
fn landing(lab: &TestLab, region: &str, port: &str) -> Result<(bool, String), String> {
    let out = lab.try_psql_via(region, port, "SELECT pg_is_in_recovery(), host(inet_server_addr())")?;
    let (recovery, addr) = out.split_once('|').ok_or_else(|| format!("unexpected output {out:?}"))?;
    Ok((recovery == "t", addr.to_string()))
}

/// Waits until `region`'s gateway answers `name` with exactly `want`.
fn wait_for_answer(lab: &TestLab, region: &str, name: &str, want: &str, timeout: Duration) {
    wait_until(&format!("{name}.<zone> from {region}'s gateway to answer {want}"), timeout, || {
        let a = lab.dig(region, name);
        if a == [want.to_string()] {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    });
}

const REGIONS: [&str; 3] = ["ap-south-1", "ap-northeast-1", "witness"];

#[test]
fn dns_and_proxy_follow_a_failover() {
    let mut lab = TestLab::up(80, &["--nodes-per-region", "2"]);
    lab.expect_error("terminating connection due to unexpected postmaster exit");
    let primary = ip_of(&lab, PRIMARY);
    for region in REGIONS {
        wait_for_answer(&lab, region, "writer", &primary, Duration::from_secs(10));
        assert_eq!(lab.dig(region, "reader.ap-south-1"), [ip_of(&lab, "ap-south-1b")]);
        assert_eq!(lab.dig(region, "reader.ap-northeast-1").len(), 2, "both standbys of the region");
        assert_eq!(lab.dig(region, "reader.witness"), std::slice::from_ref(&primary), "no standby there: the primary");
        let (recovery, addr) = landing(&lab, region, "writer").unwrap();
        assert!(!recovery && addr == primary, "writer port of {region} landed on {addr} (recovery {recovery})");
    }
    for region in ["ap-south-1", "ap-northeast-1"] {
        wait_until(&format!("the reader port of {region} to use a standby"), Duration::from_secs(10), || {
            let standbys: Vec<String> =
                ["a", "b"].iter().map(|k| ip_of(&lab, &format!("{region}{k}"))).filter(|ip| *ip != primary).collect();
            match landing(&lab, region, "reader")? {
                (true, addr) if standbys.contains(&addr) => Ok(()),
                other => Err(format!("{other:?} (standbys {standbys:?})")),
            }
        });
    }
    // Names outside the zone are refused, unknown ones do not exist.
    assert!(lab.dig_raw("witness", "nope", &[]).contains("status: NXDOMAIN"));
    assert!(lab.dig_raw("witness", "writer", &[]).contains("flags: qr aa"), "answers are authoritative");
    let serial_before = soa_serial(&lab, "witness");

    // Health: every gateway observes every check.
    let health = wait_until("every observer to report", Duration::from_secs(15), || {
        let h = lab.json(&["health"]);
        let checks = h["checks"].as_array().cloned().unwrap_or_default();
        let all =
            checks.iter().all(|c| c["healthy"] == true && c["observers"].as_array().is_some_and(|o| o.len() == 3));
        if all && checks.len() == 5 {
            Ok(h)
        } else {
            Err(h.to_string())
        }
    });
    assert_eq!(health["healthy_share"], 0.18);

    let out = lab.run_lab(&["kill", "ap-south-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let new_primary = ip_of(&lab, "ap-south-1b");
    wait_until("status to show ap-south-1b as primary", Duration::from_secs(20), || {
        let s = lab.try_status()?;
        if s["primary"] == "ap-south-1b" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    // DNS follows etcd, not a timer: by the time status shows the new primary
    // (which needs its first report as primary), every gateway answers it.
    let since = Instant::now();
    for region in REGIONS {
        wait_for_answer(&lab, region, "writer", &new_primary, Duration::from_secs(2));
    }
    eprintln!("DNS caught up {:?} after status showed the new primary", since.elapsed());
    assert!(soa_serial(&lab, "witness") > serial_before, "the SOA serial must grow when an answer changes");
    for region in REGIONS {
        // The killed region's gateway is still up; every writer port now lands on ap-south-1b.
        let (recovery, addr) =
            wait_until(&format!("{region}'s writer port"), Duration::from_secs(10), || landing(&lab, region, "writer"));
        assert!(!recovery && addr == new_primary, "{region}'s writer port landed on {addr}");
    }
    lab.finish();
}

#[test]
fn switchover_holds_new_writer_connections() {
    let lab = TestLab::up(81, &["--nodes-per-region", "2"]);
    lab.try_psql_via("ap-northeast-1", "writer", "CREATE TABLE acks (id int PRIMARY KEY)").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, acks) = (stop.clone(), acks.clone());
        let (host, port) = lab.gateway_addr("ap-northeast-1", "writer");
        let passfile = lab.path().join("pgpass");
        std::thread::spawn(move || {
            let (mut acked, mut failures) = (Vec::new(), Vec::new());
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let out = Command::new("psql")
                    .args(["-X", "-A", "-t", "-h", &host, "-p", &port.to_string(), "-U", "app", "-d", "app"])
                    .args(["-c", &format!("INSERT INTO acks VALUES ({id})")])
                    .env("PGPASSFILE", &passfile)
                    .env("PGCONNECT_TIMEOUT", "30")
                    .output()
                    .unwrap();
                if out.status.success() {
                    acked.push(id);
                    acks.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
                }
            }
            (acked, failures)
        })
    };
    let acked_by = |n: usize, what: &str| {
        wait_until(what, Duration::from_secs(20), || {
            let a = acks.load(Ordering::SeqCst);
            if a >= n {
                Ok(a)
            } else {
                Err(format!("{a} acknowledged"))
            }
        })
    };
    acked_by(3, "the writer to have inserts acknowledged before the switchover");
    let out = lab.meridian(&["switchover", "--to", "ap-south-1b"]);
    assert!(out.status.success(), "{}", text(&out));
    let at_switch = acks.load(Ordering::SeqCst);
    acked_by(at_switch + 5, "the writer to have inserts acknowledged by the new primary");
    stop.store(true, Ordering::Relaxed);
    let (acked, failures) = writer.join().unwrap();
    eprintln!("{} inserts acknowledged, {} failed: {failures:?}", acked.len(), failures.len());
    // A session already open on the old primary when it stops is cut; a new
    // connection waits for the new primary instead of being refused.
    for f in &failures {
        assert!(!f.contains("meridian writer") && !f.contains("Connection refused"), "a new connection failed: {f}");
    }
    assert!(failures.len() <= 2, "more than the in-flight sessions failed: {failures:?}");
    // 3 before the switchover and 5 after, awaited above (a count over the
    // whole run shrank as the switchover got faster: it measured its length).
    assert!(acked.len() >= 8, "the writer made little progress: {} acks", acked.len());
    // Nothing acknowledged is missing on the new primary.
    let count = lab.psql("ap-south-1b", "SELECT count(*) FROM acks");
    assert_eq!(count, acked.len().to_string(), "acknowledged inserts on the new primary (failures: {failures:?})");
    let (recovery, addr) = landing(&lab, "ap-northeast-1", "writer").unwrap();
    assert!(!recovery && addr == ip_of(&lab, "ap-south-1b"));
    lab.finish();
}

#[test]
fn trigger_file_switches_dns_and_the_primary() {
    let lab = TestLab::up(82, &["--dr-trigger-region", "ap-northeast-1"]);
    let (first, _) = lab.gateway_addr("ap-south-1", "writer");
    let (second, _) = lab.gateway_addr("ap-northeast-1", "writer");
    wait_for_answer(&lab, "witness", "app", &first, Duration::from_secs(15));
    std::fs::write(lab.path().join("dr/trigger"), "disaster declared by the test\n").unwrap();
    wait_for_answer(&lab, "witness", "app", &second, Duration::from_secs(15));
    wait_until("ap-northeast-1a to be primary", Duration::from_secs(30), || {
        let s = lab.try_status()?;
        if s["primary"] == "ap-northeast-1a" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let history = lab.json(&["history"]);
    let last = history.as_array().and_then(|a| a.last()).cloned().unwrap();
    assert_eq!(last["kind"], "dr", "{last}");
    let (recovery, addr) = wait_until("the writer port to land on the new primary", Duration::from_secs(10), || {
        landing(&lab, "witness", "writer")
    });
    assert!(!recovery && addr == ip_of(&lab, "ap-northeast-1a"));
    // The same upload never acts twice: once every gateway has looked at the
    // object again after the switch (its dr-trigger check re-probed), the
    // epoch is where the switch left it.
    let epoch = lab.status()["epoch"].as_u64().unwrap();
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 1000;
    wait_until("every gateway to probe the trigger object again", Duration::from_secs(15), || {
        let h = lab.json(&["health"]);
        let check = h["checks"].as_array().unwrap().iter().find(|c| c["name"] == "dr-trigger").cloned();
        let observers = check.as_ref().and_then(|c| c["observers"].as_array().cloned()).unwrap_or_default();
        let fresh = observers.iter().filter(|o| o["at_ms"].as_u64().is_some_and(|t| t > after)).count();
        if fresh == 3 {
            Ok(())
        } else {
            Err(format!("{fresh} of 3 observers probed since: {check:?}"))
        }
    });
    assert_eq!(lab.status()["epoch"].as_u64().unwrap(), epoch);
    lab.finish();
}

/// moto's S3 server on a free loopback port, stopped by pid when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    /// A free port, then the endpoint moto will serve on `host` (start it with `start`).
    fn endpoint(host: &str) -> String {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        format!("http://{host}:{port}")
    }

    fn start(endpoint: &str) -> Moto {
        let (host, port) = endpoint.trim_start_matches("http://").rsplit_once(':').unwrap();
        let child = Command::new(PYTHON)
            .args(["-m", "moto.server", "-H", host, "-p", port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto (scripts/setup installs it)");
        let moto = Moto { child, endpoint: endpoint.to_string() };
        let addr = format!("{host}:{port}");
        wait_until("moto to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).map(|_| ()).map_err(|e| e.to_string())
        });
        moto
    }

    /// Runs a boto3 snippet against the server (`s3` is the client).
    fn s3(&self, code: &str) {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}",
            self.endpoint
        );
        let out = Command::new(PYTHON).args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "boto3: {}", text(&out));
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn trigger_object_on_s3_switches_dns_both_ways() {
    // Isolated hosts reach this machine only on the observer link, which `lab up`
    // makes: there moto starts after the lab (until then the gateways' probe fails,
    // which the inverted check reads as "no trigger").
    let net = 83;
    let host = if netns_requested() { format!("10.{net}.0.1") } else { "127.0.0.1".into() };
    let endpoint = Moto::endpoint(&host);
    let env = [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];
    let lab =
        TestLab::up_with_env(net, &["--trigger-object", "s3://meridian-dr/trigger", "--s3-endpoint", &endpoint], &env);
    let moto = Moto::start(&endpoint);
    moto.s3("s3.create_bucket(Bucket='meridian-dr')");
    let (first, _) = lab.gateway_addr("ap-south-1", "writer");
    let (second, _) = lab.gateway_addr("ap-northeast-1", "writer");
    let answers = |want: &str| wait_for_answer(&lab, "ap-northeast-1", "app", want, Duration::from_secs(15));
    answers(&first);
    moto.s3("s3.put_object(Bucket='meridian-dr', Key='trigger', Body=b'failover')");
    answers(&second);
    let h = lab.json(&["health"]);
    let check = h["checks"].as_array().unwrap().iter().find(|c| c["name"] == "dr-trigger").unwrap().clone();
    assert_eq!(check["healthy"], false, "{check}");
    assert!(check["observers"][0]["detail"].as_str().unwrap().contains("exists"), "{check}");
    // Without failover.dr_trigger only DNS moves; the primary stays.
    assert_eq!(lab.status()["primary"], "ap-south-1a");
    moto.s3("s3.delete_object(Bucket='meridian-dr', Key='trigger')");
    answers(&first);
    lab.finish();
}

#[test]
fn a_gateway_without_etcd_refuses_writer_connections() {
    let lab = TestLab::up(84, &[]);
    let (recovery, _) = landing(&lab, "ap-south-1", "writer").unwrap();
    assert!(!recovery);
    // Two of three etcd members gone: no quorum anywhere.
    for member in ["etcd:ap-northeast-1", "etcd:witness"] {
        let out = lab.run_lab(&["kill", member]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let refusal = wait_until("the writer port to refuse", Duration::from_secs(15), || {
        match landing(&lab, "ap-south-1", "writer") {
            Err(e) if e.contains("cannot see etcd") => Ok(e),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(refusal.contains("refusing rather than guessing"), "{refusal}");
    // DNS re-judges staleness every 250 ms.
    wait_until("DNS to answer SERVFAIL for writer", Duration::from_secs(2), || {
        let out = lab.dig_raw("ap-south-1", "writer", &[]);
        if out.contains("status: SERVFAIL") {
            Ok(())
        } else {
            Err(out)
        }
    });
    // Reads still work on a known standby.
    let (recovery, addr) = landing(&lab, "ap-northeast-1", "reader").unwrap();
    assert!(recovery && addr == ip_of(&lab, "ap-northeast-1a"), "reader landed on {addr}");
    for member in ["etcd:ap-northeast-1", "etcd:witness"] {
        let out = lab.run_lab(&["start", member]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let (recovery, _) =
        wait_until("writes through the proxy again", Duration::from_secs(30), || landing(&lab, "ap-south-1", "writer"));
    assert!(!recovery);
    lab.finish();
}
