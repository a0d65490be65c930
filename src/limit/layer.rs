//! The Limit layer: quotas and concurrency per upstream, between the breaker (above: an open
//! circuit spends no token) and the vendor. It waits (queues) or refuses before any upstream
//! work, hands the Feedback layer the scope the request was charged in, tells the breaker of
//! the attempt's outcome before the request's slot is released (a waiter for that slot must see
//! the breaker the failure opened), holds the slot until the response has been delivered (or
//! abandoned by a client that stopped reading it), and reports the caller's standing in
//! `RateLimit` and `Server-Timing`.

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, Service};

use super::Limiter;
use crate::body::ProxyBody;
use crate::breaker::BreakerHandle;
use crate::config::Lane;
use crate::consumer::{Consumer, ItemConsumers};
use crate::error::ProxyError;
use crate::request::{CredentialName, RequestControls, Routed};
use crate::security::clients::ClientIdentity;
use crate::telemetry::Metrics;

use crate::kit::BoxFuture;

/// What Limit needs of the generation a request runs on (`state::Generation` provides it).
pub trait LimitContext: Send + Sync + 'static {
    /// `limits.response_idle_timeout`: how long a response holding a slot may go unread.
    fn response_idle_timeout(&self) -> Duration;
}

pub struct LimitLayer<G> {
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    _generation: PhantomData<fn() -> G>,
}

impl<G> LimitLayer<G> {
    pub fn new(limiter: Arc<Limiter>, metrics: Arc<Metrics>) -> Self {
        Self { limiter, metrics, _generation: PhantomData }
    }
}

impl<G> Clone for LimitLayer<G> {
    fn clone(&self) -> Self {
        Self::new(self.limiter.clone(), self.metrics.clone())
    }
}

impl<S, G> Layer<S> for LimitLayer<G> {
    type Service = Limit<S, G>;
    fn layer(&self, inner: S) -> Limit<S, G> {
        Limit { inner, limiter: self.limiter.clone(), metrics: self.metrics.clone(), _generation: PhantomData }
    }
}

pub struct Limit<S, G> {
    inner: S,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    _generation: PhantomData<fn() -> G>,
}

impl<S: Clone, G> Clone for Limit<S, G> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            _generation: PhantomData,
        }
    }
}

impl<S, G> Service<Request<ProxyBody>> for Limit<S, G>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    G: LimitContext,
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
            let credential = request.extensions().get::<CredentialName>().map(|name| name.0.clone());
            // Who the tokens are spent for: the request's consumer, or each item's of a bulk call.
            let consumers: &[Arc<str>] =
                match (request.extensions().get::<ItemConsumers>(), request.extensions().get::<Consumer>()) {
                    (Some(items), _) => &items.0,
                    (None, Some(single)) => std::slice::from_ref(&single.0),
                    (None, None) => &[],
                };
            let lane = request.extensions().get::<Lane>().copied().unwrap_or_default();
            let caller = super::Caller {
                headers: request.headers(),
                peer,
                client: client.as_deref(),
                host: host.as_deref(),
                max_wait,
                credential: credential.as_deref(),
                consumers,
                lane,
            };
            let mut admission = limiter
                .admit(&upstream, request.method(), &path, caller, opened)
                .await
                .map_err(|error| error.in_lane(lane.as_str()))?;
            if let Some(scope) = admission.scope.take() {
                request.extensions_mut().insert(scope);
            }
            let abandon = admission.permit.is_some().then(|| abandon_rule::<G>(&request, &upstream.name, metrics));
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
                headers.append("server-timing", super::headers::server_timing(admission.queued));
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
fn abandon_rule<G: LimitContext>(
    request: &Request<ProxyBody>,
    upstream: &Arc<str>,
    metrics: Arc<Metrics>,
) -> crate::body::Abandon {
    let idle = request
        .extensions()
        .get::<Arc<G>>()
        .map_or(Duration::from_secs(10), |generation| generation.response_idle_timeout());
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
