//! Credentials sluice adds to upstream requests, so the CRM secret lives with sluice (a
//! Kubernetes Secret mount or an environment variable) and never in the application pod.
//!
//! A file-based secret is watched (its directory, so a Secret's `..data` swap is seen) and
//! re-read when it changes: rotation without a restart. The value is never logged, exported or
//! shown in `/config`; rotations are audit-logged by upstream name only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use notify::{RecursiveMode, Watcher};

use crate::config::ConfigError;
use crate::config::{CredentialMode, Credentials, SecretSource};

pub struct Credential {
    upstream: Arc<str>,
    pub settings: Credentials,
    pub header: HeaderName,
    value: Arc<ArcSwapOption<HeaderValue>>,
    /// Kept alive for as long as the credential is in use.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("upstream", &self.upstream)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Credential {
    pub fn load(upstream: Arc<str>, settings: &Credentials, key: &str) -> Result<Self, ConfigError> {
        let value = Arc::new(ArcSwapOption::empty());
        let mut watcher = None;
        match &settings.value {
            SecretSource::File(path) => {
                value.store(Some(Arc::new(read_secret(path, &settings.prefix, key)?)));
                watcher = watch(path, settings.prefix.clone(), value.clone(), upstream.clone());
            }
            SecretSource::Env(name) => {
                let secret = std::env::var(name).map_err(|_| {
                    ConfigError::at_key(format!("{key}.value_env"), format!("environment variable {name} is not set"))
                })?;
                value.store(Some(Arc::new(header_value(&settings.prefix, secret.trim(), key)?)));
            }
            // Obtained and renewed by the `oauth` room's broker, never loaded here.
            SecretSource::OAuth2(_) => {
                return Err(ConfigError::at_key(format!("{key}.oauth2"), "an OAuth 2.0 credential is brokered"))
            }
        }
        Ok(Self { upstream, settings: settings.clone(), header: settings.header.clone(), value, _watcher: watcher })
    }

    /// Sets the credential on an upstream request, per `mode`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let Some(value) = self.value.load_full() else { return };
        match self.settings.mode {
            CredentialMode::Replace => {
                headers.insert(self.header.clone(), (*value).clone());
            }
            CredentialMode::IfAbsent => {
                if !headers.contains_key(&self.header) {
                    headers.insert(self.header.clone(), (*value).clone());
                }
            }
        }
    }
}

fn header_value(prefix: &str, secret: &str, key: &str) -> Result<HeaderValue, ConfigError> {
    let mut value = HeaderValue::from_str(&format!("{prefix}{secret}"))
        .map_err(|_| ConfigError::at_key(key, "the secret is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

fn read_secret(path: &Path, prefix: &str, key: &str) -> Result<HeaderValue, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::at_key(format!("{key}.value_file"), format!("cannot read {}: {error}", path.display()))
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError::at_key(format!("{key}.value_file"), format!("{} is empty", path.display())));
    }
    header_value(prefix, secret, key)
}

fn watch(
    path: &Path,
    prefix: String,
    value: Arc<ArcSwapOption<HeaderValue>>,
    upstream: Arc<str>,
) -> Option<notify::RecommendedWatcher> {
    let file: PathBuf = path.to_path_buf();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let changed = event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_)));
        if !changed {
            return;
        }
        match read_secret(&file, &prefix, "credentials") {
            Ok(fresh) => {
                let current = value.load_full();
                if current.as_deref() != Some(&fresh) {
                    value.store(Some(Arc::new(fresh)));
                    tracing::info!(target: "sluice::audit", event = "credential_rotated", upstream = &*upstream, "Credential file changed; new value in use.");
                }
            }
            // Mid-swap, the file can be briefly missing: keep the value in use.
            Err(error) => tracing::debug!(upstream = &*upstream, %error, "Credential file not readable yet."),
        }
    })
    .ok()?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).ok()?;
    Some(watcher)
}
