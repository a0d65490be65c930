//! Every vendor rate-limit header profile, and `Retry-After`, on arbitrary response headers.
//!
//! Input: two bytes of status, then header lines separated by `\n`. A line that starts with a
//! byte >= 0xf0 names one of the headers the profiles read (so the fuzzer reaches their value
//! parsers at once) and the rest is its value; any other line is `name:value`. Lines that are not
//! a valid header are skipped. Whatever follows a blank line is the body of a refused response.
#![no_main]

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use sluice::vendor::{observe, retry_after, ProfileKind, ResetUnit, Response};

const KNOWN: &[&str] = &[
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "sforce-limit-info",
    "x-hubspot-ratelimit-daily",
    "x-hubspot-ratelimit-daily-remaining",
    "x-hubspot-ratelimit-interval-milliseconds",
    "x-hubspot-ratelimit-max",
    "x-hubspot-ratelimit-remaining",
    "x-hubspot-ratelimit-secondly",
    "x-hubspot-ratelimit-secondly-remaining",
    "x-ms-ratelimit-burst-remaining-xrm-requests",
    "x-ms-ratelimit-time-remaining-xrm-requests",
    "x-rate-limit",
    "x-rate-limit-remaining",
    "x-ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-resource",
    "x-ratelimit-used",
    "zendesk-ratelimit-tickets-index",
];

const PROFILES: &[ProfileKind] = &[
    ProfileKind::Hubspot,
    ProfileKind::Salesforce,
    ProfileKind::Ietf,
    ProfileKind::XRatelimit,
    ProfileKind::Github,
    ProfileKind::Dynamics,
    ProfileKind::Zendesk,
    ProfileKind::None,
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = StatusCode::from_u16(100 + u16::from_be_bytes([data[0], data[1]]) % 500).unwrap_or(StatusCode::OK);
    let rest = &data[2..];
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&rest[..at], Some(&rest[at + 2..])),
        None => (rest, None),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let (name, value) = match line.first() {
            Some(first) if *first >= 0xf0 => (KNOWN[usize::from(*first) % KNOWN.len()].as_bytes(), &line[1..]),
            _ => match line.iter().position(|b| *b == b':') {
                Some(at) => (&line[..at], &line[at + 1..]),
                None => continue,
            },
        };
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_768_471_200);
    let response = Response { status, headers: &headers, body, now };
    for profile in PROFILES {
        for unit in [ResetUnit::Seconds, ResetUnit::Epoch] {
            let observation = observe(*profile, unit, &response);
            let _ = format!("{observation:?}");
        }
        let _ = profile.wants_error_body(status);
    }
    let mut malformed = 0;
    if let Some(wait) = retry_after(&headers, now, &mut malformed) {
        // No vendor pause is trusted beyond the cap.
        assert!(wait <= Duration::from_secs(sluice::vendor::MAX_PAUSE_SECS), "{wait:?}");
    }
});
