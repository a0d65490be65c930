//! OBSERVE, the outermost step: every request gets its id (or keeps the caller's) before
//! anything can log, a tracing span with its trace id, and a place in the in-flight gauge; every
//! final response, sluice's own included, is counted, timed and logged once, with the vendor's
//! own request id next to sluice's.
//!
//! It stands above `upstream`, whose `headers` makes and reads request ids, and below
//! `proxy::stack`, which puts it outermost.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::body::ProxyBody;
use crate::request::UpstreamName;
use crate::telemetry::metrics::{method_label, NO_UPSTREAM};
use crate::telemetry::Metrics;
use crate::upstream::headers;

use crate::kit::BoxFuture;

#[derive(Clone)]
pub struct ObserveLayer {
    pub metrics: Arc<Metrics>,
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
