#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The breaker counts only the vendor's failures (security review M3, M13), through real
//! sockets: a client that stalls its upload gets `408 request_timeout` and the vendor's breaker
//! does not move, so another client's request still reaches the vendor; an upload that is slow
//! but steady is not cut by `timeouts.request`, which is the vendor's time; a client that hangs
//! up mid-body is not a vendor failure either; a host the client named under a wildcard that
//! does not exist (NXDOMAIN) gets `502 unknown_host` and never opens a breaker; and a wildcard
//! upstream without a target keeps one breaker per destination host, at most `max_hosts` of
//! them, shown in `/breakers` (hosts hashed without the admin token).
//!
//! The vendor's own failures still count: two response timeouts open the breaker.
mod support;

use std::time::Duration;

use support::raw_http::{check_synthetic, RawConn, RawResponse};
use support::{direct_client, metric_value, MockCrm, TestSluice};

/// One reverse-mode upstream `hubspot` at `/hubspot` going to the mock, with a breaker that
/// opens on two failures in a row and a one-second vendor timeout.
fn strict_breaker(mock: &MockCrm, limits: &str) -> String {
    format!(
        "{limits}upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{mock}'
    timeouts: {{ request: 1s }}
    breaker: {{ consecutive_failures: 2, open_for: 30s }}
",
        mock = mock.url()
    )
}

/// Starts a POST whose `Content-Length` promises 100 bytes and sends 10.
async fn stalled_upload(sluice: &TestSluice, path: &str) -> RawConn {
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    let head = format!("POST /hubspot{path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789");
    conn.send(head.as_bytes()).await.unwrap();
    conn
}

async fn breakers(sluice: &TestSluice) -> serde_json::Value {
    direct_client().get(sluice.admin_url("/breakers")).send().await.unwrap().json().await.unwrap()
}

fn synthetic(response: &RawResponse, status: u16, error: &str, proxy_error: &str) -> serde_json::Value {
    response.expect_synthetic(status, error, proxy_error)
}

#[tokio::test]
async fn stalled_uploads_get_408_and_leave_the_breaker_closed() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&strict_breaker(&mock, "limits: { body_read_timeout: 2s }\n")).await;
    let mut first = stalled_upload(&sluice, "/crm/x").await;
    let mut second = stalled_upload(&sluice, "/crm/x").await;
    // Past `timeouts.request`: before the fix, each stall was a vendor timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = direct_client().get(format!("{}/hubspot/crm/y", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(other.status(), 200, "another client's request goes through: {other:?}");
    assert!(mock.requests().iter().any(|r| r.path == "/crm/y"), "and reaches the vendor");

    for conn in [&mut first, &mut second] {
        let response = conn.response("POST").await.expect("the stalled client gets an answer");
        let body = synthetic(&response, 408, "request_timeout", "http_request_error");
        assert_eq!(body["upstream"], "hubspot");
        assert!(body["detail"].as_str().unwrap().contains("stalled"), "{body}");
        assert!(conn.closed_within(Duration::from_secs(5)).await, "the connection closes after a 408");
    }
    let state = breakers(&sluice).await;
    assert_eq!(state["breakers"][0]["state"], "closed", "{state}");
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_breaker_transitions_total", &[("upstream", "hubspot")]), 0.0);
    assert_eq!(
        metric_value(&metrics, "sluice_proxy_errors_total", &[("upstream", "hubspot"), ("error", "request_timeout")]),
        2.0,
        "{metrics}"
    );
    // The vendor's own failures still count: two response timeouts open the breaker.
    for _ in 0..2 {
        let slow = direct_client().get(format!("{}/hubspot/slow/3000", sluice.proxy_url())).send().await.unwrap();
        assert_eq!(slow.status(), 504);
    }
    let refused = direct_client().get(format!("{}/hubspot/crm/z", sluice.proxy_url())).send().await.unwrap();
    support::raw_http::expect_synthetic(refused, 503, "circuit_open", "destination_unavailable").await;
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_client_hanging_up_mid_body_is_not_a_vendor_failure() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&strict_breaker(&mock, "")).await;
    for _ in 0..3 {
        let conn = stalled_upload(&sluice, "/crm/gone").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(conn);
    }
    // Every abandoned upload has been handled by now (the vendor never saw a whole body).
    let handled = support::eventually(Duration::from_secs(10), || async {
        let metrics = sluice.metrics().await;
        metric_value(&metrics, "sluice_requests_in_flight", &[]) == 0.0
    })
    .await;
    assert!(handled);
    let other = direct_client().get(format!("{}/hubspot/crm/still", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(breakers(&sluice).await["breakers"][0]["state"], "closed");
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_slow_steady_upload_is_not_cut_by_the_vendor_timeout() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&strict_breaker(&mock, "limits: { body_read_timeout: 3s }\n")).await;
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"POST /hubspot/crm/drip HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n").await.unwrap();
    // Five parts 400 ms apart: 2 s in all, twice `timeouts.request`, each gap well under
    // `body_read_timeout`.
    for part in ["drip-", "drip-", "drip-", "drip-"] {
        conn.send(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    conn.send(b"done").await.unwrap();
    let response = conn.response("POST").await.unwrap();
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.json()["body"], "drip-drip-drip-drip-done");
    sluice.shutdown().await;
}

/// A wildcard upstream without a target: every host under `*.tenants.invalid` is a different
/// vendor account. `.invalid` never resolves (RFC 6761), so each request is an NXDOMAIN.
fn tenants(max_hosts: u64) -> String {
    format!(
        "upstreams:
  - name: tenants
    hosts: ['*.tenants.invalid']
    timeouts: {{ connect: 1s, request: 2s }}
    breaker: {{ consecutive_failures: 2, open_for: 30s, max_hosts: {max_hosts} }}
"
    )
}

async fn get_via_proxy(sluice: &TestSluice, url: &str) -> RawResponse {
    let request = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    support::raw_http::exchange(sluice.running().proxy_addr, request.as_bytes()).await.unwrap()
}

#[tokio::test]
async fn a_host_that_does_not_exist_is_the_clients_mistake() {
    let sluice = TestSluice::start(&tenants(1024)).await;
    for attempt in 0..4 {
        let response = get_via_proxy(&sluice, "http://nx-acme.tenants.invalid/api/v2/tickets").await;
        let body = synthetic(&response, 502, "unknown_host", "dns_error");
        assert_eq!(body["upstream"], "tenants", "attempt {attempt}");
        assert!(body["detail"].as_str().unwrap().contains("nx-acme.tenants.invalid"), "{body}");
    }
    // The same through a blind CONNECT.
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"CONNECT nx-acme.tenants.invalid:443 HTTP/1.1\r\nHost: nx-acme.tenants.invalid:443\r\n\r\n")
        .await
        .unwrap();
    let response = conn.response("CONNECT").await.unwrap();
    check_synthetic(
        response.header("proxy-status"),
        response.header("content-type"),
        &response.body,
        "unknown_host",
        "dns_error",
        &response.head,
    );
    let state = breakers(&sluice).await;
    let all = state["breakers"].as_array().unwrap();
    assert!(all.iter().all(|breaker| breaker["state"] == "closed"), "{state}");
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_breaker_transitions_total", &[]), 0.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "sluice_breaker_short_circuited_total", &[]), 0.0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn wildcard_upstreams_keep_a_bounded_breaker_per_host() {
    let sluice = TestSluice::start(&tenants(2)).await;
    for host in ["a", "b", "c"] {
        let response = get_via_proxy(&sluice, &format!("http://{host}.tenants.invalid/x")).await;
        assert_eq!(response.status, 502, "{}", response.head);
    }
    // Loopback, no admin token configured: hosts are shown as they are.
    let state = breakers(&sluice).await;
    let hosts: Vec<&str> = state["breakers"].as_array().unwrap().iter().map(|b| b["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["b.tenants.invalid", "c.tenants.invalid"], "at most max_hosts, the oldest forgotten: {state}");
    assert!(state["breakers"].as_array().unwrap().iter().all(|b| b["upstream"] == "tenants"));
    sluice.shutdown().await;
}

#[tokio::test]
async fn breaker_hosts_are_hashed_without_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "s3cret-admin\n").unwrap();
    let yaml = format!("admin: {{ token_file: $DIR/admin.token }}\n{}", tenants(16));
    let sluice = TestSluice::start_in(dir, &yaml).await;
    let response = get_via_proxy(&sluice, "http://acme.tenants.invalid/x").await;
    assert_eq!(response.status, 502);
    let open = direct_client().get(sluice.admin_url("/breakers")).send().await.unwrap().text().await.unwrap();
    assert!(!open.contains("acme"), "a tenant's host without the token: {open}");
    let shown: serde_json::Value = serde_json::from_str(&open).unwrap();
    assert!(shown["breakers"][0]["host"].as_str().unwrap().starts_with("h-"), "{open}");
    let with_token: serde_json::Value = direct_client()
        .get(sluice.admin_url("/breakers"))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(with_token["breakers"][0]["host"], "acme.tenants.invalid");
    sluice.shutdown().await;
}
