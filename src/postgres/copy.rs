//! A fresh copy of the leader's data, made beside the old one.
//!
//! The old data directory may be the last good copy of the database (the
//! leader it would be replaced from can hang or die mid-copy), so it is kept
//! until the new copy is complete:
//!
//! ```text
//! <data_dir>.new/   pg_basebackup writes here
//! <data_dir>.old/   the previous copy, only between the two renames of the swap
//! <data_dir>.cloning while a clone fills an *empty* data directory (a base
//!                   backup, or a restore from a repository and its catch-up)
//! ```
//!
//! `recover_swap` runs before the agent looks at its data directory, so a
//! crash at any point leaves one complete copy in `<data_dir>`: an unfinished
//! `.new` is removed, an `.old` left by an interrupted swap is put back if
//! `<data_dir>` is missing and removed if the swap had finished. A data
//! directory found with `.cloning` beside it never became a copy (it was
//! empty before the clone began): it is emptied, and the node clones again.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{files, run_logged, Server};

impl Server {
    /// A file beside the data directory, on its file system, that the
    /// primary's self-probe writes and fsyncs (not inside PGDATA, which base
    /// backups copy).
    pub fn probe_file(&self) -> PathBuf {
        self.sibling(".probe")
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.data_dir.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        self.data_dir.with_file_name(name)
    }

    /// Copies `source`'s data into `<data_dir>.new`; the current data
    /// directory is not touched, and a server may keep running on it. On
    /// failure `.new` is removed.
    pub fn copy_beside(&self, source: SocketAddr, replication_user: &str) -> Result<()> {
        let new = self.sibling(".new");
        remove_if_present(&new)?;
        std::fs::create_dir_all(&new).with_context(|| format!("create {}", new.display()))?;
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", new.display()))?;
        self.chown(&new)?;
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&new)
            .arg("-d")
            .arg(files::conninfo(source, replication_user, &self.passfile(), &self.run_dir, &self.node))
            .args(["-X", "stream", "--checkpoint=fast", "--no-password"]);
        if let Err(e) = run_logged(cmd, "pg_basebackup", Duration::from_secs(600)) {
            remove_if_present(&new)?;
            return Err(e);
        }
        Ok(())
    }

    /// Puts the copy `copy_beside` made in place of the data directory; the
    /// server must be stopped.
    pub fn swap_in_copy(&self) -> Result<()> {
        let (new, old) = (self.sibling(".new"), self.sibling(".old"));
        remove_if_present(&old)?;
        if self.data_dir.exists() {
            std::fs::rename(&self.data_dir, &old).with_context(|| format!("move {} aside", self.data_dir.display()))?;
        }
        std::fs::rename(&new, &self.data_dir).with_context(|| format!("move {} into place", new.display()))?;
        remove_if_present(&old)?;
        tracing::info!("swapped a fresh copy into {}", self.data_dir.display());
        Ok(())
    }

    /// Marks the (empty) data directory as being filled by a clone.
    pub fn begin_clone(&self) -> Result<()> {
        let marker = self.sibling(".cloning");
        std::fs::write(&marker, b"").with_context(|| format!("create {}", marker.display()))
    }

    /// The clone is a complete copy (it streams): the mark goes.
    pub fn end_clone(&self) -> Result<()> {
        let marker = self.sibling(".cloning");
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("remove {}", marker.display()))
            }
            _ => Ok(()),
        }
    }

    /// Finishes or undoes a swap a crash interrupted, and empties a data
    /// directory a crash left half cloned (see the module docs).
    pub fn recover_swap(&self) -> Result<()> {
        let marker = self.sibling(".cloning");
        if marker.exists() {
            tracing::warn!(
                "{} was being cloned when the agent stopped; emptying it to clone again",
                self.data_dir.display()
            );
            if self.data_dir.exists() {
                for entry in
                    std::fs::read_dir(&self.data_dir).with_context(|| format!("list {}", self.data_dir.display()))?
                {
                    let path = entry?.path();
                    let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                    r.with_context(|| format!("remove {}", path.display()))?;
                }
            }
            self.end_clone()?;
        }
        let (new, old) = (self.sibling(".new"), self.sibling(".old"));
        if old.exists() {
            if self.data_dir.exists() {
                remove_if_present(&old)?;
            } else {
                tracing::warn!("an interrupted swap left {}; putting it back", old.display());
                std::fs::rename(&old, &self.data_dir).with_context(|| format!("move {} back", old.display()))?;
            }
        }
        remove_if_present(&new)
    }
}

fn remove_if_present(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(base: &std::path::Path) -> Server {
        Server {
            node: "n".into(),
            bin_dir: "/nonexistent".into(),
            data_dir: base.join("data"),
            run_dir: base.join("run"),
            address: "127.0.0.1:1".parse().unwrap(),
            os_ids: None,
            agent_os_user: "root".into(),
            tls: crate::tls::Identity::new(base, "node-n"),
        }
    }

    fn put(dir: &std::path::Path, marker: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("PG_VERSION"), marker).unwrap();
    }

    fn marker(dir: &std::path::Path) -> Option<String> {
        std::fs::read_to_string(dir.join("PG_VERSION")).ok()
    }

    #[test]
    fn a_swap_keeps_one_complete_copy_whenever_it_is_interrupted() {
        let base = tempfile::tempdir().unwrap();
        let s = server(base.path());
        let (new, old) = (s.sibling(".new"), s.sibling(".old"));

        // Copying: the old data is untouched, an unfinished copy is discarded.
        put(&s.data_dir, "old");
        put(&new, "half");
        s.recover_swap().unwrap();
        assert_eq!(marker(&s.data_dir).as_deref(), Some("old"));
        assert!(!new.exists());

        // Crashed between the two renames: the old copy comes back.
        std::fs::rename(&s.data_dir, &old).unwrap();
        put(&new, "complete");
        s.recover_swap().unwrap();
        assert_eq!(marker(&s.data_dir).as_deref(), Some("old"), "never left without a data directory");
        assert!(!old.exists() && !new.exists());

        // Crashed after the swap, before removing the old copy.
        put(&old, "old");
        s.recover_swap().unwrap();
        assert_eq!(marker(&s.data_dir).as_deref(), Some("old"));
        assert!(!old.exists());

        // A complete swap.
        put(&new, "fresh");
        s.swap_in_copy().unwrap();
        assert_eq!(marker(&s.data_dir).as_deref(), Some("fresh"));
        assert!(!old.exists() && !new.exists());
    }

    #[test]
    fn a_clone_interrupted_midway_is_emptied_and_a_finished_one_kept() {
        let base = tempfile::tempdir().unwrap();
        let s = server(base.path());
        s.begin_clone().unwrap();
        put(&s.data_dir, "half");
        std::fs::create_dir_all(s.data_dir.join("base/1")).unwrap();
        s.recover_swap().unwrap();
        assert!(s.data_dir.exists(), "the directory stays, empty");
        assert_eq!(std::fs::read_dir(&s.data_dir).unwrap().count(), 0);
        assert!(!s.sibling(".cloning").exists());

        s.begin_clone().unwrap();
        put(&s.data_dir, "complete");
        s.end_clone().unwrap();
        s.recover_swap().unwrap();
        assert_eq!(marker(&s.data_dir).as_deref(), Some("complete"));
    }
}
