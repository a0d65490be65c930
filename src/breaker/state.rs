//! The circuit breaker's state machine: pure, time passed in, no I/O, table-tested.
//!
//! Closed counts outcomes in a rolling window (ten buckets) and in a run of consecutive
//! failures; it opens when the run reaches `consecutive_failures`, or when the window holds
//! `min_requests` and the failure ratio reaches `failure_ratio`. Open refuses everything until
//! `open_for` has passed; then half-open lets `half_open_requests` probes through: a success
//! closes, a failure re-opens with `open_for` doubled, up to `max_open_for`.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed,
    HalfOpen,
    Open,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::HalfOpen => "half_open",
            Phase::Open => "open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Phase::Closed => 0,
            Phase::HalfOpen => 1,
            Phase::Open => 2,
        }
    }
}

/// What the breaker says to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Pass,
    /// Pass as one of the half-open probes.
    Probe,
    /// Refuse; the breaker may let requests through again after this long.
    Refuse {
        retry_after: Duration,
    },
}

/// How one upstream call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// A change of phase, with its cause, for the log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    pub cause: String,
}

#[derive(Debug)]
pub struct BreakerState {
    settings: BreakerSettings,
    phase: Phase,
    buckets: [(u64, u64); BUCKETS],
    /// Index of the bucket `bucket_started` belongs to.
    current: usize,
    bucket_started: Instant,
    consecutive: u64,
    open_until: Instant,
    open_for: Duration,
    probes_in_flight: u64,
}

const BUCKETS: usize = 10;

impl BreakerState {
    pub fn new(settings: BreakerSettings, now: Instant) -> Self {
        let open_for = settings.open_for;
        Self {
            settings,
            phase: Phase::Closed,
            buckets: [(0, 0); BUCKETS],
            current: 0,
            bucket_started: now,
            consecutive: 0,
            open_until: now,
            open_for,
            probes_in_flight: 0,
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Time left open (zero unless open).
    pub fn open_remaining(&self, now: Instant) -> Duration {
        match self.phase {
            Phase::Open => self.open_until.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    pub fn admit(&mut self, now: Instant) -> (Admit, Option<Transition>) {
        let mut transition = None;
        if self.phase == Phase::Open && now >= self.open_until {
            transition = Some(self.enter(Phase::HalfOpen, "open_for elapsed".into()));
            self.probes_in_flight = 0;
        }
        let admit = match self.phase {
            Phase::Closed => Admit::Pass,
            Phase::Open => Admit::Refuse { retry_after: self.open_until.saturating_duration_since(now) },
            Phase::HalfOpen if self.probes_in_flight < self.settings.half_open_requests => {
                self.probes_in_flight += 1;
                Admit::Probe
            }
            // All probes are out: the answer comes within one upstream round trip.
            Phase::HalfOpen => Admit::Refuse { retry_after: Duration::from_secs(1) },
        };
        (admit, transition)
    }

    /// A probe that ended without an outcome (the caller went away): its slot is free again.
    pub fn release_probe(&mut self) {
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
    }

    pub fn record(&mut self, outcome: Outcome, probe: bool, now: Instant) -> Option<Transition> {
        if probe {
            self.release_probe();
        }
        match (self.phase, outcome) {
            (Phase::HalfOpen, Outcome::Success) if probe => {
                self.open_for = self.settings.open_for;
                self.reset_counts(now);
                Some(self.enter(Phase::Closed, "probe succeeded".into()))
            }
            (Phase::HalfOpen, Outcome::Failure) if probe => {
                let doubled = (self.open_for * 2).min(self.settings.max_open_for);
                self.open_for = doubled;
                self.open_until = now + doubled;
                Some(self.enter(Phase::Open, format!("probe failed; open for {}", humantime::format_duration(doubled))))
            }
            (Phase::Closed, _) => {
                self.rotate(now);
                let bucket = &mut self.buckets[self.current];
                bucket.0 += 1;
                match outcome {
                    Outcome::Success => self.consecutive = 0,
                    Outcome::Failure => {
                        bucket.1 += 1;
                        self.consecutive += 1;
                    }
                }
                let (total, failures) = self.buckets.iter().fold((0, 0), |(t, f), (bt, bf)| (t + bt, f + bf));
                let ratio = if total == 0 { 0.0 } else { failures as f64 / total as f64 };
                let cause = if outcome == Outcome::Failure && self.consecutive >= self.settings.consecutive_failures {
                    Some(format!("{} consecutive failures", self.consecutive))
                } else if outcome == Outcome::Failure
                    && total >= self.settings.min_requests
                    && ratio >= self.settings.failure_ratio
                {
                    Some(format!("failure ratio {ratio:.2} over {total} requests"))
                } else {
                    None
                };
                cause.map(|cause| {
                    self.open_until = now + self.open_for;
                    self.enter(Phase::Open, cause)
                })
            }
            // Late outcomes of requests admitted before the breaker opened change nothing.
            _ => None,
        }
    }

    fn enter(&mut self, to: Phase, cause: String) -> Transition {
        let from = self.phase;
        self.phase = to;
        Transition { from, to, cause }
    }

    fn reset_counts(&mut self, now: Instant) {
        self.buckets = [(0, 0); BUCKETS];
        self.consecutive = 0;
        self.bucket_started = now;
    }

    /// Moves the window forward to `now`, emptying buckets that fell out of it.
    fn rotate(&mut self, now: Instant) {
        let width = (self.settings.window / BUCKETS as u32).max(Duration::from_millis(1));
        let mut steps = 0;
        while now.saturating_duration_since(self.bucket_started) >= width && steps <= BUCKETS {
            self.current = (self.current + 1) % BUCKETS;
            self.buckets[self.current] = (0, 0);
            self.bucket_started += width;
            steps += 1;
        }
        if steps > BUCKETS {
            self.bucket_started = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_ratio: 0.5,
            min_requests: 10,
            window: Duration::from_secs(30),
            consecutive_failures: 5,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(25),
            half_open_requests: 2,
            failure_statuses: vec![500, 502, 503, 504],
            max_hosts: 1024,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_trip() {
        let now = Instant::now();
        let mut state = BreakerState::new(settings(), now);
        for _ in 0..4 {
            assert_eq!(state.record(Outcome::Failure, false, now), None);
        }
        let transition = state.record(Outcome::Failure, false, now).unwrap();
        assert_eq!((transition.from, transition.to), (Phase::Closed, Phase::Open));
        assert!(matches!(state.admit(now).0, Admit::Refuse { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_trips_only_after_min_requests() {
        let now = Instant::now();
        let mut state = BreakerState::new(settings(), now);
        // Alternate: never 5 in a row, ratio 0.5.
        for i in 0..9 {
            let outcome = if i % 2 == 0 { Outcome::Failure } else { Outcome::Success };
            assert_eq!(state.record(outcome, false, now), None, "request {i}");
        }
        assert_eq!(state.record(Outcome::Success, false, now), None);
        let transition = state.record(Outcome::Failure, false, now).unwrap();
        assert!(transition.cause.contains("ratio"), "{}", transition.cause);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_bounded_and_backoff_doubles_to_cap() {
        let start = Instant::now();
        let mut state = BreakerState::new(settings(), start);
        for _ in 0..5 {
            state.record(Outcome::Failure, false, start);
        }
        let mut now = start + Duration::from_secs(10);
        assert_eq!(state.admit(now).0, Admit::Probe);
        assert_eq!(state.phase(), Phase::HalfOpen);
        assert_eq!(state.admit(now).0, Admit::Probe);
        assert!(matches!(state.admit(now).0, Admit::Refuse { .. }), "only two probes");
        state.record(Outcome::Failure, true, now);
        assert_eq!(state.open_remaining(now), Duration::from_secs(20));
        now += Duration::from_secs(20);
        assert_eq!(state.admit(now).0, Admit::Probe);
        state.record(Outcome::Failure, true, now);
        assert_eq!(state.open_remaining(now), Duration::from_secs(25), "capped at max_open_for");
        now += Duration::from_secs(25);
        assert_eq!(state.admit(now).0, Admit::Probe);
        let transition = state.record(Outcome::Success, true, now).unwrap();
        assert_eq!(transition.to, Phase::Closed);
        assert_eq!(state.admit(now).0, Admit::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let start = Instant::now();
        let mut state = BreakerState::new(settings(), start);
        for _ in 0..4 {
            state.record(Outcome::Failure, false, start);
        }
        state.record(Outcome::Success, false, start);
        let later = start + Duration::from_secs(31);
        for _ in 0..4 {
            assert_eq!(state.record(Outcome::Failure, false, later), None);
        }
        for _ in 0..5 {
            state.record(Outcome::Success, false, later);
        }
        assert_eq!(state.phase(), Phase::Closed);
    }
}
