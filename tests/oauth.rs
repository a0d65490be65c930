#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The OAuth 2.0 token broker, end to end: sluice obtains the access token from a real (TLS)
//! mock token endpoint, injects it towards a mock vendor that accepts only currently valid
//! tokens, renews it once per expiry across replicas sharing a real `redis-server`, renews once
//! for a storm of 401s, keeps rotated refresh tokens, answers a failing endpoint with a clear
//! 502, and never shows a token in `/config` or `/metrics`.

mod support;

use std::path::Path;
use std::time::Duration;

use futures_util::future::join_all;
use http::StatusCode;
use support::oauth::{accept_only_valid_tokens, bearer_of, TokenServer, CLIENT_ID, CLIENT_SECRET};
use support::redis::RedisServer;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};

const FIRST_REFRESH_TOKEN: &str = "rt-initial-7c1d5a";

/// The upstream's files in `dir`: client id and secret, the first refresh token, and the CAs
/// of the token endpoint and the vendors (for `tls.extra_ca`).
fn write_secrets(dir: &Path, cas: &[&str]) {
    std::fs::write(dir.join("client-id"), format!("{CLIENT_ID}\n")).unwrap();
    std::fs::write(dir.join("client-secret"), format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::write(dir.join("refresh-token"), format!("{FIRST_REFRESH_TOKEN}\n")).unwrap();
    std::fs::write(dir.join("cas.pem"), cas.concat()).unwrap();
}

/// An upstream `hubspot` at `/hubspot`, sent to `vendor`, whose token comes from `tokens` by the
/// refresh-token grant; `store` is a top-level `store:` line or nothing, `extra` more of the
/// upstream's keys (indented).
fn refresh_token_config(tokens: &TokenServer, vendor: &MockCrm, store: &str, extra: &str) -> String {
    format!(
        "{store}upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{vendor}'
    tls: {{ extra_ca: $DIR/cas.pem }}
    credentials:
      oauth2:
        token_url: '{token_url}'
        grant: refresh_token
        client_id_file: $DIR/client-id
        client_secret_file: $DIR/client-secret
        refresh_token_file: $DIR/refresh-token
{extra}",
        vendor = vendor.https_url(),
        token_url = tokens.url(),
    )
}

async fn start(yaml: &str, cas: &[&str]) -> TestSluice {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path(), cas);
    TestSluice::start_in(dir, yaml).await
}

fn cas<'a>(tokens: &'a TokenServer, vendors: &[&'a MockCrm]) -> Vec<&'a str> {
    let mut all = vec![tokens.ca_pem.as_str()];
    all.extend(vendors.iter().map(|vendor| vendor.ca_pem.as_deref().unwrap()));
    all
}

/// `GET /hubspot/<path>` through `sluice`: status and JSON body.
async fn get(sluice: &TestSluice, path: &str) -> (u16, serde_json::Value) {
    let response = direct_client().get(format!("{}/hubspot{path}", sluice.proxy_url())).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// `per` GETs and one small POST to each replica, all at once; every status and body.
async fn burst(replicas: &[TestSluice], per: usize) -> Vec<(u16, serde_json::Value)> {
    let client = direct_client();
    let mut calls = Vec::new();
    for (at, sluice) in replicas.iter().enumerate() {
        for n in 0..per {
            let url = format!("{}/hubspot/crm/v3/objects/contacts/{at}-{n}", sluice.proxy_url());
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let response = client.get(url).send().await.unwrap();
                (response.status().as_u16(), response.json().await.unwrap_or_default())
            }));
        }
        let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .json(&serde_json::json!({"properties": {"email": "a@example.com"}}))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json().await.unwrap_or_default())
        }));
    }
    join_all(calls).await.into_iter().map(Result::unwrap).collect()
}

/// Waits (bounded) until the newest token the endpoint issued is no longer valid.
async fn until_expired(tokens: &TokenServer) {
    let expiry = tokens.newest_expiry().expect("a token was issued");
    let wait = expiry.saturating_duration_since(tokio::time::Instant::now());
    assert!(wait <= Duration::from_secs(10), "tokens live at most a few seconds here");
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_once_per_expiry_share_rotations_and_renew_once_for_a_401_storm() {
    let redis = RedisServer::start();
    let tokens = TokenServer::start(Duration::from_secs(4), FIRST_REFRESH_TOKEN).await;
    tokens.rotate_refresh_tokens();
    // A slow endpoint, so replicas needing a token at the same moment really overlap.
    tokens.set_delay(Duration::from_millis(300));
    let vendor = MockCrm::start_tls(&[]).await;
    let refused = accept_only_valid_tokens(&vendor, &tokens);
    let store = format!("store: {{ kind: redis, url: '{}' }}\n", redis.url());
    let yaml = refresh_token_config(&tokens, &vendor, &store, "");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(start(&yaml, &cas(&tokens, &[&vendor])).await);
    }

    for cycle in 0..4 {
        // In the first three cycles one replica needs the token first, a different one each
        // time: its own refresh-token file still holds the first token, which the endpoint no
        // longer takes after a rotation, so it can only succeed with the rotated one the others
        // left in Redis. Then all of them at once (in the last cycle, all at once from the
        // start: they race for the lock).
        if let Some(lead) = replicas.get(cycle).filter(|_| cycle < 3) {
            let (status, body) = get(lead, "/crm/v3/objects/contacts/lead").await;
            assert_eq!(status, 200, "cycle {cycle}: {body}");
        }
        let answers = burst(&replicas, 6).await;
        assert!(answers.iter().all(|(status, _)| *status == 200), "cycle {cycle}: {answers:?}");
        assert_eq!(tokens.calls(), cycle + 1, "cycle {cycle}: one token request per expiry, for all replicas");
        assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 0, "no expired token ever reached the vendor");
        if cycle > 0 {
            let sent = tokens.recorded()[cycle].form.get("refresh_token").cloned();
            assert_eq!(
                sent.as_ref(),
                tokens.issued_refresh_tokens().get(cycle - 1),
                "the rotated refresh token is used"
            );
        }
        if cycle < 3 {
            until_expired(&tokens).await;
        }
    }

    // The vendor revokes the token: every replica gets 401s at once, and one renewal serves all.
    tokens.revoke_access_tokens();
    let answers = burst(&replicas, 6).await;
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    assert_eq!(tokens.calls(), 5, "a 401 storm on three replicas renews the token once");
    assert_eq!(tokens.most_at_once(), 1, "the endpoint never served two replicas at once");
    let refusals = refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refusals >= 1, "the vendor did refuse the revoked token");
    let posted: Vec<_> = answers.iter().filter(|(_, body)| body["method"] == "POST").collect();
    assert_eq!(posted.len(), 3);
    for (_, body) in posted {
        assert!(body["body"].as_str().unwrap().contains("a@example.com"), "the retried POST kept its body: {body}");
    }

    let mut results = std::collections::HashMap::new();
    let mut retried = 0.0;
    for sluice in &replicas {
        let text = sluice.metrics().await;
        for result in ["success", "failure", "shared"] {
            *results.entry(result).or_insert(0.0) +=
                metric_value(&text, "sluice_oauth_refresh_total", &[("upstream", "hubspot"), ("result", result)]);
        }
        retried += metric_value(&text, "sluice_oauth_unauthorized_total", &[("outcome", "retried")]);
    }
    assert_eq!(results["success"], 5.0, "{results:?}");
    assert_eq!(results["failure"], 0.0, "{results:?}");
    assert!(results["shared"] >= 10.0, "the other replicas took the shared token each time: {results:?}");
    assert_eq!(retried, refusals as f64, "every refused call was retried once");
    for sluice in replicas {
        sluice.shutdown().await;
    }
}

#[tokio::test]
async fn a_401_storm_renews_once_and_every_call_is_retried_with_its_body() {
    let tokens = TokenServer::start(Duration::from_secs(600), FIRST_REFRESH_TOKEN).await;
    tokens.set_delay(Duration::from_millis(100));
    let vendor = MockCrm::start_tls(&[]).await;
    let refused = accept_only_valid_tokens(&vendor, &tokens);
    let sluice = start(&refresh_token_config(&tokens, &vendor, "", ""), &cas(&tokens, &[&vendor])).await;
    assert_eq!(get(&sluice, "/crm/v3/objects/contacts/1").await.0, 200);
    assert_eq!(tokens.calls(), 1);

    tokens.revoke_access_tokens();
    let answers = burst(std::slice::from_ref(&sluice), 20).await;
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    assert_eq!(tokens.calls(), 2, "twenty 401s, one renewal");
    let refusals = refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refusals >= 1);
    let text = sluice.metrics().await;
    assert_eq!(metric_value(&text, "sluice_oauth_unauthorized_total", &[("outcome", "retried")]), refusals as f64);
    let post = answers.iter().find(|(_, body)| body["method"] == "POST").unwrap();
    assert!(post.1["body"].as_str().unwrap().contains("a@example.com"), "{post:?}");
    let newest = vendor.requests().iter().rev().find_map(bearer_of).unwrap();
    assert!(tokens.is_valid(&newest), "the calls went out with the renewed token");
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_streamed_body_gets_the_vendors_401_and_the_next_call_a_renewed_token() {
    let tokens = TokenServer::start(Duration::from_secs(600), FIRST_REFRESH_TOKEN).await;
    let vendor = MockCrm::start_tls(&[]).await;
    accept_only_valid_tokens(&vendor, &tokens);
    let sluice = start(&refresh_token_config(&tokens, &vendor, "", ""), &cas(&tokens, &[&vendor])).await;
    assert_eq!(get(&sluice, "/crm/v3/objects/contacts/1").await.0, 200);
    tokens.revoke_access_tokens();

    // No length: sluice cannot hold it to send it twice, so the client gets the vendor's answer.
    let chunks = futures_util::stream::iter(
        ["{\"properties\":", "{\"email\":\"b@example.com\"}}"]
            .map(|chunk| Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(chunk)))),
    );
    let response = direct_client()
        .post(format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url()))
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["category"], "EXPIRED_AUTHENTICATION");
    // ... and the token is renewed in the background for the next calls.
    assert!(eventually(Duration::from_secs(5), || async { tokens.calls() == 2 }).await);
    assert_eq!(get(&sluice, "/crm/v3/objects/contacts/2").await.0, 200);
    let text = sluice.metrics().await;
    assert_eq!(metric_value(&text, "sluice_oauth_unauthorized_total", &[("outcome", "relayed")]), 1.0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_failing_token_endpoint_is_a_502_with_proxy_status_and_a_metric_and_is_not_stampeded() {
    let tokens = TokenServer::start(Duration::from_secs(600), FIRST_REFRESH_TOKEN).await;
    let vendor = MockCrm::start_tls(&[]).await;
    accept_only_valid_tokens(&vendor, &tokens);
    let sluice = start(&refresh_token_config(&tokens, &vendor, "", ""), &cas(&tokens, &[&vendor])).await;
    tokens.fail_with(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");

    let response =
        direct_client().get(format!("{}/hubspot/crm/v3/objects/contacts/1", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let proxy_status = response.headers()["proxy-status"].to_str().unwrap().to_owned();
    assert!(proxy_status.starts_with("sluice; error=proxy_internal_error; details="), "{proxy_status}");
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "credential_unavailable");
    assert_eq!(body["upstream"], "hubspot");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("the token endpoint answered 503 temporarily_unavailable"), "{detail}");

    // Held off: more requests get the same answer at once, without asking the endpoint again.
    for _ in 0..5 {
        assert_eq!(get(&sluice, "/crm/v3/objects/contacts/1").await.0, 502);
    }
    assert_eq!(tokens.calls(), 1, "a failing endpoint is not stampeded");
    assert_eq!(vendor.request_count(), 0, "the vendor was never asked without a token");
    let text = sluice.metrics().await;
    assert_eq!(
        metric_value(&text, "sluice_oauth_refresh_total", &[("upstream", "hubspot"), ("result", "failure")]),
        1.0
    );
    assert_eq!(metric_value(&text, "sluice_proxy_errors_total", &[("error", "credential_unavailable")]), 6.0);

    // Healthy again: served after the hold-off (1 s after a first failure).
    tokens.heal();
    assert!(
        eventually(Duration::from_secs(5), || async { get(&sluice, "/crm/v3/objects/contacts/1").await.0 == 200 })
            .await
    );
    let text = sluice.metrics().await;
    assert_eq!(
        metric_value(&text, "sluice_oauth_refresh_total", &[("upstream", "hubspot"), ("result", "success")]),
        1.0
    );
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_rotated_refresh_token_is_written_back_and_used_next_time_and_no_token_is_ever_shown() {
    let tokens = TokenServer::start(Duration::from_secs(2), FIRST_REFRESH_TOKEN).await;
    tokens.rotate_refresh_tokens();
    let vendor = MockCrm::start_tls(&[]).await;
    accept_only_valid_tokens(&vendor, &tokens);
    // A quota scoped by credential: the bucket stands for the grant, not for each token.
    let quota = "    quotas: [{ name: per-account, limit: 1000, per: 1h, key: [credential] }]\n";
    let sluice = start(&refresh_token_config(&tokens, &vendor, "", quota), &cas(&tokens, &[&vendor])).await;
    let file = sluice.dir.path().join("refresh-token");

    assert_eq!(get(&sluice, "/crm/v3/objects/contacts/1").await.0, 200);
    let first = tokens.issued_refresh_tokens()[0].clone();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), first, "written back to the (writable) file");
    until_expired(&tokens).await;
    assert_eq!(get(&sluice, "/crm/v3/objects/contacts/2").await.0, 200);
    assert_eq!(tokens.calls(), 2);
    assert_eq!(tokens.recorded()[1].form["refresh_token"], first, "the rotated one was sent");
    let second = tokens.issued_refresh_tokens()[1].clone();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), second);

    // Secrets sent to the endpoint: in the body by default.
    let call = &tokens.recorded()[0];
    assert_eq!(call.form["grant_type"], "refresh_token");
    assert_eq!((call.form["client_id"].as_str(), call.form["client_secret"].as_str()), (CLIENT_ID, CLIENT_SECRET));
    assert_eq!(call.authorization, None);

    // No token, refresh token or client secret in /config or /metrics.
    let config = direct_client().get(sluice.admin_url("/config")).send().await.unwrap().text().await.unwrap();
    let metrics = sluice.metrics().await;
    let access: Vec<String> = vendor.requests().iter().filter_map(bearer_of).collect();
    assert!(access.len() >= 2);
    let mut secrets = access;
    secrets.extend([FIRST_REFRESH_TOKEN.to_owned(), first, second, CLIENT_SECRET.to_owned()]);
    for secret in &secrets {
        assert!(!config.contains(secret.as_str()), "/config shows a secret:\n{config}");
        assert!(!metrics.contains(secret.as_str()), "/metrics shows a secret");
    }
    assert!(config.contains("oauth2") && config.contains("<redacted>"), "{config}");
    assert!(metrics.contains("sluice_oauth_token_expiry_timestamp_seconds{upstream=\"hubspot\"}"));
    let quotas: serde_json::Value =
        direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().json().await.unwrap();
    let scopes = quotas["upstreams"][0]["quotas"][0]["scopes"].as_array().unwrap().clone();
    assert_eq!(scopes.len(), 1, "two tokens, one bucket: {quotas}");
    assert_eq!(scopes[0]["requests"], 2, "{quotas}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn client_credentials_with_basic_auth_and_a_salesforce_instance_url() {
    let tokens = TokenServer::start(Duration::from_secs(600), FIRST_REFRESH_TOKEN).await;
    // The configured target (a login host) must receive nothing: the token names the instance.
    let login = MockCrm::start_tls(&[]).await;
    let instance = MockCrm::start_tls(&[]).await;
    accept_only_valid_tokens(&instance, &tokens);
    tokens.set_instance_url(&instance.https_url());
    let yaml = format!(
        "upstreams:
  - name: salesforce
    prefix: /salesforce
    hosts: [127.0.0.1]
    target: '{login}'
    tls: {{ extra_ca: $DIR/cas.pem }}
    credentials:
      oauth2:
        token_url: '{token_url}'
        grant: client_credentials
        client_id_file: $DIR/client-id
        client_secret_file: $DIR/client-secret
        client_auth: basic
        scope: 'api refresh_token'
        audience: 'https://api.example.com'
        instance_url: true
",
        login = login.https_url(),
        token_url = tokens.url(),
    );
    let sluice = start(&yaml, &cas(&tokens, &[&login, &instance])).await;
    let response = direct_client()
        .get(format!("{}/salesforce/services/data/v60.0/sobjects", sluice.proxy_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["path"], "/services/data/v60.0/sobjects");
    assert_eq!(login.request_count(), 0, "requests go to the token's instance_url");
    assert_eq!(instance.request_count(), 1);

    let call = &tokens.recorded()[0];
    assert_eq!(call.form["grant_type"], "client_credentials");
    assert_eq!(call.form["scope"], "api refresh_token");
    assert_eq!(call.form["audience"], "https://api.example.com");
    assert!(!call.form.contains_key("client_secret") && !call.form.contains_key("client_id"), "{:?}", call.form);
    let basic = call.authorization.as_deref().unwrap().strip_prefix("Basic ").unwrap();
    let decoded = sluice::security::clients::decode_base64(basic).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    sluice.shutdown().await;
}
