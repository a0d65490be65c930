//! `shape: smooth`: the paced quota shape, GCRA. For callers that want requests spread evenly
//! rather than the vendor's full burst (the default `shape: burst` is `rolling`). The memory store
//! runs it directly and `decide.lua` mirrors it line for line.
//!
//! # GCRA for rolling windows
//! GCRA (the generic cell rate algorithm, as in `governor`) keeps one number per bucket, the
//! theoretical arrival time TAT. With emission interval T and tolerance τ = (b - 1)·T, a request
//! of cost n at time s conforms iff `TAT + (n - 1)·T - τ <= s`, and then `TAT = max(TAT, s) + n·T`.
//! At most b requests go back to back, and any k conforming requests at t_1 <= ... <= t_k satisfy
//! `t_k - t_1 >= (k - b)·T`.
//!
//! The vendor refuses the (L+1)-th request inside a window of length W, so we need
//! `(L + 1 - b)·T > W` for any L + 1 requests. Choosing
//!
//! ```text
//! T = (W + m) / (L - b + 1),   τ = (b - 1)·T
//! ```
//!
//! gives `(L + 1 - b)·T = W + m > W`: never more than L in any window, with m (the safety margin)
//! to spare for jitter between sluice's clock and the vendor's arrival times. The sustained rate
//! is `(L - b + 1) / (W + m)`: with the default b = 5% of L and m = 1% of W, about 94% of the
//! quota sustained plus the initial burst, and 100% of it is never exceeded. Larger `burst`
//! serves spikes faster at the cost of sustained rate; `burst: 1` paces evenly at nearly L/W.
//! That cost is why this shape is opt-in: a vendor that counts a rolling window accepts a full
//! burst of L, which `rolling` delivers.

use super::measure::{Micros, Standing};

/// One paced quota: the emission interval T and the tolerance τ (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub interval: Micros,
    pub tolerance: Micros,
}

impl Pace {
    /// GCRA parameters for `limit` per `per` with `burst` and `margin` (see module doc).
    pub fn new(limit: u64, per_micros: i64, burst: u64, margin_micros: i64) -> Self {
        let cells = i64::try_from(limit.saturating_sub(burst) + 1).unwrap_or(i64::MAX).max(1);
        let span = per_micros.saturating_add(margin_micros);
        // Round up: a slightly slower rate keeps the promise, a faster one could break it.
        let interval = (span + cells - 1) / cells;
        let tolerance = interval.saturating_mul(i64::try_from(burst).unwrap_or(i64::MAX).saturating_sub(1));
        Pace { interval: interval.max(1), tolerance }
    }

    /// Earliest time >= `at` at which `cost` conforms given `tat`; `None` if never.
    pub fn earliest(&self, tat: Option<Micros>, cost: i64, at: Micros) -> Option<Micros> {
        if (cost - 1).saturating_mul(self.interval) > self.tolerance {
            return None;
        }
        let tat = tat.unwrap_or(at);
        Some(at.max(tat + (cost - 1) * self.interval - self.tolerance))
    }

    /// The TAT after charging `cost` at `at` (which must conform).
    pub fn charge(&self, tat: Option<Micros>, cost: i64, at: Micros) -> Micros {
        tat.unwrap_or(at).max(at) + cost * self.interval
    }

    /// Where the bucket stands at `now`.
    pub fn standing(&self, tat: Option<Micros>, now: Micros) -> Standing {
        let tat = tat.unwrap_or(now).max(now);
        let remaining = ((now + self.tolerance - tat).div_euclid(self.interval) + 1).max(0);
        Standing { remaining, reset_in: tat - now }
    }

    /// The TAT at which the bucket reports `remaining` left at `now`, if that is later than
    /// `tat` (the vendor knows fewer are left than sluice believed).
    pub fn adopt(&self, tat: Option<Micros>, remaining: i64, now: Micros) -> Option<Micros> {
        let target = now + self.tolerance - (remaining.max(0) - 1) * self.interval;
        (target > tat.unwrap_or(now).max(now)).then_some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_pacing_and_standing() {
        let pace = Pace::new(10, 10_000_000, 5, 0);
        let mut tat = None;
        for expected_remaining in [4, 3, 2, 1, 0] {
            assert_eq!(pace.earliest(tat, 1, 0), Some(0));
            tat = Some(pace.charge(tat, 1, 0));
            assert_eq!(pace.standing(tat, 0).remaining, expected_remaining);
        }
        assert_eq!(pace.earliest(tat, 1, 0), Some(10_000_000 / 6 + 1));
    }

    #[test]
    fn adopting_a_vendor_figure_lowers_remaining_to_it() {
        let pace = Pace::new(10, 10_000_000, 5, 0);
        let tat = pace.adopt(None, 2, 0);
        assert_eq!(pace.standing(tat, 0).remaining, 2);
        assert_eq!(pace.adopt(tat, 3, 0), None, "never raises remaining");
        let tat = pace.adopt(tat, 0, 0);
        assert_eq!(pace.standing(tat, 0).remaining, 0);
    }
}
