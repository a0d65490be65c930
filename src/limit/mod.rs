//! LIMIT: the vendor sees no more than its quota, however many replicas run, and callers get all
//! of it.
//!
//! A request first takes a concurrency slot (when `max_concurrency` is set), then one decision
//! over all its upstream's quotas (see `decide` for the maths): allowed now, allowed after a wait
//! (a reservation: the request sleeps, later ones queue behind it), or rejected with an honest
//! `Retry-After`. The slot is taken first so a request never waits for a slot after its quota
//! reservation, which would let sends bunch up beyond the window promise.
//!
//! Decisions go to the configured store: memory (one replica), or Redis shared by every replica.
//! When Redis fails or is slower than `store.timeout`, `on_failure` decides: `local` enforces each
//! quota at `limit / replicas` in memory, `allow` lets traffic through, `deny` answers 503. A
//! background probe builds a new connection until Redis answers; before shared mode resumes, what
//! each local share admitted is folded into the shared record, so the first window after
//! recovery is not a double one.

pub mod decide;
pub mod gcra;
pub mod headers;
pub mod lease;
pub mod memory;
pub mod redis;
pub mod rolling;
pub mod scope;
pub mod window;

use std::collections::{HashMap, VecDeque};
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
use crate::vendor::MAX_PAUSE_SECS;
use decide::{Decision, Micros, Rule, Standing};
use lease::Leases;
use memory::MemoryStore;
use redis::{LeaseRequest, RedisStore};
use scope::{QuotaKey, ScopeTable};

pub use crate::controls::MAX_WAIT_HEADER;

/// The longest any vendor pause holds, on every path (a garbled header must not stop traffic
/// for years).
pub const MAX_PAUSE: Duration = Duration::from_secs(MAX_PAUSE_SECS);

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

/// (upstream, quota) names.
type QuotaId = (Arc<str>, Arc<str>);

/// The local-share namespace in the memory store: a replica's own buckets while Redis is away.
const LOCAL: &str = "local:";

/// What the limiter keeps per quota: its scope table (with each scope's bucket key, built once),
/// the buckets of scopes that left the table while still live, and its decision counters, so a
/// decision formats no key and looks up no metric by label.
struct QuotaBook {
    table: ScopeTable,
    /// Buckets of evicted scopes still in use: a quota holds at most `2 × max_keys` buckets,
    /// whatever values clients send.
    retiring: Retiring,
    counters: Arc<DecisionCounters>,
}

impl QuotaBook {
    fn new(metrics: &Metrics, upstream: &Upstream, quota: &Quota) -> Self {
        let counter =
            |result: &str| metrics.quota_decisions.with_label_values(&[&*upstream.name, &*quota.name, result]);
        Self {
            table: ScopeTable::new(quota.max_keys),
            retiring: Retiring::default(),
            counters: Arc::new(DecisionCounters {
                allowed: counter("allowed"),
                queued: counter("queued"),
                rejected: counter("rejected"),
                queue_wait: metrics.quota_queue_wait.with_label_values(&[&upstream.name]),
            }),
        }
    }
}

/// Buckets of scopes evicted from a quota's table while still live, oldest first. Redis keeps
/// such a bucket until it expires, and memory does the same (so both decide alike), but only
/// for `max_keys` of them: past that the oldest is forgotten, unless its scope is back in the
/// table.
#[derive(Default)]
struct Retiring {
    order: VecDeque<(u64, QuotaKey, String)>,
    /// The latest entry of each bucket in `order` (older ones are stale).
    latest: HashMap<String, u64>,
    next: u64,
}

impl Retiring {
    /// A scope is in the table again: its bucket is no longer retiring.
    fn returned(&mut self, bucket: &str) {
        if !self.latest.is_empty() {
            self.latest.remove(bucket);
        }
    }

    /// Records an evicted live bucket; returns the buckets to forget now.
    fn push(&mut self, scope: QuotaKey, bucket: String, capacity: usize, table: &ScopeTable) -> Vec<String> {
        self.next += 1;
        self.latest.insert(bucket.clone(), self.next);
        self.order.push_back((self.next, scope, bucket));
        let mut gone = Vec::new();
        while self.latest.len() > capacity.max(1) {
            let Some((at, scope, bucket)) = self.order.pop_front() else { break };
            if self.latest.get(&bucket) == Some(&at) {
                self.latest.remove(&bucket);
                if !table.contains(&scope) {
                    gone.push(bucket);
                }
            }
        }
        // Stale entries (re-evicted buckets) are dropped once they are most of the queue.
        if self.order.len() > 4 * capacity.max(1) {
            let latest = &self.latest;
            self.order.retain(|(at, _, bucket)| latest.get(bucket) == Some(at));
        }
        gone
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
    /// Local shares' rules by bucket key, so recovery can fold them into Redis.
    local_rules: Mutex<HashMap<String, Rule>>,
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
            local_rules: Mutex::new(HashMap::new()),
            metrics,
            stop,
            store,
        });
        if let Some(redis) = redis {
            let connect_wait = (limiter.store.timeout * 20).max(Duration::from_secs(1));
            match tokio::time::timeout(connect_wait, redis.connect()).await {
                Ok(Ok(())) => {
                    limiter.metrics.store_connections.inc();
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
        let mut standings = Vec::new();
        // A pause can be re-armed while we sleep through it; each hold is bounded by the
        // deadline, so this loop is too; the count is a backstop.
        let mut admitted = false;
        for _ in 0..32 {
            let remaining_wait = if waited { deadline.saturating_duration_since(Instant::now()) } else { max_wait };
            let max_wait_us = i64::try_from(remaining_wait.as_micros()).unwrap_or(i64::MAX);
            match self.decide(upstream, &keys, &pause_key, cost, max_wait_us).await? {
                Some(Decision::Allowed { wait, standings: after }) => {
                    for counter in &counters {
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
                    match self.pause_remaining(&pause_key).await {
                        Some((remaining, outage)) => {
                            let hold = Hold { remaining, outage, standings: &[] };
                            self.hold_for_pause(upstream, hold, deadline, &mut breaker_opened).await?
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
                Some(Decision::Paused { remaining, outage, standings }) => {
                    waited = true;
                    let hold = Hold { remaining, outage, standings: &standings };
                    self.hold_for_pause(upstream, hold, deadline, &mut breaker_opened).await?;
                }
                None => {
                    admitted = true;
                    break;
                }
            }
        }
        if !admitted {
            // The vendor kept re-arming its pause: answer honestly rather than send into it.
            let (left, outage) = self.pause_remaining(&pause_key).await.unwrap_or((0, false));
            let retry_after = Duration::from_micros(u64::try_from(left.max(0)).unwrap_or(0));
            return Err(pause_refusal(upstream, retry_after, outage, None));
        }
        admission.scope = Some(VendorScope { pause_key, bucket_keys: keys, standings });
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
    /// everyone at the reset instant.
    async fn hold_for_pause(
        &self,
        upstream: &Upstream,
        hold: Hold<'_>,
        deadline: Instant,
        breaker_opened: &mut Option<tokio::sync::watch::Receiver<u64>>,
    ) -> Result<(), ProxyError> {
        let name = Some(upstream.name.clone());
        let remaining = Duration::from_micros(u64::try_from(hold.remaining).unwrap_or(0)).min(MAX_PAUSE);
        let spread = (remaining / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let wait = remaining + spread.mul_f64(rand::random::<f64>());
        let now = Instant::now();
        if now.checked_add(wait).is_none_or(|until| until > deadline) {
            self.metrics.quota_decisions.with_label_values(&[&upstream.name, "vendor", "rejected"]).inc();
            let rate_limit = (!hold.standings.is_empty())
                .then(|| headers::rate_limit(&upstream.limits.quotas, hold.standings))
                .flatten();
            return Err(pause_refusal(upstream, remaining, hold.outage, rate_limit));
        }
        self.metrics.quota_decisions.with_label_values(&[&upstream.name, "vendor", "queued"]).inc();
        wait_or_open(tokio::time::sleep(wait), breaker_opened, &name).await?;
        Ok(())
    }

    /// Time left on the pause at `key` (and whether it is an outage): this replica's own record,
    /// else the shared one.
    async fn pause_remaining(&self, key: &str) -> Option<(Micros, bool)> {
        let now = now_micros();
        if let Some((until, outage)) = self.local.paused_until(key, now) {
            return Some((until - now, outage));
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

    /// Records a vendor pause for every replica (store) and this one (memory), never shortening
    /// one and never longer than [`MAX_PAUSE`]. `outage`: the vendor was failing (a 5xx), so
    /// callers refused meanwhile get 503, not 429.
    pub async fn pause(&self, upstream: &Upstream, pause_key: &str, hold: Duration, reason: &str, outage: bool) {
        let hold = hold.min(MAX_PAUSE);
        if hold.is_zero() {
            return;
        }
        let hold_us = i64::try_from(hold.as_micros()).unwrap_or(i64::MAX / 4);
        self.local.pause(pause_key, now_micros().saturating_add(hold_us), outage);
        self.leases.clear();
        self.metrics.vendor_pauses.with_label_values(&[&upstream.name, reason]).inc();
        tracing::info!(
            upstream = &*upstream.name,
            reason,
            outage,
            hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            "Vendor pause recorded."
        );
        if let (Some(redis), Mode::Shared) = (&self.redis, self.mode()) {
            let cap = i64::try_from(MAX_PAUSE.as_micros()).unwrap_or(i64::MAX);
            match tokio::time::timeout(self.store.timeout * 2, redis.pause(pause_key, hold_us, outage, cap)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => self.degrade(&error.to_string(), error.kind()),
                Err(_) => self.degrade("pause write timed out", "timeout"),
            }
        }
    }

    /// The vendor reports `remaining` left for quota `index` of this request's scope, fewer than
    /// sluice believed: every replica follows the vendor's figure for the rest of the window.
    pub async fn adopt(&self, upstream: &Upstream, scope: &VendorScope, index: usize, remaining: u64) {
        let quotas = self.effective_quotas(upstream);
        let (Some(quota), Some(key)) = (quotas.get(index), scope.bucket_keys.get(index)) else { return };
        let now = now_micros();
        let remaining = i64::try_from(remaining).unwrap_or(i64::MAX);
        let changed = match (&self.redis, self.mode()) {
            (Some(redis), Mode::Shared) => {
                let rule = rule_of(quota, 1, now, 1);
                match tokio::time::timeout(self.store.timeout * 2, redis.adopt(key, &rule, remaining, 0)).await {
                    Ok(Ok(changed)) => changed,
                    Ok(Err(error)) => {
                        self.degrade(&error.to_string(), error.kind());
                        false
                    }
                    Err(_) => {
                        self.degrade("adopt timed out", "timeout");
                        false
                    }
                }
            }
            (Some(_), Mode::Degraded(OnFailure::Local)) => {
                let rule = rule_of(quota, 1, now, self.replicas());
                self.local.adopt(&format!("{LOCAL}{key}"), &rule, remaining, now)
            }
            (None, _) => self.local.adopt(key, &rule_of(quota, 1, now, 1), remaining, now),
            _ => false,
        };
        if changed {
            self.leases.clear();
            self.metrics.vendor_adopted.with_label_values(&[&upstream.name, &quota.name]).inc();
            tracing::debug!(
                upstream = &*upstream.name,
                quota = &*quota.name,
                remaining,
                "Following the vendor's remaining quota."
            );
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

    /// The index of the quota a vendor window (by its name or length) speaks of, if any.
    pub fn quota_for_window(upstream: &Upstream, window: Option<Duration>, name: &str) -> Option<usize> {
        let quotas = &upstream.limits.quotas;
        let single = quotas.len() == 1;
        quotas.iter().position(|quota| {
            *quota.name == *name
                || window.is_some_and(|window| window == quota.per)
                || (single && window.is_none() && !matches!(quota.window, Window::Fixed { .. }))
        })
    }

    /// The vendor said its limit for a window: follow it down, and back up to the configured one.
    pub fn vendor_limit(&self, upstream: &Upstream, window: Option<Duration>, name: &str, limit: u64) {
        let Some(index) = Self::quota_for_window(upstream, window, name) else { return };
        let quota = &upstream.limits.quotas[index];
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
        let pause = self.pause_key(upstream, caller);
        let mut keys = Vec::with_capacity(upstream.limits.quotas.len());
        let mut counters = Vec::with_capacity(upstream.limits.quotas.len());
        let mut scopes = self.scopes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for quota in &upstream.limits.quotas {
            let key = scope::quota_key_for(&quota.scope, headers, peer, client);
            let book = scopes
                .entry((upstream.name.clone(), quota.name.clone()))
                .or_insert_with(|| QuotaBook::new(&self.metrics, upstream, quota));
            book.table.set_capacity(quota.max_keys);
            let variant = shape_variant(quota);
            let (bucket, evicted) = book.table.touch_with(&key, variant, || self.bucket_key(upstream, quota, &key));
            book.retiring.returned(&bucket);
            if let Some(evicted) = evicted {
                self.metrics.scope_evictions.with_label_values(&[&upstream.name, &quota.name]).inc();
                // An idle (expired) bucket goes at once. A live one is kept while it can still
                // matter (Redis keeps it until it expires, and memory decides alike), but only
                // up to `max_keys` of them: past that the oldest is forgotten.
                let now = now_micros();
                let evicted_bucket = self.bucket_key(upstream, quota, &evicted);
                let idle = self.local.forget_if_idle(&evicted_bucket, now)
                    & self.local.forget_if_idle(&format!("{LOCAL}{evicted_bucket}"), now);
                if !idle {
                    for gone in book.retiring.push(evicted, evicted_bucket, quota.max_keys, &book.table) {
                        self.local.forget(&gone);
                        self.local.forget(&format!("{LOCAL}{gone}"));
                    }
                }
            }
            keys.push(bucket);
            counters.push(book.counters.clone());
        }
        BucketKeys { keys, pause, counters }
    }

    /// Where a vendor pause for this request is kept: per upstream, per destination host on a
    /// wildcard upstream without a target, and per vendor account (the credentials the request
    /// carries), so one account's throttle holds neither another account nor another host, and
    /// no caller dodges it by changing a scope header.
    fn pause_key(&self, upstream: &Upstream, caller: &Caller<'_>) -> String {
        let credential_header = upstream.credentials.as_ref().map(|credentials| credentials.header.as_str());
        let account = scope::account_key(caller.headers, credential_header);
        let per_host = upstream.target.is_none()
            && upstream.hosts.iter().any(|host| matches!(host, crate::config::HostPattern::Subdomains(_)));
        // `!` is never in a quota name, so no quota's bucket can be read as a pause.
        match caller.host.filter(|_| per_host) {
            Some(host) => format!("{}:{{{}}}:!pause:{}:{account}", self.store.key_prefix, upstream.name, host),
            None => format!("{}:{{{}}}:!pause:{account}", self.store.key_prefix, upstream.name),
        }
    }

    fn bucket_key(&self, upstream: &Upstream, quota: &Quota, key: &QuotaKey) -> String {
        // The shape is part of the key (each has its own Redis type), so a reload that changes
        // it starts a fresh bucket instead of failing with WRONGTYPE.
        format!("{}:{{{}}}:{}{}:{}", self.store.key_prefix, upstream.name, quota.name, shape_tag(quota), key.0)
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
        if let Some((until, outage)) = self.local.paused_until(pause_key, now) {
            let rules = rules(&quotas, cost, now, 1);
            let empty = decide::State::Empty;
            let standings = rules.iter().map(|(rule, _)| decide::standing(rule, &empty, now)).collect();
            return Ok(Some(Decision::Paused { remaining: until - now, outage, standings }));
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
                let local_keys: Vec<String> = keys.iter().map(|key| format!("{LOCAL}{key}")).collect();
                self.remember_local_rules(&local_keys, &rules);
                Ok(Some(self.local.decide(&local_keys, pause_key, &rules, now, max_wait)))
            }
            Mode::Degraded(OnFailure::Allow) => Ok(None),
            Mode::Degraded(OnFailure::Deny) => {
                Err(ProxyError::new(ErrorKind::StoreUnavailable, Some(upstream.name.clone())))
            }
        }
    }

    /// Notes which rule each local-share bucket runs under, for folding it into Redis later.
    fn remember_local_rules(&self, local_keys: &[String], rules: &[(Rule, i64)]) {
        let mut known = self.local_rules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Bounded like the buckets themselves: the scope tables cap the keys a quota can have.
        if known.len() > 1_000_000 {
            known.clear();
        }
        for (key, (rule, _)) in local_keys.iter().zip(rules) {
            match known.get_mut(key) {
                Some(stored) => *stored = *rule,
                None => {
                    known.insert(key.clone(), *rule);
                }
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
                limiter.recover().await;
            }
        });
    }

    /// Redis answers again on a new connection: fold what the local shares admitted into the
    /// shared record, then decide in Redis again.
    async fn recover(&self) {
        self.metrics.store_connections.inc();
        if let Some(redis) = &self.redis {
            let drained = self.local.drain_prefix(LOCAL, now_micros());
            let rules: Vec<Option<Rule>> = {
                let mut known = self.local_rules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let rules = drained.iter().map(|(key, _)| known.get(&format!("{LOCAL}{key}")).copied()).collect();
                known.clear();
                rules
            };
            let (mut merged, mut tokens) = (0usize, 0i64);
            let budget = self.store.timeout.max(Duration::from_millis(100)) * 40;
            let folding = async {
                for ((key, state), rule) in drained.iter().zip(rules) {
                    let Some(rule) = rule else { continue };
                    if let Ok(Ok(added)) =
                        tokio::time::timeout(self.store.timeout * 4, redis.merge(key, &rule, state, 0)).await
                    {
                        merged += 1;
                        tokens += added;
                    }
                }
            };
            // Bounded: a huge local table must not keep the replica degraded for long.
            let _ = tokio::time::timeout(budget, folding).await;
            if merged > 0 {
                tracing::info!(buckets = merged, tokens, "Local shares folded into Redis.");
            }
        }
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
                let states = self.states_for(&keys, now).await;
                let rule = rule_of(quota, 1, now, self.local_divisor());
                let shared = matches!(self.mode(), Mode::Shared);
                let scopes: Vec<Value> = busiest
                    .iter()
                    .zip(states)
                    .zip(&keys)
                    .map(|(((key, hits), state), bucket)| {
                        let standing = decide::standing(&rule, &state, now);
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
                    "window": match quota.window { Window::Rolling | Window::Smooth => "rolling", Window::Fixed { .. } => "fixed" },
                    "shape": match quota.window { Window::Rolling => Some("burst"), Window::Smooth => Some("smooth"), Window::Fixed { .. } => None },
                    "burst": matches!(quota.window, Window::Smooth).then_some(quota.burst),
                    "scopes": scopes,
                }));
            }
            out.push(json!({"name": &*upstream.name, "quotas": quotas}));
        }
        json!({
            "store": {
                "kind": match self.store.kind { StoreKind::Memory => "memory", StoreKind::Redis => "redis" },
                "mode": self.mode().as_str(),
                "replicas": self.replicas(),
                // Buckets this process holds (the memory store, or local shares while degraded).
                "buckets_in_memory": self.local.len(),
            },
            "upstreams": out,
        })
    }

    fn local_divisor(&self) -> u64 {
        match self.mode() {
            Mode::Degraded(OnFailure::Local) => self.replicas(),
            _ => 1,
        }
    }

    async fn states_for(&self, keys: &[String], now: Micros) -> Vec<decide::State> {
        match (&self.redis, self.mode()) {
            (Some(redis), Mode::Shared) => {
                match tokio::time::timeout(self.store.timeout * 4, redis.peek_states(keys)).await {
                    Ok(Ok(states)) => states,
                    _ => vec![decide::State::Empty; keys.len()],
                }
            }
            (Some(_), _) => {
                let local: Vec<String> = keys.iter().map(|key| format!("{LOCAL}{key}")).collect();
                self.local.peek(&local, now)
            }
            (None, _) => self.local.peek(keys, now),
        }
    }
}

/// A vendor pause a request ran into.
struct Hold<'a> {
    remaining: Micros,
    outage: bool,
    standings: &'a [Standing],
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

/// The part of a bucket key that says the quota's shape (each has its own Redis type). Paced
/// buckets keep the untagged keys of earlier releases.
fn shape_tag(quota: &Quota) -> &'static str {
    match quota.window {
        Window::Rolling if quota.limit <= rolling::EXACT_LOG_MAX => "@roll",
        Window::Rolling => "@rollb",
        Window::Smooth => "",
        Window::Fixed { .. } => "@fixed",
    }
}

/// The shape as a small number, for the scope table to notice a reload that changed it.
fn shape_variant(quota: &Quota) -> u8 {
    match shape_tag(quota) {
        "@roll" => 1,
        "@rollb" => 2,
        "@fixed" => 3,
        _ => 0,
    }
}

/// The smallest safety margin among rolling quotas (a lease may live half of it); `None` when
/// every quota is a fixed window.
fn tightest_margin(quotas: &[Quota]) -> Option<Duration> {
    quotas.iter().filter(|quota| !matches!(quota.window, Window::Fixed { .. })).map(|quota| quota.margin).min()
}

pub fn now_micros() -> Micros {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| i64::try_from(since.as_micros()).unwrap_or(0))
}

/// Builds a new Redis connection until one answers, then returns.
struct Probe {
    redis: Arc<RedisStore>,
    timeout: Duration,
    stop: CancellationToken,
}

impl Probe {
    async fn until_healthy(&self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            // Jittered (50-150% of the backoff), so replicas that lost Redis together do not
            // all reconnect in step.
            let pause = backoff.mul_f64(0.5 + rand::random::<f64>());
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return,
            }
            // Never the old connection again: it may be silent rather than closed.
            self.redis.drop_connection();
            let healthy = async {
                self.redis.reconnect().await?;
                self.redis.ping().await?;
                self.redis.heartbeat().await.map(|_| ())
            };
            if let Ok(Ok(())) = tokio::time::timeout(self.timeout * 4, healthy).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}
