//! A PostgreSQL server run for one step outside the agent's supervision (a
//! restore's recovery, a clone's catch-up): stopped fast when done, and
//! stopped immediately (SIGQUIT) on every error path, when dropped.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub struct ScratchServer(Option<Child>);

impl ScratchServer {
    pub fn new(child: Child) -> ScratchServer {
        ScratchServer(Some(child))
    }

    /// The exit status, once the server exited by itself.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.0 = None;
        }
        status
    }

    /// A fast shutdown (SIGINT: a checkpoint or restartpoint, then exit), or
    /// an immediate one after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.0.take() else { return Ok(()) };
        crate::process::signal(child.id(), libc::SIGINT);
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("PostgreSQL exited with {status} when stopped");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                crate::process::signal(child.id(), libc::SIGQUIT);
                let _ = child.wait();
                bail!("PostgreSQL did not stop within {grace:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            crate::process::signal(child.id(), libc::SIGQUIT);
            let _ = child.wait();
        }
    }
}
