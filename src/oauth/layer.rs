//! The Authorize layer: sets the upstream's brokered token on a request (and, with
//! `instance_url: true`, sends it to the token's instance), and answers a vendor 401 with one
//! renewal and one retry.
//!
//! It stands below Batch, so a bulk call is authorised (and retried after a 401) like a single
//! one; every call to an upstream carries the same brokered token, so batches group as before.
//! It stands above Retry, so the retry after a 401 goes through retries, the breaker and the
//! limiter like any request, and takes its own quota token.
//!
//! The retry needs the body again: a body known to fit the replay buffer (`retry.max_body_bytes`,
//! 64 KiB without a retry policy) is held; a larger or streamed one is sent once, and a 401 to
//! it reaches the client (and renews the token in the background for the next requests).
//! With `mode: if_absent`, a request that brings its own credential is left alone.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response, StatusCode, Uri};
use tower::{Layer, Service, ServiceExt};

use super::broker::{Broker, Token};
use super::Brokers;
use crate::body::{self, ProxyBody};
use crate::config::{CredentialMode, Upstream};
use crate::error::{ErrorKind, ProxyError};
use crate::kit::BoxFuture;
use crate::request::{CredentialName, Routed};
use crate::telemetry::Metrics;

/// Replay buffer of an upstream without a retry policy.
const DEFAULT_REPLAY_BYTES: u64 = 64 * 1024;

#[derive(Clone)]
pub struct OAuthLayer {
    pub brokers: Arc<Brokers>,
    pub metrics: Arc<Metrics>,
}

impl<S> Layer<S> for OAuthLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: OAuthLayer,
}

impl<S> Service<Request<ProxyBody>> for Authorize<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let Some(upstream) = request.extensions().get::<Routed>().map(|routed| routed.upstream.clone()) else {
            return Box::pin(self.inner.call(request));
        };
        // No brokered credential: the inner service (made ready by our caller) answers directly.
        let broker = match self.layer.brokers.broker(&upstream) {
            Ok(Some(broker)) => broker,
            Ok(None) => return Box::pin(self.inner.call(request)),
            Err(kind) => return Box::pin(std::future::ready(Err(ProxyError::new(kind, Some(upstream.name.clone()))))),
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.layer.metrics.clone();
        Box::pin(authorize(inner, broker, upstream, request, metrics))
    }
}

async fn authorize<S>(
    inner: S,
    broker: Arc<Broker>,
    upstream: Arc<Upstream>,
    mut request: Request<ProxyBody>,
    metrics: Arc<Metrics>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let name = upstream.name.clone();
    let Some(credentials) = upstream.credentials.as_ref() else { return send(inner, request).await };
    let header = credentials.header.clone();
    if credentials.mode == CredentialMode::IfAbsent && request.headers().contains_key(&header) {
        return send(inner, request).await;
    }
    let failed = |kind: ErrorKind| ProxyError::new(kind, Some(name.clone()));
    let token = broker.token().await.map_err(failed)?;
    let limit = upstream.retry.map_or(DEFAULT_REPLAY_BYTES, |retry| retry.max_body_bytes);
    if !body::fits_replay(&request, limit) {
        apply(&mut request, &header, &token, &broker);
        let response = send(inner, request).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            metrics.oauth_unauthorized.with_label_values(&[&name, "relayed"]).inc();
            broker.rejected_in_background(token.id);
        }
        return Ok(response);
    }
    let (parts, body) = request.into_parts();
    let bytes: Bytes = body::collect_upload(body, limit).await.map_err(failed)?;
    let mut first = Request::from_parts(parts.clone(), body::full(bytes.clone()));
    apply(&mut first, &header, &token, &broker);
    let response = send(inner.clone(), first).await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    let renewed = broker.after_rejection(token.id).await.map_err(failed)?;
    if renewed.id == token.id {
        // Renewed moments ago and refused again: the vendor's answer stands.
        metrics.oauth_unauthorized.with_label_values(&[&name, "relayed"]).inc();
        return Ok(response);
    }
    drop(response);
    metrics.oauth_unauthorized.with_label_values(&[&name, "retried"]).inc();
    tracing::info!(upstream = &*name, "The vendor refused the OAuth token; retrying once with a renewed one.");
    let mut second = Request::from_parts(parts, body::full(bytes));
    apply(&mut second, &header, &renewed, &broker);
    send(inner, second).await
}

/// Calls `inner` through a boxed future (which keeps the future `Send` for every lifetime of
/// the body's error type, as the stack needs).
fn send<S>(inner: S, request: Request<ProxyBody>) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Send + 'static,
    S::Future: Send + 'static,
{
    Box::pin(inner.oneshot(request))
}

/// Sets the token (replacing whatever the client sent in that header) and what it stands for
/// (quota scopes and pause accounts outlive its renewals), and the instance's scheme and
/// authority on the outgoing URI when the token names one.
fn apply(request: &mut Request<ProxyBody>, header: &HeaderName, token: &Token, broker: &Broker) {
    request.headers_mut().insert(header.clone(), token.header.clone());
    request.extensions_mut().insert(CredentialName(broker.name().clone()));
    let Some(instance) = &token.instance else { return };
    let Some(routed) = request.extensions_mut().get_mut::<Routed>() else { return };
    let path = routed.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if let Ok(uri) = Uri::builder()
        .scheme(instance.scheme.clone())
        .authority(instance.authority.clone())
        .path_and_query(path)
        .build()
    {
        routed.uri = uri;
    }
}
