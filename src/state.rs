//! What the proxy runs on right now: a [`Generation`] (one validated config plus everything built
//! from it) behind an `ArcSwap`, and the process-wide parts that outlive reloads.
//!
//! A request loads the current generation once and keeps that `Arc` to the end, so a reload never
//! changes the rules under a request in flight. Building a generation reuses what did not change
//! (upstream connection pools, the CA and its leaf cache), so a reload is cheap and keeps
//! warm connections. [`Generation::build`] is the resolve phase of loading a config: it reads
//! what the file names outside itself and reports every problem at once.
//!
//! It stands above every room of the journey: it builds what they need, and [`Generation`]
//! implements the traits they state their needs in (`route::RouteContext`, `upstream::Upstreams`,
//! `limit::layer::LimitContext`), so none of them names `state`. `proxy::stack`, `listen`,
//! `reload`, `admin` and `app` stand above it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, Intercept, Problems, SecretSource, Store};
use crate::limit::Limiter;
use crate::route::RouteTable;
use crate::security::clients::Clients;
use crate::security::credentials::Credential;
use crate::telemetry::Metrics;
use crate::tls::ca::CertAuthority;
use crate::upstream::UpstreamClient;

/// One config and what was built from it.
pub struct Generation {
    /// Increases by one with every successful load.
    pub id: u64,
    pub config: Arc<Config>,
    /// The store settings with the URL read (the limiter runs on the first generation's).
    pub store: Store,
    pub routes: RouteTable,
    /// One pooled client per upstream, by upstream name.
    pub clients: HashMap<Arc<str>, UpstreamClient>,
    pub ca: Option<Arc<CertAuthority>>,
    /// Proxy clients allowed to use sluice (`clients:`), or loopback-only sidecar mode.
    pub proxy_clients: Clients,
    /// Injected static credentials by upstream name (OAuth 2.0 ones are brokered by
    /// `Shared::brokers`, since their tokens outlive a generation).
    pub credentials: HashMap<Arc<str>, Arc<Credential>>,
    /// The consumers spend is attributed to (`consumers:`, else the clients' names).
    pub consumers: crate::consumer::Known,
}

// === what the layers read of a generation ===

impl crate::route::RouteContext for Generation {
    fn routes(&self) -> &RouteTable {
        &self.routes
    }

    fn proxy_clients(&self) -> &Clients {
        &self.proxy_clients
    }

    fn credential(&self, upstream: &str) -> Option<&Credential> {
        self.credentials.get(upstream).map(Arc::as_ref)
    }

    fn max_body_bytes(&self) -> u64 {
        self.config.live.limits.max_body_bytes
    }

    fn consumers(&self) -> &crate::consumer::Known {
        &self.consumers
    }
}

impl crate::upstream::Upstreams for Generation {
    fn client(&self, name: &str) -> Option<&UpstreamClient> {
        self.clients.get(name)
    }

    fn max_body_bytes(&self) -> u64 {
        self.config.live.limits.max_body_bytes
    }
}

impl crate::limit::layer::LimitContext for Generation {
    fn response_idle_timeout(&self) -> std::time::Duration {
        self.config.live.limits.response_idle_timeout
    }
}

/// Whether building a generation may write: `run` creates an interception CA whose two files
/// are both absent; `sluice check` leaves it uncreated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MissingCa {
    Create,
    Leave,
}

impl Generation {
    /// Builds everything a config needs, reusing unchanged parts of `previous`.
    ///
    /// This is the resolve phase of loading: everything the config names outside its own text
    /// (the store URL, PEM files, the CA, client and credential secrets) is read and checked
    /// here, and so is what only the rooms below know (a batch rule against its bulk format).
    /// Every part is tried whatever became of the others, so the refusal lists every problem,
    /// each with its key (the caller adds the lines), like validation does.
    pub fn build(config: Config, previous: Option<&Generation>) -> Result<Self, ConfigError> {
        Self::resolve(config, previous, MissingCa::Create)
    }

    /// What `sluice check` verifies: everything [`build`](Self::build) reads, without writing
    /// (a CA whose files do not exist yet is not created).
    pub fn check(config: Config) -> Result<(), ConfigError> {
        Self::resolve(config, None, MissingCa::Leave).map(drop)
    }

    fn resolve(config: Config, previous: Option<&Generation>, missing_ca: MissingCa) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        problems.extend(crate::batch::check(&config.live.upstreams));
        let store = problems.keep(config.process.store.resolve());
        let ca = match &config.live.intercept {
            None => None,
            Some(settings) => match previous {
                Some(old)
                    if old.config.live.intercept.as_ref() == Some(settings)
                        && old.ca.is_some()
                        && !ca_files_changed(old, settings) =>
                {
                    old.ca.clone()
                }
                _ if missing_ca == MissingCa::Leave && !settings.ca_cert.exists() && !settings.ca_key.exists() => None,
                _ => problems.keep(CertAuthority::load_or_generate(settings)).map(Arc::new),
            },
        };
        let mut clients = HashMap::with_capacity(config.live.upstreams.len());
        for (index, upstream) in config.live.upstreams.iter().enumerate() {
            let reused =
                previous.and_then(|old| old.clients.get(&upstream.name)).filter(|client| client.fits(upstream));
            let client = match reused {
                Some(client) => Some(client.clone()),
                None => problems.keep(UpstreamClient::new(upstream, &format!("upstreams[{index}].tls"))),
            };
            if let Some(client) = client {
                clients.insert(upstream.name.clone(), client);
            }
        }
        let proxy_clients =
            problems.keep(Clients::new(&config.live.clients, config.process.listen.allow_remote_clients));
        let mut credentials = HashMap::new();
        for (index, upstream) in config.live.upstreams.iter().enumerate() {
            let Some(settings) = &upstream.credentials else { continue };
            if let SecretSource::OAuth2(oauth2) = &settings.value {
                // Brokered (`Shared::brokers`): only its files are checked here.
                problems.keep(crate::oauth::check(oauth2, &format!("upstreams[{index}].credentials")));
                continue;
            }
            let reused = previous.and_then(|old| old.credentials.get(&upstream.name)).filter(|credential| {
                credential.settings == *settings && matches!(settings.value, SecretSource::File(_))
            });
            let credential = match reused {
                Some(credential) => Some(credential.clone()),
                None => problems
                    .keep(Credential::load(upstream.name.clone(), settings, &format!("upstreams[{index}].credentials")))
                    .map(Arc::new),
            };
            if let Some(credential) = credential {
                credentials.insert(upstream.name.clone(), credential);
            }
        }
        let (Some(store), Some(proxy_clients)) = (store, proxy_clients) else { return Err(problems.refusal()) };
        problems.finish()?;
        let consumers = crate::consumer::Known::new(
            config.live.consumers.as_deref(),
            &config.live.clients,
            crate::consumer::Known::default_from_env(),
        );
        Ok(Self {
            proxy_clients,
            credentials,
            consumers,
            id: previous.map_or(1, |old| old.id + 1),
            store,
            routes: RouteTable::new(&config.live.upstreams),
            config: Arc::new(config),
            clients,
            ca,
        })
    }
}

/// The CA is re-read when its files changed on disk (a rotated Secret), even if paths did not.
fn ca_files_changed(old: &Generation, settings: &Intercept) -> bool {
    let Some(ca) = &old.ca else { return true };
    match rustls_pki_types::pem::PemObject::from_pem_file(&settings.ca_cert) {
        Ok(cert) => {
            let cert: rustls_pki_types::CertificateDer<'static> = cert;
            cert.as_ref() != ca.ca_der().as_ref()
        }
        Err(_) => true,
    }
}

/// Process-wide state shared by listeners, the admin API and the reloader.
pub struct Shared {
    current: ArcSwap<Generation>,
    pub metrics: Arc<Metrics>,
    /// Quota state and decisions; lives across reloads so buckets keep their state.
    pub limiter: Arc<Limiter>,
    /// Circuit breakers by upstream; kept across reloads while their settings are unchanged.
    pub breakers: Arc<crate::breaker::Breakers>,
    pub retry_budgets: Arc<crate::retry::RetryBudgets>,
    /// Throttles in a row per upstream, for the Feedback layer's backoff.
    pub throttles: Arc<crate::feedback::Throttles>,
    /// Batches being filled, shared by all connections.
    pub batcher: Arc<crate::batch::Batcher>,
    /// OAuth 2.0 token brokers by upstream; a token outlives reloads that leave its settings.
    pub brokers: Arc<crate::oauth::Brokers>,
    /// Cancelled when shutdown starts: listeners stop accepting, connections drain.
    pub shutdown: CancellationToken,
    /// Every connection and tunnel task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    ready: AtomicBool,
}

impl Shared {
    pub fn new(
        generation: Generation,
        metrics: Arc<Metrics>,
        limiter: Arc<Limiter>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let batcher = crate::batch::Batcher::new(metrics.clone());
        let brokers = crate::oauth::Brokers::new(&generation.store, metrics.clone());
        Arc::new(Self {
            current: ArcSwap::from_pointee(generation),
            metrics,
            limiter,
            breakers: Arc::default(),
            retry_budgets: Arc::default(),
            throttles: Arc::default(),
            batcher,
            brokers,
            shutdown,
            tasks: TaskTracker::new(),
            ready: AtomicBool::new(false),
        })
    }

    /// The generation a new request runs on.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn publish(&self, generation: Generation) {
        self.current.store(Arc::new(generation));
    }

    /// Ready once listeners are bound, until shutdown starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutdown.is_cancelled()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}
