//! BREAKER: when the vendor is failing, answer fast and honestly instead
//! of piling up connections and retries against it.
//!
//! One breaker per upstream (per replica), kept across reloads while its settings are unchanged.
//! A wildcard upstream without a target (`*.zendesk.com`, one vendor account per host) keeps one
//! breaker per destination host instead, at most `breaker.max_hosts` of them, so one tenant's
//! failing account never fails the others. The gate stands *before* the limiter, so a refused
//! request spends no quota token; requests already queued in the limiter watch the breaker and
//! are answered the moment it opens. Outcomes are recorded per upstream attempt; failures the
//! client caused (see `ProxyError::is_vendor_failure`) are not the vendor's and are not counted.
//!
//! The lowest of the journey's rooms: it reads only leaves, `config` and `request`, so `retry`
//! and `limit`, which both watch it, can name it.

pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{BreakerSettings, Upstream};
use crate::telemetry::Metrics;
use state::BreakerState;
pub use state::{Admit, Outcome, Phase, Transition};

pub struct Breaker {
    upstream: Arc<str>,
    /// The destination host, for a per-host breaker.
    host: Option<Arc<str>>,
    state: Mutex<BreakerState>,
    /// Increments each time the breaker opens; queued requests wait on it.
    opened: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// A per-host breaker's share of its upstream's state gauge.
    tally: Option<Arc<PhaseTally>>,
}

/// How many of an upstream's per-host breakers are open and half-open: its state gauge shows
/// the worst of them (host names never become label values).
#[derive(Debug, Default)]
struct PhaseTally {
    open: AtomicI64,
    half_open: AtomicI64,
}

impl PhaseTally {
    fn count(&self, phase: Phase, delta: i64) {
        match phase {
            Phase::Open => self.open.fetch_add(delta, Ordering::AcqRel),
            Phase::HalfOpen => self.half_open.fetch_add(delta, Ordering::AcqRel),
            Phase::Closed => 0,
        };
    }

    fn gauge(&self) -> i64 {
        if self.open.load(Ordering::Acquire) > 0 {
            Phase::Open.gauge()
        } else if self.half_open.load(Ordering::Acquire) > 0 {
            Phase::HalfOpen.gauge()
        } else {
            Phase::Closed.gauge()
        }
    }
}

impl Breaker {
    fn new(upstream: Arc<str>, settings: BreakerSettings, metrics: Arc<Metrics>) -> Self {
        metrics.breaker_state.with_label_values(&[&upstream]).set(0);
        Self {
            upstream,
            host: None,
            state: Mutex::new(BreakerState::new(settings, Instant::now())),
            opened: watch::channel(0).0,
            metrics,
            tally: None,
        }
    }

    fn for_host(
        upstream: Arc<str>,
        host: Arc<str>,
        settings: BreakerSettings,
        metrics: Arc<Metrics>,
        tally: Arc<PhaseTally>,
    ) -> Self {
        Self {
            upstream,
            host: Some(host),
            state: Mutex::new(BreakerState::new(settings, Instant::now())),
            opened: watch::channel(0).0,
            metrics,
            tally: Some(tally),
        }
    }

    /// A per-host breaker leaving the table: it no longer counts in its upstream's gauge.
    fn forget(&self) {
        if let Some(tally) = &self.tally {
            tally.count(self.phase(), -1);
            self.metrics.breaker_state.with_label_values(&[&self.upstream]).set(tally.gauge());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        crate::kit::lock(&self.state)
    }

    /// Whether a request may go now. `Probe` admissions must be followed by `record` (or dropped
    /// via the returned [`ProbeGuard`], which frees the slot).
    pub fn admit(self: &Arc<Self>) -> Result<Option<ProbeGuard>, Duration> {
        let (admit, transition) = self.lock().admit(Instant::now());
        if let Some(transition) = transition {
            self.announce(&transition);
        }
        match admit {
            Admit::Pass => Ok(None),
            Admit::Probe => Ok(Some(ProbeGuard { breaker: self.clone(), armed: true })),
            Admit::Refuse { retry_after } => {
                self.metrics.breaker_short_circuits.with_label_values(&[&self.upstream]).inc();
                Err(retry_after)
            }
        }
    }

    /// Records how an upstream attempt ended.
    pub fn record(&self, outcome: Outcome, probe: Option<&mut ProbeGuard>) {
        let is_probe = probe.is_some();
        if let Some(guard) = probe {
            guard.armed = false;
        }
        let transition = self.lock().record(outcome, is_probe, Instant::now());
        if let Some(transition) = transition {
            self.announce(&transition);
        }
    }

    /// Whether `status` counts as a failure for this breaker.
    pub fn is_failure_status(&self, status: u16) -> bool {
        self.lock().settings().failure_statuses.contains(&status)
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase()
    }

    pub fn open_remaining(&self) -> Duration {
        self.lock().open_remaining(Instant::now())
    }

    /// Resolves when the breaker opens (after this call).
    pub fn opened(&self) -> watch::Receiver<u64> {
        self.opened.subscribe()
    }

    fn announce(&self, transition: &Transition) {
        let upstream = &*self.upstream;
        let gauge = match &self.tally {
            Some(tally) => {
                tally.count(transition.from, -1);
                tally.count(transition.to, 1);
                tally.gauge()
            }
            None => transition.to.gauge(),
        };
        self.metrics.breaker_state.with_label_values(&[upstream]).set(gauge);
        let host = self.host.as_deref().unwrap_or("");
        self.metrics
            .breaker_transitions
            .with_label_values(&[upstream, transition.from.as_str(), transition.to.as_str()])
            .inc();
        if transition.to == Phase::Open {
            self.opened.send_modify(|count| *count += 1);
            tracing::warn!(target: "sluice::audit", event = "breaker_transition", upstream, host, from = transition.from.as_str(), to = transition.to.as_str(), cause = %transition.cause, "Circuit breaker opened.");
        } else {
            tracing::info!(target: "sluice::audit", event = "breaker_transition", upstream, host, from = transition.from.as_str(), to = transition.to.as_str(), cause = %transition.cause, "Circuit breaker changed state.");
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let state = self.lock();
        let mut snapshot = serde_json::json!({
            "upstream": &*self.upstream,
            "state": state.phase().as_str(),
            "open_remaining_ms": state.open_remaining(Instant::now()).as_millis() as u64,
        });
        if let Some(host) = &self.host {
            snapshot["host"] = serde_json::Value::String(host.to_string());
        }
        snapshot
    }
}

/// A half-open probe slot; dropped without a recorded outcome, it frees the slot.
pub struct ProbeGuard {
    breaker: Arc<Breaker>,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.lock().release_probe();
        }
    }
}

/// All breakers, by upstream name (and destination host, see the module doc).
#[derive(Default)]
pub struct Breakers {
    by_upstream: Mutex<HashMap<Arc<str>, UpstreamBreakers>>,
}

enum UpstreamBreakers {
    One(Arc<Breaker>),
    PerHost(HostBreakers),
}

impl UpstreamBreakers {
    fn settings(&self) -> BreakerSettings {
        match self {
            UpstreamBreakers::One(breaker) => breaker.lock().settings().clone(),
            UpstreamBreakers::PerHost(hosts) => hosts.settings.clone(),
        }
    }

    fn is_per_host(&self) -> bool {
        matches!(self, UpstreamBreakers::PerHost(_))
    }

    fn forget_all(&self) {
        if let UpstreamBreakers::PerHost(hosts) = self {
            hosts.hosts.values().for_each(|(breaker, _)| breaker.forget());
        }
    }
}

/// One upstream's per-host breakers, the least recently used forgotten first past `max_hosts`
/// (a closed one before an open one, so a flood of new names cannot reopen a failing host).
struct HostBreakers {
    settings: BreakerSettings,
    tally: Arc<PhaseTally>,
    hosts: HashMap<Arc<str>, (Arc<Breaker>, u64)>,
    by_use: BTreeMap<u64, Arc<str>>,
    tick: u64,
}

impl HostBreakers {
    fn new(settings: BreakerSettings) -> Self {
        Self { settings, tally: Arc::default(), hosts: HashMap::new(), by_use: BTreeMap::new(), tick: 0 }
    }

    fn get(&mut self, upstream: &Arc<str>, host: &str, metrics: &Arc<Metrics>) -> Arc<Breaker> {
        self.tick += 1;
        let tick = self.tick;
        if let Some((breaker, used)) = self.hosts.get_mut(host) {
            self.by_use.remove(used);
            *used = tick;
            let breaker = breaker.clone();
            self.by_use.insert(tick, breaker.host.clone().unwrap_or_else(|| Arc::from(host)));
            return breaker;
        }
        if self.hosts.len() >= self.settings.max_hosts.max(1) {
            self.evict_one();
        }
        let host: Arc<str> = Arc::from(host);
        let breaker = Arc::new(Breaker::for_host(
            upstream.clone(),
            host.clone(),
            self.settings.clone(),
            metrics.clone(),
            self.tally.clone(),
        ));
        self.hosts.insert(host.clone(), (breaker.clone(), tick));
        self.by_use.insert(tick, host);
        breaker
    }

    fn evict_one(&mut self) {
        let closed = self
            .by_use
            .iter()
            .find(|(_, host)| self.hosts.get(*host).is_some_and(|(breaker, _)| breaker.phase() == Phase::Closed))
            .map(|(tick, _)| *tick);
        let Some(tick) = closed.or_else(|| self.by_use.keys().next().copied()) else { return };
        if let Some(host) = self.by_use.remove(&tick) {
            if let Some((breaker, _)) = self.hosts.remove(&host) {
                breaker.forget();
            }
        }
    }
}

/// Whether `upstream` keeps a breaker per destination host: it serves a wildcard and has no
/// target, so each host the client names may be a different vendor account.
pub fn per_host(upstream: &Upstream) -> bool {
    upstream.target.is_none()
        && upstream.hosts.iter().any(|host| matches!(host, crate::config::HostPattern::Subdomains(_)))
}

impl Breakers {
    /// The breaker of `upstream`, creating or replacing it when its settings changed (a reload
    /// with unchanged settings keeps the state).
    pub fn for_upstream(&self, upstream: &Upstream, metrics: &Arc<Metrics>) -> Option<Arc<Breaker>> {
        self.for_request(upstream, None, metrics)
    }

    /// The breaker a request to `host` passes: its upstream's, or for a [`per_host`] upstream
    /// that host's own.
    pub fn for_request(&self, upstream: &Upstream, host: Option<&str>, metrics: &Arc<Metrics>) -> Option<Arc<Breaker>> {
        let settings = upstream.breaker.as_ref()?;
        let per_host = per_host(upstream);
        let mut map = crate::kit::lock(&self.by_upstream);
        let fits =
            map.get(&upstream.name).is_some_and(|kept| kept.settings() == *settings && kept.is_per_host() == per_host);
        if !fits {
            let fresh = if per_host {
                metrics.breaker_state.with_label_values(&[&upstream.name]).set(0);
                UpstreamBreakers::PerHost(HostBreakers::new(settings.clone()))
            } else {
                UpstreamBreakers::One(Arc::new(Breaker::new(upstream.name.clone(), settings.clone(), metrics.clone())))
            };
            if let Some(old) = map.insert(upstream.name.clone(), fresh) {
                old.forget_all();
            }
        }
        match map.get_mut(&upstream.name)? {
            UpstreamBreakers::One(breaker) => Some(breaker.clone()),
            UpstreamBreakers::PerHost(hosts) => host.map(|host| hosts.get(&upstream.name, host, metrics)),
        }
    }

    /// After a reload: forgets breakers whose upstream is gone (and their gauge), replaces those
    /// whose settings changed.
    pub fn retain(&self, upstreams: &[Arc<Upstream>], metrics: &Arc<Metrics>) {
        {
            let mut map = crate::kit::lock(&self.by_upstream);
            map.retain(|name, _| {
                let keep = upstreams.iter().any(|upstream| upstream.name == *name && upstream.breaker.is_some());
                if !keep {
                    let _ = metrics.breaker_state.remove_label_values(&[name]);
                }
                keep
            });
        }
        // Breakers whose settings changed are replaced now, not at their upstream's next request,
        // so `/breakers` and the state gauge never show a breaker that no longer applies.
        for upstream in upstreams {
            self.for_request(upstream, None, metrics);
        }
    }

    /// The phase of the breaker a request to `host` on `upstream` passes, if there is one.
    pub fn phase(&self, upstream: &str, host: Option<&str>) -> Option<Phase> {
        let map = crate::kit::lock(&self.by_upstream);
        match map.get(upstream)? {
            UpstreamBreakers::One(breaker) => Some(breaker.phase()),
            UpstreamBreakers::PerHost(hosts) => {
                host.and_then(|host| hosts.hosts.get(host)).map(|(breaker, _)| breaker.phase())
            }
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let map = crate::kit::lock(&self.by_upstream);
        let mut all: Vec<_> = map
            .values()
            .flat_map(|kept| match kept {
                UpstreamBreakers::One(breaker) => vec![breaker.snapshot()],
                UpstreamBreakers::PerHost(hosts) => {
                    hosts.hosts.values().map(|(breaker, _)| breaker.snapshot()).collect()
                }
            })
            .collect();
        all.sort_by(|a, b| {
            (a["upstream"].as_str(), a["host"].as_str()).cmp(&(b["upstream"].as_str(), b["host"].as_str()))
        });
        serde_json::json!({ "breakers": all })
    }
}

// === BreakerLayer ===

/// The breaker an admitted request passed, for the limiter to watch while it queues, and the
/// attempt's one outcome to record. The Limit layer records it before it releases the request's
/// concurrency slot: a request waiting for that slot must see the breaker the failure opened,
/// never the slot first.
#[derive(Clone)]
pub struct BreakerHandle {
    pub breaker: Arc<Breaker>,
    attempt: Arc<Attempt>,
}

/// One admitted attempt: its half-open probe guard, and whether its outcome is recorded.
struct Attempt {
    probe: Mutex<Option<ProbeGuard>>,
    recorded: std::sync::atomic::AtomicBool,
}

impl BreakerHandle {
    pub fn opened(&self) -> watch::Receiver<u64> {
        self.breaker.opened()
    }

    /// Records the attempt's outcome once (later calls do nothing). Rate limiting (429, sluice's
    /// or the vendor's) is not a failure, and neither is anything the client caused.
    pub fn record(&self, result: &Result<http::Response<crate::body::ProxyBody>, crate::error::ProxyError>) {
        let outcome = match result {
            Ok(response) if self.breaker.is_failure_status(response.status().as_u16()) => Some(Outcome::Failure),
            Ok(_) => Some(Outcome::Success),
            Err(error) if error.is_vendor_failure() => Some(Outcome::Failure),
            // Refused before reaching the vendor, or the client's own fault (a stalled upload,
            // a host it named that does not exist): nothing about the vendor's health.
            Err(_) => None,
        };
        let Some(outcome) = outcome else { return };
        if self.attempt.recorded.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let mut probe = crate::kit::lock(&self.attempt.probe);
        self.breaker.record(outcome, probe.as_mut());
    }
}

#[derive(Clone)]
pub struct BreakerLayer {
    pub breakers: Arc<Breakers>,
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for BreakerLayer {
    type Service = BreakerGate<S>;
    fn layer(&self, inner: S) -> BreakerGate<S> {
        BreakerGate { inner, layer: self.clone() }
    }
}

/// Refuses while open (503, no quota spent), admits probes while half-open, and records each
/// upstream attempt's outcome. Rate limiting (429, sluice's or the vendor's) is not a failure,
/// and neither is anything the client caused.
#[derive(Clone)]
pub struct BreakerGate<S> {
    inner: S,
    layer: BreakerLayer,
}

use crate::kit::BoxFuture;

impl<S> tower::Service<http::Request<crate::body::ProxyBody>> for BreakerGate<S>
where
    S: tower::Service<
            http::Request<crate::body::ProxyBody>,
            Response = http::Response<crate::body::ProxyBody>,
            Error = crate::error::ProxyError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<crate::body::ProxyBody>;
    type Error = crate::error::ProxyError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<crate::body::ProxyBody>) -> Self::Future {
        use crate::error::{ErrorKind, ProxyError};
        let breaker = request.extensions().get::<crate::request::Routed>().and_then(|routed| {
            let host = routed.uri.host().map(str::to_ascii_lowercase);
            self.layer.breakers.for_request(&routed.upstream, host.as_deref(), &self.layer.metrics)
        });
        let Some(breaker) = breaker else { return Box::pin(self.inner.call(request)) };
        let probe = match breaker.admit() {
            Ok(probe) => probe,
            Err(retry_after) => {
                let upstream = Some(breaker.upstream.clone());
                return Box::pin(std::future::ready(Err(ProxyError::new(
                    ErrorKind::BreakerOpen { retry_after },
                    upstream,
                ))));
            }
        };
        let attempt =
            Arc::new(Attempt { probe: Mutex::new(probe), recorded: std::sync::atomic::AtomicBool::new(false) });
        let handle = BreakerHandle { breaker, attempt };
        request.extensions_mut().insert(handle.clone());
        let response: BoxFuture<_> = Box::pin(self.inner.call(request));
        Box::pin(async move {
            let result = response.await;
            // Usually recorded already, below (by the Limit layer); this covers the rest.
            handle.record(&result);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn wildcard(max_hosts: usize) -> Arc<Upstream> {
        let yaml = format!(
            "upstreams:\n  - name: zendesk\n    hosts: ['*.zendesk.com']\n    breaker: {{ consecutive_failures: 2, max_hosts: {max_hosts} }}\n"
        );
        Config::from_yaml(&yaml).unwrap().live.upstreams[0].clone()
    }

    fn gauge(metrics: &Metrics) -> i64 {
        metrics.breaker_state.with_label_values(&["zendesk"]).get()
    }

    #[tokio::test]
    async fn one_hosts_failures_leave_the_others_closed() {
        let metrics = Arc::new(Metrics::new());
        let breakers = Breakers::default();
        let upstream = wildcard(16);
        let failing = breakers.for_request(&upstream, Some("acme.zendesk.com"), &metrics).unwrap();
        for _ in 0..2 {
            assert!(failing.admit().is_ok());
            failing.record(Outcome::Failure, None);
        }
        assert!(failing.admit().is_err(), "acme's breaker is open");
        assert_eq!(breakers.phase("zendesk", Some("acme.zendesk.com")), Some(Phase::Open));
        let other = breakers.for_request(&upstream, Some("beta.zendesk.com"), &metrics).unwrap();
        assert!(other.admit().is_ok(), "beta still passes");
        assert_eq!(breakers.phase("zendesk", Some("beta.zendesk.com")), Some(Phase::Closed));
        assert_eq!(gauge(&metrics), 2, "the upstream's gauge shows its worst host");
        // The same breaker comes back for the same host.
        assert!(Arc::ptr_eq(&failing, &breakers.for_request(&upstream, Some("acme.zendesk.com"), &metrics).unwrap()));
        assert_eq!(breakers.snapshot()["breakers"].as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn per_host_breakers_are_bounded_and_keep_open_ones() {
        let metrics = Arc::new(Metrics::new());
        let breakers = Breakers::default();
        let upstream = wildcard(2);
        let failing = breakers.for_request(&upstream, Some("acme.zendesk.com"), &metrics).unwrap();
        for _ in 0..2 {
            failing.record(Outcome::Failure, None);
        }
        // A flood of new names evicts closed breakers, never the open one while a closed one is left.
        for at in 0..50 {
            breakers.for_request(&upstream, Some(&format!("r{at}.zendesk.com")), &metrics);
        }
        let snapshot = breakers.snapshot();
        let hosts: Vec<&str> =
            snapshot["breakers"].as_array().unwrap().iter().map(|b| b["host"].as_str().unwrap()).collect();
        assert_eq!(hosts, ["acme.zendesk.com", "r49.zendesk.com"], "{snapshot}");
        assert_eq!(gauge(&metrics), 2);
        // A reload with other settings starts afresh (and the gauge with it).
        let changed = wildcard(3);
        breakers.retain(std::slice::from_ref(&changed), &metrics);
        assert!(breakers.snapshot()["breakers"].as_array().unwrap().is_empty());
        assert_eq!(gauge(&metrics), 0);
    }
}
