//! The one place a [`ProxyError`] becomes an HTTP response.
//!
//! Every response sluice makes itself carries `Proxy-Status` (RFC 9209) naming sluice and the
//! error type, and a JSON body `{"error", "upstream", "detail"}`, so a client (or an SRE with
//! curl) can always tell a vendor's answer from sluice's.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::error::{ErrorKind, ProxyError};

/// Name sluice uses for itself in `Proxy-Status` and `Via`.
pub const PROXY_NAME: &str = "sluice";

pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let detail = error.kind.to_string();
    let body = serde_json::json!({
        "error": error.code(),
        "upstream": error.upstream.as_deref(),
        "detail": detail,
    });
    let proxy_status = format!("{PROXY_NAME}; error={}; details={}", error.proxy_status_type(), sf_string(&detail));
    let mut response = json_response(error.status(), &body);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&proxy_status) {
        headers.insert("proxy-status", value);
    }
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
    response
}

/// A JSON response (admin API and synthetic errors).
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(body::full(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
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

    #[test]
    fn sf_string_escapes() {
        assert_eq!(sf_string("a \"b\" \\ é"), "\"a \\\"b\\\" \\\\ ?\"");
    }
}
