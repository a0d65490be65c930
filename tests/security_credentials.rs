#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security at the credentials door, through real sockets: the vendor credential is injected from
//! a file or the environment (`replace` or `if_absent`), re-read when the file is rewritten,
//! renamed over or swapped through a Kubernetes `..data` symlink, never shown in logs, `/config`,
//! `/metrics` or `/quotas`, and keys `key: [credential]` quota scopes by its hash; inside
//! intercepted tunnels too.
mod support;

use std::path::Path;
use std::time::Duration;

use support::process::SluiceProcess;
use support::raw_http::exchange;
use support::security::{last_seen, proxied_get, sha256_hex, unique_env, write_file};
use support::{direct_client, eventually, MockCrm, TestSluice};

// === injection ===

fn credential_config(mock: &MockCrm, credentials: &str) -> String {
    format!(
        "upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    prefix: /hubspot
    target: '{}'
    credentials: {credentials}
",
        mock.url()
    )
}

#[tokio::test]
async fn injected_credential_replaces_the_clients_header() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("hubspot.token"), "pat-na1-from-file\n");
    let sluice = TestSluice::start_in(
        dir,
        &credential_config(&mock, "{ header: authorization, prefix: 'Bearer ', value_file: $DIR/hubspot.token }"),
    )
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    // The client's own credential is replaced (mode defaults to replace), the newline trimmed.
    let response = client.get(&url).header("authorization", "Bearer app-pod-token").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.requests();
    assert_eq!(seen.last().unwrap().headers.get_all("authorization").iter().count(), 1, "{:?}", seen);
    assert_eq!(last_seen(&mock, "authorization").as_deref(), Some("Bearer pat-na1-from-file"));

    // Two Authorization headers from the client: both replaced by the one credential.
    let response = exchange(
        sluice.running().proxy_addr,
        b"GET /hubspot/two HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.head);
    let values: Vec<String> = mock
        .requests()
        .last()
        .unwrap()
        .headers
        .get_all("authorization")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(values, ["Bearer pat-na1-from-file"]);

    // None sent: injected all the same; forward-proxy (absolute-form) requests too.
    client.get(&url).send().await.unwrap();
    assert_eq!(last_seen(&mock, "authorization").as_deref(), Some("Bearer pat-na1-from-file"));
    let proxied = proxied_get(&sluice, "api.hubapi.com", "/crm/v3/objects/deals", Some("ignored")).await;
    assert_eq!(proxied.status, 200, "{}", proxied.head);
    assert_eq!(last_seen(&mock, "authorization").as_deref(), Some("Bearer pat-na1-from-file"));
    sluice.shutdown().await;
}

#[tokio::test]
async fn if_absent_keeps_the_clients_header_and_value_env_works() {
    let mock = MockCrm::start().await;
    let env = unique_env("IF_ABSENT");
    std::env::set_var(&env, "  env-secret-42  ");
    let sluice = TestSluice::start(&credential_config(
        &mock,
        &format!("{{ header: X-Api-Key, value_env: {env}, mode: if_absent }}"),
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    // Absent: set from the environment (trimmed, no prefix); the header name matches any case.
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(last_seen(&mock, "x-api-key").as_deref(), Some("env-secret-42"));
    // Present: the client's value is kept.
    assert_eq!(client.get(&url).header("x-api-key", "tenant-own-key").send().await.unwrap().status(), 200);
    assert_eq!(last_seen(&mock, "x-api-key").as_deref(), Some("tenant-own-key"));
    // Other headers are left alone.
    assert!(last_seen(&mock, "authorization").is_none());
    sluice.shutdown().await;
}

#[tokio::test]
async fn replace_mode_with_value_env() {
    let mock = MockCrm::start().await;
    let env = unique_env("REPLACE");
    std::env::set_var(&env, "sk_live_from_env");
    let sluice = TestSluice::start(&credential_config(
        &mock,
        &format!("{{ header: authorization, prefix: 'Bearer ', value_env: {env}, mode: replace }}"),
    ))
    .await;
    let response = direct_client()
        .get(format!("{}/hubspot/x", sluice.proxy_url()))
        .header("authorization", "Bearer from-the-app")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(last_seen(&mock, "authorization").as_deref(), Some("Bearer sk_live_from_env"));
    sluice.shutdown().await;
}

#[tokio::test]
async fn missing_credential_source_refuses_to_start() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = credential_config(&mock, &format!("{{ value_env: {} }}", unique_env("NEVER_SET")));
    let path = dir.path().join("sluice.yaml");
    write_file(&path, &format!("listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{yaml}"));
    let error = sluice::app::start(&path).await.err().expect("an unset value_env is refused").to_string();
    assert!(error.contains("value_env"), "{error}");
    let yaml = credential_config(&mock, "{ value_file: /nonexistent/sluice/token }");
    write_file(&path, &format!("listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{yaml}"));
    let error = sluice::app::start(&path).await.err().expect("a missing value_file is refused").to_string();
    assert!(error.contains("/nonexistent/sluice/token"), "{error}");
}

// === rotation ===

/// Requests until the mock sees `want` in `header`, for up to 10 s.
async fn eventually_sees(sluice: &TestSluice, mock: &MockCrm, header: &str, want: &str) -> bool {
    let url = format!("{}/hubspot/rotation", sluice.proxy_url());
    eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let ok = direct_client().get(&url).send().await.is_ok_and(|r| r.status() == 200);
            ok && last_seen(mock, header).as_deref() == Some(want)
        }
    })
    .await
}

#[tokio::test]
async fn rotation_of_a_rewritten_secret_file_needs_no_restart() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("secrets/hubspot.token");
    write_file(&token, "first-secret");
    let sluice = TestSluice::start_in(
        dir,
        &credential_config(&mock, "{ prefix: 'Bearer ', value_file: $DIR/secrets/hubspot.token }"),
    )
    .await;
    assert!(eventually_sees(&sluice, &mock, "authorization", "Bearer first-secret").await);

    // Rewritten in place (same inode).
    std::fs::write(&token, "second-secret\n").unwrap();
    assert!(
        eventually_sees(&sluice, &mock, "authorization", "Bearer second-secret").await,
        "the rewritten secret was not picked up; last seen {:?}",
        last_seen(&mock, "authorization")
    );

    // Replaced atomically (write a temporary file, rename over).
    let temporary = token.with_extension("tmp");
    std::fs::write(&temporary, "third-secret").unwrap();
    std::fs::rename(&temporary, &token).unwrap();
    assert!(
        eventually_sees(&sluice, &mock, "authorization", "Bearer third-secret").await,
        "the renamed-over secret was not picked up; last seen {:?}",
        last_seen(&mock, "authorization")
    );

    // Briefly gone (mid-swap): the value in use stays.
    std::fs::remove_file(&token).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(direct_client().get(format!("{}/hubspot/gone", sluice.proxy_url())).send().await.unwrap().status(), 200);
    assert_eq!(last_seen(&mock, "authorization").as_deref(), Some("Bearer third-secret"));
    std::fs::write(&token, "fourth-secret").unwrap();
    assert!(eventually_sees(&sluice, &mock, "authorization", "Bearer fourth-secret").await);
    sluice.shutdown().await;
}

/// How the kubelet updates a Secret volume: files live in a timestamped directory, `..data` is a
/// symlink to it, and each key is a symlink through `..data`. An update writes a new directory
/// and renames a new `..data` symlink over the old one.
fn kubernetes_secret_version(dir: &Path, version: &str, value: &str) {
    let versioned = dir.join(format!("..{version}"));
    write_file(&versioned.join("token"), value);
    let staging = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staging);
    std::os::unix::fs::symlink(format!("..{version}"), &staging).unwrap();
    std::fs::rename(&staging, dir.join("..data")).unwrap();
    let key = dir.join("token");
    if std::fs::symlink_metadata(&key).is_err() {
        std::os::unix::fs::symlink("..data/token", &key).unwrap();
    }
}

#[tokio::test]
async fn rotation_through_a_kubernetes_data_symlink_swap() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = dir.path().join("secret");
    kubernetes_secret_version(&secret_dir, "2026_01_15_10_00_00.1", "k8s-secret-v1");
    let sluice =
        TestSluice::start_in(dir, &credential_config(&mock, "{ prefix: 'Bearer ', value_file: $DIR/secret/token }"))
            .await;
    assert!(eventually_sees(&sluice, &mock, "authorization", "Bearer k8s-secret-v1").await);

    kubernetes_secret_version(&secret_dir, "2026_01_15_11_00_00.2", "k8s-secret-v2");
    assert!(
        eventually_sees(&sluice, &mock, "authorization", "Bearer k8s-secret-v2").await,
        "the ..data swap was not picked up; last seen {:?}",
        last_seen(&mock, "authorization")
    );
    // The old version directory goes away, as the kubelet removes it.
    std::fs::remove_dir_all(secret_dir.join("..2026_01_15_10_00_00.1")).unwrap();
    kubernetes_secret_version(&secret_dir, "2026_01_15_12_00_00.3", "k8s-secret-v3");
    assert!(eventually_sees(&sluice, &mock, "authorization", "Bearer k8s-secret-v3").await);
    sluice.shutdown().await;
}

// === never shown; scopes over the credential ===

/// The real binary, logging at its most verbose: the secrets (file and env, old and new) never
/// show in its logs, `/config`, `/metrics` or `/quotas`; the rotation and admin actions are
/// audit-logged.
#[tokio::test]
async fn secrets_never_appear_in_config_metrics_or_logs() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("hubspot.token");
    let (old_secret, new_secret, env_secret) =
        ("pat-old-7f3a9c1e5b2d4680", "pat-new-0e9d8c7b6a5f4e3d", "sk-env-1a2b3c4d5e6f7a8b");
    write_file(&token, old_secret);
    let env = unique_env("LOGS");
    let config = dir.path().join("sluice.yaml");
    write_file(
        &config,
        &format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{mock}'
    credentials: {{ prefix: 'Bearer ', value_file: {token} }}
    quotas: [{{ name: per-token, limit: 1000, per: 10s, key: [credential] }}]
  - name: zendesk
    prefix: /zendesk
    target: '{mock}'
    credentials: {{ header: x-api-key, value_env: {env} }}
",
            mock = mock.url(),
            token = token.display()
        ),
    );
    let mut process = SluiceProcess::run(&config, &[("SLUICE_LOG", "trace"), (env.as_str(), env_secret)]);
    let (proxy, admin) = process.addresses(Duration::from_secs(30)).await;
    let client = direct_client();
    for path in ["/hubspot/a", "/zendesk/b"] {
        let response = client.get(format!("http://{proxy}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(last_seen(&mock, "x-api-key").as_deref(), Some(env_secret));
    std::fs::write(&token, new_secret).unwrap();
    let rotated = eventually(Duration::from_secs(10), || {
        let client = client.clone();
        let mock = mock.clone();
        async move {
            let _ = client.get(format!("http://{proxy}/hubspot/c")).send().await;
            last_seen(&mock, "authorization") == Some(format!("Bearer {new_secret}"))
        }
    })
    .await;
    assert!(rotated, "rotation not seen; stderr:\n{}", process.stderr_text());

    let get = |path: &str| {
        let client = client.clone();
        let url = format!("http://{admin}{path}");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let config_json = get("/config").await;
    assert!(config_json.contains("hubspot.token"), "the path may show: {config_json}");
    let metrics = get("/metrics").await;
    let quotas = get("/quotas").await;
    assert!(quotas.contains("c-"), "credential scopes are hashes: {quotas}");
    let reload = client.post(format!("http://{admin}/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    let audit = process.wait_for_line(Duration::from_secs(5), |line| line.contains("admin_action")).await;
    assert!(audit.is_some(), "no admin audit line; stderr:\n{}", process.stderr_text());
    let logs = process.stderr_text();
    assert!(logs.contains("credential_rotated"), "no rotation audit line:\n{logs}");
    for secret in [old_secret, new_secret, env_secret] {
        assert!(!config_json.contains(secret), "/config shows a secret: {config_json}");
        assert!(!metrics.contains(secret), "/metrics shows a secret");
        assert!(!quotas.contains(secret), "/quotas shows a secret: {quotas}");
        assert!(!logs.contains(secret), "the logs show a secret:\n{logs}");
    }
}

/// `key: [credential]`: tenants sharing one sidecar with different CRM tokens get separate
/// buckets, keyed on the credential actually sent (the client's, or the injected one).
#[tokio::test]
async fn credential_scope_gives_each_token_its_own_bucket() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("token"), "shared-sidecar-token");
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    over_limit: reject
    credentials: {{ prefix: 'Bearer ', value_file: $DIR/token, mode: if_absent }}
    quotas: [{{ name: per-token, limit: 2, per: 60s, burst: 2, key: [credential] }}]
",
            mock.url()
        ),
    )
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    for (tenant, sent) in [("a", Some("Bearer tenant-a-token")), ("b", Some("Bearer tenant-b-token")), ("none", None)] {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let mut request = client.get(&url);
            if let Some(sent) = sent {
                request = request.header("authorization", sent);
            }
            statuses.push(request.send().await.unwrap().status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 429], "tenant {tenant}");
        let want = sent.unwrap_or("Bearer shared-sidecar-token");
        assert_eq!(last_seen(&mock, "authorization").as_deref(), Some(want), "tenant {tenant}");
    }
    assert_eq!(mock.request_count(), 6);
    let quotas = direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().text().await.unwrap();
    let scopes: serde_json::Value = serde_json::from_str(&quotas).unwrap();
    let scopes = scopes["upstreams"][0]["quotas"][0]["scopes"].as_array().unwrap().clone();
    assert_eq!(scopes.len(), 3, "{quotas}");
    assert!(scopes.iter().all(|s| s["scope"].as_str().unwrap().starts_with("c-")), "{quotas}");
    for token in ["tenant-a-token", "tenant-b-token", "shared-sidecar-token"] {
        assert!(!quotas.contains(token), "/quotas shows a token: {quotas}");
    }
    sluice.shutdown().await;
}

// === inside intercepted tunnels ===

/// Credentials are injected into requests inside intercepted tunnels, and a client identified at
/// CONNECT keeps its identity for the requests inside.
#[tokio::test]
async fn credentials_and_identity_inside_intercepted_tunnels() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("token"), "intercepted-secret");
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
clients:
  - {{ name: billing, secret_sha256: '{}', upstreams: [hubspot] }}
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    target: '{}'
    intercept: true
    over_limit: reject
    credentials: {{ prefix: 'Bearer ', value_file: $DIR/token }}
    quotas: [{{ name: per-client, limit: 2, per: 60s, burst: 2, key: [proxy_user] }}]
",
            sha256_hex("s3cret"),
            mock.url()
        ),
    )
    .await;
    let ca = reqwest::Certificate::from_pem(&sluice.ca_pem()).unwrap();
    let client = |auth: Option<(&str, &str)>| {
        let mut proxy = reqwest::Proxy::all(sluice.proxy_url()).unwrap();
        if let Some((user, password)) = auth {
            proxy = proxy.basic_auth(user, password);
        }
        reqwest::Client::builder()
            .proxy(proxy)
            .add_root_certificate(ca.clone())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    // No identity: the CONNECT is refused with 407 (reqwest reports it as an error).
    assert!(client(None).get("https://api.hubapi.com/x").send().await.is_err());
    assert_eq!(mock.request_count(), 0);
    let billing = client(Some(("billing", "s3cret")));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = billing
            .get("https://api.hubapi.com/crm/v3/objects")
            .header("authorization", "Bearer app-pod-token")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429], "proxy_user scope inside the tunnel");
    assert_eq!(last_seen(&mock, "authorization").as_deref(), Some("Bearer intercepted-secret"));
    assert!(last_seen(&mock, "proxy-authorization").is_none());
    sluice.shutdown().await;
}
