//! The postmaster's supervisor: fencing that does not need the agent to run.
//!
//! The agent's own fencing lives in the agent, so a frozen agent (SIGSTOP, a
//! deadlock, a stuck system call, a starved runtime) cannot fence: its lease
//! runs out, another node is promoted, and the old primary's PostgreSQL keeps
//! taking writes from direct connections. So the agent does not start the
//! postmaster itself. It starts `meridian supervise-postmaster`, this small
//! process (no etcd client, no async runtime, nothing that waits on the
//! network), which starts the postmaster as its own child and reads the
//! agent's orders on its standard input, one per line:
//!
//! ```text
//! arm <deadline>   the server runs read-write; stop it when CLOCK_BOOTTIME
//!                  passes <deadline> (ns) before a later `arm` moves it
//! disarm           the server runs as a standby: no deadline
//! ```
//!
//! The agent sends `arm` every 100 ms with the time its leader lease stops
//! being provably alive (two thirds into the TTL after the last renewal was
//! sent), so the supervisor stops the server before etcd can expire the
//! lease and let anyone else be promoted, whether or not the agent still
//! runs. End of input (the agent exited, or closed the pipe) stops the server
//! too. Stopping is SIGQUIT, PostgreSQL's immediate shutdown; a server that
//! has not exited 500 ms later is hung (stopped, or stuck on its storage,
//! where a pending signal does nothing), so every child of the postmaster and
//! then the postmaster get SIGKILL: a backend resumed later must not finish a
//! commit. SIGINT, SIGTERM, SIGQUIT and SIGHUP sent to the supervisor are
//! passed on to the postmaster, so the agent stops and reloads the server as
//! before; a forwarded SIGQUIT escalates the same way.
//!
//! The supervisor exits with the postmaster's status, or with `FENCED_EXIT`
//! when it stopped the server itself. Parent-death signals chain: the agent
//! dies, the supervisor gets SIGKILL; the supervisor dies, the postmaster gets
//! SIGQUIT. A dead agent still means a stopped server.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The subcommand, intercepted in `main` before any runtime starts.
pub const SUBCOMMAND: &str = "supervise-postmaster";
/// The supervisor's exit status when it stopped the server itself.
pub const FENCED_EXIT: i32 = 75;
/// How long an immediate shutdown may take before the server counts as hung.
const HUNG_AFTER: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(20);

/// The postmaster's pid, for the signal handler.
static POSTMASTER: AtomicI32 = AtomicI32::new(0);
/// The last signal forwarded (0: none since the last look), for escalation.
static FORWARDED: AtomicI32 = AtomicI32::new(0);

/// Now on CLOCK_BOOTTIME, in ns: the clock the agent's deadlines are on. It
/// is the same for every process on the host, never jumps with the wall
/// clock, and (unlike CLOCK_MONOTONIC) counts time the host was suspended, so
/// a deadline that passed during a suspend has passed on resume.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One order from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Arm { deadline_ns: u64 },
    Disarm,
}

impl Order {
    pub fn line(self) -> String {
        match self {
            Order::Arm { deadline_ns } => format!("arm {deadline_ns}\n"),
            Order::Disarm => "disarm\n".into(),
        }
    }

    pub fn parse(line: &str) -> Option<Order> {
        let mut words = line.split_whitespace();
        match (words.next()?, words.next(), words.next()) {
            ("arm", Some(d), None) => d.parse().ok().map(|deadline_ns| Order::Arm { deadline_ns }),
            ("disarm", None, None) => Some(Order::Disarm),
            _ => None,
        }
    }
}

/// The supervisor's state between polls: pure, so the rules are unit-tested.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The armed deadline, if any.
    pub deadline_ns: Option<u64>,
    /// When SIGQUIT was sent (by us, or forwarded), to escalate if the server hangs.
    pub quit_sent_ns: Option<u64>,
    /// Whether the supervisor itself decided to stop the server.
    pub fenced: bool,
}

/// What to do to the server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deed {
    Nothing,
    /// SIGQUIT to the postmaster.
    Quit,
    /// SIGKILL to every child of the postmaster, then to the postmaster.
    KillAll,
}

impl Fence {
    pub fn order(&mut self, order: Order) {
        if self.fenced {
            return; // once fenced, the server stays stopped
        }
        self.deadline_ns = match order {
            Order::Arm { deadline_ns } => Some(deadline_ns),
            Order::Disarm => None,
        };
    }

    /// The agent is gone or closed its end: stop the server.
    pub fn orphaned(&mut self) {
        self.deadline_ns = Some(0);
    }

    pub fn forwarded_quit(&mut self, now_ns: u64) {
        self.quit_sent_ns.get_or_insert(now_ns);
    }

    pub fn tick(&mut self, now_ns: u64) -> Deed {
        if let Some(sent) = self.quit_sent_ns {
            return if now_ns.saturating_sub(sent) >= HUNG_AFTER.as_nanos() as u64 {
                Deed::KillAll
            } else {
                Deed::Nothing
            };
        }
        match self.deadline_ns {
            Some(d) if now_ns >= d => {
                self.fenced = true;
                self.quit_sent_ns = Some(now_ns);
                Deed::Quit
            }
            _ => Deed::Nothing,
        }
    }
}

extern "C" fn forward(signal: libc::c_int) {
    let pid = POSTMASTER.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, signal) };
    }
    FORWARDED.store(signal, Ordering::SeqCst);
}

/// `meridian supervise-postmaster [--uid U --gid G] -- PROGRAM ARGS...`;
/// returns the exit status. Writes only to stderr (the server's log).
pub fn main(args: &[OsString]) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meridian supervisor: {e}");
            1
        }
    }
}

fn run(args: &[OsString]) -> Result<i32, String> {
    let mut ids = (None, None);
    let mut rest = args.iter();
    loop {
        match rest.next().and_then(|a| a.to_str()) {
            Some("--uid") => ids.0 = rest.next().and_then(|v| v.to_str()?.parse::<u32>().ok()),
            Some("--gid") => ids.1 = rest.next().and_then(|v| v.to_str()?.parse::<u32>().ok()),
            Some("--") => break,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let program = rest.next().ok_or("no program to supervise")?;
    let mut cmd = Command::new(program);
    cmd.args(rest).stdin(Stdio::null());
    if let (Some(uid), Some(gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl, getppid and _exit are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("start {}: {e}", program.to_string_lossy()))?;
    let pid = child.id() as i32;
    POSTMASTER.store(pid, Ordering::SeqCst);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGHUP] {
        // SAFETY: the handler only loads and stores atomics and calls kill.
        unsafe { libc::signal(signal, forward as *const () as libc::sighandler_t) };
    }

    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    // SAFETY: fcntl on our own stdin.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
    let mut input = stdin.lock();
    let mut pending = Vec::new();
    let mut fence = Fence::default();
    let mut open = true;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait for the postmaster: {e}"))? {
            if fence.fenced {
                eprintln!("meridian supervisor: PostgreSQL stopped ({status})");
                return Ok(FENCED_EXIT);
            }
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)));
        }
        if open {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as i32) };
            let mut buf = [0u8; 4096];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => {
                        open = false;
                        eprintln!("meridian supervisor: the agent is gone; stopping PostgreSQL");
                        fence.orphaned();
                        break;
                    }
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("read orders: {e}")),
                }
            }
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match Order::parse(&String::from_utf8_lossy(&line)) {
                    Some(order) => fence.order(order),
                    None => eprintln!(
                        "meridian supervisor: ignoring an order it does not know: {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                }
            }
        } else {
            std::thread::sleep(POLL);
        }
        let now = monotonic_ns();
        if FORWARDED.swap(0, Ordering::SeqCst) == libc::SIGQUIT {
            fence.forwarded_quit(now);
        }
        match fence.tick(now) {
            Deed::Nothing => {}
            Deed::Quit => {
                eprintln!(
                    "meridian supervisor: fencing: the leader lease was not renewed in time (is the agent frozen?); stopping PostgreSQL (pid {pid}) immediately"
                );
                // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
            Deed::KillAll => {
                eprintln!("meridian supervisor: PostgreSQL (pid {pid}) did not stop within {HUNG_AFTER:?}; killing it and its processes");
                for c in children_of(pid) {
                    // SAFETY: as above; the children are the unreaped postmaster's, so their pids are not reused.
                    unsafe { libc::kill(c, libc::SIGKILL) };
                }
                unsafe { libc::kill(pid, libc::SIGKILL) };
                fence.quit_sent_ns = Some(u64::MAX); // once is enough
            }
        }
    }
}

fn children_of(pid: i32) -> Vec<i32> {
    crate::process::children_of(pid as u32).into_iter().map(|p| p as i32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn orders_round_trip_and_junk_is_refused() {
        for order in [Order::Arm { deadline_ns: 123_456_789 }, Order::Disarm] {
            assert_eq!(Order::parse(&order.line()), Some(order));
        }
        for junk in ["", "arm", "arm soon", "arm 1 2", "disarm now", "fire"] {
            assert_eq!(Order::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn fences_when_the_deadline_passes_unrenewed_and_escalates_when_hung() {
        let mut f = Fence::default();
        assert_eq!(f.tick(0), Deed::Nothing, "a standby has no deadline");
        f.order(Order::Arm { deadline_ns: 1000 * MS });
        assert_eq!(f.tick(999 * MS), Deed::Nothing);
        f.order(Order::Arm { deadline_ns: 2000 * MS }); // renewed in time
        assert_eq!(f.tick(1500 * MS), Deed::Nothing);
        assert_eq!(f.tick(2000 * MS), Deed::Quit);
        assert!(f.fenced);
        f.order(Order::Arm { deadline_ns: 9000 * MS }); // too late: stays fenced
        assert_eq!(f.tick(2100 * MS), Deed::Nothing, "waiting for the immediate shutdown");
        assert_eq!(f.tick(2500 * MS), Deed::KillAll, "a server that ignores SIGQUIT is hung");
    }

    #[test]
    fn disarm_lifts_the_deadline_and_a_lost_agent_stops_the_server() {
        let mut f = Fence::default();
        f.order(Order::Arm { deadline_ns: 1000 * MS });
        f.order(Order::Disarm);
        assert_eq!(f.tick(5000 * MS), Deed::Nothing);
        f.orphaned();
        assert_eq!(f.tick(5001 * MS), Deed::Quit);
    }

    #[test]
    fn a_forwarded_quit_escalates_but_is_not_a_fence() {
        let mut f = Fence::default();
        f.forwarded_quit(100 * MS);
        assert_eq!(f.tick(200 * MS), Deed::Nothing);
        assert_eq!(f.tick(600 * MS), Deed::KillAll);
        assert!(!f.fenced);
    }

    #[test]
    fn children_are_found_by_parent() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let me = std::process::id() as i32;
        assert!(children_of(me).contains(&(child.id() as i32)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
