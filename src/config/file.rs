//! The YAML file exactly as an operator writes it.
//!
//! Every struct denies unknown fields: a misspelt key is an error naming the key and line, never a
//! silently ignored setting. Defaults are written once, next to the fields they fill: a struct
//! whose every key may be left out takes `#[serde(default)]` and one `Default` impl; a struct
//! with required keys names a default function per optional field. The file model is therefore
//! also the reference of what an omitted key means. Nothing outside `config` sees these types:
//! `validate` turns them into [`Config`].
//!
//! [`Config`]: super::Config

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::kinds::{ClientAuth, CredentialMode, Grant, Lane, OnFailure, OverLimit, ShapeKind, StoreKind, WindowKind};
use crate::vendor::{ProfileKind, ResetUnit};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: ListenFile,
    pub store: StoreFile,
    pub intercept: Option<InterceptFile>,
    pub runtime: RuntimeFile,
    /// How long in-flight requests and tunnels may run after SIGTERM before sluice exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub limits: LimitsFile,
    pub upstreams: Vec<UpstreamFile>,
    /// Proxy clients for shared (non-sidecar) deployments; when set, every request must say
    /// who it is with `Proxy-Authorization`.
    pub clients: Vec<ClientFile>,
    /// The known consumers quota spend is attributed to (`sluice_quota_spent_total`, `/usage`);
    /// any other value counts as `other`. Absent: the names of `clients:`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumers: Option<Vec<ConsumerFile>>,
    pub admin: AdminFile,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: ListenFile::default(),
            store: StoreFile::default(),
            intercept: None,
            runtime: RuntimeFile::default(),
            shutdown_grace: Duration::from_secs(30),
            limits: LimitsFile::default(),
            upstreams: Vec::new(),
            clients: Vec::new(),
            consumers: None,
            admin: AdminFile::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenFile {
    /// Where services send proxied traffic (HTTP_PROXY / HTTPS_PROXY / reverse prefixes).
    pub proxy: SocketAddr,
    /// Metrics, health and the admin API; loopback unless said otherwise.
    pub admin: SocketAddr,
    /// Without `clients:`, only loopback peers may use the proxy unless this is true.
    pub allow_remote_clients: bool,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            proxy: SocketAddr::from(([127, 0, 0, 1], 3128)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            allow_remote_clients: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminFile {
    /// Bearer token for `POST /reload` and `GET /config` when the admin listener is not on
    /// loopback (read from this file; re-read on every check, so rotation needs no restart).
    pub token_file: Option<PathBuf>,
    /// ... or from this environment variable.
    pub token_env: Option<String>,
    /// Most admin connections open at once; past it a new one is closed at once.
    pub max_connections: usize,
    /// An admin connection must send its first request head within this time, and the next one
    /// within this time of the last answer; otherwise it is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self { token_file: None, token_env: None, max_connections: 128, header_read_timeout: Duration::from_secs(10) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The client's name: its `proxy_user` quota scope, in logs and metrics.
    pub name: String,
    /// `Proxy-Authorization: Basic` user name (default: the client's name).
    #[serde(default)]
    pub user: Option<String>,
    /// SHA-256 (hex) of the Basic password or the Bearer token.
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// File holding the Basic password or Bearer token (re-read when it changes).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Upstreams this client may use (by name); empty: none.
    pub upstreams: Vec<String>,
}

/// One of `consumers:`: a name, or a name with the lane its requests take by default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ConsumerFile {
    Name(String),
    Detailed(ConsumerDetail),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsumerDetail {
    pub name: String,
    /// The lane of this consumer's requests that send no `Sluice-Priority`.
    pub lane: Lane,
}

impl ConsumerFile {
    pub fn name(&self) -> &str {
        match self {
            ConsumerFile::Name(name) => name,
            ConsumerFile::Detailed(detail) => &detail.name,
        }
    }

    pub fn lane(&self) -> Option<Lane> {
        match self {
            ConsumerFile::Name(_) => None,
            ConsumerFile::Detailed(detail) => Some(detail.lane),
        }
    }
}

/// `lanes:` of an upstream: what each lane may take of any window of each quota.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LanesFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal: Option<LaneFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low: Option<LaneFile>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaneFile {
    /// The most this lane may take of any window of each quota (0.7: 70%), so later traffic of
    /// higher lanes finds room.
    pub max_share: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreFile {
    pub kind: StoreKind,
    /// `redis://`, `rediss://` or `redis+cluster://host:port,host:port`. Required for `kind: redis`.
    pub url: Option<String>,
    /// ... or read the URL from this file (a mounted Secret), so a password stays out of the config.
    pub url_file: Option<PathBuf>,
    /// ... or from this environment variable.
    pub url_env: Option<String>,
    /// What to do while Redis is unreachable or slower than `timeout`.
    pub on_failure: OnFailure,
    /// The longest a request waits on Redis before the `on_failure` policy applies.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Prefix of every Redis key sluice writes.
    pub key_prefix: String,
    /// How often each replica announces itself (the replica count sets the local share).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Most tokens one replica takes ahead for one busy scope (0 or 1: every decision in Redis).
    pub lease_max: u64,
    /// Longest a leased token may wait to be spent (capped at half a quota's `margin`).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            url: None,
            url_file: None,
            url_env: None,
            on_failure: OnFailure::default(),
            timeout: Duration::from_millis(50),
            key_prefix: "sluice".to_owned(),
            heartbeat: Duration::from_secs(2),
            lease_max: 64,
            lease_ttl: Duration::from_millis(50),
        }
    }
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
#[serde(default, deny_unknown_fields)]
pub struct RuntimeFile {
    /// Tokio worker threads. Default: the CPUs this process may use (cgroup quota honoured).
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest request head (request line plus headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Largest request body forwarded, in bytes; larger ones get 413.
    pub max_body_bytes: u64,
    /// A client must send its whole request head within this time (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Most client connections (including tunnels) open at once; further ones wait in the backlog.
    pub max_connections: usize,
    /// Most CONNECT tunnels open at once; more get 503.
    pub max_tunnels: usize,
    /// Most connections (tunnels included) one client address may hold open; more are refused.
    pub max_connections_per_client: usize,
    /// An idle tunnel (no bytes either way) is closed after this long.
    #[serde(with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
    /// Most CONNECT tunnels one client (its authenticated name, else its address) may hold open.
    /// Default: all of `max_tunnels` in sidecar mode, a quarter of it when serving several clients.
    pub max_tunnels_per_client: Option<usize>,
    /// The longest sluice waits for the next bytes of a request body before answering 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A response the client takes no bytes of for this long is abandoned (its concurrency
    /// slot released, the vendor's connection closed).
    #[serde(with = "humantime_serde")]
    pub response_idle_timeout: Duration,
    /// An HTTP/2 client connection with no stream open for this long gets GOAWAY and closes.
    #[serde(with = "humantime_serde")]
    pub http2_idle_timeout: Duration,
    /// A client connection older than this is closed gracefully (HTTP/1 after its current
    /// response, HTTP/2 with GOAWAY), and cut 30 s later if still open.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_tunnels: 4096,
            max_connections_per_client: 1024,
            tunnel_idle_timeout: Duration::from_secs(300),
            max_tunnels_per_client: None,
            body_read_timeout: Duration::from_secs(10),
            response_idle_timeout: Duration::from_secs(10),
            http2_idle_timeout: Duration::from_secs(300),
            max_connection_age: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
    /// Allow blind (not intercepted) CONNECT tunnels even though they skip this upstream's
    /// quotas, concurrency cap, credentials and batch rules. Without it such tunnels get 403.
    #[serde(default)]
    pub blind_tunnel: bool,
    /// Ports a CONNECT to these hosts may name (the target's port is always allowed).
    #[serde(default = "default_connect_ports")]
    pub connect_ports: Vec<u16>,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub tls: UpstreamTlsFile,
    /// The vendor's quotas, all enforced at once.
    #[serde(default)]
    pub quotas: Vec<QuotaFile>,
    /// Over quota: wait for a turn (`queue`) or answer 429 at once (`reject`).
    #[serde(default)]
    pub over_limit: OverLimit,
    /// The longest a request waits for quota or a concurrency slot before 429.
    #[serde(default = "default_max_queue_wait", with = "humantime_serde")]
    pub max_queue_wait: Duration,
    /// Most requests in flight to this upstream at once (per replica); more wait in line.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// What the `normal` and `low` lanes may take of any window (`low: { max_share: 0.7 }`).
    #[serde(default, skip_serializing_if = "is_default_lanes")]
    pub lanes: LanesFile,
    /// Per-route token costs (`match: "POST /crm/v3/objects/{object}/batch/create", cost: 10`).
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    /// The vendor's rate-limit header dialect: `hubspot`, `salesforce`, `ietf`, `x-ratelimit`,
    /// `github`, `dynamics`, `zendesk`, `none`; or `{ profile, reset, pause_at_remaining }`.
    #[serde(default)]
    pub limit_headers: LimitHeadersFile,
    /// Retries of failed idempotent requests. Absent: no retries.
    #[serde(default)]
    pub retry: Option<RetryFile>,
    /// Circuit breaker. Absent: no breaker.
    #[serde(default)]
    pub breaker: Option<BreakerFile>,
    /// Rules folding single-record calls into the vendor's bulk endpoints.
    #[serde(default)]
    pub batch: Vec<BatchFile>,
    /// A credential sluice adds to every request to this upstream.
    #[serde(default)]
    pub credentials: Option<CredentialsFile>,
    /// The path (and query) `sluice probe` sends its safe requests to, when `--path` is not given:
    /// a cheap read this account may make, such as `/crm/v3/objects/contacts?limit=1`.
    #[serde(default)]
    pub probe_path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    /// The single call: `POST /crm/v3/objects/{object}` (`{id}` names the record id segment).
    #[serde(rename = "match")]
    pub matches: String,
    /// The bulk call, with the same captures: `POST /crm/v3/objects/{object}/batch/create`.
    pub bulk: String,
    /// The vendor's bulk format: `hubspot` (CRM v3 `batch/create|read|update|archive`) or
    /// `salesforce-collections` (sObject Collections create/update). The batch room knows them.
    pub format: String,
    /// Flush when a batch holds this many calls.
    #[serde(default = "default_max_items")]
    pub max_items: usize,
    /// Flush this long after a batch's first call, full or not.
    #[serde(default = "default_max_delay", with = "humantime_serde")]
    pub max_delay: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum LimitHeadersFile {
    Profile(ProfileKind),
    Detailed(LimitHeadersDetail),
}

impl Default for LimitHeadersFile {
    fn default() -> Self {
        LimitHeadersFile::Profile(ProfileKind::None)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitHeadersDetail {
    pub profile: ProfileKind,
    /// `x-ratelimit` only: whether the reset header counts seconds from now or epoch seconds.
    #[serde(default)]
    pub reset: ResetUnit,
    /// Pause all replicas once the vendor reports this many requests left (or fewer).
    #[serde(default)]
    pub pause_at_remaining: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryFile {
    /// Tries in all, the first included (1 = no retries).
    pub attempts: u32,
    /// Base of the exponential backoff (full jitter).
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Retries allowed per ordinary request over a 10 s sliding window (0.2 = 20%).
    pub budget: f64,
    /// Request bodies larger than this are streamed and never retried.
    pub max_body_bytes: u64,
}

impl Default for RetryFile {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            budget: 0.2,
            max_body_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerFile {
    /// Open when failures / requests over `window` reach this (once `min_requests` were seen).
    pub failure_ratio: f64,
    pub min_requests: u64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Open after this many failures in a row, whatever the ratio.
    pub consecutive_failures: u64,
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    #[serde(with = "humantime_serde")]
    pub max_open_for: Duration,
    /// Probes let through per half-open period.
    pub half_open_requests: u64,
    /// Statuses that count as failures (connect errors and timeouts always do; 429 never).
    pub failure_statuses: Vec<u16>,
    /// Wildcard upstreams without a target keep one breaker per destination host: at most this
    /// many, the least recently used forgotten first.
    pub max_hosts: usize,
}

impl Default for BreakerFile {
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            consecutive_failures: 5,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(120),
            half_open_requests: 3,
            failure_statuses: vec![500, 502, 503, 504],
            max_hosts: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaFile {
    /// Name shown in metrics, `/quotas` and the `RateLimit` headers (a-z, 0-9, -, _).
    pub name: String,
    /// Requests allowed in any window of length `per` (rolling) or per window (fixed).
    pub limit: u64,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Scope: one bucket per distinct value of these (`header:NAME`, `client_ip`, `proxy_user`).
    #[serde(default)]
    pub key: Vec<String>,
    /// Rolling windows: `burst` (the default) admits all of `limit` back to back, as the
    /// vendor's own rolling window does; `smooth` paces requests (GCRA) with `burst` at once.
    #[serde(default)]
    pub shape: Option<ShapeKind>,
    /// `shape: smooth` only: how many requests may go back to back. Default: 5% of `limit`,
    /// at least 1. Given without `shape`, it implies `shape: smooth`.
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default)]
    pub window: WindowKind,
    /// Fixed windows only: when the window resets, `"HH:MM Area/City"` (e.g. `00:00 America/New_York`).
    #[serde(default)]
    pub resets_at: Option<String>,
    /// Added to `per` so jitter between sluice and the vendor cannot push a window over.
    /// Default: 1% of `per`, at most 250ms.
    #[serde(default, with = "humantime_serde")]
    pub margin: Option<Duration>,
    /// Most distinct scope values tracked; the least recently used is evicted past this.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// The trailing window the spend rate is measured over for the exhaustion forecast.
    /// Default: `per / 24` (an hour for a daily quota), between 10s and 1h.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub forecast_window: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// `METHOD /path/{capture}/*`: `{name}` and `*` match one segment, a trailing `/**` the rest.
    #[serde(rename = "match")]
    pub matches: String,
    /// Tokens one call takes from every quota of the upstream.
    #[serde(default = "default_cost")]
    pub cost: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsFile {
    /// TCP connect to the upstream (the TLS handshake counts against `request`).
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to receiving the response head.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self { connect: Duration::from_secs(2), request: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// Extra PEM CA certificates trusted for this upstream, besides the webpki roots.
    pub extra_ca: Option<PathBuf>,
    /// Client certificate (PEM chain) for mutual TLS with the vendor.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsFile {
    /// The header sluice sets on every upstream request.
    pub header: String,
    /// Put before the secret (`"Bearer "`). Default: none, `"Bearer "` with `oauth2`.
    pub prefix: Option<String>,
    /// File holding the secret (a Kubernetes Secret mount); re-read when it changes.
    pub value_file: Option<PathBuf>,
    /// Environment variable holding the secret.
    pub value_env: Option<String>,
    /// An access token sluice obtains and refreshes itself (OAuth 2.0).
    pub oauth2: Option<OAuth2File>,
    /// `replace` what the client sent, or set it only `if_absent`.
    pub mode: CredentialMode,
}

impl Default for CredentialsFile {
    fn default() -> Self {
        Self {
            header: "authorization".to_owned(),
            prefix: None,
            value_file: None,
            value_env: None,
            oauth2: None,
            mode: CredentialMode::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OAuth2File {
    /// The token endpoint (`https://api.hubapi.com/oauth/v1/token`).
    pub token_url: String,
    /// `refresh_token` or `client_credentials`.
    pub grant: Grant,
    /// File holding the OAuth client id.
    pub client_id_file: PathBuf,
    /// File holding the client secret (required for `client_credentials`).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// File holding the refresh token (`grant: refresh_token` only). A rotated one is written
    /// back when the file is writable, and kept in memory (and the Redis store) either way.
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    /// `scope` sent to the token endpoint (space-separated).
    #[serde(default)]
    pub scope: Option<String>,
    /// `audience` sent to the token endpoint (Auth0 and similar).
    #[serde(default)]
    pub audience: Option<String>,
    /// Client id and secret in the form `body`, or as HTTP `basic` authentication.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Send requests to the `instance_url` of the token answer (Salesforce) instead of `target`.
    #[serde(default)]
    pub instance_url: bool,
}

// === defaults of optional keys in structs with required ones ===

fn is_default_lanes(lanes: &LanesFile) -> bool {
    *lanes == LanesFile::default()
}

fn default_leaf_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_leaf_cache() -> usize {
    1024
}
fn default_connect_ports() -> Vec<u16> {
    vec![443]
}
fn default_max_queue_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_max_items() -> usize {
    100
}
fn default_max_delay() -> Duration {
    Duration::from_millis(25)
}
fn default_max_keys() -> usize {
    10_000
}
fn default_cost() -> u64 {
    1
}
