//! `store:`, validated. Validation checks what the file says; where the Redis URL is kept in a
//! file or an environment variable, reading it is [`StoreConfig::resolve`]'s job, which the
//! resolve phase calls. [`Store`] is the result, what the limiter runs on.

use std::path::PathBuf;
use std::time::Duration;

use super::file::StoreFile;
use super::kinds::{OnFailure, StoreKind};
use super::{ConfigError, Problem, Problems};

/// Where the Redis URL is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `url:`, in the config itself.
    Inline(String),
    /// `url_file:`, a mounted Secret.
    File(PathBuf),
    /// `url_env:`.
    Env(String),
}

/// `store:` as validated: the URL named, not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub url: Option<StoreUrl>,
    pub on_failure: OnFailure,
    pub timeout: Duration,
    pub key_prefix: String,
    pub heartbeat: Duration,
    pub lease_max: u64,
    pub lease_ttl: Duration,
}

/// Store settings with the URL read: what the limiter runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub kind: StoreKind,
    pub url: Option<String>,
    pub on_failure: OnFailure,
    pub timeout: Duration,
    pub key_prefix: String,
    pub heartbeat: Duration,
    pub lease_max: u64,
    pub lease_ttl: Duration,
}

impl StoreConfig {
    /// Reads the URL from its file or environment variable, and checks it when the store is
    /// Redis. Every problem is named by its key.
    pub fn resolve(&self) -> Result<Store, ConfigError> {
        let mut problems = Problems::default();
        let url = match &self.url {
            None => None,
            Some(StoreUrl::Inline(url)) => Some(url.clone()),
            Some(StoreUrl::File(path)) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text.trim().to_owned()),
                Err(error) => {
                    problems.push(Problem::new("store.url_file", format!("cannot read {}: {error}", path.display())));
                    None
                }
            },
            Some(StoreUrl::Env(name)) => match std::env::var(name) {
                Ok(text) => Some(text.trim().to_owned()),
                Err(_) => {
                    problems.push(Problem::new("store.url_env", format!("environment variable {name} is not set")));
                    None
                }
            },
        };
        if let (StoreKind::Redis, Some(url)) = (self.kind, &url) {
            problems.extend(check_url(url));
        }
        problems.finish()?;
        Ok(Store {
            kind: self.kind,
            url,
            on_failure: self.on_failure,
            timeout: self.timeout,
            key_prefix: self.key_prefix.clone(),
            heartbeat: self.heartbeat,
            lease_max: self.lease_max,
            lease_ttl: self.lease_ttl,
        })
    }
}

/// The node URLs of a `redis+cluster://` or `rediss+cluster://host:port,host:port` URL (user
/// and password applied to each), or `None` for a single-node URL.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return None;
    };
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.split('/').next().unwrap_or(hosts);
    Some(
        hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| format!("{scheme}://{credentials}{host}"))
            .collect(),
    )
}

/// The URL schemes the Redis client takes.
fn check_url(url: &str) -> Option<Problem> {
    let scheme_ok = ["redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    (!scheme_ok).then(|| Problem::new("store.url", "must start with redis://, rediss:// or redis+cluster://"))
}

pub(super) fn validate_store(raw: &StoreFile, problems: &mut Vec<Problem>) -> StoreConfig {
    let sources = [raw.url.is_some(), raw.url_file.is_some(), raw.url_env.is_some()].iter().filter(|set| **set).count();
    if sources > 1 {
        problems.push(Problem::new("store.url", "set one of url, url_file and url_env"));
    }
    let url = match (&raw.url, &raw.url_file, &raw.url_env) {
        (Some(url), _, _) => Some(StoreUrl::Inline(url.clone())),
        (None, Some(path), _) => Some(StoreUrl::File(path.clone())),
        (None, None, Some(name)) => Some(StoreUrl::Env(name.clone())),
        (None, None, None) => None,
    };
    if raw.kind == StoreKind::Redis {
        match &url {
            None => problems.push(Problem::new("store.url", "required when kind is redis (or url_file / url_env)")),
            Some(StoreUrl::Inline(url)) => problems.extend(check_url(url)),
            Some(StoreUrl::File(_) | StoreUrl::Env(_)) => {}
        }
    }
    if raw.timeout.is_zero() {
        problems.push(Problem::new("store.timeout", "must be greater than 0"));
    }
    if raw.heartbeat < Duration::from_millis(100) {
        problems.push(Problem::new("store.heartbeat", "must be at least 100ms"));
    }
    if raw.key_prefix.is_empty() || raw.key_prefix.contains(['{', '}', ' ']) {
        problems.push(Problem::new("store.key_prefix", "must be non-empty, without braces or spaces"));
    }
    if raw.lease_max > 10_000 {
        problems.push(Problem::new("store.lease_max", "must be at most 10000"));
    }
    if raw.lease_ttl > Duration::from_secs(1) {
        problems.push(Problem::new("store.lease_ttl", "must be at most 1s"));
    }
    StoreConfig {
        kind: raw.kind,
        url,
        on_failure: raw.on_failure,
        timeout: raw.timeout,
        key_prefix: raw.key_prefix.clone(),
        heartbeat: raw.heartbeat,
        lease_max: raw.lease_max,
        lease_ttl: raw.lease_ttl,
    }
}
