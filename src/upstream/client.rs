//! The pooled client of one upstream: send the request to the vendor and relay the answer.
//!
//! One hyper-util client per upstream, so each has its own pool, connect timeout and trust
//! roots. The per-request timeout is the vendor's time up to the response head: time sluice
//! spends waiting for the client's own upload is not the vendor's and does not count (the
//! upload has its own idle limit, see `body::Upload`). The body then streams back as the
//! vendor sends it. Failures are sorted into the few kinds a caller can act on (refused, DNS,
//! TLS, timeout), and failures the client caused (a stalled upload, a host it named that does
//! not exist) into kinds of their own, so the breaker never counts them against the vendor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::headers;
use crate::body::{ProxyBody, UploadError, UploadWatch};
use crate::config::{ConfigError, HostPattern, Upstream};
use crate::error::{causes, describe, ErrorKind, ProxyError, Unreachable};
use crate::request::Routed;
use crate::security::egress::{blocked_in, dns_failure_in, EgressResolver};

/// Idle pooled connections are closed after this long (vendors close theirs around 60-120 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A pooled HTTP/1.1 + HTTP/2 client for one upstream.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector<EgressResolver>>, ProxyBody>,
    /// The settings this client was built with, to decide reuse across reloads.
    connect_timeout: Duration,
    extra_ca: Option<PathBuf>,
    extra_ca_pem: Option<Arc<[u8]>>,
    client_cert: Option<(PathBuf, PathBuf)>,
    guarded: bool,
}

impl UpstreamClient {
    pub fn new(upstream: &Upstream, key: &str) -> Result<Self, ConfigError> {
        let tls = crate::tls::client::client_config(upstream.extra_ca.as_deref(), upstream.client_cert.as_ref(), key)?;
        // Hosts a client names (no `target`) go through the egress guard; a target is trusted.
        let resolver = EgressResolver { guarded: upstream.target.is_none() };
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(upstream.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            // Request heads and small bodies leave in one buffer (cheaper than writev here).
            .http1_writev(false)
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            connect_timeout: upstream.connect_timeout,
            extra_ca: upstream.extra_ca.clone(),
            extra_ca_pem: read_pem(upstream.extra_ca.as_deref()),
            client_cert: upstream.client_cert.clone(),
            guarded: upstream.target.is_none(),
        })
    }

    /// Whether this client can serve `upstream` as configured now (same timeout, same roots).
    pub fn fits(&self, upstream: &Upstream) -> bool {
        self.connect_timeout == upstream.connect_timeout
            && self.extra_ca == upstream.extra_ca
            && self.extra_ca_pem == read_pem(upstream.extra_ca.as_deref())
            && self.client_cert == upstream.client_cert
            && self.guarded == upstream.target.is_none()
    }

    /// Sends `request` (already routed) and returns the vendor's response, hygiene applied.
    pub async fn forward(
        &self,
        request: Request<ProxyBody>,
        routed: Routed,
        max_body_bytes: u64,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upstream = routed.upstream;
        let (mut parts, body) = request.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::append_via(&mut parts.headers, parts.version);
        // The Host header follows the target. It is overwritten in place: removing it and letting
        // the client derive a new one grew the header map on every request.
        match host_header(&routed.uri) {
            Some(host) => {
                parts.headers.insert(HOST, host);
            }
            None => {
                parts.headers.remove(HOST);
            }
        }
        parts.uri = routed.uri;
        parts.version = Version::HTTP_11;
        let upload = parts.extensions.get::<Arc<UploadWatch>>().cloned();
        let host = routed_host(&parts.uri);
        let outgoing = Request::from_parts(parts, body);

        let sent = self.client.request(outgoing);
        let response = match vendor_time(sent, upstream.request_timeout, upload.as_deref()).await {
            None => {
                if let Some(failure) = upload.as_deref().and_then(UploadWatch::failure) {
                    return Err(upload_failure(failure, &upstream));
                }
                return Err(ProxyError::new(
                    ErrorKind::ResponseTimeout { after: upstream.request_timeout },
                    Some(upstream.name.clone()),
                ));
            }
            Some(Err(error)) => {
                // The client's upload failed first: whatever hyper made of it, it is the client's.
                if let Some(failure) = upload.as_deref().and_then(UploadWatch::failure) {
                    return Err(upload_failure(failure, &upstream));
                }
                return Err(classify(&error, &upstream, &host, max_body_bytes));
            }
            Some(Ok(response)) => response,
        };
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::append_via(&mut parts.headers, parts.version);
        Ok(Response::from_parts(parts, body.map_err(Into::into).boxed()))
    }
}

/// Waits for the response head for at most `timeout` of the vendor's time: time spent waiting
/// for the client to send its body (see [`UploadWatch`]) does not count, as the upload is the
/// client's to finish. `None`: the vendor's time ran out.
async fn vendor_time<F, T>(sent: F, timeout: Duration, upload: Option<&UploadWatch>) -> Option<T>
where
    F: std::future::Future<Output = T>,
{
    tokio::pin!(sent);
    let started = Instant::now();
    let client_before = upload.map_or(Duration::ZERO, |watch| watch.client_time(started));
    // Bounded: every round either ends or sleeps at least a millisecond of vendor time.
    for _ in 0..100_000 {
        let now = Instant::now();
        let client = upload.map_or(Duration::ZERO, |watch| watch.client_time(now).saturating_sub(client_before));
        let vendor = now.saturating_duration_since(started).saturating_sub(client);
        let left = timeout.checked_sub(vendor).filter(|left| !left.is_zero())?;
        tokio::select! {
            result = &mut sent => return Some(result),
            () = tokio::time::sleep(left.max(Duration::from_millis(1))) => {}
        }
    }
    None
}

/// The destination host of an outgoing URI, lower-cased, without brackets.
fn routed_host(uri: &http::Uri) -> String {
    uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()
}

/// A client's failed upload as the client's error.
fn upload_failure(failure: UploadError, upstream: &Upstream) -> ProxyError {
    let kind = match failure {
        UploadError::Stalled { after } => ErrorKind::RequestBodyTimeout { after },
        UploadError::TooLarge { limit } => ErrorKind::BodyTooLarge { limit },
        UploadError::Broken { detail } => ErrorKind::Malformed { detail: format!("request body: {detail}") },
    };
    ProxyError::new(kind, Some(upstream.name.clone()))
}

/// Whether `host` is one the client chose rather than the operator: no `target`, and matched
/// only by a wildcard (`*.zendesk.com`), not by an exact host in the config.
pub fn client_named(upstream: &Upstream, host: &str) -> bool {
    upstream.target.is_none()
        && !upstream.hosts.iter().any(|pattern| matches!(pattern, HostPattern::Exact(exact) if exact == host))
        && upstream.hosts.iter().any(|pattern| matches!(pattern, HostPattern::Subdomains(_)) && pattern.matches(host))
}

/// `Host` for a request to `uri`: its authority, without the scheme's default port.
fn host_header(uri: &http::Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { 443 } else { 80 };
    let text = match authority.port_u16() {
        Some(port) if port == default_port => authority.host(),
        _ => authority.as_str(),
    };
    HeaderValue::from_str(text).ok()
}

fn read_pem(path: Option<&std::path::Path>) -> Option<Arc<[u8]>> {
    path.and_then(|path| std::fs::read(path).ok()).map(Arc::from)
}

/// Whether `cause` is a rustls failure, bare or wrapped in `io::Error`s (tokio-rustls and
/// hyper-rustls each wrap it once, and `io::Error::source` skips the error it wraps, so the
/// `source()` chain never shows it).
fn is_tls_error(cause: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(cause);
    for _ in 0..8 {
        let Some(error) = current else { return false };
        if error.is::<rustls::Error>() {
            return true;
        }
        current = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static));
    }
    false
}

/// Sorts a client error into the kind of failure a caller can act on.
fn classify(
    error: &hyper_util::client::legacy::Error,
    upstream: &Upstream,
    host: &str,
    max_body_bytes: u64,
) -> ProxyError {
    let name = Some(upstream.name.clone());
    let detail = describe(error);
    if causes(error).any(|cause| cause.is::<http_body_util::LengthLimitError>()) {
        return ProxyError::new(ErrorKind::BodyTooLarge { limit: max_body_bytes }, name);
    }
    if let Some(blocked) = blocked_in(error) {
        return ProxyError::new(
            ErrorKind::EgressDenied { host: format!("{} (resolves to {})", blocked.host, blocked.address) },
            name,
        );
    }
    if error.is_connect() {
        let timed_out = causes(error).any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        });
        if timed_out {
            return ProxyError::new(ErrorKind::ConnectTimeout { after: upstream.connect_timeout }, name);
        }
        if causes(error).any(is_tls_error) {
            return ProxyError::new(ErrorKind::Tls { detail }, name);
        }
        if let Some(dns) = dns_failure_in(error) {
            if dns.no_such_host && client_named(upstream, host) {
                return ProxyError::new(ErrorKind::UnknownHost { host: dns.host.clone() }, name);
            }
            return ProxyError::new(ErrorKind::Unreachable { detail, cause: Unreachable::Dns }, name);
        }
        let refused = causes(error).any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        });
        let cause = if refused { Unreachable::Refused } else { Unreachable::Other };
        return ProxyError::new(ErrorKind::Unreachable { detail, cause }, name);
    }
    ProxyError::new(ErrorKind::UpstreamProtocol { detail }, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_is_the_authority_without_a_default_port() {
        let host = |uri: &str| host_header(&uri.parse().unwrap()).unwrap();
        assert_eq!(host("https://api.hubapi.com/crm"), "api.hubapi.com");
        assert_eq!(host("https://api.hubapi.com:443/crm"), "api.hubapi.com");
        assert_eq!(host("http://api.hubapi.com:80/crm"), "api.hubapi.com");
        assert_eq!(host("http://127.0.0.1:8080/crm"), "127.0.0.1:8080");
        assert_eq!(host("https://[::1]:8443/x"), "[::1]:8443");
        assert_eq!(host("https://login.salesforce.com:80/x"), "login.salesforce.com:80");
    }
}
