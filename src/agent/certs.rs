//! The node's certificate after a renewal: the agent copies it for PostgreSQL
//! (which reads only copies it owns, see `postgres::files::copy_tls`) and has
//! the server reload (SIGHUP), so rotation needs no restart. Checked every tick by
//! comparing the files, which costs two small reads.

use anyhow::{Context, Result};

use super::Agent;
use crate::postgres::files::{TLS_CA, TLS_CERT, TLS_KEY};

impl Agent {
    /// Copies a renewed certificate, key or CA and reloads the running server.
    pub(super) async fn refresh_certificate(&mut self) -> Result<()> {
        let id = &self.server.tls;
        let pairs = [(id.cert(), TLS_CERT), (id.key(), TLS_KEY), (id.ca(), TLS_CA)];
        let changed = pairs.iter().any(|(from, to)| {
            let (a, b) = (std::fs::read(from), std::fs::read(self.server.tls_file(to)));
            matches!((a, b), (Ok(a), Ok(b)) if a != b)
        });
        if !changed {
            return Ok(());
        }
        // The issuer writes the key before the certificate; a pair caught in
        // between does not match, and PostgreSQL would refuse to reload it.
        if crate::tls::Reloading::open(id).is_err() {
            return Ok(());
        }
        self.server.copy_tls()?;
        // SIGHUP is what pg_reload_conf() sends, without a connection that a hung
        // server (which the self-probe handles) could hold the tick on.
        if self.running.is_some() {
            let pid = crate::process::postmaster_pid(&self.server.data_dir)
                .context("find the postmaster to reload after a certificate renewal")?;
            crate::process::signal(pid, libc::SIGHUP);
        }
        tracing::info!("TLS: copied the renewed certificate of node {} for PostgreSQL and reloaded", self.server.node);
        Ok(())
    }

    /// When the node's certificate expires (Unix seconds), for the report.
    pub(super) fn certificate_not_after(&self) -> Option<u64> {
        crate::ca::inspect(&self.server.tls.cert()).ok().map(|i| i.not_after.max(0) as u64)
    }
}
