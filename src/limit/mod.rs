//! Step 3 of the journey, LIMIT: the vendor sees no more than its quota, however many replicas
//! run, and as close to the full quota as demand allows.
//!
//! A request first takes a concurrency slot (when `max_concurrency` is set), then one decision
//! over all its upstream's quotas (see `gcra` for the maths): allowed now, allowed after a wait
//! (a reservation: the request sleeps, later ones queue behind it), or rejected with an honest
//! `Retry-After`. The slot is taken first so a request never waits for a slot after its quota
//! reservation, which would let sends bunch up beyond the window promise.
//!
//! Decisions go to the configured store: memory (one replica), or Redis shared by every replica.
//! When Redis fails or is slower than `store.timeout`, `on_failure` decides: `local` enforces each
//! quota at `limit / replicas` in memory, `allow` lets traffic through, `deny` answers 503; a
//! background probe brings shared mode back as soon as Redis answers.

pub mod gcra;
pub mod headers;
pub mod lease;
pub mod memory;
pub mod redis;
pub mod scope;
pub mod window;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{OnFailure, OverLimit, Quota, Store, StoreKind, Upstream, Window};
use crate::error::{ErrorKind, ProxyError};
use crate::telemetry::Metrics;
use gcra::{Decision, Micros, Rule};
use lease::Leases;
use memory::MemoryStore;
use redis::{LeaseRequest, RedisStore};
use scope::{QuotaKey, ScopeTable};

pub use crate::controls::MAX_WAIT_HEADER;

/// Who is asking, as far as quota scopes care.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub headers: &'a HeaderMap,
    pub peer: Option<SocketAddr>,
    /// The authenticated proxy client, when `clients:` are configured.
    pub client: Option<&'a str>,
    /// The caller's own wait limit (`Sluice-Max-Wait`, parsed and clamped by `controls`).
    pub max_wait: Option<Duration>,
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
    /// Where a vendor pause for this request's upstream and scope is recorded.
    pub pause_key: Option<String>,
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

/// (upstream, quota) names.
type QuotaId = (Arc<str>, Arc<str>);

/// What the limiter keeps per quota: its scope table (with each scope's bucket key, built once)
/// and its decision counters, so a decision formats no key and looks up no metric by label.
struct QuotaBook {
    table: ScopeTable,
    counters: Arc<DecisionCounters>,
}

impl QuotaBook {
    fn new(metrics: &Metrics, upstream: &Upstream, quota: &Quota) -> Self {
        let counter =
            |result: &str| metrics.quota_decisions.with_label_values(&[&*upstream.name, &*quota.name, result]);
        Self {
            table: ScopeTable::new(quota.max_keys),
            counters: Arc::new(DecisionCounters {
                allowed: counter("allowed"),
                queued: counter("queued"),
                rejected: counter("rejected"),
                queue_wait: metrics.quota_queue_wait.with_label_values(&[&upstream.name]),
            }),
        }
    }
}

/// `sluice_quota_decisions_total` of one quota, and its upstream's queue wait histogram.
struct DecisionCounters {
    allowed: prometheus::IntCounter,
    queued: prometheus::IntCounter,
    rejected: prometheus::IntCounter,
    queue_wait: prometheus::Histogram,
}

/// One request's buckets: a key per quota, its pause key, and each quota's counters.
struct BucketKeys {
    keys: Vec<String>,
    pause: String,
    counters: Vec<Arc<DecisionCounters>>,
}

/// A concurrency cap and the semaphore that enforces it.
type Slots = (usize, Arc<Semaphore>);

pub struct Limiter {
    /// Itself, for background tasks that must not keep it alive.
    me: std::sync::Weak<Limiter>,
    store: Store,
    redis: Option<Arc<RedisStore>>,
    degraded: AtomicBool,
    probing: AtomicBool,
    local: MemoryStore,
    /// Tokens taken ahead from Redis for busy scopes.
    leases: Leases,
    scopes: Mutex<HashMap<QuotaId, QuotaBook>>,
    slots: Mutex<HashMap<Arc<str>, Slots>>,
    /// Limits the vendor announced below the configured ones, by (upstream, quota).
    vendor_limits: Mutex<HashMap<QuotaId, u64>>,
    /// Throttles in a row per upstream, for exponential backoff when the vendor gives no time.
    throttle_streaks: Mutex<HashMap<Arc<str>, u32>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Limiter {
    /// Builds the limiter for `store`; with Redis, tries to connect for up to a second, then
    /// starts degraded and keeps trying in the background.
    pub async fn start(store: Store, metrics: Arc<Metrics>, stop: CancellationToken) -> Arc<Self> {
        let redis = (store.kind == StoreKind::Redis).then(|| RedisStore::new(store.clone()));
        let limiter = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            redis: redis.clone(),
            degraded: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            local: MemoryStore::default(),
            leases: Leases::new(store.lease_max, store.lease_ttl, metrics.lease_tokens.clone()),
            scopes: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            vendor_limits: Mutex::new(HashMap::new()),
            throttle_streaks: Mutex::new(HashMap::new()),
            metrics,
            stop,
            store,
        });
        if let Some(redis) = redis {
            let connect_wait = (limiter.store.timeout * 20).max(Duration::from_secs(1));
            match tokio::time::timeout(connect_wait, redis.connect()).await {
                Ok(Ok(())) => {
                    let _ = tokio::time::timeout(limiter.store.timeout * 4, redis.heartbeat()).await;
                    tracing::info!(replicas = redis.replicas(), "Connected to Redis; quotas are shared.");
                }
                Ok(Err(error)) => limiter.degrade(&error.to_string(), "connect"),
                Err(_) => limiter.degrade("connect timed out", "timeout"),
            }
            limiter.metrics.replicas.set(i64::try_from(redis.replicas()).unwrap_or(i64::MAX));
            limiter.spawn_heartbeat();
        }
        limiter
    }

    pub fn mode(&self) -> Mode {
        match (&self.redis, self.degraded.load(Ordering::Acquire)) {
            (None, _) => Mode::Memory,
            (Some(_), false) => Mode::Shared,
            (Some(_), true) => Mode::Degraded(self.store.on_failure),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn replicas(&self) -> u64 {
        self.redis.as_ref().map_or(1, |redis| redis.replicas())
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store.kind
    }

    /// Admits a request to `upstream` or says why not. Waits (queues) within the allowed time,
    /// and gives up at once with 503 if `breaker_opened` fires while it waits.
    pub async fn admit(
        &self,
        upstream: &Upstream,
        method: &Method,
        path: &str,
        caller: Caller<'_>,
        mut breaker_opened: Option<tokio::sync::watch::Receiver<u64>>,
    ) -> Result<Admission, ProxyError> {
        let limits = &upstream.limits;
        if !watches_vendor(upstream) && limits.quotas.is_empty() && limits.max_concurrency.is_none() {
            return Ok(Admission::default());
        }
        let started = Instant::now();
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
        // Whether the request waited at all (for a slot, its reservation or a vendor pause): the
        // common case did not, and needs no second look at the clock.
        let mut waited = false;

        if let Some(max) = limits.max_concurrency {
            let slots = self.slots(&upstream.name, max);
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    waited = true;
                    let acquired = wait_or_open(
                        tokio::time::timeout_at(deadline, slots.acquire_owned()),
                        &mut breaker_opened,
                        &name,
                    )
                    .await?;
                    match acquired {
                        Ok(Ok(permit)) => permit,
                        _ => {
                            return Err(ProxyError::new(
                                ErrorKind::ConcurrencyLimited { max, waited: started.elapsed() },
                                name,
                            ))
                        }
                    }
                }
            };
            admission.permit = Some(permit);
        }

        let cost = i64::try_from(limits.cost(method, path)).unwrap_or(i64::MAX);
        let BucketKeys { keys, pause: pause_key, counters } = self.bucket_keys(upstream, &caller);
        // A pause can be re-armed while we sleep through it; three rounds is plenty, and bounded.
        // Each hold is bounded by the deadline, so this loop is too; the count is a backstop.
        let mut admitted = false;
        for _ in 0..32 {
            let remaining_wait = if waited { deadline.saturating_duration_since(Instant::now()) } else { max_wait };
            let max_wait_us = i64::try_from(remaining_wait.as_micros()).unwrap_or(i64::MAX);
            match self.decide(upstream, &keys, &pause_key, cost, max_wait_us).await? {
                Some(Decision::Allowed { wait, standings }) => {
                    for counter in &counters {
                        if wait > 0 {
                            counter.queued.inc()
                        } else {
                            counter.allowed.inc()
                        }
                    }
                    admission.rate_limit = headers::rate_limit(&limits.quotas, &standings);
                    if wait <= 0 {
                        admitted = true;
                        break;
                    }
                    waited = true;
                    let sleep = tokio::time::sleep(Duration::from_micros(u64::try_from(wait).unwrap_or(0)));
                    wait_or_open(sleep, &mut breaker_opened, &name).await?;
                    // The vendor may have asked everyone to hold off while this request slept.
                    match self.pause_remaining(&pause_key).await {
                        Some(remaining) => {
                            self.hold_for_pause(upstream, remaining, &[], deadline, &mut breaker_opened).await?
                        }
                        None => {
                            admitted = true;
                            break;
                        }
                    }
                }
                Some(Decision::Rejected { retry_after, limiting, standings }) => {
                    // `counters` holds one entry per quota, so the limiting quota always has one.
                    if let Some(counter) = counters.get(limiting) {
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
                Some(Decision::Paused { remaining, standings }) => {
                    waited = true;
                    self.hold_for_pause(upstream, remaining, &standings, deadline, &mut breaker_opened).await?;
                }
                None => {
                    admitted = true;
                    break;
                }
            }
        }
        if !admitted {
            // The vendor kept re-arming its pause: answer honestly rather than send into it.
            let left = self.pause_remaining(&pause_key).await.unwrap_or(0);
            return Err(ProxyError::new(
                ErrorKind::RateLimited {
                    quota: "vendor".to_owned(),
                    retry_after: Duration::from_micros(u64::try_from(left.max(0)).unwrap_or(0)),
                    rate_limit: None,
                    policy: headers::rate_limit_policy(&limits.quotas),
                },
                name,
            ));
        }
        admission.pause_key = Some(pause_key);
        admission.queued = if waited { started.elapsed() } else { Duration::ZERO };
        match counters.first() {
            Some(counter) => counter.queue_wait.observe(admission.queued.as_secs_f64()),
            None => self
                .metrics
                .quota_queue_wait
                .with_label_values(&[&upstream.name])
                .observe(admission.queued.as_secs_f64()),
        }
        Ok(admission)
    }

    /// Holds a request through a vendor pause (then it is decided again), or refuses it when the
    /// pause outlasts its allowed wait. Released with positive-only jitter: never early, and not
    /// everyone at the reset instant; the bucket then paces them (see `decide.lua`).
    async fn hold_for_pause(
        &self,
        upstream: &Upstream,
        remaining: Micros,
        standings: &[gcra::Standing],
        deadline: Instant,
        breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
    ) -> Result<(), ProxyError> {
        let limits = &upstream.limits;
        let name = Some(upstream.name.clone());
        let remaining = Duration::from_micros(u64::try_from(remaining).unwrap_or(0));
        let spread = (remaining / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let hold = remaining + spread.mul_f64(rand::random::<f64>());
        if Instant::now() + hold > deadline {
            self.metrics.quota_decisions.with_label_values(&[&upstream.name, "vendor", "rejected"]).inc();
            return Err(ProxyError::new(
                ErrorKind::RateLimited {
                    quota: "vendor".to_owned(),
                    retry_after: remaining,
                    rate_limit: if standings.is_empty() {
                        None
                    } else {
                        headers::rate_limit(&limits.quotas, standings)
                    },
                    policy: headers::rate_limit_policy(&limits.quotas),
                },
                name,
            ));
        }
        self.metrics.quota_decisions.with_label_values(&[&upstream.name, "vendor", "queued"]).inc();
        wait_or_open(tokio::time::sleep(hold), breaker_opened, &name).await?;
        Ok(())
    }

    /// Time left on the pause at `key`: this replica's own record, else the shared one.
    async fn pause_remaining(&self, key: &str) -> Option<Micros> {
        let now = now_micros();
        if let Some(until) = self.local.paused_until(key, now) {
            return Some(until - now);
        }
        match (&self.redis, self.mode()) {
            (Some(redis), Mode::Shared) => tokio::time::timeout(self.store.timeout, redis.pause_remaining(key))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
            _ => None,
        }
    }

    /// Records a vendor pause for every replica (store) and this one (memory), never shortening one.
    pub async fn pause(&self, upstream: &Upstream, pause_key: &str, hold: Duration, reason: &str) {
        if hold.is_zero() {
            return;
        }
        let hold_us = i64::try_from(hold.as_micros()).unwrap_or(i64::MAX / 4);
        self.local.pause(pause_key, now_micros().saturating_add(hold_us));
        self.leases.clear();
        self.metrics.vendor_pauses.with_label_values(&[&upstream.name, reason]).inc();
        tracing::info!(upstream = &*upstream.name, reason, hold_ms = hold.as_millis() as u64, "Vendor pause recorded.");
        if let (Some(redis), Mode::Shared) = (&self.redis, self.mode()) {
            match tokio::time::timeout(self.store.timeout * 2, redis.pause(pause_key, hold_us)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => self.degrade(&error.to_string(), error.kind()),
                Err(_) => self.degrade("pause write timed out", "timeout"),
            }
        }
    }

    /// The next backoff for a throttle with no stated end: full jitter over an exponential cap.
    pub fn backoff(&self, upstream: &Upstream) -> Duration {
        let streak = {
            let mut streaks = self.throttle_streaks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let streak = streaks.entry(upstream.name.clone()).or_insert(0);
            *streak = streak.saturating_add(1);
            *streak
        };
        let (base, cap) = match &upstream.retry {
            Some(retry) => (retry.backoff, retry.max_backoff.max(retry.backoff)),
            None => (Duration::from_secs(1), Duration::from_secs(60)),
        };
        let ceiling = base.saturating_mul(1u32 << streak.min(16)).min(cap);
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// A success from the vendor ends a throttle streak.
    pub fn vendor_ok(&self, upstream: &Upstream) {
        let mut streaks = self.throttle_streaks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(streak) = streaks.get_mut(&upstream.name) {
            *streak = 0;
        }
    }

    /// The vendor said its limit for a window: follow it down, and back up to the configured one.
    pub fn vendor_limit(&self, upstream: &Upstream, window: Option<Duration>, name: &str, limit: u64) {
        let single = upstream.limits.quotas.len() == 1;
        let quota = upstream.limits.quotas.iter().find(|quota| {
            *quota.name == *name
                || window.is_some_and(|window| window == quota.per)
                || (single && window.is_none() && matches!(quota.window, Window::Rolling))
        });
        let Some(quota) = quota else { return };
        let key = (upstream.name.clone(), quota.name.clone());
        let mut limits = self.vendor_limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if limit > 0 && limit < quota.limit {
            if limits.insert(key, limit) != Some(limit) {
                tracing::info!(
                    upstream = &*upstream.name,
                    quota = &*quota.name,
                    configured = quota.limit,
                    vendor = limit,
                    "Vendor reports a lower limit; following it."
                );
                self.metrics
                    .effective_limit
                    .with_label_values(&[&upstream.name, &quota.name])
                    .set(i64::try_from(limit).unwrap_or(i64::MAX));
            }
        } else if limits.remove(&key).is_some() {
            tracing::info!(
                upstream = &*upstream.name,
                quota = &*quota.name,
                limit = quota.limit,
                "Vendor limit back at the configured one."
            );
            self.metrics
                .effective_limit
                .with_label_values(&[&upstream.name, &quota.name])
                .set(i64::try_from(quota.limit).unwrap_or(i64::MAX));
        }
    }

    /// Quotas as they apply now: configured limits, lowered where the vendor said so.
    fn effective_quotas<'u>(&self, upstream: &'u Upstream) -> std::borrow::Cow<'u, [Quota]> {
        let limits = self.vendor_limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if limits.is_empty()
            || !upstream.limits.quotas.iter().any(|q| limits.contains_key(&(upstream.name.clone(), q.name.clone())))
        {
            return std::borrow::Cow::Borrowed(&upstream.limits.quotas);
        }
        std::borrow::Cow::Owned(
            upstream
                .limits
                .quotas
                .iter()
                .map(|quota| match limits.get(&(upstream.name.clone(), quota.name.clone())) {
                    Some(&vendor) => {
                        let mut lowered = quota.clone();
                        lowered.burst = ((quota.burst as u128 * vendor as u128 / quota.limit.max(1) as u128) as u64)
                            .clamp(1, vendor);
                        lowered.limit = vendor;
                        lowered
                    }
                    None => quota.clone(),
                })
                .collect(),
        )
    }

    /// The bucket key of each quota for this request, recording scope use (and evictions), and
    /// the decision counters of each quota.
    fn bucket_keys(&self, upstream: &Upstream, caller: &Caller<'_>) -> BucketKeys {
        let (headers, peer, client) = (caller.headers, caller.peer, caller.client);
        // The vendor's pause applies to the scope of the first quota (the vendor account the
        // request is made for), or the whole upstream when quotas are unscoped.
        let pause_scope = upstream.limits.quotas.first().map_or_else(
            || QuotaKey("_all".to_owned()),
            |quota| scope::quota_key_for(&quota.scope, headers, peer, client),
        );
        // `!` is never in a quota name, so no quota's bucket can be read as a pause.
        let pause = format!("{}:{{{}}}:!pause:{}", self.store.key_prefix, upstream.name, pause_scope.0);
        let mut keys = Vec::with_capacity(upstream.limits.quotas.len());
        let mut counters = Vec::with_capacity(upstream.limits.quotas.len());
        let mut scopes = self.scopes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (index, quota) in upstream.limits.quotas.iter().enumerate() {
            let key = if index == 0 {
                pause_scope.clone()
            } else {
                scope::quota_key_for(&quota.scope, headers, peer, client)
            };
            let book = scopes
                .entry((upstream.name.clone(), quota.name.clone()))
                .or_insert_with(|| QuotaBook::new(&self.metrics, upstream, quota));
            book.table.set_capacity(quota.max_keys);
            let variant = u8::from(matches!(quota.window, Window::Fixed { .. }));
            let (bucket, evicted) = book.table.touch_with(&key, variant, || self.bucket_key(upstream, quota, &key));
            if let Some(evicted) = evicted {
                self.metrics.scope_evictions.with_label_values(&[&upstream.name, &quota.name]).inc();
                // Only an idle (full) bucket may go: forgetting a live one would hand that scope
                // a full bucket again (Redis keeps it until it expires). Live ones go in the sweep.
                let now = now_micros();
                self.local.forget_if_idle(&self.bucket_key(upstream, quota, &evicted), now);
                self.local.forget_if_idle(&format!("local:{}", self.bucket_key(upstream, quota, &evicted)), now);
            }
            keys.push(bucket);
            counters.push(book.counters.clone());
        }
        BucketKeys { keys, pause, counters }
    }

    fn bucket_key(&self, upstream: &Upstream, quota: &Quota, key: &QuotaKey) -> String {
        // The window kind is part of the key (a string in Redis for rolling, a hash for fixed), so a
        // reload that changes it starts a fresh bucket instead of failing with WRONGTYPE.
        format!("{}:{{{}}}:{}{}:{}", self.store.key_prefix, upstream.name, quota.name, window_tag(quota), key.0)
    }

    /// One decision in the current mode; `None` means "let it through unlimited" (`allow`).
    async fn decide(
        &self,
        upstream: &Upstream,
        keys: &[String],
        pause_key: &str,
        cost: i64,
        max_wait: Micros,
    ) -> Result<Option<Decision>, ProxyError> {
        let now = now_micros();
        let quotas = self.effective_quotas(upstream);
        // This replica's own record of a pause holds even if the store write failed.
        if let Some(until) = self.local.paused_until(pause_key, now) {
            let rules = rules(&quotas, cost, now, 1);
            let standings = rules.iter().map(|(rule, _)| gcra::standing(rule, &gcra::State::Empty, now)).collect();
            return Ok(Some(Decision::Paused { remaining: until - now, standings }));
        }
        if let (Some(redis), false) = (&self.redis, self.degraded.load(Ordering::Acquire)) {
            let rules = rules(&quotas, cost, now, 1);
            let started = Instant::now();
            let lifetime = self.leases.lifetime(tightest_margin(&quotas));
            let mut lease = LeaseRequest::default();
            if let Some(lifetime) = lifetime {
                if let Some(decision) = self.leases.take(keys, &rules, cost, started) {
                    return Ok(Some(decision));
                }
                lease.extra = self.leases.ask(keys, lifetime, started);
                lease.lasts = i64::try_from(lifetime.as_micros()).unwrap_or(i64::MAX);
            }
            let result = tokio::time::timeout(
                self.store.timeout,
                redis.decide_leasing(keys, pause_key, &rules, max_wait, 0, lease),
            )
            .await;
            self.metrics.store_latency.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(Ok((decision, charged))) => {
                    if let (Some(lifetime), Decision::Allowed { standings, .. }) = (lifetime, &decision) {
                        let grant = lease::Grant { upstream: &upstream.name, cost, charged, standings };
                        self.leases.granted(keys, &rules, grant, lifetime, started);
                    }
                    return Ok(Some(decision));
                }
                Ok(Err(error)) => self.degrade(&error.to_string(), error.kind()),
                Err(_) => self.degrade("decision timed out", "timeout"),
            }
        }
        match self.mode() {
            Mode::Memory => {
                let rules = rules(&quotas, cost, now, 1);
                Ok(Some(self.local.decide(keys, pause_key, &rules, now, max_wait)))
            }
            Mode::Shared | Mode::Degraded(OnFailure::Local) => {
                let rules = rules(&quotas, cost, now, self.replicas());
                let local_keys: Vec<String> = keys.iter().map(|key| format!("local:{key}")).collect();
                Ok(Some(self.local.decide(&local_keys, pause_key, &rules, now, max_wait)))
            }
            Mode::Degraded(OnFailure::Allow) => Ok(None),
            Mode::Degraded(OnFailure::Deny) => {
                Err(ProxyError::new(ErrorKind::StoreUnavailable, Some(upstream.name.clone())))
            }
        }
    }

    /// Switches to degraded mode (once) and starts the probe that switches back.
    fn degrade(&self, reason: &str, kind: &str) {
        self.metrics.store_errors.with_label_values(&[kind]).inc();
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.store_degraded.set(1);
            tracing::warn!(
                reason,
                on_failure = self.mode().as_str(),
                replicas = self.replicas(),
                "Redis unavailable; quotas are enforced by the on_failure policy until it is back."
            );
        }
        self.spawn_probe();
    }

    fn spawn_probe(&self) {
        let Some(redis) = self.redis.clone() else { return };
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        // The probe needs the limiter back to flip the mode; it holds only what it needs.
        let probe =
            Probe { redis, timeout: self.store.timeout.max(Duration::from_millis(100)), stop: self.stop.clone() };
        let this = self.me.clone();
        tokio::spawn(async move {
            probe.until_healthy().await;
            if let Some(limiter) = this.upgrade() {
                limiter.recover();
            }
        });
    }

    fn recover(&self) {
        self.local.forget_prefix("local:");
        self.degraded.store(false, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.metrics.store_degraded.set(0);
        tracing::info!(replicas = self.replicas(), "Redis is back; quotas are shared again.");
    }

    fn spawn_heartbeat(self: &Arc<Self>) {
        let Some(redis) = self.redis.clone() else { return };
        let weak = Arc::downgrade(self);
        let every = self.store.heartbeat;
        let timeout = self.store.timeout.max(Duration::from_millis(100)) * 4;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stop.cancelled() => {
                        let _ = tokio::time::timeout(timeout, redis.leave()).await;
                        return;
                    }
                }
                let Some(limiter) = weak.upgrade() else { return };
                if limiter.degraded.load(Ordering::Acquire) {
                    continue;
                }
                match tokio::time::timeout(timeout, redis.heartbeat()).await {
                    Ok(Ok(count)) => limiter.metrics.replicas.set(i64::try_from(count).unwrap_or(i64::MAX)),
                    Ok(Err(error)) => limiter.degrade(&error.to_string(), error.kind()),
                    Err(_) => limiter.degrade("heartbeat timed out", "timeout"),
                }
            }
        });
    }

    fn slots(&self, upstream: &Arc<str>, max: usize) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match slots.get_mut(upstream) {
            Some((size, semaphore)) => {
                // One semaphore per upstream, resized: holders of the old size count against the new.
                if max > *size {
                    semaphore.add_permits(max - *size);
                } else if max < *size {
                    let shrink = *size - max;
                    let rest = shrink - semaphore.forget_permits(shrink);
                    if rest > 0 {
                        let semaphore = semaphore.clone();
                        tokio::spawn(async move {
                            if let Ok(permits) =
                                semaphore.acquire_many_owned(u32::try_from(rest).unwrap_or(u32::MAX)).await
                            {
                                permits.forget();
                            }
                        });
                    }
                }
                *size = max;
                semaphore.clone()
            }
            None => {
                let semaphore = Arc::new(Semaphore::new(max));
                slots.insert(upstream.clone(), (max, semaphore.clone()));
                semaphore
            }
        }
    }

    /// `GET /quotas`: per upstream and quota, the busiest scopes' remaining tokens and next-free time.
    pub async fn snapshot(&self, upstreams: &[Arc<Upstream>]) -> Value {
        let now_local = now_micros();
        let now = match (&self.redis, self.mode()) {
            (Some(redis), Mode::Shared) => tokio::time::timeout(self.store.timeout * 4, redis.time())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(now_local),
            _ => now_local,
        };
        let mut out = Vec::new();
        for upstream in upstreams.iter().filter(|u| !u.limits.quotas.is_empty()) {
            let mut quotas = Vec::new();
            for quota in &upstream.limits.quotas {
                let busiest = {
                    let scopes = self.scopes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    scopes
                        .get(&(upstream.name.clone(), quota.name.clone()))
                        .map(|book| book.table.busiest(10))
                        .unwrap_or_default()
                };
                let keys: Vec<String> = busiest.iter().map(|(key, _)| self.bucket_key(upstream, quota, key)).collect();
                let states = self.states_for(&keys).await;
                let rule = rules(std::slice::from_ref(quota), 1, now, self.local_divisor())[0].0;
                let shared = matches!(self.mode(), Mode::Shared);
                let scopes: Vec<Value> = busiest
                    .iter()
                    .zip(states)
                    .zip(&keys)
                    .map(|(((key, hits), state), bucket)| {
                        let standing = gcra::standing(&rule, &state, now);
                        let next_free_in = next_free_in(&rule, &state, now);
                        // Tokens this replica leased and has not spent are still this scope's.
                        let leased = if shared { self.leases.held_for(bucket, Instant::now()) } else { 0 };
                        json!({
                            "scope": key.0,
                            "requests": hits,
                            "remaining": standing.remaining + leased,
                            "next_free_in_ms": next_free_in / 1000,
                            "full_in_ms": standing.reset_in.max(0) / 1000,
                        })
                    })
                    .collect();
                quotas.push(json!({
                    "name": &*quota.name,
                    "limit": quota.limit,
                    "per": humantime::format_duration(quota.per).to_string(),
                    "window": match quota.window { Window::Rolling => "rolling", Window::Fixed { .. } => "fixed" },
                    "burst": matches!(quota.window, Window::Rolling).then_some(quota.burst),
                    "scopes": scopes,
                }));
            }
            out.push(json!({"name": &*upstream.name, "quotas": quotas}));
        }
        json!({
            "store": {"kind": match self.store.kind { StoreKind::Memory => "memory", StoreKind::Redis => "redis" }, "mode": self.mode().as_str(), "replicas": self.replicas()},
            "upstreams": out,
        })
    }

    fn local_divisor(&self) -> u64 {
        match self.mode() {
            Mode::Degraded(OnFailure::Local) => self.replicas(),
            _ => 1,
        }
    }

    async fn states_for(&self, keys: &[String]) -> Vec<gcra::State> {
        match (&self.redis, self.mode()) {
            (Some(redis), Mode::Shared) => {
                match tokio::time::timeout(self.store.timeout * 4, redis.peek_states(keys)).await {
                    Ok(Ok(states)) => states,
                    _ => vec![gcra::State::Empty; keys.len()],
                }
            }
            (Some(_), _) => {
                let local: Vec<String> = keys.iter().map(|key| format!("local:{key}")).collect();
                self.local.peek(&local)
            }
            (None, _) => self.local.peek(keys),
        }
    }
}

/// Whether sluice acts on this upstream's responses (pauses): it has quotas or a header profile.
pub fn watches_vendor(upstream: &Upstream) -> bool {
    upstream.feedback.profile != crate::vendor::ProfileKind::None || !upstream.limits.quotas.is_empty()
}

/// Runs `wait` unless the breaker opens first, in which case the request is answered at once.
async fn wait_or_open<F: std::future::Future>(
    wait: F,
    breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
    upstream: &Option<Arc<str>>,
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

/// Microseconds until a cost-1 request would be taken without waiting.
fn next_free_in(rule: &Rule, state: &gcra::State, now: Micros) -> Micros {
    gcra::earliest(rule, state, 1, now).map_or(Micros::MAX, |at| at - now)
}

/// The algorithm's rules for `quotas`, each scaled to `1 / divisor` of its limit (local shares).
pub fn rules(quotas: &[Quota], cost: i64, now: Micros, divisor: u64) -> Vec<(Rule, i64)> {
    let divisor = divisor.max(1);
    quotas
        .iter()
        .map(|quota| {
            let per = i64::try_from(quota.per.as_micros()).unwrap_or(i64::MAX);
            // A local share still holds one request of this route (validation keeps cost <= burst).
            let cost = u64::try_from(cost).unwrap_or(1).max(1);
            let limit = (quota.limit / divisor).max(cost.min(quota.limit)).max(1);
            let rule = match &quota.window {
                Window::Rolling => {
                    let burst = (quota.burst / divisor).max(cost.min(quota.burst)).clamp(1, limit);
                    let margin = i64::try_from(quota.margin.as_micros()).unwrap_or(0);
                    Rule::rolling(limit, per, burst, margin)
                }
                Window::Fixed { resets_at } => Rule::Fixed {
                    limit: i64::try_from(limit).unwrap_or(i64::MAX),
                    bounds: window::bounds(per, resets_at.as_ref(), now),
                },
            };
            (rule, i64::try_from(cost).unwrap_or(i64::MAX))
        })
        .collect()
}

/// The part of a bucket key that says the window kind.
fn window_tag(quota: &Quota) -> &'static str {
    match quota.window {
        Window::Rolling => "",
        Window::Fixed { .. } => "@fixed",
    }
}

/// The smallest safety margin among rolling quotas (a lease may live half of it); `None` when
/// every quota is a fixed window.
fn tightest_margin(quotas: &[Quota]) -> Option<Duration> {
    quotas.iter().filter(|quota| matches!(quota.window, Window::Rolling)).map(|quota| quota.margin).min()
}

pub fn now_micros() -> Micros {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| i64::try_from(since.as_micros()).unwrap_or(0))
}

/// Polls Redis until it answers, then returns.
struct Probe {
    redis: Arc<RedisStore>,
    timeout: Duration,
    stop: CancellationToken,
}

impl Probe {
    async fn until_healthy(&self) {
        let mut pause = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return,
            }
            let healthy = async {
                self.redis.connect().await?;
                self.redis.ping().await?;
                self.redis.heartbeat().await.map(|_| ())
            };
            if let Ok(Ok(())) = tokio::time::timeout(self.timeout * 4, healthy).await {
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}
