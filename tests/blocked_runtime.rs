//! The lease keeper and the fencing feeder run on threads of their own: an
//! agent runtime whose workers are all blocked neither lets a healthy lease
//! lapse (fencing a primary for nothing) nor delays the fence once renewals
//! stop. Real etcd, the real supervisor binary, a stand-in for the postmaster.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use meridian::agent::lease::LeaseKeeper;
use meridian::agent::watchdog::Watchdog;
use meridian::postgres::supervisor::FENCED_EXIT;
use tokio_util::sync::CancellationToken;

/// This test's own loopback range (see tests/common: every test has its net).
const ADDR: &str = "127.97.0.1";
const TTL: Duration = Duration::from_secs(3);

/// One etcd member, stopped by pid when dropped, even if the test fails.
struct Etcd {
    child: Child,
    dir: PathBuf,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!("meridian-blocked-runtime-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (format!("http://{ADDR}:2379"), format!("http://{ADDR}:2380"));
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("start etcd (scripts/setup installs it)");
        Etcd { child, dir }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Occupies every worker of `rt` for `how_long`; returns once all are blocked.
fn block_workers(rt: &tokio::runtime::Runtime, workers: usize, how_long: Duration) {
    let all_blocked = Arc::new(Barrier::new(workers + 1));
    for _ in 0..workers {
        let b = all_blocked.clone();
        rt.spawn(async move {
            b.wait();
            std::thread::sleep(how_long);
        });
    }
    all_blocked.wait();
}

#[test]
fn a_blocked_runtime_neither_lapses_the_lease_nor_delays_the_fence() {
    let etcd = Etcd::start();
    let shape = meridian::lab::topology::LabShape { net: 97, ..Default::default() };
    let mut config = meridian::lab::topology::lab_config(&shape, &etcd.dir);
    config.etcd.endpoints = vec![format!("http://{ADDR}:2379")];
    config.failover.lease_ttl = TTL;

    const WORKERS: usize = 2;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build().unwrap();
    let shutdown = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let lease = loop {
        // Plain etcd here (a built config, never a cluster file): no certificate is read.
        let identity = config.tls_identity("unused");
        match rt.block_on(LeaseKeeper::start(&config, &identity, shutdown.clone())) {
            Ok(Some(l)) => break l,
            other => assert!(Instant::now() < deadline, "no lease from etcd within 30s: {:?}", other.err()),
        }
    };
    let watchdog = Watchdog::start(lease.clone(), shutdown.clone());
    // The supervisor, over a stand-in for the postmaster.
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["supervise-postmaster", "--", "sleep", "600"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the supervisor");
    watchdog.attach(supervisor.stdin.take().unwrap());
    watchdog.guard();

    // 1. Workers blocked for two TTLs, etcd answering: the lease keeper and the
    // feeder carry on, so the server is not fenced. (As tasks on the runtime
    // they would stop, and the supervisor would stop the server at 2 s.)
    block_workers(&rt, WORKERS, 2 * TTL);
    let until = Instant::now() + 2 * TTL + Duration::from_millis(500);
    while Instant::now() < until {
        if let Some(status) = supervisor.try_wait().unwrap() {
            panic!("fenced although the lease was renewed all along: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lease.is_fresh(), "the lease was renewed while every worker was blocked");

    // 2. Workers blocked again and etcd frozen: renewals stop, and the server
    // is stopped before etcd could expire the lease, blocked runtime or not.
    etcd.signal(libc::SIGSTOP);
    let stopped_at = Instant::now();
    block_workers(&rt, WORKERS, 3 * TTL);
    let status = loop {
        if let Some(status) = supervisor.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped_at.elapsed() < TTL + Duration::from_secs(2),
            "awaited the supervisor's fence after renewals stopped: still running after {:?}",
            stopped_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = stopped_at.elapsed();
    eprintln!("fenced {took:?} after etcd froze (TTL {TTL:?}), with every runtime worker blocked");
    assert_eq!(status.code(), Some(FENCED_EXIT), "the supervisor fenced: {status}");
    // The last renewal was sent at most TTL/4 before etcd froze; etcd expires
    // the lease TTL after it, the fence comes two thirds in.
    assert!(
        took < TTL * 3 / 4,
        "fenced {took:?} after the last chance to renew; etcd may expire the lease at {:?}",
        TTL * 3 / 4
    );
    etcd.signal(libc::SIGCONT);
    shutdown.cancel();
    rt.shutdown_timeout(Duration::from_secs(1));
}
