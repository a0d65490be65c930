//! The IETF `RateLimit` / `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers,
//! RFC 9651 structured fields via `sfv`), `Retry-After` and `Server-Timing` for callers.

use std::time::Duration;

use http::HeaderValue;
use sfv::{Integer, KeyRef, ListSerializer, StringRef};

use super::decide::Standing;
use crate::config::Quota;

fn seconds_ceil(micros: i64) -> i64 {
    (micros.max(0) + 999_999) / 1_000_000
}

fn int(value: i64) -> Integer {
    Integer::try_from(value.clamp(0, 999_999_999_999_999)).unwrap_or(Integer::constant(0))
}

/// `RateLimit: "burst";r=12;t=3, "daily";r=999;t=40000`
pub fn rate_limit(quotas: &[Quota], standings: &[Standing]) -> Option<HeaderValue> {
    let mut list = ListSerializer::new();
    for (quota, standing) in quotas.iter().zip(standings) {
        let name = StringRef::from_str(&quota.name).ok()?;
        list.bare_item(name)
            .parameter(KeyRef::constant("r"), int(standing.remaining))
            .parameter(KeyRef::constant("t"), int(seconds_ceil(standing.reset_in)));
    }
    HeaderValue::from_str(&list.finish()?).ok()
}

/// `RateLimit-Policy: "burst";q=190;w=10, "daily";q=1000000;w=86400`
pub fn rate_limit_policy(quotas: &[Quota]) -> Option<HeaderValue> {
    let mut list = ListSerializer::new();
    for quota in quotas {
        let name = StringRef::from_str(&quota.name).ok()?;
        let window = i64::try_from(quota.per.as_secs().max(1)).unwrap_or(i64::MAX);
        list.bare_item(name)
            .parameter(KeyRef::constant("q"), int(i64::try_from(quota.limit).unwrap_or(i64::MAX)))
            .parameter(KeyRef::constant("w"), int(window));
    }
    HeaderValue::from_str(&list.finish()?).ok()
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after(wait: Duration) -> HeaderValue {
    let seconds = wait.as_micros().div_ceil(1_000_000).max(1);
    HeaderValue::from_str(&seconds.to_string()).unwrap_or(HeaderValue::from_static("1"))
}

/// `Server-Timing: sluice-queue;dur=12.5` (milliseconds spent queued in sluice).
pub fn server_timing(queued: Duration) -> HeaderValue {
    let value = format!("sluice-queue;dur={:.1}", queued.as_secs_f64() * 1000.0);
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("sluice-queue;dur=0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Window;
    use std::sync::Arc;

    fn quota(name: &str, limit: u64, per: u64) -> Quota {
        Quota {
            name: Arc::from(name),
            limit,
            per: Duration::from_secs(per),
            burst: 1,
            margin: Duration::ZERO,
            window: Window::Rolling,
            scope: vec![],
            max_keys: 10,
            forecast_window: Duration::from_secs(10),
        }
    }

    #[test]
    fn renders_structured_fields() {
        let quotas = [quota("burst", 190, 10), quota("daily", 1_000_000, 86_400)];
        let standings = [Standing { remaining: 12, reset_in: 2_500_000 }, Standing { remaining: 999, reset_in: 0 }];
        assert_eq!(rate_limit(&quotas, &standings).unwrap(), r#""burst";r=12;t=3, "daily";r=999;t=0"#);
        assert_eq!(rate_limit_policy(&quotas).unwrap(), r#""burst";q=190;w=10, "daily";q=1000000;w=86400"#);
        assert_eq!(retry_after(Duration::from_millis(1)), "1");
        assert_eq!(retry_after(Duration::from_millis(2500)), "3");
    }
}
