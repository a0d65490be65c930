//! The admission loop: one request's way through the limiter, on the limiter's clock.
//!
//! 1. A concurrency slot (`max_concurrency`), first, so a request never holds a quota
//!    reservation while it waits for a slot (that would let sends bunch up past the window).
//! 2. One decision over all the upstream's quotas: allowed now; allowed after a wait (a
//!    reservation: the request sleeps until its turn); held by a vendor pause (then decided
//!    again); or refused with an honest `Retry-After`.
//! 3. The whole wait (slot, reservation, pauses) is bounded by the request's allowed wait
//!    (`max_queue_wait`, 0 with `reject`, shortened by `Sluice-Max-Wait`), and an open breaker
//!    answers a waiting request at once.

use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::decide::{Decision, Micros, Standing};
use super::usage::Spent;
use super::{headers, Admission, Caller, Limiter, VendorScope, MAX_PAUSE};
use crate::config::{OverLimit, Upstream};
use crate::error::{ErrorKind, ProxyError};

/// A vendor pause a request ran into.
struct Hold<'a> {
    remaining: Micros,
    outage: bool,
    standings: &'a [Standing],
}

pub(super) async fn admit(
    limiter: &Limiter,
    upstream: &Upstream,
    method: &Method,
    path: &str,
    caller: Caller<'_>,
    mut breaker_opened: Option<tokio::sync::watch::Receiver<u64>>,
) -> Result<Admission, ProxyError> {
    let limits = &upstream.limits;
    let started = limiter.clock.now();
    let allowed_wait = match limits.over_limit {
        OverLimit::Queue => limits.max_queue_wait,
        OverLimit::Reject => Duration::ZERO,
    };
    let max_wait = match caller.max_wait {
        Some(requested) => requested.min(allowed_wait),
        None => allowed_wait,
    };
    let deadline = started.checked_add(max_wait).unwrap_or(started);
    let mut admission = Admission { limited: true, ..Admission::default() };
    let name = Some(upstream.name.clone());
    // Whether the request waited at all: the common case did not, and needs no second look at
    // the clock.
    let mut waited = false;

    if let Some(max) = limits.max_concurrency {
        let slots = limiter.slots.of(&upstream.name, max);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                waited = true;
                let acquired =
                    wait_or_open(tokio::time::timeout_at(deadline, slots.acquire_owned()), &mut breaker_opened, &name)
                        .await?;
                match acquired {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        let waited = limiter.clock.now().saturating_duration_since(started);
                        return Err(ProxyError::new(ErrorKind::ConcurrencyLimited { max, waited }, name));
                    }
                }
            }
        };
        admission.permit = Some(permit);
    }

    let cost = i64::try_from(limits.cost(method, path)).unwrap_or(i64::MAX);
    let pause_key = limiter.keys.pause(upstream, &caller);
    let buckets = limiter.buckets(upstream, &caller);
    let mut standings = Vec::new();
    // A pause can be re-armed while we sleep through it; each hold is bounded by the deadline, so
    // this loop is too; the count is a backstop.
    let mut admitted = false;
    for _ in 0..32 {
        let remaining_wait = if waited { deadline.saturating_duration_since(limiter.clock.now()) } else { max_wait };
        let max_wait_us = i64::try_from(remaining_wait.as_micros()).unwrap_or(i64::MAX);
        match limiter.decide(upstream, &buckets.keys, &pause_key, cost, max_wait_us).await? {
            Some(Decision::Allowed { wait, standings: after }) => {
                for counter in &buckets.counters {
                    if wait > 0 {
                        counter.queued.inc()
                    } else {
                        counter.allowed.inc()
                    }
                }
                admission.rate_limit = headers::rate_limit(&limits.quotas, &after);
                standings = after;
                if wait <= 0 {
                    admitted = true;
                    break;
                }
                waited = true;
                let sleep = tokio::time::sleep(Duration::from_micros(u64::try_from(wait).unwrap_or(0)));
                wait_or_open(sleep, &mut breaker_opened, &name).await?;
                // The vendor may have asked everyone to hold off while this request slept.
                match limiter.pause_remaining(&pause_key).await {
                    Some((remaining, outage)) => {
                        let hold = Hold { remaining, outage, standings: &[] };
                        hold_for_pause(limiter, upstream, hold, deadline, &mut breaker_opened).await?
                    }
                    None => {
                        admitted = true;
                        break;
                    }
                }
            }
            Some(Decision::Rejected { retry_after, limiting, standings }) => {
                // One counter per quota, so the limiting quota always has one.
                if let Some(counter) = buckets.counters.get(limiting) {
                    counter.rejected.inc();
                }
                let quota = limits.quotas.get(limiting).map_or("quota", |quota| &*quota.name);
                let retry_after = Duration::from_micros(u64::try_from(retry_after).unwrap_or(0));
                return Err(ProxyError::new(
                    ErrorKind::RateLimited {
                        quota: quota.to_owned(),
                        retry_after,
                        rate_limit: headers::rate_limit(&limits.quotas, &standings),
                        policy: headers::rate_limit_policy(&limits.quotas),
                    },
                    name,
                ));
            }
            Some(Decision::Paused { remaining, outage, standings }) => {
                waited = true;
                let hold = Hold { remaining, outage, standings: &standings };
                hold_for_pause(limiter, upstream, hold, deadline, &mut breaker_opened).await?;
            }
            None => {
                admitted = true;
                break;
            }
        }
    }
    if !admitted {
        // The vendor kept re-arming its pause: answer honestly rather than send into it.
        let (left, outage) = limiter.pause_remaining(&pause_key).await.unwrap_or((0, false));
        let retry_after = Duration::from_micros(u64::try_from(left.max(0)).unwrap_or(0));
        return Err(pause_refusal(upstream, retry_after, outage, None));
    }
    // Spent: counted for the request's consumer(s) and sampled for the forecast.
    let spent = Spent {
        cost: u64::try_from(cost).unwrap_or(1),
        consumers: caller.consumers,
        wall: limiter.clock.wall(),
        at: limiter.clock.now(),
    };
    limiter.usage.spend(upstream, &buckets.keys, &standings, spent);
    admission.scope = Some(VendorScope { pause_key, bucket_keys: buckets.keys, standings });
    admission.queued = if waited { limiter.clock.now().saturating_duration_since(started) } else { Duration::ZERO };
    match buckets.counters.first() {
        Some(counter) => counter.queue_wait.observe(admission.queued.as_secs_f64()),
        None => limiter
            .metrics
            .quota_queue_wait
            .with_label_values(&[&upstream.name])
            .observe(admission.queued.as_secs_f64()),
    }
    Ok(admission)
}

/// Holds a request through a vendor pause (then it is decided again), or refuses it when the
/// pause outlasts its allowed wait. Released with positive-only jitter: never early, and not
/// everyone at the reset instant.
async fn hold_for_pause(
    limiter: &Limiter,
    upstream: &Upstream,
    hold: Hold<'_>,
    deadline: Instant,
    breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
) -> Result<(), ProxyError> {
    let name = Some(upstream.name.clone());
    let remaining = Duration::from_micros(u64::try_from(hold.remaining).unwrap_or(0)).min(MAX_PAUSE);
    let spread = (remaining / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let wait = remaining + spread.mul_f64(rand::random::<f64>());
    if limiter.clock.now().checked_add(wait).is_none_or(|until| until > deadline) {
        limiter.metrics.quota_decisions.with_label_values(&[&upstream.name, "vendor", "rejected"]).inc();
        let rate_limit = (!hold.standings.is_empty())
            .then(|| headers::rate_limit(&upstream.limits.quotas, hold.standings))
            .flatten();
        return Err(pause_refusal(upstream, remaining, hold.outage, rate_limit));
    }
    limiter.metrics.quota_decisions.with_label_values(&[&upstream.name, "vendor", "queued"]).inc();
    wait_or_open(tokio::time::sleep(wait), breaker_opened, &name).await?;
    Ok(())
}

/// The answer to a request a vendor pause holds past its allowed wait: 429 when the vendor is
/// rate limiting, 503 when it is failing (a 5xx with Retry-After), so an outage never reads as a
/// rate limit.
fn pause_refusal(
    upstream: &Upstream,
    retry_after: Duration,
    outage: bool,
    rate_limit: Option<HeaderValue>,
) -> ProxyError {
    let kind = if outage {
        ErrorKind::VendorUnavailable { retry_after }
    } else {
        ErrorKind::RateLimited {
            quota: "vendor".to_owned(),
            retry_after,
            rate_limit,
            policy: headers::rate_limit_policy(&upstream.limits.quotas),
        }
    };
    ProxyError::new(kind, Some(upstream.name.clone()))
}

/// Runs `wait` unless the breaker opens first, in which case the request is answered at once.
async fn wait_or_open<F: std::future::Future>(
    wait: F,
    breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
    upstream: &Option<std::sync::Arc<str>>,
) -> Result<F::Output, ProxyError> {
    match breaker_opened {
        None => Ok(wait.await),
        Some(opened) => {
            tokio::pin!(wait);
            // Biased: when a slot frees because a call failed and that failure opened the
            // breaker, both are ready at once; the breaker must win.
            tokio::select! {
                biased;
                changed = opened.changed() => match changed {
                    Ok(()) => Err(ProxyError::new(ErrorKind::BreakerOpen { retry_after: Duration::from_secs(1) }, upstream.clone())),
                    // The breaker went away (a reload replaced it): finish the wait without it.
                    Err(_) => Ok(wait.await),
                },
                output = &mut wait => Ok(output),
            }
        }
    }
}
