//! Rolling windows as vendors count them, the default quota shape: at most L = `limit` tokens
//! admitted in any window of length W = `per` + `margin`, and *every* request that keeps this
//! true goes at once. A burst of L passes back to back; the next request goes the moment the
//! oldest admission in the window leaves it. HubSpot's `TEN_SECONDLY_ROLLING`, Salesforce's
//! rolling 24 h allocation and most other vendors count arrivals exactly this way, so this is
//! the shape that delivers the whole quota. (`gcra` keeps the paced shape for `shape: smooth`.)
//!
//! # The record
//! A scope keeps its admissions as entries `(start, tokens)`, ascending by start. An entry
//! stands for `tokens` admitted somewhere in `[start, start + width)`; its *latest possible
//! time* is `start + width - 1`.
//! - For limits up to [`EXACT_LOG_MAX`] (every per-second and per-minute limit vendors publish
//!   for an app or a user), `width` is 1 µs: the record is an exact log of admission times
//!   (Redis: a sorted set, one member per token).
//! - Above it (daily budgets, large minute limits), `width` is `ceil(W / 100)`: counters per
//!   1/100 of the window (Redis: a hash), so a scope costs at most about 101 entries whatever
//!   its limit.
//!
//! # Deciding
//! Let `count(x)` be the tokens of entries whose latest possible time is after `x`. A request of
//! cost n conforms at time s iff
//!
//! ```text
//! count(s - W) + n <= L
//! ```
//!
//! The earliest conforming s >= `at`: `at` itself when it conforms; otherwise walk the entries
//! from the newest, adding tokens, and let e be the entry at which the total first exceeds
//! `L - n`. Every entry from e back must have left the window, so
//! `s = latest(e) + W`, and at that s the count is exactly the total before e: the request goes
//! the instant e leaves, not later. Charging at s adds n tokens to the entry of s's bucket.
//! Entries whose latest possible time is at or before `now - W` can never count again and are
//! dropped, so a record holds at most L tokens' worth of entries in the window (plus any
//! reservations ahead of now).
//!
//! # The promise: never more than L in any window of length W
//! Take any window `[a, a + W)` and, among the tokens sent in it, the one charged last (in
//! decision order), at time t with `a <= t < a + W`. When it was decided, every other token in
//! the window was already recorded, at a time >= a > t - W, so its latest possible time was
//! after `t - W` too, and it was counted in `count(t - W)`. The decision required
//! `count(t - W) + n <= L`, so the window holds at most L. Nothing here depends on the order of
//! send times: reservations made for the future (a queued request sleeps until its s) and
//! tokens leased ahead are counted like any other, which is what keeps the promise across
//! replicas sharing one record.
//!
//! # What it costs
//! - With an exact log: nothing but the margin. Under saturation a slot frees exactly W after
//!   its admission, so the sustained rate is `L / (per + margin)`: 99% with the default 1%
//!   margin (capped at 250 ms, so 99.7% for a daily quota).
//! - With counters: the partly expired bucket is counted whole, so a slot can free up to one
//!   bucket (1/100 of the window) late: at most one bucket of time lost per window.
//!
//! # Waiters
//! A request that does not conform now reserves its s (when it may wait that long) and sleeps
//! until then; its tokens are in the record at once, so the next caller computes its own s
//! behind it. Waiters are thus served in arrival order at the instants slots free up (a
//! cheaper request may take a slot a dearer one cannot use yet), and only those whose slot
//! came wake up: no thundering herd.

use super::measure::{Micros, Standing};

/// Limits up to this many tokens per window keep an exact log of admission times.
pub const EXACT_LOG_MAX: u64 = 1024;

/// Larger limits count tokens per `1 / BUCKETS_PER_WINDOW` of the window.
pub const BUCKETS_PER_WINDOW: i64 = 100;

/// One rolling quota as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// L: tokens allowed in any window.
    pub limit: i64,
    /// W: the window's length, `per + margin`.
    pub span: Micros,
    /// How finely admissions are recorded: 1 µs (an exact log) or 1/100 of the window.
    pub width: Micros,
}

/// What a scope has admitted, ascending by start (see "The record").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admissions {
    /// The width the entries were recorded with (the largest, if a reload changed it).
    pub width: Micros,
    pub entries: Vec<(Micros, i64)>,
}

impl Window {
    /// The window for `limit` per `per` with `margin` (all microseconds but the limit).
    pub fn new(limit: u64, per: Micros, margin: Micros) -> Self {
        let span = per.saturating_add(margin.max(0)).max(1);
        let width = if limit <= EXACT_LOG_MAX { 1 } else { (span + BUCKETS_PER_WINDOW - 1) / BUCKETS_PER_WINDOW };
        Self { limit: i64::try_from(limit).unwrap_or(i64::MAX).max(1), span, width: width.max(1) }
    }

    /// Whether admissions are an exact log (a sorted set in Redis) or counters (a hash).
    pub fn is_exact(&self) -> bool {
        self.width == 1
    }

    /// The width entries of `record` are counted with: never narrower than they were written.
    fn width_of(&self, record: &Admissions) -> Micros {
        self.width.max(record.width).max(1)
    }

    /// Tokens whose latest possible time is after `x`.
    pub fn count_after(&self, record: &Admissions, x: Micros) -> i64 {
        let width = self.width_of(record);
        record.entries.iter().rev().take_while(|(start, _)| start + width - 1 > x).map(|(_, tokens)| *tokens).sum()
    }

    /// Earliest time >= `at` at which `cost` conforms; `None` if it never can (cost > limit).
    pub fn earliest(&self, record: &Admissions, cost: i64, at: Micros) -> Option<Micros> {
        if cost > self.limit {
            return None;
        }
        let room = self.limit - cost;
        let width = self.width_of(record);
        let mut total = 0i64;
        for &(start, tokens) in record.entries.iter().rev() {
            let latest = start + width - 1;
            if latest <= at - self.span {
                break;
            }
            total = total.saturating_add(tokens);
            if total > room {
                return Some(at.max(latest + self.span));
            }
        }
        Some(at)
    }

    /// Records `cost` tokens admitted at `at`, forgetting what can no longer count at `now`.
    pub fn charge(&self, record: &mut Admissions, cost: i64, at: Micros, now: Micros) {
        self.expire(record, now);
        record.width = self.width_of(record);
        let start = at - at.rem_euclid(self.width);
        add(record, start, cost);
    }

    /// Drops entries that can never count again at or after `now`.
    pub fn expire(&self, record: &mut Admissions, now: Micros) {
        let width = self.width_of(record);
        let gone = record.entries.iter().take_while(|(start, _)| start + width - 1 <= now - self.span).count();
        record.entries.drain(..gone);
        if record.entries.is_empty() {
            record.width = self.width;
        }
    }

    /// Where the quota stands at `now`: tokens that would go at once, and the time until the
    /// newest admission has left (the quota is whole again).
    pub fn standing(&self, record: &Admissions, now: Micros) -> Standing {
        let used = self.count_after(record, now - self.span);
        let width = self.width_of(record);
        let reset_in = match record.entries.last() {
            Some((start, _)) if used > 0 => (start + width - 1 + self.span - now).max(0),
            _ => 0,
        };
        Standing { remaining: (self.limit - used).max(0), reset_in }
    }

    /// The start of the oldest entry still counted at `now`: when it leaves, a slot frees.
    pub fn oldest(&self, record: &Admissions, now: Micros) -> Option<Micros> {
        let width = self.width_of(record);
        record.entries.iter().find(|(start, _)| start + width - 1 > now - self.span).map(|(start, _)| *start)
    }

    /// The vendor says only `vendor_remaining` tokens are left in its window. Where sluice
    /// believes more, the difference is recorded as admitted with the oldest admission still in
    /// the window (or now, when there is none), so it leaves when that one does: the rest of the
    /// window follows the vendor's figure. Returns the tokens added.
    pub fn adopt(&self, record: &mut Admissions, vendor_remaining: i64, now: Micros) -> i64 {
        self.expire(record, now);
        let believed = self.limit - self.count_after(record, now - self.span);
        let missing = believed - vendor_remaining.clamp(0, self.limit);
        if missing <= 0 {
            return 0;
        }
        let at = self.oldest(record, now).unwrap_or(now - now.rem_euclid(self.width));
        record.width = self.width_of(record);
        add(record, at, missing);
        missing
    }
}

/// Adds `tokens` to the entry starting at `start`, keeping entries ascending.
fn add(record: &mut Admissions, start: Micros, tokens: i64) {
    match record.entries.binary_search_by_key(&start, |(at, _)| *at) {
        Ok(index) => record.entries[index].1 = record.entries[index].1.saturating_add(tokens),
        Err(index) => record.entries.insert(index, (start, tokens)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const SEC: Micros = 1_000_000;
    const DAY: Micros = 86_400 * SEC;

    /// Brute force: the most tokens in any half-open window of length `span` over `sends`.
    fn busiest(sends: &[(Micros, i64)], span: Micros) -> i64 {
        let mut sorted = sends.to_vec();
        sorted.sort_unstable();
        (0..sorted.len())
            .map(|i| sorted[i..].iter().take_while(|(t, _)| *t - sorted[i].0 < span).map(|(_, n)| n).sum::<i64>())
            .max()
            .unwrap_or(0)
    }

    /// Admits `(arrival, cost)` in order with at most `max_wait`; returns (send time, cost) of each admitted.
    fn play(window: Window, arrivals: &[(Micros, i64)], max_wait: Micros) -> Vec<Option<Micros>> {
        let mut record = Admissions::default();
        arrivals
            .iter()
            .map(|&(at, cost)| {
                let send = window.earliest(&record, cost, at)?;
                (send - at <= max_wait).then(|| {
                    window.charge(&mut record, cost, send, at);
                    send
                })
            })
            .collect()
    }

    #[test]
    fn a_full_burst_goes_back_to_back_then_one_per_freed_slot() {
        let window = Window::new(5, 10 * SEC, 0);
        let arrivals: Vec<_> = (0..7).map(|i| (i * 1_000, 1)).collect();
        let sends = play(window, &arrivals, 0);
        assert!(sends[..5].iter().all(|s| s.is_some()), "all five go at once: {sends:?}");
        assert_eq!(sends[5], None, "the sixth cannot go without waiting");
        // Queueing: the sixth goes exactly when the first leaves the window.
        let sends = play(window, &arrivals, 20 * SEC);
        assert_eq!(sends[5], Some(10 * SEC));
        assert_eq!(sends[6], Some(10 * SEC + 1_000), "the seventh when the second leaves");
    }

    #[test]
    fn earliest_is_exactly_when_the_oldest_leaves() {
        let window = Window::new(3, 60 * SEC, 0);
        let mut record = Admissions::default();
        for at in [0, 5 * SEC, 7 * SEC] {
            window.charge(&mut record, 1, at, at);
        }
        assert_eq!(window.earliest(&record, 1, 8 * SEC), Some(60 * SEC));
        assert_eq!(window.earliest(&record, 2, 8 * SEC), Some(65 * SEC), "two slots: when the second leaves");
        assert_eq!(window.earliest(&record, 4, 8 * SEC), None, "never more than the limit at once");
        assert_eq!(window.earliest(&record, 1, 61 * SEC), Some(61 * SEC));
        let standing = window.standing(&record, 8 * SEC);
        assert_eq!(standing, Standing { remaining: 0, reset_in: 59 * SEC });
    }

    #[test]
    fn a_daily_budget_is_a_budget_not_a_pace() {
        // 1000 per rolling day (Salesforce's shape): all 1000 go at once, the next waits for the
        // window, within one bucket (1/100 of the day) of the exact time.
        let window = Window::new(1000, DAY, 250_000);
        let mut record = Admissions::default();
        for i in 0..1000 {
            let at = i * 10;
            assert_eq!(window.earliest(&record, 1, at), Some(at), "request {i} goes at once");
            window.charge(&mut record, 1, at, at);
        }
        let next = window.earliest(&record, 1, 20_000).unwrap();
        assert!(next >= DAY, "the 1001st waits for the window: {next}");
        assert!(next <= DAY + 250_000 + 10_000, "and not longer: {next}");
        // The large-limit form: counters, bounded entries.
        let big = Window::new(100_000, DAY, 250_000);
        assert!(!big.is_exact());
        let mut record = Admissions::default();
        for i in 0..100_000 {
            let at = i * 800_000; // spread over ~22 hours
            if let Some(send) = big.earliest(&record, 1, at).filter(|send| *send == at) {
                big.charge(&mut record, 1, send, at);
            }
        }
        assert!(record.entries.len() <= 102, "{} entries", record.entries.len());
    }

    #[test]
    fn vendor_figures_are_adopted_for_the_rest_of_the_window() {
        let window = Window::new(10, 10 * SEC, 0);
        let mut record = Admissions::default();
        window.charge(&mut record, 1, SEC, SEC);
        window.charge(&mut record, 1, 2 * SEC, 2 * SEC);
        // sluice believes 8 are left; the vendor says 3 (someone else spends the same account).
        assert_eq!(window.adopt(&mut record, 3, 3 * SEC), 5);
        assert_eq!(window.standing(&record, 3 * SEC).remaining, 3);
        // The adopted tokens leave with the oldest admission.
        assert_eq!(window.standing(&record, 11 * SEC).remaining, 9);
        // A vendor that reports more than sluice believes changes nothing.
        assert_eq!(window.adopt(&mut record, 10, 3 * SEC), 0);
        // Remaining 0: the next slot is when the oldest admission leaves, not a whole window later.
        let mut record = Admissions::default();
        window.charge(&mut record, 1, SEC, SEC);
        window.adopt(&mut record, 0, 2 * SEC);
        assert_eq!(window.earliest(&record, 1, 2 * SEC), Some(11 * SEC));
    }

    /// Property: random costs, arrivals and waits never put more than L in any window, every
    /// request that fits at once goes at once, and the counters form never admits more than the log.
    #[test]
    fn random_arrivals_keep_the_promise_and_fill_the_window() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..300 {
            let limit: u64 = rng.random_range(1..=40);
            let per = rng.random_range(1..=30) * SEC;
            let margin = rng.random_range(0..=SEC / 10);
            let exact = Window::new(limit, per, margin);
            // The same limit forced onto counters, as a large limit would be.
            let coarse = Window { width: (exact.span + 99) / 100, ..exact };
            let max_wait = if rng.random_bool(0.5) { 0 } else { rng.random_range(0..=2 * per) };
            let mut at = 0;
            let arrivals: Vec<(Micros, i64)> = (0..rng.random_range(1..200))
                .map(|_| {
                    at += rng.random_range(0..=per / 4);
                    (at, rng.random_range(1..=i64::try_from(limit).unwrap().min(4)))
                })
                .collect();
            for window in [exact, coarse] {
                let mut record = Admissions::default();
                let mut sent = Vec::new();
                for &(arrival, cost) in &arrivals {
                    let before = sent.clone();
                    let Some(send) = window.earliest(&record, cost, arrival) else { continue };
                    if window.is_exact() && send == arrival {
                        // Exactness: it fits, so no window ending at `arrival` would overflow.
                        let mut trial = before.clone();
                        trial.push((arrival, cost));
                        assert!(busiest(&trial, window.span) <= window.limit, "round {round}");
                    }
                    if window.is_exact() && send > arrival && sent.iter().all(|(t, _)| *t <= arrival) {
                        // Not a second earlier would do (when nothing is reserved ahead).
                        let mut trial = before.clone();
                        trial.push((send - 1, cost));
                        assert!(busiest(&trial, window.span) > window.limit, "round {round}: {send} is late");
                    }
                    if send - arrival <= max_wait {
                        window.charge(&mut record, cost, send, arrival);
                        sent.push((send, cost));
                    }
                }
                assert!(busiest(&sent, window.span) <= window.limit, "round {round}: {sent:?}");
                // Bounded: what the window holds, plus reservations up to `max_wait` ahead.
                let windows = 2 + max_wait / window.span;
                assert!(record.entries.len() as i64 <= window.limit * windows, "round {round}");
            }
        }
    }
}
