//! GitHub (the reference API): `x-ratelimit-limit/-remaining/-used/-reset` (epoch seconds) and
//! `-resource`. Over the primary limit it answers 403 **or** 429 with remaining 0 (wait until
//! reset); secondary limits answer 403/429 with a message and maybe `retry-after` (else wait at
//! least a minute). A 403 with neither is a permission error, not a throttle.

use std::time::Duration;

use super::{header_u64, until_epoch, Observation, Response, Throttle, ThrottleClass, VendorWindow};

pub fn parse(response: &Response<'_>) -> Observation {
    let mut observation = Observation::default();
    let headers = response.headers;
    let bad = &mut observation.malformed;
    let limit = header_u64(headers, "x-ratelimit-limit", bad);
    let remaining = header_u64(headers, "x-ratelimit-remaining", bad);
    let reset = header_u64(headers, "x-ratelimit-reset", bad).and_then(|epoch| until_epoch(epoch, response.now));
    let resource = headers.get("x-ratelimit-resource").and_then(|v| v.to_str().ok()).unwrap_or("core").to_owned();
    if limit.is_some() || remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: resource,
            limit,
            remaining,
            reset_in: reset,
            window: Some(Duration::from_secs(3600)),
        });
    }
    let refused = matches!(response.status, http::StatusCode::FORBIDDEN | http::StatusCode::TOO_MANY_REQUESTS);
    if refused {
        let secondary = response
            .body
            .and_then(|body| std::str::from_utf8(body).ok())
            .is_some_and(|text| text.to_ascii_lowercase().contains("secondary rate limit"));
        if remaining == Some(0) {
            observation.throttle = Some(Throttle { class: ThrottleClass::Burst, pause: reset });
        } else if secondary || headers.contains_key(http::header::RETRY_AFTER) {
            observation.throttle = Some(Throttle { class: ThrottleClass::Burst, pause: Some(Duration::from_secs(60)) });
        }
    }
    observation
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn primary_secondary_and_permission() {
        let now = SystemTime::now();
        let at = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 120;
        let mut headers = http::HeaderMap::new();
        headers.insert("x-ratelimit-limit", "5000".parse().unwrap());
        headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset", at.to_string().parse().unwrap());
        let primary = parse(&Response { status: http::StatusCode::FORBIDDEN, headers: &headers, body: None, now });
        let pause = primary.throttle.unwrap().pause.unwrap();
        assert!(pause > Duration::from_secs(118) && pause <= Duration::from_secs(120));

        headers.insert("x-ratelimit-remaining", "10".parse().unwrap());
        let body = b"{\"message\":\"You have exceeded a secondary rate limit.\"}";
        let secondary =
            parse(&Response { status: http::StatusCode::FORBIDDEN, headers: &headers, body: Some(body), now });
        assert_eq!(secondary.throttle.unwrap().pause, Some(Duration::from_secs(60)));

        let denied = parse(&Response {
            status: http::StatusCode::FORBIDDEN,
            headers: &headers,
            body: Some(b"{\"message\":\"Not allowed\"}"),
            now,
        });
        assert!(denied.throttle.is_none());
    }
}
