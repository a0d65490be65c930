//! The common `X-RateLimit-Limit` / `-Remaining` / `-Reset` triple (Pipedrive, Intercom and
//! many others). What `-Reset` counts differs by vendor, so it is configured: seconds from now
//! (`reset: seconds`, the default) or Unix epoch seconds (`reset: epoch`).

use std::time::Duration;

use super::{header_u64, until_epoch, Observation, ResetUnit, Response, Throttle, ThrottleClass, VendorWindow};

pub fn parse(response: &Response<'_>, unit: ResetUnit) -> Observation {
    let mut observation = Observation::default();
    let bad = &mut observation.malformed;
    let limit = header_u64(response.headers, "x-ratelimit-limit", bad);
    let remaining = header_u64(response.headers, "x-ratelimit-remaining", bad);
    let reset = header_u64(response.headers, "x-ratelimit-reset", bad).and_then(|value| match unit {
        ResetUnit::Seconds => Some(Duration::from_secs(value.min(super::MAX_PAUSE_SECS))),
        ResetUnit::Epoch => until_epoch(value, response.now),
    });
    if limit.is_some() || remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: "default".into(),
            limit,
            remaining,
            reset_in: reset,
            window: None,
        });
    }
    if response.status == http::StatusCode::TOO_MANY_REQUESTS {
        let pause = (remaining == Some(0)).then_some(reset).flatten();
        observation.throttle = Some(Throttle { class: ThrottleClass::Burst, pause });
    }
    observation
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn seconds_and_epoch_resets() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-ratelimit-limit", "40".parse().unwrap());
        headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset", "2".parse().unwrap());
        let now = SystemTime::now();
        let response = Response { status: http::StatusCode::TOO_MANY_REQUESTS, headers: &headers, body: None, now };
        let observation = parse(&response, ResetUnit::Seconds);
        assert_eq!(observation.throttle.unwrap().pause, Some(Duration::from_secs(2)));

        let at = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 30;
        headers.insert("x-ratelimit-reset", at.to_string().parse().unwrap());
        let response = Response { status: http::StatusCode::OK, headers: &headers, body: None, now };
        let reset = parse(&response, ResetUnit::Epoch).windows[0].reset_in.unwrap();
        assert!(reset <= Duration::from_secs(30) && reset >= Duration::from_secs(29));

        headers.insert("x-ratelimit-reset", "1".parse().unwrap());
        let response = Response { status: http::StatusCode::OK, headers: &headers, body: None, now };
        assert_eq!(parse(&response, ResetUnit::Epoch).windows[0].reset_in, Some(Duration::ZERO), "epoch in the past");
    }
}
