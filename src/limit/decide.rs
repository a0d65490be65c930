//! One request's quota decision over all its quotas, pure and shared: the memory store runs it
//! directly and `decide.lua` is a line-for-line mirror, so one replica and a fleet decide alike.
//!
//! Each quota has one of three shapes, each with its maths and proof in its own module:
//! - `window: rolling` (the default): [`rolling`](super::rolling), the vendor's own rolling
//!   window: at most L in any window of length `per + margin`, a full burst of L at once;
//! - `shape: smooth`: [`gcra`](super::gcra), the same promise, paced;
//! - `window: fixed`: [`window`](super::window), a counter per calendar window.
//!
//! # Several quotas, all or nothing, in order
//! A request is checked against all its quotas at one send time s: the latest of the times at
//! which each quota alone would take it. If s is within the caller's allowed wait, every quota is
//! charged *at s* (a reservation: the caller sleeps until s, and later callers queue behind it
//! without a thundering herd); otherwise nothing is charged and the caller is told `s - now`.
//! Charging at the real send time (not at "now") is what keeps each quota's promise when one
//! quota makes a request wait for another.

use super::gcra::Pace;
use super::rolling::{Admissions, Window};
use super::window::Counts;

pub use super::measure::{Micros, Standing};

/// `retry_after` of a request that can never conform (2^50 us, about 35 years); `NEVER` in decide.lua.
pub const NEVER: Micros = 1 << 50;

/// One quota as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The vendor's rolling window (the default).
    Rolling(Window),
    /// `shape: smooth`: paced with GCRA.
    Smooth(Pace),
    /// `bounds`: four consecutive window starts around now, ascending.
    Fixed { limit: i64, bounds: [Micros; 4] },
}

impl Rule {
    /// A rolling window of `limit` per `per` with `margin` (microseconds).
    pub fn rolling(limit: u64, per_micros: i64, margin_micros: i64) -> Self {
        Rule::Rolling(Window::new(limit, per_micros, margin_micros))
    }

    /// A paced quota (GCRA) of `limit` per `per` with `burst` and `margin`.
    pub fn smooth(limit: u64, per_micros: i64, burst: u64, margin_micros: i64) -> Self {
        Rule::Smooth(Pace::new(limit, per_micros, burst, margin_micros))
    }
}

/// The stored state of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum State {
    #[default]
    Empty,
    /// Smooth: the theoretical arrival time.
    Tat(Micros),
    /// Fixed: counts of (up to) two windows by their start.
    Counts(Counts),
    /// Rolling: what the scope admitted (see `rolling`).
    Admissions(Admissions),
}

impl State {
    fn tat(&self) -> Option<Micros> {
        match self {
            State::Tat(tat) => Some(*tat),
            _ => None,
        }
    }

    fn admissions(&self) -> Option<&Admissions> {
        match self {
            State::Admissions(record) => Some(record),
            _ => None,
        }
    }

    fn counts(&self) -> Option<&Counts> {
        match self {
            State::Counts(counts) => Some(counts),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Charged; the request may go after `wait` microseconds.
    Allowed { wait: Micros, standings: Vec<Standing> },
    /// Nothing charged; `retry_after` is when it would conform; `limiting` the quota that said no.
    Rejected { retry_after: Micros, limiting: usize, standings: Vec<Standing> },
    /// Nothing charged: the vendor asked every replica to hold off for `remaining` more;
    /// `outage` when it did so with a 5xx (the vendor is failing, not rate limiting).
    Paused { remaining: Micros, outage: bool, standings: Vec<Standing> },
}

static EMPTY: Admissions = Admissions { width: 1, entries: Vec::new() };

/// Earliest time >= `at` at which `cost` conforms to `rule` in `state`; `None` if never.
pub fn earliest(rule: &Rule, state: &State, cost: i64, at: Micros) -> Option<Micros> {
    match rule {
        Rule::Rolling(window) => window.earliest(state.admissions().unwrap_or(&EMPTY), cost, at),
        Rule::Smooth(pace) => pace.earliest(state.tat(), cost, at),
        Rule::Fixed { limit, bounds } => super::window::earliest(*limit, bounds, state.counts(), cost, at),
    }
}

/// Charges `cost` at time `at` (which must conform), forgetting what no longer counts at `now`.
pub fn charge(rule: &Rule, state: &mut State, cost: i64, at: Micros, now: Micros) {
    match rule {
        Rule::Rolling(window) => {
            if !matches!(state, State::Admissions(_)) {
                *state = State::Admissions(Admissions { width: window.width, entries: Vec::new() });
            }
            if let State::Admissions(record) = state {
                window.charge(record, cost, at, now);
            }
        }
        Rule::Smooth(pace) => *state = State::Tat(pace.charge(state.tat(), cost, at)),
        Rule::Fixed { bounds, .. } => *state = State::Counts(super::window::charge(bounds, state.counts(), cost, at)),
    }
}

/// Where a quota stands at `now`.
pub fn standing(rule: &Rule, state: &State, now: Micros) -> Standing {
    match rule {
        Rule::Rolling(window) => window.standing(state.admissions().unwrap_or(&EMPTY), now),
        Rule::Smooth(pace) => pace.standing(state.tat(), now),
        Rule::Fixed { limit, bounds } => super::window::standing(*limit, bounds, state.counts(), now),
    }
}

/// Lowers what `state` reports as left at `now` to `remaining` (the vendor said so), never
/// raising it. Returns whether the state changed.
pub fn adopt(rule: &Rule, state: &mut State, remaining: i64, now: Micros) -> bool {
    match rule {
        Rule::Rolling(window) => {
            if !matches!(state, State::Admissions(_)) {
                *state = State::Admissions(Admissions { width: window.width, entries: Vec::new() });
            }
            match state {
                State::Admissions(record) => window.adopt(record, remaining, now) > 0,
                _ => false,
            }
        }
        Rule::Smooth(pace) => match pace.adopt(state.tat(), remaining, now) {
            Some(tat) => {
                *state = State::Tat(tat);
                true
            }
            None => false,
        },
        Rule::Fixed { limit, bounds } => match super::window::adopt(*limit, bounds, state.counts(), remaining, now) {
            Some(counts) => {
                *state = State::Counts(counts);
                true
            }
            None => false,
        },
    }
}

/// Until when `state` can still affect a decision under `rule` (a missing state is an empty
/// one after that): the Redis key's expiry, and when the memory store may forget it.
pub fn expires_at(rule: &Rule, state: &State, now: Micros) -> Micros {
    match (rule, state) {
        (Rule::Rolling(window), State::Admissions(record)) => match record.entries.last() {
            Some((start, _)) => start + window.width.max(record.width) - 1 + window.span,
            None => now,
        },
        (Rule::Smooth(_), State::Tat(tat)) => *tat,
        (Rule::Fixed { bounds, .. }, State::Counts(counts)) => super::window::ends(bounds, counts).unwrap_or(now),
        _ => now,
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
        charge(rule, state, *cost, send_at, now);
    }
    let standings = rules.iter().zip(states.iter()).map(|((rule, _), state)| standing(rule, state, send_at)).collect();
    Decision::Allowed { wait: send_at - now, standings }
}

fn reject(rules: &[(Rule, i64)], states: &[State], now: Micros, retry_after: Micros, limiting: usize) -> Decision {
    let standings = rules.iter().zip(states.iter()).map(|((rule, _), state)| standing(rule, state, now)).collect();
    Decision::Rejected { retry_after, limiting, standings }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

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

    /// The promise: never more than `limit` tokens in any window of length `per`.
    fn max_in_window(sends: &[(Micros, i64)], per: Micros) -> i64 {
        let mut sends: Vec<_> = sends.to_vec();
        sends.sort_unstable();
        (0..sends.len())
            .map(|i| sends[i..].iter().take_while(|(t, _)| t - sends[i].0 < per).map(|(_, n)| n).sum::<i64>())
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn smooth_never_exceeds_limit_under_pressure() {
        for (limit, burst) in [(50u64, 1u64), (50, 2), (50, 25), (50, 50), (190, 9), (1, 1)] {
            let rule = Rule::smooth(limit, 10 * SEC, burst, 100_000);
            // 3x the quota, arriving every few ms for 30 s, queueing up to 5 s.
            let arrivals: Vec<Micros> = (0..(limit as i64 * 9)).map(|i| i * (30 * SEC) / (limit as i64 * 9)).collect();
            let sends: Vec<(Micros, i64)> =
                run(rule, &arrivals, 5 * SEC).into_iter().flatten().map(|t| (t, 1)).collect();
            assert!(max_in_window(&sends, 10 * SEC) <= limit as i64, "limit {limit} burst {burst}");
            if burst <= limit / 10 {
                let in_30s = sends.iter().filter(|(t, _)| *t < 30 * SEC).count();
                assert!(in_30s as f64 >= 0.9 * 3.0 * limit as f64, "limit {limit} burst {burst}: {in_30s}");
            }
        }
    }

    #[test]
    fn rolling_delivers_the_whole_quota_under_pressure() {
        for limit in [1u64, 5, 50, 190, 2000] {
            let rule = Rule::rolling(limit, 10 * SEC, 100_000);
            let arrivals: Vec<Micros> = (0..(limit as i64 * 9)).map(|i| i * (30 * SEC) / (limit as i64 * 9)).collect();
            let sends: Vec<(Micros, i64)> =
                run(rule, &arrivals, 5 * SEC).into_iter().flatten().map(|t| (t, 1)).collect();
            assert!(max_in_window(&sends, 10 * SEC) <= limit as i64, "limit {limit}");
            // Three windows' worth in 30 s, less the margin (and a bucket for large limits).
            let in_30s = sends.iter().filter(|(t, _)| *t < 30 * SEC).count();
            assert!(in_30s as f64 >= 0.95 * 3.0 * limit as f64, "limit {limit}: {in_30s}");
        }
    }

    #[test]
    fn queue_reserves_in_order() {
        for rule in [Rule::smooth(2, SEC, 1, 0), Rule::rolling(2, SEC, 0)] {
            let sends: Vec<_> = run(rule, &[0, 0, 0, 0, 0], 10 * SEC).into_iter().flatten().collect();
            assert_eq!(sends.len(), 5);
            assert!(sends.windows(2).all(|w| w[1] >= w[0]), "{sends:?}");
        }
        // Rolling: two at once, then two more the moment the first two leave.
        let sends: Vec<_> = run(Rule::rolling(2, SEC, 0), &[0, 0, 0, 0], 10 * SEC).into_iter().flatten().collect();
        assert_eq!(sends, vec![0, 0, SEC, SEC]);
    }

    #[test]
    fn cost_beyond_what_the_quota_can_take_is_never_allowed() {
        let smooth = Rule::smooth(10, SEC, 2, 0);
        let mut state = [State::Empty];
        assert!(matches!(
            decide(&[(smooth, 3)], &mut state, 0, 100 * SEC),
            Decision::Rejected { retry_after: NEVER, .. }
        ));
        assert!(matches!(decide(&[(smooth, 2)], &mut state, 0, 0), Decision::Allowed { .. }));
        let rolling = Rule::rolling(10, SEC, 0);
        let mut state = [State::Empty];
        assert!(matches!(
            decide(&[(rolling, 11)], &mut state, 0, 100 * SEC),
            Decision::Rejected { retry_after: NEVER, .. }
        ));
        assert!(matches!(decide(&[(rolling, 10)], &mut state, 0, 0), Decision::Allowed { wait: 0, .. }));
    }

    #[test]
    fn all_or_nothing_across_quotas() {
        let burst = Rule::rolling(100, 10 * SEC, 0);
        let daily = Rule::Fixed { limit: 2, bounds: [-SEC, 0, 86_400 * SEC, 2 * 86_400 * SEC] };
        let mut states = [State::Empty, State::Empty];
        let rules = [(burst, 1), (daily, 1)];
        assert!(matches!(decide(&rules, &mut states, 5, 0), Decision::Allowed { .. }));
        assert!(matches!(decide(&rules, &mut states, 6, 0), Decision::Allowed { .. }));
        let before = states.clone();
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

    /// Property: cost-weighted, multi-window, queued arrivals never exceed any quota's window,
    /// and a rejection never charges anything.
    #[test]
    fn random_multi_window_sequences_keep_every_promise() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xd1ce);
        for round in 0..200 {
            let short = (rng.random_range(2..=20u64), rng.random_range(1..=5) * SEC);
            let long = (short.0 * rng.random_range(2..=5u64), short.1 * rng.random_range(3..=6));
            let rules_of = |cost| {
                vec![(Rule::rolling(short.0, short.1, 10_000), cost), (Rule::rolling(long.0, long.1, 10_000), cost)]
            };
            let mut states = [State::Empty, State::Empty];
            let mut sent = Vec::new();
            let mut at = 0;
            for _ in 0..rng.random_range(10..300) {
                at += rng.random_range(0..=short.1 / 3);
                let cost = rng.random_range(1..=3i64.min(i64::try_from(short.0).unwrap()));
                let max_wait = [0, 0, SEC, 10 * SEC][rng.random_range(0..4)];
                let before = states.clone();
                match decide(&rules_of(cost), &mut states, at, max_wait) {
                    Decision::Allowed { wait, .. } => sent.push((at + wait, cost)),
                    _ => assert_eq!(states, before, "round {round}: a rejection charged"),
                }
            }
            assert!(max_in_window(&sent, short.1 + 10_000) <= i64::try_from(short.0).unwrap(), "round {round}");
            assert!(max_in_window(&sent, long.1 + 10_000) <= i64::try_from(long.0).unwrap(), "round {round}");
        }
    }
}
