//! Vendors that count and announce their limits the way the real ones do, one per header
//! dialect, for `sluice probe`'s tests (installed on a [`MockCrm`] as its handler):
//!
//! - [`Dialect::Hubspot`]: `X-HubSpot-RateLimit-Max` / `-Remaining` / `-Interval-Milliseconds`
//!   and `-Daily` / `-Daily-Remaining`; over the limit a 429 whose body names
//!   `TEN_SECONDLY_ROLLING` and no `Retry-After` (as HubSpot documents);
//! - [`Dialect::Salesforce`]: `Sforce-Limit-Info: api-usage=N/M`; over the limit a **403**
//!   `REQUEST_LIMIT_EXCEEDED` with no `Retry-After` and no usage header (`tests/fixtures/crm`);
//! - [`Dialect::Ietf`]: `RateLimit-Policy: "default";q=..;w=..` and `RateLimit: "default";r=..;t=..`;
//!   over the limit a 429 with `Retry-After` (whole seconds, rounded up) and a problem+json body;
//! - [`Dialect::XRateLimit`]: `X-RateLimit-Limit` / `-Remaining` / `-Reset` as the Unix time the
//!   window ends; over the limit a 429 with no `Retry-After`.
//!
//! Each counts in a [`Counting::Rolling`] window (any `window`-long span) or [`Counting::Fixed`]
//! windows on multiples of `window` since the Unix epoch, answers only `GET`s of its one path
//! (others 404) carrying its one bearer token (others 401), and records every arrival, with the
//! instant a refusal said to come back, under the lock its counting takes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use super::mock_crm::{json, MockCrm, Recorded};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Hubspot { daily: u64 },
    Salesforce,
    Ietf,
    XRateLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    Rolling,
    Fixed,
}

/// One request as the vendor judged it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub method: String,
    pub status: u16,
    pub accepted: bool,
    /// When a refusal said to come back (its `Retry-After`, or the reset it announced).
    pub come_back: Option<Instant>,
}

struct State {
    /// Rolling: arrival times of accepted requests in the window, oldest first.
    log: VecDeque<Instant>,
    /// Fixed: the current window's index since the epoch, and its count.
    fixed: (u64, u64),
    /// Accepted in all (the daily count).
    total: u64,
    arrivals: Vec<Arrival>,
}

/// A vendor with a real limit; cheap to clone (shared state).
#[derive(Clone)]
pub struct DialectVendor {
    pub dialect: Dialect,
    pub counting: Counting,
    pub limit: u64,
    pub window: Duration,
    pub path: String,
    pub token: String,
    state: Arc<Mutex<State>>,
}

fn ceil_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1_000_000)).unwrap()
}

impl DialectVendor {
    pub fn new(dialect: Dialect, counting: Counting, limit: u64, window: Duration) -> Self {
        Self {
            dialect,
            counting,
            limit,
            window,
            path: "/crm/v3/objects/contacts".into(),
            token: "probe-token".into(),
            state: Arc::new(Mutex::new(State { log: VecDeque::new(), fixed: (0, 0), total: 0, arrivals: Vec::new() })),
        }
    }

    /// Makes `mock` answer every request with this vendor.
    pub fn install(&self, mock: &MockCrm) {
        let vendor = self.clone();
        mock.set_handler(move |recorded| vendor.answer(recorded));
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().unwrap().arrivals.clone()
    }

    fn answer(&self, recorded: &Recorded) -> Response<Full<Bytes>> {
        let mut state = self.state.lock().unwrap();
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut arrival =
            Arrival { at: now, method: recorded.method.clone(), status: 200, accepted: false, come_back: None };
        if recorded.header("authorization") != Some(format!("Bearer {}", self.token).as_str()) {
            arrival.status = 401;
            state.arrivals.push(arrival);
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"status": "error", "message": "Authentication credentials not found.", "category": "INVALID_AUTHENTICATION"}),
            );
        }
        if recorded.method != "GET" || recorded.path != self.path {
            arrival.status = 404;
            state.arrivals.push(arrival);
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"status": "error", "message": "resource not found"}),
            );
        }
        let (accepted, used, reset_in) = match self.counting {
            Counting::Rolling => {
                while state.log.front().is_some_and(|oldest| *oldest + self.window <= now) {
                    state.log.pop_front();
                }
                let accepted = (state.log.len() as u64) < self.limit;
                if accepted {
                    state.log.push_back(now);
                }
                let oldest = state.log.front().copied().unwrap_or(now);
                (accepted, state.log.len() as u64, (oldest + self.window).saturating_duration_since(now))
            }
            Counting::Fixed => {
                let since = wall.duration_since(UNIX_EPOCH).unwrap();
                let size = self.window.as_millis();
                let index = u64::try_from(since.as_millis() / size).unwrap();
                if state.fixed.0 != index {
                    state.fixed = (index, 0);
                }
                let accepted = state.fixed.1 < self.limit;
                if accepted {
                    state.fixed.1 += 1;
                }
                let end = Duration::from_millis(u64::try_from((u128::from(index) + 1) * size).unwrap());
                (accepted, state.fixed.1, end.saturating_sub(since))
            }
        };
        if accepted {
            state.total += 1;
        }
        let remaining = self.limit - used;
        arrival.accepted = accepted;
        let mut response = if accepted {
            json(StatusCode::OK, serde_json::json!({"results": [], "paging": null}))
        } else {
            self.refusal()
        };
        let headers = response.headers_mut();
        let mut set = |name: &str, value: String| {
            headers.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        };
        match self.dialect {
            Dialect::Hubspot { daily } => {
                set("x-hubspot-ratelimit-max", self.limit.to_string());
                set("x-hubspot-ratelimit-remaining", remaining.to_string());
                set("x-hubspot-ratelimit-interval-milliseconds", self.window.as_millis().to_string());
                set("x-hubspot-ratelimit-daily", daily.to_string());
                set("x-hubspot-ratelimit-daily-remaining", daily.saturating_sub(state.total).to_string());
            }
            Dialect::Salesforce => {
                if accepted {
                    set("sforce-limit-info", format!("api-usage={used}/{}", self.limit));
                }
            }
            Dialect::Ietf => {
                let t = ceil_secs(reset_in);
                set("ratelimit-policy", format!("\"default\";q={};w={}", self.limit, self.window.as_secs()));
                set("ratelimit", format!("\"default\";r={remaining};t={t}"));
                if !accepted {
                    let wait = t.max(1);
                    set("retry-after", wait.to_string());
                    arrival.come_back = Some(now + Duration::from_secs(wait));
                }
            }
            Dialect::XRateLimit => {
                let reset_at = wall + reset_in;
                let epoch = ceil_secs(reset_at.duration_since(UNIX_EPOCH).unwrap());
                set("x-ratelimit-limit", self.limit.to_string());
                set("x-ratelimit-remaining", remaining.to_string());
                set("x-ratelimit-reset", epoch.to_string());
                if !accepted {
                    let until = (UNIX_EPOCH + Duration::from_secs(epoch)).duration_since(wall).unwrap_or_default();
                    arrival.come_back = Some(now + until);
                }
            }
        }
        arrival.status = response.status().as_u16();
        state.arrivals.push(arrival);
        response
    }

    fn refusal(&self) -> Response<Full<Bytes>> {
        match self.dialect {
            Dialect::Hubspot { .. } => json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({
                    "status": "error",
                    "message": "You have reached your ten_secondly_rolling limit.",
                    "errorType": "RATE_LIMIT",
                    "correlationId": "c033cdaa-2c40-4a64-ae48-b4cec88dad24",
                    "policyName": "TEN_SECONDLY_ROLLING",
                }),
            ),
            Dialect::Salesforce => json(
                StatusCode::FORBIDDEN,
                serde_json::json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]),
            ),
            Dialect::Ietf => {
                let mut response = json(
                    StatusCode::TOO_MANY_REQUESTS,
                    serde_json::json!({"type": "about:blank", "title": "Too Many Requests", "status": 429}),
                );
                response.headers_mut().insert("content-type", "application/problem+json".parse().unwrap());
                response
            }
            Dialect::XRateLimit => json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"error": "rate_limited"})),
        }
    }
}
