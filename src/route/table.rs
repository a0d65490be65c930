//! The route table: which upstream a request belongs to, and the URI it is sent to.
//!
//! Three ways in, one answer: an absolute-form request (`GET http://host/...` from HTTP_PROXY
//! users) and a request inside an intercepted tunnel are routed by host; an origin-form request
//! (`GET /hubspot/...`, reverse mode) by the longest matching prefix, which is stripped. Anything
//! else is refused here, before any upstream work.

use std::collections::HashMap;
use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme as UriScheme, Uri};
use http::{Request, Version};

use crate::config::{Scheme, Target, Upstream};
use crate::error::{ErrorKind, ProxyError};
use crate::request::{Routed, Via};

/// Upstreams indexed for lookup by host and by prefix.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<String, Arc<Upstream>>,
    wildcard: Vec<Arc<Upstream>>,
    /// Longest prefix first, so `/hubspot-eu` is tried before `/hubspot`.
    prefixes: Vec<(String, Arc<Upstream>)>,
}

impl RouteTable {
    pub fn new(upstreams: &[Arc<Upstream>]) -> Self {
        let mut table = RouteTable::default();
        for upstream in upstreams {
            for host in &upstream.hosts {
                match host {
                    crate::config::HostPattern::Exact(name) => {
                        table.exact_hosts.insert(name.clone(), upstream.clone());
                    }
                    crate::config::HostPattern::Subdomains(_) => table.wildcard.push(upstream.clone()),
                }
            }
            if let Some(prefix) = &upstream.prefix {
                table.prefixes.push((prefix.clone(), upstream.clone()));
            }
        }
        table.prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        table
    }

    /// The upstream serving `host` (any case, no port).
    pub fn by_host(&self, host: &str) -> Option<&Arc<Upstream>> {
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let host = host.trim_end_matches('.');
        self.exact_hosts.get(host).or_else(|| self.wildcard.iter().find(|upstream| upstream.serves_host(host)))
    }

    /// The upstream whose prefix starts `path` at a segment boundary, and the rest of the path.
    pub fn by_prefix<'p>(&self, path: &'p str) -> Option<(&Arc<Upstream>, &'p str)> {
        self.prefixes.iter().find_map(|(prefix, upstream)| {
            let rest = path.strip_prefix(prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')).then_some((upstream, rest))
        })
    }

    /// Resolves a request to its upstream and outgoing URI.
    pub fn route<B>(&self, request: &Request<B>, via: &Via) -> Result<Routed, ProxyError> {
        let uri = request.uri();
        let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);

        if let Some(host) = &via.tunnel_host {
            let upstream = self.by_host(host).ok_or_else(|| denied(host))?;
            let (scheme, default_port) = if via.plaintext { (Scheme::Http, 80) } else { (Scheme::Https, 443) };
            let port = if via.tunnel_port == 0 { default_port } else { via.tunnel_port };
            let target = destination(upstream, scheme, host, port)?;
            return Ok(Routed { uri: join(&target, path_and_query)?, upstream: upstream.clone() });
        }

        if let Some(authority) = uri.authority() {
            let host = authority.host().trim_start_matches('[').trim_end_matches(']');
            if let Some(upstream) = self.by_host(host) {
                let scheme = if uri.scheme() == Some(&UriScheme::HTTPS) { Scheme::Https } else { Scheme::Http };
                let default_port = if scheme == Scheme::Https { 443 } else { 80 };
                // Userinfo (`user:password@`) is never part of the port, nor of any detail.
                let host_port = authority.as_str().rsplit_once('@').map_or(authority.as_str(), |(_, rest)| rest);
                let port = match host_port.rsplit_once(':').filter(|(_, port)| !port.contains(']')) {
                    None | Some((_, "")) => default_port,
                    Some((_, text)) => text.parse::<u16>().ok().filter(|port| *port != 0).ok_or_else(|| {
                        ProxyError::new(ErrorKind::Malformed { detail: format!("invalid port for {host}") }, None)
                    })?,
                };
                // Without a target the client picks the port: only the scheme's own or allowed ones.
                if upstream.target.is_none() && port != default_port && !upstream.allows_port(port) {
                    return Err(denied(&format!("{host}:{port}")));
                }
                let target = destination(upstream, scheme, host, port)?;
                return Ok(Routed { uri: join(&target, path_and_query)?, upstream: upstream.clone() });
            }
            // HTTP/1 absolute-form names the destination explicitly: an unknown one is egress.
            // HTTP/2 always carries an authority (sluice's own, in reverse mode), so h2 falls
            // through to prefixes, and a path under none of them is a 404 like over HTTP/1.
            if request.version() != Version::HTTP_2 {
                return Err(denied(host));
            }
        }

        match self.by_prefix(path_and_query) {
            Some((upstream, rest)) => {
                let target = upstream.reverse_target.as_ref().ok_or_else(|| {
                    ProxyError::new(
                        ErrorKind::Internal { detail: "upstream has a prefix but no target".into() },
                        Some(upstream.name.clone()),
                    )
                })?;
                // A reverse target derived from an address-literal host was never named by the
                // operator as a target: it passes the egress guard like any client-named host.
                if upstream.target.is_none()
                    && target.host.parse::<std::net::IpAddr>().is_ok_and(crate::security::egress::is_blocked)
                {
                    return Err(ProxyError::new(
                        ErrorKind::EgressDenied { host: format!("{} (private address)", target.host) },
                        Some(upstream.name.clone()),
                    ));
                }
                let uri = if rest.is_empty() || rest.starts_with('?') {
                    join(target, &format!("/{rest}"))?
                } else {
                    join(target, rest)?
                };
                Ok(Routed { uri, upstream: upstream.clone() })
            }
            None => Err(ProxyError::new(ErrorKind::NoRoute { path: uri.path().to_owned() }, None)),
        }
    }
}

fn denied(host: &str) -> ProxyError {
    ProxyError::new(ErrorKind::EgressDenied { host: host.to_owned() }, None)
}

/// The upstream's configured target, or the host the client named.
fn destination(upstream: &Upstream, scheme: Scheme, host: &str, port: u16) -> Result<Target, ProxyError> {
    if let Some(target) = &upstream.target {
        return Ok(target.clone());
    }
    // The egress guard checks resolved names; an address literal never reaches the resolver.
    if host.parse::<std::net::IpAddr>().is_ok_and(crate::security::egress::is_blocked) {
        return Err(ProxyError::new(
            ErrorKind::EgressDenied { host: format!("{host} (private address)") },
            Some(upstream.name.clone()),
        ));
    }
    Target::for_host(scheme, &host.to_ascii_lowercase(), port).ok_or_else(|| {
        ProxyError::new(ErrorKind::Malformed { detail: format!("bad host {host}") }, Some(upstream.name.clone()))
    })
}

fn join(target: &Target, path_and_query: &str) -> Result<Uri, ProxyError> {
    let scheme = match target.scheme {
        Scheme::Http => UriScheme::HTTP,
        Scheme::Https => UriScheme::HTTPS,
    };
    let path = PathAndQuery::try_from(path_and_query)
        .map_err(|_| ProxyError::new(ErrorKind::Malformed { detail: "invalid request path".into() }, None))?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(target.authority.clone());
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).map_err(|error| ProxyError::new(ErrorKind::Malformed { detail: error.to_string() }, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table() -> RouteTable {
        let config = Config::from_yaml(
            "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
upstreams:
  - { name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: 'http://127.0.0.1:9' }
  - { name: sf, hosts: ['*.my.salesforce.com'], prefix: /sf/eu, target: 'https://eu.my.salesforce.com' }
  - { name: sfus, hosts: [login.salesforce.com], prefix: /sf }
",
        )
        .unwrap();
        RouteTable::new(&config.live.upstreams)
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn absolute_form_by_host() {
        let routed = table().route(&get("http://API.hubapi.com/crm/v3?x=1"), &Via::default()).unwrap();
        assert_eq!(&*routed.upstream.name, "hubspot");
        assert_eq!(routed.uri, "http://127.0.0.1:9/crm/v3?x=1");
        let routed = table().route(&get("http://acme.my.salesforce.com/services"), &Via::default()).unwrap();
        assert_eq!(&*routed.upstream.name, "sf");
        assert_eq!(routed.uri, "https://eu.my.salesforce.com/services");
        let routed = table().route(&get("http://login.salesforce.com/x"), &Via::default()).unwrap();
        assert_eq!(routed.uri, "http://login.salesforce.com/x", "forward requests go where the client asked");
    }

    #[test]
    fn unknown_host_is_denied() {
        let error = table().route(&get("http://evil.example/hubspot/x"), &Via::default()).unwrap_err();
        assert_eq!(error.code(), "egress_denied");
    }

    #[test]
    fn reverse_prefix_longest_first_and_stripped() {
        let routed = table().route(&get("/hubspot/crm/v3/objects?limit=1"), &Via::default()).unwrap();
        assert_eq!(routed.uri, "http://127.0.0.1:9/crm/v3/objects?limit=1");
        let routed = table().route(&get("/sf/eu/x"), &Via::default()).unwrap();
        assert_eq!(&*routed.upstream.name, "sf");
        let routed = table().route(&get("/sf/x"), &Via::default()).unwrap();
        assert_eq!(routed.uri, "https://login.salesforce.com/x");
        let routed = table().route(&get("/hubspot"), &Via::default()).unwrap();
        assert_eq!(routed.uri, "http://127.0.0.1:9/");
        assert_eq!(table().route(&get("/hubspotx/y"), &Via::default()).unwrap_err().code(), "no_route");
    }

    #[test]
    fn tunnel_host_routes() {
        let via = Via { tunnel_host: Some("api.hubapi.com".into()), tunnel_port: 443, plaintext: false };
        let routed = table().route(&get("/crm"), &via).unwrap();
        assert_eq!(routed.uri, "http://127.0.0.1:9/crm");
        // A plain-HTTP tunnel to a host without a target goes where it was opened, over http.
        let via = Via { tunnel_host: Some("login.salesforce.com".into()), tunnel_port: 80, plaintext: true };
        let routed = table().route(&get("http://evil.example/x"), &via).unwrap();
        assert_eq!(routed.uri, "http://login.salesforce.com/x", "the inner authority is ignored");
    }

    #[test]
    fn errors_never_echo_userinfo() {
        let error = table().route(&get("http://user:hunter2@api.hubapi.com:99999/x"), &Via::default()).unwrap_err();
        assert_eq!(error.code(), "malformed_request");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let routed = table().route(&get("http://user:hunter2@login.salesforce.com/x"), &Via::default()).unwrap();
        assert_eq!(routed.uri, "http://login.salesforce.com/x", "userinfo is neither a port nor forwarded");
    }
}
