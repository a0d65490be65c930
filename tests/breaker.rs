#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The circuit breaker (issue 5) through real sockets and real clients: it trips on consecutive
//! failures and, separately, on the failure ratio once `min_requests` were seen; while open it
//! answers 503 itself (Proxy-Status, JSON `circuit_open`, Retry-After = time left open) without
//! calling the vendor or spending a quota token; half-open lets exactly `half_open_requests`
//! probes through per period, re-opens with `open_for` doubled up to `max_open_for`, and closes
//! once the vendor heals. Timeouts and refused connections are failures; 429 and other 4xx are
//! not. Queued requests are answered when it opens, retries never go into it, and a reload keeps
//! its state while its settings are unchanged.
//!
//! No latency is asserted: bounds on time are generous and only say "did not wait out a queue".
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use http::StatusCode;
use serde_json::Value;
use support::mock_crm::json;
use support::{closed_port, direct_client, eventually, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);

/// One reverse-mode upstream `hubspot` at `/hubspot` going to `target`, then `body` (lines
/// indented by four spaces).
fn config(target: &str, body: &str) -> String {
    format!("upstreams:\n  - name: hubspot\n    prefix: /hubspot\n    target: '{target}'\n{body}")
}

/// What a client keeps of a response: status, headers, JSON body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Refused by sluice's own breaker (not a 503 relayed from the vendor).
    fn short_circuited(&self) -> bool {
        self.status == 503 && self.body["error"] == "circuit_open"
    }

    fn retry_after(&self) -> u64 {
        let value = self.header("retry-after").unwrap_or_else(|| panic!("no Retry-After on {}", self.body));
        value.parse().unwrap_or_else(|_| panic!("Retry-After {value:?} is not integer seconds"))
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("sluice answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    Answer { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::Null) }
}

/// GET `path` on the proxy listener (reverse mode).
async fn get(sluice: &TestSluice, path: &str) -> Answer {
    send(direct_client().get(format!("{}{path}", sluice.proxy_url()))).await
}

/// GET `path` as tenant `tenant` (the `x-tenant-id` quota scope).
async fn get_as(sluice: &TestSluice, tenant: &str, path: &str) -> Answer {
    send(direct_client().get(format!("{}{path}", sluice.proxy_url())).header("x-tenant-id", tenant)).await
}

/// The `/breakers` entry of `upstream` (Null while it has none yet).
async fn breaker(sluice: &TestSluice, upstream: &str) -> Value {
    let all: Value = direct_client().get(sluice.admin_url("/breakers")).send().await.unwrap().json().await.unwrap();
    all["breakers"]
        .as_array()
        .unwrap_or_else(|| panic!("/breakers has no list: {all}"))
        .iter()
        .find(|entry| entry["upstream"] == upstream)
        .cloned()
        .unwrap_or(Value::Null)
}

fn open_remaining_ms(entry: &Value) -> u64 {
    entry["open_remaining_ms"].as_u64().unwrap_or_else(|| panic!("no open_remaining_ms in {entry}"))
}

/// Waits (bounded) until `upstream`'s open period has run out, so the next request is a probe.
async fn until_open_period_ends(sluice: &TestSluice, upstream: &str) {
    let ended = eventually(WAIT, || async move { open_remaining_ms(&breaker(sluice, upstream).await) == 0 }).await;
    assert!(ended, "the open period of {upstream} never ended: {}", breaker(sluice, upstream).await);
}

fn transitions(metrics: &str, upstream: &str, from: &str, to: &str) -> f64 {
    metric_value(metrics, "sluice_breaker_transitions_total", &[("upstream", upstream), ("from", from), ("to", to)])
}

fn state_gauge(metrics: &str, upstream: &str) -> f64 {
    metric_value(metrics, "sluice_breaker_state", &[("upstream", upstream)])
}

fn short_circuits(metrics: &str, upstream: &str) -> f64 {
    metric_value(metrics, "sluice_breaker_short_circuited_total", &[("upstream", upstream)])
}

fn decisions(metrics: &str, result: &str) -> f64 {
    metric_value(metrics, "sluice_quota_decisions_total", &[("upstream", "hubspot"), ("result", result)])
}

fn count_path(mock: &MockCrm, path: &str) -> usize {
    mock.requests().iter().filter(|request| request.path == path).count()
}

/// Checks everything a short-circuit answer must carry; returns its Retry-After.
fn assert_short_circuit(answer: &Answer, upstream: &str) -> u64 {
    assert!(answer.short_circuited(), "expected sluice's circuit_open, got {} {}", answer.status, answer.body);
    assert_eq!(answer.body["upstream"], upstream, "{}", answer.body);
    assert!(answer.body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{}", answer.body);
    let proxy_status = answer.header("proxy-status").unwrap_or_else(|| panic!("no Proxy-Status: {}", answer.body));
    assert!(proxy_status.starts_with("sluice; error=destination_unavailable"), "{proxy_status}");
    assert!(
        answer.header("content-type").is_some_and(|value| value.starts_with("application/json")),
        "{:?}",
        answer.headers
    );
    answer.retry_after()
}

#[tokio::test]
async fn consecutive_503s_open_the_breaker_and_later_calls_never_reach_the_vendor() {
    let mock = MockCrm::start().await;
    mock.set_handler(|_| json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"message": "down"})));
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    breaker: { consecutive_failures: 3, min_requests: 100, open_for: 10s, max_open_for: 1m }\n",
    ))
    .await;

    for attempt in 0..3 {
        let answer = get(&sluice, "/hubspot/crm/v3/objects/contacts").await;
        assert_eq!(answer.status, 503, "attempt {attempt}");
        assert!(!answer.short_circuited(), "attempt {attempt} is the vendor's own 503: {}", answer.body);
        assert_eq!(answer.body["message"], "down");
    }
    assert_eq!(mock.request_count(), 3);
    let entry = breaker(&sluice, "hubspot").await;
    assert_eq!(entry["state"], "open", "{entry}");
    let remaining = open_remaining_ms(&entry);
    assert!((5_000..=10_000).contains(&remaining), "open for about 10 s: {entry}");

    for attempt in 0..5 {
        let answer = get(&sluice, "/hubspot/crm/v3/objects/contacts").await;
        let retry_after = assert_short_circuit(&answer, "hubspot");
        assert!((5..=10).contains(&retry_after), "attempt {attempt}: Retry-After {retry_after} ~ time left open");
    }
    assert_eq!(mock.request_count(), 3, "no short-circuited request reached the vendor");

    let metrics = sluice.metrics().await;
    assert_eq!(short_circuits(&metrics, "hubspot"), 5.0, "{metrics}");
    assert_eq!(transitions(&metrics, "hubspot", "closed", "open"), 1.0, "one transition, however many refusals");
    assert_eq!(state_gauge(&metrics, "hubspot"), 2.0, "{metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn failure_ratio_trips_once_min_requests_were_seen_while_consecutive_never_does() {
    let mock = MockCrm::start().await;
    // Failure, success, failure, ...: never two failures in a row.
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    mock.set_handler(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
            json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"message": "down"}))
        } else {
            json(StatusCode::OK, serde_json::json!({"ok": true}))
        }
    });
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    breaker: { failure_ratio: 0.5, min_requests: 10, window: 30s, consecutive_failures: 3, open_for: 10s }\n",
    ))
    .await;

    // Nine requests: 5 failures out of 9 (ratio 0.56), but fewer than min_requests: closed.
    for i in 0..9 {
        let answer = get(&sluice, "/hubspot/anything").await;
        let want = if i % 2 == 0 { 503 } else { 200 };
        assert_eq!(answer.status, want, "request {i}: {}", answer.body);
        assert!(!answer.short_circuited(), "request {i}");
    }
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "closed", "below min_requests");
    // The tenth is a success: trips are judged on failures only.
    assert_eq!(get(&sluice, "/hubspot/anything").await.status, 200);
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "closed");
    // The eleventh, a failure: 6 of 11 >= 0.5 with 10 seen: open.
    let answer = get(&sluice, "/hubspot/anything").await;
    assert_eq!(answer.status, 503);
    assert!(!answer.short_circuited(), "the tripping request itself reached the vendor");
    let entry = breaker(&sluice, "hubspot").await;
    assert_eq!(entry["state"], "open", "{entry}");
    assert_eq!(mock.request_count(), 11);

    let answer = get(&sluice, "/hubspot/anything").await;
    assert_short_circuit(&answer, "hubspot");
    assert_eq!(mock.request_count(), 11);
    let metrics = sluice.metrics().await;
    assert_eq!(transitions(&metrics, "hubspot", "closed", "open"), 1.0, "{metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn an_open_breaker_spends_no_quota_token() {
    let mock = MockCrm::start().await;
    // Tenant `b` trips the breaker (it is per upstream); tenant `a`'s quota is watched. 500, not
    // 503: a 503 is also a vendor throttle and would pause b's scope, which is not under test.
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    over_limit: reject
    quotas: [{ name: burst, limit: 5, per: 10s, burst: 5, key: [header:x-tenant-id] }]
    breaker: { consecutive_failures: 2, min_requests: 100, open_for: 5s, max_open_for: 1m, half_open_requests: 1 }
",
    ))
    .await;

    for _ in 0..2 {
        assert_eq!(get_as(&sluice, "b", "/hubspot/status/500").await.status, 500);
    }
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "open");
    for attempt in 0..30 {
        let answer = get_as(&sluice, "a", "/hubspot/crm/v3/objects/contacts").await;
        assert!(answer.short_circuited(), "attempt {attempt}: {} {}", answer.status, answer.body);
        assert!(answer.header("ratelimit").is_none(), "the limiter was not consulted: {:?}", answer.headers);
    }
    assert_eq!(mock.request_count(), 2);
    let metrics = sluice.metrics().await;
    assert_eq!(short_circuits(&metrics, "hubspot"), 30.0, "{metrics}");
    assert_eq!(decisions(&metrics, "allowed"), 2.0, "refused requests took no decision: {metrics}");
    assert_eq!(decisions(&metrics, "rejected"), 0.0, "{metrics}");

    // Healed: tenant a still has its whole quota (the first of the five is the probe).
    until_open_period_ends(&sluice, "hubspot").await;
    let mut allowed = 0;
    let mut refused = None;
    for _ in 0..10 {
        let answer = get_as(&sluice, "a", "/hubspot/crm/v3/objects/contacts").await;
        match answer.status {
            200 => allowed += 1,
            _ => {
                refused = Some(answer);
                break;
            }
        }
    }
    assert_eq!(allowed, 5, "the 30 short-circuited requests used no token");
    let refused = refused.expect("the sixth request is over quota");
    assert_eq!((refused.status, refused.body["error"].as_str()), (429, Some("rate_limited")), "{}", refused.body);
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "closed");
    sluice.shutdown().await;
}

/// Fires `n` GETs of `path` at once; their answers.
async fn concurrently(sluice: &TestSluice, path: &str, n: usize) -> Vec<Answer> {
    let client = direct_client();
    let url = format!("{}{path}", sluice.proxy_url());
    join_all((0..n).map(|_| send(client.get(&url)))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_probes_are_bounded_backoff_doubles_up_to_the_cap_and_a_healed_vendor_closes_it() {
    let mock = MockCrm::start().await;
    // Probes go to `/slow/3000`, which outlasts the 500 ms request timeout: a slow, failing vendor.
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    timeouts: { request: 500ms }
    breaker: { consecutive_failures: 2, min_requests: 100, open_for: 2s, max_open_for: 5s, half_open_requests: 2 }
",
    ))
    .await;

    for _ in 0..2 {
        assert_eq!(get(&sluice, "/hubspot/status/503").await.status, 503);
    }
    let answer = get(&sluice, "/hubspot/slow/3000").await;
    assert_eq!(assert_short_circuit(&answer, "hubspot"), 2, "Retry-After: open_for is 2 s");
    assert_eq!(count_path(&mock, "/slow/3000"), 0);

    // Two half-open periods that fail: each lets exactly two of ten concurrent requests through;
    // open_for doubles to 4 s, then is capped at 5 s.
    for (round, (low, high)) in [(1, (2_000, 4_000)), (2, (4_000, 5_000))] {
        until_open_period_ends(&sluice, "hubspot").await;
        let before = count_path(&mock, "/slow/3000");
        let answers = concurrently(&sluice, "/hubspot/slow/3000", 10).await;
        let timed_out = answers.iter().filter(|answer| answer.status == 504).count();
        let refused = answers.iter().filter(|answer| answer.short_circuited()).count();
        assert_eq!(count_path(&mock, "/slow/3000") - before, 2, "round {round}: exactly half_open_requests probes");
        assert_eq!((timed_out, refused), (2, 8), "round {round}: statuses {:?}", statuses(&answers));
        let entry = breaker(&sluice, "hubspot").await;
        assert_eq!(entry["state"], "open", "a failed probe re-opens: {entry}");
        let remaining = open_remaining_ms(&entry);
        assert!(remaining > low && remaining <= high, "round {round}: open_remaining_ms {remaining}");
        let retry_after = assert_short_circuit(&get(&sluice, "/hubspot/slow/3000").await, "hubspot");
        assert!(retry_after * 1000 > low && retry_after * 1000 <= high, "round {round}: Retry-After {retry_after}");
    }
    assert_eq!(count_path(&mock, "/slow/3000"), 4);

    // The vendor answers again: the probe succeeds and the breaker closes.
    until_open_period_ends(&sluice, "hubspot").await;
    let answer = get(&sluice, "/hubspot/healthy").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let entry = breaker(&sluice, "hubspot").await;
    assert_eq!((entry["state"].as_str(), open_remaining_ms(&entry)), (Some("closed"), 0), "{entry}");
    for _ in 0..5 {
        assert_eq!(get(&sluice, "/hubspot/healthy").await.status, 200);
    }
    let metrics = sluice.metrics().await;
    assert_eq!(state_gauge(&metrics, "hubspot"), 0.0, "{metrics}");
    assert_eq!(transitions(&metrics, "hubspot", "closed", "open"), 1.0, "{metrics}");
    assert_eq!(transitions(&metrics, "hubspot", "open", "half_open"), 3.0, "{metrics}");
    assert_eq!(transitions(&metrics, "hubspot", "half_open", "open"), 2.0, "{metrics}");
    assert_eq!(transitions(&metrics, "hubspot", "half_open", "closed"), 1.0, "{metrics}");

    // Closing resets the backoff: the next trip opens for open_for again, not 5 s.
    for _ in 0..2 {
        assert_eq!(get(&sluice, "/hubspot/status/503").await.status, 503);
    }
    let entry = breaker(&sluice, "hubspot").await;
    assert_eq!(entry["state"], "open");
    assert!(open_remaining_ms(&entry) <= 2_000, "{entry}");
    sluice.shutdown().await;
}

fn statuses(answers: &[Answer]) -> Vec<(u16, String)> {
    answers.iter().map(|answer| (answer.status, answer.body["error"].as_str().unwrap_or("-").to_owned())).collect()
}

#[tokio::test]
async fn response_timeouts_count_as_failures() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    timeouts: { request: 200ms }
    breaker: { consecutive_failures: 2, min_requests: 100, open_for: 30s }
",
    ))
    .await;
    for attempt in 0..2 {
        let answer = get(&sluice, "/hubspot/slow/2000").await;
        assert_eq!((answer.status, answer.body["error"].as_str()), (504, Some("upstream_timeout")), "{attempt}");
    }
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "open");
    let answer = get(&sluice, "/hubspot/slow/2000").await;
    assert_short_circuit(&answer, "hubspot");
    assert_eq!(mock.request_count(), 2);
    let metrics = sluice.metrics().await;
    assert_eq!(transitions(&metrics, "hubspot", "closed", "open"), 1.0, "{metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn refused_connections_count_as_failures() {
    let target = format!("http://127.0.0.1:{}", closed_port());
    let sluice = TestSluice::start(&config(
        &target,
        "    breaker: { consecutive_failures: 2, min_requests: 100, open_for: 30s }\n",
    ))
    .await;
    for attempt in 0..2 {
        let answer = get(&sluice, "/hubspot/anything").await;
        assert_eq!((answer.status, answer.body["error"].as_str()), (502, Some("upstream_unreachable")), "{attempt}");
    }
    let answer = get(&sluice, "/hubspot/anything").await;
    assert_short_circuit(&answer, "hubspot");
    let metrics = sluice.metrics().await;
    assert_eq!(short_circuits(&metrics, "hubspot"), 1.0, "{metrics}");
    assert_eq!(transitions(&metrics, "hubspot", "closed", "open"), 1.0, "{metrics}");
    assert_eq!(state_gauge(&metrics, "hubspot"), 2.0, "{metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn rate_limits_and_client_errors_are_not_failures() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    breaker: { failure_ratio: 0.5, min_requests: 4, consecutive_failures: 2, open_for: 30s }\n",
    ))
    .await;
    for (status, path) in [(429, "/status/429"), (404, "/status/404"), (400, "/status/400"), (403, "/status/403")] {
        for attempt in 0..6 {
            let answer = get(&sluice, &format!("/hubspot{path}")).await;
            assert_eq!(answer.status, status, "{path} attempt {attempt}: {}", answer.body);
            assert!(!answer.short_circuited(), "{path} attempt {attempt}");
        }
        assert_eq!(count_path(&mock, path), 6, "every {status} reached the vendor");
        assert_eq!(breaker(&sluice, "hubspot").await["state"], "closed", "{status} is not a failure");
    }
    let metrics = sluice.metrics().await;
    assert_eq!(transitions(&metrics, "hubspot", "closed", "open"), 0.0, "{metrics}");
    assert_eq!(state_gauge(&metrics, "hubspot"), 0.0, "{metrics}");

    // The thresholds are live: two 503s in a row do trip it.
    for _ in 0..2 {
        assert_eq!(get(&sluice, "/hubspot/status/503").await.status, 503);
    }
    assert_short_circuit(&get(&sluice, "/hubspot/status/429").await, "hubspot");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_are_answered_when_the_breaker_opens() {
    let mock = MockCrm::start().await;
    // One token per 30 s per tenant: a's second and third requests would queue ~30 s and ~60 s.
    let sluice = TestSluice::start(&config(
        &mock.url(),
        "    over_limit: queue
    max_queue_wait: 90s
    quotas: [{ name: burst, limit: 1, per: 30s, burst: 1, key: [header:x-tenant-id] }]
    breaker: { consecutive_failures: 1, min_requests: 100, open_for: 30s }
",
    ))
    .await;
    assert_eq!(get_as(&sluice, "a", "/hubspot/first").await.status, 200);

    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().unwrap();
    let url = format!("{}/hubspot/queued", sluice.proxy_url());
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let request = client.get(&url).header("x-tenant-id", "a");
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = send(request).await;
                (answer, started.elapsed())
            })
        })
        .collect();
    let all_queued = eventually(WAIT, || async { decisions(&sluice.metrics().await, "queued") >= 2.0 }).await;
    assert!(all_queued, "both requests queue: {}", sluice.metrics().await);

    // Tenant b has its own token; its call fails and opens the (per-upstream) breaker.
    let tripped = Instant::now();
    let answer = get_as(&sluice, "b", "/hubspot/status/500").await;
    assert_eq!(answer.status, 500);
    for handle in queued {
        let (answer, waited) = tokio::time::timeout(Duration::from_secs(25), handle)
            .await
            .expect("queued requests are answered when the breaker opens, not after their queue time")
            .unwrap();
        assert!(answer.short_circuited(), "{} {}", answer.status, answer.body);
        assert!(answer.header("proxy-status").is_some());
        assert!(answer.header("retry-after").is_some());
        assert!(waited < Duration::from_secs(25), "waited {waited:?}, its turn was 30 s or more away");
    }
    assert!(tripped.elapsed() < Duration::from_secs(25));
    assert_eq!(count_path(&mock, "/queued"), 0, "no queued request reached the vendor");
    assert_eq!(mock.request_count(), 2);
    sluice.shutdown().await;
}

#[tokio::test]
async fn retries_never_go_into_an_open_breaker() {
    let guarded = MockCrm::start().await;
    let control = MockCrm::start().await;
    for mock in [&guarded, &control] {
        mock.set_handler(|_| json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"message": "down"})));
    }
    let sluice = TestSluice::start(&format!(
        "upstreams:
  - name: guarded
    prefix: /guarded
    target: '{}'
    retry: {{ attempts: 3, backoff: 10ms, max_backoff: 50ms, budget: 5 }}
    breaker: {{ consecutive_failures: 1, min_requests: 100, open_for: 30s }}
  - name: control
    prefix: /control
    target: '{}'
    retry: {{ attempts: 3, backoff: 10ms, max_backoff: 50ms, budget: 5 }}
    breaker: {{ consecutive_failures: 10, min_requests: 100, open_for: 30s }}
",
        guarded.url(),
        control.url()
    ))
    .await;

    // Control: the same retry policy does retry a 503 while its breaker stays closed.
    let answer = get(&sluice, "/control/contacts").await;
    assert_eq!(answer.status, 503);
    assert_eq!(control.request_count(), 3, "the retry policy is live");

    // Guarded: the first 503 opens the breaker; no retry follows.
    let answer = get(&sluice, "/guarded/contacts").await;
    assert_eq!(answer.status, 503);
    assert!(!answer.short_circuited(), "the caller gets the vendor's answer: {}", answer.body);
    assert_eq!(guarded.request_count(), 1, "no retry into the open breaker");
    let answer = get(&sluice, "/guarded/contacts").await;
    assert_short_circuit(&answer, "guarded");
    assert_eq!(guarded.request_count(), 1);
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_retries_total", &[("upstream", "guarded")]), 0.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "sluice_retries_total", &[("upstream", "control")]), 2.0, "{metrics}");
    sluice.shutdown().await;
}

/// `hubspot` (with a breaker) and `other` (with the given request timeout).
fn two_upstreams(hubspot: &MockCrm, other: &MockCrm, open_for: &str, other_timeout: &str) -> String {
    format!(
        "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    breaker: {{ consecutive_failures: 2, min_requests: 100, open_for: {open_for}, max_open_for: 5m }}
  - name: other
    prefix: /other
    target: '{}'
    timeouts: {{ request: {other_timeout} }}
",
        hubspot.url(),
        other.url()
    )
}

async fn post_reload(sluice: &TestSluice) -> Value {
    let response = direct_client().post(sluice.admin_url("/reload")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "reloaded", "{body}");
    body
}

#[tokio::test]
async fn reload_keeps_the_state_while_breaker_settings_are_unchanged() {
    let hubspot = MockCrm::start().await;
    let other = MockCrm::start().await;
    let sluice = TestSluice::start(&two_upstreams(&hubspot, &other, "60s", "5s")).await;
    for _ in 0..2 {
        assert_eq!(get(&sluice, "/hubspot/status/503").await.status, 503);
    }
    assert_short_circuit(&get(&sluice, "/hubspot/contacts").await, "hubspot");

    // Another upstream's timeout changes: hubspot's breaker stays open.
    sluice.write_config(&two_upstreams(&hubspot, &other, "60s", "6s"));
    post_reload(&sluice).await;
    let config: Value = direct_client().get(sluice.admin_url("/config")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["config"]["upstreams"][1]["timeouts"]["request"], "6s", "the new file is applied: {config}");
    let answer = get(&sluice, "/hubspot/contacts").await;
    let retry_after = assert_short_circuit(&answer, "hubspot");
    assert!((30..=60).contains(&retry_after), "same open period, not a new one: {retry_after}");
    let entry = breaker(&sluice, "hubspot").await;
    assert_eq!(entry["state"], "open", "{entry}");
    assert!(open_remaining_ms(&entry) > 30_000, "{entry}");
    assert_eq!(get(&sluice, "/other/ping").await.status, 200);
    assert_eq!(hubspot.request_count(), 2, "still nothing reaches hubspot");

    // Hubspot's breaker settings change: a fresh, closed breaker.
    sluice.write_config(&two_upstreams(&hubspot, &other, "61s", "6s"));
    post_reload(&sluice).await;
    let answer = get(&sluice, "/hubspot/contacts").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(hubspot.request_count(), 3);
    let entry = breaker(&sluice, "hubspot").await;
    assert_eq!((entry["state"].as_str(), open_remaining_ms(&entry)), (Some("closed"), 0), "{entry}");
    let metrics = sluice.metrics().await;
    assert_eq!(state_gauge(&metrics, "hubspot"), 0.0, "{metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn admin_view_shows_the_fresh_breaker_right_after_a_reload_that_changed_its_settings() {
    let hubspot = MockCrm::start().await;
    let other = MockCrm::start().await;
    let sluice = TestSluice::start(&two_upstreams(&hubspot, &other, "60s", "5s")).await;
    for _ in 0..2 {
        assert_eq!(get(&sluice, "/hubspot/status/503").await.status, 503);
    }
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "open");

    sluice.write_config(&two_upstreams(&hubspot, &other, "61s", "5s"));
    post_reload(&sluice).await;
    // No request yet: what an SRE (or an alert on the gauge) sees must already be the new state.
    let entry = breaker(&sluice, "hubspot").await;
    assert!(entry.is_null() || entry["state"] == "closed", "/breakers after the reload: {entry}");
    let metrics = sluice.metrics().await;
    assert_eq!(state_gauge(&metrics, "hubspot"), 0.0, "{metrics}");

    // Open it again, then drop the breaker from the config: neither view keeps a stale state.
    for _ in 0..2 {
        assert_eq!(get(&sluice, "/hubspot/status/503").await.status, 503);
    }
    assert_eq!(breaker(&sluice, "hubspot").await["state"], "open");
    let without = two_upstreams(&hubspot, &other, "61s", "5s")
        .lines()
        .filter(|line| !line.contains("breaker:"))
        .map(|line| format!("{line}\n"))
        .collect::<String>();
    sluice.write_config(&without);
    post_reload(&sluice).await;
    assert_eq!(breaker(&sluice, "hubspot").await, Value::Null, "no breaker is configured for hubspot any more");
    let metrics = sluice.metrics().await;
    assert!(!metrics.contains("sluice_breaker_state{upstream=\"hubspot\"} 2"), "{metrics}");
    assert_eq!(get(&sluice, "/hubspot/contacts").await.status, 200);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_concurrency_slot_are_answered_when_the_breaker_opens() {
    let mock = MockCrm::start().await;
    // Four independent upstreams, each with one slot held by a call the vendor never answers in
    // time, and three requests waiting for that slot. When the holder times out, its breaker
    // opens: every waiter must be answered by sluice, none may reach the vendor.
    const UPSTREAMS: usize = 4;
    const WAITERS: usize = 3;
    let mut yaml = String::from("upstreams:\n");
    for n in 0..UPSTREAMS {
        yaml.push_str(&format!(
            "  - name: u{n}
    prefix: /u{n}
    target: '{}'
    timeouts: {{ request: 2s }}
    max_concurrency: 1
    max_queue_wait: 60s
    breaker: {{ consecutive_failures: 1, min_requests: 100, open_for: 60s }}
",
            mock.url()
        ));
    }
    let sluice = TestSluice::start(&yaml).await;
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(90)).build().unwrap();
    let spawn_get = |path: String| {
        let request = client.get(format!("{}{path}", sluice.proxy_url()));
        tokio::spawn(async move { send(request).await })
    };
    let holders: Vec<_> = (0..UPSTREAMS).map(|n| spawn_get(format!("/u{n}/slow/30000"))).collect();
    let holding = eventually(WAIT, || async { count_path(&mock, "/slow/30000") == UPSTREAMS }).await;
    assert!(holding, "every slot is taken");
    let waiters: Vec<_> = (0..UPSTREAMS)
        .flat_map(|n| (0..WAITERS).map(move |w| (n, w)))
        .map(|(n, _)| spawn_get(format!("/u{n}/queued")))
        .collect();
    let waiting = eventually(WAIT, || async {
        metric_value(&sluice.metrics().await, "sluice_requests_in_flight", &[]) >= (UPSTREAMS * (WAITERS + 1)) as f64
    })
    .await;
    assert!(waiting, "all waiters are in: {}", sluice.metrics().await);

    for holder in holders {
        let answer = tokio::time::timeout(Duration::from_secs(30), holder).await.unwrap().unwrap();
        assert_eq!(answer.status, 504, "{}", answer.body);
    }
    let mut answers = Vec::new();
    for waiter in waiters {
        let answer = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("waiters are answered when the breaker opens, not after max_queue_wait")
            .unwrap();
        answers.push(answer);
    }
    assert_eq!(count_path(&mock, "/queued"), 0, "no waiter reached the vendor: {:?}", statuses(&answers));
    assert!(answers.iter().all(Answer::short_circuited), "{:?}", statuses(&answers));
    sluice.shutdown().await;
}
