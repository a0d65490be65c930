//! Fixed-window calendars: where the windows of a `window: fixed` quota start.
//!
//! Boundaries are absolute instants, so they can be computed from the local clock and still be
//! judged against Redis time: the store is handed four consecutive starts around now and picks
//! the window its own clock falls in.

use jiff::civil::Date;
use jiff::Timestamp;

use super::gcra::Micros;
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
