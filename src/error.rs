//! Why sluice answered a request itself instead of relaying the vendor's answer.
//!
//! Every failure on the request path becomes a [`ProxyError`]: a bounded [`ErrorKind`] (which
//! decides status, `Proxy-Status` error type and metric label) plus the upstream involved and a
//! human detail. The kind says whose failure it is ([`Source`]: the client's, sluice's or the
//! vendor's), and retry ([`ProxyError::retryable`]), the breaker
//! ([`ProxyError::is_vendor_failure`]) and the status class all read that one tag, so they
//! cannot disagree. Only `respond` turns an error into HTTP, so all synthetic responses look
//! alike.
//!
//! A leaf: it imports nothing from sluice, so every room can return it.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Why an upstream could not be reached, for `Proxy-Status` (RFC 9209 error types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Its name did not resolve (a temporary DNS failure, or a configured name that is gone).
    Dns,
    /// It refused the connection.
    Refused,
    /// Any other connect failure.
    Other,
}

/// Whose failure an error is. Retry, the breaker and the status all read this one tag, so they
/// cannot disagree about whether the vendor failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The caller's request or behaviour: a bad request, a stalled upload, a host that does not
    /// exist, a destination or method it may not use. Never the vendor's health. A 4xx, except a
    /// host that does not exist: a 502 with `dns_error`, as proxies answer it.
    Client,
    /// sluice's own refusal or failure: a quota, a concurrency cap, an open breaker, a
    /// remembered vendor pause, the store, shutdown. The vendor was not asked.
    Sluice,
    /// The vendor, or the way to it, failed while sluice was asking it. Always a 5xx gateway
    /// status; counted by the breaker.
    Vendor,
}

/// A failure on the request path, tagged with the upstream it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct ProxyError {
    /// Boxed: the error travels up every layer's `Result`, which stays small this way.
    pub kind: Box<ErrorKind>,
    pub upstream: Option<Arc<str>>,
    /// The priority lane of a request refused or timed out while it waited its turn (`high`,
    /// `normal`, `low`): the JSON answer says it.
    pub lane: Option<&'static str>,
}

/// What went wrong; each variant maps to one status and one RFC 9209 error type.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ErrorKind {
    #[error("egress to {host} is not allowed")]
    EgressDenied { host: String },
    #[error("no upstream is configured for {path}")]
    NoRoute { path: String },
    #[error("malformed request: {detail}")]
    Malformed { detail: String },
    #[error("request head too large: over {limit} bytes, or over 100 header fields")]
    HeadTooLarge { limit: usize },
    #[error("request URI too long")]
    UriTooLong,
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("cannot connect to upstream: {detail}")]
    Unreachable { detail: String, cause: Unreachable },
    /// A host the client named under a wildcard does not exist (NXDOMAIN): the client's
    /// mistake, not the vendor's failure, so the breaker does not count it.
    #[error("{host} does not exist (no such host in DNS)")]
    UnknownHost { host: String },
    /// The client stopped sending its request body: its own fault, never the vendor's.
    #[error("the request body stalled: no bytes for {}", humantime::format_duration(*after))]
    RequestBodyTimeout { after: Duration },
    #[error("upstream TLS failed: {detail}")]
    Tls { detail: String },
    #[error("upstream connect timed out after {}", humantime::format_duration(*after))]
    ConnectTimeout { after: Duration },
    #[error("upstream did not answer within {}", humantime::format_duration(*after))]
    ResponseTimeout { after: Duration },
    #[error("upstream broke the exchange: {detail}")]
    UpstreamProtocol { detail: String },
    #[error("quota `{quota}` exhausted; retry in {}", humantime::format_duration(whole_seconds(*retry_after)))]
    RateLimited {
        quota: String,
        retry_after: Duration,
        rate_limit: Option<http::HeaderValue>,
        policy: Option<http::HeaderValue>,
    },
    #[error("all {max} connection slots to the upstream stayed busy for {}", humantime::format_duration(Duration::from_millis(waited.as_millis() as u64)))]
    ConcurrencyLimited { max: usize, waited: Duration },
    #[error("the quota store is unavailable and on_failure is deny")]
    StoreUnavailable,
    #[error("circuit open: the upstream is failing; retry in {}", humantime::format_duration(whole_seconds(*retry_after)))]
    BreakerOpen { retry_after: Duration },
    #[error("the vendor is failing and asked to retry in {}", humantime::format_duration(whole_seconds(*retry_after)))]
    VendorUnavailable { retry_after: Duration },
    #[error("sluice is shutting down")]
    ShuttingDown,
    #[error("proxy authentication required")]
    ProxyAuthRequired,
    #[error("client not allowed: {detail}")]
    ClientNotAllowed { detail: String },
    #[error("too many tunnels open ({max})")]
    TooManyTunnels { max: usize },
    #[error("this client already holds its share of tunnels ({max})")]
    TunnelShareExceeded { max: usize },
    #[error("no blind tunnel to this upstream: {detail}")]
    BlindTunnelRefused { detail: String },
    #[error("method {method} is not allowed: {detail}")]
    MethodNotAllowed { method: String, detail: String },
    /// sluice could not obtain the upstream's OAuth 2.0 access token (the token endpoint
    /// failed or refused, or another replica's refresh did not finish): the vendor was not asked.
    #[error("no credential for the upstream: {detail}")]
    CredentialUnavailable { detail: String, retry_after: Duration },
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

impl ProxyError {
    pub fn new(kind: ErrorKind, upstream: Option<Arc<str>>) -> Self {
        Self { kind: Box::new(kind), upstream, lane: None }
    }

    /// Says the lane of a refusal or a timeout that waiting decides (quota, concurrency, vendor
    /// pauses, the store, the deadline); any other error is left as it is.
    pub fn in_lane(mut self, lane: &'static str) -> Self {
        let waited = matches!(
            *self.kind,
            ErrorKind::RateLimited { .. }
                | ErrorKind::ConcurrencyLimited { .. }
                | ErrorKind::StoreUnavailable
                | ErrorKind::BreakerOpen { .. }
                | ErrorKind::VendorUnavailable { .. }
                | ErrorKind::ResponseTimeout { .. }
        );
        if waited && self.lane.is_none() {
            self.lane = Some(lane);
        }
        self
    }

    /// When the caller may try again, for `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match *self.kind {
            ErrorKind::RateLimited { retry_after, .. }
            | ErrorKind::BreakerOpen { retry_after }
            | ErrorKind::VendorUnavailable { retry_after }
            | ErrorKind::CredentialUnavailable { retry_after, .. } => Some(retry_after),
            ErrorKind::ConcurrencyLimited { .. }
            | ErrorKind::StoreUnavailable
            | ErrorKind::TunnelShareExceeded { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Whose failure this is (see [`Source`]).
    pub fn source(&self) -> Source {
        match *self.kind {
            ErrorKind::EgressDenied { .. }
            | ErrorKind::NoRoute { .. }
            | ErrorKind::Malformed { .. }
            | ErrorKind::HeadTooLarge { .. }
            | ErrorKind::UriTooLong
            | ErrorKind::BodyTooLarge { .. }
            | ErrorKind::UnknownHost { .. }
            | ErrorKind::RequestBodyTimeout { .. }
            | ErrorKind::ProxyAuthRequired
            | ErrorKind::ClientNotAllowed { .. }
            | ErrorKind::TunnelShareExceeded { .. }
            | ErrorKind::BlindTunnelRefused { .. }
            | ErrorKind::MethodNotAllowed { .. } => Source::Client,
            ErrorKind::RateLimited { .. }
            | ErrorKind::ConcurrencyLimited { .. }
            | ErrorKind::StoreUnavailable
            | ErrorKind::BreakerOpen { .. }
            | ErrorKind::VendorUnavailable { .. }
            | ErrorKind::ShuttingDown
            | ErrorKind::TooManyTunnels { .. }
            | ErrorKind::CredentialUnavailable { .. }
            | ErrorKind::Internal { .. } => Source::Sluice,
            ErrorKind::Unreachable { .. }
            | ErrorKind::ConnectTimeout { .. }
            | ErrorKind::ResponseTimeout { .. }
            | ErrorKind::Tls { .. }
            | ErrorKind::UpstreamProtocol { .. } => Source::Vendor,
        }
    }

    /// Whether the vendor (or the way to it) failed, as the breaker counts failures.
    pub fn is_vendor_failure(&self) -> bool {
        self.source() == Source::Vendor
    }

    /// Whether another attempt is safe whatever the method: a vendor failure before the request
    /// left sluice (no connection was made), so the vendor cannot have acted on it.
    pub fn retryable(&self) -> bool {
        self.source() == Source::Vendor
            && matches!(*self.kind, ErrorKind::Unreachable { .. } | ErrorKind::ConnectTimeout { .. })
    }

    /// The status: a client's failure is a 4xx, a vendor's a 502, 503 or 504 (see [`Source`]).
    pub fn status(&self) -> StatusCode {
        match *self.kind {
            ErrorKind::EgressDenied { .. }
            | ErrorKind::ClientNotAllowed { .. }
            | ErrorKind::BlindTunnelRefused { .. } => StatusCode::FORBIDDEN,
            ErrorKind::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorKind::TooManyTunnels { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::NoRoute { .. } => StatusCode::NOT_FOUND,
            ErrorKind::Malformed { .. } => StatusCode::BAD_REQUEST,
            ErrorKind::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorKind::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unreachable { .. }
            | ErrorKind::UnknownHost { .. }
            | ErrorKind::Tls { .. }
            | ErrorKind::UpstreamProtocol { .. }
            | ErrorKind::CredentialUnavailable { .. } => StatusCode::BAD_GATEWAY,
            ErrorKind::ConnectTimeout { .. } | ErrorKind::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RateLimited { .. }
            | ErrorKind::ConcurrencyLimited { .. }
            | ErrorKind::TunnelShareExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::StoreUnavailable
            | ErrorKind::ShuttingDown
            | ErrorKind::BreakerOpen { .. }
            | ErrorKind::VendorUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` field of the JSON body and the metric label: short, stable, bounded.
    pub fn code(&self) -> &'static str {
        match *self.kind {
            ErrorKind::EgressDenied { .. } => "egress_denied",
            ErrorKind::ProxyAuthRequired => "proxy_auth_required",
            ErrorKind::ClientNotAllowed { .. } => "client_not_allowed",
            ErrorKind::TooManyTunnels { .. } | ErrorKind::TunnelShareExceeded { .. } => "too_many_tunnels",
            ErrorKind::BlindTunnelRefused { .. } => "blind_tunnel_refused",
            ErrorKind::MethodNotAllowed { .. } => "method_not_allowed",
            ErrorKind::NoRoute { .. } => "no_route",
            // The parser's own refusals keep the code clients already match on; the status says which.
            ErrorKind::Malformed { .. } | ErrorKind::HeadTooLarge { .. } | ErrorKind::UriTooLong => "malformed_request",
            ErrorKind::RequestBodyTimeout { .. } => "request_timeout",
            ErrorKind::UnknownHost { .. } => "unknown_host",
            ErrorKind::BodyTooLarge { .. } => "body_too_large",
            ErrorKind::Unreachable { .. } => "upstream_unreachable",
            ErrorKind::Tls { .. } => "upstream_tls_error",
            ErrorKind::ConnectTimeout { .. } | ErrorKind::ResponseTimeout { .. } => "upstream_timeout",
            ErrorKind::UpstreamProtocol { .. } => "upstream_protocol_error",
            ErrorKind::RateLimited { .. } => "rate_limited",
            ErrorKind::ConcurrencyLimited { .. } => "concurrency_limited",
            ErrorKind::StoreUnavailable => "store_unavailable",
            ErrorKind::BreakerOpen { .. } => "circuit_open",
            ErrorKind::VendorUnavailable { .. } => "vendor_unavailable",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::CredentialUnavailable { .. } => "credential_unavailable",
            ErrorKind::Internal { .. } => "internal_error",
        }
    }

    /// The RFC 9209 `error` parameter of `Proxy-Status`.
    pub fn proxy_status_type(&self) -> &'static str {
        match *self.kind {
            ErrorKind::EgressDenied { .. }
            | ErrorKind::ClientNotAllowed { .. }
            | ErrorKind::ProxyAuthRequired
            | ErrorKind::BlindTunnelRefused { .. }
            | ErrorKind::MethodNotAllowed { .. } => "http_request_denied",
            ErrorKind::TooManyTunnels { .. } => "proxy_internal_error",
            ErrorKind::NoRoute { .. } => "destination_not_found",
            ErrorKind::Malformed { .. }
            | ErrorKind::HeadTooLarge { .. }
            | ErrorKind::UriTooLong
            | ErrorKind::BodyTooLarge { .. }
            | ErrorKind::RequestBodyTimeout { .. } => "http_request_error",
            ErrorKind::Unreachable { cause: Unreachable::Dns, .. } | ErrorKind::UnknownHost { .. } => "dns_error",
            ErrorKind::Unreachable { cause: Unreachable::Refused, .. } => "connection_refused",
            ErrorKind::Unreachable { cause: Unreachable::Other, .. } => "destination_unavailable",
            ErrorKind::Tls { .. } => "tls_protocol_error",
            ErrorKind::ConnectTimeout { .. } => "connection_timeout",
            ErrorKind::ResponseTimeout { .. } => "http_response_timeout",
            ErrorKind::UpstreamProtocol { .. } => "http_protocol_error",
            ErrorKind::RateLimited { .. }
            | ErrorKind::ConcurrencyLimited { .. }
            | ErrorKind::TunnelShareExceeded { .. } => "http_request_denied",
            ErrorKind::BreakerOpen { .. } | ErrorKind::VendorUnavailable { .. } => "destination_unavailable",
            // The token is sluice's own: failing to get one is sluice's failure, not the API's
            // (which was never asked), however the token endpoint failed.
            ErrorKind::StoreUnavailable
            | ErrorKind::ShuttingDown
            | ErrorKind::CredentialUnavailable { .. }
            | ErrorKind::Internal { .. } => "proxy_internal_error",
        }
    }
}

/// A wait rounded up to whole seconds (at least one), as `Retry-After` states it.
pub fn whole_seconds(wait: Duration) -> Duration {
    Duration::from_secs(u64::try_from(wait.as_micros().div_ceil(1_000_000).max(1)).unwrap_or(u64::MAX))
}

/// Walks an error's `source()` chain.
pub fn causes<'a>(error: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&error| error.source())
}

/// The chain of messages of an error, joined, for details and logs.
pub fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    for (at, cause) in causes(error).enumerate() {
        let text = cause.to_string();
        if at > 0 {
            if out.contains(&text) {
                continue;
            }
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<ErrorKind> {
        let after = Duration::from_secs(1);
        let detail = String::from("x");
        vec![
            ErrorKind::EgressDenied { host: detail.clone() },
            ErrorKind::NoRoute { path: detail.clone() },
            ErrorKind::Malformed { detail: detail.clone() },
            ErrorKind::HeadTooLarge { limit: 1 },
            ErrorKind::UriTooLong,
            ErrorKind::BodyTooLarge { limit: 1 },
            ErrorKind::Unreachable { detail: detail.clone(), cause: Unreachable::Dns },
            ErrorKind::Unreachable { detail: detail.clone(), cause: Unreachable::Refused },
            ErrorKind::Unreachable { detail: detail.clone(), cause: Unreachable::Other },
            ErrorKind::UnknownHost { host: detail.clone() },
            ErrorKind::RequestBodyTimeout { after },
            ErrorKind::Tls { detail: detail.clone() },
            ErrorKind::ConnectTimeout { after },
            ErrorKind::ResponseTimeout { after },
            ErrorKind::UpstreamProtocol { detail: detail.clone() },
            ErrorKind::RateLimited { quota: detail.clone(), retry_after: after, rate_limit: None, policy: None },
            ErrorKind::ConcurrencyLimited { max: 1, waited: after },
            ErrorKind::StoreUnavailable,
            ErrorKind::BreakerOpen { retry_after: after },
            ErrorKind::VendorUnavailable { retry_after: after },
            ErrorKind::ShuttingDown,
            ErrorKind::ProxyAuthRequired,
            ErrorKind::ClientNotAllowed { detail: detail.clone() },
            ErrorKind::TooManyTunnels { max: 1 },
            ErrorKind::TunnelShareExceeded { max: 1 },
            ErrorKind::BlindTunnelRefused { detail: detail.clone() },
            ErrorKind::MethodNotAllowed { method: detail.clone(), detail: detail.clone() },
            ErrorKind::CredentialUnavailable { detail: detail.clone(), retry_after: after },
            ErrorKind::Internal { detail },
        ]
    }

    #[test]
    fn the_source_decides_the_status_class_the_breaker_and_retry() {
        for kind in every_kind() {
            let error = ProxyError::new(kind.clone(), None);
            let status = error.status();
            match error.source() {
                Source::Client => assert!(
                    status.is_client_error() || matches!(kind, ErrorKind::UnknownHost { .. }),
                    "{kind:?} is the client's: {status}"
                ),
                Source::Vendor => assert!(matches!(status.as_u16(), 502..=504), "{kind:?} is the vendor's: {status}"),
                // sluice's own failures are never a 504, and a 502 only when sluice could not get
                // the credential it must send (the gateway status a client expects of a proxy
                // whose way to the vendor is broken, without the breaker or retries counting it).
                Source::Sluice => assert!(
                    status.as_u16() != 504
                        && (status.as_u16() != 502 || matches!(kind, ErrorKind::CredentialUnavailable { .. })),
                    "{kind:?} is sluice's: {status}"
                ),
            }
            assert_eq!(error.is_vendor_failure(), error.source() == Source::Vendor, "{kind:?}");
            if error.retryable() {
                assert_eq!(error.source(), Source::Vendor, "{kind:?}");
            }
        }
    }

    #[test]
    fn a_missing_credential_is_sluices_502_never_retried_nor_counted() {
        let error = ProxyError::new(
            ErrorKind::CredentialUnavailable { detail: "x".into(), retry_after: Duration::from_secs(2) },
            Some("hubspot".into()),
        );
        assert_eq!((error.status(), error.code()), (StatusCode::BAD_GATEWAY, "credential_unavailable"));
        assert_eq!((error.source(), error.proxy_status_type()), (Source::Sluice, "proxy_internal_error"));
        assert!(!error.retryable() && !error.is_vendor_failure());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn dns_and_refused_are_typed_not_guessed() {
        let dns = ProxyError::new(ErrorKind::Unreachable { detail: "x".into(), cause: Unreachable::Dns }, None);
        let refused = ProxyError::new(ErrorKind::Unreachable { detail: "x".into(), cause: Unreachable::Refused }, None);
        assert_eq!(dns.proxy_status_type(), "dns_error");
        assert_eq!(refused.proxy_status_type(), "connection_refused");
        assert!(dns.retryable() && refused.retryable());
    }
}
