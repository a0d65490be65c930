//! `retry:` and `breaker:`, validated: the settings the Retry and Breaker layers run on.

use std::time::Duration;

use super::file::{BreakerFile, RetryFile};
use super::Problem;

/// An upstream's retry policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1 = no retries).
    pub attempts: u32,
    /// Base of the exponential backoff (full jitter).
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries allowed per ordinary request over a 10 s sliding window (0.2 = 20%).
    pub budget: f64,
    /// Request bodies larger than this are streamed and never retried.
    pub max_body_bytes: u64,
}

/// An upstream's circuit breaker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Open when failures / requests over `window` reach this (once `min_requests` were seen).
    pub failure_ratio: f64,
    pub min_requests: u64,
    pub window: Duration,
    /// Open after this many failures in a row, whatever the ratio.
    pub consecutive_failures: u64,
    pub open_for: Duration,
    pub max_open_for: Duration,
    /// Probes let through per half-open period.
    pub half_open_requests: u64,
    /// Statuses that count as failures (connect errors and timeouts always do; 429 never).
    pub failure_statuses: Vec<u16>,
    /// Most per-host breakers a wildcard upstream without a target keeps.
    pub max_hosts: usize,
}

pub(super) fn validate_retry(raw: &RetryFile, key: &str, problems: &mut Vec<Problem>) -> RetryPolicy {
    if raw.attempts == 0 || raw.attempts > 10 {
        problems.push(Problem::new(format!("{key}.attempts"), "must be between 1 and 10 (it counts the first try)"));
    }
    if raw.backoff.is_zero() {
        problems.push(Problem::new(format!("{key}.backoff"), "must be greater than 0"));
    }
    if raw.max_backoff < raw.backoff {
        problems.push(Problem::new(format!("{key}.max_backoff"), "must be at least backoff"));
    }
    if !(raw.budget.is_finite() && raw.budget >= 0.0 && raw.budget <= 10.0) {
        problems.push(Problem::new(format!("{key}.budget"), "must be between 0 and 10"));
    }
    RetryPolicy {
        attempts: raw.attempts,
        backoff: raw.backoff,
        max_backoff: raw.max_backoff,
        budget: raw.budget,
        max_body_bytes: raw.max_body_bytes,
    }
}

pub(super) fn validate_breaker(raw: &BreakerFile, key: &str, problems: &mut Vec<Problem>) -> BreakerSettings {
    if !(raw.failure_ratio.is_finite() && raw.failure_ratio > 0.0 && raw.failure_ratio <= 1.0) {
        problems.push(Problem::new(format!("{key}.failure_ratio"), "must be in (0, 1]"));
    }
    if raw.window < Duration::from_secs(1) {
        problems.push(Problem::new(format!("{key}.window"), "must be at least 1s"));
    }
    if raw.open_for.is_zero() {
        problems.push(Problem::new(format!("{key}.open_for"), "must be greater than 0"));
    }
    if raw.max_open_for < raw.open_for {
        problems.push(Problem::new(format!("{key}.max_open_for"), "must be at least open_for"));
    }
    if raw.half_open_requests == 0 {
        problems.push(Problem::new(format!("{key}.half_open_requests"), "must be at least 1"));
    }
    if raw.consecutive_failures == 0 {
        problems.push(Problem::new(format!("{key}.consecutive_failures"), "must be at least 1"));
    }
    if let Some(bad) = raw.failure_statuses.iter().find(|status| !(100..=599).contains(*status) || **status == 429) {
        problems.push(Problem::new(format!("{key}.failure_statuses"), format!("{bad} cannot be a failure status")));
    }
    if !(1..=100_000).contains(&raw.max_hosts) {
        problems.push(Problem::new(format!("{key}.max_hosts"), "must be 1 to 100000"));
    }
    BreakerSettings {
        failure_ratio: raw.failure_ratio,
        min_requests: raw.min_requests,
        window: raw.window,
        consecutive_failures: raw.consecutive_failures,
        open_for: raw.open_for,
        max_open_for: raw.max_open_for,
        half_open_requests: raw.half_open_requests,
        failure_statuses: raw.failure_statuses.clone(),
        max_hosts: raw.max_hosts,
    }
}
