#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Token leases on a real `redis-server` (issue 3, "lease tokens in small batches"): the script
//! grants extra tokens only out of spare headroom and never across a fixed window's end, and two
//! replicas hammering one quota keep the rolling-window promise while making far fewer
//! round trips than requests.
mod support;

use std::time::Duration;

use sluice::config::{OnFailure, Store, StoreKind};
use sluice::limit::decide::{Decision, Micros, Rule};
use sluice::limit::redis::{LeaseRequest, RedisStore};
use sluice::limit::window;
use support::redis::RedisServer;
use support::{direct_client, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

const SEC: Micros = 1_000_000;

fn store_settings(redis: &RedisServer) -> Store {
    Store {
        kind: StoreKind::Redis,
        url: Some(redis.url()),
        on_failure: OnFailure::Local,
        timeout: Duration::from_secs(2),
        key_prefix: "lease".to_owned(),
        heartbeat: Duration::from_secs(2),
        lease_max: 64,
        lease_ttl: Duration::from_millis(50),
    }
}

async fn evalsha_calls(redis: &RedisServer) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn script_leases_only_out_of_spare_headroom() {
    let server = RedisServer::start();
    let redis = RedisStore::new(store_settings(&server));
    redis.connect().await.expect("connects to redis-server");
    let pause = "lease:{hubspot}:!pause:acme";
    let now: Micros = 1_900_000_000 * SEC;
    let ask = LeaseRequest { extra: 63, lasts: 50_000 };
    // 1000 per 10 s paced with a burst of 200 (T = 10.1 s / 801 ≈ 12.6 ms), and a rolling window
    // of 200 per 10 s: either way at most 200 can go at one instant.
    let shapes = [
        ("smooth", "lease:{hubspot}:burst:acme", Rule::smooth(1000, 10 * SEC, 200, 100_000)),
        ("rolling", "lease:{hubspot}:burst@roll:acme", Rule::rolling(200, 10 * SEC, 100_000)),
    ];
    for (shape, key, rule) in shapes {
        let keys = vec![key.to_owned()];
        let rules = vec![(rule, 1)];
        let mut charged_total = 0;
        let mut grants = Vec::new();
        for _ in 0..40 {
            let (decision, charged) = redis.decide_leasing(&keys, pause, &rules, 0, now, ask).await.unwrap();
            match decision {
                Decision::Allowed { wait: 0, standings } => {
                    charged_total += charged;
                    grants.push(charged);
                    // What is left after the lease is at least the lease again (or the lease was cut).
                    assert!(standings[0].remaining >= 0);
                }
                Decision::Rejected { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        println!("{shape}: grants at one instant: {grants:?}, total {charged_total}");
        assert_eq!(grants[0], 64, "{shape}: a fresh bucket has room for a full lease");
        assert!(
            grants.windows(2).all(|pair| pair[1] <= pair[0]),
            "{shape}: grants shrink as headroom does: {grants:?}"
        );
        assert_eq!(*grants.last().unwrap(), 1, "{shape}: near the limit every decision is exact again: {grants:?}");
        assert!(charged_total <= 200, "{shape}: never more than 200 at one instant: {charged_total}");
        assert!(charged_total >= 195, "{shape}: the lease rule leaves little unused: {charged_total}");
    }

    // A fixed window that ends within the lease's life grants nothing extra.
    let fixed_keys = vec!["lease:{hubspot}:daily@fixed:acme".to_owned()];
    let per = 10 * SEC;
    let bounds = window::bounds(per, None, now);
    let near_end = bounds[1] - 20_000;
    let fixed = vec![(Rule::Fixed { limit: 1000, bounds: window::bounds(per, None, near_end) }, 1)];
    let (decision, charged) = redis.decide_leasing(&fixed_keys, pause, &fixed, 0, near_end, ask).await.unwrap();
    assert!(matches!(decision, Decision::Allowed { wait: 0, .. }));
    assert_eq!(charged, 1, "20 ms before the window ends, a 50 ms lease would cross it");
    let early = bounds[1] - 5 * SEC;
    let fixed = vec![(Rule::Fixed { limit: 1000, bounds: window::bounds(per, None, early) }, 1)];
    let (_, charged) = redis.decide_leasing(&fixed_keys, pause, &fixed, 0, early, ask).await.unwrap();
    assert_eq!(charged, 64, "mid-window, a fixed quota leases like a rolling one");
}

fn yaml(redis: &RedisServer, mock: &MockCrm) -> String {
    format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms, lease_ttl: 400ms }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    over_limit: reject
    quotas: [{{ name: burst, limit: 300, per: 2s, burst: 100 }}]
  - name: roomy
    prefix: /roomy
    target: '{}'
    quotas: [{{ name: burst, limit: 100000000, per: 10s, margin: 1s }}]
",
        redis.url(),
        mock.url(),
        mock.url()
    )
}

/// `sluice_quota_lease_tokens_total{upstream="roomy", outcome}` summed over `replicas`.
async fn lease_tokens(replicas: &[TestSluice], outcome: &str) -> f64 {
    let mut total = 0.0;
    for sluice in replicas {
        let labels = [("upstream", "roomy"), ("outcome", outcome)];
        total += metric_value(&sluice.metrics().await, "sluice_quota_lease_tokens_total", &labels);
    }
    total
}

/// Closed-loop clients, 4 per replica, for `run`: (200s, 429s).
async fn hammer(replicas: &[TestSluice], prefix: &str, run: Duration) -> (usize, usize) {
    let started = Instant::now();
    let mut clients = Vec::new();
    for (index, sluice) in replicas.iter().enumerate() {
        for _ in 0..4 {
            let url = format!("{}{prefix}/crm/v3/objects/contacts?replica={index}", sluice.proxy_url());
            clients.push(tokio::spawn(async move {
                let client = direct_client();
                let (mut ok, mut limited, mut other) = (0usize, 0usize, Vec::new());
                // Closed loop, bounded by time and count.
                for _ in 0..100_000 {
                    if started.elapsed() >= run {
                        break;
                    }
                    match client.get(&url).send().await.map(|response| response.status().as_u16()) {
                        Ok(200) => ok += 1,
                        Ok(429) => limited += 1,
                        Ok(status) => other.push(status.to_string()),
                        Err(error) => other.push(error.to_string()),
                    }
                }
                (ok, limited, other)
            }));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for client in clients {
        let (client_ok, client_limited, other) = client.await.unwrap();
        assert!(other.is_empty(), "only 200 and 429 are expected: {other:?}");
        ok += client_ok;
        limited += client_limited;
    }
    (ok, limited)
}

/// Most arrivals in any half-open window `[t, t + per)`.
fn busiest_window(sorted: &[Instant], per: Duration) -> usize {
    let mut best = 0;
    let mut end = 0;
    for start in 0..sorted.len() {
        while end < sorted.len() && sorted[end] - sorted[start] < per {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_leasing_keep_the_window_with_fewer_round_trips() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let replicas = [TestSluice::start(&yaml(&redis, &mock)).await, TestSluice::start(&yaml(&redis, &mock)).await];

    // Under the limit: busy scopes are served from leases. The 400 ms lifetime (this quota's
    // margin is 1 s) makes leasing start at 80 requests a second per replica.
    let calls_before = evalsha_calls(&redis).await;
    let (roomy_ok, roomy_limited) = hammer(&replicas, "/roomy", Duration::from_secs(2)).await;
    let roomy_calls = evalsha_calls(&redis).await - calls_before;
    println!(
        "leases under the limit: {roomy_ok} requests allowed, {roomy_limited} limited, {roomy_calls} EVALSHA calls"
    );
    assert_eq!(roomy_limited, 0);
    assert!(
        roomy_calls * 4 < roomy_ok as u64,
        "at least 3 in 4 requests were served from leases: {roomy_calls} calls for {roomy_ok} requests"
    );
    let leased = lease_tokens(&replicas, "leased").await;
    assert!(leased > 0.0, "leased tokens are counted in sluice_quota_lease_tokens_total");
    mock.clear();

    // Over the limit: the rolling-window promise holds with leases on.
    let calls_before = evalsha_calls(&redis).await;
    let started = Instant::now();
    let (ok, limited) = hammer(&replicas, "/hubspot", Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    let calls = evalsha_calls(&redis).await - calls_before;

    let mut arrivals: Vec<Instant> = mock.requests().iter().map(|r| r.at).collect();
    arrivals.sort();
    let most = busiest_window(&arrivals, Duration::from_secs(2));
    // The bucket: a burst of 100, then (300 - 100 + 1) per 2.02 s.
    let possible = 100.0 + 201.0 / 2.02 * elapsed.as_secs_f64();
    let mut store_errors = 0.0;
    for sluice in &replicas {
        store_errors += metric_value(&sluice.metrics().await, "sluice_store_errors_total", &[]);
    }
    println!(
        "leases: 200 {ok}, 429 {limited}, arrivals {}, most in any 2 s {most} (limit 300), \
         bucket allows {possible:.0} in {elapsed:?}, EVALSHA calls {calls}, store errors {store_errors}",
        arrivals.len()
    );
    assert_eq!(ok, arrivals.len(), "every 200 is one vendor arrival");
    assert!(limited > 0, "the clients pushed past the quota");
    assert!(most <= 300, "{most} arrivals in one rolling 2 s window; the quota is 300");
    assert!(ok as f64 >= 0.85 * possible, "leases cost little of the quota: {ok} of {possible:.0}");
    // Heartbeats are EVALSHA calls too: 2 replicas, every 500 ms, for about 5 s.
    assert!((calls as usize) <= ok + limited + 40, "never more than a round trip per request: {calls}");
    assert_eq!(store_errors, 0.0);
    for sluice in replicas {
        sluice.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_endpoint_counts_this_replicas_unspent_lease_as_remaining() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    // burst = limit: the bucket refills one token per 11 s, so `remaining` is limit - admitted.
    // A 400 ms lease lifetime (margin 1 s) makes leasing start at 80 requests a second, which
    // a debug build on a busy CI machine reaches with room to spare.
    let yaml = format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms, lease_ttl: 400ms }}
upstreams:
  - name: roomy
    prefix: /roomy
    target: '{}'
    quotas: [{{ name: burst, limit: 100000, per: 10s, burst: 100000, margin: 1s }}]
",
        redis.url(),
        mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let (ok, limited) = hammer(std::slice::from_ref(&sluice), "/roomy", Duration::from_millis(800)).await;
    assert_eq!(limited, 0);
    let replicas = std::slice::from_ref(&sluice);
    let (leased, dropped) = (lease_tokens(replicas, "leased").await, lease_tokens(replicas, "dropped").await);
    let quotas: serde_json::Value =
        direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().json().await.unwrap();
    let scope = &quotas["upstreams"][0]["quotas"][0]["scopes"][0];
    println!("quotas after {ok} requests, {leased} tokens leased, {dropped} dropped so far: {scope}");
    assert!(leased > 0.0, "the load was enough to lease");
    assert!(dropped <= 0.1 * ok as f64, "leases are sized to be spent, not dropped: {dropped} of {leased}");
    // Every token is either admitted, dropped unspent, or still held by this replica (counted
    // back in by /quotas); what expired after the metrics were read is dropped too.
    let remaining = scope["remaining"].as_i64().unwrap();
    let unaccounted = 100_000 - ok as i64 - dropped as i64 - remaining;
    assert!(
        (-1..=64).contains(&unaccounted),
        "remaining {remaining} after {ok} requests and {dropped} dropped: {unaccounted} tokens unaccounted for"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_tokens_stop_flowing_within_a_lifetime_of_a_vendor_pause() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    // Leases live 400 ms (lease_ttl; the margin, 1% of 100 s, would allow 500 ms), so a scope
    // is busy enough to lease from 80 requests/s per replica: reached even when a loaded CI
    // machine runs this debug build slowly (at 50 ms it took 640/s, which such a machine missed).
    let yaml = format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms, lease_ttl: 400ms }}
upstreams:
  - name: roomy
    prefix: /roomy
    target: '{}'
    over_limit: reject
    quotas: [{{ name: burst, limit: 100000000, per: 100s }}]
",
        redis.url(),
        mock.url()
    );
    let replicas = [TestSluice::start(&yaml).await, TestSluice::start(&yaml).await];
    // The 400th request is refused with a 2 s pause; every other one is fine.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    mock.set_handler(move |_| {
        if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 400 {
            http::Response::builder()
                .status(429)
                .header("retry-after", "2")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{\"message\":\"slow down\"}")))
                .unwrap()
        } else {
            support::mock_crm::json(http::StatusCode::OK, serde_json::json!({"ok": true}))
        }
    });
    let (ok, limited) = hammer(&replicas, "/roomy", Duration::from_millis(2500)).await;

    let requests = mock.requests();
    let refused_at = requests.get(399).map(|r| r.at).expect("the vendor saw its 400th request");
    let leased = lease_tokens(&replicas, "leased").await;
    // In flight when the vendor refused (see vendor_feedback's IN_FLIGHT_TOLERANCE: 100 ms),
    // plus one lease lifetime (400 ms) on the replica that learns of the pause from Redis.
    let tolerance = Duration::from_millis(500);
    let inside: Vec<Duration> = requests
        .iter()
        .map(|r| r.at.saturating_duration_since(refused_at))
        .filter(|after| *after > tolerance && *after < Duration::from_millis(1900))
        .collect();
    let last_late = requests
        .iter()
        .map(|r| r.at.saturating_duration_since(refused_at))
        .filter(|after| *after < Duration::from_secs(2))
        .max()
        .unwrap_or_default();
    println!(
        "pause with leases: {ok} x 200, {limited} x 429, {leased} tokens leased, \
         last arrival {last_late:?} after the refusal, {} inside the pause past {tolerance:?}",
        inside.len()
    );
    assert!(leased > 0.0, "the load was enough to lease");
    assert!(limited > 0, "the pause answered callers at once (reject mode)");
    assert!(inside.is_empty(), "arrivals inside the vendor's pause: {inside:?}");
    for sluice in replicas {
        sluice.shutdown().await;
    }
}
