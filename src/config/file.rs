//! The YAML file exactly as an operator writes it.
//!
//! Every struct denies unknown fields: a misspelt key is an error naming the key and line, never a
//! silently ignored setting. Defaults live here, next to the field they fill, so the file model is
//! also the reference of what an omitted key means. `validate` turns this model into [`Config`].
//!
//! [`Config`]: super::Config

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: ListenFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub intercept: Option<InterceptFile>,
    #[serde(default)]
    pub runtime: RuntimeFile,
    /// How long in-flight requests and tunnels may run after SIGTERM before sluice exits anyway.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub upstreams: Vec<UpstreamFile>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// Where services send proxied traffic (HTTP_PROXY / HTTPS_PROXY / reverse prefixes).
    pub proxy: SocketAddr,
    /// Metrics, health and the admin API.
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    #[serde(default)]
    pub kind: StoreKind,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Quota state in this process only: one replica.
    #[default]
    Memory,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InterceptFile {
    /// PEM certificate of the interception CA. Generated with the key when both files are absent.
    pub ca_cert: PathBuf,
    /// PEM private key of the interception CA.
    pub ca_key: PathBuf,
    /// Lifetime of a minted leaf certificate; leaves are re-minted before they expire.
    #[serde(default = "default_leaf_ttl", with = "humantime_serde")]
    pub leaf_ttl: Duration,
    /// Most leaf certificates kept in memory at once.
    #[serde(default = "default_leaf_cache")]
    pub leaf_cache_size: usize,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    /// Tokio worker threads. Default: the CPUs this process may use (cgroup quota honoured).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest request head (request line plus headers) accepted, in bytes.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body forwarded, in bytes; larger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// A client must send its whole request head within this time (slowloris guard).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Most client connections (including tunnels) open at once; further ones wait in the backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// An idle tunnel (no bytes either way) is closed after this long.
    #[serde(default = "default_tunnel_idle_timeout", with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout: default_header_read_timeout(),
            max_connections: default_max_connections(),
            tunnel_idle_timeout: default_tunnel_idle_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Unique name: used in metrics, logs and error bodies.
    pub name: String,
    /// Hostnames this upstream answers for (`api.hubapi.com`, or `*.my.salesforce.com`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Reverse mode: `http://sluice/<prefix>/...` goes to this upstream with the prefix stripped.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `scheme://host[:port]` where this upstream's traffic really goes.
    #[serde(default)]
    pub target: Option<String>,
    /// Terminate TLS of CONNECT tunnels to these hosts and proxy the requests inside.
    #[serde(default)]
    pub intercept: bool,
    /// Ports a CONNECT to these hosts may name (the target's port is always allowed).
    #[serde(default = "default_connect_ports")]
    pub connect_ports: Vec<u16>,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub tls: UpstreamTlsFile,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    /// TCP connect plus TLS handshake to the upstream.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to receiving the response head.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request: Duration,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self { connect: default_connect_timeout(), request: default_request_timeout() }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// Extra PEM CA certificates trusted for this upstream, besides the webpki roots.
    #[serde(default)]
    pub extra_ca: Option<PathBuf>,
}

// === defaults ===

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_leaf_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_leaf_cache() -> usize {
    1024
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_body_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_ports() -> Vec<u16> {
    vec![443]
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
