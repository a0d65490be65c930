//! OAUTH: the OAuth 2.0 token broker, so apps hold no CRM secret even when the vendor wants
//! short-lived access tokens (HubSpot public apps, Salesforce connected apps). sluice obtains the
//! token itself (`refresh_token` or `client_credentials` grant), injects it, renews it before it
//! expires, keeps a rotated refresh token, and renews it once when the vendor answers 401.
//!
//! - `endpoint`: the exchange with the token endpoint and what its answer means;
//! - `broker`: one upstream's token and its single-flight renewal;
//! - `share`: where replicas meet over a token (Redis, with the Redis store);
//! - `rotation`: which refresh token to send, and where a rotated one is kept;
//! - `layer`: the Authorize layer, which sets the token and retries a 401 once.
//!
//! [`Brokers`] outlives reloads (it lives in `state::Shared`): a broker is kept, token and all,
//! while its upstream's credential settings are unchanged. Token values never reach a log, a
//! metric, `/config` or a `Debug` output; header values are marked sensitive.

pub mod broker;
pub mod endpoint;
pub mod layer;
pub mod rotation;
pub mod share;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use broker::{Broker, Token};
pub use layer::{Authorize, OAuthLayer};

use crate::config::{ConfigError, OAuth2, Problem, Problems, SecretSource, Store, Upstream};
use crate::error::ErrorKind;
use crate::telemetry::Metrics;
use share::Share;

/// Most brokers kept (upstream names come from config, so only a long run of reloads renaming
/// upstreams could reach it).
const MAX_BROKERS: usize = 1024;

/// Every upstream's broker, by upstream name, across reloads.
pub struct Brokers {
    metrics: Arc<Metrics>,
    share: Arc<Share>,
    key_prefix: String,
    by_upstream: Mutex<HashMap<Arc<str>, Entry>>,
}

struct Entry {
    /// The upstream as last seen (a reload makes a new one even when nothing here changed).
    upstream: Arc<Upstream>,
    broker: Arc<Broker>,
}

impl Brokers {
    /// Brokers sharing tokens through `store` (Redis), or each in its own process (memory).
    pub fn new(store: &Store, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            share: Arc::new(Share::for_store(store)),
            key_prefix: store.key_prefix.clone(),
            by_upstream: Mutex::default(),
        })
    }

    /// The broker of `upstream`'s OAuth 2.0 credential; `None` when it has none.
    pub fn broker(&self, upstream: &Arc<Upstream>) -> Result<Option<Arc<Broker>>, ErrorKind> {
        let Some(credentials) = &upstream.credentials else { return Ok(None) };
        let SecretSource::OAuth2(settings) = &credentials.value else { return Ok(None) };
        let mut brokers = crate::kit::lock(&self.by_upstream);
        if let Some(entry) = brokers.get_mut(&upstream.name) {
            if Arc::ptr_eq(&entry.upstream, upstream) {
                return Ok(Some(entry.broker.clone()));
            }
            if same_broker(&entry.upstream, upstream) {
                entry.upstream = upstream.clone();
                return Ok(Some(entry.broker.clone()));
            }
        }
        // A changed config gets a new broker (and token); a rotated refresh token of the same
        // grant is carried over, as the file may hold one the endpoint no longer takes.
        let rotated = brokers
            .get(&upstream.name)
            .filter(|entry| same_grant(entry.broker.settings(), settings))
            .map(|entry| entry.broker.rotated())
            .unwrap_or_default();
        if brokers.len() >= MAX_BROKERS && !brokers.contains_key(&upstream.name) {
            if let Some(victim) = brokers.keys().next().cloned() {
                brokers.remove(&victim);
            }
        }
        let broker = Broker::new(
            upstream,
            settings.clone(),
            credentials.prefix.clone(),
            self.share.clone(),
            &self.key_prefix,
            self.metrics.clone(),
            rotated,
        )
        .map_err(|error| ErrorKind::CredentialUnavailable {
            detail: error.to_string(),
            retry_after: Duration::from_secs(5),
        })?;
        let broker = Arc::new(broker);
        brokers.insert(upstream.name.clone(), Entry { upstream: upstream.clone(), broker: broker.clone() });
        Ok(Some(broker))
    }
}

/// Whether a broker built for `old` serves `new` as it is: same credential, same way to the
/// token endpoint, same hosts an `instance_url` may name.
fn same_broker(old: &Upstream, new: &Upstream) -> bool {
    old.credentials == new.credentials
        && old.extra_ca == new.extra_ca
        && old.connect_timeout == new.connect_timeout
        && old.request_timeout == new.request_timeout
        && old.hosts == new.hosts
        && old.target == new.target
}

/// Whether two settings renew the same grant (so one's rotated refresh token is the other's).
fn same_grant(old: &OAuth2, new: &OAuth2) -> bool {
    old.token_url == new.token_url
        && old.grant == new.grant
        && old.client_id_file == new.client_id_file
        && old.refresh_token_file == new.refresh_token_file
}

/// The resolve phase's part: the files an `oauth2` credential names exist and are not empty.
/// `key` is the credential's (`upstreams[N].credentials`). The token endpoint is not asked.
pub fn check(settings: &OAuth2, key: &str) -> Result<(), ConfigError> {
    let mut problems = Problems::default();
    let files = [
        ("client_id_file", Some(&settings.client_id_file)),
        ("client_secret_file", settings.client_secret_file.as_ref()),
        ("refresh_token_file", settings.refresh_token_file.as_ref()),
    ];
    for (field, path) in files {
        let Some(path) = path else { continue };
        let at = format!("{key}.oauth2.{field}");
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => {
                problems.push(Problem::new(at, format!("{} is empty", path.display())))
            }
            Ok(_) => {}
            Err(error) => problems.push(Problem::new(at, format!("cannot read {}: {error}", path.display()))),
        }
    }
    problems.finish()
}
