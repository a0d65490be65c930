//! Zendesk Support: `X-Rate-Limit` / `X-Rate-Limit-Remaining` (account, per minute); list
//! endpoints add `ratelimit-limit/-remaining/-reset` (seconds) and
//! `zendesk-ratelimit-tickets-index: total=100; remaining=99; resets=41`. Throttles are 429 with
//! `Retry-After` seconds (the generic rule).

use std::time::Duration;

use super::{header_u64, Observation, Response, VendorWindow};

pub fn parse(response: &Response<'_>) -> Observation {
    let mut observation = Observation::default();
    let headers = response.headers;
    let bad = &mut observation.malformed;
    let limit = header_u64(headers, "x-rate-limit", bad);
    let remaining = header_u64(headers, "x-rate-limit-remaining", bad);
    if limit.is_some() || remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: "account".into(),
            limit,
            remaining,
            reset_in: None,
            window: Some(Duration::from_secs(60)),
        });
    }
    let endpoint_limit = header_u64(headers, "ratelimit-limit", bad);
    let endpoint_remaining = header_u64(headers, "ratelimit-remaining", bad);
    let endpoint_reset = header_u64(headers, "ratelimit-reset", bad);
    if endpoint_limit.is_some() || endpoint_remaining.is_some() {
        observation.windows.push(VendorWindow {
            name: "endpoint".into(),
            limit: endpoint_limit,
            remaining: endpoint_remaining,
            reset_in: endpoint_reset.map(|s| Duration::from_secs(s.min(super::MAX_PAUSE_SECS))),
            window: None,
        });
    }
    if let Some(value) = headers.get("zendesk-ratelimit-tickets-index") {
        match value.to_str().ok().and_then(parse_tickets_index) {
            Some(window) => observation.windows.push(window),
            None => observation.malformed += 1,
        }
    }
    observation
}

/// `total=100; remaining=99; resets=41`
fn parse_tickets_index(text: &str) -> Option<VendorWindow> {
    let mut window = VendorWindow { name: "tickets-index".into(), ..VendorWindow::default() };
    for part in text.split(';') {
        let (key, value) = part.split_once('=')?;
        let value: u64 = value.trim().parse().ok()?;
        match key.trim() {
            "total" => window.limit = Some(value),
            "remaining" => window.remaining = Some(value),
            "resets" => window.reset_in = Some(Duration::from_secs(value.min(super::MAX_PAUSE_SECS))),
            _ => {}
        }
    }
    Some(window)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn account_endpoint_and_index_windows() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-rate-limit", "700".parse().unwrap());
        headers.insert("x-rate-limit-remaining", "699".parse().unwrap());
        headers.insert("zendesk-ratelimit-tickets-index", "total=100; remaining=99; resets=41".parse().unwrap());
        let observation =
            parse(&Response { status: http::StatusCode::OK, headers: &headers, body: None, now: SystemTime::now() });
        assert_eq!(observation.windows.len(), 2);
        assert_eq!(observation.windows[1].reset_in, Some(Duration::from_secs(41)));
        headers.insert("zendesk-ratelimit-tickets-index", "garbled".parse().unwrap());
        let observation =
            parse(&Response { status: http::StatusCode::OK, headers: &headers, body: None, now: SystemTime::now() });
        assert_eq!(observation.malformed, 1);
    }
}
