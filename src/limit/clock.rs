//! The limiter's one source of time. Waits and deadlines are tokio instants; the wall time that
//! buckets are kept in (Unix microseconds, the unit Redis `TIME` uses) is derived from the same
//! clock, as "the epoch when the clock was made, plus tokio's elapsed time". So a test on paused
//! tokio time moves both together, and the admission loop, degrading and recovering can be tested
//! without waiting. (Shared decisions take Redis `TIME` instead, so replicas' clocks never matter.)

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::decide::Micros;

/// Where the limiter reads the time.
pub trait Clock: Send + Sync {
    /// Monotonic time, for waits and deadlines.
    fn now(&self) -> Instant;
    /// Unix microseconds, for bucket state.
    fn wall(&self) -> Micros;
}

/// tokio's clock, with wall time anchored to the system clock once, when it is made.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: Instant,
    epoch: Micros,
}

impl TokioClock {
    pub fn new() -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| i64::try_from(since.as_micros()).unwrap_or(0));
        Self { start: Instant::now(), epoch }
    }

    /// A clock whose wall time reads `epoch` now (tests pin the calendar this way).
    pub fn at(epoch: Micros) -> Self {
        Self { start: Instant::now(), epoch }
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

    fn wall(&self) -> Micros {
        let elapsed =
            i64::try_from(Instant::now().saturating_duration_since(self.start).as_micros()).unwrap_or(i64::MAX);
        self.epoch.saturating_add(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_wall_time_too() {
        let clock = TokioClock::at(1_000_000);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(clock.wall(), 4_000_000);
    }
}
