//! THE journey of an HTTP request through sluice, outermost layer first:
//!
//! ```text
//! accept (listen) -> Observe -> Respond -> Route -> Batch -> OAuth -> Retry -> Breaker -> Limit -> Feedback -> Forward
//! ```
//!
//! Each layer is a small tower service with one job, and lives in the room that owns that job
//! (`observe`, `respond`, `route`, `batch`, `oauth`, `retry`, `breaker`, `limit`, `feedback`,
//! `upstream`); this file only puts them in order. They share nothing but request extensions
//! (`request`: the [`Generation`] the request runs on, then its `Routed` destination). CONNECT
//! requests leave before this stack (see `listen::connect`): they are tunnels, not requests.
//! What the layers share across requests and reloads comes from `state::Shared`
//! ([`StackParts::of`]).

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::batch::{Batch, BatchLayer, Batcher};
use crate::breaker::{BreakerGate, BreakerLayer, Breakers};
use crate::feedback::{Feedback, FeedbackLayer, Throttles};
use crate::limit::layer::{Limit, LimitLayer};
use crate::limit::Limiter;
use crate::oauth::{Authorize, Brokers, OAuthLayer};
use crate::observe::{Observe, ObserveLayer};
use crate::respond::{Respond, RespondLayer};
use crate::retry::{Retry, RetryBudgets, RetryLayer};
use crate::route::{Route, RouteLayer};
use crate::state::{Generation, Shared};
use crate::telemetry::Metrics;
use crate::upstream::Forward;

/// The whole HTTP stack for one request; cheap to clone.
pub type HttpStack = Observe<
    Respond<Route<Batch<Authorize<Retry<BreakerGate<Limit<Feedback<Forward<Generation>>, Generation>>>>>, Generation>>,
>;

/// What the stack's layers share across requests (and reloads).
#[derive(Clone)]
pub struct StackParts {
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<Limiter>,
    pub breakers: Arc<Breakers>,
    pub budgets: Arc<RetryBudgets>,
    pub throttles: Arc<Throttles>,
    pub batcher: Arc<Batcher>,
    pub brokers: Arc<Brokers>,
}

impl StackParts {
    /// What the stack shares, from what outlives reloads.
    pub fn of(shared: &Shared) -> Self {
        Self {
            metrics: shared.metrics.clone(),
            limiter: shared.limiter.clone(),
            breakers: shared.breakers.clone(),
            budgets: shared.retry_budgets.clone(),
            throttles: shared.throttles.clone(),
            batcher: shared.batcher.clone(),
            brokers: shared.brokers.clone(),
        }
    }
}

/// Builds the journey. The order is the contract; each line says why it stands where it does.
pub fn http_stack(parts: StackParts) -> HttpStack {
    let StackParts { metrics, limiter, breakers, budgets, throttles, batcher, brokers } = parts;
    ServiceBuilder::new()
        // Outermost: sees every final response, synthetic ones included, for metrics and logs,
        // and gives each request its id before anything else can log.
        .layer(ObserveLayer { metrics: metrics.clone() })
        // Nothing outside this layer sees an error: a ProxyError becomes a JSON response here.
        .layer(RespondLayer { metrics: metrics.clone() })
        // Resolves the upstream once; later layers read `Routed`, never the raw request target.
        .layer(RouteLayer::<Generation>::new())
        // Single calls matching a batch rule wait here to share one bulk call; the bulk call goes
        // down the rest of the stack like any request (retry, breaker, quota, feedback).
        .layer(BatchLayer { batcher })
        // The brokered OAuth token is the same for every call, so it is set after batching;
        // below Batch a bulk call's 401 is renewed and retried once like a single call's, and
        // above Retry that retry passes the breaker and takes its quota token like any request.
        .layer(OAuthLayer { brokers, metrics: metrics.clone() })
        // Retries wrap everything per attempt below: each retry passes the breaker again, takes
        // its own quota token, and waits out a vendor pause like any request.
        .layer(RetryLayer { metrics: metrics.clone(), breakers: breakers.clone(), budgets })
        // Before the limiter: an open circuit answers at once and spends no quota token.
        .layer(BreakerLayer { breakers, metrics: metrics.clone() })
        // Quotas and concurrency per upstream: waits (queues) or refuses before any upstream
        // work, and reports the caller's standing in `RateLimit` and `Server-Timing`.
        .layer(LimitLayer::<Generation>::new(limiter.clone(), metrics.clone()))
        // Every attempt's response is read for the vendor's own quota signals (pauses, limits).
        .layer(FeedbackLayer { limiter, throttles, metrics: metrics.clone() })
        // Innermost: the pooled client call, timed per attempt.
        .service(Forward::<Generation>::new(metrics))
}
