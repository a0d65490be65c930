#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security at the egress door, through real sockets: where sluice may connect, and how. A host
//! a client names is resolved and every address checked, so loopback, private and metadata
//! addresses are refused (in forward, CONNECT, reverse and intercepted traffic alike) unless an
//! upstream's `target` names them; towards a vendor that wants one, sluice presents its client
//! certificate (mutual TLS).
mod support;

use std::time::Duration;

use support::mtls::MtlsMock;
use support::process::run_sluice;
use support::raw_http::expect_synthetic;
use support::security::{connect, get_through_tunnel, proxied_get, write_file};
use support::{direct_client, metric_value, MockCrm, TestSluice};

// === egress guard ===

#[tokio::test]
async fn private_and_metadata_addresses_are_refused_without_a_target() {
    // Safety first: the guard itself must refuse these before sluice is asked to go there.
    for host in ["localhost", "127.0.0.1", "169.254.169.254"] {
        assert!(sluice::security::egress::resolve_allowed(host, 443).await.is_err(), "{host} is not blocked");
    }
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(
        "upstreams:
  - { name: local, hosts: [localhost] }
  - { name: literal, hosts: ['127.0.0.1', '169.254.169.254'], connect_ports: [443, 80] }
  - { name: hubspot, prefix: /hubspot, target: 'http://127.0.0.1:9' }
",
    )
    .await;
    let addr = sluice.running().proxy_addr;
    let mut refused = 0.0;
    // A hostname that resolves to loopback: refused after resolution.
    let response = proxied_get(&sluice, "localhost", "/", None).await;
    let body = response.expect_synthetic(403, "egress_denied", "http_request_denied");
    assert_eq!(body["upstream"], "local");
    assert!(body["detail"].as_str().unwrap().contains("localhost"), "{body}");
    refused += 1.0;
    let (_conn, response) = connect(addr, "localhost:443", None).await;
    response.expect_synthetic(403, "egress_denied", "http_request_denied");
    refused += 1.0;
    // Address literals: loopback and the cloud metadata service.
    for host in ["127.0.0.1", "169.254.169.254"] {
        let response = proxied_get(&sluice, host, "/latest/meta-data/iam/security-credentials/", None).await;
        response.expect_synthetic(403, "egress_denied", "http_request_denied");
        let (_conn, response) = connect(addr, &format!("{host}:443"), None).await;
        response.expect_synthetic(403, "egress_denied", "http_request_denied");
        let (_conn, response) = connect(addr, &format!("{host}:80"), None).await;
        response.expect_synthetic(403, "egress_denied", "http_request_denied");
        refused += 3.0;
    }
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_proxy_errors_total", &[("error", "egress_denied")]),
        refused,
        "{metrics}"
    );
    assert_eq!(mock.request_count(), 0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn private_addresses_named_by_a_target_are_allowed() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: named, hosts: [localhost, '127.0.0.1', '169.254.169.254'], target: '{}' }}\n",
        mock.url()
    ))
    .await;
    for host in ["localhost", "127.0.0.1", "169.254.169.254"] {
        let response = proxied_get(&sluice, host, "/latest/meta-data/", None).await;
        assert_eq!(response.status, 200, "{host}: {}", response.head);
        assert_eq!(mock.requests().last().unwrap().path, "/latest/meta-data/");
        let (mut tunnel, response) = connect(sluice.running().proxy_addr, &format!("{host}:443"), None).await;
        assert_eq!(response.status, 200, "{host}: {}", response.head);
        assert_eq!(get_through_tunnel(&mut tunnel, "/tunnelled").await, 200);
    }
    sluice.shutdown().await;
}

/// The egress guard applies inside intercepted tunnels too: the decrypted request to a host that
/// resolves to loopback is refused (403 from sluice, inside the TLS the client trusts).
#[tokio::test]
async fn egress_guard_applies_inside_intercepted_tunnels() {
    let sluice = TestSluice::start(
        "intercept: { ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }
upstreams:
  - { name: local, hosts: [localhost, '127.0.0.1'], intercept: true }
",
    )
    .await;
    let client = sluice.proxied_client();
    for url in ["https://localhost/latest/meta-data/", "https://127.0.0.1/x"] {
        let response = client.get(url).send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        let body = expect_synthetic(response, 403, "egress_denied", "http_request_denied").await;
        assert_eq!(body["upstream"], "local", "{url}: {body}");
    }
    sluice.shutdown().await;
}

/// An upstream with a `prefix` and no `target` sends reverse-mode traffic to its first host. The
/// operator named that host, not an address: what it resolves to must pass the egress guard like
/// any host without a target, in reverse and forward mode alike.
#[tokio::test]
async fn prefix_without_target_still_passes_the_egress_guard() {
    let sluice = TestSluice::start("upstreams:\n  - { name: local, hosts: [localhost], prefix: /local }\n").await;
    let response = direct_client().get(format!("{}/local/latest/meta-data/", sluice.proxy_url())).send().await.unwrap();
    expect_synthetic(response, 403, "egress_denied", "http_request_denied").await;
    let response = proxied_get(&sluice, "localhost", "/latest/meta-data/", None).await;
    response.expect_synthetic(403, "egress_denied", "http_request_denied");
    let (_conn, response) = connect(sluice.running().proxy_addr, "localhost:443", None).await;
    response.expect_synthetic(403, "egress_denied", "http_request_denied");
    sluice.shutdown().await;
}

/// The same with an address literal as the first host: hyper's connector never asks the
/// resolver about a literal, so the guard must check it before (as it does in forward mode).
#[tokio::test]
async fn prefix_without_target_to_an_address_literal_passes_the_egress_guard() {
    let sluice = TestSluice::start("upstreams:\n  - { name: literal, hosts: ['127.0.0.1'], prefix: /literal }\n").await;
    // Forward mode is guarded already.
    let response = proxied_get(&sluice, "127.0.0.1", "/x", None).await;
    response.expect_synthetic(403, "egress_denied", "http_request_denied");
    let response =
        direct_client().get(format!("{}/literal/latest/meta-data/", sluice.proxy_url())).send().await.unwrap();
    expect_synthetic(response, 403, "egress_denied", "http_request_denied").await;
    sluice.shutdown().await;
}

// === mutual TLS towards the vendor ===

#[tokio::test]
async fn mtls_client_certificate_is_presented_to_the_vendor() {
    let vendor = MtlsMock::start().await;
    let dir = tempfile::tempdir().unwrap();
    vendor.write_files(dir.path());
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "upstreams:
  - {{ name: mtls, prefix: /mtls, target: '{url}', tls: {{ extra_ca: $DIR/mtls-ca.pem, client_cert: $DIR/client.crt, client_key: $DIR/client.key }} }}
  - {{ name: nocert, prefix: /nocert, target: '{url}', tls: {{ extra_ca: $DIR/mtls-ca.pem }} }}
  - {{ name: stranger, prefix: /stranger, target: '{url}', tls: {{ extra_ca: $DIR/mtls-ca.pem, client_cert: $DIR/stranger.crt, client_key: $DIR/stranger.key }} }}
",
            url = vendor.https_url()
        ),
    )
    .await;
    let client = direct_client();
    let response = client.get(format!("{}/mtls/crm/v3/objects", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/crm/v3/objects");
    assert!(vendor.accepted_handshakes() >= 1);
    assert_eq!(vendor.requests(), 1);

    // Without a client certificate, or with one the vendor does not trust: 502, nothing served.
    for name in ["nocert", "stranger"] {
        let response = client.get(format!("{}/{name}/crm/v3/objects", sluice.proxy_url())).send().await.unwrap();
        let body = expect_synthetic(response, 502, "", "").await;
        assert_eq!(body["upstream"], name, "{body}");
    }
    assert_eq!(vendor.requests(), 1, "a request without a trusted client certificate was served");
    assert!(vendor.refused_handshakes() >= 2);
    sluice.shutdown().await;
}

#[tokio::test]
async fn mtls_key_without_certificate_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    write_file(
        &config,
        "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
upstreams:
  - { name: mtls, prefix: /mtls, target: 'https://127.0.0.1:9', tls: { client_key: /tmp/whatever.key } }
",
    );
    let check = run_sluice(&["check", "-c", config.to_str().unwrap()], &[], dir.path(), Duration::from_secs(30));
    assert!(!check.success());
    assert!(check.stderr.contains("client_cert and client_key go together"), "{}", check.stderr);
}
