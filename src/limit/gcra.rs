//! The quota maths, pure and shared: the memory store runs it directly and `redis.lua` is a
//! line-for-line mirror, so one replica and a fleet decide alike.
//!
//! # A quota as vendors count it
//! "`limit` requests per `per`" means: in ANY window of length W = `per`, at most L = `limit`
//! requests (HubSpot's `TEN_SECONDLY_ROLLING`). A token bucket that starts full with L tokens and
//! refills at L/W lets L through at once and then another L over the next W: almost 2L in one
//! window. So the bucket is derived from the promise instead.
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
//!
//! # Fixed windows
//! Daily vendor quotas often reset at a fixed instant (HubSpot: midnight in the account's time
//! zone). A fixed quota is a counter per window `[start, next_start)`; a request conforms in the
//! first window (current or next) whose count stays within L.
//!
//! # Several quotas, all or nothing, in order
//! A request is checked against all its quotas at one send time s: the latest of the times at
//! which each quota alone would take it. If s is within the caller's allowed wait, every quota is
//! charged *at s* (a reservation: the caller sleeps until s, and later callers queue behind it
//! without a thundering herd); otherwise nothing is charged and the caller is told `s - now`.
//! Charging at the real send time (not at "now") is what keeps the window promise when one
//! quota makes a request wait for another.

/// Microseconds since the Unix epoch (Redis `TIME` for shared decisions, the local clock otherwise).
pub type Micros = i64;

/// `retry_after` of a request that can never conform (2^50 us, about 35 years); `NEVER` in decide.lua.
pub const NEVER: Micros = 1 << 50;

/// One quota as the algorithm sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Rolling {
        interval: Micros,
        tolerance: Micros,
    },
    /// `bounds`: four consecutive window starts around now, ascending.
    Fixed {
        limit: i64,
        bounds: [Micros; 4],
    },
}

impl Rule {
    /// Rolling-window GCRA parameters for `limit` per `per` with `burst` and `margin` (see module doc).
    pub fn rolling(limit: u64, per_micros: i64, burst: u64, margin_micros: i64) -> Self {
        let cells = i64::try_from(limit.saturating_sub(burst) + 1).unwrap_or(i64::MAX).max(1);
        let span = per_micros.saturating_add(margin_micros);
        // Round up: a slightly slower rate keeps the promise, a faster one could break it.
        let interval = (span + cells - 1) / cells;
        let tolerance = interval.saturating_mul(i64::try_from(burst).unwrap_or(i64::MAX).saturating_sub(1));
        Rule::Rolling { interval: interval.max(1), tolerance }
    }
}

/// The stored state of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    #[default]
    Empty,
    /// Rolling: the theoretical arrival time.
    Tat(Micros),
    /// Fixed: counts of (up to) two windows by their start.
    Counts { first: (Micros, i64), second: (Micros, i64) },
}

/// What one quota reports after a decision, for `RateLimit` headers and `/quotas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Requests (cost 1) that would be taken at once right after this decision.
    pub remaining: i64,
    /// Microseconds until the quota is whole again (bucket full, or window reset).
    pub reset_in: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Charged; the request may go after `wait` microseconds.
    Allowed { wait: Micros, standings: Vec<Standing> },
    /// Nothing charged; `retry_after` is when it would conform; `limiting` the quota that said no.
    Rejected { retry_after: Micros, limiting: usize, standings: Vec<Standing> },
    /// Nothing charged: the vendor asked every replica to hold off for `remaining` more.
    Paused { remaining: Micros, standings: Vec<Standing> },
}

/// Earliest time >= `at` at which `cost` conforms to `rule` in `state`; `None` if never.
pub fn earliest(rule: &Rule, state: &State, cost: i64, at: Micros) -> Option<Micros> {
    match *rule {
        Rule::Rolling { interval, tolerance } => {
            if (cost - 1).saturating_mul(interval) > tolerance {
                return None;
            }
            let tat = match state {
                State::Tat(tat) => *tat,
                _ => at,
            };
            Some(at.max(tat + (cost - 1) * interval - tolerance))
        }
        Rule::Fixed { limit, bounds } => {
            if cost > limit {
                return None;
            }
            let first = window_index(&bounds, at);
            for &start in &bounds[first..3] {
                let when = at.max(start);
                if count_in(state, start) + cost <= limit {
                    return Some(when);
                }
            }
            None
        }
    }
}

/// Charges `cost` at time `at` (which must conform).
pub fn charge(rule: &Rule, state: &State, cost: i64, at: Micros) -> State {
    match *rule {
        Rule::Rolling { interval, .. } => {
            let tat = match state {
                State::Tat(tat) => (*tat).max(at),
                _ => at,
            };
            State::Tat(tat + cost * interval)
        }
        Rule::Fixed { bounds, .. } => {
            let start = bounds[window_index(&bounds, at)];
            let count = count_in(state, start) + cost;
            // Keep this window and the most recent other one: a reservation in the next window
            // must not forget the current window's count.
            let other = match state {
                State::Counts { first, second } => {
                    [*first, *second].into_iter().filter(|(s, c)| *s != start && *c > 0).max_by_key(|(s, _)| *s)
                }
                _ => None,
            };
            State::Counts { first: (start, count), second: other.unwrap_or((0, 0)) }
        }
    }
}

/// Where a quota stands at `now`.
pub fn standing(rule: &Rule, state: &State, now: Micros) -> Standing {
    match *rule {
        Rule::Rolling { interval, tolerance } => {
            let tat = match state {
                State::Tat(tat) => (*tat).max(now),
                _ => now,
            };
            let remaining = ((now + tolerance - tat).div_euclid(interval) + 1).max(0);
            Standing { remaining, reset_in: tat - now }
        }
        Rule::Fixed { limit, bounds } => {
            let index = window_index(&bounds, now);
            let remaining = (limit - count_in(state, bounds[index])).max(0);
            Standing { remaining, reset_in: bounds[index + 1] - now }
        }
    }
}

/// Decides a request against all `rules` (with their `states`) at `now`, allowing a wait of at
/// most `max_wait`. On `Allowed`, `states` are updated in place; on `Rejected`, untouched.
pub fn decide(rules: &[(Rule, i64)], states: &mut [State], now: Micros, max_wait: Micros) -> Decision {
    let mut send_at = now;
    let mut limiting = 0;
    // Each pass can only move send_at later; fixed windows can move it at most twice.
    for _ in 0..4 {
        let mut latest = send_at;
        for (index, ((rule, cost), state)) in rules.iter().zip(states.iter()).enumerate() {
            match earliest(rule, state, *cost, send_at) {
                Some(at) if at > latest => {
                    latest = at;
                    limiting = index;
                }
                Some(_) => {}
                None => return reject(rules, states, now, NEVER, index),
            }
        }
        if latest == send_at {
            break;
        }
        send_at = latest;
    }
    let stable = rules
        .iter()
        .zip(states.iter())
        .all(|((rule, cost), state)| earliest(rule, state, *cost, send_at) == Some(send_at));
    if !stable || send_at - now > max_wait {
        return reject(rules, states, now, send_at - now, limiting);
    }
    for ((rule, cost), state) in rules.iter().zip(states.iter_mut()) {
        *state = charge(rule, state, *cost, send_at);
    }
    let standings = rules.iter().zip(states.iter()).map(|((rule, _), state)| standing(rule, state, send_at)).collect();
    Decision::Allowed { wait: send_at - now, standings }
}

fn reject(rules: &[(Rule, i64)], states: &[State], now: Micros, retry_after: Micros, limiting: usize) -> Decision {
    let standings = rules.iter().zip(states.iter()).map(|((rule, _), state)| standing(rule, state, now)).collect();
    Decision::Rejected { retry_after, limiting, standings }
}

fn window_index(bounds: &[Micros; 4], at: Micros) -> usize {
    (0..3).rev().find(|&index| bounds[index] <= at).unwrap_or(0)
}

fn count_in(state: &State, start: Micros) -> i64 {
    match state {
        State::Counts { first, second } => {
            if first.0 == start {
                first.1
            } else if second.0 == start {
                second.1
            } else {
                0
            }
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;

    fn run(rule: Rule, arrivals: &[Micros], max_wait: Micros) -> Vec<Option<Micros>> {
        let mut state = [State::Empty];
        arrivals
            .iter()
            .map(|&at| match decide(&[(rule, 1)], &mut state, at, max_wait) {
                Decision::Allowed { wait, .. } => Some(at + wait),
                Decision::Rejected { .. } | Decision::Paused { .. } => None,
            })
            .collect()
    }

    /// The promise: never more than `limit` sends in any window of length `per`.
    fn max_in_window(sends: &[Micros], per: Micros) -> usize {
        let mut sends: Vec<_> = sends.to_vec();
        sends.sort_unstable();
        (0..sends.len()).map(|i| sends[i..].iter().take_while(|&&t| t - sends[i] < per).count()).max().unwrap_or(0)
    }

    #[test]
    fn rolling_window_never_exceeds_limit_under_pressure() {
        for (limit, burst) in [(50u64, 1u64), (50, 2), (50, 25), (50, 50), (190, 9), (1, 1)] {
            let rule = Rule::rolling(limit, 10 * SEC, burst, 100_000);
            // 3x the quota, arriving every few ms for 30 s, queueing up to 5 s.
            let arrivals: Vec<Micros> = (0..(limit as i64 * 9)).map(|i| i * (30 * SEC) / (limit as i64 * 9)).collect();
            let sends: Vec<Micros> = run(rule, &arrivals, 5 * SEC).into_iter().flatten().collect();
            assert!(max_in_window(&sends, 10 * SEC) <= limit as usize, "limit {limit} burst {burst}");
            if burst <= limit / 10 {
                let in_30s = sends.iter().filter(|&&t| t < 30 * SEC).count();
                assert!(in_30s as f64 >= 0.9 * 3.0 * limit as f64, "limit {limit} burst {burst}: {in_30s}");
            }
        }
    }

    #[test]
    fn burst_then_pacing_and_standing() {
        let rule = Rule::rolling(10, 10 * SEC, 5, 0);
        let mut state = [State::Empty];
        for expected_remaining in [4, 3, 2, 1, 0] {
            match decide(&[(rule, 1)], &mut state, 0, 0) {
                Decision::Allowed { wait: 0, standings } => assert_eq!(standings[0].remaining, expected_remaining),
                other => panic!("{other:?}"),
            }
        }
        match decide(&[(rule, 1)], &mut state, 0, 0) {
            Decision::Rejected { retry_after, .. } => assert_eq!(retry_after, 10 * SEC / 6 + 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn queue_reserves_in_order() {
        let rule = Rule::rolling(2, SEC, 1, 0);
        let sends = run(rule, &[0, 0, 0, 0], 10 * SEC);
        let sends: Vec<_> = sends.into_iter().flatten().collect();
        assert_eq!(sends.len(), 4);
        assert!(sends.windows(2).all(|w| w[1] > w[0]), "{sends:?}");
    }

    #[test]
    fn cost_beyond_burst_is_never_allowed() {
        let rule = Rule::rolling(10, SEC, 2, 0);
        let mut state = [State::Empty];
        assert!(matches!(decide(&[(rule, 3)], &mut state, 0, 100 * SEC), Decision::Rejected { .. }));
        assert!(matches!(decide(&[(rule, 2)], &mut state, 0, 0), Decision::Allowed { .. }));
    }

    #[test]
    fn all_or_nothing_across_quotas() {
        let burst = Rule::rolling(100, 10 * SEC, 100, 0);
        let daily = Rule::Fixed { limit: 2, bounds: [-SEC, 0, 86_400 * SEC, 2 * 86_400 * SEC] };
        let mut states = [State::Empty, State::Empty];
        let rules = [(burst, 1), (daily, 1)];
        assert!(matches!(decide(&rules, &mut states, 5, 0), Decision::Allowed { .. }));
        assert!(matches!(decide(&rules, &mut states, 6, 0), Decision::Allowed { .. }));
        let before = states;
        match decide(&rules, &mut states, 7, 0) {
            Decision::Rejected { limiting, retry_after, .. } => {
                assert_eq!(limiting, 1);
                assert_eq!(retry_after, 86_400 * SEC - 7);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(states, before, "a rejection charges nothing");
    }

    #[test]
    fn fixed_window_resets_and_reserves_next_window() {
        let rule = Rule::Fixed { limit: 1, bounds: [0, 10 * SEC, 20 * SEC, 30 * SEC] };
        let mut state = [State::Empty];
        assert!(matches!(decide(&[(rule, 1)], &mut state, SEC, 0), Decision::Allowed { wait: 0, .. }));
        match decide(&[(rule, 1)], &mut state, 2 * SEC, 60 * SEC) {
            Decision::Allowed { wait, .. } => assert_eq!(wait, 8 * SEC),
            other => panic!("{other:?}"),
        }
        assert!(matches!(decide(&[(rule, 1)], &mut state, 3 * SEC, 0), Decision::Rejected { .. }));
    }
}
