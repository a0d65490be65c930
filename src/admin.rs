//! The admin listener, for SREs and for Kubernetes probes.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process serves (liveness) |
//! | `GET /readyz` | 200 once listeners are bound and config is loaded, 503 while draining; body says the store mode |
//! | `GET /config` | the effective config as JSON, secrets redacted |
//! | `POST /reload` | reload the config file now; 200 with the generation, or 422 with the problems |
//! | `GET /quotas` | quota state per upstream (empty until quotas are configured), store mode |
//! | `GET /breakers` | circuit breaker state per upstream |

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
use crate::config::reload::{Outcome, Reloader};
use crate::respond::json_response;
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
            () = stop.cancelled() => return,
        };
        let shared = shared.clone();
        let reloader = reloader.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                let reloader = reloader.clone();
                async move {
                    if let Some(refused) = guard(&request, &shared, exposed, peer) {
                        return Ok::<_, Infallible>(refused);
                    }
                    Ok::<_, Infallible>(route(request, &shared, &reloader).await)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {}
            }
        });
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
        let settings = &shared.current().config.file.admin;
        let expected = match (&settings.token_file, &settings.token_env) {
            (Some(path), _) => std::fs::read_to_string(path).ok().map(|text| text.trim().to_owned()),
            (None, Some(name)) => std::env::var(name).ok().map(|text| text.trim().to_owned()),
            (None, None) => None,
        }
        .filter(|token| !token.is_empty());
        let Some(expected) = expected else {
            tracing::warn!(target: "sluice::audit", event = "admin_action", action, %peer, allowed = false, "Admin action refused: no admin token configured.");
            return Some(json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "admin_token_required", "detail": "the admin listener is not on loopback: configure admin.token_file or admin.token_env"}),
            ));
        };
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        // Compared as SHA-256 digests in constant time: neither the token nor its length leaks.
        let matches =
            presented.is_some_and(|token| crate::security::secrets_equal(token.as_bytes(), expected.as_bytes()));
        if !matches {
            tracing::warn!(target: "sluice::audit", event = "admin_action", action, %peer, allowed = false, "Admin action refused: bad or missing token.");
            let mut response = json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "unauthorized", "detail": "send Authorization: Bearer <admin token>"}),
            );
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sluice-admin\""));
            return Some(response);
        }
    }
    tracing::info!(target: "sluice::audit", event = "admin_action", action, %peer, allowed = true, "Admin action.");
    None
}

async fn route(request: Request<Incoming>, shared: &Shared, reloader: &Reloader) -> Response<ProxyBody> {
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
                    "kind": match shared.limiter.store_kind() { crate::config::StoreKind::Memory => "memory", crate::config::StoreKind::Redis => "redis" },
                    "mode": shared.limiter.mode().as_str(),
                    "replicas": shared.limiter.replicas(),
                },
                "generation": generation.id,
            });
            json_response(status, &body)
        }
        (&Method::GET, "/config") => {
            let generation = shared.current();
            let mut config = serde_json::to_value(&generation.config.file).unwrap_or(Value::Null);
            redact(&mut config);
            json_response(StatusCode::OK, &json!({"generation": generation.id, "config": config}))
        }
        (&Method::POST, "/reload") => match reloader.reload(crate::config::reload::Trigger::Admin).await {
            Ok(Outcome::Applied { generation } | Outcome::Unchanged { generation }) => {
                json_response(StatusCode::OK, &json!({"status": "reloaded", "generation": generation}))
            }
            Err(error) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"error": "config_invalid", "detail": error.to_string(), "generation": shared.current().id}),
            ),
        },
        (&Method::GET, "/breakers") => json_response(StatusCode::OK, &shared.breakers.snapshot()),
        (&Method::GET, "/quotas") => {
            let generation = shared.current();
            json_response(StatusCode::OK, &shared.limiter.snapshot(&generation.config.upstreams).await)
        }
        (_, path @ ("/metrics" | "/healthz" | "/readyz" | "/config" | "/reload" | "/quotas" | "/breakers")) => {
            let allow = if path == "/reload" { "POST" } else { "GET" };
            let mut response = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "detail": format!("{} is not allowed here; use {allow}", request.method())}),
            );
            response.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "detail": "endpoints: /metrics /healthz /readyz /config /reload /quotas /breakers"}),
        ),
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
}
