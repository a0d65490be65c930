#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The caller's controls (`Sluice-Deadline`, `Sluice-Max-Wait`, `Sluice-Batch`) are parsed once,
//! clamped, and never panic (security review M2): huge values get an answer, garbage gets a 400
//! that names the header, and none of them reaches the vendor.
mod support;

use std::time::Duration;

use support::raw_http::{RawConn, RawResponse};
use support::streaming::{Door, DoorClient, Plan, Proto};
use support::{MockCrm, TestSluice};

/// A retrying upstream (the path `Sluice-Max-Wait` used to take to `from_secs_f64`), and one
/// with a quota and a queue, both in reverse mode and as a forward-proxy host.
async fn start(mock: &MockCrm) -> TestSluice {
    TestSluice::start(&format!(
        "upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{}', retry: {{}} }}
  - name: quota
    hosts: [quota.test]
    prefix: /quota
    target: '{}'
    over_limit: queue
    max_queue_wait: 2s
    quotas: [{{ name: q, limit: 1, per: 10s }}]
",
        mock.url(),
        mock.url()
    ))
    .await
}

/// The values that panicked the connection task before: clamped to 24 h, so they are answered.
const HUGE: &[(&str, &str)] = &[
    ("Sluice-Deadline", "18446744073709551615s"),
    ("Sluice-Deadline", "18446744073709551615"),
    ("Sluice-Deadline", "1e308"),
    ("Sluice-Max-Wait", "1e20"),
    ("Sluice-Max-Wait", "1e308"),
    ("Sluice-Max-Wait", "18446744073709551615s"),
];

async fn get(conn: &mut RawConn, path: &str, header: &str, value: &str) -> RawResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}: {value}\r\n\r\n");
    conn.send(request.as_bytes()).await.unwrap();
    conn.response("GET").await.unwrap_or_else(|error| panic!("{header}: {value}: no answer: {error:?}"))
}

#[tokio::test]
async fn huge_deadlines_and_waits_are_answered_over_http1() {
    let mock = MockCrm::start().await;
    let sluice = start(&mock).await;
    // One keep-alive connection for all of them: a panicking task would take it down.
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    for (header, value) in HUGE {
        let response = get(&mut conn, "/hubspot/crm/v3/objects/contacts", header, value).await;
        assert_eq!(response.status, 200, "{header}: {value}\n{}", response.head);
        assert_eq!(response.json()["path"], "/crm/v3/objects/contacts");
    }
    assert_eq!(mock.request_count(), HUGE.len());
    for request in mock.requests() {
        for name in ["sluice-deadline", "sluice-max-wait"] {
            assert_eq!(request.header(name), None, "{name} reached the vendor: {:?}", request.headers);
        }
    }
    sluice.shutdown().await;
}

#[tokio::test]
async fn huge_deadlines_and_waits_are_answered_over_http2() {
    let mock = MockCrm::start().await;
    let sluice = start(&mock).await;
    let addr = sluice.running().proxy_addr;
    let mut client =
        DoorClient::connect(addr, Door::Reverse, Proto::Http2, "api.hubapi.com", "/hubspot", &[]).await.unwrap();
    for (at, (header, value)) in HUGE.iter().enumerate() {
        let case = format!("h2-{at}");
        let answer =
            client.request("GET", &case, "/crm/v3/objects/contacts", &Plan::default(), &[(header, value)]).await;
        let answer = answer.unwrap_or_else(|error| panic!("{header}: {value}: {error}"));
        assert_eq!(answer.status, 200, "{header}: {value}");
    }
    // And through the absolute-form door on a fresh HTTP/1.1 connection.
    let mut client = DoorClient::connect(addr, Door::Absolute, Proto::Http1, "api.hubapi.com", "", &[]).await.unwrap();
    for (header, value) in HUGE {
        let answer =
            client.request("GET", "abs", "/crm/v3/objects/contacts", &Plan::default(), &[(header, value)]).await;
        assert_eq!(answer.unwrap().status, 200, "{header}: {value}");
    }
    sluice.shutdown().await;
}

#[tokio::test]
async fn garbage_controls_are_400_naming_the_header() {
    let mock = MockCrm::start().await;
    let sluice = start(&mock).await;
    let cases = [
        ("Sluice-Deadline", "soon"),
        ("Sluice-Deadline", "-1"),
        ("Sluice-Deadline", "NaN"),
        ("Sluice-Deadline", "inf"),
        ("Sluice-Max-Wait", "1e400"),
        ("Sluice-Max-Wait", "2 parsecs"),
        ("Sluice-Max-Wait", "99999999999999999999999999s"),
        ("Sluice-Batch", "perhaps"),
    ];
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    for (header, value) in cases {
        let response = get(&mut conn, "/hubspot/crm/v3/objects/contacts", header, value).await;
        let body = response.expect_synthetic(400, "malformed_request", "http_request_error");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(header), "{header}: {value}: the detail must name the header: {detail}");
        assert_eq!(body["upstream"], "hubspot");
        assert!(response.header("proxy-status").unwrap().contains(header), "{:?}", response.header("proxy-status"));
    }
    // Twice the same control is refused too: which one would win is anyone's guess.
    let request = "GET /hubspot/x HTTP/1.1\r\nHost: x\r\nSluice-Deadline: 1\r\nSluice-Deadline: 900\r\n\r\n";
    conn.send(request.as_bytes()).await.unwrap();
    let response = conn.response("GET").await.unwrap();
    let body = response.expect_synthetic(400, "malformed_request", "http_request_error");
    assert!(body["detail"].as_str().unwrap().contains("more than once"), "{body}");
    assert_eq!(mock.request_count(), 0, "a refused request reaches no vendor");
    sluice.shutdown().await;
}

/// A short `Sluice-Max-Wait` still shortens the queue through the typed value, and a huge one
/// is capped by `max_queue_wait`: it neither panics nor waits longer than the upstream allows.
#[tokio::test]
async fn max_wait_is_read_from_the_typed_controls() {
    let mock = MockCrm::start().await;
    let sluice = start(&mock).await;
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    let first = get(&mut conn, "/quota/a", "Sluice-Max-Wait", "0").await;
    assert_eq!(first.status, 200, "{}", first.head);
    let now = get(&mut conn, "/quota/b", "Sluice-Max-Wait", "0").await;
    now.expect_synthetic(429, "rate_limited", "http_request_denied");
    let started = tokio::time::Instant::now();
    let capped = get(&mut conn, "/quota/c", "Sluice-Max-Wait", "1e308").await;
    // The next token is ~10 s away and max_queue_wait is 2 s: refused at once, honestly.
    capped.expect_synthetic(429, "rate_limited", "http_request_denied");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(mock.request_count(), 1);
    sluice.shutdown().await;
}

/// A retried request narrows its own wait to what is left of `Sluice-Deadline`; the header the
/// vendor would have seen before (a rewritten `Sluice-Max-Wait`) is gone, and so is the caller's.
#[tokio::test]
async fn retries_never_forward_a_rewritten_wait() {
    let mock = MockCrm::start().await;
    let sluice = start(&mock).await;
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    let response = get(&mut conn, "/hubspot/status/503", "Sluice-Deadline", "2s").await;
    assert_eq!(response.status, 503, "{}", response.head);
    let seen = mock.requests();
    assert!(seen.len() >= 2, "retried: {} attempts", seen.len());
    for request in seen {
        assert_eq!(request.header("sluice-max-wait"), None, "{:?}", request.headers);
        assert_eq!(request.header("sluice-deadline"), None, "{:?}", request.headers);
    }
    sluice.shutdown().await;
}
