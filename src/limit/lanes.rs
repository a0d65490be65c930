//! Priority lanes: when a quota is contended, `high` requests go first, then `normal`, then `low`,
//! on every replica at once, with no coordination beyond the buckets every replica shares.
//!
//! The admission decision reserves a request's send time (see `decide`), and later requests
//! queue behind earlier reservations. A lane bounds how far ahead its requests may reserve:
//!
//! - `high`: as far as its allowed wait (the behaviour without lanes);
//! - `normal`: [`NORMAL_SLOTS`] slot intervals of the quota (`per / limit`);
//! - `low`: a quarter of a slot interval; and its requests are *paced* (a smooth bucket beside each rolling
//!   quota, at the lane's share of the limit, one at a time), so a backfill never takes a burst
//!   of freed slots, and the window frees a slot every interval.
//!
//! A request that cannot reserve within its horizon is not refused while its allowed wait lasts:
//! it waits for its lane's turn on this replica (`turns`: consumers in rotation), then until its
//! slot is within the horizon, and asks again. A `high` request arriving in a window a backfill
//! fills therefore finds at most one `low` reservation ahead of it, made less than a quarter of a
//! slot interval before its slot, on whichever replica; it goes within two slot intervals.
//!
//! `lanes: { low: { max_share: 0.7 } }` caps what a lane may take of any window of each quota:
//! its requests are also charged in a bucket of their own (`<quota>~low`) whose limit is that
//! share of the quota's, so a backfill leaves the rest of each window for traffic that arrives
//! later. Both kinds of lane buckets are ordinary buckets (memory or Redis), decided with the
//! quotas in the same all-or-nothing decision.

use std::sync::Arc;

use super::decide::Micros;
use crate::config::{Lane, Quota, Upstream, UpstreamLimits, Window};

/// How many slot intervals ahead a `normal` request may reserve.
pub const NORMAL_SLOTS: i64 = 4;

/// How far ahead (microseconds) a request of `lane` may reserve its slot; `None`: as far as its
/// allowed wait (`high`, or an upstream without quotas).
pub fn horizon(limits: &UpstreamLimits, lane: Lane) -> Option<Micros> {
    // In quarters of a slot interval.
    let quarters = match lane {
        Lane::High => return None,
        Lane::Normal => 4 * NORMAL_SLOTS,
        Lane::Low => 1,
    };
    let interval = limits
        .quotas
        .iter()
        .map(|quota| i64::try_from(quota.per.as_micros() / u128::from(quota.limit.max(1))).unwrap_or(i64::MAX))
        .min()?;
    Some((interval / 4).max(1000).saturating_mul(quarters))
}

/// The lane's own buckets for `upstream`: for each quota index, the pseudo-quota its requests
/// are also charged in (pacing for `low`, the `max_share` caps). Empty for `high`, and for
/// `normal` without a cap.
pub fn quotas(upstream: &Upstream, lane: Lane) -> Vec<(usize, Quota)> {
    let limits = &upstream.limits;
    if lane == Lane::High {
        return Vec::new();
    }
    // A paced bucket must hold one request of the costliest route at once.
    let max_cost = limits.routes.iter().map(|route| route.cost).max().unwrap_or(1).max(1);
    let mut out = Vec::new();
    for (index, quota) in limits.quotas.iter().enumerate() {
        let cap = limits.lanes.cap(lane, quota.limit);
        let window = match (&quota.window, lane) {
            // Low is paced on rolling windows, capped or not.
            (Window::Rolling | Window::Smooth, Lane::Low) => Window::Smooth,
            // A cap alone keeps the quota's shape.
            (window, _) if cap.is_some() => window.clone(),
            _ => continue,
        };
        let limit = cap.unwrap_or(quota.limit);
        let burst = match window {
            Window::Smooth if lane == Lane::Low => max_cost.min(limit),
            Window::Smooth => quota.burst.min(limit).max(1),
            _ => limit,
        };
        out.push((
            index,
            Quota {
                name: Arc::from(format!("{}~{}", quota.name, lane.as_str())),
                limit,
                burst,
                window,
                max_keys: quota.max_keys,
                ..quota.clone()
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(extra: &str) -> Arc<Upstream> {
        let yaml = format!(
            "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: 'http://127.0.0.1:1'
    quotas:
      - {{ name: burst, limit: 100, per: 10s }}
      - {{ name: daily, limit: 1000, per: 1d, window: fixed }}
{extra}"
        );
        crate::config::Config::from_yaml(&yaml).unwrap().live.upstreams[0].clone()
    }

    #[test]
    fn horizons_in_slot_intervals() {
        let upstream = upstream("");
        // The shortest interval: 10 s / 100 = 100 ms.
        assert_eq!(horizon(&upstream.limits, Lane::High), None);
        assert_eq!(horizon(&upstream.limits, Lane::Normal), Some(400_000));
        assert_eq!(horizon(&upstream.limits, Lane::Low), Some(25_000));
    }

    #[test]
    fn low_is_paced_and_lanes_are_capped() {
        let plain = upstream("");
        assert!(quotas(&plain, Lane::High).is_empty());
        assert!(quotas(&plain, Lane::Normal).is_empty(), "normal has no bucket of its own without a cap");
        let low = quotas(&plain, Lane::Low);
        assert_eq!(low.len(), 1, "the fixed daily window is not paced: {low:?}");
        assert_eq!((low[0].0, &*low[0].1.name, low[0].1.limit, low[0].1.burst), (0, "burst~low", 100, 1));
        assert_eq!(low[0].1.window, Window::Smooth);

        let capped = upstream("    lanes: { low: { max_share: 0.7 }, normal: { max_share: 0.9 } }\n    routes: [{ match: 'POST /x', cost: 3 }]\n");
        let low = quotas(&capped, Lane::Low);
        assert_eq!(low.iter().map(|(_, q)| (q.limit, q.burst)).collect::<Vec<_>>(), [(70, 3), (700, 700)]);
        let normal = quotas(&capped, Lane::Normal);
        assert_eq!(
            normal.iter().map(|(_, q)| (&*q.name, q.limit)).collect::<Vec<_>>(),
            [("burst~normal", 90), ("daily~normal", 900)]
        );
        assert_eq!(normal[0].1.window, Window::Rolling, "a cap alone keeps the shape");
    }

    #[test]
    fn lane_shares_are_validated() {
        let error = crate::config::Config::from_yaml(
            "upstreams:\n  - name: u\n    prefix: /u\n    target: 'http://127.0.0.1:1'\n    lanes: { low: { max_share: 1.5 } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("upstreams[0].lanes.low.max_share (line 5): must be above 0 and at most 1"), "{error}");
    }
}
