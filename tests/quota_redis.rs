#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Quotas on a real `redis-server` (issue 3): Redis killed mid-run under `on_failure: local`
//! (no client error, each replica enforces `limit / replicas`), reported as degraded in
//! `/readyz`, `/quotas` and metrics; Redis restarted (shared mode resumes); `deny` and `allow`;
//! and the Lua script against the Rust maths with pinned clocks.
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice::config::{OnFailure, Store, StoreKind};
use sluice::limit::decide::{self, Decision, Micros, Rule, State};
use sluice::limit::memory::MemoryStore;
use sluice::limit::redis::RedisStore;
use sluice::limit::rolling;
use sluice::limit::window;
use support::redis::RedisServer;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);

/// One upstream `hubspot` in reject mode with `quotas`.
fn yaml(redis: &RedisServer, mock: &MockCrm, on_failure: &str, quotas: &str) -> String {
    with_routes(redis, mock, on_failure, quotas, "[]")
}

fn with_routes(redis: &RedisServer, mock: &MockCrm, on_failure: &str, quota: &str, routes: &str) -> String {
    format!(
        "store: {{ kind: redis, url: '{}', on_failure: {on_failure}, timeout: 250ms, heartbeat: 200ms }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    over_limit: reject
    quotas: [{quota}]
    routes: {routes}
",
        redis.url(),
        mock.url()
    )
}

const TENANT_QUOTA: &str = "{ name: burst, limit: 10, per: 30s, burst: 10, key: [header:x-tenant-id] }";

async fn json(url: String) -> Value {
    direct_client().get(url).send().await.unwrap().json().await.unwrap()
}

async fn mode(sluice: &TestSluice) -> String {
    json(sluice.admin_url("/readyz")).await["store"]["mode"].as_str().unwrap_or_default().to_owned()
}

async fn gauge(sluice: &TestSluice, name: &str) -> f64 {
    metric_value(&sluice.metrics().await, name, &[])
}

/// Sends `n` requests for `tenant` through `sluice` one after another; returns the statuses.
async fn statuses(sluice: &TestSluice, tenant: &str, n: usize) -> Vec<u16> {
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let response = client.get(&url).header("x-tenant-id", tenant).send().await.expect("sluice answers");
        out.push(response.status().as_u16());
    }
    out
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// Two replicas both see each other through the heartbeat set.
async fn both_see_two(a: &TestSluice, b: &TestSluice) -> bool {
    eventually(WAIT, || async {
        for sluice in [a, b] {
            let quotas = json(sluice.admin_url("/quotas")).await;
            if gauge(sluice, "sluice_replicas").await != 2.0 || quotas["store"]["replicas"] != 2 {
                return false;
            }
        }
        true
    })
    .await
}

/// `10 + 10` requests for a fresh tenant, half through each replica; allowed per replica.
async fn split_burst(a: &TestSluice, b: &TestSluice, tenant: &str) -> (usize, usize) {
    let (from_a, from_b) = tokio::join!(statuses(a, tenant, 10), statuses(b, tenant, 10));
    for status in from_a.iter().chain(&from_b) {
        assert!(*status == 200 || *status == 429, "only 200 or 429: {from_a:?} {from_b:?}");
    }
    (count(&from_a, 200), count(&from_b, 200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_run_local_share_then_shared_again() {
    let mut redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let a = TestSluice::start(&yaml(&redis, &mock, "local", TENANT_QUOTA)).await;
    let b = TestSluice::start(&yaml(&redis, &mock, "local", TENANT_QUOTA)).await;
    assert!(both_see_two(&a, &b).await, "the heartbeat makes each replica count 2");
    for sluice in [&a, &b] {
        assert_eq!(mode(sluice).await, "shared");
        assert_eq!(gauge(sluice, "sluice_store_degraded").await, 0.0);
    }

    // Shared: one bucket for both replicas.
    let (from_a, from_b) = split_burst(&a, &b, "shared-1").await;
    assert_eq!(from_a + from_b, 10, "shared mode: the fleet together gets the limit ({from_a} + {from_b})");

    // Background traffic through both replicas while Redis dies.
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();
    for sluice in [&a, &b] {
        let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
        let stop = stop.clone();
        background.push(tokio::spawn(async move {
            let client = direct_client();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && seen.len() < 2000 {
                let tenant = format!("bg-{}", seen.len() % 7);
                match client.get(&url).header("x-tenant-id", tenant).send().await {
                    Ok(response) => seen.push(response.status().as_u16()),
                    Err(error) => panic!("client error while Redis died: {error}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let degraded = eventually(WAIT, || async {
        for sluice in [&a, &b] {
            if mode(sluice).await != "degraded-local" || gauge(sluice, "sluice_store_degraded").await != 1.0 {
                return false;
            }
        }
        true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = Vec::new();
    for task in background {
        during.extend(task.await.unwrap());
    }
    assert!(degraded, "both replicas report degraded-local after the kill");
    assert!(during.len() >= 20, "background traffic ran: {}", during.len());
    assert!(during.iter().all(|s| *s == 200 || *s == 429), "no client error: {during:?}");
    assert!(count(&during, 200) > 0);

    for sluice in [&a, &b] {
        let quotas = json(sluice.admin_url("/quotas")).await;
        assert_eq!(quotas["store"]["mode"], "degraded-local", "{quotas}");
        assert_eq!(quotas["store"]["replicas"], 2, "the last known replica count is kept: {quotas}");
        let ready = json(sluice.admin_url("/readyz")).await;
        assert_eq!(ready["store"]["kind"], "redis", "{ready}");
        assert_eq!(ready["store"]["replicas"], 2, "{ready}");
        let metrics = sluice.metrics().await;
        assert!(metric_value(&metrics, "sluice_store_errors_total", &[]) >= 1.0, "{metrics}");
        assert_eq!(metric_value(&metrics, "sluice_replicas", &[]), 2.0);
    }

    // Local share: each replica enforces limit / replicas = 5.
    let (from_a, from_b) = split_burst(&a, &b, "local-1").await;
    assert_eq!((from_a, from_b), (5, 5), "degraded-local: each replica takes its share of 10");

    // Redis is back: shared mode resumes.
    redis.restart();
    let shared = eventually(WAIT, || async {
        for sluice in [&a, &b] {
            if mode(sluice).await != "shared" || gauge(sluice, "sluice_store_degraded").await != 0.0 {
                return false;
            }
        }
        true
    })
    .await;
    assert!(shared, "both replicas return to shared mode once Redis answers");
    for sluice in [&a, &b] {
        assert_eq!(statuses(sluice, "warm-up", 1).await, [200]);
        assert_eq!(json(sluice.admin_url("/quotas")).await["store"]["mode"], "shared");
    }
    let (from_a, from_b) = split_burst(&a, &b, "shared-2").await;
    assert_eq!(from_a + from_b, 10, "shared again: one bucket for the fleet ({from_a} + {from_b})");
    for sluice in [&a, &b] {
        assert_eq!(mode(sluice).await, "shared");
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_deny_answers_503_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let sluice =
        TestSluice::start(&yaml(&redis, &mock, "deny", "{ name: burst, limit: 100, per: 10s, burst: 100 }")).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    redis.kill();
    for _ in 0..5 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 503, "deny: no quota store, no traffic");
        let proxy_status = response.headers()["proxy-status"].to_str().unwrap().to_owned();
        assert!(proxy_status.starts_with("sluice") && proxy_status.contains("error="), "{proxy_status}");
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "store_unavailable", "{body}");
        assert_eq!(body["upstream"], "hubspot");
    }
    assert_eq!(mock.request_count(), 1, "nothing reached the vendor while Redis was down");
    assert_eq!(mode(&sluice).await, "degraded-deny");
    assert_eq!(gauge(&sluice, "sluice_store_degraded").await, 1.0);

    redis.restart();
    let back = eventually(WAIT, || async { client.get(&url).send().await.unwrap().status() == 200 }).await;
    assert!(back, "traffic flows again once Redis answers");
    assert_eq!(mode(&sluice).await, "shared");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_degraded_while_redis_is_down_and_shares_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.kill();
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&yaml(&redis, &mock, "local", TENANT_QUOTA)).await;
    assert_eq!(mode(&sluice).await, "degraded-local", "no Redis at start: local quotas");
    assert_eq!(gauge(&sluice, "sluice_store_degraded").await, 1.0);
    let local = statuses(&sluice, "early", 12).await;
    assert_eq!(local.iter().filter(|s| **s == 200).count(), 10, "local share with one known replica: {local:?}");
    assert!(local.iter().all(|s| *s == 200 || *s == 429));

    redis.restart();
    let shared = eventually(WAIT, || async {
        mode(&sluice).await == "shared" && gauge(&sluice, "sluice_store_degraded").await == 0.0
    })
    .await;
    assert!(shared, "the background probe connects once Redis is up");
    let after = statuses(&sluice, "later", 12).await;
    assert_eq!(after.iter().filter(|s| **s == 200).count(), 10, "{after:?}");
    let keys = redis_keys(&redis);
    assert!(keys.iter().any(|k| k.contains("later")), "decisions are in Redis now: {keys:?}");
    sluice.shutdown().await;
}

/// Every key in `redis` (a handful in these tests), through a plain client.
fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(5)).unwrap();
    ::redis::cmd("KEYS").arg("*").query(&mut connection).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_allow_lets_traffic_through() {
    let mut redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let sluice =
        TestSluice::start(&yaml(&redis, &mock, "allow", "{ name: burst, limit: 2, per: 10s, burst: 2 }")).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut shared = Vec::new();
    for _ in 0..3 {
        shared.push(client.get(&url).send().await.unwrap().status().as_u16());
    }
    assert_eq!(shared, [200, 200, 429], "shared mode limits");

    redis.kill();
    for _ in 0..6 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "allow: unlimited while Redis is down");
    }
    assert_eq!(mock.request_count(), 8);
    assert_eq!(mode(&sluice).await, "degraded-allow");
    assert_eq!(gauge(&sluice, "sluice_store_degraded").await, 1.0);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_endpoint_reports_fixed_windows_from_redis() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&yaml(
        &redis,
        &mock,
        "local",
        "{ name: burst, limit: 50, per: 10s, burst: 50 }, { name: daily, limit: 5, per: 1d, window: fixed }",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    for _ in 0..3 {
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    }
    let quotas = json(sluice.admin_url("/quotas")).await;
    assert_eq!(quotas["store"]["mode"], "shared");
    let burst = &quotas["upstreams"][0]["quotas"][0]["scopes"][0];
    assert_eq!(burst["remaining"], 47, "rolling buckets are read from Redis: {quotas}");
    let daily = &quotas["upstreams"][0]["quotas"][1]["scopes"][0];
    assert_eq!(daily["remaining"], 2, "the daily window has 3 of 5 used: {quotas}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn degraded_local_still_serves_routes_whose_cost_fits_the_quota() {
    let mut redis = RedisServer::start();
    let mock = MockCrm::start().await;
    // cost 4 fits burst 6; the local share of 2 replicas is burst 3.
    let quota = "{ name: burst, limit: 12, per: 10s, burst: 6 }";
    let routes = "[{ match: 'POST /crm/v3/objects/*/batch/create', cost: 4 }]";
    let a = TestSluice::start(&with_routes(&redis, &mock, "local", quota, routes)).await;
    let b = TestSluice::start(&with_routes(&redis, &mock, "local", quota, routes)).await;
    assert!(both_see_two(&a, &b).await);
    redis.kill();
    assert!(eventually(WAIT, || async { mode(&a).await == "degraded-local" }).await);
    let client = direct_client();
    let response = client
        .post(format!("{}/hubspot/crm/v3/objects/contacts/batch/create", a.proxy_url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(status, 200, "a full local bucket should take a cost-4 batch (Retry-After was {retry_after:?})");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_count_follows_heartbeats_and_leaving() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let a = TestSluice::start(&yaml(&redis, &mock, "local", TENANT_QUOTA)).await;
    let b = TestSluice::start(&yaml(&redis, &mock, "local", TENANT_QUOTA)).await;
    assert!(both_see_two(&a, &b).await);
    b.shutdown().await;
    let alone = eventually(WAIT, || async {
        gauge(&a, "sluice_replicas").await == 1.0 && json(a.admin_url("/readyz")).await["store"]["replicas"] == 1
    })
    .await;
    assert!(alone, "a replica that shut down leaves the live set");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switching_a_quota_between_fixed_and_rolling_keeps_redis_usable() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let fixed = "{ name: daily, limit: 100, per: 1d, window: fixed }";
    let rolling = "{ name: daily, limit: 100, per: 1d }";
    let sluice = TestSluice::start(&yaml(&redis, &mock, "deny", fixed)).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    for next in [rolling, fixed] {
        sluice.write_config(&yaml(&redis, &mock, "deny", next));
        let reload = client.post(sluice.admin_url("/reload")).send().await.unwrap();
        assert_eq!(reload.status(), 200);
        for _ in 0..3 {
            let response = client.get(&url).send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert_eq!(status, 200, "after switching the window kind to {next}: {body}");
        }
        assert_eq!(mode(&sluice).await, "shared");
        assert_eq!(metric_value(&sluice.metrics().await, "sluice_store_errors_total", &[]), 0.0);
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_named_pause_is_an_ordinary_quota_on_redis() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let quota = "{ name: pause, limit: 5, per: 10s, burst: 5 }";
    let memory = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: '{}', over_limit: reject, quotas: [{quota}] }}\n",
        mock.url()
    ))
    .await;
    let shared = TestSluice::start(&yaml(&redis, &mock, "local", quota)).await;
    let in_memory = statuses(&memory, "t", 6).await;
    let on_redis = statuses(&shared, "t", 6).await;
    assert_eq!(in_memory, [200, 200, 200, 200, 200, 429], "memory store");
    assert_eq!(on_redis, in_memory, "Redis decides like memory for a quota named `pause`");
    memory.shutdown().await;
    shared.shutdown().await;
}

// === Lua vs Rust ===

const SEC: Micros = 1_000_000;

fn store_settings(redis: &RedisServer) -> Store {
    Store {
        kind: StoreKind::Redis,
        url: Some(redis.url()),
        on_failure: OnFailure::Local,
        timeout: Duration::from_secs(2),
        key_prefix: "parity".to_owned(),
        heartbeat: Duration::from_secs(2),
        lease_max: 64,
        lease_ttl: Duration::from_millis(50),
    }
}

/// A small deterministic generator (no extra crates; the sequence is the same on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[derive(Clone, Copy)]
enum Kind {
    /// The vendor's rolling window, as an exact log.
    Rolling {
        limit: u64,
        per: Micros,
        margin: Micros,
    },
    /// The same, recorded as counters per 1/100 of the window (as a large limit would be).
    Counted {
        limit: u64,
        per: Micros,
        margin: Micros,
    },
    Smooth {
        limit: u64,
        per: Micros,
        burst: u64,
        margin: Micros,
    },
    Fixed {
        limit: u64,
        per: Micros,
    },
}

fn rules_at(kinds: &[Kind], cost: i64, now: Micros) -> Vec<(Rule, i64)> {
    kinds
        .iter()
        .map(|kind| {
            let rule = match *kind {
                Kind::Rolling { limit, per, margin } => Rule::rolling(limit, per, margin),
                Kind::Counted { limit, per, margin } => {
                    let exact = rolling::Window::new(limit, per, margin);
                    Rule::Rolling(rolling::Window { width: (exact.span + 99) / 100, ..exact })
                }
                Kind::Smooth { limit, per, burst, margin } => Rule::smooth(limit, per, burst, margin),
                Kind::Fixed { limit, per } => {
                    Rule::Fixed { limit: i64::try_from(limit).unwrap(), bounds: window::bounds(per, None, now) }
                }
            };
            (rule, cost)
        })
        .collect()
}

/// Plays `steps` pinned decisions against Redis (the Lua script), the memory store and
/// `decide::decide` on plain states; returns the decisions once all three agreed on every step.
async fn play_parity(
    redis: &RedisStore,
    name: &str,
    kinds: &[Kind],
    steps: usize,
    seed: u64,
    costs: &[i64],
    never: bool,
) -> Vec<Decision> {
    let memory = MemoryStore::default();
    let keys: Vec<String> = (0..kinds.len()).map(|i| format!("parity:{{{name}}}:q{i}")).collect();
    // No vendor pause is ever set on this key: decisions are the quotas' alone.
    let pause_key = format!("parity:{{{name}}}:pause");
    let mut states = vec![State::Empty; kinds.len()];
    let mut random = Lcg(seed);
    // A pinned clock well away from the real one, so Redis TIME could never be mistaken for it.
    let mut now: Micros = 1_900_000_000 * SEC + i64::try_from(seed % 1000).unwrap() * 7_919;
    let mut out = Vec::with_capacity(steps);
    for step in 0..steps {
        now += i64::try_from(random.next(450_000)).unwrap();
        let cost = costs[usize::try_from(random.next(costs.len() as u64)).unwrap()];
        let max_wait = [0, 0, 150_000, SEC, 3 * SEC][usize::try_from(random.next(5)).unwrap()];
        let rules = rules_at(kinds, cost, now);
        let from_redis =
            normalized(redis.decide(&keys, &pause_key, &rules, max_wait, now).await.expect("script runs"), never);
        let from_memory = normalized(memory.decide(&keys, &pause_key, &rules, now, max_wait), never);
        let from_rust = normalized(decide::decide(&rules, &mut states, now, max_wait), never);
        assert_eq!(
            from_redis, from_memory,
            "{name} step {step}: now {now}, cost {cost}, max_wait {max_wait}: Lua and Rust disagree"
        );
        assert_eq!(from_memory, from_rust, "{name} step {step}: memory store and decide::decide disagree");
        out.push(from_redis);
    }
    out
}

/// "Never" (no window or burst can ever take the cost) is 2^50 us in Lua and i64::MAX / 4 in
/// Rust; with `never` set both become i64::MAX so the rest of the decision is still compared
/// (the disagreement itself is `lua_script_and_rust_maths_agree_on_never_conforming_costs`).
fn normalized(decision: Decision, never: bool) -> Decision {
    match decision {
        Decision::Rejected { retry_after, limiting, standings } if never && retry_after >= 1 << 50 => {
            Decision::Rejected { retry_after: Micros::MAX, limiting, standings }
        }
        other => other,
    }
}

fn tally(decisions: &[Decision]) -> (usize, usize, usize) {
    let now = decisions.iter().filter(|d| matches!(d, Decision::Allowed { wait: 0, .. })).count();
    let later = decisions.iter().filter(|d| matches!(d, Decision::Allowed { wait, .. } if *wait > 0)).count();
    let rejected = decisions.iter().filter(|d| matches!(d, Decision::Rejected { .. })).count();
    (now, later, rejected)
}

#[tokio::test]
async fn lua_script_and_rust_maths_decide_identically_with_pinned_clocks() {
    let server = RedisServer::start();
    let redis = RedisStore::new(store_settings(&server));
    redis.connect().await.expect("connects to redis-server");

    let rolling = Kind::Rolling { limit: 6, per: 2 * SEC, margin: 20_000 };
    let counted = Kind::Counted { limit: 8, per: 2 * SEC, margin: 20_000 };
    let smooth = Kind::Smooth { limit: 6, per: 2 * SEC, burst: 3, margin: 20_000 };
    let tight = Kind::Smooth { limit: 3, per: SEC, burst: 1, margin: 0 };
    let fixed = Kind::Fixed { limit: 7, per: 3 * SEC };
    let small_fixed = Kind::Fixed { limit: 4, per: SEC };
    let short = Kind::Rolling { limit: 3, per: SEC, margin: 0 };
    let cases: [(&str, Vec<Kind>); 9] = [
        ("rolling", vec![rolling]),
        ("counted", vec![counted]),
        ("smooth", vec![smooth]),
        ("fixed", vec![fixed]),
        ("rolling-fixed", vec![rolling, fixed]),
        ("short-rolling-counted", vec![short, rolling, counted]),
        ("fixed-smooth-rolling", vec![small_fixed, smooth, rolling]),
        ("tight-fixed", vec![tight, small_fixed]),
        ("smooth-counted-fixed", vec![smooth, counted, fixed]),
    ];
    for (index, (name, kinds)) in cases.iter().enumerate() {
        let costs: &[i64] = if name.starts_with("tight") { &[1] } else { &[1, 1, 2, 3] };
        let decisions = play_parity(&redis, name, kinds, 300, 17 + index as u64, costs, true).await;
        let (now, later, rejected) = tally(&decisions);
        println!("{name}: allowed at once {now}, after a wait {later}, rejected {rejected}");
        assert!(now > 0 && later > 0 && rejected > 0, "{name}: every kind of decision was exercised");
    }
}

#[tokio::test]
async fn lua_script_and_rust_maths_agree_on_never_conforming_costs() {
    let server = RedisServer::start();
    let redis = RedisStore::new(store_settings(&server));
    redis.connect().await.expect("connects to redis-server");
    // cost 3 against burst 2 (smooth), limit 2 (rolling) and limit 2 (fixed): never.
    let smooth = Kind::Smooth { limit: 6, per: 2 * SEC, burst: 2, margin: 0 };
    let rolling = Kind::Rolling { limit: 2, per: 2 * SEC, margin: 0 };
    let fixed = Kind::Fixed { limit: 2, per: SEC };
    play_parity(&redis, "never-smooth", &[smooth], 40, 5, &[1, 3], false).await;
    play_parity(&redis, "never-rolling", &[rolling], 40, 7, &[1, 3], false).await;
    play_parity(&redis, "never-fixed", &[fixed], 40, 6, &[1, 3], false).await;
}
