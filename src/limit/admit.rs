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
//! 4. Lanes (`lanes`): a `normal` or `low` request reserves only within its lane's horizon, and
//!    is charged in its lane's own buckets too; beyond the horizon it waits for its lane's turn
//!    (`turns`) and for its slot to come near, then asks again.

use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use std::borrow::Cow;
use std::sync::Arc;

use super::decide::{Decision, Micros, Standing};
use super::lanes;
use super::turns::{Place, Turn, Waiting};
use super::usage::Spent;
use super::{headers, Admission, Caller, Limiter, VendorScope, MAX_PAUSE};
use crate::config::{Lane, OverLimit, Quota, Upstream};
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
    // The lane's own buckets (pacing, caps) are decided with the quotas', after them.
    let quotas = limits.quotas.len();
    let lane = caller.lane;
    let lane_quotas = if limits.quotas.is_empty() { Vec::new() } else { lanes::quotas(upstream, lane) };
    let keys: Cow<'_, [String]> = if lane_quotas.is_empty() {
        Cow::Borrowed(&buckets.keys)
    } else {
        let mut keys = buckets.keys.clone();
        for (index, pseudo) in &lane_quotas {
            let bucket = buckets.keys.get(*index).map_or("", String::as_str);
            keys.push(limiter.keys.lane_bucket(upstream, &limits.quotas[*index], pseudo, bucket));
        }
        Cow::Owned(keys)
    };
    let extra: Vec<Quota> = lane_quotas.iter().map(|(_, pseudo)| pseudo.clone()).collect();
    // How far ahead this lane may reserve; none when it may not wait at all.
    let horizon = lanes::horizon(limits, lane).filter(|_| !max_wait.is_zero());
    let consumer: Arc<str> = caller.consumers.first().cloned().unwrap_or_else(|| Arc::from(crate::consumer::NONE));
    let mut turn: Option<Turn> = None;
    // Whether the request waited in its lane (its turn, its slot to come near): then it counts
    // as queued even if its last decision had it go at once.
    let mut lane_waited = false;
    if horizon.is_some() && limiter.turns.busy(&upstream.name, lane) {
        // Others of this lane are waiting their turn here: behind them, not past them.
        waited = true;
        lane_waited = true;
        turn = take_turn(limiter, upstream, lane, &consumer, deadline, &mut breaker_opened).await?;
    }
    // A pause can be re-armed while we sleep through it; each hold is bounded by the deadline, so
    // this loop is too; the counts are backstops.
    let mut admitted = false;
    let mut pauses = 0;
    for _ in 0..MAX_ROUNDS {
        let remaining_wait = if waited { deadline.saturating_duration_since(limiter.clock.now()) } else { max_wait };
        let remaining_us = i64::try_from(remaining_wait.as_micros()).unwrap_or(i64::MAX);
        let max_wait_us = horizon.map_or(remaining_us, |horizon| horizon.min(remaining_us));
        match limiter.decide(upstream, &keys, &extra, &pause_key, cost, max_wait_us).await? {
            Some(Decision::Allowed { wait, standings: mut after }) => {
                // Reserved: the next of this lane may ask now.
                drop(turn.take());
                after.truncate(quotas);
                for counter in &buckets.counters {
                    if wait > 0 || lane_waited {
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
                        pauses += 1;
                        let hold = Hold { remaining, outage, standings: &[] };
                        hold_for_pause(limiter, upstream, hold, deadline, &mut breaker_opened).await?
                    }
                    None => {
                        admitted = true;
                        break;
                    }
                }
            }
            Some(Decision::Rejected { retry_after, limiting, mut standings })
                if horizon.is_some_and(|horizon| horizon < remaining_us) && retry_after <= remaining_us =>
            {
                // Not refused: its slot is beyond the lane's horizon but within its wait. Wait
                // for the lane's turn here, then until the slot is near, and ask again.
                waited = true;
                lane_waited = true;
                if turn.is_none() {
                    let place = limiter.turns.take(&upstream.name, lane, &consumer);
                    match place {
                        Place::Now(now) => turn = Some(now),
                        Place::Waiting(line) => {
                            match wait_turn(line, deadline, &mut breaker_opened, &name).await? {
                                Some(now) => turn = Some(now),
                                None => {
                                    standings.truncate(quotas);
                                    return Err(lane_refusal(
                                        upstream,
                                        &lane_quotas,
                                        limiting,
                                        retry_after,
                                        &standings,
                                    ));
                                }
                            }
                            continue;
                        }
                        Place::Full => {}
                    }
                }
                let near = retry_after.saturating_sub(horizon.unwrap_or(0)).max(1000);
                let until = limiter.clock.now() + Duration::from_micros(u64::try_from(near).unwrap_or(1000));
                let sleep = tokio::time::sleep_until(until.min(deadline));
                wait_or_open(sleep, &mut breaker_opened, &name).await?;
            }
            Some(Decision::Rejected { retry_after, limiting, mut standings }) => {
                standings.truncate(quotas);
                // One counter per quota, so the limiting quota always has one (a lane's bucket
                // counts for the quota it shares out).
                let counted = match limiting.checked_sub(quotas) {
                    None => limiting,
                    Some(at) => lane_quotas.get(at).map_or(0, |(index, _)| *index),
                };
                if let Some(counter) = buckets.counters.get(counted) {
                    counter.rejected.inc();
                }
                return Err(lane_refusal(upstream, &lane_quotas, limiting, retry_after, &standings));
            }
            Some(Decision::Paused { remaining, outage, mut standings }) => {
                waited = true;
                pauses += 1;
                standings.truncate(quotas);
                let hold = Hold { remaining, outage, standings: &standings };
                hold_for_pause(limiter, upstream, hold, deadline, &mut breaker_opened).await?;
            }
            None => {
                admitted = true;
                break;
            }
        }
        if pauses >= MAX_PAUSES {
            break;
        }
    }
    drop(turn);
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

/// Most times one request is held through a vendor pause before it is told to come back.
const MAX_PAUSES: usize = 32;

/// Most decisions one request asks for (pauses, lane waits): a backstop, the deadline bounds it.
const MAX_ROUNDS: usize = 10_000;

/// The refusal of a request no quota (or lane share) can admit within its wait.
fn lane_refusal(
    upstream: &Upstream,
    lane_quotas: &[(usize, Quota)],
    limiting: usize,
    retry_after: Micros,
    standings: &[Standing],
) -> ProxyError {
    let limits = &upstream.limits;
    let quota = match limits.quotas.get(limiting) {
        Some(quota) => quota.name.to_string(),
        // A lane's own bucket: `burst~low` reads `burst (low lane)`.
        None => lane_quotas
            .get(limiting - limits.quotas.len())
            .map_or_else(|| "quota".to_owned(), |(_, pseudo)| pseudo.name.replace('~', " (") + " lane)"),
    };
    let retry_after = Duration::from_micros(u64::try_from(retry_after).unwrap_or(0));
    ProxyError::new(
        ErrorKind::RateLimited {
            quota,
            retry_after,
            rate_limit: headers::rate_limit(&limits.quotas, standings),
            policy: headers::rate_limit_policy(&limits.quotas),
        },
        Some(upstream.name.clone()),
    )
}

/// Takes this lane's turn: at once, or in line (bounded by the deadline and the breaker).
async fn take_turn(
    limiter: &Limiter,
    upstream: &Upstream,
    lane: Lane,
    consumer: &Arc<str>,
    deadline: Instant,
    breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
) -> Result<Option<Turn>, ProxyError> {
    let name = Some(upstream.name.clone());
    match limiter.turns.take(&upstream.name, lane, consumer) {
        Place::Now(turn) => Ok(Some(turn)),
        Place::Waiting(line) => match wait_turn(line, deadline, breaker_opened, &name).await? {
            Some(turn) => Ok(Some(turn)),
            // Out of time in line: the decision after says how long to come back in.
            None => Ok(None),
        },
        Place::Full => Ok(None),
    }
}

/// Waits in line for the turn until `deadline`; `None` when it does not come in time.
async fn wait_turn(
    line: Waiting,
    deadline: Instant,
    breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
    name: &Option<Arc<str>>,
) -> Result<Option<Turn>, ProxyError> {
    let waited = wait_or_open(tokio::time::timeout_at(deadline, line.turn()), breaker_opened, name).await?;
    Ok(waited.ok())
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
