#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin listener: metrics, probes, the effective config, quotas, and its error answers.
mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};

const WAIT: Duration = Duration::from_secs(15);

async fn start_with_mock() -> (MockCrm, TestSluice) {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{}' }}\n  - {{ name: zendesk, hosts: ['*.zendesk.com'] }}\n",
        mock.url()
    ))
    .await;
    (mock, sluice)
}

async fn admin(sluice: &TestSluice, method: reqwest::Method, path: &str) -> reqwest::Response {
    direct_client().request(method, sluice.admin_url(path)).send().await.unwrap()
}

fn is_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"))
}

/// Checks the Prometheus text exposition format line by line and returns, per metric family,
/// its `# TYPE`. Panics naming the first line that is not valid.
fn parse_exposition(text: &str) -> HashMap<String, String> {
    let mut types = HashMap::new();
    let mut helped = HashSet::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "bad TYPE: {line}");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "bad value: {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels: {line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its # TYPE: {line}");
        assert!(helped.contains(family), "sample without # HELP: {line}");
    }
    types
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_every_foundation_metric() {
    let (mock, sluice) = start_with_mock().await;
    let reverse = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let client = direct_client();
    assert_eq!(client.get(&reverse).send().await.unwrap().status(), 200);
    assert_eq!(client.get(&reverse).send().await.unwrap().status(), 200);
    let created = client.post(&reverse).json(&serde_json::json!({"properties": {}})).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let vendor_error = client.get(format!("{}/hubspot/status/503", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(vendor_error.status(), 503);
    let unrouted = client.get(format!("{}/nowhere", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(unrouted.status(), 404);
    let forward = sluice.proxied_client().get("http://api.hubapi.com/x").send().await.unwrap();
    assert_eq!(forward.status(), 200);
    assert_eq!(mock.request_count(), 5);

    let response = admin(&sluice, reqwest::Method::GET, "/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"), "{content_type}");
    let text = response.text().await.unwrap();
    let types = parse_exposition(&text);
    for (name, kind) in [
        ("sluice_requests_total", "counter"),
        ("sluice_request_duration_seconds", "histogram"),
        ("sluice_upstream_duration_seconds", "histogram"),
        ("sluice_requests_in_flight", "gauge"),
        ("sluice_config_reloads_total", "counter"),
        ("sluice_config_last_reload_success_timestamp_seconds", "gauge"),
        ("sluice_tunnels_open", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name} missing or mistyped in:\n{text}");
    }

    let requests = |labels: &[(&str, &str)]| metric_value(&text, "sluice_requests_total", labels);
    assert_eq!(requests(&[("upstream", "hubspot"), ("method", "GET"), ("status_class", "2xx")]), 3.0, "{text}");
    assert_eq!(requests(&[("upstream", "hubspot"), ("method", "POST"), ("status_class", "2xx")]), 1.0, "{text}");
    assert_eq!(requests(&[("upstream", "hubspot"), ("method", "GET"), ("status_class", "5xx")]), 1.0, "{text}");
    let unrouted = requests(&[("upstream", "none"), ("method", "GET"), ("status_class", "4xx")]);
    assert_eq!(unrouted, 1.0, "the unrouted 404 is counted: {text}");
    let durations = metric_value(&text, "sluice_request_duration_seconds_count", &[("upstream", "hubspot")]);
    assert_eq!(durations, 5.0, "{text}");
    let upstream = metric_value(&text, "sluice_upstream_duration_seconds_count", &[("upstream", "hubspot")]);
    assert_eq!(upstream, 5.0, "{text}");
    assert!(text.contains("sluice_request_duration_seconds_bucket{upstream=\"hubspot\",le=\"+Inf\"}"), "{text}");
    assert_eq!(metric_value(&text, "sluice_config_reloads_total", &[("result", "success")]), 1.0);
    assert_eq!(metric_value(&text, "sluice_config_reloads_total", &[("result", "failure")]), 0.0);
    let stamp = metric_value(&text, "sluice_config_last_reload_success_timestamp_seconds", &[]);
    assert!(stamp > 1_700_000_000.0, "a unix time: {stamp}");
    assert_eq!(metric_value(&text, "sluice_tunnels_open", &[("kind", "blind")]), 0.0);
    assert_eq!(metric_value(&text, "sluice_tunnels_open", &[("kind", "intercept")]), 0.0);
    let idle =
        eventually(WAIT, || async { metric_value(&sluice.metrics().await, "sluice_requests_in_flight", &[]) == 0.0 })
            .await;
    assert!(idle, "the in-flight gauge returns to 0");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn in_flight_gauge_counts_a_slow_request() {
    let (mock, sluice) = start_with_mock().await;
    let slow = tokio::spawn(direct_client().get(format!("{}/hubspot/slow/1000", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { mock.request_count() == 1 }).await);
    let text = sluice.metrics().await;
    assert_eq!(metric_value(&text, "sluice_requests_in_flight", &[]), 1.0, "{text}");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    let idle =
        eventually(WAIT, || async { metric_value(&sluice.metrics().await, "sluice_requests_in_flight", &[]) == 0.0 })
            .await;
    assert!(idle);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn health_and_readiness() {
    let (_mock, sluice) = start_with_mock().await;
    let healthz = admin(&sluice, reqwest::Method::GET, "/healthz").await;
    assert_eq!(healthz.status(), 200);
    assert!(is_json(&healthz));
    assert_eq!(healthz.json::<Value>().await.unwrap()["status"], "ok");

    let readyz = admin(&sluice, reqwest::Method::GET, "/readyz").await;
    assert_eq!(readyz.status(), 200);
    assert!(is_json(&readyz));
    let body: Value = readyz.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["store"]["kind"], "memory", "the body says the store mode: {body}");
    assert_eq!(body["generation"], 1, "{body}");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn config_shows_the_effective_config() {
    let (mock, sluice) = start_with_mock().await;
    let response = admin(&sluice, reqwest::Method::GET, "/config").await;
    assert_eq!(response.status(), 200);
    assert!(is_json(&response));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["generation"], 1);
    let config = &body["config"];
    let upstreams = config["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 2, "{body}");
    assert_eq!(upstreams[0]["name"], "hubspot");
    assert_eq!(upstreams[0]["hosts"][0], "api.hubapi.com");
    assert_eq!(upstreams[0]["prefix"], "/hubspot");
    assert_eq!(upstreams[0]["target"], mock.url());
    assert_eq!(upstreams[1]["name"], "zendesk");
    assert_eq!(upstreams[1]["hosts"][0], "*.zendesk.com");
    // Defaults are filled in, so the effective value of every key is visible.
    assert!(upstreams[1]["timeouts"]["connect"].is_string(), "{body}");
    assert!(config["shutdown_grace"].is_string(), "{body}");
    assert_eq!(config["store"]["kind"], "memory");
    assert!(config["listen"]["proxy"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn quotas_answer_json() {
    let (_mock, sluice) = start_with_mock().await;
    let response = admin(&sluice, reqwest::Method::GET, "/quotas").await;
    assert_eq!(response.status(), 200);
    assert!(is_json(&response));
    let body: Value = response.json().await.unwrap();
    assert!(body.is_object(), "{body}");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn unknown_path_is_a_json_404() {
    let (_mock, sluice) = start_with_mock().await;
    for path in ["/", "/nope", "/metrics/extra", "/hubspot/crm/v3/objects/contacts"] {
        let response = admin(&sluice, reqwest::Method::GET, path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert!(is_json(&response), "{path}");
        let proxy_status = response.headers().get("proxy-status").map(|value| value.to_str().unwrap().to_owned());
        assert!(
            proxy_status.as_deref().is_some_and(|value| value.starts_with("sluice; error=destination_not_found")),
            "{path}: {proxy_status:?}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "not_found", "{path}: {body}");
        assert!(body["detail"].is_string());
        // The same shape as the proxy's own refusals.
        assert!(body.as_object().unwrap().contains_key("upstream"), "{body}");
    }
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn wrong_method_is_a_json_405() {
    let (_mock, sluice) = start_with_mock().await;
    for (method, path) in [
        (reqwest::Method::POST, "/metrics"),
        (reqwest::Method::DELETE, "/healthz"),
        (reqwest::Method::PUT, "/readyz"),
        (reqwest::Method::POST, "/config"),
        (reqwest::Method::GET, "/reload"),
        (reqwest::Method::POST, "/quotas"),
    ] {
        let response = admin(&sluice, method.clone(), path).await;
        assert_eq!(response.status(), 405, "{method} {path}");
        assert!(is_json(&response), "{method} {path}");
        assert!(response.headers().contains_key("proxy-status"), "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "method_not_allowed", "{method} {path}: {body}");
    }
    // A GET /reload must not have reloaded anything.
    let text = sluice.metrics().await;
    assert_eq!(metric_value(&text, "sluice_config_reloads_total", &[("result", "success")]), 1.0);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn wrong_method_names_the_allowed_one() {
    let (_mock, sluice) = start_with_mock().await;
    for (method, path, allowed) in
        [(reqwest::Method::POST, "/metrics", "GET"), (reqwest::Method::GET, "/reload", "POST")]
    {
        let response = admin(&sluice, method.clone(), path).await;
        assert_eq!(response.status(), 405);
        let allow = response.headers().get("allow").map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(allow.as_deref(), Some(allowed), "{method} {path}");
    }
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn reload_counts_in_metrics() {
    let (_mock, sluice) = start_with_mock().await;
    let response = admin(&sluice, reqwest::Method::POST, "/reload").await;
    assert_eq!(response.status(), 200);
    assert!(is_json(&response));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "reloaded");
    assert!(body["generation"].as_u64().is_some_and(|generation| generation >= 1), "{body}");
    let text = sluice.metrics().await;
    assert!(metric_value(&text, "sluice_config_reloads_total", &[("result", "success")]) >= 1.0);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn tunnels_open_gauge_follows_a_blind_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vendor = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: blind, hosts: [blind.example.com], target: '{}' }}\n",
        vendor.url()
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(sluice.running().proxy_addr).await.unwrap();
    let port = vendor.addr.port();
    stream
        .write_all(
            format!("CONNECT blind.example.com:{port} HTTP/1.1\r\nHost: blind.example.com:{port}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(WAIT, stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(read, 1, "sluice closed before answering the CONNECT");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let open = eventually(WAIT, || async {
        metric_value(&sluice.metrics().await, "sluice_tunnels_open", &[("kind", "blind")]) == 1.0
    })
    .await;
    assert!(open, "{}", sluice.metrics().await);
    let text = sluice.metrics().await;
    assert_eq!(metric_value(&text, "sluice_requests_total", &[("upstream", "blind"), ("method", "CONNECT")]), 1.0);

    drop(stream);
    let closed = eventually(WAIT, || async {
        metric_value(&sluice.metrics().await, "sluice_tunnels_open", &[("kind", "blind")]) == 0.0
    })
    .await;
    assert!(closed, "{}", sluice.metrics().await);
    assert!(sluice.shutdown().await);
}
