//! An upstream, validated: where its traffic goes, and everything the request path applies to
//! it (quotas, feedback, retries, breaker, batching, credentials), each in its own validated type.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Uri};

use super::batch::{validate_batch, BatchRule};
use super::file::{CredentialsFile, OAuth2File, UpstreamFile};
use super::kinds::{ClientAuth, CredentialMode, Grant};
use super::policy::{feedback_of, validate_quota, validate_routes, Feedback, Limits, Quota, ScopeKey, Window};
use super::resilience::{validate_breaker, validate_retry, BreakerSettings, RetryPolicy};
use super::Problem;

/// One vendor API that sluice proxies to, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: Arc<str>,
    pub hosts: Vec<HostPattern>,
    /// Reverse-mode path prefix, without a trailing slash (`/hubspot`).
    pub prefix: Option<String>,
    /// Where requests really go; `None` means the host the client asked for.
    pub target: Option<Target>,
    /// Where reverse-mode (prefix) requests go: `target`, else `https://<first host>`.
    pub reverse_target: Option<Target>,
    pub intercept: bool,
    /// Blind tunnels are allowed even though they skip what [`Upstream::blind_tunnel_skips`] lists.
    pub blind_tunnel: bool,
    pub connect_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub extra_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS with the vendor.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Quotas, queueing and route costs.
    pub limits: Limits,
    /// How to read the vendor's rate-limit headers.
    pub feedback: Feedback,
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<BreakerSettings>,
    pub batch: Vec<BatchRule>,
    pub credentials: Option<Credentials>,
    /// Where `sluice probe` sends its requests unless told otherwise (`/path?query`).
    pub probe_path: Option<String>,
}

/// A credential sluice sets on every request to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The header it travels in.
    pub header: HeaderName,
    /// Put before the secret (`"Bearer "`).
    pub prefix: String,
    pub value: SecretSource,
    pub mode: CredentialMode,
}

/// Where a secret is kept; it is read by the resolve phase, never by validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (a Kubernetes Secret mount), re-read when it changes.
    File(PathBuf),
    /// An environment variable, read once per load.
    Env(String),
    /// An OAuth 2.0 token endpoint: sluice obtains the access token and refreshes it (the
    /// `oauth` room's broker); the files it names are read at each refresh.
    OAuth2(Arc<OAuth2>),
}

/// `credentials.oauth2`, validated: how sluice obtains the access token it injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2 {
    /// The token endpoint: `https://`, or `http://` to a loopback address only.
    pub token_url: Uri,
    pub grant: Grant,
    pub client_id_file: PathBuf,
    /// Required for `client_credentials`; optional for `refresh_token` (public clients).
    pub client_secret_file: Option<PathBuf>,
    /// Required for, and only for, `refresh_token`.
    pub refresh_token_file: Option<PathBuf>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub client_auth: ClientAuth,
    /// Requests go to the token answer's `instance_url` (Salesforce) instead of `target`.
    pub instance_url: bool,
}

impl Upstream {
    /// Whether this upstream answers for `host` (already lower-cased, no port).
    pub fn serves_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|pattern| pattern.matches(host))
    }

    /// Whether a CONNECT to `port` is allowed: a listed port, or the target's own.
    pub fn allows_port(&self, port: u16) -> bool {
        self.connect_ports.contains(&port) || self.target.as_ref().is_some_and(|target| target.port == port)
    }

    /// What a blind tunnel to this upstream would go around: sluice never sees the requests
    /// inside one, so it can neither count, cap, credential nor batch them.
    pub fn blind_tunnel_skips(&self) -> Vec<&'static str> {
        let mut skipped = Vec::new();
        if !self.limits.quotas.is_empty() {
            skipped.push("quotas");
        }
        if self.limits.max_concurrency.is_some() {
            skipped.push("max_concurrency");
        }
        if self.credentials.is_some() {
            skipped.push("credentials");
        }
        if !self.batch.is_empty() {
            skipped.push("batch");
        }
        skipped
    }

    /// Why a CONNECT to this upstream may not become a blind tunnel, if it may not: it is not
    /// intercepted, has something a tunnel would skip, and does not say `blind_tunnel: true`.
    pub fn blind_tunnel_refusal(&self) -> Option<String> {
        if self.intercept || self.blind_tunnel {
            return None;
        }
        let skipped = self.blind_tunnel_skips();
        if skipped.is_empty() {
            return None;
        }
        Some(format!(
            "a blind tunnel would skip this upstream's {}: set `intercept: true` to apply them inside tunnels, \
             or `blind_tunnel: true` to allow tunnels without them",
            skipped.join(", ")
        ))
    }
}

/// A hostname an upstream answers for: exact, or `*.suffix` for any subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` is `.example.com`.
    Subdomains(String),
}

impl HostPattern {
    fn parse(raw: &str) -> Result<Self, String> {
        let lower = raw.trim().to_ascii_lowercase();
        let (pattern, name) = match lower.strip_prefix("*.") {
            Some(rest) => (HostPattern::Subdomains(format!(".{rest}")), rest.to_owned()),
            None => (HostPattern::Exact(lower.clone()), lower),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if valid || name.parse::<std::net::IpAddr>().is_ok() {
            Ok(pattern)
        } else {
            Err(format!("`{raw}` is not a hostname (or *.hostname)"))
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name == host,
            HostPattern::Subdomains(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// `scheme://host:port` of the server that really receives an upstream's traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub authority: Authority,
}

impl Target {
    fn parse(raw: &str) -> Result<Self, String> {
        let uri: Uri = raw.parse().map_err(|_| format!("`{raw}` is not a URL like https://host:port"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(format!("`{raw}` must start with http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| format!("`{raw}` has no host"))?.clone();
        if authority.as_str().contains('@') {
            return Err(format!("`{raw}` must not carry credentials"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!("`{raw}` must be scheme://host[:port] with no path"));
        }
        let port = authority.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        Ok(Target { scheme, host, port, authority })
    }

    /// The same upstream address as a target, for upstreams that name only hosts.
    pub fn for_host(scheme: Scheme, host: &str, port: u16) -> Option<Self> {
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let text = if port == default_port { host.to_owned() } else { format!("{host}:{port}") };
        let authority = text.parse().ok()?;
        Some(Target { scheme, host: host.to_owned(), port, authority })
    }
}

/// Validates one upstream; `None` when it has a problem (each one is in `problems`).
pub(super) fn validate_upstream(
    raw: &UpstreamFile,
    key: &str,
    have_ca: bool,
    problems: &mut Vec<Problem>,
) -> Option<Upstream> {
    let before = problems.len();
    super::check_name(&raw.name, &format!("{key}.name"), problems);
    let route = validate_routing(raw, key, have_ca, problems);
    let mut limits = validate_limits(raw, key, problems);
    let retry = raw.retry.as_ref().map(|retry| validate_retry(retry, &format!("{key}.retry"), problems));
    if raw.tls.client_cert.is_some() != raw.tls.client_key.is_some() {
        problems.push(Problem::new(format!("{key}.tls"), "client_cert and client_key go together"));
    }
    let batch = validate_batch(&raw.batch, &format!("{key}.batch"), problems);
    let credentials =
        raw.credentials.as_ref().and_then(|credentials| validate_credentials(credentials, raw, key, problems));
    // `key: [credential]` means the header this upstream's credential travels in.
    let credential_header = credentials.as_ref().map_or(http::header::AUTHORIZATION, |c| c.header.clone());
    for quota in &mut limits.quotas {
        for scope in &mut quota.scope {
            if let ScopeKey::Credential(name) = scope {
                *name = credential_header.clone();
            }
        }
    }
    let breaker = raw.breaker.as_ref().map(|breaker| validate_breaker(breaker, &format!("{key}.breaker"), problems));
    if let Some(Err(message)) = raw.probe_path.as_deref().map(check_probe_path) {
        problems.push(Problem::new(format!("{key}.probe_path"), message));
    }
    if problems.len() > before {
        return None;
    }
    let Routing { hosts, prefix, target } = route;
    // Reverse mode needs somewhere to send to; forward requests to this upstream's other hosts
    // keep going where the client asked (through the egress guard).
    let reverse_target = target.clone().or_else(|| match (&prefix, hosts.first()) {
        (Some(_), Some(HostPattern::Exact(host))) => Target::for_host(Scheme::Https, host, 443),
        _ => None,
    });
    Some(Upstream {
        name: Arc::from(raw.name.as_str()),
        hosts,
        prefix,
        target,
        reverse_target,
        intercept: raw.intercept,
        blind_tunnel: raw.blind_tunnel,
        connect_ports: raw.connect_ports.clone(),
        connect_timeout: raw.timeouts.connect,
        request_timeout: raw.timeouts.request,
        extra_ca: raw.tls.extra_ca.clone(),
        client_cert: raw.tls.client_cert.clone().zip(raw.tls.client_key.clone()),
        limits,
        feedback: feedback_of(&raw.limit_headers),
        retry,
        breaker,
        batch,
        credentials,
        probe_path: raw.probe_path.clone(),
    })
}

/// Whether `path` is one `sluice probe` may send to: an origin-form path with an optional query
/// (`/crm/v3/objects/contacts?limit=1`), at most 2048 bytes, no fragment, no spaces or controls.
pub fn check_probe_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.starts_with("//") {
        return Err(format!(
            "`{path}` must be a path starting with a single / (like /crm/v3/objects/contacts?limit=1)"
        ));
    }
    if path.len() > 2048 {
        return Err("must be at most 2048 bytes".into());
    }
    if path.contains('#') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(format!("`{path}` must not contain #, spaces or control characters"));
    }
    http::uri::PathAndQuery::try_from(path).map(drop).map_err(|_| format!("`{path}` is not a valid request path"))
}

/// Where an upstream's traffic comes from and goes to.
struct Routing {
    hosts: Vec<HostPattern>,
    prefix: Option<String>,
    target: Option<Target>,
}

/// Hosts, prefix, target, interception, ports and timeouts.
fn validate_routing(raw: &UpstreamFile, key: &str, have_ca: bool, problems: &mut Vec<Problem>) -> Routing {
    let mut hosts = Vec::with_capacity(raw.hosts.len());
    for (at, host) in raw.hosts.iter().enumerate() {
        match HostPattern::parse(host) {
            Ok(pattern) => hosts.push(pattern),
            Err(message) => problems.push(Problem::new(format!("{key}.hosts[{at}]"), message)),
        }
    }
    let prefix = raw.prefix.as_deref().map(|prefix| prefix.trim_end_matches('/').to_owned());
    if let Some(prefix) = &prefix {
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(['?', '#', ' ']) {
            problems.push(Problem::new(format!("{key}.prefix"), "must be a path like /hubspot"));
        }
    }
    if raw.hosts.is_empty() && prefix.is_none() {
        problems.push(Problem::new(format!("{key}.hosts"), "an upstream needs hosts, a prefix, or both"));
    }
    let target = match raw.target.as_deref().map(Target::parse) {
        Some(Ok(target)) => Some(target),
        Some(Err(message)) => {
            problems.push(Problem::new(format!("{key}.target"), message));
            None
        }
        None => None,
    };
    if prefix.is_some() && raw.target.is_none() && !matches!(hosts.first(), Some(HostPattern::Exact(_))) {
        problems.push(Problem::new(
            format!("{key}.target"),
            "reverse mode (prefix) needs a target, or an exact first host to send to",
        ));
    }
    if raw.intercept {
        if !have_ca {
            problems.push(Problem::new(
                format!("{key}.intercept"),
                "needs the top-level `intercept: { ca_cert, ca_key }` section",
            ));
        }
        if raw.hosts.is_empty() {
            problems.push(Problem::new(format!("{key}.hosts"), "intercept needs at least one host"));
        }
        if raw.blind_tunnel {
            problems.push(Problem::new(
                format!("{key}.blind_tunnel"),
                "has no effect with `intercept: true` (tunnels to this upstream are intercepted): remove one",
            ));
        }
    }
    for (field, value) in [("connect", raw.timeouts.connect), ("request", raw.timeouts.request)] {
        if value.is_zero() {
            problems.push(Problem::new(format!("{key}.timeouts.{field}"), "must be greater than 0"));
        }
    }
    if raw.connect_ports.contains(&0) {
        problems.push(Problem::new(format!("{key}.connect_ports"), "0 is not a port"));
    }
    Routing { hosts, prefix, target }
}

/// Quotas, route costs (which no quota may be too small for), queueing and the concurrency cap.
fn validate_limits(raw: &UpstreamFile, key: &str, problems: &mut Vec<Problem>) -> Limits {
    let mut quotas: Vec<Quota> = Vec::with_capacity(raw.quotas.len());
    for (at, quota) in raw.quotas.iter().enumerate() {
        let quota_key = format!("{key}.quotas[{at}]");
        if let Some(quota) = validate_quota(quota, &quota_key, problems) {
            if quotas.iter().any(|q| q.name == quota.name) {
                problems.push(Problem::new(format!("{quota_key}.name"), format!("`{}` is used twice", quota.name)));
            }
            quotas.push(quota);
        }
    }
    let routes = validate_routes(&raw.routes, key, problems);
    if let Some(cost) = routes.iter().map(|route| route.cost).max() {
        for (at, quota) in quotas.iter().enumerate() {
            let (capacity, field) = match quota.window {
                Window::Smooth => (quota.burst, "burst"),
                Window::Rolling | Window::Fixed { .. } => (quota.limit, "limit"),
            };
            if cost > capacity {
                problems.push(Problem::new(
                    format!("{key}.quotas[{at}].{field}"),
                    format!("a route costs {cost} tokens but this quota never holds more than {capacity}"),
                ));
            }
        }
    }
    if raw.max_concurrency == Some(0) {
        problems.push(Problem::new(format!("{key}.max_concurrency"), "must be at least 1"));
    }
    Limits {
        quotas,
        over_limit: raw.over_limit,
        max_queue_wait: raw.max_queue_wait,
        max_concurrency: raw.max_concurrency,
        routes,
        lanes: super::policy::validate_lanes(&raw.lanes, key, problems),
    }
}

fn validate_credentials(
    raw: &CredentialsFile,
    upstream: &UpstreamFile,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<Credentials> {
    // Without a target, a request goes to the host the client named: under a wildcard, any
    // subdomain, which may be another tenant's or a taken-over one. The credential must not.
    if upstream.target.is_none() {
        if let Some(wildcard) = upstream.hosts.iter().find(|host| host.trim().starts_with("*.")) {
            problems.push(Problem::new(
                format!("{key}.credentials"),
                format!(
                    "an upstream with a wildcard host (`{}`) needs a `target` to carry credentials: without one the \
                     credential goes to whichever subdomain a client names. Set `target`, or list exact hosts",
                    wildcard.trim()
                ),
            ));
        }
    }
    let value = match (&raw.value_file, &raw.value_env, &raw.oauth2) {
        (Some(path), None, None) => Some(SecretSource::File(path.clone())),
        (None, Some(name), None) => Some(SecretSource::Env(name.clone())),
        (None, None, Some(oauth2)) => {
            validate_oauth2(oauth2, upstream, &format!("{key}.credentials.oauth2"), problems).map(SecretSource::OAuth2)
        }
        _ => {
            problems.push(Problem::new(
                format!("{key}.credentials"),
                "needs exactly one of value_file, value_env and oauth2",
            ));
            None
        }
    };
    let header = match HeaderName::from_bytes(raw.header.trim().as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            problems.push(Problem::new(format!("{key}.credentials.header"), "not a header name"));
            None
        }
    };
    // A brokered token is a bearer token unless the file says otherwise.
    let prefix =
        raw.prefix.clone().unwrap_or_else(|| if raw.oauth2.is_some() { "Bearer ".into() } else { String::new() });
    Some(Credentials { header: header?, prefix, value: value?, mode: raw.mode })
}

/// `credentials.oauth2`: the token endpoint and what the grant needs. The files are read by
/// the resolve phase (and at every refresh), never here.
fn validate_oauth2(
    raw: &OAuth2File,
    upstream: &UpstreamFile,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<Arc<OAuth2>> {
    let before = problems.len();
    let token_url = match token_url(&raw.token_url) {
        Ok(uri) => Some(uri),
        Err(message) => {
            problems.push(Problem::new(format!("{key}.token_url"), message));
            None
        }
    };
    match raw.grant {
        Grant::RefreshToken if raw.refresh_token_file.is_none() => {
            problems.push(Problem::new(format!("{key}.refresh_token_file"), "required with `grant: refresh_token`"));
        }
        Grant::ClientCredentials => {
            if raw.client_secret_file.is_none() {
                problems.push(Problem::new(
                    format!("{key}.client_secret_file"),
                    "required with `grant: client_credentials`",
                ));
            }
            if raw.refresh_token_file.is_some() {
                problems.push(Problem::new(
                    format!("{key}.refresh_token_file"),
                    "only used with `grant: refresh_token`: remove it",
                ));
            }
        }
        Grant::RefreshToken => {}
    }
    if raw.client_auth == ClientAuth::Basic && raw.client_secret_file.is_none() {
        problems.push(Problem::new(format!("{key}.client_auth"), "`basic` needs a client_secret_file"));
    }
    for (field, value) in [("scope", &raw.scope), ("audience", &raw.audience)] {
        if let Some(value) = value {
            if value.trim().is_empty() || value.chars().any(char::is_control) {
                problems
                    .push(Problem::new(format!("{key}.{field}"), "must be non-empty text without control characters"));
            }
        }
    }
    if raw.instance_url && upstream.target.is_none() {
        problems.push(Problem::new(
            format!("{key}.instance_url"),
            "needs the upstream's `target`: where requests go until a token answer names an instance, \
             and what keeps the egress guard and credential rules as they are for a fixed destination",
        ));
    }
    if problems.len() > before {
        return None;
    }
    Some(Arc::new(OAuth2 {
        token_url: token_url?,
        grant: raw.grant,
        client_id_file: raw.client_id_file.clone(),
        client_secret_file: raw.client_secret_file.clone(),
        refresh_token_file: raw.refresh_token_file.clone(),
        scope: raw.scope.as_deref().map(str::trim).map(str::to_owned),
        audience: raw.audience.as_deref().map(str::trim).map(str::to_owned),
        client_auth: raw.client_auth,
        instance_url: raw.instance_url,
    }))
}

/// A token endpoint: an absolute `https://` URL, or `http://` to a loopback address (a local
/// test server): the client secret and refresh token travel in its body.
fn token_url(raw: &str) -> Result<Uri, String> {
    let uri: Uri = raw.trim().parse().map_err(|_| format!("`{raw}` is not a URL"))?;
    let Some(authority) = uri.authority() else { return Err(format!("`{raw}` is not an absolute URL")) };
    if authority.as_str().contains('@') {
        return Err(format!("`{raw}` must not carry credentials"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if loopback => Ok(uri),
        Some("http") => Err(format!(
            "`{raw}` must be https:// (the client secret and refresh token travel in the request); \
             http:// is allowed to loopback addresses only"
        )),
        _ => Err(format!("`{raw}` must start with https://")),
    }
}

/// Two upstreams may not share a name, a host or a prefix: routing must be unambiguous.
pub(super) fn check_overlaps(upstream: &Upstream, earlier: &[Arc<Upstream>], key: &str, problems: &mut Vec<Problem>) {
    for other in earlier {
        if other.name == upstream.name {
            problems.push(Problem::new(format!("{key}.name"), format!("`{}` is used twice", upstream.name)));
        }
        if let Some(host) = upstream.hosts.iter().find(|host| other.hosts.contains(host)) {
            problems.push(Problem::new(
                format!("{key}.hosts"),
                format!("{host:?} is already served by upstream `{}`", other.name),
            ));
        }
        if upstream.prefix.is_some() && upstream.prefix == other.prefix {
            problems.push(Problem::new(format!("{key}.prefix"), format!("already used by upstream `{}`", other.name)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let exact = HostPattern::parse("API.HubAPI.com").unwrap();
        assert!(exact.matches("api.hubapi.com"));
        let wild = HostPattern::parse("*.my.salesforce.com").unwrap();
        assert!(wild.matches("acme.my.salesforce.com"));
        assert!(!wild.matches("my.salesforce.com"));
        assert!(HostPattern::parse("bad host").is_err());
        assert!(HostPattern::parse("127.0.0.1").is_ok());
    }

    fn load(upstream: &str) -> Result<super::super::Config, String> {
        super::super::Config::from_yaml(&format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nintercept: {{ ca_cert: ca.crt, ca_key: ca.key }}\nupstreams:\n  - {upstream}\n"
        ))
        .map_err(|error| error.to_string())
    }

    #[test]
    fn credentials_under_a_wildcard_need_a_target() {
        let error =
            load("{ name: zd, hosts: [api.zd.test, '*.zendesk.com'], credentials: { value_env: T } }").unwrap_err();
        assert!(error.contains("upstreams[0].credentials") && error.contains("`*.zendesk.com`"), "{error}");
        assert!(load(
            "{ name: zd, hosts: ['*.zendesk.com'], target: 'https://acme.zendesk.com', credentials: { value_env: T } }"
        )
        .is_ok());
        assert!(load("{ name: zd, hosts: [acme.zendesk.com], credentials: { value_env: T } }").is_ok());
        assert!(load("{ name: zd, hosts: ['*.zendesk.com'] }").is_ok(), "a wildcard without credentials is fine");
    }

    #[test]
    fn oauth2_credentials_are_bearer_tokens_from_a_checked_grant() {
        let config = load(
            "{ name: hs, prefix: /hs, target: 'https://api.hubapi.com', credentials: { oauth2: { \
             token_url: 'https://api.hubapi.com/oauth/v1/token', grant: refresh_token, client_id_file: id, \
             client_secret_file: secret, refresh_token_file: rt, scope: ' crm.objects.contacts.read ' } } }",
        )
        .unwrap();
        let credentials = config.live.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!((credentials.header.as_str(), credentials.prefix.as_str()), ("authorization", "Bearer "));
        let SecretSource::OAuth2(oauth2) = &credentials.value else { panic!("{credentials:?}") };
        assert_eq!((oauth2.grant, oauth2.client_auth), (Grant::RefreshToken, ClientAuth::Body));
        assert_eq!(oauth2.scope.as_deref(), Some("crm.objects.contacts.read"));
        let static_prefix = load("{ name: hs, hosts: [api.hubapi.com], credentials: { value_env: T } }").unwrap();
        assert_eq!(static_prefix.live.upstreams[0].credentials.as_ref().unwrap().prefix, "", "static: no prefix");
        let local = "{ name: hs, hosts: [api.hubapi.com], credentials: { prefix: 'Token ', oauth2: { token_url: \
                     'http://127.0.0.1:9/token', grant: client_credentials, client_id_file: id, client_secret_file: s, \
                     client_auth: basic } } }";
        assert_eq!(load(local).unwrap().live.upstreams[0].credentials.as_ref().unwrap().prefix, "Token ");
    }

    #[test]
    fn oauth2_problems_name_their_keys() {
        let cases = [
            (
                "credentials: { value_env: T, oauth2: { token_url: 'https://x/t', grant: client_credentials, \
                 client_id_file: id, client_secret_file: s } }",
                "upstreams[0].credentials: needs exactly one of value_file, value_env and oauth2",
            ),
            (
                "credentials: { oauth2: { token_url: 'https://x/t', grant: refresh_token, client_id_file: id } }",
                "upstreams[0].credentials.oauth2.refresh_token_file: required with `grant: refresh_token`",
            ),
            (
                "credentials: { oauth2: { token_url: 'https://x/t', grant: client_credentials, client_id_file: id, \
                 refresh_token_file: rt } }",
                "upstreams[0].credentials.oauth2.client_secret_file: required with `grant: client_credentials`",
            ),
            (
                "credentials: { oauth2: { token_url: 'https://x/t', grant: client_credentials, client_id_file: id, \
                 refresh_token_file: rt } }",
                "upstreams[0].credentials.oauth2.refresh_token_file: only used with `grant: refresh_token`",
            ),
            (
                "credentials: { oauth2: { token_url: 'http://login.example.com/t', grant: refresh_token, \
                 client_id_file: id, refresh_token_file: rt } }",
                "upstreams[0].credentials.oauth2.token_url: `http://login.example.com/t` must be https://",
            ),
            (
                "credentials: { oauth2: { token_url: '/token', grant: refresh_token, client_id_file: id, \
                 refresh_token_file: rt } }",
                "upstreams[0].credentials.oauth2.token_url: `/token` is not an absolute URL",
            ),
            (
                "credentials: { oauth2: { token_url: 'https://x/t', grant: refresh_token, client_id_file: id, \
                 refresh_token_file: rt, client_auth: basic } }",
                "upstreams[0].credentials.oauth2.client_auth: `basic` needs a client_secret_file",
            ),
            (
                "credentials: { oauth2: { token_url: 'https://x/t', grant: refresh_token, client_id_file: id, \
                 refresh_token_file: rt, instance_url: true } }",
                "upstreams[0].credentials.oauth2.instance_url: needs the upstream's `target`",
            ),
        ];
        for (credentials, expected) in cases {
            let error = load(&format!("{{ name: sf, hosts: [login.salesforce.com], {credentials} }}")).unwrap_err();
            let (key, message) = expected.split_once(": ").unwrap();
            assert!(error.contains(&format!("{key} (line 4): {message}")), "`{expected}` in:\n{error}");
        }
        let error = load("{ name: sf, hosts: [x.test], credentials: { oauth2: { token_url: 'https://x/t', grant: password, client_id_file: id } } }")
            .unwrap_err();
        assert!(error.contains("unknown variant `password`"), "{error}");
    }

    #[test]
    fn blind_tunnel_and_what_it_skips() {
        let error = load("{ name: hs, hosts: [api.hubapi.com], intercept: true, blind_tunnel: true }").unwrap_err();
        assert!(error.contains("upstreams[0].blind_tunnel"), "{error}");
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], quotas: [{ name: q, limit: 1, per: 1s }], max_concurrency: 2 }")
                .unwrap();
        let upstream = &config.live.upstreams[0];
        assert_eq!(upstream.blind_tunnel_skips(), ["quotas", "max_concurrency"]);
        let refusal = upstream.blind_tunnel_refusal().unwrap();
        assert!(refusal.contains("quotas, max_concurrency") && refusal.contains("blind_tunnel: true"), "{refusal}");
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], quotas: [{ name: q, limit: 1, per: 1s }], blind_tunnel: true }")
                .unwrap();
        assert_eq!(config.live.upstreams[0].blind_tunnel_refusal(), None);
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], quotas: [{ name: q, limit: 1, per: 1s }], intercept: true }")
                .unwrap();
        assert_eq!(config.live.upstreams[0].blind_tunnel_refusal(), None);
        let config = load("{ name: hs, hosts: [api.hubapi.com], retry: {}, breaker: {} }").unwrap();
        assert_eq!(
            config.live.upstreams[0].blind_tunnel_refusal(),
            None,
            "retries and breakers are not limits a tunnel dodges"
        );
    }

    #[test]
    fn probe_paths() {
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], probe_path: '/crm/v3/objects/contacts?limit=1' }").unwrap();
        assert_eq!(config.live.upstreams[0].probe_path.as_deref(), Some("/crm/v3/objects/contacts?limit=1"));
        assert_eq!(load("{ name: hs, hosts: [api.hubapi.com] }").unwrap().live.upstreams[0].probe_path, None);
        for bad in ["crm/v3", "//evil.example/x", "/a b", "/a#frag", "/a\\tb", "/a\\ab"] {
            let error = load(&format!("{{ name: hs, hosts: [api.hubapi.com], probe_path: \"{bad}\" }}")).unwrap_err();
            assert!(error.contains("upstreams[0].probe_path"), "{bad}: {error}");
        }
    }

    #[test]
    fn targets() {
        let t = Target::parse("https://api.hubapi.com").unwrap();
        assert_eq!((t.scheme, t.host.as_str(), t.port), (Scheme::Https, "api.hubapi.com", 443));
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.port, 8080);
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("https://x/path").is_err());
        assert!(Target::parse("nope").is_err());
    }
}
