//! LIMIT: the vendor sees no more than its quota, however many replicas run, and callers get all
//! of it.
//!
//! The rooms, leaf first:
//! - the maths, pure: `decide` (one decision over all quotas), with one shape per file:
//!   `rolling` (the default, the vendor's rolling window), `gcra` (`shape: smooth`) and `window`
//!   (fixed calendar windows), over the units of `measure`; `quota.lua` + `decide.lua` mirror it
//!   for Redis;
//! - `clock`: the one source of time (wall time follows tokio's, so tests run on paused time);
//! - `store`: what any store is asked ([`QuotaStore`](store::QuotaStore)), kept by `memory`
//!   (this process) and `redis` (every replica), with `lease` for busy scopes;
//! - `keys`: how buckets and pauses are named; `scope`: which bucket a request draws from;
//!   `books`: the per-quota scope tables and counters; `slots`: the `max_concurrency` semaphores;
//!   `announced`: limits the vendor said are lower than configured;
//! - `fallback`: Redis and what to do while it is away (`on_failure`, the probe that heals the
//!   connection, the local shares and folding them back in);
//! - `admit`: the admission loop; `headers`: what the caller is told; `layer`: the Limit layer;
//! - `usage`: who spent each quota (by consumer, merged across replicas through the store) and
//!   when it will run out at the rate it is spent (the forecast).
//!
//! [`Limiter`] ties them together for the Limit layer and the Feedback layer (which records vendor
//! pauses and adopts the vendor's figures through it).
//!
//! The room stands above `breaker` (queued requests watch it), `security` (the proxy user of a
//! scope) and `vendor` ([`MAX_PAUSE`]); `feedback` and `respond` (`headers::retry_after`) stand
//! above it. The Limit layer reads the generation through
//! [`LimitContext`](layer::LimitContext), so the room never names `state`.

pub mod admit;
pub mod announced;
pub mod books;
pub mod clock;
pub mod decide;
pub mod fallback;
pub mod gcra;
pub mod headers;
pub mod keys;
pub mod lanes;
pub mod layer;
pub mod lease;
pub mod measure;
pub mod memory;
pub mod redis;
pub mod rolling;
pub mod scope;
pub mod slots;
pub mod store;
pub mod turns;
pub mod usage;
pub mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::config::{Lane, OnFailure, Quota, Store, StoreKind, Upstream, Window};
use crate::error::ProxyError;
use crate::telemetry::Metrics;
use announced::{Announced, Followed};
use books::{Books, Buckets};
use clock::{Clock, TokioClock};
use decide::{Decision, Micros, Rule, Standing};
use fallback::Fallback;
use keys::KeySchema;
use memory::MemoryStore;
use redis::RedisStore;
use slots::Slots;
use usage::Usage;

/// Request header with which a caller shortens (never lengthens) its own queue wait.
pub const MAX_WAIT_HEADER: &str = crate::controls::MAX_WAIT_HEADER;

/// The longest any vendor pause holds, on every path (a garbled header must not stop traffic
/// for years): the vendor room's own bound.
pub const MAX_PAUSE: Duration = crate::vendor::MAX_PAUSE;

/// Who is asking, as far as quota scopes care.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub headers: &'a HeaderMap,
    pub peer: Option<SocketAddr>,
    /// The authenticated proxy client, when `clients:` are configured.
    pub client: Option<&'a str>,
    /// The host the request goes to (vendor pauses are per host on wildcard upstreams).
    pub host: Option<&'a str>,
    /// The caller's own wait limit (`Sluice-Max-Wait`, parsed and clamped by `controls`).
    pub max_wait: Option<Duration>,
    /// What the injected credential stands for when its value changes (see
    /// [`crate::request::CredentialName`]): `credential` scopes and pause accounts use it.
    pub credential: Option<&'a str>,
    /// Who the tokens are spent for: the request's consumer, or one per item of a bulk call.
    pub consumers: &'a [Arc<str>],
    /// The request's priority lane (see `lanes`).
    pub lane: Lane,
}

impl<'a> Caller<'a> {
    /// A caller known by its headers alone: no peer, client, host, wait limit, credential name
    /// or consumer, in the `normal` lane (benches, tests, and callers that are not requests).
    pub fn from_headers(headers: &'a HeaderMap) -> Self {
        Caller {
            headers,
            peer: None,
            client: None,
            host: None,
            max_wait: None,
            credential: None,
            consumers: &[],
            lane: Lane::Normal,
        }
    }
}

/// What a request got from the limiter: held until its response head is back.
#[derive(Debug, Default)]
pub struct Admission {
    pub permit: Option<OwnedSemaphorePermit>,
    /// Time spent waiting for a slot and for quota.
    pub queued: Duration,
    /// `RateLimit` for the scope the request used.
    pub rate_limit: Option<HeaderValue>,
    /// Whether this upstream is limited at all (then `Server-Timing` is reported).
    pub limited: bool,
    /// Where the vendor's answer to this request is recorded (pauses, adopted figures).
    pub scope: Option<VendorScope>,
}

/// The request's place in the limiter, for the Feedback layer to act on the vendor's answer.
#[derive(Debug, Clone)]
pub struct VendorScope {
    /// Where a vendor pause for this request's upstream (and host) and account is recorded.
    pub pause_key: String,
    /// The bucket of each quota this request was charged in.
    pub bucket_keys: Vec<String>,
    /// Each quota's standing right after this request's admission.
    pub standings: Vec<Standing>,
}

/// How quota decisions are being made right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Memory store: this replica alone.
    Memory,
    /// Redis, shared by every replica.
    Shared,
    /// Redis unreachable: the `on_failure` policy applies.
    Degraded(OnFailure),
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::Shared => "shared",
            Mode::Degraded(OnFailure::Local) => "degraded-local",
            Mode::Degraded(OnFailure::Allow) => "degraded-allow",
            Mode::Degraded(OnFailure::Deny) => "degraded-deny",
        }
    }
}

/// Where decisions are made.
enum Decider {
    Memory(MemoryStore),
    Shared(Arc<Fallback<RedisStore>>),
}

pub struct Limiter {
    decider: Decider,
    redis: Option<Arc<RedisStore>>,
    store_kind: StoreKind,
    keys: KeySchema,
    books: Books,
    slots: Slots,
    announced: Announced,
    usage: Usage,
    turns: Arc<turns::Turns>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

/// How often spend is folded into the series, sent to Redis and sampled for forecasts.
pub const USAGE_TICK: Duration = Duration::from_secs(1);

impl Limiter {
    /// Builds the limiter for `store`; with Redis, tries to connect for up to a second, then
    /// starts degraded and keeps trying in the background.
    pub async fn start(store: Store, metrics: Arc<Metrics>, stop: CancellationToken) -> Arc<Self> {
        Self::start_with_clock(store, metrics, stop, Arc::new(TokioClock::new())).await
    }

    /// [`Limiter::start`] on a given clock (tests pin the calendar, or run on paused time).
    pub async fn start_with_clock(
        store: Store,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let keys = KeySchema::new(&store.key_prefix);
        let store_kind = store.kind;
        let (decider, redis) = match store.kind {
            StoreKind::Memory => (Decider::Memory(MemoryStore::default()), None),
            StoreKind::Redis => {
                let redis = RedisStore::new(store.clone());
                let fallback =
                    Fallback::start(store, redis.clone(), metrics.clone(), clock.clone(), stop.clone()).await;
                (Decider::Shared(fallback), Some(redis))
            }
        };
        let limiter = Arc::new(Self {
            decider,
            redis,
            store_kind,
            keys,
            books: Books::default(),
            slots: Slots::default(),
            announced: Announced::default(),
            usage: Usage::new(metrics.clone()),
            turns: Arc::default(),
            metrics,
            clock,
        });
        spawn_usage_ticks(Arc::downgrade(&limiter), stop);
        limiter
    }

    /// One usage tick: pending spend into the series; with Redis, sent (off the request path)
    /// and the scopes' shared totals read back; then the forecasts.
    pub async fn usage_tick(&self) {
        let shared = matches!(self.decider, Decider::Shared(_));
        let Some((flush, token)) = self.usage.tick(self.clock.wall(), self.clock.now(), shared, self.keys.prefix())
        else {
            return;
        };
        let result = match (&self.redis, self.mode()) {
            (Some(redis), Mode::Shared) if !flush.groups.is_empty() => {
                let wait = self.store_patience();
                match tokio::time::timeout(wait, redis.add_usage(&flush)).await {
                    Ok(Ok(totals)) => Ok(totals),
                    Ok(Err(error)) => {
                        self.metrics.store_errors.with_label_values(&[error.kind()]).inc();
                        tracing::debug!(%error, "Usage not sent to Redis; kept for the next tick.");
                        Err(())
                    }
                    Err(_) => {
                        self.metrics.store_errors.with_label_values(&["timeout"]).inc();
                        Err(())
                    }
                }
            }
            (Some(_), Mode::Shared) => Ok(std::collections::HashMap::new()),
            _ => Err(()),
        };
        self.usage.sent(token, result, self.clock.wall(), self.clock.now());
    }

    /// How long an admin read or a background write waits on Redis.
    fn store_patience(&self) -> Duration {
        self.redis
            .as_ref()
            .map_or(Duration::from_secs(1), |redis| (redis.settings().timeout * 20).max(Duration::from_secs(1)))
    }

    /// `GET /usage`: per upstream and quota, spend by consumer in the current window, the last
    /// hour and the current (UTC) day; every replica's through Redis, else this replica's.
    pub async fn usage(&self, upstreams: &[Arc<Upstream>]) -> UsageSnapshot {
        let now = self.clock.wall();
        let plans: Vec<UpstreamPlans<'_>> = upstreams
            .iter()
            .filter(|upstream| !upstream.limits.quotas.is_empty())
            .map(|upstream| {
                let plans =
                    upstream.limits.quotas.iter().map(|quota| (usage::Plan::of(upstream, quota, now), quota)).collect();
                (upstream.clone(), plans)
            })
            .collect();
        // Every replica's spend, from Redis, when it answers.
        let mut shared: Option<std::collections::HashMap<String, usage::SlotSpend>> = None;
        if let (Some(redis), Mode::Shared) = (&self.redis, self.mode()) {
            let prefix = self.keys.prefix();
            let groups: Vec<Vec<String>> = plans
                .iter()
                .map(|(_, quotas)| {
                    quotas
                        .iter()
                        .flat_map(|(plan, _)| plan.slots().map(|slot| usage::usage_key(prefix, &plan.id, slot)))
                        .collect()
                })
                .collect();
            if let Ok(Ok(read)) = tokio::time::timeout(self.store_patience(), redis.read_usage(&groups)).await {
                let mut by_key = std::collections::HashMap::new();
                for (keys, hashes) in groups.into_iter().zip(read) {
                    for (key, fields) in keys.into_iter().zip(hashes) {
                        let spend: usage::SlotSpend =
                            fields.into_iter().map(|(consumer, milli)| (Arc::from(consumer.as_str()), milli)).collect();
                        by_key.insert(key, spend);
                    }
                }
                shared = Some(by_key);
            }
        }
        let prefix = self.keys.prefix();
        let mut out = Vec::new();
        for (upstream, quotas) in &plans {
            let mut views = Vec::new();
            for (plan, quota) in quotas {
                let read = |slot: &usage::Slot| match &shared {
                    Some(by_key) => {
                        let mut spend =
                            by_key.get(&usage::usage_key(prefix, &plan.id, slot)).cloned().unwrap_or_default();
                        for (consumer, milli) in self.usage.unsent(&plan.id, slot) {
                            *spend.entry(consumer).or_default() += milli;
                        }
                        spend
                    }
                    None => self.usage.local(&plan.id, slot),
                };
                views.push(usage::QuotaUsage {
                    name: quota.name.to_string(),
                    limit: quota.limit,
                    per: humantime::format_duration(quota.per).to_string(),
                    window: usage::period(plan.window.0, &plan.window.1, Some(quota.limit), read),
                    last_hour: usage::period(plan.hour.0, &plan.hour.1, None, read),
                    today: usage::period(plan.day.0, &plan.day.1, None, read),
                });
            }
            out.push(UpstreamUsage { name: upstream.name.to_string(), quotas: views });
        }
        UsageSnapshot {
            scope: if shared.is_some() { "cluster" } else { "replica" },
            store: self.store_kind.as_str(),
            mode: self.mode().as_str(),
            replicas: self.replicas(),
            at: usage::rfc3339(now),
            upstreams: out,
        }
    }

    pub fn mode(&self) -> Mode {
        match &self.decider {
            Decider::Memory(_) => Mode::Memory,
            Decider::Shared(fallback) => fallback.mode(),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn replicas(&self) -> u64 {
        match &self.decider {
            Decider::Memory(_) => 1,
            Decider::Shared(fallback) => fallback.replicas(),
        }
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store_kind
    }

    /// Connections made to Redis so far (1 at start, one more per healing); 0 without Redis.
    pub fn store_connections(&self) -> u64 {
        self.redis.as_ref().map_or(0, |redis| redis.connections_made())
    }

    /// Admits a request to `upstream` or says why not. Waits (queues) within the allowed time,
    /// and gives up at once with 503 if `breaker_opened` fires while it waits.
    pub async fn admit(
        &self,
        upstream: &Upstream,
        method: &Method,
        path: &str,
        caller: Caller<'_>,
        breaker_opened: Option<tokio::sync::watch::Receiver<u64>>,
    ) -> Result<Admission, ProxyError> {
        let limits = &upstream.limits;
        if !watches_vendor(upstream) && limits.quotas.is_empty() && limits.max_concurrency.is_none() {
            return Ok(Admission::default());
        }
        admit::admit(self, upstream, method, path, caller, breaker_opened).await
    }

    /// Records a vendor pause for every replica (store) and this one (memory), never shortening
    /// one and never longer than [`MAX_PAUSE`]. `outage`: the vendor was failing (a 5xx), so
    /// callers refused meanwhile get 503, not 429.
    pub async fn pause(&self, upstream: &Upstream, pause_key: &str, hold: Duration, reason: &str, outage: bool) {
        let hold = hold.min(MAX_PAUSE);
        if hold.is_zero() {
            return;
        }
        let hold_us = i64::try_from(hold.as_micros()).unwrap_or(i64::MAX / 4);
        self.metrics.vendor_pauses.with_label_values(&[&upstream.name, reason]).inc();
        tracing::info!(
            upstream = &*upstream.name,
            reason,
            outage,
            hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            "Vendor pause recorded."
        );
        match &self.decider {
            Decider::Memory(memory) => memory.pause(pause_key, self.clock.wall().saturating_add(hold_us), outage),
            Decider::Shared(fallback) => fallback.pause(pause_key, hold_us, outage).await,
        }
    }

    /// The vendor reports `remaining` left for quota `index` of this request's scope, fewer than
    /// sluice believed: every replica follows the vendor's figure for the rest of the window.
    pub async fn adopt(&self, upstream: &Upstream, scope: &VendorScope, index: usize, remaining: u64) {
        let quotas = self.announced.effective(upstream);
        let (Some(quota), Some(key)) = (quotas.get(index), scope.bucket_keys.get(index)) else { return };
        let remaining = i64::try_from(remaining).unwrap_or(i64::MAX);
        let changed = match &self.decider {
            Decider::Memory(memory) => {
                let now = self.clock.wall();
                memory.adopt(key, &rule_of(quota, 1, now, 1), remaining, now)
            }
            Decider::Shared(fallback) => fallback.adopt(key, quota, remaining).await,
        };
        if changed {
            self.metrics.vendor_adopted.with_label_values(&[&upstream.name, &quota.name]).inc();
            tracing::debug!(
                upstream = &*upstream.name,
                quota = &*quota.name,
                remaining,
                "Following the vendor's remaining quota."
            );
        }
    }

    /// The index of the quota a vendor window (by its name or length) speaks of, if any.
    pub fn quota_for_window(upstream: &Upstream, window: Option<Duration>, name: &str) -> Option<usize> {
        Announced::quota_for(upstream, window, name)
    }

    /// The vendor said its limit for a window: follow it down, and back up to the configured one.
    pub fn vendor_limit(&self, upstream: &Upstream, window: Option<Duration>, name: &str, limit: u64) {
        let Some((index, followed)) = self.announced.follow(upstream, window, name, limit) else { return };
        let quota = &upstream.limits.quotas[index];
        let gauge = self.metrics.effective_limit.with_label_values(&[&upstream.name, &quota.name]);
        match followed {
            Followed::Lowered { configured, vendor } => {
                tracing::info!(
                    upstream = &*upstream.name,
                    quota = &*quota.name,
                    configured,
                    vendor,
                    "Vendor reports a lower limit; following it."
                );
                gauge.set(i64::try_from(vendor).unwrap_or(i64::MAX));
            }
            Followed::Restored { configured } => {
                tracing::info!(
                    upstream = &*upstream.name,
                    quota = &*quota.name,
                    limit = configured,
                    "Vendor limit back at the configured one."
                );
                gauge.set(i64::try_from(configured).unwrap_or(i64::MAX));
            }
        }
    }

    /// The memory store that holds this process's buckets (all of them, or the local shares).
    fn memory(&self) -> &MemoryStore {
        match &self.decider {
            Decider::Memory(memory) => memory,
            Decider::Shared(fallback) => fallback.local(),
        }
    }

    /// The bucket of each quota for this request, recording scope use and evictions.
    fn buckets(&self, upstream: &Upstream, caller: &Caller<'_>) -> Buckets {
        self.books.buckets(upstream, caller, &self.keys, self.memory(), &self.metrics, self.clock.wall())
    }

    /// One decision in the current mode; `None` means "let it through unlimited" (`allow`).
    /// `extra`: the lane's own pseudo-quotas, whose buckets follow the quotas' in `keys`.
    async fn decide(
        &self,
        upstream: &Upstream,
        keys: &[String],
        extra: &[Quota],
        pause_key: &str,
        cost: i64,
        max_wait: Micros,
    ) -> Result<Option<Decision>, ProxyError> {
        let mut quotas = self.announced.effective(upstream);
        if !extra.is_empty() {
            quotas.to_mut().extend_from_slice(extra);
        }
        match &self.decider {
            Decider::Memory(memory) => {
                let now = self.clock.wall();
                let rules = rules(&quotas, cost, now, 1);
                Ok(Some(memory.decide(keys, pause_key, &rules, now, max_wait)))
            }
            Decider::Shared(fallback) => {
                fallback.decide(&upstream.name, &quotas, keys, pause_key, cost, max_wait).await
            }
        }
    }

    /// Time left on the pause at `key`, and whether it is an outage.
    async fn pause_remaining(&self, key: &str) -> Option<(Micros, bool)> {
        match &self.decider {
            Decider::Memory(memory) => {
                let now = self.clock.wall();
                memory.paused_until(key, now).map(|(until, outage)| (until - now, outage))
            }
            Decider::Shared(fallback) => fallback.pause_remaining(key).await,
        }
    }

    /// `GET /quotas`: per upstream and quota, the busiest scopes' remaining tokens and next-free time.
    pub async fn snapshot(&self, upstreams: &[Arc<Upstream>]) -> QuotaSnapshot {
        let mut out = Vec::new();
        for upstream in upstreams.iter().filter(|u| !u.limits.quotas.is_empty()) {
            let mut quotas = Vec::new();
            for quota in &upstream.limits.quotas {
                let busiest = self.books.busiest(upstream, quota, 10);
                let keys: Vec<String> = busiest.iter().map(|(key, _)| self.keys.bucket(upstream, quota, key)).collect();
                let (states, now, divisor) = match &self.decider {
                    Decider::Memory(memory) => {
                        let now = self.clock.wall();
                        (memory.peek(&keys, now), now, 1)
                    }
                    Decider::Shared(fallback) => {
                        let (states, now) = fallback.states(&keys).await;
                        (states, now, fallback.local_divisor())
                    }
                };
                let rule = rule_of(quota, 1, now, divisor);
                let scopes = busiest
                    .iter()
                    .zip(states)
                    .zip(&keys)
                    .map(|(((key, requests), state), bucket)| {
                        let standing = decide::standing(&rule, &state, now);
                        // Tokens this replica leased and has not spent are still this scope's.
                        let leased = match &self.decider {
                            Decider::Shared(fallback) => fallback.leased(bucket),
                            Decider::Memory(_) => 0,
                        };
                        let forecast = self.usage.forecast(bucket);
                        ScopeView {
                            scope: key.0.clone(),
                            requests: *requests,
                            remaining: standing.remaining + leased,
                            next_free_in_ms: next_free_in(&rule, &state, now) / 1000,
                            full_in_ms: standing.reset_in.max(0) / 1000,
                            spend_per_second: forecast.map(|forecast| round3(forecast.spend_per_second)),
                            exhausts_at: forecast.and_then(|forecast| forecast.exhausts_at).map(usage::rfc3339),
                        }
                    })
                    .collect();
                let forecast = self.usage.quota_forecast(&upstream.name, &quota.name);
                quotas.push(QuotaView {
                    name: quota.name.to_string(),
                    limit: quota.limit,
                    per: humantime::format_duration(quota.per).to_string(),
                    window: match quota.window {
                        Window::Rolling | Window::Smooth => "rolling",
                        Window::Fixed { .. } => "fixed",
                    },
                    shape: match quota.window {
                        Window::Rolling => Some("burst"),
                        Window::Smooth => Some("smooth"),
                        Window::Fixed { .. } => None,
                    },
                    burst: matches!(quota.window, Window::Smooth).then_some(quota.burst),
                    spend_per_second: forecast.map(|forecast| round3(forecast.spend_per_second)),
                    exhausts_at: forecast.and_then(|forecast| forecast.exhausts_at).map(usage::rfc3339),
                    scopes,
                });
            }
            out.push(UpstreamView { name: upstream.name.to_string(), quotas });
        }
        QuotaSnapshot {
            store: StoreView {
                kind: match self.store_kind {
                    StoreKind::Memory => "memory",
                    StoreKind::Redis => "redis",
                },
                mode: self.mode().as_str(),
                replicas: self.replicas(),
                buckets_in_memory: self.memory().len(),
            },
            upstreams: out,
        }
    }
}

/// What `GET /quotas` shows (the admin listener renders it, hashing scope values for callers
/// who may not see them).
#[derive(Debug, Clone, Serialize)]
pub struct QuotaSnapshot {
    pub store: StoreView,
    pub upstreams: Vec<UpstreamView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreView {
    pub kind: &'static str,
    pub mode: &'static str,
    pub replicas: u64,
    /// Buckets this process holds (the memory store, or local shares while degraded).
    pub buckets_in_memory: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub quotas: Vec<QuotaView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuotaView {
    pub name: String,
    pub limit: u64,
    pub per: String,
    pub window: &'static str,
    pub shape: Option<&'static str>,
    pub burst: Option<u64>,
    /// The spend rate (tokens per second, every replica's) of the scope closest to running
    /// out, over the quota's `forecast_window`; `null` until a forecast window has been seen.
    pub spend_per_second: Option<f64>,
    /// When that scope runs out at that rate (RFC 3339); `null` when it is not at risk.
    pub exhausts_at: Option<String>,
    pub scopes: Vec<ScopeView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScopeView {
    pub scope: String,
    pub requests: u64,
    pub remaining: i64,
    pub next_free_in_ms: i64,
    pub full_in_ms: i64,
    /// This scope's spend rate (see [`QuotaView::spend_per_second`]), if it is forecast.
    pub spend_per_second: Option<f64>,
    /// When this scope runs out at that rate, if it does before it is whole again.
    pub exhausts_at: Option<String>,
}

/// What `GET /usage` shows.
#[derive(Debug, Clone, Serialize)]
pub struct UsageSnapshot {
    /// `cluster`: every replica's spend, read from Redis; `replica`: this replica's only (the
    /// memory store, or Redis unreachable).
    pub scope: &'static str,
    pub store: &'static str,
    pub mode: &'static str,
    pub replicas: u64,
    /// When the answer was made (RFC 3339).
    pub at: String,
    pub upstreams: Vec<UpstreamUsage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamUsage {
    pub name: String,
    pub quotas: Vec<usage::QuotaUsage>,
}

/// An upstream and what `/usage` reads of each of its quotas.
type UpstreamPlans<'a> = (Arc<Upstream>, Vec<(usage::Plan, &'a Quota)>);

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Runs [`Limiter::usage_tick`] every [`USAGE_TICK`] until `stop`, and once more then, so the
/// last second's spend reaches Redis.
fn spawn_usage_ticks(limiter: std::sync::Weak<Limiter>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(USAGE_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                () = stop.cancelled() => true,
            };
            let Some(limiter) = limiter.upgrade() else { return };
            limiter.usage_tick().await;
            if stopping {
                return;
            }
        }
    });
}

/// Whether sluice acts on this upstream's responses (pauses): it has quotas or a header profile.
pub fn watches_vendor(upstream: &Upstream) -> bool {
    upstream.feedback.profile != crate::vendor::ProfileKind::None || !upstream.limits.quotas.is_empty()
}

/// Microseconds until a cost-1 request would be taken without waiting.
fn next_free_in(rule: &Rule, state: &decide::State, now: Micros) -> Micros {
    decide::earliest(rule, state, 1, now).map_or(Micros::MAX, |at| at - now)
}

/// The algorithm's rules for `quotas`, each scaled to `1 / divisor` of its limit (local shares).
pub fn rules(quotas: &[Quota], cost: i64, now: Micros, divisor: u64) -> Vec<(Rule, i64)> {
    quotas.iter().map(|quota| (rule_of(quota, cost, now, divisor), cost.max(1))).collect()
}

/// One quota's rule at `now`, scaled to `1 / divisor` of its limit.
pub fn rule_of(quota: &Quota, cost: i64, now: Micros, divisor: u64) -> Rule {
    let divisor = divisor.max(1);
    let per = i64::try_from(quota.per.as_micros()).unwrap_or(i64::MAX);
    let margin = i64::try_from(quota.margin.as_micros()).unwrap_or(0);
    // A local share still holds one request of this route (validation keeps cost within reach).
    let cost = u64::try_from(cost).unwrap_or(1).max(1);
    let limit = (quota.limit / divisor).max(cost.min(quota.limit)).max(1);
    match &quota.window {
        Window::Rolling => {
            // The record's precision follows the configured limit, not a share or a lowered one,
            // so the bucket keeps its form (and its Redis type) whatever the divisor.
            let exact = rolling::Window::new(quota.limit, per, margin);
            Rule::Rolling(rolling::Window { limit: i64::try_from(limit).unwrap_or(i64::MAX), ..exact })
        }
        Window::Smooth => {
            let burst = (quota.burst / divisor).max(cost.min(quota.burst)).clamp(1, limit);
            Rule::smooth(limit, per, burst, margin)
        }
        Window::Fixed { resets_at } => Rule::Fixed {
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            bounds: window::bounds(per, resets_at.as_ref(), now),
        },
    }
}

#[cfg(test)]
mod tests {
    //! The admission loop, vendor pauses, the breaker and vendor-limit following, on paused time
    //! with the memory store. (Redis and degraded mode: `fallback`'s tests and `tests/`.)
    use super::*;
    use crate::error::ErrorKind;

    async fn limiter_for(quotas: &str, extra: &str) -> (Arc<Limiter>, Arc<Upstream>) {
        let yaml = format!(
            "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: 'http://127.0.0.1:1'
    quotas: [{quotas}]
{extra}"
        );
        let config = crate::config::Config::from_yaml(&yaml).unwrap();
        let clock = Arc::new(TokioClock::at(1_900_000_000_000_000));
        let limiter = Limiter::start_with_clock(
            config.process.store.resolve().unwrap(),
            Arc::new(Metrics::new()),
            CancellationToken::new(),
            clock,
        )
        .await;
        (limiter, config.live.upstreams[0].clone())
    }

    async fn admit(limiter: &Limiter, upstream: &Upstream) -> Result<Admission, ProxyError> {
        let headers = HeaderMap::new();
        let caller = Caller::from_headers(&headers);
        limiter.admit(upstream, &Method::GET, "/x", caller, None).await
    }

    async fn admit_as(
        limiter: &Limiter,
        upstream: &Upstream,
        lane: Lane,
        consumer: &str,
    ) -> Result<Admission, ProxyError> {
        let headers = HeaderMap::new();
        let consumers = [Arc::from(consumer)];
        let caller = Caller {
            headers: &headers,
            peer: None,
            client: None,
            host: None,
            max_wait: None,
            credential: None,
            consumers: &consumers,
            lane,
        };
        limiter.admit(upstream, &Method::GET, "/x", caller, None).await
    }

    /// Admission times (seconds since `started`) of `count` requests of `lane` sent at once.
    fn spawn_lane(
        limiter: &Arc<Limiter>,
        upstream: &Arc<Upstream>,
        lane: Lane,
        consumer: &'static str,
        count: usize,
        times: tokio::sync::mpsc::UnboundedSender<(Lane, &'static str, f64, Duration)>,
        started: tokio::time::Instant,
    ) {
        for _ in 0..count {
            let (limiter, upstream, times) = (limiter.clone(), upstream.clone(), times.clone());
            tokio::spawn(async move {
                let admission = admit_as(&limiter, &upstream, lane, consumer).await.unwrap();
                let at = started.elapsed().as_secs_f64();
                times.send((lane, consumer, at, admission.queued)).unwrap();
            });
        }
    }

    /// A backfill of low requests keeps a quota full; a high request arriving then goes within
    /// two slot intervals, where behind the backfill's reservations it would wait for all of them.
    #[tokio::test(start_paused = true)]
    async fn a_high_request_passes_a_queued_backfill() {
        let (limiter, upstream) =
            limiter_for("{ name: w, limit: 10, per: 10s, margin: 0s }", "    max_queue_wait: 60s\n").await;
        let started = limiter.clock.now();
        let (times, mut got) = tokio::sync::mpsc::unbounded_channel();
        spawn_lane(&limiter, &upstream, Lane::Low, "backfill", 30, times.clone(), started);
        tokio::time::sleep(Duration::from_millis(12_500)).await;
        let high = admit_as(&limiter, &upstream, Lane::High, "web").await.unwrap();
        assert!(high.queued <= Duration::from_secs(2), "two slot intervals at most: {:?}", high.queued);
        drop(times);
        let mut low = Vec::new();
        while let Some((_, _, at, _)) = got.recv().await {
            low.push(at);
        }
        assert_eq!(low.len(), 30, "the backfill gets through, behind");
        // Paced: never two low admissions in one slot interval, so never a burst of freed slots.
        low.sort_by(f64::total_cmp);
        assert!(low.windows(2).all(|pair| pair[1] - pair[0] >= 0.999), "{low:?}");
    }

    /// `lanes: { low: { max_share: 0.5 } }`: low never takes more than half of any window, and
    /// normal traffic takes the rest.
    #[tokio::test(start_paused = true)]
    async fn a_lane_share_caps_what_it_takes_of_any_window() {
        let (limiter, upstream) = limiter_for(
            "{ name: w, limit: 10, per: 10s, margin: 0s }",
            "    max_queue_wait: 60s\n    lanes: { low: { max_share: 0.5 } }\n",
        )
        .await;
        let started = limiter.clock.now();
        let (times, mut got) = tokio::sync::mpsc::unbounded_channel();
        spawn_lane(&limiter, &upstream, Lane::Low, "backfill", 12, times.clone(), started);
        spawn_lane(&limiter, &upstream, Lane::Normal, "sync", 12, times.clone(), started);
        drop(times);
        let mut all = Vec::new();
        while let Some(entry) = got.recv().await {
            all.push(entry);
        }
        assert_eq!(all.len(), 24);
        let low: Vec<f64> = all.iter().filter(|(lane, ..)| *lane == Lane::Low).map(|e| e.2).collect();
        for &at in &all {
            let in_window = |times: &[f64]| times.iter().filter(|t| **t > at.2 - 10.0 && **t <= at.2).count();
            assert!(in_window(&low) <= 5, "low took more than half of the window ending at {}: {low:?}", at.2);
            let every: Vec<f64> = all.iter().map(|e| e.2).collect();
            assert!(in_window(&every) <= 10, "the quota itself holds");
        }
        let first_window = all.iter().filter(|e| e.2 < 10.0).count();
        assert_eq!(first_window, 10, "the rest of the window goes to normal: {all:?}");
    }

    /// Two consumers in one lane, one sending ten times the other: they take turns, so the light
    /// one's calls do not wait behind all of the heavy one's.
    #[tokio::test(start_paused = true)]
    async fn consumers_of_a_lane_take_turns() {
        let (limiter, upstream) =
            limiter_for("{ name: w, limit: 2, per: 1s, margin: 0s }", "    max_queue_wait: 60s\n").await;
        let started = limiter.clock.now();
        let (times, mut got) = tokio::sync::mpsc::unbounded_channel();
        spawn_lane(&limiter, &upstream, Lane::Normal, "heavy", 30, times.clone(), started);
        tokio::time::sleep(Duration::from_millis(10)).await;
        spawn_lane(&limiter, &upstream, Lane::Normal, "light", 3, times.clone(), started);
        drop(times);
        let mut order = Vec::new();
        while let Some((_, consumer, at, _)) = got.recv().await {
            order.push((at, consumer));
        }
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let light_done = order.iter().rposition(|(_, consumer)| *consumer == "light").unwrap();
        assert!(light_done < 16, "the light consumer's 3 calls are through within the first 16 of 33: {order:?}");
    }

    fn scope_of(admission: &Admission) -> VendorScope {
        admission.scope.clone().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_burst_at_once_then_each_waiter_when_its_slot_frees() {
        let (limiter, upstream) =
            limiter_for("{ name: w, limit: 5, per: 10s, margin: 0s }", "    max_queue_wait: 30s\n").await;
        let started = limiter.clock.now();
        for _ in 0..5 {
            assert_eq!(admit(&limiter, &upstream).await.unwrap().queued, Duration::ZERO);
        }
        let sixth = admit(&limiter, &upstream).await.unwrap();
        assert_eq!(sixth.queued, Duration::from_secs(10), "the moment the first leaves the window");
        assert_eq!(limiter.clock.now() - started, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_says_exactly_when() {
        let (limiter, upstream) =
            limiter_for("{ name: w, limit: 2, per: 10s, margin: 0s }", "    over_limit: reject\n").await;
        admit(&limiter, &upstream).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        admit(&limiter, &upstream).await.unwrap();
        let refused = admit(&limiter, &upstream).await.unwrap_err();
        match *refused.kind {
            ErrorKind::RateLimited { ref quota, retry_after, .. } => {
                assert_eq!(quota, "w");
                assert_eq!(retry_after, Duration::from_secs(7));
            }
            ref other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(admit(&limiter, &upstream).await.is_ok(), "the first left the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_vendor_pause_holds_queued_requests_and_refuses_what_it_outlasts() {
        let (limiter, upstream) = limiter_for("{ name: w, limit: 100, per: 10s }", "    max_queue_wait: 5s\n").await;
        let first = admit(&limiter, &upstream).await.unwrap();
        let scope = scope_of(&first);
        limiter.pause(&upstream, &scope.pause_key, Duration::from_secs(2), "retry_after", false).await;
        let held = admit(&limiter, &upstream).await.unwrap();
        assert!(held.queued >= Duration::from_secs(2), "held through the pause: {:?}", held.queued);
        // A pause longer than the allowed wait: refused at once, as a rate limit...
        limiter.pause(&upstream, &scope.pause_key, Duration::from_secs(60), "retry_after", false).await;
        let refused = admit(&limiter, &upstream).await.unwrap_err();
        assert_eq!(refused.code(), "rate_limited");
        assert!(matches!(*refused.kind, ErrorKind::RateLimited { ref quota, .. } if quota == "vendor"));
        // ...or, when the vendor was failing (a 5xx with Retry-After), as the outage it is.
        let (limiter, upstream) = limiter_for("{ name: w, limit: 100, per: 10s }", "").await;
        let scope = scope_of(&admit(&limiter, &upstream).await.unwrap());
        limiter.pause(&upstream, &scope.pause_key, Duration::from_secs(60), "retry_after", true).await;
        let refused = admit(&limiter, &upstream).await.unwrap_err();
        assert_eq!(refused.code(), "vendor_unavailable");
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_pauses_are_capped() {
        let (limiter, upstream) = limiter_for("{ name: w, limit: 100, per: 10s }", "    over_limit: reject\n").await;
        let scope = scope_of(&admit(&limiter, &upstream).await.unwrap());
        limiter.pause(&upstream, &scope.pause_key, Duration::from_secs(u64::MAX / 2), "profile", false).await;
        let refused = admit(&limiter, &upstream).await.unwrap_err();
        assert_eq!(refused.retry_after(), Some(MAX_PAUSE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_that_opens_answers_the_waiting_request() {
        let (limiter, upstream) = limiter_for("{ name: w, limit: 1, per: 10s }", "    max_queue_wait: 30s\n").await;
        admit(&limiter, &upstream).await.unwrap();
        let (open, opened) = tokio::sync::watch::channel(0u64);
        let headers = HeaderMap::new();
        let caller = Caller::from_headers(&headers);
        let waiting = limiter.admit(&upstream, &Method::GET, "/x", caller, Some(opened));
        let opening = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            open.send(1).unwrap();
        };
        let (answer, ()) = tokio::join!(waiting, opening);
        assert_eq!(answer.unwrap_err().code(), "circuit_open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_concurrency_slot_is_waited_for_within_the_allowed_wait() {
        let (limiter, upstream) =
            limiter_for("{ name: w, limit: 100, per: 10s }", "    max_concurrency: 1\n    max_queue_wait: 2s\n").await;
        let holder = admit(&limiter, &upstream).await.unwrap();
        let refused = admit(&limiter, &upstream).await.unwrap_err();
        assert_eq!(refused.code(), "concurrency_limited");
        drop(holder);
        assert!(admit(&limiter, &upstream).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_vendors_lower_limit_and_remaining_are_followed() {
        let (limiter, upstream) = limiter_for("{ name: w, limit: 10, per: 10s }", "    over_limit: reject\n").await;
        // The vendor says 4 per 10 s: 4 go, the fifth waits.
        limiter.vendor_limit(&upstream, Some(Duration::from_secs(10)), "rolling", 4);
        for _ in 0..4 {
            admit(&limiter, &upstream).await.unwrap();
        }
        assert_eq!(admit(&limiter, &upstream).await.unwrap_err().code(), "rate_limited");
        // Back to 10: six more fit in the same window.
        limiter.vendor_limit(&upstream, Some(Duration::from_secs(10)), "rolling", 10);
        for _ in 0..6 {
            admit(&limiter, &upstream).await.unwrap();
        }
        assert_eq!(admit(&limiter, &upstream).await.unwrap_err().code(), "rate_limited");
        // A new window: the vendor reports 1 left where sluice believes 10 are; it is adopted.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let first = admit(&limiter, &upstream).await.unwrap();
        limiter.adopt(&upstream, &scope_of(&first), 0, 1).await;
        admit(&limiter, &upstream).await.unwrap();
        assert_eq!(admit(&limiter, &upstream).await.unwrap_err().code(), "rate_limited");
    }
}
