//! `window: fixed`: a counter per calendar window, and where those windows start.
//!
//! Daily vendor quotas often reset at a fixed instant (HubSpot: midnight in the account's time
//! zone). A fixed quota is a counter per window `[start, next_start)`; a request conforms in the
//! first window (current or next) whose count stays within L.
//!
//! Boundaries are absolute instants, so they can be computed from the local clock and still be
//! judged against Redis time: the store is handed four consecutive starts around now and picks
//! the window its own clock falls in.

use jiff::civil::Date;
use jiff::Timestamp;

use super::measure::{Micros, Standing};
use crate::config::policy::ResetsAt;

/// Four consecutive window starts: the previous window, the current one, the next, and its end.
pub fn bounds(per_micros: i64, resets_at: Option<&ResetsAt>, now: Micros) -> [Micros; 4] {
    match resets_at {
        None => {
            let per = per_micros.max(1);
            let start = now.div_euclid(per) * per;
            [start - per, start, start + per, start + 2 * per]
        }
        Some(resets_at) => calendar_bounds(per_micros, resets_at, now).unwrap_or_else(|| {
            // Out of the calendar's range (it is not, for real clocks): fall back to epoch days.
            bounds(per_micros, None, now)
        }),
    }
}

/// A fixed quota's counts of (up to) two windows, by their start: the window charged last and
/// the most recent other one (a reservation in the next window must not forget the current one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub first: (Micros, i64),
    pub second: (Micros, i64),
}

impl Counts {
    fn count_in(&self, start: Micros) -> i64 {
        if self.first.0 == start {
            self.first.1
        } else if self.second.0 == start {
            self.second.1
        } else {
            0
        }
    }
}

fn count_in(counts: Option<&Counts>, start: Micros) -> i64 {
    counts.map_or(0, |counts| counts.count_in(start))
}

/// Earliest time >= `at` at which `cost` fits in a window (current or next); `None` if never.
pub fn earliest(limit: i64, bounds: &[Micros; 4], counts: Option<&Counts>, cost: i64, at: Micros) -> Option<Micros> {
    if cost > limit {
        return None;
    }
    let first = window_index(bounds, at);
    bounds[first..3]
        .iter()
        .map(|&start| (start, at.max(start)))
        .find_map(|(start, when)| (count_in(counts, start) + cost <= limit).then_some(when))
}

/// The counts after charging `cost` at `at` (which must conform).
pub fn charge(bounds: &[Micros; 4], counts: Option<&Counts>, cost: i64, at: Micros) -> Counts {
    let start = bounds[window_index(bounds, at)];
    let count = count_in(counts, start) + cost;
    let other = counts.and_then(|counts| {
        [counts.first, counts.second].into_iter().filter(|(s, c)| *s != start && *c > 0).max_by_key(|(s, _)| *s)
    });
    Counts { first: (start, count), second: other.unwrap_or((0, 0)) }
}

/// Where the quota stands at `now`.
pub fn standing(limit: i64, bounds: &[Micros; 4], counts: Option<&Counts>, now: Micros) -> Standing {
    let index = window_index(bounds, now);
    let remaining = (limit - count_in(counts, bounds[index])).max(0);
    Standing { remaining, reset_in: bounds[index + 1] - now }
}

/// The counts with the current window's remaining lowered to `remaining` (the vendor's
/// figure), or `None` when that changes nothing.
pub fn adopt(limit: i64, bounds: &[Micros; 4], counts: Option<&Counts>, remaining: i64, now: Micros) -> Option<Counts> {
    let start = bounds[window_index(bounds, now)];
    let missing = (limit - remaining.clamp(0, limit)) - count_in(counts, start);
    (missing > 0).then(|| charge(bounds, counts, missing, now))
}

/// When the newest window these counts are in ends: after that they are fresh ones.
pub fn ends(bounds: &[Micros; 4], counts: &Counts) -> Option<Micros> {
    let newest = counts.first.0.max(counts.second.0);
    let index = bounds[..3].iter().position(|&start| start == newest)?;
    Some(bounds[index + 1])
}

fn window_index(bounds: &[Micros; 4], at: Micros) -> usize {
    (0..3).rev().find(|&index| bounds[index] <= at).unwrap_or(0)
}

fn calendar_bounds(per_micros: i64, resets_at: &ResetsAt, now: Micros) -> Option<[Micros; 4]> {
    let days = (per_micros / 86_400_000_000).max(1);
    let zoned_now = Timestamp::from_microsecond(now).ok()?.to_zoned(resets_at.zone.clone());
    let reset_on = |date: Date| -> Option<Micros> {
        let zoned = date.at(resets_at.hour, resets_at.minute, 0, 0).to_zoned(resets_at.zone.clone()).ok()?;
        Some(zoned.timestamp().as_microsecond())
    };
    // The most recent reset day at or before now whose day number is a multiple of `days`.
    let mut day = zoned_now.date();
    for _ in 0..=(days + 1) {
        let aligned = epoch_day(day) % days == 0;
        if aligned && reset_on(day)? <= now {
            break;
        }
        day = day.yesterday().ok()?;
    }
    let step = |date: Date, by: i64| date.checked_add(jiff::Span::new().days(by)).ok();
    let current = reset_on(day)?;
    let previous = reset_on(step(day, -days)?)?;
    let next = reset_on(step(day, days)?)?;
    let after = reset_on(step(day, 2 * days)?)?;
    Some([previous, current, next, after])
}

fn epoch_day(date: Date) -> i64 {
    let epoch = Date::constant(1970, 1, 1);
    date.since(epoch).map(|span| i64::from(span.get_days())).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_aligned() {
        let bounds = bounds(10_000_000, None, 25_000_000);
        assert_eq!(bounds, [10_000_000, 20_000_000, 30_000_000, 40_000_000]);
    }

    #[test]
    fn midnight_new_york_with_dst() {
        let zone = jiff::tz::TimeZone::get("America/New_York").unwrap();
        let resets_at = ResetsAt { hour: 0, minute: 0, zone_name: "America/New_York".into(), zone };
        // 2026-03-08 12:00 UTC: the day DST starts in New York (a 23-hour day).
        let now: Timestamp = "2026-03-08T12:00:00Z".parse().unwrap();
        let got = bounds(86_400_000_000, Some(&resets_at), now.as_microsecond());
        let expect = |s: &str| s.parse::<Timestamp>().unwrap().as_microsecond();
        assert_eq!(got[1], expect("2026-03-08T05:00:00Z"));
        assert_eq!(got[2], expect("2026-03-09T04:00:00Z"));
        assert_eq!(got[0], expect("2026-03-07T05:00:00Z"));
    }
}
