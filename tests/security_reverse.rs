#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security review findings at the plain HTTP doors (reverse mode and absolute-form), through
//! real sockets: route costs match the normalised path (M11); credentials under a wildcard host
//! need a target (M5); `TRACE` is refused and userinfo never echoed (L4, L11); the admin token
//! and Basic user names are compared as fixed-length digests (L5; timing is not asserted, what
//! the caller gets is).
mod support;

use std::time::Duration;

use support::process::run_sluice;
use support::security::{raw, sha256_hex};
use support::{direct_client, MockCrm, TestSluice};

// === M11: route costs ===

#[tokio::test]
async fn a_costly_route_costs_the_same_however_its_path_is_spelt() {
    let mock = MockCrm::start().await;
    // Each variant is its own bucket (scoped by a header), holding one cost-5 call.
    let sluice = TestSluice::start(&format!(
        "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    over_limit: reject
    quotas: [{{ name: search, limit: 5, per: 1m, burst: 5, key: ['header:x-variant'] }}]
    routes: [{{ match: 'POST /crm/v3/objects/{{object}}/search', cost: 5 }}]
",
        mock.url()
    ))
    .await;
    let variants = [
        "/crm/v3/objects/contacts/search",
        "/crm/v3/objects/contacts//search",
        "/crm/v3/objects/contacts/%73earch",
        "/crm/v3/objects/Contacts/Search",
        "/crm/v3/objects/contacts/search;x",
        "/crm/v3/objects/contacts/./search",
        "/crm/v3/objects/contacts/x/../search",
        "/crm/v3/objects/contacts/search/",
    ];
    for (at, path) in variants.iter().enumerate() {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let response = raw(
                &sluice,
                &format!(
                    "POST /hubspot{path} HTTP/1.1\r\nHost: sluice\r\nx-variant: v{at}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                ),
            )
            .await;
            statuses.push(response.status);
        }
        assert_eq!(statuses, [200, 429, 429, 429, 429], "{path}");
        // sluice counts by the normalised path but sends the path as the caller wrote it.
        assert_eq!(mock.requests().last().unwrap().path, *path);
    }
    // A cheap call is still cheap.
    let response =
        raw(&sluice, "POST /hubspot/crm/v3/objects/contacts HTTP/1.1\r\nHost: s\r\nx-variant: cheap\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").await;
    assert_eq!(response.status, 201);
    assert!(sluice.shutdown().await);
}

// === M5: credentials under a wildcard ===

#[tokio::test]
async fn credentials_on_a_wildcard_without_a_target_are_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "zd-token\n").unwrap();
    let config = dir.path().join("sluice.yaml");
    let text = format!(
        "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}
upstreams:
  - name: zendesk
    hosts: ['*.zendesk.com']
    credentials:
      value_file: {}
",
        dir.path().join("token").display()
    );
    std::fs::write(&config, &text).unwrap();
    let out = run_sluice(&["check", "-c", config.to_str().unwrap()], &[], dir.path(), Duration::from_secs(30));
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("upstreams[0].credentials (line 5)"), "{}", out.stderr);
    assert!(out.stderr.contains("*.zendesk.com") && out.stderr.contains("target"), "{}", out.stderr);
    assert!(sluice::app::start(&config).await.is_err(), "run refuses it too");

    // With a target, the credential goes only where the operator said.
    let mock = MockCrm::start().await;
    std::fs::write(
        &config,
        text.replace("    credentials:", &format!("    target: '{}'\n    credentials:", mock.url())),
    )
    .unwrap();
    let out = run_sluice(&["check", "-c", config.to_str().unwrap()], &[], dir.path(), Duration::from_secs(30));
    assert!(out.success(), "{out:?}");
}

// === L4, L11: methods and userinfo ===

#[tokio::test]
async fn trace_is_refused_at_every_door() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "pat-123\n").unwrap();
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{}', credentials: {{ prefix: 'Bearer ', value_file: $DIR/token }} }}\n",
            mock.url()
        ),
    )
    .await;
    for request in [
        "TRACE /hubspot/crm/v3 HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n",
        "TRACE http://api.hubapi.com/crm/v3 HTTP/1.1\r\nHost: api.hubapi.com\r\nConnection: close\r\n\r\n",
        "TRACK /hubspot/crm/v3 HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n",
    ] {
        let response = raw(&sluice, request).await;
        let body = response.expect_synthetic(405, "method_not_allowed", "http_request_denied");
        assert_eq!(body["upstream"], "hubspot");
        assert!(!String::from_utf8_lossy(&response.body).contains("pat-123"));
    }
    assert_eq!(mock.request_count(), 0, "{:?}", mock.requests());
    // Other methods still pass.
    let response = raw(&sluice, "OPTIONS /hubspot/crm/v3 HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n").await;
    assert_eq!(response.status, 200);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn userinfo_is_never_echoed_nor_forwarded() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}' }}\n",
        mock.url()
    ))
    .await;
    for bad_port in ["99999", "x1"] {
        let response = raw(
            &sluice,
            &format!("GET http://ops:hunter2@api.hubapi.com:{bad_port}/x HTTP/1.1\r\nHost: api.hubapi.com\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(response.status, 400, "{}", response.head);
        let everything = format!("{}{}", response.head, String::from_utf8_lossy(&response.body));
        assert!(!everything.contains("hunter2") && !everything.contains("ops:"), "{everything}");
    }
    // Userinfo without a port is not mistaken for one: the request goes through, without it.
    let response = raw(
        &sluice,
        "GET http://ops:hunter2@api.hubapi.com/crm HTTP/1.1\r\nHost: api.hubapi.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.head);
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert!(!format!("{:?}", seen[0].headers).contains("hunter2"), "{:?}", seen[0].headers);
    assert!(sluice.shutdown().await);
}

// === L5: secrets compared as digests ===

#[tokio::test]
async fn basic_auth_needs_the_user_and_its_own_password() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "clients:
  - {{ name: billing, secret_sha256: '{}', upstreams: ['*'] }}
  - {{ name: reports, user: rep, secret_sha256: '{}', upstreams: ['*'] }}
upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}' }}
",
        sha256_hex("billing-pass"),
        sha256_hex("reports-pass"),
        mock.url()
    ))
    .await;
    let proxy = |user: &str, password: &str| {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(sluice.proxy_url()).unwrap().basic_auth(user, password))
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    for (user, password, status) in [
        ("billing", "billing-pass", 200),
        ("rep", "reports-pass", 200),
        ("reports", "reports-pass", 407), // the name is not the Basic user
        ("rep", "billing-pass", 407),     // another client's password
        ("billing", "reports-pass", 407),
        ("billin", "billing-pass", 407),
        ("billing-x", "billing-pass", 407),
        ("", "billing-pass", 407),
    ] {
        let response = proxy(user, password).get("http://api.hubapi.com/x").send().await.unwrap();
        assert_eq!(response.status(), status, "{user}:{password}");
    }
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn the_admin_token_must_match_whatever_length_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "adm-token-1\n").unwrap();
    let sluice = TestSluice::start_in(
        dir,
        "listen: { proxy: 127.0.0.1:0, admin: '0.0.0.0:0' }\nadmin: { token_file: $DIR/admin.token }\nupstreams: []\n",
    )
    .await;
    let url = format!("http://127.0.0.1:{}/config", sluice.running().admin_addr.port());
    let client = direct_client();
    let long = "adm-token-1".repeat(100);
    for token in ["adm-token-", "adm-token-11", "ADM-TOKEN-1", "adm-token-2", long.as_str()] {
        let response = client.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 401, "{token}");
    }
    assert_eq!(client.get(&url).bearer_auth("adm-token-1").send().await.unwrap().status(), 200);
    assert!(sluice.shutdown().await);
}
