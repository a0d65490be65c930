//! The admin listener, for SREs and for Kubernetes probes.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process serves (liveness) |
//! | `GET /readyz` | 200 once listeners are bound and config is loaded, 503 while draining; body says the store mode |
//! | `GET /config` | the effective config as JSON, secrets redacted |
//! | `POST /reload` | reload the config file now; 200 with the generation, or 422 with the problems |
//! | `GET /quotas` | quota state per upstream (empty until quotas are configured), store mode, forecasts |
//! | `GET /usage` | spend per upstream and quota by consumer: the current window, last hour, today |
//! | `GET /breakers` | circuit breaker state per upstream (and per host on wildcard upstreams) |
//!
//! The listener often has to be reachable from the cluster (kubelet probes, Prometheus), so it
//! is hardened like the proxy's: at most `admin.max_connections` open (more are closed at
//! once), a request head within `admin.header_read_timeout` (the first byte included), and
//! every connection a tracked task. Scope values and client-named hosts are tenant data (a
//! quota keyed by `header:x-api-key` has tokens for scope values): `/quotas` and `/breakers`
//! show them hashed unless the caller is privileged: it presents the admin token, or no token is
//! configured and the listener is on loopback (`privileged`).
//!
//! Errors here are [`crate::respond::Refusal`]s, the shape of every answer sluice makes itself:
//! JSON `{"error", "upstream": null, "detail"}` and `Proxy-Status`. The room stands above
//! `reload` (`POST /reload` calls it) and `state`, and only `app` names it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};
use crate::config::AdminToken;
use crate::reload::{Outcome, Reloader};
use crate::respond::{json_response, Refusal};
use crate::state::Shared;

/// Serves the admin API until shutdown completes (it stays up while the proxy drains, so
/// probes and metrics keep answering).
pub async fn serve_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    stop: tokio_util::sync::CancellationToken,
) {
    // Off loopback, the endpoints that reveal or change config need the admin token.
    let exposed = listener.local_addr().is_ok_and(|addr| !addr.ip().is_loopback());
    // Sized at start, like the proxy's connection cap.
    let slots = Arc::new(tokio::sync::Semaphore::new(shared.current().config.process.admin_max_connections));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Admin accept failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Past the cap a connection is closed at once: it never waits in the backlog, and the
        // process's file descriptors stay the proxy's.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.connections_refused.with_label_values(&["admin_max_connections"]).inc();
            tracing::debug!(%peer, "Admin connection refused: admin.max_connections reached.");
            drop(stream);
            continue;
        };
        let header_read_timeout = shared.current().config.live.admin.header_read_timeout;
        let shared = shared.clone();
        let reloader = reloader.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let service_started = started.clone();
            let service = service_fn(move |request| {
                service_started.store(true, std::sync::atomic::Ordering::Release);
                let shared = shared.clone();
                let reloader = reloader.clone();
                async move {
                    if let Some(refused) = guard(&request, &shared, exposed, peer) {
                        return Ok::<_, Infallible>(refused);
                    }
                    let privileged = privileged(&request, &shared, exposed);
                    Ok::<_, Infallible>(route(request, &shared, &reloader, privileged).await)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(16)
                .keep_alive_interval(header_read_timeout)
                .keep_alive_timeout(header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            // hyper's header timer starts only once HTTP/1 is told from HTTP/2; this deadline
            // covers a peer that sends nothing at all. An admin exchange is short, so an
            // HTTP/2 connection (no per-request timer) is bounded by a lifetime too.
            let first_byte = tokio::time::sleep(header_read_timeout);
            tokio::pin!(first_byte);
            let lifetime = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME.max(header_read_timeout));
            tokio::pin!(lifetime);
            let mut checked = false;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => break,
                    () = &mut first_byte, if !checked => {
                        checked = true;
                        if !started.load(std::sync::atomic::Ordering::Acquire) {
                            tracing::debug!(%peer, "Admin connection sent no request in time; closing.");
                            break;
                        }
                    }
                    () = &mut lifetime => break,
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    tasks.close();
    // Each connection ends on `stop`; this only waits for them to notice.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tasks.wait()).await;
}

/// The longest an admin connection stays open. Probes and scrapes open a new one at once.
const ADMIN_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);

/// The admin token expected now, if one is configured (re-read on every check).
fn expected_token(shared: &Shared) -> Option<String> {
    match &shared.current().config.live.admin.token {
        Some(AdminToken::File(path)) => std::fs::read_to_string(path).ok().map(|text| text.trim().to_owned()),
        Some(AdminToken::Env(name)) => std::env::var(name).ok().map(|text| text.trim().to_owned()),
        None => None,
    }
    .filter(|token| !token.is_empty())
}

/// Whether `request` carries `Authorization: Bearer <expected>`. Both sides are hashed before
/// the constant-time comparison, so neither the token nor its length shows in the timing.
fn presents_token(request: &Request<Incoming>, expected: &str) -> bool {
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    // Compared as SHA-256 digests in constant time: neither the token nor its length leaks.
    presented.is_some_and(|token| crate::security::secrets_equal(token.as_bytes(), expected.as_bytes()))
}

/// Whether the caller may see tenant data (raw scope values, client-named hosts): it presents
/// the admin token; or no token is configured and the listener is on loopback, where only the
/// pod's own processes can reach it. A configured token protects tenant data on loopback too.
fn privileged(request: &Request<Incoming>, shared: &Shared, exposed: bool) -> bool {
    match expected_token(shared) {
        Some(expected) => presents_token(request, &expected),
        None => !exposed,
    }
}

/// `h-` and the first 16 hex digits of SHA-256: stable, so a value can be looked up by hashing
/// it, but the value itself (a token, a tenant id, an address) is not shown.
fn hashed(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("h-{hex}")
}

/// Replaces every scope value in a `/quotas` answer with its hash. A scope is its values joined
/// by `|`; `_all` (an unscoped quota) and `_default` (no value sent) are not tenant data.
pub fn hash_scopes(quotas: &mut Value) {
    match quotas {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                match (key.as_str(), item) {
                    ("scope", Value::String(scope)) => {
                        let parts: Vec<String> = scope
                            .split('|')
                            .map(
                                |part| if matches!(part, "_all" | "_default") { part.to_owned() } else { hashed(part) },
                            )
                            .collect();
                        *scope = parts.join("|");
                    }
                    (_, item) => hash_scopes(item),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(hash_scopes),
        _ => {}
    }
}

/// Replaces the host of every per-host breaker in a `/breakers` answer with its hash.
fn hash_hosts(breakers: &mut Value) {
    if let Some(all) = breakers.get_mut("breakers").and_then(Value::as_array_mut) {
        for breaker in all {
            if let Some(host) = breaker.get_mut("host") {
                if let Some(text) = host.as_str() {
                    *host = Value::String(hashed(text));
                }
            }
        }
    }
}

/// Token check for `POST /reload` and `GET /config` on a non-loopback admin listener, and the
/// audit line for every admin action. `None`: go ahead.
fn guard(
    request: &Request<Incoming>,
    shared: &Shared,
    exposed: bool,
    peer: std::net::SocketAddr,
) -> Option<Response<ProxyBody>> {
    let path = request.uri().path();
    let sensitive = matches!((request.method(), path), (&Method::POST, "/reload") | (&Method::GET, "/config"));
    if !sensitive {
        return None;
    }
    let action = if path == "/reload" { "reload" } else { "read_config" };
    if exposed {
        let Some(expected) = expected_token(shared) else {
            tracing::warn!(target: "sluice::audit", event = "admin_action", action, %peer, allowed = false, "Admin action refused: no admin token configured.");
            return Some(AdminError::TokenRequired.response());
        };
        if !presents_token(request, &expected) {
            tracing::warn!(target: "sluice::audit", event = "admin_action", action, %peer, allowed = false, "Admin action refused: bad or missing token.");
            let mut response = AdminError::Unauthorized.response();
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sluice-admin\""));
            return Some(response);
        }
    }
    tracing::info!(target: "sluice::audit", event = "admin_action", action, %peer, allowed = true, "Admin action.");
    None
}

async fn route(
    request: Request<Incoming>,
    shared: &Shared,
    reloader: &Reloader,
    privileged: bool,
) -> Response<ProxyBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(body::full(Bytes::from(shared.metrics.render())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            response
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let generation = shared.current();
            let ready = shared.is_ready();
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = json!({
                "status": if ready { "ready" } else if shared.shutdown.is_cancelled() { "draining" } else { "starting" },
                "store": {
                    "kind": shared.limiter.store_kind().as_str(),
                    "mode": shared.limiter.mode().as_str(),
                    "replicas": shared.limiter.replicas(),
                },
                "generation": generation.id,
            });
            json_response(status, &body)
        }
        (&Method::GET, "/config") => {
            let generation = shared.current();
            let mut config = generation.config.effective();
            redact(&mut config);
            json_response(StatusCode::OK, &json!({"generation": generation.id, "config": config}))
        }
        (&Method::POST, "/reload") => match reloader.reload(crate::reload::Trigger::Admin).await {
            Ok(Outcome::Applied { generation } | Outcome::Unchanged { generation }) => {
                json_response(StatusCode::OK, &json!({"status": "reloaded", "generation": generation}))
            }
            Err(error) => AdminError::ConfigInvalid { detail: error.to_string() }
                .response_with("generation", json!(shared.current().id)),
        },
        (&Method::GET, "/breakers") => {
            let mut breakers = shared.breakers.snapshot();
            if !privileged {
                hash_hosts(&mut breakers);
            }
            json_response(StatusCode::OK, &breakers)
        }
        (&Method::GET, "/quotas") => {
            let generation = shared.current();
            let snapshot = shared.limiter.snapshot(&generation.config.live.upstreams).await;
            let mut quotas = serde_json::to_value(snapshot).unwrap_or_default();
            if !privileged {
                hash_scopes(&mut quotas);
            }
            json_response(StatusCode::OK, &quotas)
        }
        (&Method::GET, "/usage") => {
            let generation = shared.current();
            let usage = shared.limiter.usage(&generation.config.live.upstreams).await;
            json_response(StatusCode::OK, &serde_json::to_value(usage).unwrap_or_default())
        }
        (
            _,
            path @ ("/metrics" | "/healthz" | "/readyz" | "/config" | "/reload" | "/quotas" | "/usage" | "/breakers"),
        ) => {
            let allow = if path == "/reload" { "POST" } else { "GET" };
            let mut response = AdminError::MethodNotAllowed { method: request.method().to_string(), allow }.response();
            response.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        _ => AdminError::NotFound.response(),
    }
}

/// Why the admin listener refused a request. Rendered by `respond` like every answer sluice
/// makes itself: the same JSON shape and `Proxy-Status` as the proxy's refusals.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("the admin listener is not on loopback: configure admin.token_file or admin.token_env")]
    TokenRequired,
    #[error("send Authorization: Bearer <admin token>")]
    Unauthorized,
    #[error("{method} is not allowed here; use {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("endpoints: /metrics /healthz /readyz /config /reload /quotas /usage /breakers")]
    NotFound,
    #[error("{detail}")]
    ConfigInvalid { detail: String },
}

impl AdminError {
    fn refusal(&self) -> Refusal<'static> {
        let (status, code, proxy_status_type) = match self {
            AdminError::TokenRequired => (StatusCode::FORBIDDEN, "admin_token_required", "http_request_denied"),
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "http_request_denied"),
            AdminError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "http_request_denied")
            }
            AdminError::NotFound => (StatusCode::NOT_FOUND, "not_found", "destination_not_found"),
            AdminError::ConfigInvalid { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "config_invalid", "proxy_configuration_error")
            }
        };
        Refusal { status, code, proxy_status_type, upstream: None, detail: self.to_string() }
    }

    fn response(&self) -> Response<ProxyBody> {
        self.refusal().into_response(serde_json::Map::new())
    }

    fn response_with(&self, key: &str, value: Value) -> Response<ProxyBody> {
        let mut extra = serde_json::Map::new();
        extra.insert(key.to_owned(), value);
        self.refusal().into_response(extra)
    }
}

/// Replaces secret-looking values: keys naming a secret, and passwords inside URLs.
pub fn redact(value: &mut Value) {
    const SECRET_KEYS: &[&str] = &["password", "secret", "token", "api_key", "authorization"];
    match value {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let lower = key.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|secret| lower.contains(secret)) && !item.is_null() {
                    *item = Value::String("<redacted>".into());
                } else {
                    redact(item);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(text) => {
            if let Some((scheme, rest)) = text.split_once("://") {
                if let Some((_userinfo, host)) = rest.split_once('@') {
                    *text = format!("{scheme}://<redacted>@{host}");
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets_and_url_passwords() {
        let mut value = json!({"url": "redis://:hunter2@10.0.0.1:6379/0", "nested": {"token": "abc", "name": "x"}});
        redact(&mut value);
        assert_eq!(value["url"], "redis://<redacted>@10.0.0.1:6379/0");
        assert_eq!(value["nested"]["token"], "<redacted>");
        assert_eq!(value["nested"]["name"], "x");
    }

    #[test]
    fn scope_values_are_hashed_part_by_part() {
        let mut quotas = json!({"upstreams": [{"quotas": [{"name": "q", "scopes": [
            {"scope": "pat-na1-abc", "requests": 3},
            {"scope": "_default|10.0.0.7", "requests": 1},
            {"scope": "_all", "requests": 9},
        ]}]}]});
        hash_scopes(&mut quotas);
        let scopes = &quotas["upstreams"][0]["quotas"][0]["scopes"];
        assert_eq!(scopes[0]["scope"], hashed("pat-na1-abc"));
        assert_eq!(scopes[1]["scope"], format!("_default|{}", hashed("10.0.0.7")));
        assert_eq!(scopes[2]["scope"], "_all");
        assert_eq!(scopes[0]["requests"], 3);
        assert!(!quotas.to_string().contains("pat-na1-abc"));
        assert!(hashed("x").starts_with("h-") && hashed("x").len() == 18);
    }
}
