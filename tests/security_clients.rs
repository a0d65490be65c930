#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security at the clients door, through real sockets: who may use the proxy. With `clients:`
//! every request and CONNECT needs `Proxy-Authorization` (407 with both challenges otherwise),
//! each client keeps to its upstreams (403), and `proxy_user` scopes are its name; without it,
//! sluice is a sidecar serving loopback peers only, unless `listen.allow_remote_clients`. One
//! client address holds at most `limits.max_connections_per_client` connections.
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use support::raw_http::{expect_synthetic, RawConn, RawResponse};
use support::security::{
    basic, connect, get_through_tunnel, last_seen, local_non_loopback_v4, proxied_get, request_from, sha256_hex,
    still_serves, write_file,
};
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};

// === proxy clients ===

async fn with_clients(mock: &MockCrm, extra_upstream: &str, quota: &str) -> TestSluice {
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("reports.secret"), "reports-pass-1\n");
    TestSluice::start_in(
        dir,
        &format!(
            "clients:
  - {{ name: billing, secret_sha256: '{}', upstreams: [hubspot] }}
  - {{ name: reports, user: rep, secret_file: $DIR/reports.secret, upstreams: [salesforce] }}
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    target: '{mock}'
{quota}  - {{ name: salesforce, hosts: [acme.my.salesforce.com], target: '{mock}' }}
{extra_upstream}",
            sha256_hex("s3cret"),
            mock = mock.url(),
        ),
    )
    .await
}

fn assert_407(response: &RawResponse) {
    response.expect_synthetic(407, "proxy_auth_required", "http_request_denied");
    let challenges = response.header_all("proxy-authenticate").join(", ");
    assert!(challenges.contains("Basic realm="), "{}", response.head);
    assert!(challenges.contains("Bearer realm="), "{}", response.head);
}

#[tokio::test]
async fn clients_must_authenticate_and_keep_to_their_upstreams() {
    let mock = MockCrm::start().await;
    let sluice = with_clients(&mock, "", "").await;
    let hubspot = "api.hubapi.com";

    // Missing or wrong Proxy-Authorization: 407 with both challenges.
    for auth in [
        None,
        Some(basic("billing", "wrong")),
        Some(basic("billing", "reports-pass-1")),
        Some(basic("nobody", "s3cret")),
        Some("Bearer wrong".to_string()),
        Some("Digest username=\"billing\"".to_string()),
        Some("Basic !!!not-base64!!!".to_string()),
        Some("Bearer".to_string()),
    ] {
        let response = proxied_get(&sluice, hubspot, "/crm/v3/objects", auth.as_deref()).await;
        assert_407(&response);
    }
    assert_eq!(mock.request_count(), 0, "nothing unauthenticated reaches the vendor");

    // Valid Basic and Bearer for billing; the Proxy-Authorization never reaches the vendor.
    for auth in [basic("billing", "s3cret"), "Bearer s3cret".to_string(), "bearer s3cret".to_string()] {
        let response = proxied_get(&sluice, hubspot, "/crm/v3/objects/contacts", Some(&auth)).await;
        assert_eq!(response.status, 200, "{auth}: {}", response.head);
        assert!(last_seen(&mock, "proxy-authorization").is_none(), "Proxy-Authorization leaked upstream");
    }
    // billing may not use salesforce: 403, and the vendor sees nothing.
    let before = mock.request_count();
    let response =
        proxied_get(&sluice, "acme.my.salesforce.com", "/services/data", Some(&basic("billing", "s3cret"))).await;
    let body = response.expect_synthetic(403, "client_not_allowed", "http_request_denied");
    assert_eq!(body["upstream"], "salesforce");
    assert!(body["detail"].as_str().unwrap().contains("billing"), "{body}");
    assert_eq!(mock.request_count(), before);

    // reports (user `rep`, secret from a file) may use salesforce only.
    let response =
        proxied_get(&sluice, "acme.my.salesforce.com", "/services/data", Some(&basic("rep", "reports-pass-1"))).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let response = proxied_get(&sluice, "acme.my.salesforce.com", "/x", Some("Bearer reports-pass-1")).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let response = proxied_get(&sluice, hubspot, "/x", Some(&basic("rep", "reports-pass-1"))).await;
    response.expect_synthetic(403, "client_not_allowed", "http_request_denied");
    // The Basic user is `rep`, not the client's name.
    let response =
        proxied_get(&sluice, "acme.my.salesforce.com", "/x", Some(&basic("reports", "reports-pass-1"))).await;
    assert_407(&response);

    // The secret file is re-read: rotation needs no restart.
    std::fs::write(sluice.dir.path().join("reports.secret"), "reports-pass-2").unwrap();
    let response = proxied_get(&sluice, "acme.my.salesforce.com", "/x", Some(&basic("rep", "reports-pass-1"))).await;
    assert_407(&response);
    let response = proxied_get(&sluice, "acme.my.salesforce.com", "/x", Some(&basic("rep", "reports-pass-2"))).await;
    assert_eq!(response.status, 200, "{}", response.head);

    // A real client with proxy credentials.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap().basic_auth("billing", "s3cret"))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    assert_eq!(client.get("http://api.hubapi.com/crm/v3/owners").send().await.unwrap().status(), 200);
    let response = client.get("http://acme.my.salesforce.com/services").send().await.unwrap();
    expect_synthetic(response, 403, "client_not_allowed", "").await;
    sluice.shutdown().await;
}

#[tokio::test]
async fn connect_needs_proxy_authorization_too() {
    let mock = MockCrm::start().await;
    let sluice = with_clients(&mock, "", "").await;
    let addr = sluice.running().proxy_addr;
    for auth in [None, Some(basic("billing", "nope")), Some("Bearer nope".to_string())] {
        let (_conn, response) = connect(addr, "api.hubapi.com:443", auth.as_deref()).await;
        assert_407(&response);
    }
    // A valid client gets its tunnel (to the mock, plain HTTP inside).
    let (mut tunnel, response) = connect(addr, "api.hubapi.com:443", Some(&basic("billing", "s3cret"))).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(get_through_tunnel(&mut tunnel, "/through/the/tunnel").await, 200);
    assert_eq!(mock.requests().last().unwrap().path, "/through/the/tunnel");
    let (bearer_tunnel, response) = connect(addr, "api.hubapi.com:443", Some("Bearer s3cret")).await;
    assert_eq!(response.status, 200, "{}", response.head);
    // ... but only to its own upstreams.
    let (_conn, response) = connect(addr, "acme.my.salesforce.com:443", Some(&basic("billing", "s3cret"))).await;
    response.expect_synthetic(403, "client_not_allowed", "http_request_denied");
    let (_conn, response) = connect(addr, "api.hubapi.com:443", Some(&basic("rep", "reports-pass-1"))).await;
    response.expect_synthetic(403, "client_not_allowed", "http_request_denied");
    // Open tunnels would hold shutdown for its whole grace period.
    drop((tunnel, bearer_tunnel));
    assert!(sluice.shutdown().await, "tunnels did not drain after their clients closed");
}

/// With `clients:`, `proxy_user` is the authenticated client's name: Basic and Bearer of the same
/// client share one bucket, and each client has its own.
#[tokio::test]
async fn proxy_user_scope_is_the_client_name() {
    let mock = MockCrm::start().await;
    let sluice = with_clients(
        &mock,
        "",
        "    over_limit: reject\n    quotas: [{ name: per-client, limit: 2, per: 60s, burst: 2, key: [proxy_user] }]\n",
    )
    .await;
    let host = "api.hubapi.com";
    let billing = [basic("billing", "s3cret"), "Bearer s3cret".to_string(), basic("billing", "s3cret")];
    let mut statuses = Vec::new();
    for auth in &billing {
        statuses.push(proxied_get(&sluice, host, "/crm/v3/objects", Some(auth)).await.status);
    }
    assert_eq!(statuses, [200, 200, 429], "Basic and Bearer of `billing` share one bucket");
    let quotas: serde_json::Value =
        direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().json().await.unwrap();
    let scopes: Vec<&str> = quotas["upstreams"][0]["quotas"][0]["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap())
        .collect();
    assert_eq!(scopes, ["billing"], "{quotas}");
    sluice.shutdown().await;
}

/// Basic credentials split at the first colon: a password may contain colons.
#[tokio::test]
async fn basic_password_with_colons() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "clients:\n  - {{ name: colon, secret_sha256: '{}', upstreams: ['*'] }}\nupstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}' }}\n",
        sha256_hex("pa:ss:word"),
        mock.url()
    ))
    .await;
    let response = proxied_get(&sluice, "api.hubapi.com", "/x", Some(&basic("colon", "pa:ss:word"))).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let response = proxied_get(&sluice, "api.hubapi.com", "/x", Some(&basic("colon", "pa:ss"))).await;
    assert_407(&response);
    let response = proxied_get(&sluice, "api.hubapi.com", "/x", Some("Bearer pa:ss:word")).await;
    assert_eq!(response.status, 200, "{}", response.head);
    sluice.shutdown().await;
}

// === sidecar mode: loopback peers only ===

#[tokio::test]
async fn sidecar_mode_refuses_non_loopback_peers() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let proxy = sluice.running().proxy_addr;
    let request = "GET /hubspot/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    // 127.0.0.2 is another loopback address (all of 127/8 is): served.
    let (status, text) = request_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), proxy, request).await;
    assert_eq!(status, 200, "{text}");

    // A non-loopback local address (routed over lo, but not loopback to sluice): refused.
    let Some(outside) = local_non_loopback_v4() else {
        eprintln!("SKIPPED the non-loopback half: this machine has no non-loopback IPv4 address");
        sluice.shutdown().await;
        return;
    };
    let before = mock.request_count();
    let (status, text) = request_from(IpAddr::V4(outside), proxy, request).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("client_not_allowed") && text.contains("not a loopback client"), "{text}");
    let connect = "CONNECT api.hubapi.com:443 HTTP/1.1\r\nHost: api.hubapi.com:443\r\nConnection: close\r\n\r\n";
    let (status, text) = request_from(IpAddr::V4(outside), proxy, connect).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("client_not_allowed"), "{text}");
    assert_eq!(mock.request_count(), before);
    still_serves(&sluice, &mock).await;
    sluice.shutdown().await;
}

#[tokio::test]
async fn remote_peers_with_allow_remote_clients_or_with_clients() {
    let Some(outside) = local_non_loopback_v4() else {
        eprintln!("SKIPPED: this machine has no non-loopback IPv4 address");
        return;
    };
    let mock = MockCrm::start().await;
    let upstream =
        format!("  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{}' }}\n", mock.url());
    let request = "GET /hubspot/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    let open = TestSluice::start(&format!(
        "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0, allow_remote_clients: true }}\nupstreams:\n{upstream}"
    ))
    .await;
    let (status, text) = request_from(IpAddr::V4(outside), open.running().proxy_addr, request).await;
    assert_eq!(status, 200, "{text}");
    open.shutdown().await;

    // With `clients:`, identity replaces the loopback rule: a remote peer that authenticates is
    // served, one that does not gets 407.
    let shared = TestSluice::start(&format!(
        "clients:\n  - {{ name: billing, secret_sha256: '{}', upstreams: ['*'] }}\nupstreams:\n{upstream}",
        sha256_hex("s3cret")
    ))
    .await;
    let addr = shared.running().proxy_addr;
    let (status, text) = request_from(IpAddr::V4(outside), addr, request).await;
    assert_eq!(status, 407, "{text}");
    let authed = format!(
        "GET /hubspot/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        basic("billing", "s3cret")
    );
    let (status, text) = request_from(IpAddr::V4(outside), addr, &authed).await;
    assert_eq!(status, 200, "{text}");
    shared.shutdown().await;
}

// === connections per client ===

#[tokio::test]
async fn per_client_connection_cap_closes_the_fourth_connection() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "limits: {{ max_connections_per_client: 3 }}\nupstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let addr = sluice.running().proxy_addr;
    let mut open = Vec::new();
    for i in 0..3 {
        let mut conn = RawConn::connect(addr).await;
        conn.send(format!("GET /hubspot/keep/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        assert_eq!(conn.response("GET").await.unwrap().status, 200);
        open.push(conn);
    }
    let mut fourth = RawConn::connect(addr).await;
    let _ = fourth.send(b"GET /hubspot/fourth HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(fourth.closed_within(Duration::from_secs(5)).await, "the 4th connection was kept open");
    assert!(
        fourth.unread().is_empty(),
        "the 4th connection got an answer: {:?}",
        String::from_utf8_lossy(fourth.unread())
    );
    assert!(mock.requests().iter().all(|r| r.path != "/fourth"));
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_connections_refused_total", &[("reason", "per_client")]),
        1.0,
        "{metrics}"
    );
    // Another client address is not affected.
    let (status, text) = request_from(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        addr,
        "GET /hubspot/other-client HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // The three still work; closing one lets a new one in.
    for (i, conn) in open.iter_mut().enumerate() {
        conn.send(format!("GET /hubspot/again/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        assert_eq!(conn.response("GET").await.unwrap().status, 200);
    }
    open.pop();
    let admitted = eventually(Duration::from_secs(10), || async {
        let mut conn = RawConn::connect(addr).await;
        let _ = conn.send(b"GET /hubspot/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        conn.response("GET").await.is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(admitted, "a closed connection's place was not freed");
    sluice.shutdown().await;
}
