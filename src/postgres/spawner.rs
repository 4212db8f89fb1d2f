//! Starts the postmaster from one long-lived thread with a parent-death signal.
//!
//! Linux delivers `PR_SET_PDEATHSIG` when the *thread* that forked the child
//! exits, not the process. A tokio blocking-pool thread may retire after being
//! idle, which would kill a healthy PostgreSQL; so every postmaster is forked
//! from this one thread, which lives as long as the agent. SIGQUIT is
//! PostgreSQL's immediate shutdown: a dead agent means a stopped server, so no
//! writes can reach a node whose agent cannot fence it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;

use tokio::sync::oneshot;

type Request = (Command, oneshot::Sender<io::Result<Child>>);

/// A handle to the spawner thread.
#[derive(Clone)]
pub struct Spawner {
    tx: mpsc::Sender<Request>,
}

impl Spawner {
    pub fn start() -> Spawner {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("postmaster-spawner".into())
            .spawn(move || {
                while let Ok((cmd, reply)) = rx.recv() {
                    let _ = reply.send(spawn_with_pdeathsig(cmd));
                }
                // Senders are gone only when the agent is exiting: park so the
                // postmaster is not signalled before the agent has stopped it.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the postmaster-spawner thread");
        Spawner { tx }
    }

    pub async fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((cmd, reply)).map_err(|_| io::Error::other("spawner thread is gone"))?;
        rx.await.map_err(|_| io::Error::other("spawner thread dropped the request"))?
    }
}

fn spawn_with_pdeathsig(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            // Runs after std's setuid/setgid, which would clear the setting.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The agent may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}
