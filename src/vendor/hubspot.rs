//! HubSpot: `X-HubSpot-RateLimit-Max/-Remaining/-Interval-Milliseconds` (the per-app rolling
//! window), `-Daily/-Daily-Remaining` (per account per day, reset at midnight in the account's
//! time zone, which sluice can't know), legacy `-Secondly/-Secondly-Remaining`. A 429 names its
//! policy in the body (`TEN_SECONDLY_ROLLING`, `SECONDLY`, `DAILY`) and sends no Retry-After.

use std::time::Duration;

use super::{header_u64, Observation, Response, Throttle, ThrottleClass, VendorWindow};

const DAY: Duration = Duration::from_secs(86_400);

pub fn parse(response: &Response<'_>) -> Observation {
    let headers = response.headers;
    let mut observation = Observation::default();
    let bad = &mut observation.malformed;
    // Capped like every other pause: a garbled interval must not hold traffic for millennia.
    let interval = header_u64(headers, "x-hubspot-ratelimit-interval-milliseconds", bad)
        .map(|ms| Duration::from_millis(ms.min(super::MAX_PAUSE_SECS * 1000)));
    let max = header_u64(headers, "x-hubspot-ratelimit-max", bad);
    let remaining = header_u64(headers, "x-hubspot-ratelimit-remaining", bad);
    if max.is_some() || remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: "rolling".into(),
            limit: max,
            remaining,
            reset_in: None,
            window: interval.or(Some(Duration::from_secs(10))),
        });
    }
    let daily = header_u64(headers, "x-hubspot-ratelimit-daily", bad);
    let daily_remaining = header_u64(headers, "x-hubspot-ratelimit-daily-remaining", bad);
    if daily.is_some() || daily_remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: "daily".into(),
            limit: daily,
            remaining: daily_remaining,
            reset_in: None,
            window: Some(DAY),
        });
    }
    let secondly = header_u64(headers, "x-hubspot-ratelimit-secondly", bad);
    let secondly_remaining = header_u64(headers, "x-hubspot-ratelimit-secondly-remaining", bad);
    if secondly.is_some() || secondly_remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: "secondly".into(),
            limit: secondly,
            remaining: secondly_remaining,
            reset_in: None,
            window: Some(Duration::from_secs(1)),
        });
    }

    if response.status == http::StatusCode::TOO_MANY_REQUESTS {
        let body: Option<serde_json::Value> = response.body.and_then(|body| serde_json::from_slice(body).ok());
        let policy = body.as_ref().and_then(|b| b.get("policyName")).and_then(|p| p.as_str()).unwrap_or("");
        let message = body.as_ref().and_then(|b| b.get("message")).and_then(|m| m.as_str()).unwrap_or("");
        observation.throttle = Some(match policy {
            "DAILY" => Throttle { class: ThrottleClass::Daily, pause: None },
            "SECONDLY" => Throttle { class: ThrottleClass::Burst, pause: Some(Duration::from_secs(1)) },
            "TEN_SECONDLY_ROLLING" => {
                Throttle { class: ThrottleClass::Burst, pause: Some(interval.unwrap_or(Duration::from_secs(10))) }
            }
            _ if message.contains("secondly limit") => {
                Throttle { class: ThrottleClass::Burst, pause: Some(Duration::from_secs(1)) }
            }
            _ => Throttle { class: ThrottleClass::Unknown, pause: None },
        });
    }
    observation
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::vendor::fixtures;

    fn parse_fixture(name: &str) -> Observation {
        let (status, headers, body) = fixtures::response(name).expect("fixture present in tests/fixtures/crm");
        parse(&Response { status, headers: &headers, body: Some(&body), now: SystemTime::now() })
    }

    #[test]
    fn success_headers_give_both_windows() {
        let observation = parse_fixture("hubspot/batch-create.response.success.json");
        assert_eq!(observation.malformed, 0);
        assert_eq!(observation.windows[0].limit, Some(190));
        assert_eq!(observation.windows[0].remaining, Some(188));
        assert_eq!(observation.windows[0].window, Some(Duration::from_secs(10)));
        assert_eq!(observation.windows[1].name, "daily");
        assert_eq!(observation.windows[1].remaining, Some(624_998));
        assert!(observation.throttle.is_none());
    }

    #[test]
    fn ten_secondly_429_pauses_for_the_interval() {
        let observation = parse_fixture("hubspot/429.response.json");
        assert_eq!(
            observation.throttle,
            Some(Throttle { class: ThrottleClass::Burst, pause: Some(Duration::from_secs(10)) })
        );
        assert_eq!(observation.windows[0].remaining, Some(0));
    }

    #[test]
    fn daily_429_has_no_known_end() {
        let headers = http::HeaderMap::new();
        let body = br#"{"status":"error","message":"You have reached your daily limit.","errorType":"RATE_LIMIT","policyName":"DAILY"}"#;
        let response = Response {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            headers: &headers,
            body: Some(body),
            now: SystemTime::now(),
        };
        assert_eq!(parse(&response).throttle, Some(Throttle { class: ThrottleClass::Daily, pause: None }));
    }

    #[test]
    fn garbled_headers_are_counted_not_fatal() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-hubspot-ratelimit-max", "lots".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-remaining", "-3".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-daily", "99999999999999999999999".parse().unwrap());
        let response = Response { status: http::StatusCode::OK, headers: &headers, body: None, now: SystemTime::now() };
        let observation = parse(&response);
        assert_eq!(observation.malformed, 3);
        assert!(observation.windows.is_empty());
    }
}
