//! A shared store and what to do when it is away: `store.kind: redis` with its `on_failure`.
//!
//! While the shared store answers (mode `shared`), decisions go to it, busy scopes through
//! leases. When a call fails or is slower than `store.timeout`, the replica degrades (logged once,
//! `sluice_store_degraded` 1) and `on_failure` decides: `local` enforces each quota at
//! `limit / replicas` in this process, `allow` lets traffic through, `deny` answers 503. A probe
//! then builds a *new* connection for every attempt (the old one may be silent rather than
//! closed), with jittered backoff, until one answers; before shared mode resumes, what the local
//! shares admitted is folded into the shared record, so the first window after recovery is not a
//! double one. This replica's own record of a vendor pause holds whatever the store does.
//!
//! Generic over the [`SharedStore`], so the state machine is tested on paused time with a store
//! that answers or fails as the test says; the real one is Redis, tested in `tests/`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::decide::{Decision, Micros, Rule, State};
use super::keys::{self, LOCAL};
use super::lease::{self, Leases};
use super::memory::MemoryStore;
use super::store::{Ask, LeaseRequest, SharedStore};
use super::Mode;
use crate::config::{OnFailure, Quota, Store, Window};
use crate::error::{ErrorKind, ProxyError};
use crate::telemetry::Metrics;

pub struct Fallback<S> {
    /// Itself, for background tasks that must not keep it alive.
    me: Weak<Fallback<S>>,
    shared: Arc<S>,
    /// Local shares (under `local:`) and this replica's own record of vendor pauses.
    local: MemoryStore,
    /// Tokens taken ahead from the shared store for busy scopes.
    leases: Leases,
    settings: Store,
    degraded: AtomicBool,
    probing: AtomicBool,
    /// Local shares' rules, and the shared rule of the same quota, by bucket key: recovery folds
    /// them into the shared record.
    local_rules: Mutex<HashMap<String, (Rule, Rule)>>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
}

impl<S: SharedStore + 'static> Fallback<S> {
    /// Connects (for up to `max(20 × timeout, 1 s)`), starting degraded if that fails, and starts
    /// the heartbeat.
    pub async fn start(
        settings: Store,
        shared: Arc<S>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let fallback = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            shared,
            local: MemoryStore::default(),
            leases: Leases::new(settings.lease_max, settings.lease_ttl, metrics.lease_tokens.clone()),
            degraded: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            local_rules: Mutex::new(HashMap::new()),
            metrics,
            clock,
            stop,
            settings,
        });
        let connect_wait = (fallback.settings.timeout * 20).max(Duration::from_secs(1));
        match tokio::time::timeout(connect_wait, fallback.shared.reconnect()).await {
            Ok(Ok(())) => {
                fallback.metrics.store_connections.inc();
                let _ = tokio::time::timeout(fallback.settings.timeout * 4, fallback.shared.heartbeat()).await;
                tracing::info!(replicas = fallback.shared.replicas(), "Connected to Redis; quotas are shared.");
            }
            Ok(Err(error)) => fallback.degrade(&error.to_string(), "connect"),
            Err(_) => fallback.degrade("connect timed out", "timeout"),
        }
        fallback.metrics.replicas.set(i64::try_from(fallback.shared.replicas()).unwrap_or(i64::MAX));
        fallback.spawn_heartbeat();
        fallback
    }

    pub fn mode(&self) -> Mode {
        if self.degraded.load(Ordering::Acquire) {
            Mode::Degraded(self.settings.on_failure)
        } else {
            Mode::Shared
        }
    }

    pub fn replicas(&self) -> u64 {
        self.shared.replicas()
    }

    /// The divisor of local shares: the live replicas while degraded to `local`, else 1.
    pub fn local_divisor(&self) -> u64 {
        match self.mode() {
            Mode::Degraded(OnFailure::Local) => self.replicas(),
            _ => 1,
        }
    }

    /// The memory store of local shares and pause records (for evictions and `/quotas`).
    pub fn local(&self) -> &MemoryStore {
        &self.local
    }

    /// One decision in the current mode; `None` means "let it through unlimited" (`allow`).
    pub async fn decide(
        &self,
        upstream: &str,
        quotas: &[Quota],
        keys: &[String],
        pause_key: &str,
        cost: i64,
        max_wait: Micros,
    ) -> Result<Option<Decision>, ProxyError> {
        let now = self.clock.wall();
        // This replica's own record of a pause holds even if the store write failed.
        if let Some((until, outage)) = self.local.paused_until(pause_key, now) {
            let rules = super::rules(quotas, cost, now, 1);
            let empty = State::Empty;
            let standings = rules.iter().map(|(rule, _)| super::decide::standing(rule, &empty, now)).collect();
            return Ok(Some(Decision::Paused { remaining: until - now, outage, standings }));
        }
        if !self.degraded.load(Ordering::Acquire) {
            let rules = super::rules(quotas, cost, now, 1);
            let started = self.clock.now();
            let lifetime = self.leases.lifetime(tightest_margin(quotas));
            let mut lease = LeaseRequest::default();
            if let Some(lifetime) = lifetime {
                if let Some(decision) = self.leases.take(keys, &rules, cost, started) {
                    return Ok(Some(decision));
                }
                lease.extra = self.leases.ask(keys, lifetime, started);
                lease.lasts = i64::try_from(lifetime.as_micros()).unwrap_or(i64::MAX);
            }
            let ask = Ask { keys, pause_key, rules: &rules, max_wait, now, lease };
            let result = tokio::time::timeout(self.settings.timeout, self.shared.decide(ask)).await;
            self.metrics.store_latency.observe(self.clock.now().saturating_duration_since(started).as_secs_f64());
            match result {
                Ok(Ok((decision, charged))) => {
                    if let (Some(lifetime), Decision::Allowed { standings, .. }) = (lifetime, &decision) {
                        let upstream = Arc::from(upstream);
                        let grant = lease::Grant { upstream: &upstream, cost, charged, standings };
                        self.leases.granted(keys, &rules, grant, lifetime, started);
                    }
                    return Ok(Some(decision));
                }
                Ok(Err(error)) => self.degrade(&error.to_string(), error.kind()),
                Err(_) => self.degrade("decision timed out", "timeout"),
            }
        }
        match self.settings.on_failure {
            OnFailure::Local => {
                let rules = super::rules(quotas, cost, now, self.replicas());
                let local_keys: Vec<String> = keys.iter().map(|key| keys::local(key)).collect();
                self.remember_local_rules(&local_keys, &rules, &super::rules(quotas, cost, now, 1));
                Ok(Some(self.local.decide(&local_keys, pause_key, &rules, now, max_wait)))
            }
            OnFailure::Allow => Ok(None),
            OnFailure::Deny => Err(ProxyError::new(ErrorKind::StoreUnavailable, Some(Arc::from(upstream)))),
        }
    }

    /// Time left on the pause at `key` (and whether it is an outage): this replica's own record,
    /// else the shared one.
    pub async fn pause_remaining(&self, key: &str) -> Option<(Micros, bool)> {
        let now = self.clock.wall();
        if let Some((until, outage)) = self.local.paused_until(key, now) {
            return Some((until - now, outage));
        }
        if self.mode() != Mode::Shared {
            return None;
        }
        tokio::time::timeout(self.settings.timeout, self.shared.pause_remaining(key, now))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }

    /// Records a pause here and, while shared, for every replica. Drops this replica's leases.
    pub async fn pause(&self, key: &str, hold: Micros, outage: bool) {
        let now = self.clock.wall();
        self.local.pause(key, now.saturating_add(hold), outage);
        self.leases.clear();
        if self.mode() == Mode::Shared {
            match tokio::time::timeout(self.settings.timeout * 2, self.shared.pause(key, hold, outage, now)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => self.degrade(&error.to_string(), error.kind()),
                Err(_) => self.degrade("pause write timed out", "timeout"),
            }
        }
    }

    /// Lowers what `key` reports as left to the vendor's `remaining`, in the shared record
    /// (every replica follows) or this replica's local share. Whether it changed.
    pub async fn adopt(&self, key: &str, quota: &Quota, remaining: i64) -> bool {
        let now = self.clock.wall();
        let changed = match self.mode() {
            Mode::Shared => {
                let rule = super::rule_of(quota, 1, now, 1);
                match tokio::time::timeout(self.settings.timeout * 2, self.shared.adopt(key, &rule, remaining, now))
                    .await
                {
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
            Mode::Degraded(OnFailure::Local) => {
                let rule = super::rule_of(quota, 1, now, self.replicas());
                self.local.adopt(&keys::local(key), &rule, remaining, now)
            }
            _ => false,
        };
        if changed {
            self.leases.clear();
        }
        changed
    }

    /// States of `keys` for `/quotas`, and the time they are read at: the shared record while
    /// shared, the local shares otherwise.
    pub async fn states(&self, keys: &[String]) -> (Vec<State>, Micros) {
        let local_now = self.clock.wall();
        if self.mode() == Mode::Shared {
            let timeout = self.settings.timeout * 4;
            let now = tokio::time::timeout(timeout, self.shared.time()).await.ok().and_then(Result::ok);
            let states =
                tokio::time::timeout(timeout, self.shared.peek(keys, local_now)).await.ok().and_then(Result::ok);
            if let Some(states) = states {
                return (states, now.unwrap_or(local_now));
            }
            return (vec![State::Empty; keys.len()], local_now);
        }
        let local: Vec<String> = keys.iter().map(|key| keys::local(key)).collect();
        (self.local.peek(&local, local_now), local_now)
    }

    /// Unspent leased tokens that include the bucket `key` (they are still the scope's).
    pub fn leased(&self, key: &str) -> i64 {
        if self.mode() == Mode::Shared {
            self.leases.held_for(key, self.clock.now())
        } else {
            0
        }
    }

    /// Notes which rules each local-share bucket runs under (its own and the shared one).
    fn remember_local_rules(&self, local_keys: &[String], local: &[(Rule, i64)], shared: &[(Rule, i64)]) {
        let mut known = crate::kit::lock(&self.local_rules);
        // Bounded like the buckets themselves (the scope tables cap what a quota can have).
        if known.len() > 1_000_000 {
            known.clear();
        }
        for ((key, (local, _)), (shared, _)) in local_keys.iter().zip(local).zip(shared) {
            match known.get_mut(key) {
                Some(stored) => *stored = (*local, *shared),
                None => {
                    known.insert(key.clone(), (*local, *shared));
                }
            }
        }
    }

    /// Switches to degraded mode (once) and starts the probe that switches back.
    pub fn degrade(&self, reason: &str, kind: &str) {
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
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.me.clone();
        tokio::spawn(async move {
            let Some(fallback) = this.upgrade() else { return };
            if fallback.until_healthy().await {
                fallback.recover().await;
            }
        });
    }

    /// Builds a new connection until one answers; false if the process is stopping first.
    async fn until_healthy(&self) -> bool {
        let timeout = self.settings.timeout.max(Duration::from_millis(100)) * 4;
        let mut backoff = Duration::from_millis(100);
        // Bounded by the process's life: it stops with the stop token.
        loop {
            // Jittered (50-150% of the backoff), so replicas that lost Redis together do not all
            // reconnect in step.
            let pause = crate::kit::spread(backoff);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return false,
            }
            // Never the old connection again: it may be silent rather than closed.
            self.shared.drop_connection();
            let healthy = async {
                self.shared.reconnect().await?;
                self.shared.ping().await?;
                self.shared.heartbeat().await.map(|_| ())
            };
            if let Ok(Ok(())) = tokio::time::timeout(timeout, healthy).await {
                return true;
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// The shared store answers again on a new connection: fold what the local shares admitted
    /// into the shared record, then decide there again.
    async fn recover(&self) {
        self.metrics.store_connections.inc();
        let now = self.clock.wall();
        let drained = self.local.drain_prefix(LOCAL, now);
        let rules: Vec<Option<(Rule, Rule)>> = {
            let mut known = crate::kit::lock(&self.local_rules);
            let rules = drained.iter().map(|(key, _)| known.get(&keys::local(key)).copied()).collect();
            known.clear();
            rules
        };
        let (mut merged, mut tokens) = (0usize, 0i64);
        let budget = self.settings.timeout.max(Duration::from_millis(100)) * 40;
        let folding = async {
            for ((key, state), rules) in drained.iter().zip(rules) {
                let Some((local, shared)) = rules else { continue };
                let state = in_shared_terms(state, &local, &shared, now);
                if let Ok(Ok(added)) =
                    tokio::time::timeout(self.settings.timeout * 4, self.shared.merge(key, &shared, &state)).await
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
        self.degraded.store(false, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.metrics.store_degraded.set(0);
        tracing::info!(replicas = self.replicas(), "Redis is back; quotas are shared again.");
    }

    fn spawn_heartbeat(&self) {
        let weak = self.me.clone();
        let every = self.settings.heartbeat;
        let timeout = self.settings.timeout.max(Duration::from_millis(100)) * 4;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stop.cancelled() => {
                        if let Some(fallback) = weak.upgrade() {
                            let _ = tokio::time::timeout(timeout, fallback.shared.leave()).await;
                        }
                        return;
                    }
                }
                let Some(fallback) = weak.upgrade() else { return };
                if fallback.degraded.load(Ordering::Acquire) {
                    continue;
                }
                match tokio::time::timeout(timeout, fallback.shared.heartbeat()).await {
                    Ok(Ok(count)) => fallback.metrics.replicas.set(i64::try_from(count).unwrap_or(i64::MAX)),
                    Ok(Err(error)) => fallback.degrade(&error.to_string(), error.kind()),
                    Err(_) => fallback.degrade("heartbeat timed out", "timeout"),
                }
            }
        });
    }
}

/// A local share's state as the shared record counts it: admissions and window counts are the
/// same tokens; a paced bucket's debt is re-expressed at the shared (faster) rate.
fn in_shared_terms(state: &State, local: &Rule, shared: &Rule, now: Micros) -> State {
    match (state, local, shared) {
        (State::Tat(tat), Rule::Smooth(local), Rule::Smooth(shared)) => {
            let debt = (tat - now).max(0);
            let interval = local.interval.max(1);
            let tokens = (debt + interval - 1) / interval;
            State::Tat(now + tokens * shared.interval)
        }
        _ => state.clone(),
    }
}

/// The smallest safety margin among rolling quotas (a lease may live half of it); `None` when
/// every quota is a fixed window.
fn tightest_margin(quotas: &[Quota]) -> Option<Duration> {
    quotas.iter().filter(|quota| !matches!(quota.window, Window::Fixed { .. })).map(|quota| quota.margin).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::clock::TokioClock;
    use crate::limit::store::{QuotaStore, StoreError};
    use std::sync::atomic::AtomicU64;

    /// A shared store that keeps its record in memory and answers, or fails, as the test says:
    /// the fallback's state machine on paused time. (Redis itself is tested in `tests/`.)
    #[derive(Default)]
    struct Switchable {
        record: MemoryStore,
        down: AtomicBool,
        connects: AtomicU64,
        clock_us: AtomicU64,
    }

    impl Switchable {
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::NotConnected)
            } else {
                Ok(())
            }
        }
    }

    impl QuotaStore for Switchable {
        async fn decide(&self, ask: Ask<'_>) -> Result<(Decision, i64), StoreError> {
            self.check()?;
            self.clock_us.store(u64::try_from(ask.now).unwrap_or(0), Ordering::SeqCst);
            QuotaStore::decide(&self.record, ask).await
        }
        async fn pause(&self, key: &str, hold: Micros, outage: bool, now: Micros) -> Result<(), StoreError> {
            self.check()?;
            QuotaStore::pause(&self.record, key, hold, outage, now).await
        }
        async fn pause_remaining(&self, key: &str, now: Micros) -> Result<Option<(Micros, bool)>, StoreError> {
            self.check()?;
            QuotaStore::pause_remaining(&self.record, key, now).await
        }
        async fn adopt(&self, key: &str, rule: &Rule, remaining: i64, now: Micros) -> Result<bool, StoreError> {
            self.check()?;
            QuotaStore::adopt(&self.record, key, rule, remaining, now).await
        }
        async fn peek(&self, keys: &[String], now: Micros) -> Result<Vec<State>, StoreError> {
            self.check()?;
            QuotaStore::peek(&self.record, keys, now).await
        }
    }

    impl SharedStore for Switchable {
        async fn reconnect(&self) -> Result<(), StoreError> {
            self.check()?;
            self.connects.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn drop_connection(&self) {}
        async fn ping(&self) -> Result<(), StoreError> {
            self.check()
        }
        async fn heartbeat(&self) -> Result<u64, StoreError> {
            self.check().map(|()| 2)
        }
        async fn leave(&self) {}
        fn replicas(&self) -> u64 {
            2
        }
        async fn time(&self) -> Result<Micros, StoreError> {
            self.check().map(|()| i64::try_from(self.clock_us.load(Ordering::SeqCst)).unwrap_or(0))
        }
        async fn merge(&self, key: &str, rule: &Rule, state: &State) -> Result<i64, StoreError> {
            self.check()?;
            // Replays the local share's admissions into the record, as merge.lua does.
            let State::Admissions(record) = state else { return Ok(0) };
            let mut added = 0;
            for (at, tokens) in &record.entries {
                let rules = [(*rule, *tokens)];
                if let Decision::Allowed { .. } = self.record.decide(&[key.to_owned()], "none", &rules, *at, i64::MAX) {
                    added += tokens;
                }
            }
            Ok(added)
        }
    }

    fn quota(yaml_quota: &str, on_failure: &str) -> (Store, Quota) {
        let yaml = format!(
            "store: {{ kind: redis, url: 'redis://127.0.0.1:1', on_failure: {on_failure}, timeout: 50ms, heartbeat: 1s, lease_max: 0 }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: 'http://127.0.0.1:1'
    quotas: [{yaml_quota}]
"
        );
        let config = crate::config::Config::from_yaml(&yaml).unwrap();
        (config.process.store.resolve().unwrap(), config.live.upstreams[0].limits.quotas[0].clone())
    }

    async fn started(store: Store, shared: Arc<Switchable>) -> Arc<Fallback<Switchable>> {
        let metrics = Arc::new(Metrics::new());
        Fallback::start(
            store,
            shared,
            metrics,
            Arc::new(TokioClock::at(1_900_000_000_000_000)),
            CancellationToken::new(),
        )
        .await
    }

    fn allowed(decision: &Option<Decision>) -> bool {
        matches!(decision, Some(Decision::Allowed { wait: 0, .. }))
    }

    #[tokio::test(start_paused = true)]
    async fn degrades_to_local_shares_and_recovers_with_their_admissions_folded_in() {
        let (settings, quota) = quota("{ name: window, limit: 10, per: 60s }", "local");
        let shared = Arc::new(Switchable::default());
        let fallback = started(settings, shared.clone()).await;
        assert_eq!(fallback.mode(), Mode::Shared);
        let keys = vec!["sluice:{hubspot}:window@roll:_all".to_owned()];
        let quotas = std::slice::from_ref(&quota);
        for _ in 0..2 {
            assert!(allowed(&fallback.decide("hubspot", quotas, &keys, "p", 1, 0).await.unwrap()));
        }
        // The store goes away: the next decision fails and the replica degrades to its share of
        // 10 / 2 replicas = 5.
        shared.down.store(true, Ordering::SeqCst);
        let mut local = 0;
        for _ in 0..8 {
            if allowed(&fallback.decide("hubspot", quotas, &keys, "p", 1, 0).await.unwrap()) {
                local += 1;
            }
        }
        assert_eq!(fallback.mode(), Mode::Degraded(OnFailure::Local));
        assert_eq!(local, 5, "the local share");
        // It comes back; the probe (jittered, at most ~1.5 s a try) reconnects on a new connection.
        shared.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(fallback.mode(), Mode::Shared);
        assert!(shared.connects.load(Ordering::SeqCst) >= 2, "a new connection was built");
        // 2 shared + 5 local admissions are in the shared window now: 3 left, not 8.
        let mut after = 0;
        for _ in 0..6 {
            if allowed(&fallback.decide("hubspot", quotas, &keys, "p", 1, 0).await.unwrap()) {
                after += 1;
            }
        }
        assert_eq!(after, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn deny_and_allow_while_degraded() {
        for (on_failure, expect_error) in [("deny", true), ("allow", false)] {
            let (settings, quota) = quota("{ name: window, limit: 1, per: 60s }", on_failure);
            let shared = Arc::new(Switchable::default());
            shared.down.store(true, Ordering::SeqCst);
            let fallback = started(settings, shared.clone()).await;
            assert_eq!(fallback.mode(), Mode::Degraded(if expect_error { OnFailure::Deny } else { OnFailure::Allow }));
            let keys = vec!["k".to_owned()];
            let decision = fallback.decide("hubspot", std::slice::from_ref(&quota), &keys, "p", 1, 0).await;
            match decision {
                Err(error) => {
                    assert!(expect_error);
                    assert_eq!(error.code(), "store_unavailable");
                }
                Ok(None) => assert!(!expect_error, "allow lets it through unlimited"),
                Ok(other) => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn this_replicas_pause_holds_while_the_store_is_away() {
        let (settings, quota) = quota("{ name: window, limit: 100, per: 60s }", "local");
        let shared = Arc::new(Switchable::default());
        let fallback = started(settings, shared.clone()).await;
        shared.down.store(true, Ordering::SeqCst);
        fallback.pause("p", 5_000_000, true).await;
        assert_eq!(fallback.mode(), Mode::Degraded(OnFailure::Local), "the failed write degraded");
        let keys = vec!["k".to_owned()];
        match fallback.decide("hubspot", std::slice::from_ref(&quota), &keys, "p", 1, 0).await.unwrap() {
            Some(Decision::Paused { remaining, outage, .. }) => assert!(remaining > 4_000_000 && outage),
            other => panic!("{other:?}"),
        }
        assert_eq!(fallback.pause_remaining("p").await.map(|(_, outage)| outage), Some(true));
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(fallback.pause_remaining("p").await.is_none());
    }
}
