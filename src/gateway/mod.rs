//! The gateway of one region: the HTTP API the CLI talks to (status, verify,
//! metrics). Any region's gateway serves any request, so the API survives the
//! loss of a region. Health checks, DNS and the SQL proxy come with issue 4.

pub mod api;
pub mod operations;
pub mod verify;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterStatus;
use crate::config::{Config, Secrets};
use crate::coord::Coord;

/// What every request handler shares.
#[derive(Clone)]
pub struct Gateway {
    pub config: std::sync::Arc<Config>,
    pub secrets: std::sync::Arc<Secrets>,
    pub region: String,
    pub coord: Coord,
}

impl Gateway {
    /// The cluster's status from one consistent etcd read.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let snap = self.coord.snapshot().await?;
        Ok(ClusterStatus::build(
            &self.config,
            snap.leader.as_ref().map(|l| &l.leader),
            snap.epoch,
            &snap.members,
            crate::cluster::now_ms(),
        ))
    }
}

/// Runs the gateway of `region` until `shutdown`.
pub async fn run(config: Config, region: &str, shutdown: CancellationToken) -> Result<()> {
    let addrs = config.region(region)?.gateway;
    let secrets = config.secrets()?;
    let listener =
        TcpListener::bind(addrs.api).await.with_context(|| format!("bind the gateway API on {}", addrs.api))?;
    let coord = Coord::connect(&config).await?;
    let gateway = Gateway {
        config: std::sync::Arc::new(config),
        secrets: std::sync::Arc::new(secrets),
        region: region.to_string(),
        coord,
    };
    tracing::info!("gateway for {region} serving the API on {}", addrs.api);
    api::serve(listener, gateway, shutdown).await
}
