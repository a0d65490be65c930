//! Limits the vendor announced below the configured ones. Configured quotas are guesses; when the
//! vendor's headers report a lower limit for a window, the quota that window matches follows it
//! down, and back up once the vendor reports the configured one again. A vendor never raises a
//! limit above the configured one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Quota, Upstream, Window};

/// What changed when the vendor spoke, for the limiter to log and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    Lowered { configured: u64, vendor: u64 },
    Restored { configured: u64 },
}

/// (upstream, quota) names.
type QuotaId = (Arc<str>, Arc<str>);

/// Vendor-announced limits by (upstream, quota).
#[derive(Default)]
pub struct Announced {
    limits: Mutex<HashMap<QuotaId, u64>>,
}

impl Announced {
    /// The index of the quota a vendor window (by its name or length) speaks of, if any.
    pub fn quota_for(upstream: &Upstream, window: Option<Duration>, name: &str) -> Option<usize> {
        let quotas = &upstream.limits.quotas;
        let single = quotas.len() == 1;
        quotas.iter().position(|quota| {
            *quota.name == *name
                || window.is_some_and(|window| window == quota.per)
                || (single && window.is_none() && !matches!(quota.window, Window::Fixed { .. }))
        })
    }

    /// The vendor said `limit` for a window: follow it down, or back up to the configured one.
    /// Returns the quota's index and what changed, if anything did.
    pub fn follow(
        &self,
        upstream: &Upstream,
        window: Option<Duration>,
        name: &str,
        limit: u64,
    ) -> Option<(usize, Followed)> {
        let index = Self::quota_for(upstream, window, name)?;
        let quota = &upstream.limits.quotas[index];
        let key = (upstream.name.clone(), quota.name.clone());
        let mut limits = self.lock();
        if limit > 0 && limit < quota.limit {
            (limits.insert(key, limit) != Some(limit))
                .then_some((index, Followed::Lowered { configured: quota.limit, vendor: limit }))
        } else {
            limits.remove(&key).map(|_| (index, Followed::Restored { configured: quota.limit }))
        }
    }

    /// Quotas as they apply now: configured limits, lowered where the vendor said so.
    pub fn effective<'u>(&self, upstream: &'u Upstream) -> Cow<'u, [Quota]> {
        let limits = self.lock();
        if limits.is_empty()
            || !upstream.limits.quotas.iter().any(|q| limits.contains_key(&(upstream.name.clone(), q.name.clone())))
        {
            return Cow::Borrowed(&upstream.limits.quotas);
        }
        Cow::Owned(
            upstream
                .limits
                .quotas
                .iter()
                .map(|quota| match limits.get(&(upstream.name.clone(), quota.name.clone())) {
                    Some(&vendor) => {
                        let mut lowered = quota.clone();
                        let scaled = u128::from(quota.burst) * u128::from(vendor) / u128::from(quota.limit.max(1));
                        lowered.burst = u64::try_from(scaled).unwrap_or(vendor).clamp(1, vendor);
                        lowered.limit = vendor;
                        lowered
                    }
                    None => quota.clone(),
                })
                .collect(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<QuotaId, u64>> {
        crate::kit::lock(&self.limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        let yaml = "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: 'http://127.0.0.1:1'
    quotas:
      - { name: ten-secondly, limit: 190, per: 10s }
      - { name: daily, limit: 625000, per: 1d, window: fixed }
";
        let config = crate::config::Config::from_yaml(yaml).unwrap();
        (*config.live.upstreams[0]).clone()
    }

    #[test]
    fn follows_the_vendor_down_and_back_up_never_above_the_configured_limit() {
        let upstream = upstream();
        let announced = Announced::default();
        let ten = Some(Duration::from_secs(10));
        assert_eq!(
            announced.follow(&upstream, ten, "rolling", 100),
            Some((0, Followed::Lowered { configured: 190, vendor: 100 }))
        );
        assert_eq!(announced.follow(&upstream, ten, "rolling", 100), None, "nothing new");
        assert_eq!(announced.effective(&upstream)[0].limit, 100);
        assert_eq!(announced.effective(&upstream)[1].limit, 625_000, "the daily window is not touched");
        assert_eq!(announced.follow(&upstream, ten, "rolling", 500), Some((0, Followed::Restored { configured: 190 })));
        assert!(matches!(announced.effective(&upstream), Cow::Borrowed(_)));
        assert_eq!(
            announced.follow(&upstream, None, "daily", 1000),
            Some((1, Followed::Lowered { configured: 625_000, vendor: 1000 }))
        );
        assert_eq!(
            announced.follow(&upstream, Some(Duration::from_secs(60)), "minutely", 5),
            None,
            "no quota follows it"
        );
    }
}
