//! Wiring: takes the config `main` loaded, binds the listeners, builds the first generation,
//! starts the limiter, the proxy, the admin API and the reload watchers, and drains them on
//! shutdown.
//!
//! The top of the proxy's module graph: it names `listen`, `admin`, `reload` and `state`, and
//! nothing names it but `main`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Loaded};
use crate::reload::Reloader;
use crate::state::{Generation, Shared};
use crate::telemetry::Metrics;

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind { which: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// A running sluice: its bound addresses, and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    pub reloader: Arc<Reloader>,
    admin_stop: CancellationToken,
    accept_loop: JoinHandle<()>,
    admin_loop: JoinHandle<()>,
}

/// Starts sluice on the config at `path`, binding the addresses it names (port 0 picks a free one).
pub async fn start(path: &Path) -> Result<Running, StartError> {
    start_loaded(Loaded::read(path)?).await
}

/// Starts sluice on a config file already read and validated (`main` reads it first, to size
/// the runtime), binding the addresses it names.
pub async fn start_loaded(loaded: Loaded) -> Result<Running, StartError> {
    crate::tls::install_crypto_provider();
    let Loaded { path, text, config } = loaded;
    let proxy = bind("proxy", config.process.listen.proxy).await?;
    let admin = bind("admin", config.process.listen.admin).await?;
    let metrics = Arc::new(Metrics::new());
    let generation = Generation::build(config, None).map_err(|error| error.located(&path, &text))?;
    metrics.reloads.with_label_values(&["success"]).inc();
    metrics.reload_last_success.set(crate::kit::unix_seconds_f64(std::time::SystemTime::now()));
    let shutdown = CancellationToken::new();
    let limiter = crate::limit::Limiter::start(generation.store.clone(), metrics.clone(), shutdown.clone()).await;
    let shared = Shared::new(generation, metrics, limiter, shutdown);
    let reloader = Reloader::new(path, shared.clone(), &text);
    start_with(proxy, admin, shared, reloader)
}

fn start_with(
    proxy: TcpListener,
    admin: TcpListener,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
) -> Result<Running, StartError> {
    let proxy_addr = proxy.local_addr().map_err(|source| StartError::Bind {
        which: "proxy",
        addr: ([0, 0, 0, 0], 0).into(),
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        which: "admin",
        addr: ([0, 0, 0, 0], 0).into(),
        source,
    })?;
    let accept_loop = tokio::spawn(crate::listen::serve_proxy(proxy, shared.clone()));
    let admin_stop = CancellationToken::new();
    let admin_loop =
        tokio::spawn(crate::admin::serve_admin(admin, shared.clone(), reloader.clone(), admin_stop.clone()));
    reloader.spawn_watchers();
    shared.set_ready();
    let generation = shared.current();
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        upstreams = generation.config.live.upstreams.len(),
        "sluice is serving."
    );
    Ok(Running { proxy_addr, admin_addr, shared, reloader, admin_stop, accept_loop, admin_loop })
}

async fn bind(which: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { which, addr, source })
}

impl Running {
    /// Stops accepting, lets in-flight requests and tunnels finish for up to the configured
    /// grace period, then stops the admin API. Returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        let grace = self.shared.current().config.live.shutdown_grace;
        self.shutdown_within(grace).await
    }

    pub async fn shutdown_within(self, grace: Duration) -> bool {
        let open = self.shared.tasks.len();
        tracing::info!(open_connections = open, grace = %humantime::format_duration(grace), "Shutting down; draining.");
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        let _ = self.accept_loop.await;
        let drained = tokio::time::timeout(grace, self.shared.tasks.wait()).await.is_ok();
        if drained {
            tracing::info!("Drained; exiting.");
        } else {
            tracing::warn!(cut = self.shared.tasks.len(), "Grace period over; cutting remaining connections.");
        }
        self.admin_stop.cancel();
        let _ = self.admin_loop.await;
        drained
    }
}

/// `sluice run`: start, then drain on SIGTERM or SIGINT.
pub async fn run(loaded: Loaded) -> Result<(), StartError> {
    let running = start_loaded(loaded).await?;
    crate::kit::wait_for_stop_signal().await;
    running.shutdown().await;
    Ok(())
}

/// What `check` says about CONNECTs to upstreams that are not intercepted: refused because a
/// blind tunnel would skip their limits, or allowed by `blind_tunnel: true` despite that.
fn blind_tunnel_notes(config: &Config, text: &str) -> Vec<String> {
    let mut notes = Vec::new();
    for (at, upstream) in config.live.upstreams.iter().enumerate() {
        if upstream.hosts.is_empty() || upstream.intercept {
            continue;
        }
        let name = &upstream.name;
        let message = if let Some(refusal) = upstream.blind_tunnel_refusal() {
            format!("CONNECT to `{name}`'s hosts will be refused (403 blind_tunnel_refused): {refusal}")
        } else if upstream.blind_tunnel && !upstream.blind_tunnel_skips().is_empty() {
            format!(
                "`blind_tunnel: true`: CONNECTs to `{name}`'s hosts are tunnelled blind and skip its {}",
                upstream.blind_tunnel_skips().join(", ")
            )
        } else {
            continue;
        };
        let problem = crate::config::Problem::new(format!("upstreams[{at}]"), message).located_in(text);
        notes.push(format!("note: {problem}"));
    }
    notes
}

/// `sluice check`: everything `run` would verify, without binding or writing anything; the
/// notes it prints when the file is good.
pub fn check(path: &Path) -> Result<Vec<String>, ConfigError> {
    crate::tls::install_crypto_provider();
    let loaded = Loaded::read(path)?;
    let config = &loaded.config;
    let mut notes = Vec::new();
    if let Some(intercept) = &config.live.intercept {
        if !intercept.ca_cert.exists() && !intercept.ca_key.exists() {
            notes.push(format!(
                "intercept: {} and {} do not exist yet; `sluice run` will create them",
                intercept.ca_cert.display(),
                intercept.ca_key.display()
            ));
        }
    }
    // Everything `run` reads (the store URL, the CA, trust roots, client certificates,
    // credentials, client secrets) is read here too, so `check` passing means `run` starts.
    crate::state::Generation::check(config.clone()).map_err(|error| loaded.locate(error))?;
    notes.extend(blind_tunnel_notes(config, &loaded.text));
    notes.push(format!(
        "{} upstream(s): {}",
        config.live.upstreams.len(),
        config.live.upstreams.iter().map(|u| &*u.name).collect::<Vec<_>>().join(", ")
    ));
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resolve phase reports every file it could not use, and every batch rule its format
    /// refuses, each with its key and line, as validation does: not just the first.
    #[test]
    fn check_reports_every_file_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "not a certificate\n").unwrap();
        let path = dir.path().join("sluice.yaml");
        let text = format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}
store:
  url_file: {dir}/no-url
intercept:
  ca_cert: {dir}/ca.crt
  ca_key: {dir}/ca.key
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    intercept: true
    tls: {{ extra_ca: {dir}/no-ca.pem }}
    credentials: {{ value_file: {dir}/no-token }}
    batch: [{{ match: 'POST /o/{{object}}', bulk: 'POST /o/{{object}}/batch/create', format: hubspot, max_items: 500 }}]
  - name: salesforce
    hosts: [x.my.salesforce.com]
    credentials: {{ value_env: SLUICE_UNIT_UNSET_TOKEN }}
clients:
  - {{ name: billing, secret_file: {dir}/no-secret, upstreams: ['*'] }}
",
            dir = dir.path().display()
        );
        std::fs::write(&path, text).unwrap();
        let error = check(&path).unwrap_err().to_string();
        for expected in [
            "sluice.yaml: 7 problems",
            "store.url_file (line 3): cannot read",
            "intercept.ca_key (line 6):",
            "upstreams[0].tls (line 11): cannot read",
            "upstreams[0].credentials.value_file (line 12): cannot read",
            "upstreams[0].batch[0].max_items (line 13): must be between 2 and 100 for this format",
            "upstreams[1].credentials.value_env (line 16): environment variable SLUICE_UNIT_UNSET_TOKEN",
            "clients[0].secret_file (line 18): cannot read",
        ] {
            assert!(error.contains(expected), "`{expected}` in:\n{error}");
        }
        assert!(!dir.path().join("ca.key").exists(), "check writes nothing");
    }
}
