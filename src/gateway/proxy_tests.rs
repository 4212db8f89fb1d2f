//! The proxy in-process, against fake backends, with tokio's clock paused:
//! a routing change is tested in milliseconds, without a lab. Each fake
//! backend answers a startup packet with its name's first byte, then echoes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::proxy::{Port, Proxy};
use super::routing::tests::member;
use super::view::View;
use crate::cluster::{Leader, Role, SwitchoverRequest};
use crate::config::Config;
use crate::coord::{LeaderEntry, Snapshot};
use crate::lab::topology::{lab_config, LabShape};

const A: &str = "ap-south-1a";
const B: &str = "ap-south-1b";

/// A backend that says who it is once it has the startup packet, then echoes.
async fn fake_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut rest = vec![0u8; i32::from_be_bytes(len) as usize - 4];
                if s.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let _ = s.write_all(&name.as_bytes()[name.len() - 1..]).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The lab's shape with nodes A and B on fake backends.
async fn config() -> Config {
    let shape = LabShape { nodes_per_region: 2, ..LabShape::default() };
    let mut config = lab_config(&shape, std::path::Path::new("/tmp/proxy-test"));
    for region in &mut config.regions {
        for node in &mut region.nodes {
            if node.name == A {
                node.address = fake_backend("a").await;
            } else if node.name == B {
                node.address = fake_backend("b").await;
            }
        }
    }
    config.proxy.leader_wait = Duration::from_secs(30);
    config
}

/// `leader` holds epoch `epoch` and reports primary; the other is a standby with `lag` bytes.
fn led_by(leader: &str, epoch: u64, lag: u64) -> Snapshot {
    let other = if leader == A { B } else { A };
    let mut primary = member(leader, "ap-south-1", Role::Primary, 0);
    primary.epoch_seen = epoch;
    Snapshot {
        epoch,
        leader: Some(LeaderEntry { leader: Leader { node: leader.into(), epoch }, lease: 1 }),
        members: vec![primary, member(other, "ap-south-1", Role::Replica, lag)],
        ..Snapshot::default()
    }
}

fn view(config: &Config, snap: Snapshot) -> View {
    View {
        snapshot: Arc::new(snap),
        read_at: Some(tokio::time::Instant::now()),
        config: Arc::new(config.clone()),
        config_version: 0,
    }
}

/// A proxy port serving in this runtime; its address.
async fn serve(port: Port, views: watch::Receiver<View>, stop: &CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Arc::new(Proxy::new("ap-south-1".into(), port, views, None));
    tokio::spawn(proxy.serve(listener, stop.clone()));
    addr
}

/// Connects as a client and sends a startup packet.
async fn connect(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let body = b"user\0app\0database\0app\0\0";
    let mut packet = ((body.len() + 8) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&196608i32.to_be_bytes());
    packet.extend_from_slice(body);
    s.write_all(&packet).await.unwrap();
    s
}

/// Where the connection landed: "a", "b", or the proxy's error message.
async fn landed(s: &mut TcpStream) -> String {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    if first[0] != b'E' {
        return String::from_utf8_lossy(&first).into_owned();
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    format!("error: {}", String::from_utf8_lossy(&rest))
}

#[tokio::test(start_paused = true)]
async fn the_writer_follows_the_leader_and_cuts_sessions_to_the_old_one() {
    let config = config().await;
    let (tx, rx) = watch::channel(view(&config, led_by(A, 2, 0)));
    let stop = CancellationToken::new();
    let proxy = serve(Port::Writer, rx, &stop).await;
    let mut old = connect(proxy).await;
    assert_eq!(landed(&mut old).await, "a");
    old.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    old.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping", "relayed both ways");

    tx.send_replace(view(&config, led_by(B, 3, 0)));
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(1), old.read_to_end(&mut rest)).await;
    assert!(matches!(cut, Ok(Ok(0))), "the session to the old leader is cut: {cut:?}");
    let mut new = connect(proxy).await;
    assert_eq!(landed(&mut new).await, "b");
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_switchover_holds_new_connections_until_the_new_primary_runs() {
    let config = config().await;
    let mut during = led_by(A, 2, 0);
    during.switchover = Some(SwitchoverRequest {
        from: A.into(),
        to: B.into(),
        requested_by: "test".into(),
        requested_at_ms: 0,
        timeout_ms: 10_000,
        final_lsn: None,
        aborted: None,
    });
    // The old primary has checkpointed and says it no longer takes writes.
    during.members[0].role = Role::Starting;
    let (tx, rx) = watch::channel(view(&config, during.clone()));
    let stop = CancellationToken::new();
    let proxy = serve(Port::Writer, rx, &stop).await;
    let started = tokio::time::Instant::now();
    let waiting = tokio::spawn(async move {
        let mut s = connect(proxy).await;
        landed(&mut s).await
    });
    // Five seconds into the switchover (views kept fresh), still waiting.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(1)).await;
        tx.send_replace(view(&config, during.clone()));
    }
    assert!(!waiting.is_finished(), "a new connection waits while a switchover is in progress");
    tx.send_replace(view(&config, led_by(B, 3, 0)));
    assert_eq!(waiting.await.unwrap(), "b", "and lands on the new primary once it runs");
    assert!(started.elapsed() < config.proxy.leader_wait);

    // A switchover that never ends: refused at leader_wait, saying why.
    tx.send_replace(view(&config, during.clone()));
    let mut s = connect(proxy).await;
    let keep_fresh = {
        let tx = tx.clone();
        let config = config.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                tx.send_replace(view(&config, during.clone()));
            }
        })
    };
    let t0 = tokio::time::Instant::now();
    let refusal = landed(&mut s).await;
    keep_fresh.abort();
    assert!(refusal.contains("a switchover from ap-south-1a to ap-south-1b is in progress"), "{refusal}");
    let waited = t0.elapsed();
    assert!(
        waited >= config.proxy.leader_wait && waited < config.proxy.leader_wait + Duration::from_secs(1),
        "{waited:?}"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_view_older_than_half_the_lease_refuses_writers_but_not_readers() {
    let config = config().await;
    let (_tx, rx) = watch::channel(view(&config, led_by(A, 2, 0)));
    let stop = CancellationToken::new();
    let writer = serve(Port::Writer, rx.clone(), &stop).await;
    let reader = serve(Port::Reader, rx, &stop).await;
    let mut s = connect(writer).await;
    assert_eq!(landed(&mut s).await, "a");
    // etcd stops answering: the view is not refreshed.
    tokio::time::advance(config.failover.lease_ttl / 2 + Duration::from_millis(1)).await;
    let mut s = connect(writer).await;
    let refusal = landed(&mut s).await;
    assert!(refusal.contains("cannot see etcd"), "{refusal}");
    let mut r = connect(reader).await;
    assert_eq!(landed(&mut r).await, "b", "reads still go to the last known standby");
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn readers_use_a_standby_within_the_lag_budget_else_the_primary() {
    let config = config().await;
    let within = 1;
    let (tx, rx) = watch::channel(view(&config, led_by(A, 2, within)));
    let stop = CancellationToken::new();
    let reader = serve(Port::Reader, rx, &stop).await;
    let mut s = connect(reader).await;
    assert_eq!(landed(&mut s).await, "b");
    let crate::config::LagBudget::Bytes(max) = config.proxy.max_reader_lag else { panic!("a byte budget") };
    tx.send_replace(view(&config, led_by(A, 2, max + 1)));
    let mut s = connect(reader).await;
    assert_eq!(landed(&mut s).await, "a", "a standby beyond the budget is skipped");
    stop.cancel();
}

#[tokio::test]
async fn a_gateway_says_it_holds_only_while_a_switchover_leaves_no_writer() {
    let mut config = config().await;
    config.proxy.pool_mode = crate::config::PoolMode::Transaction;
    let mut snap = led_by(A, 2, 0);
    assert_eq!(super::presence::holding_for(&view(&config, snap.clone())), None, "no switchover");
    snap.switchover = Some(SwitchoverRequest {
        from: A.into(),
        to: B.into(),
        requested_by: "test".into(),
        requested_at_ms: 77,
        timeout_ms: 10_000,
        final_lsn: None,
        aborted: None,
    });
    assert_eq!(
        super::presence::holding_for(&view(&config, snap.clone())),
        None,
        "the old primary still takes writes while it checkpoints"
    );
    let mut sessions = config.clone();
    sessions.proxy.pool_mode = crate::config::PoolMode::Session;
    assert_eq!(super::presence::holding_for(&view(&sessions, snap.clone())), Some(77), "new sessions wait at once");
    snap.members[0].role = Role::Starting;
    assert_eq!(super::presence::holding_for(&view(&config, snap.clone())), Some(77));
    snap.switchover.as_mut().unwrap().aborted = Some("late".into());
    assert_eq!(super::presence::holding_for(&view(&config, snap)), None, "an aborted request is not held for");
}

#[tokio::test(start_paused = true)]
async fn pooled_readers_on_the_primary_take_no_new_transaction_there_once_the_view_is_stale() {
    let config = config().await;
    let mut snap = led_by(A, 2, 0);
    snap.members[1].healthy = false; // no usable standby: reads fall back to the primary
    let (_tx, rx) = watch::channel(view(&config, snap));
    let proxy = Proxy::new("ap-south-1".into(), Port::Reader, rx, None);
    let address = |n: &str| config.node(n).unwrap().1.address;
    let primary = super::routing::Backend { node: A.into(), address: address(A), epoch: Some(2) };
    let standby = super::routing::Backend { node: B.into(), address: address(B), epoch: None };
    assert!(proxy.serves_new_transactions(&primary), "fresh view, no standby: the primary serves reads");
    assert!(!proxy.serves_new_transactions(&standby), "an unhealthy standby does not");
    // etcd stops answering: this view could miss a switchover of A.
    tokio::time::advance(config.failover.lease_ttl / 2 + Duration::from_millis(1)).await;
    assert!(!proxy.serves_new_transactions(&primary), "a stale view must not lend the primary's connections");
    assert!(!proxy.serves_new_transactions(&standby), "nor a standby the last view called unhealthy");

    let (_tx, rx) = watch::channel(view(&config, led_by(A, 2, 0)));
    let proxy = Proxy::new("ap-south-1".into(), Port::Reader, rx, None);
    tokio::time::advance(config.failover.lease_ttl / 2 + Duration::from_millis(1)).await;
    assert!(proxy.serves_new_transactions(&standby), "a stale view still lends the last known standby");
    assert!(!proxy.serves_new_transactions(&primary));
}
