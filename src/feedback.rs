//! FEEDBACK: the vendor's word, acted on. The Feedback layer reads every upstream attempt's
//! response with the upstream's header profile and acts on it, so all replicas slow down before
//! the vendor starts refusing and hold off while it does.
//!
//! - the vendor's remaining quota is exported (`sluice_vendor_remaining`);
//! - a limit lower than configured becomes the effective limit (and lifts when the vendor says so);
//! - a remaining figure lower than sluice's own record (someone else spends the same account) is
//!   adopted, in the shared store, for the rest of that window; `Remaining: 0` on a rolling
//!   window with no reset therefore holds the scope only until sluice's oldest admission leaves
//!   the window, not for a whole window (and is no pause at all when sluice spent the quota
//!   itself, as it should);
//! - remaining at or under `pause_at_remaining` with a known reset (or a window no quota
//!   follows) pauses the scope until then;
//! - a throttle (429, or the profile's own signal such as Salesforce's 403) pauses the scope
//!   for Retry-After, else the profile's window, else exponential backoff with full jitter;
//! - a 5xx is the breaker's business, not a throttle: only with Retry-After does it also pause
//!   the scope, marked as an outage so callers refused meanwhile get 503, never 429.
//!
//! Every pause is capped at 26 h (`vendor::MAX_PAUSE`).
//!
//! The room stands above `vendor` (whose parsers it runs) and `limit` (through which it records
//! pauses, follows lower limits and adopts the vendor's figures); the limiter never names it.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::body::{self, ProxyBody};
use crate::error::ProxyError;
use crate::limit::{watches_vendor, Limiter, VendorScope};
use crate::request::Routed;
use crate::telemetry::Metrics;
use crate::vendor::{observe, ThrottleClass};

use crate::kit::BoxFuture;

/// Largest refused-response body read to classify a throttle; bigger ones are not read.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// How long a daily-class throttle holds before one request probes whether quota is back.
const DAILY_PROBE_EVERY: Duration = Duration::from_secs(60);

/// A vendor's window name as a metric label: its own words, but bounded in length and alphabet
/// (an IETF policy name is whatever the vendor sends).
fn window_label(name: &str) -> String {
    name.chars()
        .take(32)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_ascii_lowercase() } else { '_' })
        .collect()
}

/// Reads up to `cap` bytes of `body`. A body that ends within the cap comes back whole as bytes
/// (and as a fresh body); a longer one is passed on as it came: what was read is put back in
/// front of the rest, and there are no bytes to classify.
async fn read_prefix(mut body: ProxyBody, cap: u64) -> Result<(ProxyBody, Option<Bytes>), crate::body::BoxError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        total += data.len() as u64;
        chunks.push(data);
        if total > cap {
            let replay = futures_util::stream::iter(
                chunks.into_iter().map(|chunk| Ok::<_, crate::body::BoxError>(http_body::Frame::data(chunk))),
            );
            let rest = http_body_util::BodyStream::new(body);
            let chained = http_body_util::StreamBody::new(futures_util::StreamExt::chain(replay, rest));
            return Ok((chained.boxed(), None));
        }
    }
    let bytes: Bytes = chunks.concat().into();
    Ok((body::full(bytes.clone()), Some(bytes)))
}

#[derive(Clone)]
pub struct FeedbackLayer {
    pub limiter: Arc<Limiter>,
    pub throttles: Arc<Throttles>,
    pub metrics: Arc<Metrics>,
}

/// Throttles in a row per upstream: a throttle with no stated end backs off exponentially, with
/// full jitter, and a success ends the streak. Outlives reloads (it is in `state::Shared`).
#[derive(Default)]
pub struct Throttles {
    streaks: std::sync::Mutex<std::collections::HashMap<Arc<str>, u32>>,
}

impl Throttles {
    /// The next backoff for a throttle with no stated end: full jitter over an exponential cap.
    pub fn backoff(&self, upstream: &crate::config::Upstream) -> Duration {
        let streak = {
            let mut streaks = self.lock();
            let streak = streaks.entry(upstream.name.clone()).or_insert(0);
            *streak = streak.saturating_add(1);
            *streak
        };
        let (base, cap) = match &upstream.retry {
            Some(retry) => (retry.backoff, retry.max_backoff.max(retry.backoff)),
            None => (Duration::from_secs(1), Duration::from_secs(60)),
        };
        crate::kit::full_jitter(base, streak, cap)
    }

    /// A success from the vendor ends a throttle streak.
    pub fn vendor_ok(&self, upstream: &crate::config::Upstream) {
        if let Some(streak) = self.lock().get_mut(&upstream.name) {
            *streak = 0;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Arc<str>, u32>> {
        // Plain counters: still consistent if another thread panicked while holding the lock.
        crate::kit::lock(&self.streaks)
    }
}

impl<S> Layer<S> for FeedbackLayer {
    type Service = Feedback<S>;
    fn layer(&self, inner: S) -> Feedback<S> {
        Feedback { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Feedback<S> {
    inner: S,
    layer: FeedbackLayer,
}

impl<S> Service<Request<ProxyBody>> for Feedback<S>
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

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let upstream = request.extensions().get::<Routed>().map(|routed| routed.upstream.clone());
        let scope = request.extensions().get::<VendorScope>().cloned();
        let response: BoxFuture<_> = Box::pin(self.inner.call(request));
        let layer = self.layer.clone();
        Box::pin(async move {
            let response = response.await?;
            let Some(upstream) = upstream.filter(|upstream| watches_vendor(upstream)) else { return Ok(response) };
            let feedback = upstream.feedback;
            let status = response.status();
            let (parts, body) = response.into_parts();
            let (body, bytes): (ProxyBody, Option<Bytes>) =
                if feedback.profile.wants_error_body(status) && body.size_hint().lower() <= MAX_ERROR_BODY {
                    read_prefix(body, MAX_ERROR_BODY).await.map_err(|error| {
                        ProxyError::new(
                            crate::error::ErrorKind::UpstreamProtocol { detail: format!("response body: {error}") },
                            Some(upstream.name.clone()),
                        )
                    })?
                } else {
                    (body, None)
                };
            let seen = crate::vendor::Response {
                status,
                headers: &parts.headers,
                body: bytes.as_deref(),
                now: SystemTime::now(),
            };
            let observation = observe(feedback.profile, feedback.reset, &seen);

            let metrics = &layer.metrics;
            if observation.malformed > 0 {
                metrics
                    .vendor_header_errors
                    .with_label_values(&[&upstream.name])
                    .inc_by(u64::from(observation.malformed));
            }
            for window in &observation.windows {
                if let Some(remaining) = window.remaining {
                    metrics
                        .vendor_remaining
                        .with_label_values(&[&*upstream.name, &window_label(&window.name)])
                        .set(i64::try_from(remaining).unwrap_or(i64::MAX));
                }
                if let Some(limit) = window.limit {
                    layer.limiter.vendor_limit(&upstream, window.window, &window.name, limit);
                }
            }
            let Some(scope) = &scope else { return Ok(Response::from_parts(parts, body)) };
            if let Some(throttle) = observation.throttle {
                metrics.vendor_throttles.with_label_values(&[&upstream.name, throttle.class.as_str()]).inc();
                let has_retry_after = parts.headers.contains_key(http::header::RETRY_AFTER);
                let (hold, reason) = match (throttle.pause, throttle.class) {
                    (Some(pause), _) => (pause, if has_retry_after { "retry_after" } else { "profile" }),
                    (None, ThrottleClass::Daily) => (DAILY_PROBE_EVERY, "daily"),
                    (None, _) => (layer.throttles.backoff(&upstream), "backoff"),
                };
                let outage = status.is_server_error();
                layer.limiter.pause(&upstream, &scope.pause_key, hold, reason, outage).await;
            } else if status.is_success() || status.is_redirection() {
                layer.throttles.vendor_ok(&upstream);
                let mut pause_for: Option<Duration> = None;
                for window in &observation.windows {
                    let Some(remaining) = window.remaining else { continue };
                    let quota = Limiter::quota_for_window(&upstream, window.window, &window.name);
                    // Follow the vendor's figure where it is lower than sluice's own record (less
                    // what `pause_at_remaining` keeps in reserve); the record then says when
                    // slots free up.
                    let kept = remaining.saturating_sub(feedback.pause_at_remaining);
                    if let Some(index) = quota {
                        let believed = scope.standings.get(index).map_or(i64::MAX, |standing| standing.remaining);
                        if i64::try_from(kept).unwrap_or(i64::MAX) < believed {
                            layer.limiter.adopt(&upstream, scope, index, kept).await;
                        }
                    }
                    // Exhausted: hold until the reset the vendor named, or, for a window no quota
                    // keeps a record of, until it frees up within its length.
                    if remaining <= feedback.pause_at_remaining {
                        let until = window.reset_in.or_else(|| {
                            if quota.is_some() {
                                None
                            } else {
                                window.window.map(|length| length.min(DAILY_PROBE_EVERY))
                            }
                        });
                        if let Some(until) = until {
                            pause_for = Some(pause_for.map_or(until, |longest| longest.max(until)));
                        }
                    }
                }
                if let Some(until) = pause_for {
                    layer.limiter.pause(&upstream, &scope.pause_key, until, "remaining", false).await;
                }
            }
            Ok(Response::from_parts(parts, body))
        })
    }
}
