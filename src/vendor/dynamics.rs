//! Dynamics 365 / Dataverse: `x-ms-ratelimit-burst-remaining-xrm-requests` (requests left in the
//! 5-minute sliding window) and `x-ms-ratelimit-time-remaining-xrm-requests` (execution seconds
//! left). Throttles are 429 with `Retry-After` in seconds, which the generic rule applies.

use std::time::Duration;

use super::{header_u64, Observation, Response, VendorWindow};

const WINDOW: Duration = Duration::from_secs(300);

pub fn parse(response: &Response<'_>) -> Observation {
    let mut observation = Observation::default();
    let bad = &mut observation.malformed;
    if let Some(remaining) = header_u64(response.headers, "x-ms-ratelimit-burst-remaining-xrm-requests", bad) {
        observation.windows.push(VendorWindow {
            name: "requests".into(),
            limit: None,
            remaining: Some(remaining),
            reset_in: None,
            window: Some(WINDOW),
        });
    }
    if let Some(remaining) = header_u64(response.headers, "x-ms-ratelimit-time-remaining-xrm-requests", bad) {
        observation.windows.push(VendorWindow {
            name: "execution-time".into(),
            limit: None,
            remaining: Some(remaining),
            reset_in: None,
            window: Some(WINDOW),
        });
    }
    observation
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn remaining_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-ms-ratelimit-burst-remaining-xrm-requests", "5999".parse().unwrap());
        headers.insert("x-ms-ratelimit-time-remaining-xrm-requests", "1,199".parse().unwrap());
        let observation =
            parse(&Response { status: http::StatusCode::OK, headers: &headers, body: None, now: SystemTime::now() });
        assert_eq!(observation.windows[0].remaining, Some(5999));
        assert_eq!(observation.malformed, 1);
    }
}
