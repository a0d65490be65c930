#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security at the admin door, through real sockets: off loopback, `POST /reload` and
//! `GET /config` need the admin token (from a file, re-read on every check, or the environment)
//! and are refused outright without one configured; probes and scrapers stay open; on loopback
//! no token is needed.
mod support;

use support::security::{unique_env, write_file};
use support::{direct_client, TestSluice};

async fn admin_status(client: &reqwest::Client, method: &str, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = client.request(method.parse().unwrap(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The admin listener on 0.0.0.0 (the guard keys on the listener address); the test connects to
/// 127.0.0.1 on its port.
async fn exposed_admin(admin: &str) -> (TestSluice, String) {
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("admin.token"), "adm-token-1\n");
    let sluice = TestSluice::start_in(
        dir,
        &format!("listen: {{ proxy: 127.0.0.1:0, admin: '0.0.0.0:0' }}\n{admin}upstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: 'http://127.0.0.1:9' }}\n"),
    )
    .await;
    let base = format!("http://127.0.0.1:{}", sluice.running().admin_addr.port());
    (sluice, base)
}

#[tokio::test]
async fn admin_token_guards_reload_and_config_off_loopback() {
    let (sluice, base) = exposed_admin("admin: { token_file: $DIR/admin.token }\n").await;
    assert!(!sluice.running().admin_addr.ip().is_loopback());
    let client = direct_client();
    for (method, path) in [("POST", "/reload"), ("GET", "/config")] {
        let url = format!("{base}{path}");
        for token in [None, Some("wrong"), Some("adm-token-1x"), Some("")] {
            let response = admin_status(&client, method, &url, token).await;
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok());
            assert!(challenge.is_some_and(|c| c.starts_with("Bearer")), "{response:?}");
        }
        // A Basic header is not a token.
        let response = client
            .request(method.parse().unwrap(), &url)
            .basic_auth("admin", Some("adm-token-1"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        let response = admin_status(&client, method, &url, Some("adm-token-1")).await;
        assert_eq!(response.status(), 200, "{method} {path} with the token");
    }
    let config: serde_json::Value =
        admin_status(&client, "GET", &format!("{base}/config"), Some("adm-token-1")).await.json().await.unwrap();
    assert_eq!(config["config"]["admin"]["token_file"], "<redacted>", "{config}");
    // Open endpoints stay open.
    for path in ["/metrics", "/healthz", "/readyz", "/quotas", "/breakers"] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // The token file is re-read: rotation needs no restart.
    std::fs::write(sluice.dir.path().join("admin.token"), "adm-token-2").unwrap();
    assert_eq!(admin_status(&client, "POST", &format!("{base}/reload"), Some("adm-token-1")).await.status(), 401);
    assert_eq!(admin_status(&client, "POST", &format!("{base}/reload"), Some("adm-token-2")).await.status(), 200);
    sluice.shutdown().await;
}

#[tokio::test]
async fn admin_token_from_the_environment() {
    let env = unique_env("ADMIN_TOKEN");
    std::env::set_var(&env, "adm-env-token");
    let (sluice, base) = exposed_admin(&format!("admin: {{ token_env: {env} }}\n")).await;
    let client = direct_client();
    assert_eq!(admin_status(&client, "GET", &format!("{base}/config"), None).await.status(), 401);
    assert_eq!(admin_status(&client, "GET", &format!("{base}/config"), Some("adm-env-token")).await.status(), 200);
    sluice.shutdown().await;
}

#[tokio::test]
async fn exposed_admin_without_a_token_refuses_sensitive_endpoints() {
    let (sluice, base) = exposed_admin("").await;
    let client = direct_client();
    for (method, path) in [("POST", "/reload"), ("GET", "/config")] {
        for token in [None, Some("anything")] {
            let response = admin_status(&client, method, &format!("{base}{path}"), token).await;
            assert_eq!(response.status(), 403, "{method} {path}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"], "admin_token_required", "{body}");
        }
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(client.get(format!("{base}{path}")).send().await.unwrap().status(), 200, "{path}");
    }
    sluice.shutdown().await;
}

#[tokio::test]
async fn loopback_admin_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("admin.token"), "adm-token-1");
    let sluice = TestSluice::start_in(
        dir,
        "admin: { token_file: $DIR/admin.token }\nupstreams:\n  - { name: hubspot, prefix: /hubspot, target: 'http://127.0.0.1:9' }\n",
    )
    .await;
    let client = direct_client();
    assert_eq!(admin_status(&client, "POST", &sluice.admin_url("/reload"), None).await.status(), 200);
    assert_eq!(admin_status(&client, "GET", &sluice.admin_url("/config"), None).await.status(), 200);
    sluice.shutdown().await;
}
