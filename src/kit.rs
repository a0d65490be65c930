//! Small tools several rooms share, each with one home so a fix lands once: the boxed future
//! every layer returns, lock recovery, jittered backoff, Unix time and the stop signal. A leaf: it knows nothing
//! of sluice's own types.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The future a tower layer's `call` returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Locks `mutex`, recovering it if a panic elsewhere poisoned it: every map sluice guards stays
/// consistent between statements, so a poisoned lock's data is still good, and one panicking
/// task must not take every later request down with it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Full jitter (uniform in `[0, ceiling]`) over an exponential ceiling `base * 2^exponent`,
/// capped at `cap`: the AWS architecture blog's recommendation for clients that retry together.
pub fn full_jitter(base: Duration, exponent: u32, cap: Duration) -> Duration {
    exponential(base, exponent, cap).mul_f64(rand::random::<f64>())
}

/// The un-jittered ceiling of [`full_jitter`]; the exponent saturates at 16.
pub fn exponential(base: Duration, exponent: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << exponent.min(16)).min(cap)
}

/// `wait` spread over 50-150%, so processes that start waiting together do not wake in step.
pub fn spread(wait: Duration) -> Duration {
    wait.mul_f64(0.5 + rand::random::<f64>())
}

/// `at` as whole seconds since the Unix epoch (0 before it).
pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// `at` as fractional seconds since the Unix epoch (0 before it), for gauges.
pub fn unix_seconds_f64(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}

/// Resolves on SIGTERM or SIGINT (never, if neither can be listened for).
pub async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("Cannot listen for SIGTERM/SIGINT; running until killed.");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received."),
        _ = int.recv() => tracing::info!("SIGINT received."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_under_its_capped_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for exponent in 0..40 {
            let ceiling = exponential(base, exponent, cap);
            assert!(ceiling <= cap);
            assert!(full_jitter(base, exponent, cap) <= ceiling);
        }
        assert_eq!(exponential(base, 3, cap), Duration::from_millis(800));
        assert_eq!(exponential(Duration::MAX, 16, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn spread_is_half_to_one_and_a_half() {
        for _ in 0..100 {
            let wait = spread(Duration::from_secs(1));
            assert!(wait >= Duration::from_millis(500) && wait <= Duration::from_millis(1500));
        }
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let poisoner = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison");
        })
        .join();
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 1);
    }
}
