//! A mock vendor that enforces a REAL limit, installable as a [`MockCrm`] handler.
//!
//! A sliding-window log: at most `limit` accepted requests in any window of length `window`
//! (HubSpot's `TEN_SECONDLY_ROLLING` counts this way). Over the limit it answers 429 with
//! `Retry-After` = whole seconds until the oldest accepted request leaves the window (rounded
//! up, so waiting that long always frees a slot) and a HubSpot-shaped body. Refused requests do
//! not enter the log, as vendors count only what they served.
//!
//! [`Announce`] picks what every response (accepted or refused) says about the limit: nothing,
//! HubSpot's `X-HubSpot-RateLimit-Max/-Remaining/-Interval-Milliseconds`, or the IETF draft's
//! `RateLimit-Policy: "default";q=<limit>;w=<secs>` + `RateLimit: "default";r=<left>;t=<secs>`.
//!
//! Every arrival is recorded with its time (taken under the limiter's lock, so the log and the
//! arrival times agree), whether it was accepted, and the pause a refusal announced.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::mock_crm::{json, MockCrm, Recorded};

/// What the vendor tells callers about its limit on every response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// No rate headers at all: callers learn the limit only from 429s.
    Nothing,
    /// `X-HubSpot-RateLimit-Max`, `-Remaining`, `-Interval-Milliseconds`.
    Hubspot,
    /// IETF `RateLimit-Policy` + `RateLimit` (`-08`+ named lists).
    Ietf,
}

/// One request as the limited vendor judged it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub accepted: bool,
    /// Requests the window had left after this one (0 for a refusal).
    pub remaining: usize,
    /// The pause a refusal announced (its `Retry-After`).
    pub retry_after: Option<Duration>,
    pub path: String,
}

/// An announced pause: from a refusal's arrival until its `Retry-After` has passed.
#[derive(Debug, Clone, Copy)]
pub struct Pause {
    pub start: Instant,
    pub end: Instant,
}

/// A request that arrived while an announced pause was in force.
#[derive(Debug, Clone, Copy)]
pub struct Violation {
    pub at: Instant,
    pub pause: Pause,
    /// How long after the refusal that announced the pause it arrived.
    pub after_start: Duration,
    pub accepted: bool,
}

struct State {
    /// Arrival times of accepted requests still in the window, oldest first.
    log: VecDeque<Instant>,
    arrivals: Vec<Arrival>,
}

/// A vendor with a real sliding-window limit; cheap to clone (shared state).
#[derive(Clone)]
pub struct LimitedVendor {
    pub limit: usize,
    pub window: Duration,
    pub announce: Announce,
    state: Arc<Mutex<State>>,
}

impl LimitedVendor {
    pub fn new(limit: usize, window: Duration, announce: Announce) -> Self {
        Self {
            limit,
            window,
            announce,
            state: Arc::new(Mutex::new(State { log: VecDeque::new(), arrivals: Vec::new() })),
        }
    }

    /// Makes `mock` answer every request with this vendor.
    pub fn install(&self, mock: &MockCrm) {
        let vendor = self.clone();
        mock.set_handler(move |recorded| vendor.answer(recorded));
    }

    /// Judges one request now: accepted (200, echo-ish body) or refused (429 + Retry-After).
    pub fn answer(&self, recorded: &Recorded) -> Response<Full<Bytes>> {
        let mut state = self.state.lock().unwrap();
        let now = Instant::now();
        while state.log.front().is_some_and(|oldest| *oldest + self.window <= now) {
            state.log.pop_front();
        }
        let accepted = state.log.len() < self.limit;
        if accepted {
            state.log.push_back(now);
        }
        let remaining = self.limit - state.log.len();
        // Whole seconds until the oldest accepted request leaves the window (a slot frees).
        let next_slot =
            state.log.front().map_or(Duration::ZERO, |oldest| (*oldest + self.window).saturating_duration_since(now));
        let next_slot_secs = ceil_secs(next_slot);
        let retry_after = (!accepted).then(|| Duration::from_secs(next_slot_secs.max(1)));
        state.arrivals.push(Arrival { at: now, accepted, remaining, retry_after, path: recorded.path.clone() });
        drop(state);

        let mut response = if accepted {
            json(StatusCode::OK, serde_json::json!({"id": recorded.path, "properties": {}}))
        } else {
            let mut refused = json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({
                    "status": "error",
                    "message": "You have reached your ten_secondly_rolling limit.",
                    "errorType": "RATE_LIMIT",
                    "policyName": "TEN_SECONDLY_ROLLING",
                }),
            );
            let seconds = retry_after.unwrap_or_default().as_secs();
            refused.headers_mut().insert("retry-after", seconds.to_string().parse().unwrap());
            refused
        };
        let headers = response.headers_mut();
        match self.announce {
            Announce::Nothing => {}
            Announce::Hubspot => {
                headers.insert("x-hubspot-ratelimit-max", self.limit.to_string().parse().unwrap());
                headers.insert("x-hubspot-ratelimit-remaining", remaining.to_string().parse().unwrap());
                headers.insert(
                    "x-hubspot-ratelimit-interval-milliseconds",
                    self.window.as_millis().to_string().parse().unwrap(),
                );
            }
            Announce::Ietf => {
                let policy = format!("\"default\";q={};w={}", self.limit, self.window.as_secs().max(1));
                headers.insert("ratelimit-policy", policy.parse().unwrap());
                let limit = format!("\"default\";r={remaining};t={next_slot_secs}");
                headers.insert("ratelimit", limit.parse().unwrap());
            }
        }
        response
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().unwrap().arrivals.clone()
    }

    pub fn accepted(&self) -> usize {
        self.arrivals().iter().filter(|arrival| arrival.accepted).count()
    }

    pub fn refused(&self) -> usize {
        self.arrivals().iter().filter(|arrival| !arrival.accepted).count()
    }

    /// The pauses the refusals announced, in arrival order.
    pub fn pauses(&self) -> Vec<Pause> {
        self.arrivals()
            .iter()
            .filter_map(|arrival| arrival.retry_after.map(|wait| Pause { start: arrival.at, end: arrival.at + wait }))
            .collect()
    }

    /// Arrivals strictly inside an announced pause (the refusal that announced it excluded),
    /// each paired with the earliest pause it fell in.
    pub fn violations(&self) -> Vec<Violation> {
        let arrivals = self.arrivals();
        let pauses = self.pauses();
        arrivals
            .iter()
            .filter_map(|arrival| {
                let pause = pauses.iter().find(|pause| pause.start < arrival.at && arrival.at < pause.end)?;
                Some(Violation {
                    at: arrival.at,
                    pause: *pause,
                    after_start: arrival.at - pause.start,
                    accepted: arrival.accepted,
                })
            })
            .collect()
    }

    /// The most accepted requests in any window of length `window` (never above `limit`: a
    /// self-check of the log).
    pub fn max_in_window(&self) -> usize {
        let accepted: Vec<Instant> =
            self.arrivals().iter().filter(|arrival| arrival.accepted).map(|arrival| arrival.at).collect();
        let mut best = 0;
        let mut first = 0;
        for (last, at) in accepted.iter().enumerate() {
            while accepted[first] + self.window <= *at {
                first += 1;
            }
            best = best.max(last + 1 - first);
        }
        best
    }

    /// A readable timeline (ms since the first arrival) of the refusals and what came just
    /// before and after each, for failure messages.
    pub fn refusal_report(&self) -> String {
        let arrivals = self.arrivals();
        let Some(first) = arrivals.first().map(|arrival| arrival.at) else { return "no arrivals".into() };
        let mut out = String::new();
        for (index, arrival) in arrivals.iter().enumerate().filter(|(_, arrival)| !arrival.accepted) {
            let from = index.saturating_sub(3);
            let to = (index + 3).min(arrivals.len());
            out.push_str(&format!("refusal #{index} at {} ms:", (arrival.at - first).as_millis()));
            for near in &arrivals[from..to] {
                out.push_str(&format!(
                    " [{}ms {} r={}]",
                    (near.at - first).as_millis(),
                    if near.accepted { "ok" } else { "429" },
                    near.remaining
                ));
            }
            out.push('\n');
        }
        out
    }
}

fn ceil_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// What a [`ScriptedVendor`] answers to one request: after `delay`, `status` with `headers`.
#[derive(Debug, Clone)]
pub struct Step {
    pub delay: Duration,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Send the body with `Transfer-Encoding: chunked` (no `Content-Length`), as many vendors do.
    pub chunked: bool,
}

impl Step {
    /// Answers `status` at once with a small JSON body.
    pub fn status(status: u16) -> Self {
        Self {
            delay: Duration::ZERO,
            status,
            headers: Vec::new(),
            body: format!("{{\"status\":{status}}}"),
            chunked: false,
        }
    }

    /// Answers only after `delay` (the vendor is slow; asynchronous, nothing is blocked).
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = body.to_owned();
        self
    }

    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
}

/// One request a [`ScriptedVendor`] received.
#[derive(Debug, Clone)]
pub struct ScriptedRequest {
    /// 0 for the first request the vendor received, and so on.
    pub index: usize,
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type Script = Arc<dyn Fn(&ScriptedRequest) -> Step + Send + Sync>;

/// A vendor on a loopback port that answers each request as `script` says, possibly after a
/// delay (which `MockCrm`'s synchronous handlers cannot do). Stops, with its connections, on drop.
pub struct ScriptedVendor {
    pub addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<ScriptedRequest>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl ScriptedVendor {
    pub async fn start(script: impl Fn(&ScriptedRequest) -> Step + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let log = requests.clone();
        let accept = tokio::spawn(async move {
            // Dropped (connections aborted) when the accept task is aborted.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (log, script) = (log.clone(), script.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (log, script) = (log.clone(), script.clone());
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let seen = {
                                let mut log = log.lock().unwrap();
                                let seen = ScriptedRequest {
                                    index: log.len(),
                                    at: Instant::now(),
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_owned(),
                                    headers: parts.headers,
                                    body,
                                };
                                log.push(seen.clone());
                                seen
                            };
                            let step = script(&seen);
                            tokio::time::sleep(step.delay).await;
                            let bytes = Bytes::from(step.body);
                            let body: BoxBody<Bytes, std::convert::Infallible> = if step.chunked {
                                // A stream's size is unknown, so hyper sends it chunked.
                                let frames = futures_util::stream::iter([Ok(http_body::Frame::data(bytes))]);
                                http_body_util::StreamBody::new(frames).boxed()
                            } else {
                                Full::new(bytes).boxed()
                            };
                            let mut response = Response::new(body);
                            *response.status_mut() = StatusCode::from_u16(step.status).unwrap();
                            response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            for (name, value) in &step.headers {
                                response.headers_mut().append(
                                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                                    value.parse().unwrap(),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
                // Reap finished connections so the set stays small.
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, requests, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<ScriptedRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for ScriptedVendor {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
