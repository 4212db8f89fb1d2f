//! Starting, finding and stopping the lab's long-lived processes by pid.
//!
//! Every process gets a log file and a pid file, a cleared environment with a
//! short allowlist, and its own session (so a terminal's Ctrl-C does not reach
//! it). A pid file alone is not trusted: the pid must still belong to a process
//! whose command line contains the lab's own path (its "identity"), so a stale
//! file after a crash or reboot never makes us signal a stranger.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Variables a lab child may inherit; everything else is cleared.
/// S3 credentials reach gateways (object-exists checks, the DR trigger) through
/// the environment, never through the command line.
const ENV_ALLOWLIST: &[&str] = &[
    "PATH",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "MERIDIAN_LOG",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
];

/// How to start one process and where its files go.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    /// Short unique name: `etcd-witness`, `agent-ap-south-1a`, `gateway-ap-south-1`.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// A string that must appear in the process's command line for its pid to count as ours.
    pub identity: String,
    /// A cgroup v2 directory to place the process in before exec, when partitions are possible.
    pub cgroup: Option<PathBuf>,
    /// A network namespace to run in (`/run/netns/NAME`): the netns lab's hosts.
    pub netns: Option<PathBuf>,
    /// Variables set beyond the allowlist (the lab's clock skew: libfaketime's).
    pub env: Vec<(String, String)>,
}

/// Starts the process detached in its own session and records its pid.
pub fn start(spec: &ProcSpec) -> Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("open {}", spec.log.display()))?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args).env_clear().stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    for key in ENV_ALLOWLIST {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = &spec.cgroup {
        std::fs::create_dir_all(dir).with_context(|| format!("create cgroup {}", dir.display()))?;
    }
    let procs = spec.cgroup.as_ref().map(|dir| {
        let mut p = dir.join("cgroup.procs").into_os_string();
        p.push("\0");
        p.into_encoded_bytes()
    });
    // Opened here, joined in the child: close-on-exec, so the program never holds it.
    let netns =
        match &spec.netns {
            Some(path) => Some(std::fs::File::open(path).with_context(|| {
                format!("open network namespace {} (is the netns lab's network up?)", path.display())
            })?),
            None => None,
        };
    let netns_fd = netns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: only async-signal-safe calls (setsid, open, write, close, setns) in the child.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(path) = &procs {
                // Join the region's cgroup: writing "0" moves the writing process.
                let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("start {} ({})", spec.name, spec.program.display()))?;
    drop(netns);
    let pid = child.id();
    std::fs::write(&spec.pid_file, format!("{pid}\n")).with_context(|| format!("write {}", spec.pid_file.display()))?;
    // The child is detached; dropping the handle neither waits for nor kills it.
    drop(child);
    Ok(pid)
}

/// The pid in `pid_file`, if that process is alive and is ours.
pub fn running_pid(pid_file: &Path, identity: &str) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    is_ours(pid, identity).then_some(pid)
}

/// Alive (not a zombie) and its command line contains `identity`.
pub fn is_ours(pid: u32, identity: &str) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    cmdline.contains(identity)
}

pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Pids of live processes whose command line contains `identity` (a path
/// unique to what is looked for, never a program's name), this one excepted.
pub fn pids_mentioning(identity: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| *p != me && is_ours(*p, identity))
        .collect();
    pids.sort_unstable();
    pids
}

/// Makes `cmd`'s child get SIGKILL when the thread that spawned it exits, so
/// a helper (a pgBackRest listing, a verify) never outlives the meridian
/// process that waits for it.
pub fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child before exec and only calls prctl.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Asks the kernel to SIGKILL this process when its parent (thread) exits,
/// and exits at once if the parent is already gone. For helpers a server runs
/// (an archive command) that must not outlive it.
pub fn die_with_parent() -> Result<()> {
    let parent = unsafe { libc::getppid() };
    // SAFETY: prctl with these arguments has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_PDEATHSIG)");
    }
    if parent == 1 || unsafe { libc::getppid() } != parent {
        anyhow::bail!("the parent process is gone");
    }
    Ok(())
}

/// Raises this process's soft limit of open files to its hard limit (as Go
/// programs do at start), and returns the limit now in force. A gateway holds
/// a socket per client and per server connection, and connections waiting
/// for their startup packet too: systemd's default soft limit of 1024 would
/// make `accept` fail long before `max_client_conn`.
pub fn raise_open_files_limit() -> Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given; no other preconditions.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct it is given; raising the soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        return Ok(raised.rlim_cur);
    }
    Ok(lim.rlim_cur)
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The processes whose parent is `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        // The fourth field, after the parenthesised command name (which may hold spaces).
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == pid).then_some(child)
    })
    .collect()
}

/// Waits until every pid is gone; returns the ones still alive at the deadline.
pub async fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, wait, then SIGKILL whatever is left.
pub async fn stop_all(pids: &[u32], grace: Duration) {
    for pid in pids {
        signal(*pid, libc::SIGTERM);
        // A stopped (frozen) process handles SIGTERM only once continued.
        signal(*pid, libc::SIGCONT);
    }
    let left = wait_gone(pids, grace).await;
    for pid in &left {
        tracing::warn!("pid {pid} did not stop within {grace:?} of SIGTERM; sending SIGKILL");
        signal(*pid, libc::SIGKILL);
    }
    let stuck = wait_gone(&left, Duration::from_secs(5)).await;
    for pid in stuck {
        tracing::error!("pid {pid} is still alive after SIGKILL");
    }
}

/// The postmaster's pid from `postmaster.pid`, if it is alive and serves `data_dir`.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    is_ours(pid, &data_dir.display().to_string()).then_some(pid)
}
