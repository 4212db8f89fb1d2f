//! The lease keeper and the fencing feeder run on threads of their own: an
//! agent runtime whose workers are all blocked for a while neither lets a
//! healthy lease lapse (fencing a primary for nothing) nor delays the fence
//! once renewals stop; blocked for longer than the self-probe may go
//! unfinished, the primary is fenced and the lease given up even though etcd
//! answers (a starved probe must not keep a hung primary leading). Real etcd,
//! the real supervisor binary, a stand-in for the postmaster.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use meridian::agent::lease::LeaseKeeper;
use meridian::agent::watchdog::Watchdog;
use meridian::postgres::supervisor::FENCED_EXIT;
use tokio_util::sync::CancellationToken;

/// This file's own loopback range (see tests/common: every test has its net).
const ADDR: &str = "127.97.0.1";
const STARVED_ADDR: &str = "127.97.0.2";
const TTL: Duration = Duration::from_secs(3);
/// The agent's (`watchdog::starved_after`): the probe's timeout (half the TTL) plus a TTL.
const STARVED_AFTER: Duration = Duration::from_millis(4500);

/// One etcd member, stopped by pid when dropped, even if the test fails.
struct Etcd {
    child: Child,
    dir: PathBuf,
}

impl Etcd {
    fn start(addr: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("meridian-blocked-runtime-{}-{addr}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (format!("http://{addr}:2379"), format!("http://{addr}:2380"));
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

const WORKERS: usize = 2;

/// A runtime like the agent's, a lease from `etcd`, a watchdog armed over the
/// real supervisor (of a stand-in postmaster), and a stand-in for the
/// self-probe on the runtime, telling the watchdog every 200 ms.
fn armed_primary(
    etcd: &Etcd,
    addr: &str,
    net: u8,
) -> (tokio::runtime::Runtime, CancellationToken, LeaseKeeper, Watchdog, Child) {
    let shape = meridian::lab::topology::LabShape { net, ..Default::default() };
    let mut config = meridian::lab::topology::lab_config(&shape, &etcd.dir);
    config.etcd.endpoints = vec![format!("http://{addr}:2379")];
    config.failover.lease_ttl = TTL;
    assert_eq!(meridian::agent::watchdog::starved_after(&config), STARVED_AFTER);

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
    let watchdog = Watchdog::start(lease.clone(), STARVED_AFTER, shutdown.clone());
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["supervise-postmaster", "--", "sleep", "600"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the supervisor");
    watchdog.attach(supervisor.stdin.take().unwrap());
    watchdog.guard();
    let probe = watchdog.clone();
    rt.spawn(async move {
        loop {
            probe.probed();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (rt, shutdown, lease, watchdog, supervisor)
}

/// Waits for the supervisor to exit, at most `limit` after `since`; its
/// status and when it came, from `since`.
fn await_fence(
    supervisor: &mut Child,
    since: Instant,
    limit: Duration,
    what: &str,
) -> (std::process::ExitStatus, Duration) {
    loop {
        if let Some(status) = supervisor.try_wait().unwrap() {
            return (status, since.elapsed());
        }
        assert!(since.elapsed() < limit, "awaited {what}: still running after {:?}", since.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_blocked_runtime_neither_lapses_the_lease_nor_delays_the_fence() {
    let etcd = Etcd::start(ADDR);
    let (rt, shutdown, lease, _watchdog, mut supervisor) = armed_primary(&etcd, ADDR, 97);

    // 1. Workers blocked for a TTL, etcd answering: the lease keeper and the
    // feeder carry on, so the server is not fenced. (As tasks on the runtime
    // they would stop, and the supervisor would stop the server at 2 s.)
    block_workers(&rt, WORKERS, TTL);
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
    let (status, took) =
        await_fence(&mut supervisor, stopped_at, TTL + Duration::from_secs(2), "the fence after renewals stopped");
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

#[test]
fn a_starved_self_probe_fences_the_primary_and_gives_up_the_lease_though_etcd_answers() {
    let etcd = Etcd::start(STARVED_ADDR);
    let (rt, shutdown, lease, watchdog, mut supervisor) = armed_primary(&etcd, STARVED_ADDR, 97);
    // Every worker blocked for longer than the probe may go unfinished: the
    // probe's stand-in stops, and the feeder's thread takes that for a hang.
    let blocked_at = Instant::now();
    block_workers(&rt, WORKERS, 3 * TTL);
    let (status, took) = await_fence(
        &mut supervisor,
        blocked_at,
        STARVED_AFTER + Duration::from_secs(2),
        "the fence of a primary whose probe starved",
    );
    eprintln!("fenced {took:?} after the runtime's workers blocked (starved after {STARVED_AFTER:?})");
    assert_eq!(status.code(), Some(FENCED_EXIT), "the supervisor fenced: {status}");
    assert!(took >= STARVED_AFTER - Duration::from_millis(300), "fenced at {took:?}, before the probe could starve");
    assert!(watchdog.hung().load(std::sync::atomic::Ordering::SeqCst), "the HA loop is told the server hung");
    assert!(!lease.is_fresh(), "the lease is given up, so leader expires even if the agent never runs again");
    shutdown.cancel();
    rt.shutdown_timeout(Duration::from_secs(1));
}
