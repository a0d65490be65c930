//! Configuration: the YAML file, its validation, and the validated types every room reads.
//!
//! Loading runs in three phases. **Parse** (`file`) reads the YAML into a serde mirror that
//! denies unknown keys. **Validate** (`validate` and the section modules) turns it into a
//! [`Config`] made only of validated types, reading nothing but the text. **Resolve** reads
//! what the config names outside itself (the store URL, secrets, PEM files, the CA) and is run
//! by `state` when it builds a generation; [`StoreConfig::resolve`] is config's own part of it.
//! Validation and resolution each collect every problem, with its key, before giving up, and
//! `locate` finds the line each key sits on.
//!
//! A [`Config`] is immutable and comes in two parts: [`ProcessConfig`], fixed at start (a reload
//! keeps it as it runs), and [`LiveConfig`], which a reload replaces whole (see the `reload`
//! room). [`Loaded`] is a file read and validated once, which `main` hands to `app`.
//!
//! `config` stands just above `vendor`, whose [`ProfileKind`] and [`ResetUnit`] it names, and
//! imports nothing else from sluice: the rooms that apply a section's settings read its validated
//! type. Inside it, `kinds` (the closed vocabularies) is the leaf that the file model, validation
//! and those rooms all name.

mod batch;
mod file;
mod kinds;
mod locate;
pub mod policy;
mod resilience;
mod store;
mod upstream;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub use crate::vendor::{ProfileKind, ResetUnit};
pub use batch::BatchRule;
pub use kinds::{ClientAuth, CredentialMode, Grant, Lane, OnFailure, OverLimit, ShapeKind, StoreKind, WindowKind};
pub use policy::{Feedback, LaneCaps, Limits as UpstreamLimits, Quota, ScopeKey, Window};
pub use resilience::{BreakerSettings, RetryPolicy};
pub use store::{cluster_nodes, Store, StoreConfig, StoreUrl};
pub use upstream::{check_probe_path, Credentials, HostPattern, OAuth2, Scheme, SecretSource, Target, Upstream};
pub use validate::{
    is_consumer_name, AdminSettings, AdminToken, ClientSecret, ClientSettings, ConnectionLimits, ConsumerSettings,
    Intercept, Listen, RESERVED_CONSUMERS,
};

/// A validated configuration: what the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings fixed for the life of the process.
    pub process: ProcessConfig,
    /// Settings a reload replaces.
    pub live: LiveConfig,
}

/// What is sized or bound once at start: a reload keeps these as they run (and warns when the
/// file asks for others), so `GET /config` shows what is in force. Compared as one value.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessConfig {
    /// `listen:`: the listeners are bound once.
    pub listen: Listen,
    /// `store:`: the limiter connects once.
    pub store: StoreConfig,
    /// `runtime.worker_threads`: the runtime is built once.
    pub worker_threads: Option<usize>,
    /// `limits.max_connections`: the accept loop's semaphore is sized once.
    pub max_connections: usize,
    /// `limits.max_tunnels`: the tunnel semaphore is sized once.
    pub max_tunnels: usize,
    /// `admin.max_connections`: the admin listener's cap is sized once.
    pub admin_max_connections: usize,
}

/// What a reload replaces.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// How long in-flight requests and tunnels may run after SIGTERM.
    pub shutdown_grace: Duration,
    pub limits: ConnectionLimits,
    pub intercept: Option<Intercept>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Proxy clients; empty: sidecar mode.
    pub clients: Vec<ClientSettings>,
    /// `consumers:`, the known consumers spend is attributed to; `None`: the clients' names.
    pub consumers: Option<Vec<ConsumerSettings>>,
    pub admin: AdminSettings,
    /// The file as written, defaults filled in, for `GET /config` only: nothing reads settings
    /// from it, and [`ProcessConfig`]'s keys are shown from the values in force instead.
    written: Arc<Value>,
}

impl Config {
    /// Parses and validates config text; errors name the key and, where known, the line.
    /// Reads nothing but `text`.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let file: file::FileConfig = serde_yaml_ng::from_str(text).map_err(|error| {
            let line = error.location().map(|at| at.line());
            ConfigError::Invalid { path: None, problems: vec![Problem::parse(error.to_string(), line)] }
        })?;
        validate::validate(file).map_err(|problems| ConfigError::Invalid { path: None, problems }.located_in(text))
    }

    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.live.upstreams.iter().find(|upstream| &*upstream.name == name)
    }

    /// The effective config in the file's shape, defaults filled in, as `GET /config` shows it
    /// (before redaction): the live part as written, the process part as it runs.
    pub fn effective(&self) -> Value {
        let mut shown = (*self.live.written).clone();
        if let Value::Object(sections) = &mut shown {
            self.process.show_in(sections);
        }
        shown
    }
}

impl ProcessConfig {
    /// Writes this part's keys into the file-shaped `sections`, through the file model's own
    /// serialisation so they look exactly as the file's would.
    fn show_in(&self, sections: &mut serde_json::Map<String, Value>) {
        let listen = file::ListenFile {
            proxy: self.listen.proxy,
            admin: self.listen.admin,
            allow_remote_clients: self.listen.allow_remote_clients,
        };
        let (url, url_file, url_env) = match &self.store.url {
            None => (None, None, None),
            Some(StoreUrl::Inline(url)) => (Some(url.clone()), None, None),
            Some(StoreUrl::File(path)) => (None, Some(path.clone()), None),
            Some(StoreUrl::Env(name)) => (None, None, Some(name.clone())),
        };
        let store = file::StoreFile {
            kind: self.store.kind,
            url,
            url_file,
            url_env,
            on_failure: self.store.on_failure,
            timeout: self.store.timeout,
            key_prefix: self.store.key_prefix.clone(),
            heartbeat: self.store.heartbeat,
            lease_max: self.store.lease_max,
            lease_ttl: self.store.lease_ttl,
        };
        let runtime = file::RuntimeFile { worker_threads: self.worker_threads };
        let to_value = |value: Result<Value, serde_json::Error>| value.unwrap_or_default();
        sections.insert("listen".into(), to_value(serde_json::to_value(listen)));
        sections.insert("store".into(), to_value(serde_json::to_value(store)));
        sections.insert("runtime".into(), to_value(serde_json::to_value(runtime)));
        for (section, key, value) in [
            ("limits", "max_connections", self.max_connections),
            ("limits", "max_tunnels", self.max_tunnels),
            ("admin", "max_connections", self.admin_max_connections),
        ] {
            if let Some(Value::Object(section)) = sections.get_mut(section) {
                section.insert(key.into(), value.into());
            }
        }
    }

    /// The keys whose values differ from `other`'s, for the restart warning.
    pub fn changed_keys(&self, other: &ProcessConfig) -> Vec<String> {
        let (mut mine, mut theirs) = (serde_json::Map::new(), serde_json::Map::new());
        for (config, sections) in [(self, &mut mine), (other, &mut theirs)] {
            sections.insert("limits".into(), Value::Object(serde_json::Map::new()));
            sections.insert("admin".into(), Value::Object(serde_json::Map::new()));
            config.show_in(sections);
        }
        let mut changed = Vec::new();
        for (section, value) in &mine {
            match (value, theirs.get(section)) {
                (Value::Object(keys), Some(Value::Object(other_keys))) => {
                    for (key, value) in keys {
                        if other_keys.get(key) != Some(value) {
                            changed.push(format!("{section}.{key}"));
                        }
                    }
                }
                (value, other) if other != Some(value) => changed.push(section.clone()),
                _ => {}
            }
        }
        changed
    }
}

/// A config file read and validated, with the text it came from (for the lines of problems
/// found later, and to tell a reload that changes nothing).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub text: String,
    pub config: Config,
}

impl Loaded {
    /// Reads, parses and validates the file at `path`, once.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config = Config::from_yaml(&text).map_err(|error| error.in_file(path))?;
        Ok(Self { path: path.to_path_buf(), text, config })
    }

    /// Names the file, and the line of each problem's key in its text: for problems found after
    /// validation (a CA file that doesn't load, say), which know only the key.
    pub fn locate(&self, error: ConfigError) -> ConfigError {
        error.located(&self.path, &self.text)
    }
}

/// A config's names are metric labels, key parts and path segments: 1-64 of a-z, 0-9, - and _.
fn check_name(name: &str, key: &str, problems: &mut Vec<Problem>) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        problems.push(Problem::new(key, "must be 1-64 characters of a-z, 0-9, - and _"));
    }
}
/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}{}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default(), ProblemList(problems))]
    Invalid { path: Option<PathBuf>, problems: Vec<Problem> },
}

impl ConfigError {
    fn in_file(self, file: &Path) -> Self {
        match self {
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid { path: Some(file.to_path_buf()), problems },
            other => other,
        }
    }

    /// Names the file, and the line of each problem's key in `text`: for refusals found after
    /// parsing (a CA file that doesn't load, say), which know only the key.
    pub fn located(self, file: &Path, text: &str) -> Self {
        self.located_in(text).in_file(file)
    }

    /// The line of each problem's key in `text`, where it can be found.
    fn located_in(self, text: &str) -> Self {
        match self {
            ConfigError::Invalid { path, mut problems } => {
                for problem in &mut problems {
                    problem.line = problem.line.or_else(|| locate::line_of(text, &problem.key));
                }
                ConfigError::Invalid { path, problems }
            }
            other => other,
        }
    }

    /// A refusal found after parsing (a CA file that doesn't load, say), for one key.
    pub fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { path: None, problems: vec![Problem::new(key, message)] }
    }
}

/// The problems a phase has found so far, so that it reports them all at once: each part is
/// tried whatever became of the others.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn push(&mut self, problem: Problem) {
        self.0.push(problem);
    }

    /// The value, or `None` with the error's problems kept.
    pub fn keep<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(ConfigError::Invalid { problems, .. }) => {
                self.0.extend(problems);
                None
            }
            Err(ConfigError::Read { path, source }) => {
                self.0.push(Problem::parse(format!("cannot read {}: {source}", path.display()), None));
                None
            }
        }
    }

    pub fn extend(&mut self, problems: impl IntoIterator<Item = Problem>) {
        self.0.extend(problems);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing was found, else the refusal listing every problem.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.refusal())
        }
    }

    /// The refusal listing every problem found: for a part that [`keep`](Self::keep) left
    /// without a value, which it did only after recording why.
    pub fn refusal(self) -> ConfigError {
        ConfigError::Invalid { path: None, problems: self.0 }
    }
}

/// One thing wrong with a config: the key, the line when known, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), line: None, message: message.into() }
    }

    /// With the line of its key in `text`, when the key can be found there.
    pub fn located_in(mut self, text: &str) -> Self {
        self.line = self.line.or_else(|| locate::line_of(text, &self.key));
        self
    }

    /// A serde error already says the key path and line in its own words.
    fn parse(message: String, line: Option<usize>) -> Self {
        Self { key: String::new(), line, message }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            return f.write_str(&self.message);
        }
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems", many.len())?;
                for problem in many {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RICH: &str = "\
listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0, allow_remote_clients: true }
store: { kind: redis, url_env: SLUICE_TEST_REDIS_URL, timeout: 80ms }
runtime: { worker_threads: 2 }
shutdown_grace: 7s
limits: { max_connections: 50, max_tunnels: 40, max_tunnels_per_client: 4 }
admin: { max_connections: 9, token_env: SLUICE_TEST_ADMIN_TOKEN }
intercept: { ca_cert: ca.crt, ca_key: ca.key }
upstreams:
  - name: hubspot
    hosts: [API.HubAPI.com]
    prefix: /hubspot/
    target: 'https://api.hubapi.com'
    quotas: [{ name: burst, limit: 100, per: 10s, key: [credential] }]
    limit_headers: hubspot
    retry: {}
    breaker: { max_hosts: 10 }
    batch:
      - { match: 'POST /crm/v3/objects/{object}', bulk: 'POST /crm/v3/objects/{object}/batch/create', format: hubspot }
    credentials: { header: X-Token, value_env: SLUICE_TEST_TOKEN }
clients:
  - { name: billing, secret_file: secret, upstreams: ['*'] }
";

    #[test]
    fn the_effective_config_is_the_file_with_defaults_filled_in() {
        let config = Config::from_yaml(RICH).unwrap();
        let file: file::FileConfig = serde_yaml_ng::from_str(RICH).unwrap();
        assert_eq!(config.effective(), serde_json::to_value(&file).unwrap());
        assert_eq!(config.effective()["upstreams"][0]["hosts"][0], "API.HubAPI.com", "as written");
        assert_eq!(config.effective()["store"]["lease_max"], 64, "defaults filled in");
    }

    #[test]
    fn process_settings_are_shown_as_they_run() {
        let running = Config::from_yaml(RICH).unwrap();
        let edited = RICH
            .replace("proxy: 127.0.0.1:0", "proxy: 127.0.0.1:1")
            .replace("max_tunnels: 40", "max_tunnels: 30")
            .replace("shutdown_grace: 7s", "shutdown_grace: 8s");
        let mut new = Config::from_yaml(&edited).unwrap();
        assert_eq!(new.process.changed_keys(&running.process), ["limits.max_tunnels", "listen.proxy"]);
        new.process = running.process.clone();
        let shown = new.effective();
        assert_eq!(shown["listen"]["proxy"], "127.0.0.1:0");
        assert_eq!(shown["limits"]["max_tunnels"], 40);
        assert_eq!(shown["limits"]["max_tunnels_per_client"], 4);
        assert_eq!(shown["shutdown_grace"], "8s", "live settings are the new file's");
        assert!(running.process.changed_keys(&running.process).is_empty());
    }

    #[test]
    fn consumers_are_plain_unique_names_each_problem_at_its_line() {
        let text = "\
upstreams: []
consumers:
  - billing
  - billing
  - other
  - 'has spaces'
  - nightly.backfill_v2
";
        let error = Config::from_yaml(text).unwrap_err().to_string();
        for expected in [
            "3 problems",
            "consumers[1] (line 4): `billing` is listed twice",
            "consumers[2] (line 5): `other` is reserved",
            "consumers[3] (line 6): must be 1-64 characters",
        ] {
            assert!(error.contains(expected), "`{expected}` in:\n{error}");
        }
        let config = Config::from_yaml("consumers: [billing, nightly.backfill_v2]\n").unwrap();
        let names: Vec<&str> = config.live.consumers.iter().flatten().map(|consumer| &*consumer.name).collect();
        assert_eq!(names, ["billing", "nightly.backfill_v2"]);
        let config = Config::from_yaml("consumers: [billing, { name: backfill, lane: low }]\n").unwrap();
        let lanes: Vec<Option<Lane>> = config.live.consumers.iter().flatten().map(|consumer| consumer.lane).collect();
        assert_eq!(lanes, [None, Some(Lane::Low)]);
        let error = Config::from_yaml("consumers:\n  - { name: 'a b', lane: low }\n").unwrap_err().to_string();
        assert!(error.contains("consumers[0].name (line 2): must be"), "{error}");
        assert!(Config::from_yaml("upstreams: []\n").unwrap().live.consumers.is_none(), "absent: the clients");
        assert!(Config::from_yaml("upstreams: []\n").unwrap().effective().get("consumers").is_none());
    }

    #[test]
    fn validation_reads_nothing_but_the_text() {
        let config = Config::from_yaml(RICH).unwrap();
        assert_eq!(config.process.store.url, Some(StoreUrl::Env("SLUICE_TEST_REDIS_URL".into())));
        let error = config.process.store.resolve().unwrap_err().to_string();
        assert!(error.starts_with("store.url_env: environment variable SLUICE_TEST_REDIS_URL"), "{error}");
        let credentials = config.live.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!(credentials.header, "x-token");
        assert_eq!(credentials.value, SecretSource::Env("SLUICE_TEST_TOKEN".into()));
    }
}
