//! The gateway of one region: the HTTP API the CLI talks to, the health
//! checker, the authoritative DNS server and the SQL proxy (writer and reader
//! ports), plus the watcher of the DR trigger object. Any region's gateway
//! serves any request, so the API survives the loss of a region.
//!
//! DNS and the proxy route from one shared view of etcd (`view`), kept current
//! by a watch; the routing rules themselves are pure (`routing`).

pub mod api;
pub mod auth;
pub mod backup;
pub mod config_api;
pub mod dns;
pub mod health;
pub mod liveness;
pub mod operations;
pub mod presence;
pub mod proxy;
pub mod routing;
pub mod trigger;
pub mod verify;
pub mod view;

#[cfg(test)]
mod proxy_tests;

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterStatus;
use crate::config::{Config, Secrets};
use crate::coord::Coord;
use proxy::{Port, Proxy, ProxyStats};

/// What every request handler shares.
#[derive(Clone)]
pub struct Gateway {
    pub secrets: Arc<Secrets>,
    pub region: String,
    pub coord: Coord,
    /// The live view of etcd that DNS, the proxy and the trigger watcher route from.
    pub view: watch::Receiver<view::View>,
    /// The writer and reader ports' counters, for `/metrics`.
    pub proxy_stats: [(Port, Arc<ProxyStats>); 2],
    /// TLS to the nodes' PostgreSQL, presenting this gateway's certificate.
    pub pg_tls: crate::tls::PgTls,
    /// This gateway's certificate (`gateway-<region>`).
    pub identity: crate::tls::Identity,
    /// When each etcd member's certificate ends, as it presents it (`etcd_certificates`).
    pub etcd_certs: Arc<std::sync::Mutex<Vec<(String, u64)>>>,
    /// The repositories' catalog as the backup schedule last read it, and when.
    pub catalog: Arc<std::sync::Mutex<Option<(std::time::Instant, crate::backup::catalog::Catalog)>>>,
    /// The cluster file's text as this gateway read it at its start: version 0
    /// until one is published. Kept, not read again, because operators edit
    /// that very file before `config apply`.
    pub started_with: Arc<str>,
}

/// Removes audit entries older than `[api] audit_retention`, every 10 minutes.
/// Every gateway does it (idempotent), so it happens while any region is up.
async fn trim_audit(g: Gateway, keep: std::time::Duration, shutdown: CancellationToken) {
    loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let before = now.saturating_sub(keep).as_millis() as u64;
        match g.coord.trim_audit(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} audit entries older than {}", humantime::format_duration(keep)),
            Err(e) => tracing::warn!("failed to {e:#}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(600)) => {}
        }
    }
}

/// Looks at the certificate every etcd member presents, now and every minute,
/// for `health` and `/metrics` (a member's files are on its own host).
async fn etcd_certificates(g: Gateway, shutdown: CancellationToken) {
    let Ok(tls) = crate::tls::client_config(&g.identity.ca(), Some(&g.identity)) else { return };
    loop {
        let mut seen = Vec::new();
        for r in &g.config().regions {
            let Some(addr) = r.etcd.as_deref().and_then(|u| crate::config::parse_etcd_url(u).ok()) else { continue };
            if let Ok(s) = crate::tls::served_certificate(addr, &tls, false, std::time::Duration::from_secs(2)).await {
                seen.push((format!("etcd:{}", r.name), s.not_after.max(0) as u64));
            }
        }
        *g.etcd_certs.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}

impl Gateway {
    /// The cluster file in force: the one this gateway started with, or the
    /// newest published version (see `view`).
    pub fn config(&self) -> Arc<Config> {
        self.view.borrow().config.clone()
    }

    /// The cluster's status from one consistent etcd read.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let snap = self.coord.snapshot().await?;
        let config = self.config();
        let mut status =
            ClusterStatus::build(&config, snap.leader.as_ref().map(|l| &l.leader), snap.epoch, &snap.members);
        if let (Some(backup), Some((at, catalog))) = (&config.backup, self.catalog.lock().unwrap().as_ref()) {
            let primary = snap.members.iter().find(|m| m.role == crate::cluster::Role::Primary && m.is_fresh());
            let write = primary.and_then(|p| p.write_lsn).map(|l| l.0);
            status.backups = backup
                .repositories
                .iter()
                .map(|r| crate::backup::catalog::RepoSummary::build(catalog, &r.name, write, at.elapsed().as_secs()))
                .collect();
        }
        if config.replication.synchronous != crate::config::Synchronous::Off {
            let record = snap.sync.as_ref().filter(|r| r.epoch == snap.epoch);
            status.vouched = Some(record.map(|r| r.standbys.clone()).unwrap_or_default());
        }
        status.gateways = snap.gateways.clone();
        status.gateways.sort_by(|a, b| a.region.cmp(&b.region));
        if let Ok(members) = self.coord.etcd_members().await {
            status.etcd_learners = members
                .into_iter()
                .filter(|m| m.learner)
                .map(|m| if m.name.is_empty() { m.peer_urls.join(",") } else { m.name })
                .collect();
        }
        Ok(status)
    }
}

/// Runs the gateway of `region` until `shutdown`. Every listener is bound
/// before anything is served, so a port clash fails the start at once.
/// `proxy_threads`: the workers of the proxy's runtime (`meridian gateway --proxy-threads`).
pub async fn run(config: Config, region: &str, proxy_threads: usize, shutdown: CancellationToken) -> Result<()> {
    let addrs = config.region(region)?.gateway;
    let secrets = Arc::new(config.secrets()?);
    let identity = config.tls_identity(&format!("gateway-{region}"));
    let pg_tls = crate::tls::postgres(&identity.ca(), Some(&identity))?;
    let started_with: Arc<str> = match &config.source {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        None => toml::to_string(&config).context("render the cluster file")?,
    }
    .into();
    let config = Arc::new(config);
    let bind = |what: &'static str, addr| async move {
        TcpListener::bind(addr).await.with_context(|| format!("bind the gateway's {what} on {addr}"))
    };
    let api_listener = bind("API", addrs.api).await?;
    let writer_listener = bind("writer port", addrs.writer).await?;
    let reader_listener = bind("reader port", addrs.reader).await?;
    let coord = Coord::connect(&config, &identity).await?;
    let view = view::spawn(coord.clone(), config.clone(), region.to_string(), shutdown.clone());
    liveness::exit_when_frozen(tokio::runtime::Handle::current(), "runtime", shutdown.clone())
        .context("start the runtime check's thread")?;

    // The proxy ports present the gateway's certificate, as the API does, and
    // log clients in themselves so that the leg to PostgreSQL is TLS too.
    let proxy_cert = crate::tls::Reloading::open(&identity)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::proxy_server_config(proxy_cert.clone())?);
    let logins = Arc::new(proxy::login::Authenticator::new(
        &config,
        &secrets,
        pg_tls.clone(),
        &identity.ca(),
        Some(proxy_cert),
    )?);
    let proxy = |port| {
        let security = proxy::Security { acceptor: acceptor.clone(), logins: logins.clone() };
        Arc::new(Proxy::new(region.to_string(), port, view.clone(), Some(security)))
    };
    let (writer, reader) = (proxy(Port::Writer), proxy(Port::Reader));
    let gateway = Gateway {
        secrets: secrets.clone(),
        region: region.to_string(),
        coord: coord.clone(),
        view: view.clone(),
        proxy_stats: [(Port::Writer, writer.stats.clone()), (Port::Reader, reader.stats.clone())],
        pg_tls: pg_tls.clone(),
        identity: identity.clone(),
        etcd_certs: Arc::default(),
        catalog: Arc::default(),
        started_with,
    };
    tokio::spawn(etcd_certificates(gateway.clone(), shutdown.clone()));
    tokio::spawn(backup::schedule(gateway.clone(), shutdown.clone()));
    tokio::spawn(config_api::promote_learners(gateway.coord.clone(), shutdown.clone()));
    if let Some(keep) = config.api.audit_retention {
        tokio::spawn(trim_audit(gateway.clone(), keep, shutdown.clone()));
    }
    let dns = tokio::spawn(dns::serve(region.to_string(), addrs.dns, view.clone(), shutdown.clone()));
    health::start(&gateway, shutdown.clone()).await;
    {
        let (config, identity, coord, view) = (config.clone(), identity.clone(), coord.clone(), view.clone());
        let (region, shutdown) = (region.to_string(), shutdown.clone());
        let proxies = vec![writer.stats.clone(), reader.stats.clone()];
        tokio::spawn(async move {
            match crate::agent::lease::LeaseKeeper::start(&config, &identity, shutdown.clone()).await {
                Ok(Some(lease)) => presence::run(coord, lease, region, view, proxies, shutdown).await,
                Ok(None) => {}
                Err(e) => tracing::error!("failed to {e:#}; this gateway's presence is not published"),
            }
        });
    }
    if let Some(t) = config.failover.dr_trigger.clone() {
        tokio::spawn(trigger::watch(gateway.clone(), t, shutdown.clone()));
    }
    // Both ports run on a runtime of their own (`proxy_threads` workers):
    // the sockets a session relays between stay on few threads, and DNS and
    // the API answer on the main runtime however busy the proxy is.
    let proxy_runtime = ProxyRuntime::start(proxy_threads)?;
    let proxy_handle = proxy_runtime.handle();
    liveness::exit_when_frozen(proxy_handle.clone(), "proxy runtime", shutdown.clone())
        .context("start the proxy runtime check's thread")?;
    // Each listener is registered again from the proxy's runtime, so that its
    // own I/O driver wakes the accept loop.
    let serve_on = |proxy: Arc<Proxy>, listener: TcpListener| -> Result<_> {
        let listener = listener.into_std().context("take a proxy port's listener")?;
        let shutdown = shutdown.clone();
        Ok(proxy_handle.spawn(async move {
            let listener = TcpListener::from_std(listener).context("register a proxy port's listener")?;
            proxy.serve(listener, shutdown).await
        }))
    };
    let writer = serve_on(writer, writer_listener)?;
    let reader = serve_on(reader, reader_listener)?;
    tracing::info!(
        "gateway for {region}: API {}, DNS {}, writer {}, reader {}",
        addrs.api,
        addrs.dns,
        addrs.writer,
        addrs.reader
    );
    // Any part that stops on its own (a DNS bind failure) stops the gateway.
    let api = api::serve(api_listener, gateway, shutdown.clone());
    tokio::select! {
        r = api => r?,
        r = dns => { r.context("DNS server task")?.context("DNS server")?; }
        r = writer => { r.context("writer proxy task")??; }
        r = reader => { r.context("reader proxy task")??; }
    }
    shutdown.cancel();
    Ok(())
}

/// The proxy's runtime; shut down without waiting for its tasks (open client
/// connections) when the gateway stops, as the main runtime is.
struct ProxyRuntime(Option<tokio::runtime::Runtime>);

impl ProxyRuntime {
    fn start(threads: usize) -> Result<ProxyRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("proxy")
            .enable_all()
            .build()
            .context("start the proxy's runtime")?;
        Ok(ProxyRuntime(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle().clone()
    }
}

impl Drop for ProxyRuntime {
    fn drop(&mut self) {
        // A runtime dropped from async code would block on its workers (a panic in tokio).
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
