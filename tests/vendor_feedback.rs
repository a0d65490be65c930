#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Listening to the vendor (issue 4), end to end over real sockets: a mock vendor with a REAL
//! sliding-window limit (`support::vendor`), sluice replicas sharing a real `redis-server`, real
//! HTTP clients. Shared pauses after a 429, header-driven slowdown, per-profile over-limit
//! signals (HubSpot policies, Salesforce 403), effective limits, malformed headers, HTTP-date
//! `Retry-After`, and reject mode during a pause.
//!
//! The three load runs (~25 s each) take turns through [`LOAD`]: they share two cores with the
//! rest of the suite, and a starved scheduler would blur the timing they measure.
mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::Value;
use support::mock_crm::{hubspot_rate_headers, json};
use support::raw_http::check_synthetic;
use support::redis::RedisServer;
use support::vendor::{Announce, LimitedVendor, ScriptedVendor, Step};
use support::{direct_client, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

/// One load run at a time (see the module doc).
static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the load runs push traffic.
const RUN_FOR: Duration = Duration::from_secs(25);
/// Client loops per replica.
const CLIENTS_PER_REPLICA: usize = 4;

/// How late after a refusal a request may still reach the vendor inside the pause it announced.
///
/// The vendor announces its pause the instant it refuses; sluice can record it (locally, then in
/// Redis for the other replicas) only once the 429 has travelled back and been read. A request
/// that passed its last pause check before that moment is already on its way and lands inside
/// the announced pause through no fault of the pause logic. That gap is one loopback response
/// plus one Redis write (a few ms); 100 ms leaves room for two shared, busy cores. The measured
/// worst case is printed by each run. A request arriving later than this, or near a pause's end,
/// means a replica did not hold.
const IN_FLIGHT_TOLERANCE: Duration = Duration::from_millis(100);

fn cluster_yaml(redis: &RedisServer, mock: &MockCrm, limit_headers: &str) -> String {
    format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}
upstreams:
  - name: crm
    prefix: /crm
    target: '{}'
    max_queue_wait: 15s
    limit_headers: {limit_headers}
    quotas:
      - {{ name: burst, limit: 200, per: 10s }}
",
        redis.url(),
        mock.url()
    )
}

/// One upstream `name` at `/name` on `mock`, memory store, with `body` (indented four spaces).
fn single_yaml(name: &str, mock: &MockCrm, body: &str) -> String {
    format!("upstreams:\n  - name: {name}\n    prefix: /{name}\n    target: '{}'\n{body}", mock.url())
}

/// What the clients of a load run got back.
#[derive(Debug, Default)]
struct Load {
    ok: usize,
    /// 429s made by the vendor and passed through (no `Proxy-Status`).
    vendor_429: usize,
    /// 429s sluice made itself (a pause or the queue outlasting the caller's wait).
    sluice_429: usize,
    /// Of those, the ones more than 3 s before the end (later, callers accept ever shorter waits).
    sluice_429_early: usize,
    other: Vec<String>,
}

/// `CLIENTS_PER_REPLICA` client loops per replica, each sending GETs back to back for `run_for`.
/// A request never waits in sluice's queue past the end of the run (`Sluice-Max-Wait`), so the
/// run ends on time; every loop is also bounded by a count.
async fn push_load(replicas: &[TestSluice], run_for: Duration) -> Load {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (replica, sluice) in replicas.iter().enumerate() {
        for client_no in 0..CLIENTS_PER_REPLICA {
            let base = format!("{}/crm/crm/v3/objects/contacts/{replica}-{client_no}", sluice.proxy_url());
            tasks.push(tokio::spawn(async move {
                let client = direct_client();
                let mut load = Load::default();
                for i in 0..20_000 {
                    let left = run_for.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    let wait = left.min(Duration::from_secs(15));
                    let response = client
                        .get(format!("{base}-{i}"))
                        .header("sluice-max-wait", format!("{:.3}", wait.as_secs_f64()))
                        .send()
                        .await;
                    match response {
                        Ok(response) if response.status() == StatusCode::OK => load.ok += 1,
                        Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                            if response.headers().contains_key("proxy-status") {
                                load.sluice_429 += 1;
                                if left > Duration::from_secs(3) {
                                    load.sluice_429_early += 1;
                                }
                                // A polite caller: back off a little before asking again.
                                tokio::time::sleep(left.min(Duration::from_millis(200))).await;
                            } else {
                                load.vendor_429 += 1;
                            }
                        }
                        Ok(response) => {
                            let status = response.status();
                            load.other.push(format!("{status}: {}", response.text().await.unwrap_or_default()));
                        }
                        Err(error) => load.other.push(format!("client error: {error}")),
                    }
                }
                load
            }));
        }
    }
    let mut total = Load::default();
    for task in tasks {
        let load = task.await.unwrap();
        total.ok += load.ok;
        total.vendor_429 += load.vendor_429;
        total.sluice_429 += load.sluice_429;
        total.sluice_429_early += load.sluice_429_early;
        total.other.extend(load.other);
    }
    total
}

async fn start_replicas(redis: &RedisServer, mock: &MockCrm, limit_headers: &str) -> Vec<TestSluice> {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(TestSluice::start(&cluster_yaml(redis, mock, limit_headers)).await);
    }
    for sluice in &replicas {
        let ready: Value = direct_client().get(sluice.admin_url("/readyz")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ready["store"]["mode"], "shared", "every replica shares the one Redis: {ready}");
    }
    replicas
}

/// Sum of a metric over all replicas.
async fn fleet_metric(replicas: &[TestSluice], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for sluice in replicas {
        sum += metric_value(&sluice.metrics().await, name, labels);
    }
    sum
}

/// Prints what the vendor saw in a run; returns (arrivals, refused).
fn report(label: &str, vendor: &LimitedVendor, load: &Load) -> (usize, usize) {
    let arrivals = vendor.arrivals().len();
    let refused = vendor.refused();
    let violations = vendor.violations();
    let worst = violations.iter().map(|v| v.after_start).max().unwrap_or_default();
    println!(
        "[{label}] vendor: {arrivals} arrivals, {} accepted, {refused} refused ({:.2}%), max {} in any {:?} \
         window (limit {}); {} announced pauses; {} arrivals inside one, the latest {:?} after the refusal",
        vendor.accepted(),
        100.0 * refused as f64 / arrivals.max(1) as f64,
        vendor.max_in_window(),
        vendor.window,
        vendor.limit,
        vendor.pauses().len(),
        violations.len(),
        worst,
    );
    println!(
        "[{label}] clients: {} ok, {} vendor 429s passed through, {} sluice 429s ({} before the last 3 s), {} other",
        load.ok,
        load.vendor_429,
        load.sluice_429,
        load.sluice_429_early,
        load.other.len()
    );
    let arrivals_at: Vec<Instant> = vendor.arrivals().iter().map(|arrival| arrival.at).collect();
    if let Some(first) = arrivals_at.first() {
        let early = arrivals_at.iter().filter(|at| at.duration_since(*first) < Duration::from_secs(1)).count();
        println!("[{label}] {early} arrivals in the first second (before every replica had heard from the vendor)");
    }
    // How long after each announced pause ended the next request came: never negative.
    let after_end: Vec<i128> = vendor
        .pauses()
        .iter()
        .filter_map(|pause| {
            let next = arrivals_at.iter().find(|at| **at > pause.start)?;
            Some(
                next.duration_since(pause.end).as_millis() as i128
                    - pause.end.duration_since(*next).as_millis() as i128,
            )
        })
        .collect();
    println!("[{label}] first arrival after each announced pause, ms past its end: {after_end:?}");
    if refused > 0 {
        print!("[{label}] refusals (time since first arrival, 3 arrivals either side):\n{}", vendor.refusal_report());
    }
    (arrivals, refused)
}

/// The issue's test: the vendor's real limit (50 per 10 s) is a quarter of the configured quota
/// (200 per 10 s) and it says nothing but 429 + Retry-After. Three replicas on one Redis: after
/// the first 429 no request reaches the vendor during any pause it announced (beyond the in-flight
/// tolerance), and 429s stay under 5% of what reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hold_through_every_announced_pause() {
    let _turn = LOAD.lock().await;
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let vendor = LimitedVendor::new(50, Duration::from_secs(10), Announce::Nothing);
    vendor.install(&mock);
    let replicas = start_replicas(&redis, &mock, "none").await;

    let load = push_load(&replicas, RUN_FOR).await;
    let (arrivals, refused) = report("429 + Retry-After only", &vendor, &load);

    assert!(load.other.is_empty(), "unexpected answers: {:?}", &load.other[..load.other.len().min(5)]);
    assert!(refused >= 1, "the vendor's limit was never reached: the run proves nothing");
    assert!(vendor.max_in_window() <= vendor.limit, "the mock's own log is consistent");
    for violation in vendor.violations() {
        assert!(
            violation.after_start <= IN_FLIGHT_TOLERANCE,
            "a request reached the vendor {:?} into a {:?} pause it had announced (tolerance {IN_FLIGHT_TOLERANCE:?})\n{}",
            violation.after_start,
            violation.pause.end - violation.pause.start,
            vendor.refusal_report()
        );
    }
    // A quota configured at 4x the vendor's real limit goes out as a full burst (that is the
    // point of the rolling-window shape), so the requests already in flight when the first 429
    // comes back are refused too: at most one per client loop. From then on the replicas hold.
    let arrived = vendor.arrivals();
    let first_refusal = arrived.iter().find(|arrival| !arrival.accepted).map(|arrival| arrival.at);
    let later = first_refusal.map_or(0, |first| {
        arrived.iter().filter(|arrival| !arrival.accepted && arrival.at > first + IN_FLIGHT_TOLERANCE).count()
    });
    let in_flight = refused - later;
    assert!(
        in_flight <= 3 * CLIENTS_PER_REPLICA + 1,
        "{in_flight} refused around the first 429: more than were in flight"
    );
    assert!(
        later * 20 < arrivals,
        "after the first 429, {later} of {arrivals} requests at the vendor were refused: not under 5%"
    );
    assert!(fleet_metric(&replicas, "sluice_vendor_pauses_total", &[("reason", "retry_after")]).await >= 1.0);
    assert_eq!(fleet_metric(&replicas, "sluice_store_degraded", &[]).await, 0.0, "Redis stayed shared");
    for sluice in replicas {
        sluice.shutdown().await;
    }
}

/// Header-driven slowdown: the vendor announces its limit on every response; the replicas stay
/// under it without being refused once.
async fn header_driven_run(announce: Announce, limit_headers: &str) {
    let _turn = LOAD.lock().await;
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let vendor = LimitedVendor::new(50, Duration::from_secs(10), announce);
    vendor.install(&mock);
    let replicas = start_replicas(&redis, &mock, limit_headers).await;

    let load = push_load(&replicas, RUN_FOR).await;
    let (_, refused) = report(limit_headers, &vendor, &load);
    let pauses = fleet_metric(&replicas, "sluice_vendor_pauses_total", &[]).await;
    println!("[{limit_headers}] sluice recorded {pauses} vendor pauses over the fleet");

    assert!(load.other.is_empty(), "unexpected answers: {:?}", &load.other[..load.other.len().min(5)]);
    // The demand must exceed the vendor's limit, or zero 429s would prove nothing.
    // (A HubSpot `Remaining: 0` holds the fleet for the window's length, so it fills the window
    // once rather than every 10 s: pressing past one window's worth is the proof.)
    assert!(vendor.accepted() > vendor.limit, "the run must press the vendor: {}", vendor.accepted());
    for sluice in &replicas {
        let metrics = sluice.metrics().await;
        assert_eq!(
            metric_value(&metrics, "sluice_quota_effective_limit", &[("upstream", "crm"), ("quota", "burst")]),
            50.0,
            "every replica follows the announced limit"
        );
    }
    assert_eq!(refused, 0, "the vendor refused {refused} requests:\n{}", vendor.refusal_report());
    for sluice in replicas {
        sluice.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ietf_ratelimit_headers_keep_three_replicas_under_the_vendor_limit() {
    header_driven_run(Announce::Ietf, "ietf").await;
}

/// Observed (two 25 s runs): 1 refusal of 123 arrivals each time. 15 requests reached the vendor
/// in the first second (10 at once under the configured 200 / 10 s, burst 10, before the replicas
/// heard `Max: 50`); then the paced 50 / 10 s (one per ~206 ms) filled the vendor's window, it
/// said `Remaining: 0` at ~8.05 s and sluice sent the next request ~206 ms later, which was refused. The `Remaining: 0` was
/// ignored because the feedback layer pauses on remaining only when the window has a known reset
/// (`reset_in`), and HubSpot's rolling window never has one. With `ietf` (which gives `t`) the
/// same run has zero 429s. See the report for the proposed fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubspot_ratelimit_headers_keep_three_replicas_under_the_vendor_limit() {
    header_driven_run(Announce::Hubspot, "hubspot").await;
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|value| value.to_str().ok())
}

/// `Retry-After` of a response, in whole seconds.
fn retry_after_secs(response: &reqwest::Response) -> u64 {
    header(response, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After on {} ({:?})", response.status(), response.headers()))
}

/// Asserts `response` is sluice's own 429 (`Proxy-Status`, JSON body) and returns its Retry-After.
async fn expect_sluice_429(response: reqwest::Response) -> u64 {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let seconds = retry_after_secs(&response);
    let proxy_status = header(&response, "proxy-status").map(str::to_owned);
    let content_type = header(&response, "content-type").map(str::to_owned);
    let body = response.bytes().await.unwrap();
    let json = check_synthetic(
        proxy_status.as_deref(),
        content_type.as_deref(),
        &body,
        "rate_limited",
        "http_request_denied",
        "sluice 429",
    );
    assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()), "{json}");
    seconds
}

const TEN_SECONDLY_BODY: &str = r#"{"status":"error","message":"You have reached your ten_secondly_rolling limit.","errorType":"RATE_LIMIT","correlationId":"c033cdaa-2c40-4a64-ae48-b4cec88dad24","policyName":"TEN_SECONDLY_ROLLING","requestId":"3d3e35b7-0dae-4b9f-a6e3-9c230cbcf8dd"}"#;
const DAILY_BODY: &str = r#"{"status":"error","message":"You have reached your daily limit.","errorType":"RATE_LIMIT","correlationId":"c033cdaa-2c40-4a64-ae48-b4cec88dad24","policyName":"DAILY","requestId":"5d3e35b7-0dae-4b9f-a6e3-9c230cbcf8dd"}"#;

/// A mock whose first answer is `first` and every later one 200 with HubSpot rate headers.
fn refuse_once(
    mock: &MockCrm,
    first: impl Fn() -> http::Response<http_body_util::Full<bytes::Bytes>> + Send + Sync + 'static,
) {
    let seen = AtomicUsize::new(0);
    mock.set_handler(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            return first();
        }
        let mut ok = json(StatusCode::OK, serde_json::json!({"ok": true}));
        hubspot_rate_headers(ok.headers_mut(), 190, 150);
        ok
    });
}

fn hubspot_429(body: &'static str) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut response = json(StatusCode::TOO_MANY_REQUESTS, serde_json::from_str(body).unwrap());
    // The fixture's headers: the rolling window is spent; no Retry-After (HubSpot sends none).
    hubspot_rate_headers(response.headers_mut(), 190, 0);
    response
}

/// HubSpot's `TEN_SECONDLY_ROLLING` 429 carries no Retry-After: the profile pauses the upstream
/// for the window (10 s). Callers then wait or get sluice's own 429, and nothing reaches the
/// vendor until the pause is over; waiting callers are released with positive jitter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubspot_ten_secondly_429_pauses_for_the_interval() {
    let mock = MockCrm::start().await;
    refuse_once(&mock, || hubspot_429(TEN_SECONDLY_BODY));
    let sluice =
        TestSluice::start(&single_yaml("hubspot", &mock, "    limit_headers: hubspot\n    max_queue_wait: 15s\n"))
            .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    let refused = client.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&refused, "proxy-status").is_none(), "the vendor's own 429 is passed through");
    let refused_at = mock.requests()[0].at;

    // A caller that will not wait is told how long the pause still lasts.
    let now = client.get(&url).header("sluice-max-wait", "0").send().await.unwrap();
    let seconds = expect_sluice_429(now).await;
    assert!((9..=10).contains(&seconds), "Retry-After {seconds}: the 10 s interval");

    // Callers that wait are held through the pause.
    let mut waiting = Vec::new();
    for i in 0..5 {
        let client = client.clone();
        let url = format!("{url}/{i}");
        waiting.push(tokio::spawn(async move { client.get(&url).send().await.unwrap().status() }));
    }
    for task in waiting {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let requests = mock.requests();
    assert_eq!(requests.len(), 6, "the refused request and the five held ones, nothing else");
    let offsets: Vec<Duration> = requests[1..].iter().map(|r| r.at - refused_at).collect();
    println!("held requests reached the vendor at {offsets:?} after the 429");
    for offset in &offsets {
        assert!(*offset >= Duration::from_secs(10), "a request reached the vendor {offset:?} into a 10 s pause");
    }
    let spread = *offsets.iter().max().unwrap() - *offsets.iter().min().unwrap();
    assert!(spread > Duration::ZERO, "held requests are released with jitter, not all at the reset instant");

    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_pauses_total", &[("upstream", "hubspot"), ("reason", "profile")]),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_throttles_total", &[("upstream", "hubspot"), ("class", "burst")]),
        1.0
    );
    sluice.shutdown().await;
}

/// HubSpot's `DAILY` 429 has no known end (the account's midnight): the upstream is held and
/// callers get sluice's 429 with a Retry-After instead of hammering the vendor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_daily_429_holds_instead_of_hammering() {
    let mock = MockCrm::start().await;
    refuse_once(&mock, || hubspot_429(DAILY_BODY));
    let sluice =
        TestSluice::start(&single_yaml("hubspot", &mock, "    limit_headers: hubspot\n    max_queue_wait: 2s\n")).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    let refused = client.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&refused, "proxy-status").is_none());
    for _ in 0..5 {
        let seconds = expect_sluice_429(client.get(&url).send().await.unwrap()).await;
        assert!(seconds >= 30, "a daily throttle holds for a long time, not {seconds} s");
    }
    assert_eq!(mock.request_count(), 1, "nothing more reached the vendor");
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_throttles_total", &[("upstream", "hubspot"), ("class", "daily")]),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_pauses_total", &[("upstream", "hubspot"), ("reason", "daily")]),
        1.0
    );
    sluice.shutdown().await;
}

/// The fixture's Salesforce over-limit answer: 403 `REQUEST_LIMIT_EXCEEDED`, no Retry-After.
fn salesforce_403() -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/crm/salesforce/over-limit.403.response.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let response = &fixture["response"];
    assert_eq!(response["status"], 403);
    json(StatusCode::FORBIDDEN, response["body"].clone())
}

/// Salesforce answers 403 `REQUEST_LIMIT_EXCEEDED` (not 429): with `limit_headers: salesforce`
/// that is a throttle (a pause), not a 403 to pass through again and again; and the remaining
/// allocation from `Sforce-Limit-Info` is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_403_request_limit_exceeded_is_a_throttle() {
    let mock = MockCrm::start().await;
    let seen = AtomicUsize::new(0);
    mock.set_handler(move |_| match seen.fetch_add(1, Ordering::SeqCst) {
        0 => {
            let mut ok = json(StatusCode::OK, serde_json::json!({"totalSize": 0, "records": []}));
            ok.headers_mut().insert("sforce-limit-info", "api-usage=4990/5000".parse().unwrap());
            ok
        }
        1 => salesforce_403(),
        _ => json(StatusCode::OK, serde_json::json!({"totalSize": 0, "records": []})),
    });
    let sluice =
        TestSluice::start(&single_yaml("salesforce", &mock, "    limit_headers: salesforce\n    max_queue_wait: 2s\n"))
            .await;
    let client = direct_client();
    let url = format!("{}/salesforce/services/data/v62.0/sobjects/Contact/003x", sluice.proxy_url());

    assert_eq!(client.get(&url).send().await.unwrap().status(), StatusCode::OK);
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_remaining", &[("upstream", "salesforce"), ("window", "api-usage")]),
        10.0,
        "5000 - 4990 left"
    );

    let forbidden = client.get(&url).send().await.unwrap();
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN, "the vendor's 403 itself is passed through once");
    assert!(header(&forbidden, "proxy-status").is_none());
    let body: Value = forbidden.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "REQUEST_LIMIT_EXCEEDED", "body intact after being read: {body}");

    for _ in 0..5 {
        expect_sluice_429(client.get(&url).send().await.unwrap()).await;
    }
    assert_eq!(mock.request_count(), 2, "no more requests reached the vendor during the pause");
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_throttles_total", &[("upstream", "salesforce"), ("class", "daily")]),
        1.0
    );
    assert_eq!(metric_value(&metrics, "sluice_vendor_pauses_total", &[("upstream", "salesforce")]), 1.0);
    sluice.shutdown().await;
}

/// The vendor says its limit is 20 per 100 s while 100 are configured: the effective limit
/// follows it down (gauge and behaviour), and back up once the vendor reports 100 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effective_limit_follows_the_vendor_down_and_back_up() {
    let mock = MockCrm::start().await;
    let announced = Arc::new(AtomicU64::new(20));
    let max = announced.clone();
    mock.set_handler(move |_| {
        let max = max.load(Ordering::SeqCst);
        let mut ok = json(StatusCode::OK, serde_json::json!({"ok": true}));
        let headers = ok.headers_mut();
        headers.insert("x-hubspot-ratelimit-max", max.to_string().parse().unwrap());
        headers.insert("x-hubspot-ratelimit-remaining", (max - 1).to_string().parse().unwrap());
        headers.insert("x-hubspot-ratelimit-interval-milliseconds", "100000".parse().unwrap());
        ok
    });
    let body = "    limit_headers: hubspot\n    max_queue_wait: 10s\n    quotas:\n      - { name: burst, limit: 100, per: 100s }\n";
    let sluice = TestSluice::start(&single_yaml("hubspot", &mock, body)).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let gauge = |metrics: &str| {
        metric_value(metrics, "sluice_quota_effective_limit", &[("upstream", "hubspot"), ("quota", "burst")])
    };

    assert_eq!(client.get(&url).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(gauge(&sluice.metrics().await), 20.0, "followed the vendor down");

    // Configured (100 per 100 s) would let 99 more through at once; the vendor's 20 lets 19 more.
    let mut allowed = 0;
    let send_now = || client.get(&url).header("sluice-max-wait", "0").send();
    for _ in 0..18 {
        match send_now().await.unwrap() {
            response if response.status() == StatusCode::OK => allowed += 1,
            response => panic!("unexpected {}: {}", response.status(), response.text().await.unwrap()),
        }
    }
    assert_eq!(allowed, 18);
    // The 20th of the window brings the news that the limit is back at 100.
    announced.store(100, Ordering::SeqCst);
    assert_eq!(send_now().await.unwrap().status(), StatusCode::OK);
    assert_eq!(gauge(&sluice.metrics().await), 100.0, "back up to the configured limit");
    // Under the vendor's 20 the window was full; under the configured 100 it is not.
    for _ in 0..5 {
        assert_eq!(send_now().await.unwrap().status(), StatusCode::OK, "the configured limit applies again");
    }
    announced.store(20, Ordering::SeqCst);
    assert_eq!(send_now().await.unwrap().status(), StatusCode::OK);
    let refused = send_now().await.unwrap();
    let seconds = expect_sluice_429(refused).await;
    assert!((90..=101).contains(&seconds), "down to 20 again, 26 in the window: wait for the window, {seconds}s");
    sluice.shutdown().await;
}

/// Garbled rate headers are counted and ignored: the requests themselves succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_headers_are_counted_and_requests_still_succeed() {
    let hubspot = MockCrm::start().await;
    hubspot.set_handler(|_| {
        let mut ok = json(StatusCode::OK, serde_json::json!({"ok": true}));
        let headers = ok.headers_mut();
        headers.insert("x-hubspot-ratelimit-max", "lots".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-remaining", "-3".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-interval-milliseconds", "10000".parse().unwrap());
        ok
    });
    let ietf = MockCrm::start().await;
    ietf.set_handler(|_| {
        let mut ok = json(StatusCode::OK, serde_json::json!({"ok": true}));
        ok.headers_mut().insert("ratelimit", "garbage;;;".parse().unwrap());
        ok.headers_mut().insert("retry-after", "soon".parse().unwrap());
        ok
    });
    let yaml = format!(
        "upstreams:
  - {{ name: hubspot, prefix: /hubspot, target: '{}', limit_headers: hubspot }}
  - {{ name: ietf, prefix: /ietf, target: '{}', limit_headers: ietf }}
",
        hubspot.url(),
        ietf.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let client = direct_client();
    for _ in 0..3 {
        for upstream in ["hubspot", "ietf"] {
            let url = format!("{}/{upstream}/crm/v3/objects/contacts", sluice.proxy_url());
            let response = client.get(&url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{upstream}");
            assert_eq!(response.json::<Value>().await.unwrap()["ok"], true);
        }
    }
    let metrics = sluice.metrics().await;
    let errors = |upstream| metric_value(&metrics, "sluice_vendor_header_errors_total", &[("upstream", upstream)]);
    assert_eq!(errors("hubspot"), 6.0, "Max and Remaining, three times");
    assert_eq!(errors("ietf"), 6.0, "RateLimit and Retry-After, three times");
    assert_eq!(metric_value(&metrics, "sluice_vendor_pauses_total", &[]), 0.0, "garbage pauses nothing");
    sluice.shutdown().await;
}

/// `Retry-After` as an HTTP-date (Attio) sets the pause until that instant; a date in the past
/// means no pause at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_http_date_is_honoured_and_a_past_date_is_no_pause() {
    let future = MockCrm::start().await;
    let until = Arc::new(Mutex::new(None::<SystemTime>));
    let arrivals = Arc::new(Mutex::new(Vec::<SystemTime>::new()));
    {
        let (until, arrivals) = (until.clone(), arrivals.clone());
        future.set_handler(move |_| {
            let now = SystemTime::now();
            arrivals.lock().unwrap().push(now);
            let mut until = until.lock().unwrap();
            if until.is_some() {
                return json(StatusCode::OK, serde_json::json!({"ok": true}));
            }
            let at = now + Duration::from_secs(3);
            let date = httpdate::fmt_http_date(at);
            // The date has whole seconds: the pause ends at the truncated instant.
            *until = Some(httpdate::parse_http_date(&date).unwrap());
            let mut refused = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"code": "rate_limit_exceeded"}));
            refused.headers_mut().insert("retry-after", date.parse().unwrap());
            refused
        });
    }
    let past = MockCrm::start().await;
    refuse_once(&past, || {
        let mut refused = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"code": "rate_limit_exceeded"}));
        let date = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
        refused.headers_mut().insert("retry-after", date.parse().unwrap());
        refused
    });
    let quota = "    max_queue_wait: 10s\n    quotas:\n      - { name: burst, limit: 1000, per: 10s }\n";
    let yaml = format!(
        "upstreams:\n  - name: attio\n    prefix: /attio\n    target: '{}'\n{quota}  - name: past\n    prefix: /past\n    target: '{}'\n{quota}",
        future.url(),
        past.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let client = direct_client();

    let attio = format!("{}/attio/v2/objects/people/records", sluice.proxy_url());
    assert_eq!(client.get(&attio).send().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let date = until.lock().unwrap().unwrap();
    let seconds = expect_sluice_429(client.get(&attio).header("sluice-max-wait", "0").send().await.unwrap()).await;
    assert!((1..=3).contains(&seconds), "Retry-After {seconds}: until the date");
    assert_eq!(client.get(&attio).send().await.unwrap().status(), StatusCode::OK, "held, then served");
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 2);
    assert!(arrivals[1] >= date, "a request reached the vendor {:?} before the date", date.duration_since(arrivals[1]));

    let past_url = format!("{}/past/v2/objects/people/records", sluice.proxy_url());
    assert_eq!(client.get(&past_url).send().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let next = client.get(&past_url).header("sluice-max-wait", "0").send().await.unwrap();
    assert_eq!(next.status(), StatusCode::OK, "a date in the past pauses nothing");
    assert_eq!(past.request_count(), 2);

    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_vendor_pauses_total", &[("upstream", "attio"), ("reason", "retry_after")]),
        1.0
    );
    assert_eq!(metric_value(&metrics, "sluice_vendor_pauses_total", &[("upstream", "past")]), 0.0);
    sluice.shutdown().await;
}

/// During a pause, `over_limit: reject` answers at once: 429, `Retry-After` = the pause's
/// remaining time (±1 s), `Proxy-Status`, JSON body; nothing reaches the vendor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_answers_at_once_with_the_remaining_pause() {
    let mock = MockCrm::start().await;
    refuse_once(&mock, || {
        let mut refused = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"error": "slow down"}));
        refused.headers_mut().insert("retry-after", "5".parse().unwrap());
        refused
    });
    let body = "    over_limit: reject\n    quotas:\n      - { name: burst, limit: 1000, per: 10s }\n";
    let sluice = TestSluice::start(&single_yaml("crm", &mock, body)).await;
    let client = direct_client();
    let url = format!("{}/crm/v1/items", sluice.proxy_url());

    let refused = client.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "retry-after"), Some("5"), "the vendor's own answer is passed through");
    let refused_at = mock.requests()[0].at;

    for _ in 0..3 {
        let asked = Instant::now();
        let response = client.get(&url).send().await.unwrap();
        let expected = Duration::from_secs(5).saturating_sub(asked - refused_at).as_secs_f64();
        let seconds = expect_sluice_429(response).await as f64;
        println!("Retry-After {seconds} s, pause remaining {expected:.2} s");
        assert!((seconds - expected).abs() <= 1.0, "Retry-After {seconds} s, remaining pause {expected:.2} s");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert_eq!(mock.request_count(), 1, "nothing reached the vendor during the pause");
    sluice.shutdown().await;
}

/// When a pause ends, held requests go at the bucket's rate from its end, never as one burst and
/// never early: the k-th of them reaches the vendor no sooner than `pause end + k x interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_requests_are_released_at_the_bucket_rate_after_a_pause() {
    let mock = MockCrm::start().await;
    refuse_once(&mock, || {
        let mut refused = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"error": "slow down"}));
        refused.headers_mut().insert("retry-after", "2".parse().unwrap());
        refused
    });
    // burst 1: the GCRA interval is (5 s + 50 ms margin) / 10 = 505 ms, no back-to-back sends.
    let body = "    max_queue_wait: 15s\n    quotas:\n      - { name: burst, limit: 10, per: 5s, burst: 1 }\n";
    let sluice = TestSluice::start(&single_yaml("crm", &mock, body)).await;
    let client = direct_client();
    let url = format!("{}/crm/v1/items", sluice.proxy_url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let pause_end = mock.requests()[0].at + Duration::from_secs(2);

    let mut held = Vec::new();
    for i in 0..5 {
        let (client, url) = (client.clone(), format!("{url}/{i}"));
        held.push(tokio::spawn(async move { client.get(&url).send().await.unwrap().status() }));
    }
    for task in held {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let mut arrivals: Vec<Instant> = mock.requests()[1..].iter().map(|r| r.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 5);
    let interval = Duration::from_millis(505);
    let offsets: Vec<i128> = arrivals.iter().map(|at| at.duration_since(pause_end).as_millis() as i128).collect();
    println!("held requests reached the vendor {offsets:?} ms after the pause ended (interval 505 ms)");
    for (k, at) in arrivals.iter().enumerate() {
        let earliest = pause_end + interval * u32::try_from(k).unwrap();
        assert!(*at >= earliest, "held request #{k} reached the vendor {:?} early", earliest - *at);
    }
    sluice.shutdown().await;
}

/// A slow vendor whose 429s come back one after another, each re-arming the pause while a
/// request is held: the held request must still never reach the vendor inside a pause the vendor
/// announced. (`admit` re-decides after each hold, but only three times.)
///
/// Observed: pauses announced at 300, 1814, 3303, 4803 ms (2 s each); the probe, held from
/// ~350 ms, re-decided after its 1st and 2nd holds, but after the 3rd `admit`'s `for _ in 0..3`
/// loop ended and it was sent at 5364 ms, inside the pause announced at 4803 ms (until 6803 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_re_armed_while_a_request_is_held_is_still_honoured() {
    const RETRY_AFTER: Duration = Duration::from_secs(2);
    let slow = |k: u64| Duration::from_millis(300 + 1500 * k);
    let vendor = ScriptedVendor::start(move |request| match request.path.strip_prefix("/slow/") {
        Some(k) => Step::status(429).after(slow(k.parse().unwrap())).header("retry-after", "2"),
        None => Step::status(200),
    })
    .await;
    let body = format!(
        "upstreams:\n  - name: crm\n    prefix: /crm\n    target: '{}'\n    max_queue_wait: 15s\n    quotas:\n      - {{ name: burst, limit: 1000, per: 10s }}\n",
        vendor.url()
    );
    let sluice = TestSluice::start(&body).await;
    let client = direct_client();

    // Four slow calls are in flight at once; their 429s will arrive 1.5 s apart.
    let mut slow_calls = Vec::new();
    for k in 0..4 {
        let (client, url) = (client.clone(), format!("{}/crm/slow/{k}", sluice.proxy_url()));
        slow_calls.push(tokio::spawn(async move { client.get(&url).send().await.unwrap().status() }));
    }
    assert!(support::eventually(Duration::from_secs(5), || async { vendor.count() == 4 }).await);
    // Once the first pause is recorded, a caller asks and is held.
    let paused = support::eventually(Duration::from_secs(5), || async {
        metric_value(&sluice.metrics().await, "sluice_vendor_pauses_total", &[]) >= 1.0
    })
    .await;
    assert!(paused, "the first 429 paused the upstream");
    let probe = client.get(format!("{}/crm/probe", sluice.proxy_url())).send().await.unwrap();
    for call in slow_calls {
        assert_eq!(call.await.unwrap(), StatusCode::TOO_MANY_REQUESTS);
    }

    let requests = vendor.requests();
    let pauses: Vec<(Instant, Instant)> = requests
        .iter()
        .filter_map(|r| {
            let k: u64 = r.path.strip_prefix("/slow/")?.parse().ok()?;
            let refused_at = r.at + slow(k);
            Some((refused_at, refused_at + RETRY_AFTER))
        })
        .collect();
    let probe_at = requests.iter().find(|r| r.path == "/probe").map(|r| r.at);
    let first = requests[0].at;
    let ms = |at: Instant| at.duration_since(first).as_millis();
    println!(
        "pauses announced (ms): {:?}; probe answered {} and reached the vendor at {:?} ms",
        pauses.iter().map(|(start, end)| (ms(*start), ms(*end))).collect::<Vec<_>>(),
        probe.status(),
        probe_at.map(ms)
    );
    if let Some(at) = probe_at {
        for (start, end) in &pauses {
            assert!(
                !(*start < at && at < *end),
                "the held request reached the vendor at {} ms, inside the pause it announced at {} ms (until {} ms)",
                ms(at),
                ms(*start),
                ms(*end)
            );
        }
    }
    sluice.shutdown().await;
}

/// A pause belongs to the vendor account the request was made for (the first quota's scope):
/// tenant A's 429 holds tenant A, not tenant B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_only_the_scope_that_was_refused() {
    let mock = MockCrm::start().await;
    mock.set_handler(|request| {
        if request.header("authorization") == Some("Bearer acme") && request.path.ends_with("/first") {
            let mut refused = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"error": "slow down"}));
            refused.headers_mut().insert("retry-after", "30".parse().unwrap());
            return refused;
        }
        json(StatusCode::OK, serde_json::json!({"ok": true}))
    });
    let body = "    over_limit: reject\n    quotas:\n      - { name: burst, limit: 1000, per: 10s, key: [header:x-tenant-id] }\n";
    let sluice = TestSluice::start(&single_yaml("crm", &mock, body)).await;
    let client = direct_client();
    let url = |path: &str| format!("{}/crm/v1/{path}", sluice.proxy_url());
    let as_tenant = |path: &str, tenant: &str| {
        client.get(url(path)).header("x-tenant-id", tenant).header("authorization", format!("Bearer {tenant}"))
    };
    let refused = as_tenant("first", "acme").send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);

    let acme = as_tenant("again", "acme").send().await.unwrap();
    let seconds = expect_sluice_429(acme).await;
    assert!((29..=30).contains(&seconds), "acme is paused: Retry-After {seconds}");
    // The pause follows the vendor account (its credential), not a header the caller picks:
    // acme cannot dodge it by naming another tenant.
    let dodge = client
        .get(url("again"))
        .header("x-tenant-id", "someone-else")
        .header("authorization", "Bearer acme")
        .send()
        .await
        .unwrap();
    let seconds = expect_sluice_429(dodge).await;
    assert!((29..=30).contains(&seconds), "a new scope value does not lift acme's pause: {seconds}");
    let other = as_tenant("again", "globex").send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK, "globex (another account) was never refused");
    assert_eq!(mock.request_count(), 2);
    sluice.shutdown().await;
}

/// A Salesforce 403 that is not about limits (no access) is the caller's business: passed
/// through every time, no pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_403_without_request_limit_exceeded_is_not_a_throttle() {
    let mock = MockCrm::start().await;
    mock.set_handler(|_| {
        json(
            StatusCode::FORBIDDEN,
            serde_json::json!([{"message": "insufficient access rights on object id", "errorCode": "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY"}]),
        )
    });
    let sluice =
        TestSluice::start(&single_yaml("salesforce", &mock, "    limit_headers: salesforce\n    max_queue_wait: 2s\n"))
            .await;
    let client = direct_client();
    let url = format!("{}/salesforce/services/data/v62.0/sobjects/Contact/003x", sluice.proxy_url());
    for _ in 0..3 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(header(&response, "proxy-status").is_none(), "the vendor's 403");
    }
    assert_eq!(mock.request_count(), 3);
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_vendor_pauses_total", &[]), 0.0);
    assert_eq!(metric_value(&metrics, "sluice_vendor_throttles_total", &[]), 0.0);
    sluice.shutdown().await;
}

/// Over-limit answers whose body says why (Salesforce's 403 array, HubSpot's `policyName`) are
/// often sent chunked (HTTP/1.1 `Transfer-Encoding: chunked`, or HTTP/2 without
/// `Content-Length`). Classification must not depend on a `Content-Length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_limit_bodies_sent_chunked_are_still_classified() {
    let fixture = salesforce_403();
    let forbidden =
        String::from_utf8(http_body_util::BodyExt::collect(fixture.into_body()).await.unwrap().to_bytes().to_vec())
            .unwrap();
    let salesforce = ScriptedVendor::start(move |request| match request.index {
        0 => Step::status(403).body(&forbidden).chunked(),
        _ => Step::status(200),
    })
    .await;
    let hubspot = ScriptedVendor::start(|request| match request.index {
        0 => Step::status(429).body(TEN_SECONDLY_BODY).chunked(),
        _ => Step::status(200),
    })
    .await;
    let yaml = format!(
        "upstreams:
  - {{ name: salesforce, prefix: /salesforce, target: '{}', limit_headers: salesforce, max_queue_wait: 2s }}
  - {{ name: hubspot, prefix: /hubspot, target: '{}', limit_headers: hubspot, max_queue_wait: 2s }}
",
        salesforce.url(),
        hubspot.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let client = direct_client();

    let url = format!("{}/salesforce/services/data/v62.0/limits", sluice.proxy_url());
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::FORBIDDEN);
    let second = client.get(&url).send().await.unwrap();
    println!("salesforce: after a chunked 403 REQUEST_LIMIT_EXCEEDED the next call got {}", second.status());

    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let now = client.get(&url).header("sluice-max-wait", "0").send().await.unwrap();
    println!(
        "hubspot: after a chunked TEN_SECONDLY_ROLLING 429 the next call got {} (Retry-After {:?})",
        now.status(),
        header(&now, "retry-after")
    );
    let metrics = sluice.metrics().await;
    println!(
        "throttles: salesforce daily {}, hubspot burst {}, hubspot unknown {}",
        metric_value(&metrics, "sluice_vendor_throttles_total", &[("upstream", "salesforce"), ("class", "daily")]),
        metric_value(&metrics, "sluice_vendor_throttles_total", &[("upstream", "hubspot"), ("class", "burst")]),
        metric_value(&metrics, "sluice_vendor_throttles_total", &[("upstream", "hubspot"), ("class", "unknown")]),
    );

    expect_sluice_429(second).await;
    assert_eq!(salesforce.count(), 1, "Salesforce was not asked again during the pause");
    if now.status() == StatusCode::OK {
        panic!("HubSpot was asked again right after its TEN_SECONDLY_ROLLING 429");
    }
    let seconds = expect_sluice_429(now).await;
    assert!((9..=10).contains(&seconds), "the TEN_SECONDLY_ROLLING pause is the 10 s window, not {seconds} s");
    assert_eq!(hubspot.count(), 1);
    sluice.shutdown().await;
}
