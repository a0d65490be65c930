//! What each vendor's own headers say about its quota, one file per vendor. A leaf: it knows
//! header dialects, not sluice (the `feedback` room acts on what is read here), so config can
//! name a profile and a new dialect is two files: this one (its `pub mod` line, its
//! [`ProfileKind`] variant with its `as_str` arm, a `wants_error_body` arm if it reads a refused
//! body, and its arm of [`observe`]) and the vendor's own.
//!
//! Configured quotas are guesses; these headers are the truth. Every profile turns a response
//! (status, headers, and for a few vendors the body of an over-limit answer) into one
//! [`Observation`]: the windows the vendor reported (limit, remaining, time to reset) and, when
//! the vendor refused the request, a [`Throttle`] with its class and how long to hold off.
//! Parsing never fails: an unparseable header is counted in `malformed` and ignored.

pub mod dynamics;
pub mod github;
pub mod hubspot;
pub mod ietf;
pub mod salesforce;
pub mod xratelimit;
pub mod zendesk;

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use serde::{Deserialize, Serialize};

/// Which vendor's header dialect an upstream speaks (`limit_headers:`). Defined here, beside the
/// parsers, so a new dialect is this file and its own; config reads the name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileKind {
    Hubspot,
    Salesforce,
    Ietf,
    XRatelimit,
    Github,
    Dynamics,
    Zendesk,
    #[default]
    None,
}

impl ProfileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Hubspot => "hubspot",
            ProfileKind::Salesforce => "salesforce",
            ProfileKind::Ietf => "ietf",
            ProfileKind::XRatelimit => "x-ratelimit",
            ProfileKind::Github => "github",
            ProfileKind::Dynamics => "dynamics",
            ProfileKind::Zendesk => "zendesk",
            ProfileKind::None => "none",
        }
    }
}

/// How an `x-ratelimit` reset header counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResetUnit {
    /// Seconds from now (Pipedrive, Zendesk list endpoints).
    #[default]
    Seconds,
    /// Unix epoch seconds (GitHub, Intercom).
    Epoch,
}

/// The longest pause sluice believes from a vendor (26 h: a day's window plus slack). Anything
/// longer is a misread or a hostile header; the hold is capped, never skipped.
pub const MAX_PAUSE: Duration = Duration::from_secs(26 * 3600);

impl ProfileKind {
    /// Whether this profile needs the body of a refused response to classify it.
    pub fn wants_error_body(self, status: StatusCode) -> bool {
        match self {
            ProfileKind::Hubspot => status == StatusCode::TOO_MANY_REQUESTS,
            ProfileKind::Salesforce => status == StatusCode::FORBIDDEN,
            ProfileKind::Github => status == StatusCode::FORBIDDEN,
            _ => false,
        }
    }
}

/// The response fields the profiles read, by exact (lower-case) name...
const RATE_LIMIT_FIELDS: &[&str] =
    &["retry-after", "ratelimit", "ratelimit-policy", "sforce-limit-info", "x-rate-limit", "x-rate-limit-remaining"];
/// ...and by prefix.
const RATE_LIMIT_PREFIXES: &[&str] =
    &["x-hubspot-ratelimit-", "ratelimit-", "x-ratelimit-", "x-ms-ratelimit-", "zendesk-ratelimit-"];

/// Whether some profile reads the response field `name` (lower-case, as `http` keeps names):
/// what `sluice probe` records of every answer.
pub fn is_rate_limit_field(name: &str) -> bool {
    RATE_LIMIT_FIELDS.contains(&name) || RATE_LIMIT_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// Every profile that reads headers, most specific first: where two read the same fields
/// (`ietf` and `zendesk` the `ratelimit-*` triple, `x-ratelimit` and `github` the
/// `x-ratelimit-*` one), the earlier is the likelier reading.
pub const PROFILES: [ProfileKind; 7] = [
    ProfileKind::Hubspot,
    ProfileKind::Salesforce,
    ProfileKind::Dynamics,
    ProfileKind::Ietf,
    ProfileKind::Zendesk,
    ProfileKind::XRatelimit,
    ProfileKind::Github,
];

/// A response as a profile sees it.
pub struct Response<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    /// The body of a refused response, when the profile asked for it (bounded, may be cut).
    pub body: Option<&'a [u8]>,
    pub now: SystemTime,
}

/// One quota window as the vendor reported it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VendorWindow {
    /// The vendor's name for it (`ten_secondly`, `daily`, an IETF policy name, `api-usage`).
    pub name: String,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Time until the window resets (more quota), when the vendor says.
    pub reset_in: Option<Duration>,
    /// The window's length, when the vendor says (HubSpot's interval, IETF `w`).
    pub window: Option<Duration>,
}

/// What kind of limit the vendor hit: decides how long to hold off when it doesn't say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleClass {
    /// A short rolling window (seconds).
    Burst,
    /// A daily allocation: can last hours; held until the vendor's headers show quota again.
    Daily,
    /// Too many requests at once.
    Concurrency,
    /// Refused, reason unknown: exponential backoff.
    Unknown,
}

impl ThrottleClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleClass::Burst => "burst",
            ThrottleClass::Daily => "daily",
            ThrottleClass::Concurrency => "concurrency",
            ThrottleClass::Unknown => "unknown",
        }
    }
}

/// The vendor refused this request for quota reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub class: ThrottleClass,
    /// How long to hold off: Retry-After when present (it takes precedence), else the
    /// profile's own knowledge (window end, reset time). `None`: back off exponentially.
    pub pause: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    pub windows: Vec<VendorWindow>,
    pub throttle: Option<Throttle>,
    /// Headers that were present but could not be parsed.
    pub malformed: u32,
}

/// Reads a response with the given profile.
pub fn observe(profile: ProfileKind, reset_unit: ResetUnit, response: &Response<'_>) -> Observation {
    let mut observation = match profile {
        ProfileKind::Hubspot => hubspot::parse(response),
        ProfileKind::Salesforce => salesforce::parse(response),
        ProfileKind::Ietf => ietf::parse(response),
        ProfileKind::XRatelimit => xratelimit::parse(response, reset_unit),
        ProfileKind::Github => github::parse(response),
        ProfileKind::Dynamics => dynamics::parse(response),
        ProfileKind::Zendesk => zendesk::parse(response),
        ProfileKind::None => Observation::default(),
    };
    // A 429 is a throttle for every profile. A 5xx is a failure (the breaker's business), not a
    // throttle: only with a Retry-After does it also hold the scope for that long. Retry-After
    // (RFC 9110) takes precedence over what a profile derived.
    let retry_after = retry_after(response.headers, response.now, &mut observation.malformed);
    let generic = response.status == StatusCode::TOO_MANY_REQUESTS
        || (response.status.is_server_error() && retry_after.is_some());
    match (&mut observation.throttle, generic) {
        (Some(throttle), _) => {
            if let Some(wait) = retry_after {
                throttle.pause = Some(wait);
            }
        }
        (None, true) => {
            observation.throttle = Some(Throttle { class: ThrottleClass::Unknown, pause: retry_after });
        }
        (None, false) => {}
    }
    observation
}

/// `Retry-After` as delay-seconds or HTTP-date (IMF-fixdate, RFC 850, asctime); a date in the
/// past is zero. Present but unparseable: counted, ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime, malformed: &mut u32) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?;
    let Ok(text) = value.to_str() else {
        *malformed += 1;
        return None;
    };
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u64>() {
            Ok(seconds) => Some(Duration::from_secs(seconds.min(MAX_PAUSE_SECS))),
            Err(_) => Some(Duration::from_secs(MAX_PAUSE_SECS)),
        };
    }
    match httpdate::parse_http_date(text) {
        Ok(at) => Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(Duration::from_secs(MAX_PAUSE_SECS))),
        Err(_) => {
            *malformed += 1;
            None
        }
    }
}

/// No vendor pause is trusted beyond a day and a bit: a garbled header must not stop traffic for years.
pub const MAX_PAUSE_SECS: u64 = MAX_PAUSE.as_secs();

/// A non-negative integer header; present but garbled counts as malformed.
pub fn header_u64(headers: &HeaderMap, name: &str, malformed: &mut u32) -> Option<u64> {
    let value = headers.get(name)?;
    match value.to_str().ok().map(str::trim).and_then(|text| text.parse::<u64>().ok()) {
        Some(number) => Some(number),
        None => {
            *malformed += 1;
            None
        }
    }
}

/// Seconds until an epoch-seconds instant (zero if past); absurd values are malformed.
pub fn until_epoch(epoch_seconds: u64, now: SystemTime) -> Option<Duration> {
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(epoch_seconds))?;
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    (wait.as_secs() <= MAX_PAUSE_SECS * 30).then_some(wait.min(Duration::from_secs(MAX_PAUSE_SECS)))
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! The vendor fixtures the project carries (`tests/fixtures/crm`), loaded for parser tests.
    use std::path::PathBuf;

    pub fn load(relative: &str) -> Option<serde_json::Value> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crm").join(relative);
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// (status, headers, body bytes) of a fixture's `response`.
    pub fn response(relative: &str) -> Option<(http::StatusCode, http::HeaderMap, Vec<u8>)> {
        let value = load(relative)?;
        let response = value.get("response")?;
        let status = http::StatusCode::from_u16(u16::try_from(response.get("status")?.as_u64()?).ok()?).ok()?;
        let mut headers = http::HeaderMap::new();
        for (name, value) in response.get("headers")?.as_object()? {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).ok()?,
                http::HeaderValue::from_str(value.as_str()?).ok()?,
            );
        }
        let body = serde_json::to_vec(response.get("body")?).ok()?;
        Some((status, headers, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    #[test]
    fn rate_limit_fields_cover_what_the_profiles_read() {
        for name in [
            "retry-after",
            "x-hubspot-ratelimit-daily-remaining",
            "sforce-limit-info",
            "ratelimit",
            "ratelimit-policy",
            "ratelimit-reset",
            "x-ratelimit-reset",
            "x-ratelimit-resource",
            "x-ms-ratelimit-burst-remaining-xrm-requests",
            "x-rate-limit",
            "x-rate-limit-remaining",
            "zendesk-ratelimit-tickets-index",
        ] {
            assert!(is_rate_limit_field(name), "{name}");
        }
        for name in ["content-type", "set-cookie", "authorization", "x-request-id"] {
            assert!(!is_rate_limit_field(name), "{name}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Tue, 23 May 2023 14:42:00 GMT").unwrap();
        let mut bad = 0;
        assert_eq!(retry_after(&headers(&[("retry-after", "7")]), now, &mut bad), Some(Duration::from_secs(7)));
        let date = headers(&[("retry-after", "Tue, 23 May 2023 14:42:01 GMT")]);
        assert_eq!(retry_after(&date, now, &mut bad), Some(Duration::from_secs(1)));
        let rfc850 = headers(&[("retry-after", "Tuesday, 23-May-23 14:42:05 GMT")]);
        assert_eq!(retry_after(&rfc850, now, &mut bad), Some(Duration::from_secs(5)));
        let asctime = headers(&[("retry-after", "Tue May 23 14:42:03 2023")]);
        assert_eq!(retry_after(&asctime, now, &mut bad), Some(Duration::from_secs(3)));
        let past = headers(&[("retry-after", "Mon, 22 May 2023 14:42:01 GMT")]);
        assert_eq!(retry_after(&past, now, &mut bad), Some(Duration::ZERO));
        assert_eq!(bad, 0);
        for garbled in ["-5", "soon", "1.5", ""] {
            assert_eq!(retry_after(&headers(&[("retry-after", garbled)]), now, &mut bad), None, "{garbled}");
        }
        assert_eq!(bad, 4);
        let huge = headers(&[("retry-after", "99999999999999999999999")]);
        assert_eq!(retry_after(&huge, now, &mut bad), Some(Duration::from_secs(MAX_PAUSE_SECS)));
    }

    #[test]
    fn a_bare_5xx_is_a_failure_not_a_throttle() {
        let map = headers(&[]);
        for status in [StatusCode::SERVICE_UNAVAILABLE, StatusCode::BAD_GATEWAY, StatusCode::INTERNAL_SERVER_ERROR] {
            let response = Response { status, headers: &map, body: None, now: SystemTime::now() };
            assert_eq!(observe(ProfileKind::None, ResetUnit::Seconds, &response).throttle, None, "{status}");
        }
        let response =
            Response { status: StatusCode::TOO_MANY_REQUESTS, headers: &map, body: None, now: SystemTime::now() };
        assert!(observe(ProfileKind::Hubspot, ResetUnit::Seconds, &response).throttle.is_some());
    }

    #[test]
    fn absurd_vendor_times_are_capped() {
        let cap = Duration::from_secs(MAX_PAUSE_SECS);
        let map = headers(&[("ratelimit", "limit=100, remaining=0, reset=9223372036854775807")]);
        let response = Response { status: StatusCode::OK, headers: &map, body: None, now: SystemTime::now() };
        let observation = observe(ProfileKind::Ietf, ResetUnit::Seconds, &response);
        assert!(observation.windows.iter().all(|w| w.reset_in.is_none_or(|r| r <= cap)), "{observation:?}");
        let map = headers(&[("x-hubspot-ratelimit-interval-milliseconds", "9999999999999")]);
        let body = br#"{"policyName":"TEN_SECONDLY_ROLLING"}"#;
        let response =
            Response { status: StatusCode::TOO_MANY_REQUESTS, headers: &map, body: Some(body), now: SystemTime::now() };
        let observation = observe(ProfileKind::Hubspot, ResetUnit::Seconds, &response);
        assert!(observation.throttle.and_then(|t| t.pause).is_some_and(|p| p <= cap), "{observation:?}");
        assert!(observation.windows.iter().all(|w| w.window.is_none_or(|w| w <= cap)));
    }

    #[test]
    fn generic_throttle_on_429_and_503() {
        let map = headers(&[("retry-after", "3")]);
        let response =
            Response { status: StatusCode::SERVICE_UNAVAILABLE, headers: &map, body: None, now: SystemTime::now() };
        let observation = observe(ProfileKind::None, ResetUnit::Seconds, &response);
        assert_eq!(
            observation.throttle,
            Some(Throttle { class: ThrottleClass::Unknown, pause: Some(Duration::from_secs(3)) })
        );
    }
}
