//! Progress for long operations: on a terminal, one line per step that turns
//! from "..." into a tick with its duration; elsewhere (CI, pipes) a plain line
//! when a step starts and one when it ends.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    tty: bool,
    current: Option<(String, Instant)>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        Progress { tty: std::io::stderr().is_terminal(), current: None }
    }

    /// Starts a step, finishing the previous one as done.
    pub fn step(&mut self, what: impl Into<String>) {
        self.done();
        let what = what.into();
        if self.tty {
            eprint!("  ... {what}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{what} ...");
        }
        self.current = Some((what, Instant::now()));
    }

    /// Finishes the current step as done.
    pub fn done(&mut self) {
        if let Some((what, started)) = self.current.take() {
            let secs = started.elapsed().as_secs_f64();
            if self.tty {
                eprintln!("\r  ok  {what} ({secs:.1}s)");
            } else {
                eprintln!("{what}: done in {secs:.1}s");
            }
        }
    }

    /// Finishes the current step as failed.
    pub fn fail(&mut self) {
        if let Some((what, started)) = self.current.take() {
            let secs = started.elapsed().as_secs_f64();
            if self.tty {
                eprintln!("\r  FAILED {what} ({secs:.1}s)");
            } else {
                eprintln!("{what}: FAILED after {secs:.1}s");
            }
        }
    }
}
