//! RESPOND: the one place a [`ProxyError`] becomes an HTTP response: the Respond layer and
//! CONNECT's answers through [`synthesize`], hyper's own parse errors through [`render_http1`]
//! (written by `listen::guard_io`).
//!
//! Every response sluice makes itself carries `Proxy-Status` (RFC 9209) naming sluice and the
//! error type, and a JSON body `{"error", "upstream", "detail"}`, so a client (or an SRE with
//! curl) can always tell a vendor's answer from sluice's. [`Refusal`] is that shape on its own;
//! the admin listener renders its errors with it, so they look the same.
//!
//! It stands above `error` and `limit` (whose `headers::retry_after` writes `Retry-After`), and
//! below the rooms that answer: `proxy::stack`, `listen`, `admin` and `webhook`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::body::{self, ProxyBody};
use crate::error::{ErrorKind, ProxyError};
use crate::request::UpstreamName;
use crate::telemetry::metrics::NO_UPSTREAM;
use crate::telemetry::Metrics;

use crate::kit::BoxFuture;

/// Name sluice uses for itself in `Proxy-Status` and `Via`.
pub const PROXY_NAME: &str = "sluice";

pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let (head, bytes) = error_message(error);
    Response::from_parts(head, body::full(bytes))
}

/// The whole HTTP/1.1 response (head and body) for `error`, as bytes, with `Connection: close`:
/// for the one path that writes sluice's answer without hyper's encoder, the answer to a request
/// head hyper could not parse (`listen::guard_io`). Same status, headers and JSON as
/// [`error_response`], which it is built from.
pub fn render_http1(error: &ProxyError) -> Vec<u8> {
    let (head, bytes) = error_message(error);
    let status = head.status;
    let mut out = Vec::with_capacity(256 + bytes.len());
    out.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", status.as_str(), status.canonical_reason().unwrap_or("Error")).as_bytes(),
    );
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("connection: close\r\ncontent-length: {}\r\n\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(&bytes);
    out
}

/// What every answer sluice makes itself says, on the proxy and the admin listener alike: a
/// status, a stable `error` code, the RFC 9209 error type for `Proxy-Status`, and a detail.
#[derive(Debug, Clone)]
pub struct Refusal<'a> {
    pub status: StatusCode,
    pub code: &'static str,
    pub proxy_status_type: &'static str,
    pub upstream: Option<&'a str>,
    pub detail: String,
}

impl Refusal<'_> {
    /// The response: JSON `{"error", "upstream", "detail"}` plus `extra`'s fields, and
    /// `Proxy-Status`.
    pub fn into_response(self, extra: serde_json::Map<String, serde_json::Value>) -> Response<ProxyBody> {
        let (head, bytes) = self.message(extra);
        Response::from_parts(head, body::full(bytes))
    }

    fn message(self, extra: serde_json::Map<String, serde_json::Value>) -> (http::response::Parts, Bytes) {
        let mut body = serde_json::json!({
            "error": self.code,
            "upstream": self.upstream,
            "detail": self.detail,
        });
        if let Some(fields) = body.as_object_mut() {
            for (key, value) in extra {
                fields.entry(key).or_insert(value);
            }
        }
        let proxy_status =
            format!("{PROXY_NAME}; error={}; details={}", self.proxy_status_type, sf_string(&self.detail));
        let (mut head, bytes) = json_message(self.status, &body);
        if let Ok(value) = HeaderValue::from_str(&proxy_status) {
            head.headers.insert("proxy-status", value);
        }
        (head, bytes)
    }
}

/// The head and JSON body of sluice's answer to `error`.
fn error_message(error: &ProxyError) -> (http::response::Parts, Bytes) {
    let refusal = Refusal {
        status: error.status(),
        code: error.code(),
        proxy_status_type: error.proxy_status_type(),
        upstream: error.upstream.as_deref(),
        detail: error.kind.to_string(),
    };
    let mut extra = serde_json::Map::new();
    if let Some(lane) = error.lane {
        extra.insert("lane".to_owned(), serde_json::Value::String(lane.to_owned()));
    }
    let (mut head, bytes) = refusal.message(extra);
    let headers = &mut head.headers;
    if let Some(wait) = error.retry_after() {
        headers.insert(RETRY_AFTER, crate::limit::headers::retry_after(wait));
    }
    if matches!(*error.kind, ErrorKind::ProxyAuthRequired) {
        headers.append("proxy-authenticate", HeaderValue::from_static("Basic realm=\"sluice\", charset=\"UTF-8\""));
        headers.append("proxy-authenticate", HeaderValue::from_static("Bearer realm=\"sluice\""));
    }
    if let ErrorKind::RateLimited { rate_limit, policy, .. } = &*error.kind {
        if let Some(value) = rate_limit {
            headers.insert("ratelimit", value.clone());
        }
        if let Some(value) = policy {
            headers.insert("ratelimit-policy", value.clone());
        }
    }
    (head, bytes)
}

/// A JSON response (admin API and synthetic errors).
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let (head, bytes) = json_message(status, body);
    Response::from_parts(head, body::full(bytes))
}

fn json_message(status: StatusCode, body: &serde_json::Value) -> (http::response::Parts, Bytes) {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    head.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    head.headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    (head, Bytes::from(bytes))
}

/// An RFC 8941 sf-string: printable ASCII, `"` and `\` escaped, anything else replaced.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars().take(256) {
        match ch {
            '"' | '\\' => {
                out.push('\\');
                out.push(ch);
            }
            ' '..='~' => out.push(ch),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

// === the Respond layer ===

#[derive(Clone)]
pub struct RespondLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Respond<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<ProxyBody>> for Respond<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let response: BoxFuture<Result<Response<ProxyBody>, ProxyError>> = Box::pin(self.inner.call(request));
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match response.await {
                Ok(response) => Ok(response),
                Err(error) => Ok(synthesize(&error, &metrics)),
            }
        })
    }
}

/// Logs, counts and renders a [`ProxyError`]; also used by CONNECT handling.
pub fn synthesize(error: &ProxyError, metrics: &Metrics) -> Response<ProxyBody> {
    let upstream = error.upstream.clone().unwrap_or_else(|| Arc::from(NO_UPSTREAM));
    metrics.proxy_errors.with_label_values(&[&upstream, error.code()]).inc();
    if error.status().is_server_error() {
        tracing::warn!(upstream = &*upstream, error = %error, "Request failed.");
    } else {
        tracing::info!(upstream = &*upstream, error = %error, "Request refused.");
    }
    let mut response = error_response(error);
    if error.upstream.is_some() {
        response.extensions_mut().insert(UpstreamName(upstream));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_has_proxy_status_and_json() {
        let error = ProxyError::new(ErrorKind::EgressDenied { host: "evil.example".into() }, None);
        let response = error_response(&error);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let status = response.headers()["proxy-status"].to_str().unwrap();
        assert!(status.starts_with("sluice; error=http_request_denied; details=\""), "{status}");
    }

    /// The bytes `guard_io` writes say what `error_response` says, field for field.
    #[test]
    fn http1_rendering_matches_the_response() {
        let error = ProxyError::new(ErrorKind::HeadTooLarge { limit: 8192 }, None);
        let text = String::from_utf8(render_http1(&error)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 431 Request Header Fields Too Large"));
        let response = error_response(&error);
        let fields: Vec<&str> = lines.collect();
        for (name, value) in response.headers() {
            let line = format!("{}: {}", name, value.to_str().unwrap());
            assert!(fields.contains(&line.as_str()), "{line} missing from {fields:?}");
        }
        assert!(fields.contains(&"connection: close"), "{fields:?}");
        assert!(fields.contains(&format!("content-length: {}", body.len()).as_str()), "{fields:?}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "malformed_request");
        assert_eq!(json["upstream"], serde_json::Value::Null);
        assert!(json["detail"].as_str().unwrap().contains("8192"), "{json}");
        let proxy_status = response.headers()["proxy-status"].to_str().unwrap();
        assert!(proxy_status.starts_with("sluice; error=http_request_error; details="), "{proxy_status}");
    }

    #[test]
    fn sf_string_escapes() {
        assert_eq!(sf_string("a \"b\" \\ é"), "\"a \\\"b\\\" \\\\ ?\"");
    }
}
