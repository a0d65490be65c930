//! Salesforce: `Sforce-Limit-Info: api-usage=18/5000` (used/allowed over a rolling 24 h; some
//! versions add `per-app-api-usage=17/250(appName=x)`). Over the limit it answers **403** with
//! `errorCode: REQUEST_LIMIT_EXCEEDED` and no Retry-After: `TotalRequests` is the daily
//! allocation (held until usage rolls off), `ConcurrentRequests` the long-running-call cap.

use std::time::Duration;

use super::{Observation, Response, Throttle, ThrottleClass, VendorWindow};

pub fn parse(response: &Response<'_>) -> Observation {
    let mut observation = Observation::default();
    for value in response.headers.get_all("sforce-limit-info") {
        let Ok(text) = value.to_str() else {
            observation.malformed += 1;
            continue;
        };
        for part in text.split([';', ',']).map(str::trim).filter(|part| !part.is_empty()) {
            match parse_usage(part) {
                Some(window) => observation.windows.push(window),
                None => observation.malformed += 1,
            }
        }
    }
    if response.status == http::StatusCode::FORBIDDEN {
        let body: Option<serde_json::Value> = response.body.and_then(|body| serde_json::from_slice(body).ok());
        let errors = body.as_ref().and_then(|b| b.as_array()).cloned().unwrap_or_default();
        let limit_error = errors
            .iter()
            .find(|error| error.get("errorCode").and_then(|c| c.as_str()) == Some("REQUEST_LIMIT_EXCEEDED"));
        if let Some(error) = limit_error {
            let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("");
            let class = if message.contains("Concurrent") { ThrottleClass::Concurrency } else { ThrottleClass::Daily };
            observation.throttle = Some(Throttle { class, pause: None });
        }
    }
    observation
}

/// `api-usage=18/5000` or `per-app-api-usage=17/250(appName=sample-app)`.
fn parse_usage(part: &str) -> Option<VendorWindow> {
    let (name, rest) = part.split_once('=')?;
    let rest = rest.split('(').next()?.trim();
    let (used, limit) = rest.split_once('/')?;
    let used: u64 = used.trim().parse().ok()?;
    let limit: u64 = limit.trim().parse().ok()?;
    Some(VendorWindow {
        name: name.trim().to_owned(),
        limit: Some(limit),
        remaining: Some(limit.saturating_sub(used)),
        reset_in: None,
        window: Some(Duration::from_secs(86_400)),
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::vendor::fixtures;

    #[test]
    fn usage_header_from_fixture() {
        let (status, headers, body) =
            fixtures::response("salesforce/collections-create.response.success.json").unwrap();
        let observation = parse(&Response { status, headers: &headers, body: Some(&body), now: SystemTime::now() });
        assert_eq!(observation.windows[0].name, "api-usage");
        assert_eq!(observation.windows[0].limit, Some(100_000));
        assert_eq!(observation.windows[0].remaining, Some(100_000 - 10_019));
        assert!(observation.throttle.is_none());
    }

    #[test]
    fn over_limit_403_is_a_daily_throttle() {
        let (status, headers, body) = fixtures::response("salesforce/over-limit.403.response.json").unwrap();
        let observation = parse(&Response { status, headers: &headers, body: Some(&body), now: SystemTime::now() });
        assert_eq!(observation.throttle, Some(Throttle { class: ThrottleClass::Daily, pause: None }));
    }

    #[test]
    fn other_403_is_not_a_throttle_and_odd_usage_parses() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "sforce-limit-info",
            "api-usage=18/5000; per-app-api-usage=17/250(appName=x); junk".parse().unwrap(),
        );
        let body = br#"[{"message":"no access","errorCode":"INSUFFICIENT_ACCESS"}]"#;
        let observation = parse(&Response {
            status: http::StatusCode::FORBIDDEN,
            headers: &headers,
            body: Some(body),
            now: SystemTime::now(),
        });
        assert!(observation.throttle.is_none());
        assert_eq!(observation.windows.len(), 2);
        assert_eq!(observation.windows[1].remaining, Some(233));
        assert_eq!(observation.malformed, 1);
    }

    #[test]
    fn concurrent_limit_is_concurrency() {
        let headers = http::HeaderMap::new();
        let body = br#"[{"message":"ConcurrentRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        let observation = parse(&Response {
            status: http::StatusCode::FORBIDDEN,
            headers: &headers,
            body: Some(body),
            now: SystemTime::now(),
        });
        assert_eq!(observation.throttle.unwrap().class, ThrottleClass::Concurrency);
    }
}
