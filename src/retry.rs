//! RETRY, safe retries: only requests that can be repeated (idempotent methods, or an
//! `Idempotency-Key`), only for failures a second try can fix (connect errors, as
//! `ProxyError::retryable` says, and 429, 502, 503, 504), with exponential backoff and full
//! jitter (`kit::full_jitter`), honouring `Retry-After`, never past the request's deadline, never
//! into an open breaker, and never more than the retry budget allows, so retries can't multiply
//! an outage. Each attempt goes back through the breaker and the limiter: a retry takes a quota
//! token like any request, and one after a 429 waits out the vendor's pause.
//!
//! The room stands above `breaker`, which it asks before every retry, and `vendor`
//! (`Retry-After`); only `proxy::stack` and `state` (the budgets) name it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::body::{self, ProxyBody};
use crate::breaker::{Breakers, Phase};
use crate::config::RetryPolicy;
use crate::controls::{RequestControls, MAX_CONTROL};
use crate::error::{ErrorKind, ProxyError};
use crate::request::Routed;
use crate::telemetry::Metrics;

use crate::kit::BoxFuture;

/// The budget's sliding window, in one-second buckets.
const BUDGET_WINDOW_SECS: usize = 10;

pub use crate::controls::DEADLINE_HEADER;

#[derive(Clone)]
pub struct RetryLayer {
    pub metrics: Arc<Metrics>,
    pub breakers: Arc<Breakers>,
    pub budgets: Arc<RetryBudgets>,
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Service<Request<ProxyBody>> for Retry<S>
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
        // Nothing to retry and no deadline from the caller: the inner service (made ready by
        // our caller) answers directly, with no clone of the stack below and no extra future.
        let routed = request.extensions().get::<Routed>();
        let retries = routed.is_some_and(|routed| routed.upstream.retry.is_some_and(|retry| retry.attempts > 1));
        let asked = request.extensions().get::<RequestControls>().and_then(|controls| controls.deadline);
        if !retries && asked.is_none() {
            return Box::pin(self.inner.call(request));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let lane = request.extensions().get::<crate::config::Lane>().copied();
        let attempts = Box::pin(async move {
            let upstream = request.extensions().get::<Routed>().map(|routed| routed.upstream.clone());
            let Some(upstream) = upstream else {
                let response: BoxFuture<_> = Box::pin(inner.oneshot(request));
                return response.await;
            };
            let started = Instant::now();
            let host =
                request.extensions().get::<Routed>().and_then(|routed| routed.uri.host()).map(str::to_ascii_lowercase);
            let policy = upstream.retry.filter(|retry| retry.attempts > 1);
            let Some(policy) = policy else {
                // No retries; the caller's own deadline still caps the exchange.
                let response: BoxFuture<_> = Box::pin(inner.oneshot(request));
                return match asked {
                    None => response.await,
                    Some(asked) => within(started, asked, response, &upstream).await,
                };
            };
            let budget = layer.budgets.for_upstream(&upstream.name);
            budget.set_ratio(policy.budget);
            budget.record_request();
            // `timeouts.request` is the operator's (validated) word, the caller's deadline is
            // clamped when parsed; checked all the same, since an overflow here would panic.
            let ours = started.checked_add(upstream.request_timeout);
            let deadline = match (ours, asked) {
                (Some(ours), Some(asked)) => ours.min(asked),
                (ours, asked) => ours.or(asked).or_else(|| started.checked_add(MAX_CONTROL)).unwrap_or(started),
            };
            if !repeatable(request.method(), request.headers()) || !body::fits_replay(&request, policy.max_body_bytes) {
                let response: BoxFuture<_> = Box::pin(inner.oneshot(request));
                return within(started, deadline, response, &upstream).await;
            }
            let (parts, body) = request.into_parts();
            let bytes: Bytes = crate::body::collect_upload(body, policy.max_body_bytes)
                .await
                .map_err(|kind| ProxyError::new(kind, Some(upstream.name.clone())))?;
            let mut attempt = 1;
            loop {
                let mut request = Request::from_parts(parts.clone(), body::full(bytes.clone()));
                // Every attempt, queueing in the limiter included, ends by the deadline: a vendor
                // pause longer than what is left is answered with its Retry-After, not waited out.
                let left = deadline.saturating_duration_since(Instant::now());
                request.extensions_mut().get_or_insert_default::<RequestControls>().narrow_wait(left);
                let response: BoxFuture<_> = Box::pin(inner.clone().oneshot(request));
                let result = within(started, deadline, response, &upstream).await;
                let Some(reason) = retry_reason(&result) else { return result };
                if attempt >= policy.attempts {
                    return result;
                }
                if layer.breakers.phase(&upstream.name, host.as_deref()) == Some(Phase::Open) {
                    return result;
                }
                let mut delay = backoff(&policy, attempt);
                if let Ok(response) = &result {
                    let mut ignored = 0;
                    if let Some(asked) =
                        crate::vendor::retry_after(response.headers(), std::time::SystemTime::now(), &mut ignored)
                    {
                        delay = delay.max(asked);
                    }
                }
                // The delay may be the vendor's Retry-After: checked, never `Instant + Duration`.
                if Instant::now().checked_add(delay).is_none_or(|end| end >= deadline) {
                    return result;
                }
                if !budget.try_spend() {
                    layer.metrics.retry_budget_exhausted.with_label_values(&[&upstream.name]).inc();
                    tracing::info!(upstream = &*upstream.name, reason, "Retry budget spent; not retrying.");
                    return result;
                }
                layer.metrics.retries.with_label_values(&[&upstream.name, reason]).inc();
                tracing::warn!(
                    upstream = &*upstream.name,
                    attempt,
                    reason,
                    delay_ms = delay.as_millis() as u64,
                    "Retrying."
                );
                drop(result);
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        });
        Box::pin(async move {
            let result: Result<Response<ProxyBody>, ProxyError> = attempts.await;
            // A request that timed out waiting says which lane it waited in.
            match lane {
                Some(lane) => result.map_err(|error| error.in_lane(lane.as_str())),
                None => result,
            }
        })
    }
}

/// Idempotent by method (RFC 9110 §9.2.2), or made so by the caller's `Idempotency-Key`.
fn repeatable(method: &Method, headers: &http::HeaderMap) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
        || headers.contains_key("idempotency-key")
}

/// Runs `response`, answering 504 if `deadline` passes first.
async fn within(
    started: Instant,
    deadline: Instant,
    response: BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
    upstream: &crate::config::Upstream,
) -> Result<Response<ProxyBody>, ProxyError> {
    match tokio::time::timeout_at(deadline, response).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::new(
            ErrorKind::ResponseTimeout { after: deadline.saturating_duration_since(started) },
            Some(upstream.name.clone()),
        )),
    }
}

fn retry_reason(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<&'static str> {
    match result {
        Ok(response) => match response.status() {
            StatusCode::TOO_MANY_REQUESTS => Some("status_429"),
            StatusCode::BAD_GATEWAY => Some("status_502"),
            StatusCode::SERVICE_UNAVAILABLE => Some("status_503"),
            StatusCode::GATEWAY_TIMEOUT => Some("status_504"),
            _ => None,
        },
        Err(error) if error.retryable() => Some("connect_error"),
        Err(_) => None,
    }
}

/// Full jitter: uniform in [0, min(max_backoff, backoff * 2^(attempt-1))].
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    crate::kit::full_jitter(policy.backoff, attempt.saturating_sub(1), policy.max_backoff)
}

/// Retry budgets by upstream.
#[derive(Default)]
pub struct RetryBudgets {
    by_upstream: Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>,
}

impl RetryBudgets {
    pub fn for_upstream(&self, upstream: &Arc<str>) -> Arc<RetryBudget> {
        let mut map = crate::kit::lock(&self.by_upstream);
        map.entry(upstream.clone()).or_insert_with(|| Arc::new(RetryBudget::default())).clone()
    }
}

/// Requests and retries over the last ten seconds: retries may be at most `budget` x requests
/// (and at least one, so a quiet upstream can still retry once).
#[derive(Default)]
pub struct RetryBudget {
    window: Mutex<Window>,
    ratio_millis: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Window {
    /// (second, requests, retries), newest last.
    buckets: VecDeque<(u64, u64, u64)>,
}

impl RetryBudget {
    fn now_second() -> u64 {
        crate::kit::unix_seconds(std::time::SystemTime::now())
    }

    fn with_current<T>(&self, f: impl FnOnce(&mut Window, u64) -> T) -> T {
        let second = Self::now_second();
        let mut window = crate::kit::lock(&self.window);
        while window.buckets.front().is_some_and(|(s, _, _)| *s + (BUDGET_WINDOW_SECS as u64) <= second) {
            window.buckets.pop_front();
        }
        if window.buckets.back().is_none_or(|(s, _, _)| *s != second) {
            window.buckets.push_back((second, 0, 0));
        }
        f(&mut window, second)
    }

    pub fn set_ratio(&self, ratio: f64) {
        self.ratio_millis.store((ratio * 1000.0) as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn record_request(&self) {
        self.with_current(|window, _| {
            if let Some(bucket) = window.buckets.back_mut() {
                bucket.1 += 1;
            }
        });
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_spend(&self) -> bool {
        let ratio = self.ratio_millis.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0;
        self.with_current(|window, _| {
            let (requests, retries) = window.buckets.iter().fold((0, 0), |(q, r), (_, bq, br)| (q + bq, r + br));
            let allowed = ((ratio * requests as f64).floor() as u64).max(1);
            if retries < allowed {
                if let Some(bucket) = window.buckets.back_mut() {
                    bucket.2 += 1;
                }
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_retries_at_ratio_of_requests() {
        let budget = RetryBudget::default();
        budget.set_ratio(0.2);
        for _ in 0..50 {
            budget.record_request();
        }
        let spent = (0..100).filter(|_| budget.try_spend()).count();
        assert_eq!(spent, 10);
    }

    #[test]
    fn quiet_upstream_may_retry_once() {
        let budget = RetryBudget::default();
        budget.set_ratio(0.2);
        budget.record_request();
        assert!(budget.try_spend());
        assert!(!budget.try_spend());
    }

    #[test]
    fn only_repeatable_requests() {
        let headers = http::HeaderMap::new();
        assert!(repeatable(&Method::GET, &headers));
        assert!(repeatable(&Method::PUT, &headers));
        assert!(!repeatable(&Method::POST, &headers));
        let mut keyed = http::HeaderMap::new();
        keyed.insert("idempotency-key", "abc".parse().unwrap());
        assert!(repeatable(&Method::POST, &keyed));
    }

    #[test]
    fn backoff_is_capped_full_jitter() {
        let policy = RetryPolicy {
            attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            budget: 0.2,
            max_body_bytes: 1024,
        };
        for attempt in 1..6 {
            assert!(backoff(&policy, attempt) <= Duration::from_millis(300));
        }
    }
}
