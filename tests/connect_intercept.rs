#![allow(clippy::unwrap_used, clippy::expect_used)]
//! CONNECT: interception (sluice terminates TLS with a leaf from its own CA and forwards the
//! requests inside), blind tunnels to allowed hosts, refusals, and upstreams reached over TLS.
mod support;

use std::time::Duration;

use support::curl::curl_status;
use support::raw_http::{expect_synthetic, RawConn};
use support::{eventually, metric_value, MockCrm, TestSluice};

/// sluice with a generated CA (`$DIR/ca.crt`) intercepting api.hubapi.com towards `target`.
async fn intercepting(target: &str, extra: &str) -> TestSluice {
    TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{target}', intercept: true }}
{extra}"
    ))
    .await
}

async fn tunnels_open(sluice: &TestSluice, kind: &str) -> f64 {
    metric_value(&sluice.metrics().await, "sluice_tunnels_open", &[("kind", kind)])
}

fn mock_ca_file(dir: &std::path::Path, mock: &MockCrm) -> std::path::PathBuf {
    let path = dir.join("mock-ca.pem");
    std::fs::write(&path, mock.ca_pem.as_ref().unwrap()).unwrap();
    path
}

fn ca_path(sluice: &TestSluice) -> String {
    sluice.dir.path().join("ca.crt").to_str().unwrap().to_string()
}

#[tokio::test]
async fn ca_is_generated_when_absent() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    let cert = String::from_utf8(sluice.ca_pem()).unwrap();
    assert!(cert.contains("-----BEGIN CERTIFICATE-----"), "{cert}");
    let key = std::fs::read_to_string(sluice.dir.path().join("ca.key")).unwrap();
    assert!(key.contains("PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sluice.dir.path().join("ca.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the CA key must not be readable by group or others: {mode:o}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn intercepted_https_reaches_the_mock_over_http2() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    let client = sluice.proxied_client();

    let response = client
        .get("https://api.hubapi.com/crm/v3/objects/contacts?limit=2")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // ALPN inside the tunnel offers h2, and reqwest takes it.
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.headers()["x-hubspot-correlation-id"], "c033cdaa-2c40-4a64-ae48-b4cec88dad24");
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/crm/v3/objects/contacts");

    let seen = mock.requests();
    assert_eq!(seen.len(), 1, "the request inside the tunnel reached the target");
    assert_eq!(seen[0].path, "/crm/v3/objects/contacts");
    assert_eq!(seen[0].query.as_deref(), Some("limit=2"));
    assert_eq!(seen[0].header("via"), Some("2 sluice"), "{:?}", seen[0].headers);
    assert_eq!(seen[0].header("traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    assert!(seen[0].header("x-request-id").is_some());

    // A POST through the same tunnel keeps its body.
    let response = client
        .post("https://api.hubapi.com/crm/v3/objects/contacts")
        .header("content-type", "application/json")
        .body(r#"{"properties":{"email":"grace@example.com"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    // Read to the end: an unread response keeps its HTTP/2 stream, and so the tunnel, open.
    response.bytes().await.unwrap();
    assert_eq!(mock.requests()[1].json()["properties"]["email"], "grace@example.com");

    let metrics = sluice.metrics().await;
    assert!(metric_value(&metrics, "sluice_leaf_certificates_minted_total", &[("result", "ok")]) >= 1.0, "{metrics}");
    assert!(metric_value(&metrics, "sluice_requests_total", &[("upstream", "hubspot"), ("method", "CONNECT")]) >= 1.0);
    assert!(metric_value(&metrics, "sluice_requests_total", &[("upstream", "hubspot"), ("method", "POST")]) >= 1.0);

    // The pooled client keeps the tunnel open; dropping it closes the tunnel.
    assert!(eventually(Duration::from_secs(5), || async { tunnels_open(&sluice, "intercept").await == 1.0 }).await);
    drop(client);
    assert!(
        eventually(Duration::from_secs(10), || async { tunnels_open(&sluice, "intercept").await == 0.0 }).await,
        "intercept tunnel gauge did not return to 0"
    );
    sluice.shutdown().await;
}

#[tokio::test]
async fn many_concurrent_requests_share_one_http2_tunnel() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    let client = sluice.proxied_client();
    // Warm up: one tunnel, HTTP/2.
    let first = client.get("https://api.hubapi.com/warmup").send().await.unwrap();
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    let requests = (0..20).map(|i| {
        let client = client.clone();
        async move {
            let response = client.get(format!("https://api.hubapi.com/crm/v3/objects/deals/{i}")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let echo: serde_json::Value = response.json().await.unwrap();
            assert_eq!(echo["path"], format!("/crm/v3/objects/deals/{i}"));
        }
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(mock.request_count(), 21);
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_requests_total", &[("method", "CONNECT")]),
        1.0,
        "HTTP/2 multiplexes every request over the first tunnel: {metrics}"
    );
    sluice.shutdown().await;
}

#[tokio::test]
async fn intercepted_http1_inside_the_tunnel() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    let pem = sluice.ca_pem();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .http1_only()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let response = client.get("https://api.hubapi.com/crm/v3/owners/?limit=5").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/crm/v3/owners/");
    assert_eq!(seen[0].query.as_deref(), Some("limit=5"));
    assert_eq!(seen[0].header("via"), Some("1.1 sluice"));
    sluice.shutdown().await;
}

#[tokio::test]
async fn curl_through_intercepting_proxy_http2_and_http1() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    let proxy = sluice.proxy_url();
    let ca = ca_path(&sluice);

    let out = curl_status(&["-x", &proxy, "--cacert", &ca, "https://api.hubapi.com/x?from=curl"], &[]).await;
    let (body, code, version) = out.split_status();
    assert_eq!(code, 200, "curl: {out:?}");
    assert_eq!(version, "2", "curl negotiates h2 inside the tunnel: {out:?}");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["path"], "/x");
    assert_eq!(echo["query"], "from=curl");

    let out = curl_status(&["--http1.1", "-x", &proxy, "--cacert", &ca, "https://api.hubapi.com/x/http1"], &[]).await;
    let (body, code, version) = out.split_status();
    assert_eq!(code, 200, "curl: {out:?}");
    assert_eq!(version, "1.1", "{out:?}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(body).unwrap()["path"], "/x/http1");

    // HTTPS_PROXY from the environment, the way services are configured.
    let out = curl_status(&["--cacert", &ca, "https://api.hubapi.com/x/env"], &[("https_proxy", &proxy)]).await;
    assert_eq!(out.split_status().1, 200, "curl: {out:?}");

    // Without trusting sluice's CA, curl refuses the minted certificate: it really is sluice's.
    let out = curl_status(&["-x", &proxy, "https://api.hubapi.com/x/untrusted"], &[]).await;
    assert!(!out.success, "curl must not trust sluice's leaf without --cacert: {out:?}");

    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/x", "/x/http1", "/x/env"]);
    sluice.shutdown().await;
}

#[tokio::test]
async fn connect_to_unknown_host_is_403() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;

    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n").await.unwrap();
    let response = conn.response("CONNECT").await.unwrap();
    let body = response.expect_synthetic(403, "egress_denied", "http_request_denied");
    assert!(body["upstream"].is_null());
    assert!(body["detail"].as_str().unwrap().contains("evil.example"), "{body}");

    // reqwest sees the tunnel refused.
    let error = sluice.proxied_client().get("https://evil.example/").send().await.unwrap_err();
    assert!(error.is_connect() || error.to_string().contains("tunnel"), "{error:?}");

    // And curl reports the CONNECT status.
    let out = support::curl::curl(
        &["-x", &sluice.proxy_url(), "-w", "%{http_connect}", "-o", "/dev/null", "https://evil.example/"],
        &[],
    )
    .await;
    assert!(!out.success);
    assert!(out.stdout.trim().ends_with("403"), "{out:?}");

    assert_eq!(mock.request_count(), 0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn connect_to_a_port_not_allowed_is_403() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    for port in [22u16, 80, 8443] {
        let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
        let request = format!("CONNECT api.hubapi.com:{port} HTTP/1.1\r\nHost: api.hubapi.com:{port}\r\n\r\n");
        conn.send(request.as_bytes()).await.unwrap();
        let response = conn.response("CONNECT").await.unwrap();
        let body = response.expect_synthetic(403, "egress_denied", "http_request_denied");
        assert_eq!(body["upstream"], "hubspot", "{body}");
        assert!(body["detail"].as_str().unwrap().contains(&format!(":{port}")), "{body}");
    }
    assert_eq!(mock.request_count(), 0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn connect_without_port_is_400() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "").await;
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"CONNECT api.hubapi.com HTTP/1.1\r\nHost: api.hubapi.com\r\n\r\n").await.unwrap();
    let response = conn.response("CONNECT").await.unwrap();
    let body = response.expect_synthetic(400, "malformed_request", "http_request_error");
    assert!(body["detail"].as_str().unwrap().contains("port"), "{body}");
    // Out-of-range and zero ports, and credentials in the authority, likewise.
    for target in ["api.hubapi.com:99999", "api.hubapi.com:0", "user@api.hubapi.com:443"] {
        let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
        conn.send(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
        match conn.response("CONNECT").await {
            Ok(response) => {
                response.expect_synthetic(400, "", "");
            }
            Err(error) => panic!("no answer to CONNECT {target}: {error:?}"),
        }
    }
    assert_eq!(mock.request_count(), 0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn blind_tunnel_to_allowed_host_is_not_intercepted() {
    let intercepted = MockCrm::start().await;
    let vendor = MockCrm::start_tls(&["vendor.example"]).await;
    let sluice = intercepting(
        &intercepted.url(),
        &format!(
            "  - {{ name: other, hosts: [vendor.example], target: 'https://127.0.0.1:{}' }}\n",
            vendor.addr.port()
        ),
    )
    .await;
    // Trusts the MOCK's CA only: if sluice minted the certificate, the handshake would fail.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(vendor.ca_pem.as_ref().unwrap().as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let response = client.get("https://vendor.example/api/v2/tickets?page=3").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "end-to-end ALPN between client and vendor");
    // sluice never saw the request: no id added, no Via either way.
    assert!(response.headers().get("x-request-id").is_none(), "{response:?}");
    assert!(response.headers().get("via").is_none(), "{response:?}");
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/api/v2/tickets");
    let seen = vendor.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].header("via").is_none(), "{:?}", seen[0].headers);
    assert!(seen[0].header("x-request-id").is_none(), "{:?}", seen[0].headers);
    assert_eq!(intercepted.request_count(), 0);

    // curl too, with the mock's CA.
    let ca = mock_ca_file(sluice.dir.path(), &vendor);
    let out =
        curl_status(&["-x", &sluice.proxy_url(), "--cacert", ca.to_str().unwrap(), "https://vendor.example/c"], &[])
            .await;
    assert_eq!(out.split_status().1, 200, "curl: {out:?}");

    assert!(eventually(Duration::from_secs(5), || async { tunnels_open(&sluice, "blind").await >= 1.0 }).await);
    drop(client);
    assert!(
        eventually(Duration::from_secs(10), || async { tunnels_open(&sluice, "blind").await == 0.0 }).await,
        "blind tunnel gauge did not return to 0: {}",
        sluice.metrics().await
    );
    sluice.shutdown().await;
}

#[tokio::test]
async fn connect_to_allowed_host_with_closed_target_is_502() {
    let mock = MockCrm::start().await;
    let dead = support::closed_port();
    let sluice = intercepting(
        &mock.url(),
        &format!("  - {{ name: other, hosts: [vendor.example], target: 'https://127.0.0.1:{dead}' }}\n"),
    )
    .await;
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"CONNECT vendor.example:443 HTTP/1.1\r\nHost: vendor.example:443\r\n\r\n").await.unwrap();
    let response = conn.response("CONNECT").await.unwrap();
    let body = response.expect_synthetic(502, "upstream_unreachable", "connection_refused");
    assert_eq!(body["upstream"], "other");
    assert_eq!(tunnels_open(&sluice, "blind").await, 0.0);

    // Still serving: the intercepted upstream works.
    let response = sluice.proxied_client().get("https://api.hubapi.com/after").send().await.unwrap();
    assert_eq!(response.status(), 200);
    sluice.shutdown().await;
}

#[tokio::test]
async fn stalled_tls_handshake_in_intercepted_tunnel_is_cut() {
    let mock = MockCrm::start().await;
    let sluice = intercepting(&mock.url(), "limits: { header_read_timeout: 500ms }\n").await;
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"CONNECT api.hubapi.com:443 HTTP/1.1\r\nHost: api.hubapi.com:443\r\n\r\n").await.unwrap();
    let response = conn.response("CONNECT").await.unwrap();
    assert_eq!(response.status, 200, "{}", response.head);
    // Never start the TLS handshake: sluice must not hold the tunnel forever.
    assert!(conn.closed_within(Duration::from_secs(10)).await, "stalled intercepted tunnel was never closed");
    assert!(eventually(Duration::from_secs(5), || async { tunnels_open(&sluice, "intercept").await == 0.0 }).await);
    let response = sluice.proxied_client().get("https://api.hubapi.com/after").send().await.unwrap();
    assert_eq!(response.status(), 200);
    sluice.shutdown().await;
}

/// Interception towards a vendor that itself speaks TLS (the production shape): the client's TLS
/// ends at sluice, and sluice opens its own TLS to the target, trusting `tls.extra_ca`.
#[tokio::test]
async fn intercepted_upstream_over_tls() {
    let vendor = MockCrm::start_tls(&["api.hubapi.com"]).await;
    let dir = tempfile::tempdir().unwrap();
    mock_ca_file(dir.path(), &vendor);
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}', intercept: true, tls: {{ extra_ca: $DIR/mock-ca.pem }} }}
",
            vendor.https_url()
        ),
    )
    .await;
    let response = sluice.proxied_client().get("https://api.hubapi.com/crm/v3/objects/contacts").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = vendor.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/crm/v3/objects/contacts");
    sluice.shutdown().await;
}

/// Reverse mode towards an HTTPS target signed by a private CA given as `tls.extra_ca`.
#[tokio::test]
async fn reverse_mode_to_tls_upstream_with_extra_ca() {
    let vendor = MockCrm::start_tls(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    mock_ca_file(dir.path(), &vendor);
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "upstreams:
  - {{ name: secure, prefix: /secure, target: 'https://127.0.0.1:{}', tls: {{ extra_ca: $DIR/mock-ca.pem }} }}
",
            vendor.addr.port()
        ),
    )
    .await;
    let client = support::direct_client();
    let response =
        client.get(format!("{}/secure/crm/v3/objects?archived=false", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/crm/v3/objects");
    assert_eq!(echo["query"], "archived=false");
    let seen = vendor.requests();
    assert_eq!(seen.len(), 1);
    // The vendor offers h2 by ALPN; sluice's client takes it.
    assert_eq!(seen[0].version, http::Version::HTTP_2, "sluice should speak h2 to a vendor that offers it");

    let response = client
        .post(format!("{}/secure/crm/v3/objects/notes", sluice.proxy_url()))
        .body(r#"{"properties":{"hs_note_body":"hi"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(vendor.requests()[1].json()["properties"]["hs_note_body"], "hi");
    sluice.shutdown().await;
}

/// Without the extra CA the vendor's certificate is not trusted: an honest 502, not a bypass.
#[tokio::test]
async fn tls_upstream_with_untrusted_certificate_is_502() {
    let vendor = MockCrm::start_tls(&[]).await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: secure, prefix: /secure, target: 'https://127.0.0.1:{}' }}\n",
        vendor.addr.port()
    ))
    .await;
    let response = support::direct_client().get(format!("{}/secure/x", sluice.proxy_url())).send().await.unwrap();
    let body = expect_synthetic(response, 502, "", "").await;
    assert_eq!(body["upstream"], "secure");
    assert!(body["detail"].as_str().unwrap().contains("certificate"), "{body}");
    assert_eq!(vendor.request_count(), 0);
    sluice.shutdown().await;
}

/// The same failure must be reported as a TLS error (so an SRE looks at certificates, not at the
/// network): `error: upstream_tls_error`, `Proxy-Status: sluice; error=tls_protocol_error`.
#[tokio::test]
async fn tls_upstream_with_untrusted_certificate_is_reported_as_tls_error() {
    let vendor = MockCrm::start_tls(&[]).await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: secure, prefix: /secure, target: 'https://127.0.0.1:{}' }}\n",
        vendor.addr.port()
    ))
    .await;
    let response = support::direct_client().get(format!("{}/secure/x", sluice.proxy_url())).send().await.unwrap();
    let body = expect_synthetic(response, 502, "upstream_tls_error", "tls_protocol_error").await;
    assert_eq!(body["upstream"], "secure");
    assert_eq!(vendor.request_count(), 0);
    sluice.shutdown().await;
}
