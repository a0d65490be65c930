//! FORWARD, the innermost step: the request goes to the vendor over the upstream's pooled
//! client, and its answer streams back. The room owns the clients (`client`: one pool, connect
//! timeout, trust roots and egress guard per upstream, with failures sorted into the kinds a
//! caller can act on), header hygiene on both sides (`headers`), and the Forward service.
//!
//! The service finds the upstream's client in the generation the request runs on, through
//! [`Upstreams`], so this room needs nothing from the rooms above it: it reads `security` (the
//! egress guard) and `tls`, and `observe` and `batch` read its `headers`.

pub mod client;
pub mod headers;

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

pub use client::UpstreamClient;

use crate::body::ProxyBody;
use crate::error::{ErrorKind, ProxyError};
use crate::request::{Routed, UpstreamName};
use crate::telemetry::Metrics;

use crate::kit::BoxFuture;

/// What Forward needs of the generation a request runs on (`state::Generation` provides it).
pub trait Upstreams: Send + Sync + 'static {
    /// The pooled client of the upstream `name`.
    fn client(&self, name: &str) -> Option<&UpstreamClient>;
    /// `limits.max_body_bytes`, for the vendor's answer.
    fn max_body_bytes(&self) -> u64;
}

/// The innermost service: the pooled client call, timed per attempt.
pub struct Forward<G> {
    metrics: Arc<Metrics>,
    _generation: PhantomData<fn() -> G>,
}

impl<G> Forward<G> {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, _generation: PhantomData }
    }
}

impl<G> Clone for Forward<G> {
    fn clone(&self) -> Self {
        Self::new(self.metrics.clone())
    }
}

impl<G: Upstreams> Service<Request<ProxyBody>> for Forward<G> {
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
            let generation = request.extensions_mut().remove::<Arc<G>>().ok_or_else(|| internal("no generation"))?;
            let name = routed.upstream.name.clone();
            let client = generation.client(&name).ok_or_else(|| internal("no client for upstream"))?;
            let started = Instant::now();
            let result = client.forward(request, routed, generation.max_body_bytes()).await;
            metrics.observe_upstream(&name, started.elapsed().as_secs_f64());
            let mut response = result?;
            response.extensions_mut().insert(UpstreamName(name));
            Ok(response)
        })
    }
}

fn internal(detail: &str) -> ProxyError {
    ProxyError::new(ErrorKind::Internal { detail: detail.to_owned() }, None)
}
