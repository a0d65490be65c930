#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Quotas as a new user meets them, through real sockets: a small quota in reject and queue
//! mode delivers its whole burst at once and the next request exactly when the oldest leaves the
//! window; a daily-shaped budget is a budget, not a pace; a failing vendor is reported as an
//! outage (the breaker's 503), never as a rate limit; after Redis comes back, what the replica
//! admitted alone is in the shared record; a Redis connection that goes silent is replaced.
mod support;

use std::time::Duration;

use serde_json::Value;
use support::redis::RedisServer;
use support::relay::Relay;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

/// One upstream `hubspot` at `/hubspot` on `mock`, with `body` (lines indented by four spaces).
fn config(store: &str, mock: &MockCrm, body: &str) -> String {
    format!("{store}upstreams:\n  - name: hubspot\n    prefix: /hubspot\n    target: '{}'\n{body}", mock.url())
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
}

fn retry_after(response: &reqwest::Response) -> u64 {
    let value = header(response, "retry-after").expect("carries Retry-After");
    value.parse().unwrap_or_else(|_| panic!("Retry-After {value:?} is not integer seconds"))
}

async fn body(response: reqwest::Response) -> Value {
    response.json().await.unwrap_or(Value::Null)
}

async fn mode(sluice: &TestSluice) -> String {
    let ready: Value = direct_client().get(sluice.admin_url("/readyz")).send().await.unwrap().json().await.unwrap();
    ready["store"]["mode"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_small_quota_in_reject_mode_lets_the_whole_burst_through() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    over_limit: reject\n    quotas: [{ name: ten-secondly, limit: 5, per: 10s }]\n",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let first = Instant::now();
    for n in 0..5 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "request {n} of the burst of 5 goes at once");
    }
    let sixth = client.get(&url).send().await.unwrap();
    let elapsed = first.elapsed().as_secs_f64();
    assert_eq!(sixth.status(), 429);
    // The vendor frees the slot 10 s after the first request (sluice keeps 100 ms of margin).
    let wait = retry_after(&sixth) as f64;
    let truth = 10.0 - elapsed;
    assert!(wait >= truth && wait <= truth + 1.2, "Retry-After {wait} s, true time {truth:.2} s");
    assert!(header(&sixth, "proxy-status").is_some_and(|status| status.starts_with("sluice")));
    assert_eq!(body(sixth).await["error"], "rate_limited");
    assert_eq!(mock.request_count(), 5, "the vendor got all five and no sixth");
    sluice.shutdown().await;

    // `limit: 3, per: 60s`: three of five back-to-back requests pass.
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    over_limit: reject\n    quotas: [{ name: minute, limit: 3, per: 60s }]\n",
    ))
    .await;
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(client.get(&url).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    sluice.shutdown().await;
}

#[tokio::test]
async fn in_queue_mode_the_next_request_goes_when_the_first_leaves_the_window() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    over_limit: queue\n    max_queue_wait: 15s\n    quotas: [{ name: ten-secondly, limit: 5, per: 10s }]\n",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut answers = Vec::new();
    for seq in 0..6 {
        answers.push(tokio::spawn(client.get(&url).header("x-seq", seq.to_string()).send()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for answer in answers {
        assert_eq!(answer.await.unwrap().unwrap().status(), 200, "every caller is served");
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 6);
    let first = seen[0].at;
    let burst_end = seen[4].at - first;
    assert!(burst_end < Duration::from_secs(2), "the first five go back to back: {burst_end:?}");
    let sixth = seen[5].at - first;
    // Not 2 s after the first (the paced shape), but the moment the first leaves the window.
    assert!(sixth >= Duration::from_secs(10), "the sixth reached the vendor {sixth:?} after the first");
    assert!(sixth < Duration::from_millis(11_500), "the sixth waited past the first's exit: {sixth:?}");
    assert_eq!(seen[5].header("x-seq"), Some("5"), "waiters in arrival order");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_shaped_budget_is_spent_back_to_back() {
    // 2000 per 20 s: the shape of a rolling daily quota (counters per 1/100 of the window),
    // fast enough for CI.
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    over_limit: reject\n    quotas: [{ name: daily, limit: 2000, per: 20s }]\n",
    ))
    .await;
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let client = direct_client();
            let mut ok = 0;
            for _ in 0..125 {
                match client.get(&url).send().await.unwrap().status().as_u16() {
                    200 => ok += 1,
                    other => panic!("the budget still had room: {other}"),
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for worker in workers {
        ok += worker.await.unwrap();
    }
    let spent_in = started.elapsed();
    assert_eq!(ok, 2000, "the whole budget at once");
    let next = direct_client().get(&url).send().await.unwrap();
    assert_eq!(next.status(), 429, "the 2001st waits for the window");
    let wait = retry_after(&next);
    let window_left = 20.0 - spent_in.as_secs_f64();
    assert!(wait as f64 >= window_left - 0.5, "Retry-After {wait} s: the window has {window_left:.1} s left");
    assert!(wait <= 21, "at most one bucket (1/100 of the window) past the window: {wait}");
    assert_eq!(mock.request_count(), 2000);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_failing_with_bare_503s_is_an_outage_not_a_rate_limit() {
    let mock = MockCrm::start().await;
    mock.set_handler(|_| {
        support::mock_crm::json(http::StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"down": true}))
    });
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    limit_headers: hubspot
    quotas: [{ name: ten-secondly, limit: 100, per: 10s }]
    breaker: { min_requests: 5, failure_ratio: 0.5, window: 30s, consecutive_failures: 50, open_for: 30s }
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut answers = Vec::new();
    for _ in 0..12 {
        let response = client.get(&url).send().await.unwrap();
        let status = response.status().as_u16();
        let proxy_status = header(&response, "proxy-status");
        let retry = header(&response, "retry-after");
        answers.push((status, proxy_status.is_some(), body(response).await["error"].clone(), retry));
    }
    assert!(answers.iter().all(|(status, ..)| *status != 429), "never a rate limit: {answers:?}");
    let vendor_503s = answers.iter().take_while(|(status, sluice_made, ..)| *status == 503 && !sluice_made).count();
    assert_eq!(vendor_503s, 5, "the vendor's own 503 until the breaker's min_requests: {answers:?}");
    for (status, sluice_made, error, retry) in &answers[5..] {
        assert_eq!((*status, *sluice_made), (503, true), "{answers:?}");
        assert_eq!(error, "circuit_open", "{answers:?}");
        assert!(retry.is_some(), "the open breaker says when to come back: {answers:?}");
    }
    assert_eq!(mock.request_count(), 5, "an open breaker spares the vendor");
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_vendor_pauses_total", &[]), 0.0, "a bare 503 pauses nothing");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_with_retry_after_holds_the_scope_and_answers_503() {
    let mock = MockCrm::start().await;
    mock.set_handler(|_| {
        let mut down =
            support::mock_crm::json(http::StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"down": true}));
        down.headers_mut().insert("retry-after", "30".parse().unwrap());
        down
    });
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    over_limit: reject\n    quotas: [{ name: ten-secondly, limit: 100, per: 10s }]\n",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 503, "the vendor's own answer is relayed");
    assert!(header(&first, "proxy-status").is_none());
    let held = client.get(&url).send().await.unwrap();
    assert_eq!(held.status(), 503, "held by the vendor's Retry-After, reported as the outage it is");
    let wait = retry_after(&held);
    assert!((29..=31).contains(&wait), "Retry-After {wait}");
    assert_eq!(body(held).await["error"], "vendor_unavailable");
    assert_eq!(mock.request_count(), 1, "nothing more reached the failing vendor");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_returns_the_local_shares_admissions_are_in_the_shared_window() {
    let mut redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let store = format!("store: {{ kind: redis, url: '{}', timeout: 100ms, heartbeat: 200ms }}\n", redis.url());
    let sluice = TestSluice::start(&config(
        &store,
        &mock,
        "    over_limit: reject\n    quotas: [{ name: window, limit: 10, per: 60s }]\n",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(mode(&sluice).await, "shared");
    redis.kill();
    assert!(eventually(Duration::from_secs(10), || async { mode(&sluice).await == "degraded-local" }).await);
    // One replica: its local share is the whole quota. Spend it while Redis is away.
    let mut ok = 0;
    for _ in 0..12 {
        if client.get(&url).send().await.unwrap().status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "the local share is enforced");
    // Redis comes back empty; the probe folds the ten local admissions in before sharing again.
    redis.revive();
    assert!(eventually(Duration::from_secs(10), || async { mode(&sluice).await == "shared" }).await);
    let after = client.get(&url).send().await.unwrap();
    assert_eq!(after.status(), 429, "the window after recovery is not a second, fresh one");
    assert!(retry_after(&after) >= 50, "the ten admitted locally leave the window a minute after they went");
    assert_eq!(mock.request_count(), 10);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_connection_that_goes_silent_is_replaced() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let mock = MockCrm::start().await;
    let store = format!(
        "store: {{ kind: redis, url: 'redis://127.0.0.1:{}/0', timeout: 100ms, heartbeat: 200ms }}\n",
        relay.port
    );
    let sluice =
        TestSluice::start(&config(&store, &mock, "    quotas: [{ name: window, limit: 1000, per: 10s }]\n")).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(mode(&sluice).await, "shared");
    let before = relay.connections();
    // The socket stays open, nothing answers; Redis itself is fine and new connections work.
    relay.freeze_existing();
    let frozen_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async { mode(&sluice).await != "shared" }).await,
        "the silent connection is noticed"
    );
    // Requests are answered throughout, on the local share.
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || async { mode(&sluice).await == "shared" }).await,
        "back on Redis through a new connection"
    );
    println!("silent connection replaced {:?} after the freeze", frozen_at.elapsed());
    assert!(relay.connections() > before, "a new connection was opened ({} before)", before);
    let metrics = sluice.metrics().await;
    assert!(metric_value(&metrics, "sluice_store_connections_total", &[]) >= 2.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "sluice_store_degraded", &[]), 0.0);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_follows_a_lower_remaining_the_vendor_reports() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    // Someone else spends the same HubSpot app: on the first call the vendor has 2 left of 10.
    mock.set_handler(|_| {
        let mut ok = support::mock_crm::json(http::StatusCode::OK, serde_json::json!({"ok": true}));
        let headers = ok.headers_mut();
        headers.insert("x-hubspot-ratelimit-max", "10".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-remaining", "2".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-interval-milliseconds", "10000".parse().unwrap());
        ok
    });
    let store = format!("store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}\n", redis.url());
    let body = "    over_limit: reject\n    limit_headers: hubspot\n    quotas: [{ name: ten-secondly, limit: 10, per: 10s }]\n";
    let first = TestSluice::start(&config(&store, &mock, body)).await;
    let second = TestSluice::start(&config(&store, &mock, body)).await;
    let client = direct_client();
    let url = |sluice: &TestSluice| format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(url(&first)).send().await.unwrap().status(), 200);
    // sluice believed 9 were left; the vendor said 2, and the other replica follows it.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(client.get(url(&second)).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429], "two left, as the vendor said");
    let metrics = first.metrics().await;
    assert!(metric_value(&metrics, "sluice_vendor_remaining_adopted_total", &[]) >= 1.0, "{metrics}");
    assert_eq!(mock.request_count(), 3);
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_vendor_interval_pauses_for_26_hours_at_most() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    mock.set_handler(|_| {
        let mut refused = support::mock_crm::json(
            http::StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"status": "error", "policyName": "TEN_SECONDLY_ROLLING"}),
        );
        refused.headers_mut().insert("x-hubspot-ratelimit-interval-milliseconds", "9999999999999".parse().unwrap());
        refused
    });
    let store = format!("store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}\n", redis.url());
    let body = "    over_limit: reject\n    limit_headers: hubspot\n    quotas: [{ name: ten-secondly, limit: 10, per: 10s }]\n";
    let sluice = TestSluice::start(&config(&store, &mock, body)).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 429, "the vendor's own refusal");
    let held = client.get(&url).send().await.unwrap();
    assert_eq!(held.status(), 429);
    let wait = retry_after(&held);
    assert!(wait <= 26 * 3600 && wait > 25 * 3600, "capped at 26 h: Retry-After {wait}");
    // The shared record of the pause expires with the cap too (plus its one-second afterglow).
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*!pause*").query_async(&mut conn).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0 && ttl <= 26 * 3_600_000 + 1_000, "pause key TTL {ttl} ms");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_whatever_scope_values_clients_send() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        "",
        &mock,
        "    over_limit: reject
    quotas:
      - { name: minute, limit: 10, per: 60s, key: [header:x-tenant-id], max_keys: 50 }
      - { name: daily, limit: 100000, per: 1d, window: fixed, key: [header:x-tenant-id], max_keys: 50 }
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    for tenant in 0..600 {
        let response = client.get(&url).header("x-tenant-id", format!("tenant-{tenant}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "every fresh tenant has quota");
    }
    let quotas: Value = direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().json().await.unwrap();
    let buckets = quotas["store"]["buckets_in_memory"].as_u64().unwrap();
    // Two quotas, each at most 2 x max_keys buckets however many tenants clients invent.
    assert!(buckets <= 200, "{buckets} buckets for 600 tenants: {quotas}");
    let metrics = sluice.metrics().await;
    assert!(metric_value(&metrics, "sluice_quota_scope_evictions_total", &[("quota", "daily")]) >= 500.0);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_window_bucket_expires_when_its_window_ends() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let store = format!("store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}\n", redis.url());
    let sluice = TestSluice::start(&config(
        &store,
        &mock,
        "    quotas: [{ name: daily, limit: 1000, per: 1d, window: fixed, key: [header:x-tenant-id] }]\n",
    ))
    .await;
    let response =
        direct_client().get(format!("{}/hubspot/x", sluice.proxy_url())).header("x-tenant-id", "acme").send().await;
    assert_eq!(response.unwrap().status(), 200);
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*daily@fixed*").query_async(&mut conn).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    // Without resets_at a daily window ends at the next UTC midnight.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let window_left = 86_400_000 - now_ms % 86_400_000;
    assert!(ttl_ms > 0 && ttl_ms <= window_left + 2_000, "TTL {ttl_ms} ms, window ends in {window_left} ms");
    sluice.shutdown().await;
}
