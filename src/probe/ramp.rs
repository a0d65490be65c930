//! When to send and when to stop: the ramp, the budget, and the pause after the vendor says no.
//!
//! The rate starts at one request per second and doubles every step (one second, or as long as
//! one request takes at a rate below one), up to `--max-rate`. Requests go at their scheduled
//! times, several in flight when the vendor is slow, at most [`MAX_IN_FLIGHT`]. The ramp stops at
//! the first over-limit answer, when the budget is spent, after the step at `--max-rate`, or at
//! `--duration`, whichever comes first. After an over-limit answer nothing more is sent (the
//! requests already in flight are not recalled, and are recorded) until the pause the vendor
//! asked for has passed; then one request shows how it recovers. The budget counts every
//! request sent, that one included, and is never exceeded.
//!
//! Time comes from a [`Clock`], so the ramp is tested on paused tokio time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::infer::{self, Hold, Verdict};
use super::sample::{Answer, Phase, Sample};
use super::send::Transport;
use super::ProbeError;
use crate::error::ProxyError;

/// Most probe requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 32;

/// Waited past the end of a vendor's pause before the recovery request: a reset given in whole
/// seconds, or a clock a little behind the vendor's, must not make it early.
pub const PAUSE_SLACK: Duration = Duration::from_millis(100);

/// How long one step of the ramp lasts, at rates of one request per second and more.
pub const STEP: Duration = Duration::from_secs(1);

/// Where the probe reads the time: tokio's clock for waits, and wall time derived from it.
pub trait Clock: Clone + Send + Sync + 'static {
    fn now(&self) -> Instant;
    /// The wall time at `at`.
    fn wall(&self, at: Instant) -> SystemTime;
}

/// tokio's clock, with wall time anchored to the system clock once: on paused tokio time both
/// move together.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: Instant,
    wall_start: SystemTime,
}

impl TokioClock {
    pub fn new() -> Self {
        Self { start: Instant::now(), wall_start: SystemTime::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self, at: Instant) -> SystemTime {
        self.wall_start + at.saturating_duration_since(self.start)
    }
}

/// The limits of one probe.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub budget: u64,
    /// Requests per second the ramp goes up to (and stops after).
    pub max_rate: Option<f64>,
    pub duration: Duration,
}

/// Why the ramp stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// The vendor refused request `seq` for quota reasons.
    OverLimit {
        seq: u64,
    },
    Budget,
    /// A whole step at `--max-rate` passed without a refusal.
    MaxRate {
        rate: f64,
    },
    Duration,
}

/// What became of the pause after the over-limit answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// Waited `hold.wait` (plus [`PAUSE_SLACK`]) from the answer, then sent request `seq`.
    Sent { hold: Hold, seq: u64, waited: Duration },
    /// Not sent, and why.
    Skipped { hold: Option<Hold>, reason: String },
}

/// A finished probe.
#[derive(Debug, Clone)]
pub struct Run {
    /// In send order.
    pub samples: Vec<Sample>,
    pub stop: Stop,
    pub recovery: Option<Recovery>,
    pub started: SystemTime,
    pub elapsed: Duration,
    /// The highest rate the ramp reached.
    pub top_rate: f64,
    /// The step the ramp reached.
    pub steps: u32,
}

impl Run {
    pub fn sent(&self) -> usize {
        self.samples.len()
    }
}

/// What the probe tells while it runs (stderr, for the CLI).
pub trait Progress: Send {
    fn line(&mut self, text: &str);
}

/// The ramp's rate in step `step` (1-based) under `max_rate`, and whether it is the last step.
pub fn step_rate(step: u32, max_rate: Option<f64>) -> (f64, bool) {
    let doubled = 2f64.powi(i32::try_from(step.saturating_sub(1)).unwrap_or(i32::MAX).min(60));
    match max_rate {
        Some(max) if doubled >= max => (max, true),
        _ => (doubled, false),
    }
}

/// How many requests a step at `rate` sends, and how long it lasts.
fn step_shape(rate: f64) -> (u64, Duration) {
    if rate >= 1.0 {
        // At most 2^60 by `step_rate`; a step is one second.
        (rate.floor() as u64, STEP)
    } else {
        // One request per step, a step at most an hour long (and a rate of 0 or less is one an hour).
        let seconds = if rate > 0.0 { (1.0 / rate).min(3600.0) } else { 3600.0 };
        (1, Duration::from_secs_f64(seconds))
    }
}

type Flight = (u64, u32, f64, Duration, Result<Answer, ProxyError>, Instant);

/// Runs the ramp against `transport` and returns every sample, or the error that ended it.
pub async fn run<T: Transport, C: Clock>(
    transport: Arc<T>,
    plan: Plan,
    clock: C,
    progress: &mut dyn Progress,
) -> Result<Run, ProbeError> {
    let start = clock.now();
    let started = clock.wall(start);
    let deadline = start + plan.duration;
    let mut samples: Vec<Sample> = Vec::new();
    let mut in_flight: JoinSet<Flight> = JoinSet::new();
    let mut sent: u64 = 0;
    let mut step: u32 = 1;
    let (mut rate, mut last_step) = step_rate(step, plan.max_rate);
    let (mut per_step, mut step_length) = step_shape(rate);
    let mut in_step: u64 = 0;
    let mut step_start = start;
    let mut next_at = start;
    let mut stop: Option<Stop> = None;
    let mut failure: Option<ProbeError> = None;
    let mut over_limit: Option<usize> = None;
    // The step and rate of the last request sent: how far the ramp got.
    let mut reached: (u32, f64) = (0, 0.0);
    // Bounded: every round sends a request (at most `budget`), records an answer (one per
    // request), or sets `stop`, after which only answers are recorded until none is in flight.
    loop {
        if stop.is_some() && in_flight.is_empty() {
            break;
        }
        let may_send = stop.is_none() && in_flight.len() < MAX_IN_FLIGHT;
        let wake = next_at.min(deadline);
        tokio::select! {
            biased;
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                let Ok((seq, sent_step, sent_rate, sent_offset, result, answered_at)) = joined else {
                    failure.get_or_insert(ProbeError::Internal("a probe request task failed"));
                    stop.get_or_insert(Stop::Duration);
                    continue;
                };
                let answer = match result {
                    Ok(answer) => answer,
                    Err(error) => {
                        failure.get_or_insert(ProbeError::Unreachable(error));
                        stop.get_or_insert(Stop::Duration);
                        continue;
                    }
                };
                let sample = Sample {
                    seq,
                    step: sent_step,
                    rate: sent_rate,
                    phase: Phase::Ramp,
                    sent: sent_offset,
                    answered: answered_at.saturating_duration_since(start),
                    wall: clock.wall(answered_at),
                    answer,
                };
                match infer::judge(&sample.answer, sample.wall) {
                    Verdict::Accepted => {}
                    Verdict::OverLimit => {
                        if over_limit.is_none() {
                            over_limit = Some(samples.len());
                            progress.line(&format!(
                                "over-limit answer: {} to request {seq} at +{:.2} s{}",
                                sample.answer.status,
                                sample.answered.as_secs_f64(),
                                infer::glance(&sample).map(|g| format!(" ({g})")).unwrap_or_default()
                            ));
                        }
                        // Over the limit matters more than a budget or a rate cap reached meanwhile.
                        if !matches!(stop, Some(Stop::OverLimit { .. })) {
                            stop = Some(Stop::OverLimit { seq });
                        }
                    }
                    verdict => {
                        failure.get_or_insert_with(|| refusal(verdict, &sample));
                        stop.get_or_insert(Stop::Duration);
                    }
                }
                samples.push(sample);
            }
            () = tokio::time::sleep_until(wake), if may_send => {
                let now = clock.now();
                if now >= deadline {
                    stop = Some(Stop::Duration);
                    continue;
                }
                if now < next_at {
                    continue;
                }
                if sent >= plan.budget {
                    stop = Some(Stop::Budget);
                    continue;
                }
                sent += 1;
                in_step += 1;
                reached = (step, rate);
                if in_step == 1 {
                    let last = samples.last().map(|sample| {
                        let glance = infer::glance(sample).map(|g| format!(" · {g}")).unwrap_or_default();
                        format!(" · last {}{glance}", sample.answer.status.as_u16())
                    });
                    progress.line(&format!(
                        "step {step}: {} rps · sent {sent}/{}{}",
                        show_rate(rate),
                        plan.budget,
                        last.unwrap_or_default()
                    ));
                }
                let offset = now.saturating_duration_since(start);
                let task = transport.clone();
                let task_clock = clock.clone();
                in_flight.spawn(async move {
                    let result = task.send().await;
                    (sent, step, rate, offset, result, task_clock.now())
                });
                if in_step >= per_step {
                    if last_step {
                        stop = Some(Stop::MaxRate { rate });
                        continue;
                    }
                    step += 1;
                    step_start += step_length;
                    (rate, last_step) = step_rate(step, plan.max_rate);
                    (per_step, step_length) = step_shape(rate);
                    in_step = 0;
                    next_at = step_start.max(now);
                } else {
                    let spacing = step_length.div_f64(per_step as f64);
                    next_at = (step_start + spacing.mul_f64(in_step as f64)).max(now);
                }
            }
            else => break,
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    let stop = stop.unwrap_or(Stop::Duration);
    let (steps, top_rate) = reached;
    let recovery = match (over_limit, &stop) {
        (Some(at), Stop::OverLimit { .. }) => {
            Some(recover(&*transport, &clock, &mut samples, at, sent, plan, start, deadline, progress).await)
        }
        _ => None,
    };
    samples.sort_by_key(|sample| sample.seq);
    let end = clock.now();
    Ok(Run { samples, stop, recovery, started, elapsed: end.saturating_duration_since(start), top_rate, steps })
}

/// Waits out the vendor's pause after the over-limit answer `samples[at]`, then sends one request.
#[allow(clippy::too_many_arguments)]
async fn recover<T: Transport, C: Clock>(
    transport: &T,
    clock: &C,
    samples: &mut Vec<Sample>,
    at: usize,
    sent: u64,
    plan: Plan,
    start: Instant,
    deadline: Instant,
    progress: &mut dyn Progress,
) -> Recovery {
    let over = &samples[at];
    let hold = infer::hold_off(samples, over);
    let Some(hold) = hold else {
        let reason = "the vendor said nothing of when to come back (no Retry-After, no reset)".to_owned();
        progress.line(&format!("no recovery request: {reason}"));
        return Recovery::Skipped { hold: None, reason };
    };
    let answered_at = start + over.answered;
    let until = answered_at + hold.wait + PAUSE_SLACK;
    if sent >= plan.budget {
        let reason = format!("the budget ({}) is spent", plan.budget);
        progress.line(&format!("no recovery request: {reason}"));
        return Recovery::Skipped { hold: Some(hold), reason };
    }
    if until > deadline {
        let reason = format!(
            "the pause ({}, {}) outlasts --duration ({} left)",
            humantime::format_duration(hold.wait),
            hold.source,
            humantime::format_duration(Duration::from_millis(
                u64::try_from(deadline.saturating_duration_since(answered_at).as_millis()).unwrap_or(u64::MAX)
            ))
        );
        progress.line(&format!("no recovery request: {reason}"));
        return Recovery::Skipped { hold: Some(hold), reason };
    }
    progress.line(&format!(
        "holding off {} ({}), then one request to see the recovery",
        humantime::format_duration(Duration::from_millis(u64::try_from(hold.wait.as_millis()).unwrap_or(u64::MAX))),
        hold.source
    ));
    tokio::time::sleep_until(until).await;
    let seq = sent + 1;
    let sent_at = clock.now();
    let result = transport.send().await;
    let answered = clock.now();
    let (step, rate) =
        samples.iter().map(|sample| (sample.step, sample.rate)).max_by_key(|(step, _)| *step).unwrap_or((1, 1.0));
    match result {
        Ok(answer) => {
            let sample = Sample {
                seq,
                step,
                rate,
                phase: Phase::Recovery,
                sent: sent_at.saturating_duration_since(start),
                answered: answered.saturating_duration_since(start),
                wall: clock.wall(answered),
                answer,
            };
            progress.line(&format!(
                "recovery: request {seq}: {}{}",
                sample.answer.status,
                infer::glance(&sample).map(|g| format!(" · {g}")).unwrap_or_default()
            ));
            samples.push(sample);
            Recovery::Sent { hold, seq, waited: sent_at.saturating_duration_since(answered_at) }
        }
        Err(error) => {
            let reason = format!("the recovery request failed: {error}");
            progress.line(&reason);
            Recovery::Skipped { hold: Some(hold), reason }
        }
    }
}

/// The error an answer that is neither served nor over the limit ends the probe with.
fn refusal(verdict: Verdict, sample: &Sample) -> ProbeError {
    let status = sample.answer.status;
    let body = super::infer::body_shape(&sample.answer);
    match verdict {
        Verdict::Unauthorized => ProbeError::Auth { status, body },
        Verdict::NotFound => ProbeError::NotFound { status },
        Verdict::VendorFailure => ProbeError::VendorFailure { status, body },
        _ => ProbeError::Refused { status, body },
    }
}

/// `1`, `8`, `2.5`.
pub fn show_rate(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Mutex;

    use http::{HeaderMap, StatusCode};

    /// A vendor in the test: `limit` requests per `window`, rolling, announced in IETF fields
    /// with `Retry-After` on refusals; records when each request arrived.
    struct FakeVendor {
        limit: usize,
        window: Duration,
        arrivals: Mutex<Vec<(Instant, bool)>>,
    }

    impl FakeVendor {
        fn new(limit: usize, window: Duration) -> Arc<Self> {
            Arc::new(Self { limit, window, arrivals: Mutex::new(Vec::new()) })
        }
        fn arrivals(&self) -> Vec<(Instant, bool)> {
            self.arrivals.lock().unwrap().clone()
        }
    }

    impl Transport for FakeVendor {
        fn send(&self) -> Pin<Box<dyn Future<Output = Result<Answer, ProxyError>> + Send>> {
            let now = Instant::now();
            let mut arrivals = self.arrivals.lock().unwrap();
            let in_window: Vec<Instant> =
                arrivals.iter().filter(|(at, ok)| *ok && *at + self.window > now).map(|(at, _)| *at).collect();
            let accepted = in_window.len() < self.limit;
            arrivals.push((now, accepted));
            let used = in_window.len() + usize::from(accepted);
            let oldest = in_window.first().copied().unwrap_or(now);
            let reset = u64::try_from((oldest + self.window).saturating_duration_since(now).as_millis().div_ceil(1000))
                .unwrap()
                .max(1);
            let mut headers = HeaderMap::new();
            headers.insert(
                "ratelimit-policy",
                format!("\"q\";q={};w={}", self.limit, self.window.as_secs()).parse().unwrap(),
            );
            headers.insert("ratelimit", format!("\"q\";r={};t={reset}", self.limit - used).parse().unwrap());
            let status = if accepted { StatusCode::OK } else { StatusCode::TOO_MANY_REQUESTS };
            if !accepted {
                headers.insert("retry-after", reset.to_string().parse().unwrap());
            }
            let answer = Answer::new(status, &headers, (!accepted).then(bytes::Bytes::new));
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(answer)
            })
        }
    }

    struct Quiet(Vec<String>);
    impl Progress for Quiet {
        fn line(&mut self, text: &str) {
            self.0.push(text.to_owned());
        }
    }

    fn plan(budget: u64) -> Plan {
        Plan { budget, max_rate: None, duration: Duration::from_secs(300) }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_first_refusal_and_recovers_only_after_retry_after() {
        let vendor = FakeVendor::new(10, Duration::from_secs(4));
        let mut progress = Quiet(Vec::new());
        let run = super::run(vendor.clone(), plan(100), TokioClock::new(), &mut progress).await.unwrap();
        let over_seq = match run.stop {
            Stop::OverLimit { seq } => seq,
            ref other => panic!("{other:?}"),
        };
        let arrivals = vendor.arrivals();
        assert_eq!(arrivals.len(), run.sent());
        let refused_at = arrivals[usize::try_from(over_seq - 1).unwrap()].0;
        let Some(Recovery::Sent { hold, seq, .. }) = &run.recovery else { panic!("{:?}", run.recovery) };
        assert_eq!(*seq, run.sent() as u64, "the recovery request is the last one");
        let recovery_at = arrivals.last().unwrap().0;
        assert!(recovery_at >= refused_at + hold.wait, "{:?} < {:?} + {:?}", recovery_at, refused_at, hold.wait);
        assert!(hold.source.starts_with("Retry-After"), "{}", hold.source);
        // Nothing sent after the answer but the recovery request.
        let answer_at = run.samples.iter().find(|s| s.seq == over_seq).unwrap().answered;
        let after: Vec<u64> = run.samples.iter().filter(|s| s.sent > answer_at).map(|s| s.seq).collect();
        assert_eq!(after, vec![*seq]);
        assert!(progress.0.iter().any(|line| line.starts_with("step 4: 8 rps")), "{:?}", progress.0);
    }

    #[tokio::test(start_paused = true)]
    async fn never_sends_more_than_the_budget() {
        for budget in [1, 2, 7, 12] {
            let vendor = FakeVendor::new(1000, Duration::from_secs(10));
            let run =
                super::run(vendor.clone(), plan(budget), TokioClock::new(), &mut Quiet(Vec::new())).await.unwrap();
            assert_eq!(run.stop, Stop::Budget, "budget {budget}");
            assert_eq!(vendor.arrivals().len() as u64, budget);
            assert_eq!(run.sent() as u64, budget);
        }
        // The recovery request counts too: a refusal on the last request of the budget gets none.
        let vendor = FakeVendor::new(6, Duration::from_secs(10));
        let run = super::run(vendor.clone(), plan(7), TokioClock::new(), &mut Quiet(Vec::new())).await.unwrap();
        assert_eq!(run.stop, Stop::OverLimit { seq: 7 });
        assert!(matches!(&run.recovery, Some(Recovery::Skipped { reason, .. }) if reason.contains("budget")));
        assert_eq!(vendor.arrivals().len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_after_the_step_at_max_rate_and_at_the_duration() {
        let vendor = FakeVendor::new(1000, Duration::from_secs(10));
        let capped = Plan { budget: 100, max_rate: Some(3.0), duration: Duration::from_secs(300) };
        let run = super::run(vendor.clone(), capped, TokioClock::new(), &mut Quiet(Vec::new())).await.unwrap();
        assert_eq!(run.stop, Stop::MaxRate { rate: 3.0 });
        assert_eq!(run.sent(), 1 + 2 + 3, "steps of 1, 2, then 3 rps");
        let short = Plan { budget: 100, max_rate: None, duration: Duration::from_millis(2500) };
        let vendor = FakeVendor::new(1000, Duration::from_secs(10));
        let run = super::run(vendor.clone(), short, TokioClock::new(), &mut Quiet(Vec::new())).await.unwrap();
        assert_eq!(run.stop, Stop::Duration);
        assert_eq!(run.sent(), 1 + 2 + 2, "1 rps, 2 rps, half a second of 4 rps");
        assert!(run.samples.iter().all(|sample| sample.sent < Duration::from_millis(2500)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_the_duration_is_not_waited_for() {
        let vendor = FakeVendor::new(3, Duration::from_secs(600));
        let plan = Plan { budget: 100, max_rate: None, duration: Duration::from_secs(30) };
        let run = super::run(vendor.clone(), plan, TokioClock::new(), &mut Quiet(Vec::new())).await.unwrap();
        assert!(matches!(run.stop, Stop::OverLimit { .. }));
        assert!(matches!(&run.recovery, Some(Recovery::Skipped { reason, .. }) if reason.contains("--duration")));
        assert!(run.elapsed < Duration::from_secs(30));
    }

    #[test]
    fn the_rate_doubles_up_to_the_cap() {
        assert_eq!(step_rate(1, None), (1.0, false));
        assert_eq!(step_rate(4, None), (8.0, false));
        assert_eq!(step_rate(3, Some(3.0)), (3.0, true));
        assert_eq!(step_rate(1, Some(0.5)), (0.5, true));
        assert_eq!(step_shape(0.5), (1, Duration::from_secs(2)));
        assert_eq!(step_shape(0.0), (1, Duration::from_secs(3600)));
        assert_eq!(step_shape(-1.0), (1, Duration::from_secs(3600)));
        assert_eq!(step_rate(200, None).0, 2f64.powi(60), "bounded");
    }
}
