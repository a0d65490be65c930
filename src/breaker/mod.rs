//! Step 4 of the journey, BREAKER: when the vendor is failing, answer fast and honestly instead
//! of piling up connections and retries against it.
//!
//! One breaker per upstream (per replica), kept across reloads while its settings are unchanged.
//! The gate stands *before* the limiter, so a refused request spends no quota token; requests
//! already queued in the limiter watch the breaker and are answered the moment it opens. Outcomes
//! are recorded per upstream attempt, next to the client call (see `proxy::stack::Feedback`).

pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{BreakerFile, Upstream};
use crate::telemetry::Metrics;
use state::BreakerState;
pub use state::{Admit, Outcome, Phase, Transition};

pub struct Breaker {
    upstream: Arc<str>,
    state: Mutex<BreakerState>,
    /// Increments each time the breaker opens; queued requests wait on it.
    opened: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Breaker {
    fn new(upstream: Arc<str>, settings: BreakerFile, metrics: Arc<Metrics>) -> Self {
        metrics.breaker_state.with_label_values(&[&upstream]).set(0);
        Self {
            upstream,
            state: Mutex::new(BreakerState::new(settings, Instant::now())),
            opened: watch::channel(0).0,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        self.metrics.breaker_state.with_label_values(&[upstream]).set(transition.to.gauge());
        self.metrics
            .breaker_transitions
            .with_label_values(&[upstream, transition.from.as_str(), transition.to.as_str()])
            .inc();
        if transition.to == Phase::Open {
            self.opened.send_modify(|count| *count += 1);
            tracing::warn!(target: "sluice::audit", event = "breaker_transition", upstream, from = transition.from.as_str(), to = transition.to.as_str(), cause = %transition.cause, "Circuit breaker opened.");
        } else {
            tracing::info!(target: "sluice::audit", event = "breaker_transition", upstream, from = transition.from.as_str(), to = transition.to.as_str(), cause = %transition.cause, "Circuit breaker changed state.");
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let state = self.lock();
        serde_json::json!({
            "upstream": &*self.upstream,
            "state": state.phase().as_str(),
            "open_remaining_ms": state.open_remaining(Instant::now()).as_millis() as u64,
        })
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

/// All breakers, by upstream name.
#[derive(Default)]
pub struct Breakers {
    by_upstream: Mutex<HashMap<Arc<str>, Arc<Breaker>>>,
}

impl Breakers {
    /// The breaker of `upstream`, creating or replacing it when its settings changed (a reload
    /// with unchanged settings keeps the state).
    pub fn for_upstream(&self, upstream: &Upstream, metrics: &Arc<Metrics>) -> Option<Arc<Breaker>> {
        let settings = upstream.breaker.as_ref()?;
        let mut map = self.by_upstream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = map.get(&upstream.name) {
            if existing.lock().settings() == settings {
                return Some(existing.clone());
            }
        }
        let breaker = Arc::new(Breaker::new(upstream.name.clone(), settings.clone(), metrics.clone()));
        map.insert(upstream.name.clone(), breaker.clone());
        Some(breaker)
    }

    /// After a reload: forgets breakers whose upstream is gone (and their gauge), replaces those
    /// whose settings changed.
    pub fn retain(&self, upstreams: &[Arc<Upstream>], metrics: &Arc<Metrics>) {
        {
            let mut map = self.by_upstream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
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
            self.for_upstream(upstream, metrics);
        }
    }

    /// The phase of `upstream`'s breaker, if it has one.
    pub fn phase(&self, upstream: &str) -> Option<Phase> {
        let map = self.by_upstream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(upstream).map(|breaker| breaker.phase())
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let map = self.by_upstream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut all: Vec<_> = map.values().map(|breaker| breaker.snapshot()).collect();
        all.sort_by(|a, b| a["upstream"].as_str().cmp(&b["upstream"].as_str()));
        serde_json::json!({ "breakers": all })
    }
}

// === BreakerLayer ===

/// The breaker an admitted request passed, for the limiter to watch while it queues.
#[derive(Clone)]
pub struct BreakerHandle(pub Arc<Breaker>);

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
/// upstream attempt's outcome. Rate limiting (429, sluice's or the vendor's) is not a failure.
#[derive(Clone)]
pub struct BreakerGate<S> {
    inner: S,
    layer: BreakerLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

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
        let breaker = request
            .extensions()
            .get::<crate::proxy::route::Routed>()
            .and_then(|routed| self.layer.breakers.for_upstream(&routed.upstream, &self.layer.metrics));
        let Some(breaker) = breaker else { return Box::pin(self.inner.call(request)) };
        let mut probe = match breaker.admit() {
            Ok(probe) => probe,
            Err(retry_after) => {
                let upstream = Some(breaker.upstream.clone());
                return Box::pin(std::future::ready(Err(ProxyError::new(
                    ErrorKind::BreakerOpen { retry_after },
                    upstream,
                ))));
            }
        };
        request.extensions_mut().insert(BreakerHandle(breaker.clone()));
        let response: BoxFuture<_> = Box::pin(self.inner.call(request));
        Box::pin(async move {
            let result = response.await;
            let outcome = match &result {
                Ok(response) if breaker.is_failure_status(response.status().as_u16()) => Some(Outcome::Failure),
                Ok(_) => Some(Outcome::Success),
                Err(error) => match *error.kind {
                    ErrorKind::Unreachable { .. }
                    | ErrorKind::ConnectTimeout { .. }
                    | ErrorKind::ResponseTimeout { .. }
                    | ErrorKind::Tls { .. }
                    | ErrorKind::UpstreamProtocol { .. } => Some(Outcome::Failure),
                    // Refused before reaching the vendor: says nothing about its health.
                    _ => None,
                },
            };
            if let Some(outcome) = outcome {
                breaker.record(outcome, probe.as_mut());
            }
            result
        })
    }
}
