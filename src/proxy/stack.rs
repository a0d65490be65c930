//! THE journey of an HTTP request through sluice, outermost layer first:
//!
//! ```text
//! accept (listen) -> Observe -> Respond -> Route -> Batch -> Retry -> Breaker -> Limit -> Feedback -> Forward
//! ```
//!
//! Each layer is a small tower service with one job; they share nothing but request extensions
//! (the [`Generation`] the request runs on, then its [`Routed`] destination). CONNECT requests
//! leave before this stack (see `listen::connect`): they are tunnels, not requests.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder};
use tracing::Instrument;

use super::headers;
use super::route::{Routed, Via};
use crate::batch::{Batch, BatchLayer, Batcher};
use crate::body::ProxyBody;
use crate::breaker::{BreakerGate, BreakerHandle, BreakerLayer, Breakers};
use crate::controls::RequestControls;
use crate::error::{ErrorKind, ProxyError};
use crate::limit::{self, Limiter};
use crate::respond;
use crate::retry::{Retry, RetryBudgets, RetryLayer};
use crate::security::clients::ClientIdentity;
use crate::state::Generation;
use crate::telemetry::metrics::{method_label, NO_UPSTREAM};
use crate::telemetry::Metrics;
use crate::vendor::feedback::{Feedback, FeedbackLayer};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The upstream that answered (or was meant to), left in response extensions for `Observe`.
#[derive(Debug, Clone)]
pub struct UpstreamName(pub Arc<str>);

/// The whole HTTP stack for one request; cheap to clone.
pub type HttpStack = Observe<Respond<Route<Batch<Retry<BreakerGate<Limit<Feedback<Forward>>>>>>>>;

/// What the stack's layers share across requests (and reloads).
#[derive(Clone)]
pub struct StackParts {
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<Limiter>,
    pub breakers: Arc<Breakers>,
    pub budgets: Arc<RetryBudgets>,
    pub throttles: Arc<crate::vendor::feedback::Throttles>,
    pub batcher: Arc<Batcher>,
}

/// Builds the journey. The order is the contract; each line says why it stands where it does.
pub fn http_stack(parts: StackParts) -> HttpStack {
    let StackParts { metrics, limiter, breakers, budgets, throttles, batcher } = parts;
    ServiceBuilder::new()
        // Outermost: sees every final response, synthetic ones included, for metrics and logs,
        // and gives each request its id before anything else can log.
        .layer(ObserveLayer { metrics: metrics.clone() })
        // Nothing outside this layer sees an error: a ProxyError becomes a JSON response here.
        .layer(RespondLayer { metrics: metrics.clone() })
        // Resolves the upstream once; later layers read `Routed`, never the raw request target.
        .layer(RouteLayer)
        // Single calls matching a batch rule wait here to share one bulk call; the bulk call goes
        // down the rest of the stack like any request (retry, breaker, quota, feedback).
        .layer(BatchLayer { batcher })
        // Retries wrap everything per attempt below: each retry passes the breaker again, takes
        // its own quota token, and waits out a vendor pause like any request.
        .layer(RetryLayer { metrics: metrics.clone(), breakers: breakers.clone(), budgets })
        // Before the limiter: an open circuit answers at once and spends no quota token.
        .layer(BreakerLayer { breakers, metrics: metrics.clone() })
        // Quotas and concurrency per upstream: waits (queues) or refuses before any upstream
        // work, and reports the caller's standing in `RateLimit` and `Server-Timing`.
        .layer(LimitLayer { limiter: limiter.clone(), metrics: metrics.clone() })
        // Every attempt's response is read for the vendor's own quota signals (pauses, limits).
        .layer(FeedbackLayer { limiter, throttles, metrics: metrics.clone() })
        // Innermost: the pooled client call, timed per attempt.
        .service(Forward { metrics })
}

// === Observe ===

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Decrements the in-flight gauge however the request ends, a dropped client included.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<S> Service<Request<ProxyBody>> for Observe<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        let started = Instant::now();
        let request_id = match request.headers().get(&headers::REQUEST_ID) {
            Some(id) if !id.is_empty() && id.len() <= 128 => id.clone(),
            _ => {
                let id = headers::new_request_id();
                request.headers_mut().insert(headers::REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let method = method_label(request.method());
        let request_method = request.method().clone();
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or("-"),
            trace_id = headers::trace_id(request.headers()),
            method,
            path = request.uri().path(),
        );
        self.metrics.in_flight.inc();
        let in_flight = InFlight(self.metrics.in_flight.clone());
        let metrics = self.metrics.clone();
        // Boxed before the async block: the compiler proves `Send` for a boxed future, not for
        // an associated type seen through the `ProxyBody` alias (rust-lang/rust#110338).
        let response: BoxFuture<Result<Response<ProxyBody>, Infallible>> = Box::pin(self.inner.call(request));
        Box::pin(
            async move {
                let Ok(mut response) = response.await;
                drop(in_flight);
                let upstream = response.extensions().get::<UpstreamName>().map(|name| name.0.clone());
                let upstream_label = upstream.as_deref().unwrap_or(NO_UPSTREAM);
                let status = response.status().as_u16();
                let elapsed = started.elapsed();
                metrics.observe_request(upstream_label, &request_method, status, elapsed.as_secs_f64());
                tracing::info!(
                    upstream = upstream_label,
                    status,
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    vendor_request_id = headers::vendor_request_id(response.headers()),
                    "Request completed."
                );
                // The vendor's own id, when it sent one under the same name, is kept for the caller.
                if !response.headers().contains_key(&headers::REQUEST_ID) {
                    response.headers_mut().insert(headers::REQUEST_ID.clone(), request_id);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

// === Respond ===

#[derive(Clone)]
pub struct RespondLayer {
    metrics: Arc<Metrics>,
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
    let mut response = respond::error_response(error);
    if error.upstream.is_some() {
        response.extensions_mut().insert(UpstreamName(upstream));
    }
    response
}

// === Route ===

#[derive(Clone)]
pub struct RouteLayer;

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route { inner }
    }
}

#[derive(Clone)]
pub struct Route<S> {
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for Route<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        match route(&mut request) {
            Ok(routed) => {
                request.extensions_mut().insert(routed);
                Box::pin(self.inner.call(request))
            }
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }
}

/// Who is asking, where to, and whether they may: identity, route, framing and size checks, the
/// caller's `Sluice-*` controls (parsed once, into [`RequestControls`]), and the upstream's
/// injected credential (so batching and quota scopes see what the vendor sees).
fn route(request: &mut Request<ProxyBody>) -> Result<Routed, ProxyError> {
    let generation = request.extensions().get::<Arc<Generation>>().cloned().ok_or_else(|| internal("no generation"))?;
    // A message with both framings is a smuggling attempt (RFC 9112 §6.3). hyper already drops
    // Content-Length when Transfer-Encoding is present and closes the connection after the
    // exchange; this is the backstop should any path ever hand both through.
    if request.headers().contains_key(http::header::TRANSFER_ENCODING) && request.headers().contains_key(CONTENT_LENGTH)
    {
        return Err(ProxyError::new(
            ErrorKind::Malformed { detail: "both Content-Length and Transfer-Encoding".into() },
            None,
        ));
    }
    if request.extensions().get::<ClientIdentity>().is_none() {
        let peer = request.extensions().get::<std::net::SocketAddr>().copied().unwrap_or(([127, 0, 0, 1], 0).into());
        if let Some(identity) = generation.proxy_clients.identify(request.headers(), peer)? {
            request.extensions_mut().insert(identity);
        }
    }
    let via = request.extensions().get::<Via>().cloned().unwrap_or_default();
    let routed = generation.routes.route(request, &via)?;
    if let Some(identity) = request.extensions().get::<ClientIdentity>() {
        if !identity.may_use(&routed.upstream.name) {
            return Err(ProxyError::new(
                ErrorKind::ClientNotAllowed { detail: format!("client `{}` may not use this upstream", identity.name) },
                Some(routed.upstream.name.clone()),
            ));
        }
    }
    if let Some(detail) = refused_method(request.method()) {
        return Err(ProxyError::new(
            ErrorKind::MethodNotAllowed { method: request.method().to_string(), detail: detail.into() },
            Some(routed.upstream.name.clone()),
        ));
    }
    if let Some(credential) = generation.credentials.get(&routed.upstream.name) {
        // The secret never travels in clear text to a destination the client chose.
        if routed.upstream.target.is_none() && routed.uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(ProxyError::new(
                ErrorKind::EgressDenied { host: "plain-http destination (credentials go over https only)".into() },
                Some(routed.upstream.name.clone()),
            ));
        }
        credential.apply(request.headers_mut());
    }
    let controls = RequestControls::parse(request.headers(), Instant::now()).map_err(|error| {
        ProxyError::new(ErrorKind::Malformed { detail: error.to_string() }, Some(routed.upstream.name.clone()))
    })?;
    request.extensions_mut().insert(controls);
    let limit = generation.config.live.limits.max_body_bytes;
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|value: &HeaderValue| value.to_str().ok());
    if let Some(declared) = declared {
        match declared.trim().parse::<u64>() {
            Ok(length) if length > limit => {
                return Err(ProxyError::new(ErrorKind::BodyTooLarge { limit }, Some(routed.upstream.name.clone())))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(ProxyError::new(
                    ErrorKind::Malformed { detail: "invalid Content-Length".into() },
                    Some(routed.upstream.name.clone()),
                ))
            }
        }
    }
    Ok(routed)
}

/// Methods sluice never forwards, and why. `TRACE` (and IIS's `TRACK`) echo the request back,
/// injected credential included. A `CONNECT` reaches the stack only inside a tunnel, where it
/// would ask the vendor to open another tunnel, with the credential, to a host of its choosing.
fn refused_method(method: &http::Method) -> Option<&'static str> {
    match method.as_str() {
        "TRACE" | "TRACK" => Some("it would echo the request, credentials included"),
        "CONNECT" => Some("a CONNECT inside a tunnel is not forwarded"),
        _ => None,
    }
}

fn internal(detail: &str) -> ProxyError {
    ProxyError::new(ErrorKind::Internal { detail: detail.to_owned() }, None)
}

// === Limit ===

#[derive(Clone)]
pub struct LimitLayer {
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit { inner, limiter: self.limiter.clone(), metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<ProxyBody>> for Limit<S>
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

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        // The inner service is called after the wait; take the one that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let Some(routed) = request.extensions().get::<Routed>() else {
                let response: BoxFuture<Result<Response<ProxyBody>, ProxyError>> = Box::pin(inner.call(request));
                return response.await;
            };
            let upstream = routed.upstream.clone();
            let path = routed.uri.path().to_owned();
            let peer = request.extensions().get::<std::net::SocketAddr>().copied();
            let breaker = request.extensions().get::<BreakerHandle>().cloned();
            let opened = breaker.as_ref().map(BreakerHandle::opened);
            let client = request.extensions().get::<ClientIdentity>().map(|identity| identity.name.clone());
            let host = routed.uri.host().map(str::to_owned);
            let max_wait = request.extensions().get::<RequestControls>().and_then(|controls| controls.max_wait);
            let caller = limit::Caller {
                headers: request.headers(),
                peer,
                client: client.as_deref(),
                host: host.as_deref(),
                max_wait,
            };
            let mut admission = limiter.admit(&upstream, request.method(), &path, caller, opened).await?;
            if let Some(scope) = admission.scope.take() {
                request.extensions_mut().insert(scope);
            }
            let abandon = admission.permit.is_some().then(|| abandon_rule(&request, &upstream.name, metrics));
            let response: BoxFuture<Result<Response<ProxyBody>, ProxyError>> = Box::pin(inner.call(request));
            let result = response.await;
            // The breaker hears of this attempt before its slot is free: a request waiting for
            // the slot then sees the breaker the failure opened.
            if let Some(breaker) = &breaker {
                breaker.record(&result);
            }
            let mut response = result?;
            if let (Some(permit), Some(abandon)) = (admission.permit.take(), abandon) {
                response = response.map(|body| crate::body::delivering(body, permit, abandon));
            }
            if admission.limited {
                let headers = response.headers_mut();
                headers.append("server-timing", limit::headers::server_timing(admission.queued));
                if let Some(rate_limit) = admission.rate_limit {
                    headers.insert("ratelimit", rate_limit);
                }
            }
            Ok(response)
        })
    }
}

/// How a response holding a concurrency slot is given up when its client stops reading it:
/// after `limits.response_idle_timeout`, closing the client's connection when it is HTTP/1.
fn abandon_rule(request: &Request<ProxyBody>, upstream: &Arc<str>, metrics: Arc<Metrics>) -> crate::body::Abandon {
    let idle = request
        .extensions()
        .get::<Arc<Generation>>()
        .map_or(std::time::Duration::from_secs(10), |generation| generation.config.live.limits.response_idle_timeout);
    let http1 = request.version() <= http::Version::HTTP_11;
    let connection = request.extensions().get::<crate::body::ConnectionAbort>().filter(|_| http1).cloned();
    let upstream = upstream.clone();
    crate::body::Abandon {
        idle,
        connection,
        on_abandon: Box::new(move || {
            metrics.responses_abandoned.with_label_values(&[&upstream]).inc();
            if http1 {
                metrics.connections_closed.with_label_values(&["abandoned_response"]).inc();
            }
            tracing::info!(
                upstream = &*upstream,
                idle_ms = idle.as_millis() as u64,
                "Response abandoned: the client stopped reading it; its concurrency slot is free."
            );
        }),
    }
}

// === Forward ===

#[derive(Clone)]
pub struct Forward {
    metrics: Arc<Metrics>,
}

impl Service<Request<ProxyBody>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let routed = request.extensions_mut().remove::<Routed>().ok_or_else(|| internal("request not routed"))?;
            let generation =
                request.extensions_mut().remove::<Arc<Generation>>().ok_or_else(|| internal("no generation"))?;
            let name = routed.upstream.name.clone();
            let client = generation.clients.get(&name).ok_or_else(|| internal("no client for upstream"))?;
            let started = Instant::now();
            let result = client.forward(request, routed, generation.config.live.limits.max_body_bytes).await;
            metrics.observe_upstream(&name, started.elapsed().as_secs_f64());
            let mut response = result?;
            response.extensions_mut().insert(UpstreamName(name));
            Ok(response)
        })
    }
}
