//! The published cluster file (`meridian config apply`): what of it the
//! agent takes while it runs. Today that is `postgres.settings` that take a
//! reload: written into postgresql.auto.conf (`Server::set_settings`) and
//! reloaded. The gateway publishes no other change yet (docs/config.md).

use std::time::{Duration, Instant};

use anyhow::Result;

use super::Agent;
use crate::config::change::RESTART_SETTINGS;
use crate::config::Config;

/// How often the agent looks for a new version.
const CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(super) struct Published {
    /// The last version this agent took (or decided to leave).
    version: u64,
    checked: Option<Instant>,
}

impl Agent {
    pub(super) async fn published_config_duties(&mut self) -> Result<()> {
        if self.published.checked.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
            return Ok(());
        }
        self.published.checked = Some(Instant::now());
        let Some(p) = self.coord.published_config().await? else { return Ok(()) };
        if p.version <= self.published.version {
            return Ok(());
        }
        let Some(new) = Config::parse(&p.text).config else {
            tracing::error!("cluster file version {} in etcd does not parse; keeping the running one", p.version);
            self.published.version = p.version;
            return Ok(());
        };
        let old = &self.config.postgres.settings;
        let changed: Vec<&String> = old
            .keys()
            .chain(new.postgres.settings.keys())
            .filter(|k| old.get(*k) != new.postgres.settings.get(*k))
            .collect();
        let restart: Vec<&str> = changed.iter().map(|k| k.as_str()).filter(|k| RESTART_SETTINGS.contains(k)).collect();
        if !restart.is_empty() {
            tracing::warn!(
                "cluster file version {} changes {}, which take a restart of PostgreSQL: not applied",
                p.version,
                restart.join(", ")
            );
            self.published.version = p.version;
            return Ok(());
        }
        if !changed.is_empty() {
            let names = changed.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
            self.config.postgres.settings = new.postgres.settings.clone();
            if self.server.is_initialized() && self.server.set_settings(&self.config)? && self.running.is_some() {
                self.client().await?.execute("SELECT pg_reload_conf()", &[]).await?;
            }
            tracing::info!("cluster file version {}: PostgreSQL reloaded with {names}", p.version);
        }
        self.published.version = p.version;
        Ok(())
    }
}
