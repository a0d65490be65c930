//! Turns the file model into a [`Config`], collecting every problem instead of stopping at the
//! first, so an SRE fixes a broken file in one pass. Validation reads nothing but the text:
//! files and environment variables the config names are read by the resolve phase.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::file::{AdminFile, ClientFile, ConsumerFile, FileConfig, InterceptFile, LimitsFile};
use super::kinds::Lane;
use super::store::validate_store;
use super::upstream::{check_overlaps, validate_upstream, Upstream};
use super::{Config, LiveConfig, Problem, ProcessConfig};

/// `listen:`: the two listeners, bound once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Where services send proxied traffic (HTTP_PROXY / HTTPS_PROXY / reverse prefixes).
    pub proxy: SocketAddr,
    /// Metrics, health and the admin API.
    pub admin: SocketAddr,
    /// Without `clients:`, whether peers off loopback may use the proxy.
    pub allow_remote_clients: bool,
}

/// `limits:` that apply to every connection and request as it comes (the connection and tunnel
/// caps are sized at start and live in [`ProcessConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub max_connections_per_client: usize,
    pub tunnel_idle_timeout: Duration,
    /// `None`: all of `max_tunnels` in sidecar mode, a quarter of it when serving several clients.
    pub max_tunnels_per_client: Option<usize>,
    pub body_read_timeout: Duration,
    pub response_idle_timeout: Duration,
    pub http2_idle_timeout: Duration,
    pub max_connection_age: Duration,
}

/// `intercept:`: the CA that signs leaves for intercepted tunnels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intercept {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub leaf_ttl: Duration,
    pub leaf_cache_size: usize,
}

/// `admin:` settings read on every admin request (the connection cap is in [`ProcessConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where the bearer token for `/config` and `/reload` is kept, re-read on every check.
    pub token: Option<AdminToken>,
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminToken {
    File(PathBuf),
    Env(String),
}

/// One proxy client (`clients:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub name: Arc<str>,
    /// `Proxy-Authorization: Basic` user name; `None`: the client's name.
    pub user: Option<String>,
    pub secret: ClientSecret,
    /// Upstreams this client may use, by name (`*`: all).
    pub upstreams: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSecret {
    /// SHA-256 of the Basic password or the Bearer token.
    Sha256([u8; 32]),
    /// A file holding the password or token, re-read when it changes.
    File(PathBuf),
}

/// Checks everything and returns all problems at once.
pub fn validate(file: FileConfig) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let limits = validate_limits(&file.limits, &mut problems);
    let admin = validate_admin(&file.admin, &mut problems);
    if file.runtime.worker_threads == Some(0) {
        problems.push(Problem::new("runtime.worker_threads", "must be at least 1"));
    }
    let intercept = file.intercept.as_ref().map(|intercept| validate_intercept(intercept, &mut problems));
    let store = validate_store(&file.store, &mut problems);

    let mut upstreams: Vec<Arc<Upstream>> = Vec::with_capacity(file.upstreams.len());
    for (index, raw) in file.upstreams.iter().enumerate() {
        let key = format!("upstreams[{index}]");
        if let Some(upstream) = validate_upstream(raw, &key, file.intercept.is_some(), &mut problems) {
            check_overlaps(&upstream, &upstreams, &key, &mut problems);
            upstreams.push(Arc::new(upstream));
        }
    }
    let clients = validate_clients(&file.clients, &upstreams, &mut problems);
    let consumers = file.consumers.as_deref().map(|entries| validate_consumers(entries, &mut problems));
    if file.admin.token_file.is_some() && file.admin.token_env.is_some() {
        problems.push(Problem::new("admin", "set token_file or token_env, not both"));
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    let process = ProcessConfig {
        listen: Listen {
            proxy: file.listen.proxy,
            admin: file.listen.admin,
            allow_remote_clients: file.listen.allow_remote_clients,
        },
        store,
        worker_threads: file.runtime.worker_threads,
        max_connections: file.limits.max_connections,
        max_tunnels: file.limits.max_tunnels,
        admin_max_connections: file.admin.max_connections,
    };
    let live = LiveConfig {
        shutdown_grace: file.shutdown_grace,
        limits,
        intercept,
        upstreams,
        clients,
        consumers,
        admin,
        written: Arc::new(serde_json::to_value(&file).unwrap_or_default()),
    };
    Ok(Config { process, live })
}

fn validate_limits(limits: &LimitsFile, problems: &mut Vec<Problem>) -> ConnectionLimits {
    if limits.max_header_bytes < 8192 {
        problems.push(Problem::new("limits.max_header_bytes", "must be at least 8192"));
    }
    if limits.max_body_bytes == 0 {
        problems.push(Problem::new("limits.max_body_bytes", "must be greater than 0"));
    }
    if limits.max_connections == 0 {
        problems.push(Problem::new("limits.max_connections", "must be greater than 0"));
    }
    for (key, value) in [
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.tunnel_idle_timeout", limits.tunnel_idle_timeout),
        ("limits.body_read_timeout", limits.body_read_timeout),
        ("limits.response_idle_timeout", limits.response_idle_timeout),
        ("limits.http2_idle_timeout", limits.http2_idle_timeout),
    ] {
        if value.is_zero() {
            problems.push(Problem::new(key, "must be greater than 0"));
        }
    }
    if limits.max_connection_age < Duration::from_secs(1) {
        problems.push(Problem::new("limits.max_connection_age", "must be at least 1s"));
    }
    match limits.max_tunnels_per_client {
        Some(0) => problems.push(Problem::new("limits.max_tunnels_per_client", "must be at least 1")),
        Some(share) if share > limits.max_tunnels => problems.push(Problem::new(
            "limits.max_tunnels_per_client",
            format!("must not exceed limits.max_tunnels ({})", limits.max_tunnels),
        )),
        _ => {}
    }
    ConnectionLimits {
        max_header_bytes: limits.max_header_bytes,
        max_body_bytes: limits.max_body_bytes,
        header_read_timeout: limits.header_read_timeout,
        max_connections_per_client: limits.max_connections_per_client,
        tunnel_idle_timeout: limits.tunnel_idle_timeout,
        max_tunnels_per_client: limits.max_tunnels_per_client,
        body_read_timeout: limits.body_read_timeout,
        response_idle_timeout: limits.response_idle_timeout,
        http2_idle_timeout: limits.http2_idle_timeout,
        max_connection_age: limits.max_connection_age,
    }
}

fn validate_admin(admin: &AdminFile, problems: &mut Vec<Problem>) -> AdminSettings {
    if admin.header_read_timeout.is_zero() {
        problems.push(Problem::new("admin.header_read_timeout", "must be greater than 0"));
    }
    if admin.max_connections == 0 {
        problems.push(Problem::new("admin.max_connections", "must be greater than 0"));
    }
    let token = match (&admin.token_file, &admin.token_env) {
        (Some(path), _) => Some(AdminToken::File(path.clone())),
        (None, Some(name)) => Some(AdminToken::Env(name.clone())),
        (None, None) => None,
    };
    AdminSettings { token, header_read_timeout: admin.header_read_timeout }
}

fn validate_intercept(intercept: &InterceptFile, problems: &mut Vec<Problem>) -> Intercept {
    if intercept.leaf_cache_size == 0 {
        problems.push(Problem::new("intercept.leaf_cache_size", "must be at least 1"));
    }
    if intercept.leaf_ttl < Duration::from_secs(3600) {
        problems.push(Problem::new("intercept.leaf_ttl", "must be at least 1h"));
    }
    Intercept {
        ca_cert: intercept.ca_cert.clone(),
        ca_key: intercept.ca_key.clone(),
        leaf_ttl: intercept.leaf_ttl,
        leaf_cache_size: intercept.leaf_cache_size,
    }
}

fn validate_clients(
    raw: &[ClientFile],
    upstreams: &[Arc<Upstream>],
    problems: &mut Vec<Problem>,
) -> Vec<ClientSettings> {
    let mut clients = Vec::with_capacity(raw.len());
    for (index, client) in raw.iter().enumerate() {
        let key = format!("clients[{index}]");
        if client.name.is_empty() || raw[..index].iter().any(|other| other.name == client.name) {
            problems.push(Problem::new(format!("{key}.name"), "must be non-empty and unique"));
        }
        let secret = match (&client.secret_sha256, &client.secret_file) {
            (Some(hex), None) => match parse_sha256(hex) {
                Some(digest) => Some(ClientSecret::Sha256(digest)),
                None => {
                    problems.push(Problem::new(format!("{key}.secret_sha256"), "must be 64 hex digits (SHA-256)"));
                    None
                }
            },
            (None, Some(path)) => Some(ClientSecret::File(path.clone())),
            _ => {
                problems.push(Problem::new(key.clone(), "needs exactly one of secret_sha256 and secret_file"));
                None
            }
        };
        for (at, name) in client.upstreams.iter().enumerate() {
            if name != "*" && !upstreams.iter().any(|upstream| *upstream.name == **name) {
                problems.push(Problem::new(format!("{key}.upstreams[{at}]"), format!("no upstream is named `{name}`")));
            }
        }
        if let Some(secret) = secret {
            clients.push(ClientSettings {
                name: Arc::from(client.name.as_str()),
                user: client.user.clone(),
                secret,
                upstreams: client.upstreams.clone(),
            });
        }
    }
    clients
}

/// Consumer names the attribution itself uses, so no listed consumer may take them.
pub const RESERVED_CONSUMERS: &[&str] = &["other", "none"];

/// One known consumer (`consumers:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    pub name: Arc<str>,
    /// The lane of its requests that send no `Sluice-Priority`; `None`: `normal`.
    pub lane: Option<Lane>,
}

/// `consumers:`: each a metric label value and a Redis hash field, so short and plain: 1-64 of
/// A-Z, a-z, 0-9, `.`, `-` and `_` (a service account name or an `app` label fits), unique, and
/// not one of [`RESERVED_CONSUMERS`]. At most 1000, so the series they make stay bounded.
fn validate_consumers(raw: &[ConsumerFile], problems: &mut Vec<Problem>) -> Vec<ConsumerSettings> {
    if raw.len() > MAX_CONSUMERS {
        problems.push(Problem::new("consumers", format!("at most {MAX_CONSUMERS} consumers")));
    }
    let mut consumers: Vec<ConsumerSettings> = Vec::with_capacity(raw.len());
    for (index, entry) in raw.iter().enumerate() {
        let name = entry.name();
        let key = match entry {
            ConsumerFile::Name(_) => format!("consumers[{index}]"),
            ConsumerFile::Detailed(_) => format!("consumers[{index}].name"),
        };
        if !is_consumer_name(name) {
            problems.push(Problem::new(key, "must be 1-64 characters of A-Z, a-z, 0-9, ., - and _"));
        } else if RESERVED_CONSUMERS.contains(&name) {
            problems.push(Problem::new(key, format!("`{name}` is reserved (it counts what no listed consumer spent)")));
        } else if consumers.iter().any(|seen| &*seen.name == name) {
            problems.push(Problem::new(key, format!("`{name}` is listed twice")));
        } else {
            consumers.push(ConsumerSettings { name: Arc::from(name), lane: entry.lane() });
        }
    }
    consumers
}

/// Most entries of `consumers:`.
pub const MAX_CONSUMERS: usize = 1000;

/// Whether `name` may be a consumer: 1-64 of A-Z, a-z, 0-9, `.`, `-` and `_`.
pub fn is_consumer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (at, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(at * 2..at * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}
