//! Turns the file model into a [`Config`], collecting every problem instead of stopping at the
//! first, so an SRE fixes a broken file in one pass.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Uri};

use super::file::{FileConfig, UpstreamFile};
use super::{Config, Problem};

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
    pub limits: super::policy::Limits,
    /// How to read the vendor's rate-limit headers.
    pub feedback: super::policy::Feedback,
    pub retry: Option<super::file::RetryFile>,
    pub breaker: Option<super::file::BreakerFile>,
    pub batch: Vec<super::policy::BatchRule>,
    pub credentials: Option<super::file::CredentialsFile>,
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

/// Checks everything and returns all problems at once.
pub fn validate(file: FileConfig) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();

    let limits = &file.limits;
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
        ("admin.header_read_timeout", file.admin.header_read_timeout),
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
    if file.admin.max_connections == 0 {
        problems.push(Problem::new("admin.max_connections", "must be greater than 0"));
    }
    if file.runtime.worker_threads == Some(0) {
        problems.push(Problem::new("runtime.worker_threads", "must be at least 1"));
    }
    if let Some(intercept) = &file.intercept {
        if intercept.leaf_cache_size == 0 {
            problems.push(Problem::new("intercept.leaf_cache_size", "must be at least 1"));
        }
        if intercept.leaf_ttl < Duration::from_secs(3600) {
            problems.push(Problem::new("intercept.leaf_ttl", "must be at least 1h"));
        }
    }

    let store = super::policy::validate_store(&file.store, &mut problems);

    let mut upstreams: Vec<Arc<Upstream>> = Vec::with_capacity(file.upstreams.len());
    for (index, raw) in file.upstreams.iter().enumerate() {
        let key = format!("upstreams[{index}]");
        if let Some(upstream) = validate_upstream(raw, &key, file.intercept.is_some(), &mut problems) {
            check_overlaps(&upstream, &upstreams, &key, &mut problems);
            upstreams.push(Arc::new(upstream));
        }
    }

    for (index, client) in file.clients.iter().enumerate() {
        let key = format!("clients[{index}]");
        if client.name.is_empty() || file.clients[..index].iter().any(|other| other.name == client.name) {
            problems.push(Problem::new(format!("{key}.name"), "must be non-empty and unique"));
        }
        if client.secret_sha256.is_some() == client.secret_file.is_some() {
            problems.push(Problem::new(key.clone(), "needs exactly one of secret_sha256 and secret_file"));
        }
        for (at, name) in client.upstreams.iter().enumerate() {
            if name != "*" && !upstreams.iter().any(|upstream| *upstream.name == **name) {
                problems.push(Problem::new(format!("{key}.upstreams[{at}]"), format!("no upstream is named `{name}`")));
            }
        }
    }
    if file.admin.token_file.is_some() && file.admin.token_env.is_some() {
        problems.push(Problem::new("admin", "set token_file or token_env, not both"));
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Config {
        listen: file.listen.clone(),
        shutdown_grace: file.shutdown_grace,
        limits: file.limits.clone(),
        intercept: file.intercept.clone(),
        worker_threads: file.runtime.worker_threads,
        store,
        upstreams,
        file,
    })
}

fn validate_upstream(raw: &UpstreamFile, key: &str, have_ca: bool, problems: &mut Vec<Problem>) -> Option<Upstream> {
    let before = problems.len();
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        problems.push(Problem::new(format!("{key}.name"), "must be 1-64 characters of a-z, 0-9, - and _"));
    }
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
    let mut quotas = Vec::with_capacity(raw.quotas.len());
    for (at, quota) in raw.quotas.iter().enumerate() {
        let quota_key = format!("{key}.quotas[{at}]");
        if let Some(quota) = super::policy::validate_quota(quota, &quota_key, problems) {
            if quotas.iter().any(|q: &super::policy::Quota| q.name == quota.name) {
                problems.push(Problem::new(format!("{quota_key}.name"), format!("`{}` is used twice", quota.name)));
            }
            quotas.push(quota);
        }
    }
    let routes = super::policy::validate_routes(&raw.routes, key, problems);
    if let Some(cost) = routes.iter().map(|route| route.cost).max() {
        for (at, quota) in quotas.iter().enumerate() {
            let (capacity, field) = match quota.window {
                super::policy::Window::Smooth => (quota.burst, "burst"),
                super::policy::Window::Rolling | super::policy::Window::Fixed { .. } => (quota.limit, "limit"),
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
    if let Some(retry) = &raw.retry {
        super::policy::validate_retry(retry, &format!("{key}.retry"), problems);
    }
    if raw.tls.client_cert.is_some() != raw.tls.client_key.is_some() {
        problems.push(Problem::new(format!("{key}.tls"), "client_cert and client_key go together"));
    }
    let batch = super::policy::validate_batch(&raw.batch, &format!("{key}.batch"), problems);
    // Without a target, a request goes to the host the client named: under a wildcard, any
    // subdomain, which may be another tenant's or a taken-over one. The credential must not.
    if let (Some(_), None) = (&raw.credentials, &raw.target) {
        if let Some(wildcard) = raw.hosts.iter().find(|host| host.trim().starts_with("*.")) {
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
    let credential_header = match &raw.credentials {
        Some(credentials) => {
            if credentials.value_file.is_some() == credentials.value_env.is_some() {
                problems
                    .push(Problem::new(format!("{key}.credentials"), "needs exactly one of value_file and value_env"));
            }
            match http::header::HeaderName::from_bytes(credentials.header.trim().as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    problems.push(Problem::new(format!("{key}.credentials.header"), "not a header name"));
                    http::header::AUTHORIZATION
                }
            }
        }
        None => http::header::AUTHORIZATION,
    };
    // `key: [credential]` means the header this upstream's credential travels in.
    for quota in &mut quotas {
        for scope in &mut quota.scope {
            if let super::policy::ScopeKey::Credential(name) = scope {
                *name = credential_header.clone();
            }
        }
    }
    if let Some(breaker) = &raw.breaker {
        super::policy::validate_breaker(breaker, &format!("{key}.breaker"), problems);
    }
    if problems.len() > before {
        return None;
    }
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
        limits: super::policy::limits_of(quotas, raw.over_limit, raw.max_queue_wait, raw.max_concurrency, routes),
        feedback: super::policy::feedback_of(&raw.limit_headers),
        retry: raw.retry,
        breaker: raw.breaker.clone(),
        batch,
        credentials: raw.credentials.clone(),
    })
}

/// Two upstreams may not share a name, a host or a prefix: routing must be unambiguous.
fn check_overlaps(upstream: &Upstream, earlier: &[Arc<Upstream>], key: &str, problems: &mut Vec<Problem>) {
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
    fn blind_tunnel_and_what_it_skips() {
        let error = load("{ name: hs, hosts: [api.hubapi.com], intercept: true, blind_tunnel: true }").unwrap_err();
        assert!(error.contains("upstreams[0].blind_tunnel"), "{error}");
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], quotas: [{ name: q, limit: 1, per: 1s }], max_concurrency: 2 }")
                .unwrap();
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.blind_tunnel_skips(), ["quotas", "max_concurrency"]);
        let refusal = upstream.blind_tunnel_refusal().unwrap();
        assert!(refusal.contains("quotas, max_concurrency") && refusal.contains("blind_tunnel: true"), "{refusal}");
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], quotas: [{ name: q, limit: 1, per: 1s }], blind_tunnel: true }")
                .unwrap();
        assert_eq!(config.upstreams[0].blind_tunnel_refusal(), None);
        let config =
            load("{ name: hs, hosts: [api.hubapi.com], quotas: [{ name: q, limit: 1, per: 1s }], intercept: true }")
                .unwrap();
        assert_eq!(config.upstreams[0].blind_tunnel_refusal(), None);
        let config = load("{ name: hs, hosts: [api.hubapi.com], retry: {}, breaker: {} }").unwrap();
        assert_eq!(
            config.upstreams[0].blind_tunnel_refusal(),
            None,
            "retries and breakers are not limits a tunnel dodges"
        );
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
