//! USAGE: who spent each quota, and when it will run out at the rate it is being spent.
//!
//! # Spend by consumer
//! Every admission spends its cost from each of its upstream's quotas, for its consumer (a bulk
//! call's cost is shared out among its items' consumers, in milli-tokens so the shares add up
//! exactly). The request path only adds to this process's pending spend, under one lock, and
//! bumps `sluice_quota_spent_total{upstream, quota, consumer}` through a cached handle. Once a
//! second the limiter's tick folds the pending spend into three series per quota and consumer:
//!
//! - the quota's own window: one slot per fixed window (keyed by its start), or for a rolling
//!   window slots of `per / 30` (at least 1 s), the oldest counted by how much of it is inside
//!   the window;
//! - minutes, for the last hour;
//! - hours (UTC), for the current day.
//!
//! With Redis the tick also sends the new spend, off the request path, as one pipeline per
//! upstream (one hash tag, so one Cluster slot): `HINCRBY` into one hash per slot, keyed by
//! consumer, each with a TTL (`<prefix>:{<upstream>}:<quota>!use:<slot>`, at most ~180 keys per
//! quota, fields bounded by the consumer names). `/usage` then reads those hashes back, so every
//! replica answers for all of them; what this replica has not sent yet is added in. With the
//! memory store, or while Redis is away, the series kept here answer (this replica's view).
//!
//! # Forecasts
//! For each scope this replica spends from, the tick samples the scope's total spend (with Redis
//! a shared counter, `<bucket>!spent`, which the same pipeline bumps and reads back, so every
//! replica sees the whole fleet's rate), and fits the spend rate over the quota's trailing
//! `forecast_window` by least squares. With the standing the last admission reported (remaining
//! tokens, time to reset), that says when the scope runs out:
//!
//! - fixed window: `remaining / rate` from then, if that comes before the window resets;
//! - rolling window: the same, but only while the rate exceeds `limit / per` (below it the
//!   window never fills);
//! - paced (`shape: smooth`): `remaining / (rate - limit / per)`, as the bucket refills.
//!
//! `sluice_quota_exhaustion_seconds{upstream, quota}` is the soonest of a quota's scopes (`+Inf`
//! when none is at risk), and `/quotas` shows each scope's `spend_per_second` and `exhausts_at`.
//!
//! Everything is bounded: pending spend lives one tick, series expire, scopes idle for twice their
//! forecast window are forgotten and at most [`MAX_SCOPES`] are tracked, spend that Redis did not
//! take is kept for a retry up to [`MAX_UNSENT`] entries.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::measure::{Micros, Standing};
use super::window;
use crate::config::{Quota, Upstream, Window};
use crate::telemetry::Metrics;

/// Thousandths of a token: what spend is counted in.
pub type Milli = i64;

/// Milli-tokens per token.
pub const MILLI: Milli = 1000;

/// Most scopes tracked for forecasts at once (about 1.5 KiB each); past it, new scopes are not
/// forecast until idle ones are forgotten.
pub const MAX_SCOPES: usize = 10_000;

/// Most (key, consumer) entries of spend kept for Redis while it is away; past it the oldest
/// slot's entries are dropped (and this replica's own series still count them).
pub const MAX_UNSENT: usize = 200_000;

/// Samples kept per scope for the rate fit.
const MAX_SAMPLES: usize = 64;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// (upstream, quota).
pub type QuotaId = (Arc<str>, Arc<str>);

/// One slot of one series of a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    pub kind: SlotKind,
    /// Unix milliseconds.
    pub start: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// A fixed window of the quota, `len` ms long.
    Fixed {
        len: i64,
    },
    /// A slice of a rolling window, `len` ms long.
    Rolling {
        len: i64,
    },
    Minute,
    Hour,
}

impl Slot {
    /// How long the slot is (ms).
    pub fn span(&self) -> i64 {
        match self.kind {
            SlotKind::Fixed { len } | SlotKind::Rolling { len } => len,
            SlotKind::Minute => MINUTE_MS,
            SlotKind::Hour => HOUR_MS,
        }
    }

    /// When the slot can no longer be asked for (Unix ms): its end plus how long reads look back.
    pub fn expires(&self) -> i64 {
        let after = match self.kind {
            SlotKind::Fixed { .. } => MINUTE_MS,
            SlotKind::Rolling { len } => 31 * len + MINUTE_MS,
            SlotKind::Minute => HOUR_MS + 5 * MINUTE_MS,
            SlotKind::Hour => DAY_MS + HOUR_MS,
        };
        self.start.saturating_add(self.span()).saturating_add(after)
    }

    /// The key suffix that names the slot (`f86400000:1767225600000`, `m:1767225600000`).
    pub fn suffix(&self) -> String {
        match self.kind {
            SlotKind::Fixed { len } => format!("f{len}:{}", self.start),
            SlotKind::Rolling { len } => format!("r{len}:{}", self.start),
            SlotKind::Minute => format!("m:{}", self.start),
            SlotKind::Hour => format!("h:{}", self.start),
        }
    }
}

/// The slot length of a rolling window's series: a 30th of it, at least a second.
fn rolling_slot(per_ms: i64) -> i64 {
    (per_ms / 30).max(1000)
}

/// What a forecast needs of a quota.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shape {
    limit: f64,
    per_s: f64,
    kind: ShapeKind,
    window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShapeKind {
    Fixed,
    Rolling,
    Smooth,
}

impl Shape {
    fn of(quota: &Quota) -> Self {
        Self {
            limit: quota.limit as f64,
            per_s: quota.per.as_secs_f64().max(0.001),
            kind: match quota.window {
                Window::Rolling => ShapeKind::Rolling,
                Window::Smooth => ShapeKind::Smooth,
                Window::Fixed { .. } => ShapeKind::Fixed,
            },
            window: quota.forecast_window,
        }
    }

    /// Seconds from `standing` until it runs out at `rate`, if it does before it is whole again.
    fn runs_out_in(&self, rate: f64, standing: Standing) -> Option<f64> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let remaining = standing.remaining.max(0) as f64;
        let sustained = self.limit / self.per_s;
        match self.kind {
            ShapeKind::Fixed => {
                let left = remaining / rate;
                (left * 1e6 < standing.reset_in.max(0) as f64).then_some(left)
            }
            ShapeKind::Rolling => (rate > sustained).then(|| remaining / rate),
            ShapeKind::Smooth => (rate > sustained).then(|| remaining / (rate - sustained)),
        }
    }
}

/// A scope's forecast: what `/quotas` shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Tokens per second over the quota's forecast window, every replica's spend included.
    pub spend_per_second: f64,
    /// When the scope runs out at that rate (Unix microseconds), if it does before it resets.
    pub exhausts_at: Option<Micros>,
}

/// One scope this replica spends from.
struct ScopeTrack {
    quota: QuotaId,
    shape: Shape,
    /// Tokens spent here since the last tick.
    pending: i64,
    /// This replica's total for the scope (memory store), or the shared counter's last value.
    total: i64,
    /// (when, total) pairs within the forecast window.
    samples: VecDeque<(Instant, f64)>,
    /// The last admission's standing and when (wall) it was reported.
    standing: Option<(Micros, Standing)>,
    last_spent: Instant,
    forecast: Option<Forecast>,
}

impl ScopeTrack {
    fn sample(&mut self, at: Instant, total: i64) {
        self.total = total;
        let keep_every = self.shape.window / (MAX_SAMPLES as u32 - 8);
        let fresh = self.samples.back().is_none_or(|(last, _)| at.saturating_duration_since(*last) >= keep_every);
        if fresh {
            self.samples.push_back((at, total as f64));
        } else if let Some(last) = self.samples.back_mut() {
            // Too soon for a new sample: keep the newest total on the last one instead.
            *last = (at, total as f64);
        }
        while self.samples.len() > MAX_SAMPLES
            || self.samples.front().is_some_and(|(when, _)| at.saturating_duration_since(*when) > self.shape.window)
        {
            self.samples.pop_front();
        }
    }

    /// Least-squares slope of the samples, once they span half the forecast window.
    fn rate(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.0.saturating_duration_since(first.0);
        if self.samples.len() < 3 || span < self.shape.window / 2 {
            return None;
        }
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|(at, value)| (at.saturating_duration_since(first.0).as_secs_f64(), *value))
            .collect();
        let n = points.len() as f64;
        let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
        let (mut num, mut den) = (0.0, 0.0);
        for (t, v) in &points {
            num += (t - mean_t) * (v - mean_v);
            den += (t - mean_t) * (t - mean_t);
        }
        (den > 0.0).then(|| (num / den).max(0.0))
    }

    /// The forecast as of `at`; none while the samples are stale (a scope no longer watched).
    fn update_forecast(&mut self, at: Instant) {
        let fresh = (self.shape.window / 2).max(Duration::from_secs(3));
        if self.samples.back().is_none_or(|(last, _)| at.saturating_duration_since(*last) > fresh) {
            self.forecast = None;
            return;
        }
        self.forecast = self.rate().map(|rate| Forecast {
            spend_per_second: rate,
            exhausts_at: self.standing.and_then(|(at, standing)| {
                let left = self.shape.runs_out_in(rate, standing)?;
                // Bounded: a forecast past a year is no forecast.
                Some(at.saturating_add((left.min(366.0 * 86_400.0) * 1e6) as Micros))
            }),
        });
    }
}

/// Spend of one slot by consumer.
type BySlot = HashMap<(QuotaId, Slot), HashMap<Arc<str>, Milli>>;

/// What the tick hands Redis: per upstream (one hash tag), the slot hashes to add to and the
/// scope counters to bump (and read back).
#[derive(Debug, Default)]
pub struct Flush {
    pub groups: Vec<FlushGroup>,
}

#[derive(Debug, Default)]
pub struct FlushGroup {
    pub upstream: Arc<str>,
    pub hashes: Vec<HashDelta>,
    /// (bucket key, delta): the counter is `<bucket>!spent`, kept for `ttl_ms`.
    pub counters: Vec<(String, i64, i64)>,
}

/// Spend to add to one slot's hash.
#[derive(Debug)]
pub struct HashDelta {
    pub key: String,
    /// When the hash may go (Unix ms).
    pub expires_ms: i64,
    pub deltas: Vec<(Arc<str>, Milli)>,
}

/// What one admission spent: `cost` tokens from each quota, for `consumers` in equal shares,
/// at `wall` (Unix microseconds) / `at` (the limiter's clock).
#[derive(Debug, Clone, Copy)]
pub struct Spent<'a> {
    pub cost: u64,
    pub consumers: &'a [Arc<str>],
    pub wall: Micros,
    pub at: Instant,
}

/// What went into a flush, to take it back when Redis does not.
struct Sent {
    series: BySlot,
    scopes: Vec<(String, i64)>,
}

/// A quota's window spend, last hour and day: what `/usage` shows per quota.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaUsage {
    pub name: String,
    pub limit: u64,
    pub per: String,
    pub window: Period,
    pub last_hour: Period,
    pub today: Period,
}

/// Spend over one period, by consumer, most first.
#[derive(Debug, Clone, Serialize)]
pub struct Period {
    /// When the period starts (RFC 3339).
    pub since: String,
    /// Tokens spent in it.
    pub spent: f64,
    pub consumers: Vec<ConsumerSpend>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerSpend {
    pub consumer: String,
    pub spent: f64,
    /// Of what everyone spent in the period (0 to 1).
    pub share: f64,
    /// Of the quota's limit (the window only: what a consumer took of the window's tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub of_limit: Option<f64>,
}

/// The slots a quota's `/usage` reads, each with the part of it that counts (0 to 1).
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: QuotaId,
    pub window: (i64, Vec<(Slot, f64)>),
    pub hour: (i64, Vec<(Slot, f64)>),
    pub day: (i64, Vec<(Slot, f64)>),
}

impl Plan {
    /// The slots `quota` reads at `now` (Unix microseconds).
    pub fn of(upstream: &Upstream, quota: &Quota, now: Micros) -> Self {
        let now_ms = now.div_euclid(1000);
        let per_ms = i64::try_from(quota.per.as_millis()).unwrap_or(i64::MAX / 4).max(1);
        let window = match &quota.window {
            Window::Fixed { resets_at } => {
                let per_us = per_ms.saturating_mul(1000);
                let bounds = window::bounds(per_us, resets_at.as_ref(), now);
                let start = bounds[1].div_euclid(1000);
                let len = (bounds[2] - bounds[1]).div_euclid(1000).max(1);
                (start, vec![(Slot { kind: SlotKind::Fixed { len }, start }, 1.0)])
            }
            Window::Rolling | Window::Smooth => {
                let len = rolling_slot(per_ms);
                let since = now_ms - per_ms;
                (since, covering(SlotKind::Rolling { len }, len, since, now_ms))
            }
        };
        let hour_since = now_ms - HOUR_MS;
        let day_since = now_ms.div_euclid(DAY_MS) * DAY_MS;
        Self {
            id: (upstream.name.clone(), quota.name.clone()),
            window,
            hour: (hour_since, covering(SlotKind::Minute, MINUTE_MS, hour_since, now_ms)),
            day: (day_since, covering(SlotKind::Hour, HOUR_MS, day_since, now_ms)),
        }
    }

    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.window.1.iter().chain(&self.hour.1).chain(&self.day.1).map(|(slot, _)| slot)
    }
}

/// The slots of length `len` covering `[since, now]`, the first weighted by its part inside.
fn covering(kind: SlotKind, len: i64, since: i64, now: i64) -> Vec<(Slot, f64)> {
    let mut slots = Vec::new();
    let mut start = since.div_euclid(len) * len;
    while start <= now && slots.len() < 64 {
        let inside = ((start + len).min(now.max(start + 1)) - since.max(start)).max(0) as f64;
        let part = if start >= since { 1.0 } else { (inside / len as f64).clamp(0.0, 1.0) };
        slots.push((Slot { kind, start }, part));
        start += len;
    }
    slots
}

/// The spend of one slot by consumer, wherever it was read.
pub type SlotSpend = HashMap<Arc<str>, Milli>;

/// Spend by consumer, pending spend, series and forecasts of this process.
pub struct Usage {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Inner {
    /// Spend since the last tick.
    pending: BySlot,
    /// This replica's series (what the memory store answers with, and Redis's stand-in).
    series: BySlot,
    /// Spend Redis has not taken yet.
    unsent: BySlot,
    scopes: HashMap<String, ScopeTrack>,
    counters: HashMap<(QuotaId, Arc<str>), prometheus::Counter>,
    /// The current fixed window [start, end) of each fixed quota (ms), and the `per` it is for.
    fixed: HashMap<QuotaId, (i64, i64, i64)>,
    /// Every quota spent from, with its window length (for the exhaustion gauges).
    quotas: HashMap<QuotaId, f64>,
}

impl Usage {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { inner: Mutex::new(Inner::default()), metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::kit::lock(&self.inner)
    }

    /// An admission spent from each quota of `upstream` (the bucket `buckets[i]` of quota `i`,
    /// which stood at `standings[i]` after it).
    pub fn spend(&self, upstream: &Upstream, buckets: &[String], standings: &[Standing], spent: Spent<'_>) {
        let Spent { cost, consumers, wall, at } = spent;
        let shares = shares(cost, consumers);
        let now_ms = wall.div_euclid(1000);
        let mut inner = self.lock();
        let inner = &mut *inner;
        for (index, quota) in upstream.limits.quotas.iter().enumerate() {
            let id: QuotaId = (upstream.name.clone(), quota.name.clone());
            let per_ms = i64::try_from(quota.per.as_millis()).unwrap_or(i64::MAX / 4).max(1);
            let window_slot = match &quota.window {
                Window::Fixed { resets_at } => {
                    let (start, end) = match inner.fixed.get(&id) {
                        Some(&(start, end, per)) if per == per_ms && (start..end).contains(&now_ms) => (start, end),
                        _ => {
                            let bounds = window::bounds(per_ms.saturating_mul(1000), resets_at.as_ref(), wall);
                            let (start, end) = (bounds[1].div_euclid(1000), bounds[2].div_euclid(1000));
                            inner.fixed.insert(id.clone(), (start, end, per_ms));
                            (start, end)
                        }
                    };
                    Slot { kind: SlotKind::Fixed { len: (end - start).max(1) }, start }
                }
                Window::Rolling | Window::Smooth => {
                    let len = rolling_slot(per_ms);
                    Slot { kind: SlotKind::Rolling { len }, start: now_ms.div_euclid(len) * len }
                }
            };
            let minute = Slot { kind: SlotKind::Minute, start: now_ms.div_euclid(MINUTE_MS) * MINUTE_MS };
            let hour = Slot { kind: SlotKind::Hour, start: now_ms.div_euclid(HOUR_MS) * HOUR_MS };
            for slot in [window_slot, minute, hour] {
                let spent = inner.pending.entry((id.clone(), slot)).or_default();
                for (consumer, milli) in &shares {
                    *spent.entry(consumer.clone()).or_default() += milli;
                }
            }
            for (consumer, milli) in &shares {
                let counter = inner.counters.entry((id.clone(), consumer.clone())).or_insert_with(|| {
                    self.metrics.quota_spent.with_label_values(&[&upstream.name, &quota.name, consumer])
                });
                counter.inc_by(*milli as f64 / MILLI as f64);
            }
            inner.quotas.entry(id.clone()).or_insert(quota.per.as_secs_f64());
            let Some(bucket) = buckets.get(index) else { continue };
            let shape = Shape::of(quota);
            let standing = standings.get(index).copied();
            if let Some(track) = inner.scopes.get_mut(bucket) {
                track.pending += i64::try_from(cost).unwrap_or(i64::MAX / 4);
                track.shape = shape;
                track.last_spent = at;
                if let Some(standing) = standing {
                    track.standing = Some((wall, standing));
                }
            } else if inner.scopes.len() < MAX_SCOPES {
                inner.scopes.insert(
                    bucket.clone(),
                    ScopeTrack {
                        quota: id,
                        shape,
                        pending: i64::try_from(cost).unwrap_or(i64::MAX / 4),
                        total: 0,
                        samples: VecDeque::new(),
                        standing: standing.map(|standing| (wall, standing)),
                        last_spent: at,
                        forecast: None,
                    },
                );
            }
        }
    }

    /// The tick: folds pending spend into this replica's series and drops what expired. With
    /// `shared`, returns what to send to Redis (hand the answer to [`Usage::sent`]); otherwise
    /// samples this replica's own totals and forecasts at once.
    pub fn tick(&self, wall: Micros, at: Instant, shared: bool, prefix: &str) -> Option<(Flush, SentToken)> {
        let now_ms = wall.div_euclid(1000);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let pending = std::mem::take(&mut inner.pending);
        for (key, spent) in &pending {
            let into = inner.series.entry(key.clone()).or_default();
            for (consumer, milli) in spent {
                *into.entry(consumer.clone()).or_default() += milli;
            }
        }
        inner.series.retain(|(_, slot), _| slot.expires() > now_ms);
        inner.fixed.retain(|_, (_, end, _)| *end > now_ms);
        // Scopes idle for twice their window (and with nothing left to send) are forgotten.
        inner.scopes.retain(|_, track| {
            track.pending > 0 || at.saturating_duration_since(track.last_spent) <= track.shape.window * 2
        });
        if !shared {
            for track in inner.scopes.values_mut() {
                let total = track.total + std::mem::take(&mut track.pending);
                track.sample(at, total);
                track.update_forecast(at);
            }
            self.publish_gauges(inner, wall);
            return None;
        }
        // Shared: this tick's spend goes out with whatever an earlier tick could not send.
        let mut series = std::mem::take(&mut inner.unsent);
        for (key, spent) in pending {
            let into = series.entry(key).or_default();
            for (consumer, milli) in spent {
                *into.entry(consumer).or_default() += milli;
            }
        }
        series.retain(|(_, slot), _| slot.expires() > now_ms);
        // Every scope spent from since the last tick is counted; of the others, the three of each
        // quota spent fastest are read back (delta 0), so their rate follows the other replicas.
        let mut fastest: HashMap<&QuotaId, Vec<(f64, &String)>> = HashMap::new();
        for (bucket, track) in &inner.scopes {
            if let Some(rate) = track.forecast.map(|forecast| forecast.spend_per_second).filter(|rate| *rate > 0.0) {
                fastest.entry(&track.quota).or_default().push((rate, bucket));
            }
        }
        let mut watched: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (_, mut rates) in fastest {
            rates.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
            watched.extend(rates.into_iter().take(3).map(|(_, bucket)| bucket.clone()));
        }
        let scopes: Vec<(String, i64)> = inner
            .scopes
            .iter_mut()
            .filter(|(bucket, track)| track.pending > 0 || watched.contains(*bucket))
            .map(|(bucket, track)| (bucket.clone(), std::mem::take(&mut track.pending)))
            .collect();
        let mut groups: HashMap<Arc<str>, FlushGroup> = HashMap::new();
        for ((id, slot), spent) in &series {
            let group = groups
                .entry(id.0.clone())
                .or_insert_with(|| FlushGroup { upstream: id.0.clone(), ..Default::default() });
            let deltas = spent.iter().map(|(consumer, milli)| (consumer.clone(), *milli)).collect();
            group.hashes.push(HashDelta { key: usage_key(prefix, id, slot), expires_ms: slot.expires(), deltas });
        }
        for (bucket, delta) in &scopes {
            let Some(track) = inner.scopes.get(bucket) else { continue };
            let group = groups
                .entry(track.quota.0.clone())
                .or_insert_with(|| FlushGroup { upstream: track.quota.0.clone(), ..Default::default() });
            let ttl_ms = i64::try_from((track.shape.window * 4).as_millis()).unwrap_or(DAY_MS).max(MINUTE_MS);
            group.counters.push((bucket.clone(), ttl_ms, *delta));
        }
        let token = SentToken(Sent { series, scopes });
        Some((Flush { groups: groups.into_values().collect() }, token))
    }

    /// Redis's answer to a flush: the scope counters' new totals, or the flush back (kept to
    /// send again, bounded).
    pub fn sent(&self, token: SentToken, totals: Result<HashMap<String, i64>, ()>, wall: Micros, at: Instant) {
        let Sent { series, scopes } = token.0;
        let mut inner = self.lock();
        let inner = &mut *inner;
        match totals {
            Ok(totals) => {
                for (bucket, track) in &mut inner.scopes {
                    if let Some(total) = totals.get(bucket) {
                        track.sample(at, *total);
                    }
                }
            }
            Err(()) => {
                for (bucket, delta) in scopes {
                    if let Some(track) = inner.scopes.get_mut(&bucket) {
                        track.pending += delta;
                    }
                }
                let mut entries: usize = inner.unsent.values().map(HashMap::len).sum();
                // Oldest slots first out when over the bound: minutes and hours age out anyway.
                let mut keys: Vec<(QuotaId, Slot)> = series.keys().cloned().collect();
                keys.sort_by_key(|(_, slot)| std::cmp::Reverse(slot.start));
                let mut series = series;
                for key in keys {
                    let Some(spent) = series.remove(&key) else { continue };
                    if entries + spent.len() > MAX_UNSENT {
                        continue;
                    }
                    entries += spent.len();
                    let into = inner.unsent.entry(key).or_default();
                    for (consumer, milli) in spent {
                        *into.entry(consumer).or_default() += milli;
                    }
                }
            }
        }
        for track in inner.scopes.values_mut() {
            track.update_forecast(at);
        }
        self.publish_gauges(inner, wall);
    }

    /// `sluice_quota_exhaustion_seconds` (the soonest scope of each quota, `+Inf` if none) and
    /// `sluice_quota_window_seconds` of every quota spent from.
    fn publish_gauges(&self, inner: &Inner, wall: Micros) {
        let mut soonest: HashMap<&QuotaId, f64> = HashMap::new();
        for track in inner.scopes.values() {
            let Some(at) = track.forecast.and_then(|forecast| forecast.exhausts_at) else { continue };
            let left = ((at - wall) as f64 / 1e6).max(0.0);
            let entry = soonest.entry(&track.quota).or_insert(f64::INFINITY);
            *entry = entry.min(left);
        }
        for (id, per_s) in &inner.quotas {
            let left = soonest.get(id).copied().unwrap_or(f64::INFINITY);
            self.metrics.quota_exhaustion.with_label_values(&[&id.0, &id.1]).set(left);
            self.metrics.quota_window.with_label_values(&[&id.0, &id.1]).set(*per_s);
        }
    }

    /// The forecast of the scope at `bucket`, once there is one.
    pub fn forecast(&self, bucket: &str) -> Option<Forecast> {
        self.lock().scopes.get(bucket).and_then(|track| track.forecast)
    }

    /// A quota's forecast: the scope that runs out first, else the one spent fastest.
    pub fn quota_forecast(&self, upstream: &str, quota: &str) -> Option<Forecast> {
        let inner = self.lock();
        let forecasts = inner
            .scopes
            .values()
            .filter(|track| &*track.quota.0 == upstream && &*track.quota.1 == quota)
            .filter_map(|track| track.forecast);
        forecasts.min_by(|a, b| {
            let key = |f: &Forecast| (f.exhausts_at.unwrap_or(Micros::MAX), -f.spend_per_second);
            key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal)
        })
    }

    /// What this replica holds of `slot` (its series and its pending spend), for the memory
    /// store or while Redis is away.
    pub fn local(&self, id: &QuotaId, slot: &Slot) -> SlotSpend {
        let inner = self.lock();
        let key = (id.clone(), *slot);
        let mut out = inner.series.get(&key).cloned().unwrap_or_default();
        add_into(&mut out, inner.pending.get(&key));
        out
    }

    /// What this replica spent of `slot` that Redis does not have yet (pending and unsent).
    pub fn unsent(&self, id: &QuotaId, slot: &Slot) -> SlotSpend {
        let inner = self.lock();
        let key = (id.clone(), *slot);
        let mut out = SlotSpend::new();
        add_into(&mut out, inner.pending.get(&key));
        add_into(&mut out, inner.unsent.get(&key));
        out
    }

    /// Scopes tracked for forecasts now.
    pub fn scopes_tracked(&self) -> usize {
        self.lock().scopes.len()
    }
}

/// What [`Usage::tick`] sent, handed back with Redis's answer.
pub struct SentToken(Sent);

fn add_into(out: &mut SlotSpend, from: Option<&HashMap<Arc<str>, Milli>>) {
    for (consumer, milli) in from.into_iter().flatten() {
        *out.entry(consumer.clone()).or_default() += milli;
    }
}

/// `<prefix>:{<upstream>}:<quota>!use:<slot>`: `!` is never in a quota name, so no bucket or
/// pause key can be read as one; the hash tag keeps an upstream's keys on one Cluster slot.
pub fn usage_key(prefix: &str, id: &QuotaId, slot: &Slot) -> String {
    format!("{prefix}:{{{}}}:{}!use:{}", id.0, id.1, slot.suffix())
}

/// The shared spend counter of a scope's bucket.
pub fn spent_key(bucket: &str) -> String {
    format!("{bucket}!spent")
}

/// `cost` tokens in milli-tokens, in equal shares for `consumers` (the first ones take the
/// remainder, so the shares add up exactly); all of it to `none` when there are none.
pub fn shares(cost: u64, consumers: &[Arc<str>]) -> Vec<(Arc<str>, Milli)> {
    let total = i64::try_from(cost).unwrap_or(i64::MAX / MILLI).saturating_mul(MILLI);
    if consumers.is_empty() {
        return vec![(Arc::from(crate::consumer::NONE), total)];
    }
    let n = i64::try_from(consumers.len()).unwrap_or(i64::MAX);
    let (each, rest) = (total / n, total % n);
    let mut out: Vec<(Arc<str>, Milli)> = Vec::new();
    for (at, consumer) in consumers.iter().enumerate() {
        let milli = each + i64::from(i64::try_from(at).unwrap_or(i64::MAX) < rest);
        match out.iter_mut().find(|(seen, _)| seen == consumer) {
            Some((_, sum)) => *sum += milli,
            None => out.push((consumer.clone(), milli)),
        }
    }
    out
}

/// One period of `/usage` from the slots read (`read(slot)`: that slot's spend by consumer).
pub fn period(
    since_ms: i64,
    slots: &[(Slot, f64)],
    limit: Option<u64>,
    mut read: impl FnMut(&Slot) -> SlotSpend,
) -> Period {
    let mut by_consumer: HashMap<Arc<str>, f64> = HashMap::new();
    for (slot, part) in slots {
        for (consumer, milli) in read(slot) {
            *by_consumer.entry(consumer).or_default() += milli as f64 * part;
        }
    }
    let spent_milli: f64 = by_consumer.values().sum();
    let mut consumers: Vec<ConsumerSpend> = by_consumer
        .into_iter()
        .filter(|(_, milli)| *milli > 0.0)
        .map(|(consumer, milli)| ConsumerSpend {
            consumer: consumer.to_string(),
            spent: tokens(milli),
            share: if spent_milli > 0.0 { round6(milli / spent_milli) } else { 0.0 },
            of_limit: limit.filter(|limit| *limit > 0).map(|limit| round6(milli / MILLI as f64 / limit as f64)),
        })
        .collect();
    consumers.sort_by(|a, b| {
        b.spent.partial_cmp(&a.spent).unwrap_or(std::cmp::Ordering::Equal).then(a.consumer.cmp(&b.consumer))
    });
    Period { since: rfc3339(since_ms.saturating_mul(1000)), spent: tokens(spent_milli), consumers }
}

/// Milli-tokens as tokens, to the thousandth.
fn tokens(milli: f64) -> f64 {
    (milli.round()) / MILLI as f64
}

fn round6(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}

/// Unix microseconds as RFC 3339, to the millisecond.
pub fn rfc3339(at: Micros) -> String {
    jiff::Timestamp::from_microsecond(at - at.rem_euclid(1000))
        .map(|stamp| stamp.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|name| Arc::from(*name)).collect()
    }

    #[test]
    fn a_bulk_calls_cost_is_shared_out_exactly() {
        let shared = shares(1, &names(&["a", "b", "a"]));
        assert_eq!(shared, vec![(Arc::from("a"), 667), (Arc::from("b"), 333)]);
        assert_eq!(shares(10, &names(&["a", "b"])), vec![(Arc::from("a"), 5000), (Arc::from("b"), 5000)]);
        assert_eq!(shares(3, &[]), vec![(Arc::from(crate::consumer::NONE), 3000)]);
        let many: Vec<Arc<str>> = (0..7).map(|at| Arc::from(format!("c{at}"))).collect();
        assert_eq!(shares(2, &many).iter().map(|(_, milli)| milli).sum::<i64>(), 2000);
    }

    #[test]
    fn covering_slots_weigh_the_oldest_by_its_part_inside() {
        let slots = covering(SlotKind::Minute, MINUTE_MS, 90_000, 200_000);
        let starts: Vec<i64> = slots.iter().map(|(slot, _)| slot.start).collect();
        assert_eq!(starts, [60_000, 120_000, 180_000]);
        assert!((slots[0].1 - 0.5).abs() < 1e-9, "{slots:?}");
        assert_eq!(slots[1].1, 1.0);
        // An hour of minutes is 61 slots at most, never unbounded.
        assert!(covering(SlotKind::Minute, MINUTE_MS, 0, HOUR_MS).len() <= 61);
    }

    #[test]
    fn forecasts_per_shape() {
        let fixed = Shape { limit: 1000.0, per_s: 86_400.0, kind: ShapeKind::Fixed, window: Duration::from_secs(60) };
        let standing = |remaining, reset_s: i64| Standing { remaining, reset_in: reset_s * 1_000_000 };
        assert_eq!(fixed.runs_out_in(10.0, standing(500, 3600)), Some(50.0));
        assert_eq!(fixed.runs_out_in(10.0, standing(500, 40)), None, "the window resets first");
        assert_eq!(fixed.runs_out_in(0.0, standing(500, 3600)), None);
        let rolling = Shape { limit: 100.0, per_s: 10.0, kind: ShapeKind::Rolling, ..fixed };
        assert_eq!(rolling.runs_out_in(5.0, standing(50, 10)), None, "below limit/per the window never fills");
        assert_eq!(rolling.runs_out_in(20.0, standing(50, 10)), Some(2.5));
        let smooth = Shape { kind: ShapeKind::Smooth, ..rolling };
        assert_eq!(smooth.runs_out_in(20.0, standing(50, 10)), Some(5.0), "the bucket refills at 10/s");
    }

    #[test]
    fn the_rate_is_a_least_squares_fit_over_the_window() {
        let shape = Shape { limit: 1000.0, per_s: 86_400.0, kind: ShapeKind::Fixed, window: Duration::from_secs(10) };
        let start = Instant::now();
        let mut track = ScopeTrack {
            quota: (Arc::from("u"), Arc::from("q")),
            shape,
            pending: 0,
            total: 0,
            samples: VecDeque::new(),
            standing: Some((0, Standing { remaining: 400, reset_in: 3_600_000_000 })),
            last_spent: start,
            forecast: None,
        };
        for second in 0..4 {
            track.sample(start + Duration::from_secs(second), i64::try_from(second).unwrap() * 20);
        }
        assert_eq!(track.rate(), None, "not yet half the window");
        for second in 4..=12 {
            // Jitter of one token either way around a steady 20/s.
            let jitter = if second % 2 == 0 { 1 } else { -1 };
            track.sample(start + Duration::from_secs(second), i64::try_from(second).unwrap() * 20 + jitter);
        }
        track.update_forecast(start + Duration::from_secs(12));
        let forecast = track.forecast.unwrap();
        assert!((forecast.spend_per_second - 20.0).abs() < 0.5, "{forecast:?}");
        let at = forecast.exhausts_at.unwrap();
        assert!((at - 20_000_000).abs() < 500_000, "400 left at 20/s: 20 s after the standing, got {at}");
        assert!(track.samples.len() <= 11, "samples older than the window go");
        track.update_forecast(start + Duration::from_secs(30));
        assert_eq!(track.forecast, None, "stale samples forecast nothing");
    }

    #[test]
    fn rfc3339_to_the_millisecond() {
        assert_eq!(rfc3339(1_767_225_600_123_456), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
