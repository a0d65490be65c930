#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Who spent the quota (issue 17): spend by consumer across replicas through a real Redis, a
//! bounded label set whatever callers send, bulk calls shared out by item, and the exhaustion
//! forecast of a daily-shaped quota. Real sockets throughout: sluice in-process, a mock vendor
//! that counts what it was sent per consumer, `redis-server` on a free port.
mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::time::Instant;

use support::bulk::BulkCrm;
use support::redis::RedisServer;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};

/// The consumer header sluice reads (and strips before the vendor).
const CONSUMER: &str = "sluice-consumer";
/// What the test tells the mock the consumer is, since sluice strips its own header: the mock
/// counts by this one.
const TRUTH: &str = "x-test-consumer";

async fn json_of(url: String) -> Value {
    direct_client().get(url).send().await.unwrap().json().await.unwrap()
}

/// Tokens the mock was sent per consumer: one per call, five per search.
fn counted(mock: &MockCrm) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for request in mock.requests() {
        assert!(request.header(CONSUMER).is_none(), "Sluice-Consumer never reaches the vendor");
        let consumer = request.header(TRUTH).unwrap_or("none").to_owned();
        let cost = if request.path.ends_with("/search") { 5.0 } else { 1.0 };
        *out.entry(consumer).or_default() += cost;
    }
    out
}

/// `consumer`'s spend in one period of a quota of `/usage`.
fn spent(usage: &Value, quota: &str, period: &str, consumer: &str) -> f64 {
    let quotas = usage["upstreams"][0]["quotas"].as_array().unwrap();
    let quota = quotas.iter().find(|q| q["name"] == quota).unwrap();
    quota[period]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == consumer)
        .map_or(0.0, |c| c["spent"].as_f64().unwrap())
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

/// Three replicas share one Redis; three consumers send at different rates (and some calls cost
/// five tokens), plus callers naming consumers sluice does not know and callers naming none.
/// Every replica's `/usage` gives each consumer's spend, within 2% of what the vendor counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_by_consumer_is_merged_across_replicas() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let yaml = format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}
consumers: [billing, sync, backfill]
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    quotas:
      - {{ name: daily, limit: 10000, per: 1d, window: fixed }}
      - {{ name: burst, limit: 100000, per: 10s }}
    routes: [{{ match: 'POST /crm/v3/objects/*/search', cost: 5 }}]
",
        redis.url(),
        mock.url()
    );
    let replicas = [TestSluice::start(&yaml).await, TestSluice::start(&yaml).await, TestSluice::start(&yaml).await];
    let started = Instant::now();

    // (consumer header, what the mock is told, calls, pause between calls, every nth a search)
    let plan: [(Option<String>, &str, usize, u64, usize); 5] = [
        (Some("billing".into()), "billing", 90, 5, 3),
        (Some("sync".into()), "sync", 45, 12, 0),
        (Some("backfill".into()), "backfill", 20, 25, 2),
        (None, "none", 6, 30, 0),
        (Some("stranger".into()), "other", 12, 20, 0),
    ];
    let mut tasks = Vec::new();
    for (lane, (header, truth, calls, pause, search_every)) in plan.into_iter().enumerate() {
        let urls: Vec<String> =
            replicas.iter().map(|r| format!("{}/hubspot/crm/v3/objects/contacts", r.proxy_url())).collect();
        tasks.push(tokio::spawn(async move {
            let client = direct_client();
            for at in 0..calls {
                let url = &urls[(at + lane) % urls.len()];
                let search = search_every > 0 && at % search_every == 0;
                let mut request =
                    if search { client.post(format!("{url}/search")).body("{}") } else { client.get(url) };
                request = request.header(TRUTH, truth);
                if let Some(header) = &header {
                    // Strangers each claim a name of their own: all of them are `other`.
                    let value = if truth == "other" { format!("{header}-{at}") } else { header.clone() };
                    request = request.header(CONSUMER, value);
                }
                assert_eq!(request.send().await.unwrap().status(), 200);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let sent = started.elapsed();
    let truth = counted(&mock);
    assert_eq!(truth["billing"], 60.0 + 30.0 * 5.0, "{truth:?}");

    for (at, replica) in replicas.iter().enumerate() {
        // The last second's spend of every replica is in Redis within a tick or two.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut usage, mut all_in) = (Value::Null, false);
        while !all_in && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            usage = json_of(replica.admin_url("/usage")).await;
            all_in =
                truth.iter().all(|(consumer, want)| within(spent(&usage, "daily", "today", consumer), *want, 0.02));
        }
        assert!(all_in, "replica {at}: {usage:#}\nvendor counted {truth:?}");
        assert_eq!(usage["scope"], "cluster", "{usage}");
        assert_eq!(usage["replicas"], 3, "{usage}");
        for (consumer, want) in &truth {
            for (quota, period) in
                [("daily", "window"), ("daily", "last_hour"), ("burst", "last_hour"), ("burst", "today")]
            {
                let got = spent(&usage, quota, period, consumer);
                assert!(within(got, *want, 0.02), "replica {at} {quota}.{period} {consumer}: {got} vs {want}");
            }
        }
        // Shares: of what was spent, and of the daily limit.
        let daily = &usage["upstreams"][0]["quotas"][0];
        let total: f64 = truth.values().sum();
        assert!(within(daily["window"]["spent"].as_f64().unwrap(), total, 0.02), "{daily}");
        let billing =
            daily["window"]["consumers"].as_array().unwrap().iter().find(|c| c["consumer"] == "billing").unwrap();
        assert!(within(billing["share"].as_f64().unwrap(), truth["billing"] / total, 0.02), "{billing}");
        assert!(within(billing["of_limit"].as_f64().unwrap(), truth["billing"] / 10_000.0, 0.02), "{billing}");
        assert_eq!(daily["window"]["consumers"][0]["consumer"], "billing", "most first: {daily}");
    }

    // The counter counts tokens: summed over the replicas it is what the vendor saw, per consumer.
    let mut metrics = Vec::new();
    for replica in &replicas {
        metrics.push(replica.metrics().await);
    }
    for (consumer, want) in &truth {
        let labels = [("quota", "daily"), ("consumer", consumer.as_str())];
        let got: f64 = metrics.iter().map(|text| metric_value(text, "sluice_quota_spent_total", &labels)).sum();
        assert_eq!(got, *want, "sluice_quota_spent_total{{consumer={consumer}}}");
    }
    println!("spend by consumer: {truth:?}, sent in {sent:?}");
    for replica in replicas {
        replica.shutdown().await;
    }
}

/// 10,000 distinct `Sluice-Consumer` values: the label set stays the known names plus `other`
/// and `none`. An authenticated client is its own consumer whatever header it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_label_set_stays_bounded() {
    let mock = MockCrm::start().await;
    // Without `consumers:`, the clients are the known set.
    let digest = |secret: &str| -> String {
        ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let sluice = TestSluice::start(&format!(
        "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    quotas: [{{ name: daily, limit: 10000000, per: 1d, window: fixed }}]
clients:
  - {{ name: billing, secret_sha256: '{}', upstreams: ['*'] }}
  - {{ name: sync, secret_sha256: '{}', upstreams: ['*'] }}
listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0, allow_remote_clients: true }}
",
        mock.url(),
        digest("billing-secret"),
        digest("sync-secret"),
    ))
    .await;
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let basic = |user: &str, secret: &str| {
        use std::io::Write;
        let mut raw = Vec::new();
        write!(raw, "{user}:{secret}").unwrap();
        format!("Basic {}", base64(&raw))
    };
    let billing = basic("billing", "billing-secret");
    let sync = basic("sync", "sync-secret");

    const DISTINCT: usize = 10_000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let (url, billing, sync) = (url.clone(), billing.clone(), sync.clone());
        tasks.push(tokio::spawn(async move {
            let client = direct_client();
            let mut at = worker;
            while at < DISTINCT {
                // Every tenth call comes from `sync`, claiming to be someone else; the rest from
                // `billing`, each claiming a name nobody configured.
                let auth = if at % 10 == 0 { &sync } else { &billing };
                let response = client
                    .get(&url)
                    .header("proxy-authorization", auth)
                    .header(CONSUMER, format!("made-up-{at}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                at += 32;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let metrics = sluice.metrics().await;
    let labels: HashSet<String> = metrics
        .lines()
        .filter(|line| line.starts_with("sluice_quota_spent_total{"))
        .map(|line| line.split("consumer=\"").nth(1).unwrap().split('"').next().unwrap().to_owned())
        .collect();
    assert_eq!(labels, HashSet::from(["billing".to_owned(), "sync".to_owned()]), "{metrics}");
    assert_eq!(metric_value(&metrics, "sluice_quota_spent_total", &[("consumer", "sync")]), (DISTINCT / 10) as f64);
    assert_eq!(
        metric_value(&metrics, "sluice_quota_spent_total", &[("consumer", "billing")]),
        (DISTINCT * 9 / 10) as f64
    );

    let usage = json_of(sluice.admin_url("/usage")).await;
    assert_eq!(usage["scope"], "replica", "the memory store answers for this replica: {usage}");
    let consumers = usage["upstreams"][0]["quotas"][0]["today"]["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 2, "{usage}");
    println!("{DISTINCT} distinct consumer values in {elapsed:?}: {} spend series", labels.len());
    sluice.shutdown().await;
}

/// Unknown names are `other` and no name is `none`; in sidecar mode with a list, the header is
/// taken as it is; the proxy user counts when nothing else says.
#[tokio::test]
async fn unknown_values_land_in_other() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "consumers: [billing, nightly-backfill]
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    quotas: [{{ name: daily, limit: 1000, per: 1d, window: fixed }}]
",
        mock.url()
    ))
    .await;
    let url = format!("{}/hubspot/x", sluice.proxy_url());
    let client = direct_client();
    for (header, proxy_user) in [
        (Some("billing"), None),
        (Some("nightly-backfill"), Some("billing")),
        (Some("Billing"), None),
        (Some("someone-else"), None),
        (Some(""), Some("billing")),
        (None, Some("nightly-backfill")),
        (None, Some("intruder")),
        (None, None),
    ] {
        let mut request = client.get(&url);
        if let Some(header) = header {
            request = request.header(CONSUMER, header);
        }
        if let Some(user) = proxy_user {
            request =
                request.header("proxy-authorization", format!("Basic {}", base64(format!("{user}:x").as_bytes())));
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    let metrics = sluice.metrics().await;
    let spent = |consumer: &str| metric_value(&metrics, "sluice_quota_spent_total", &[("consumer", consumer)]);
    assert_eq!(spent("billing"), 2.0, "the header, then an empty header's proxy user: {metrics}");
    assert_eq!(spent("nightly-backfill"), 2.0, "the header wins over the proxy user, which counts alone");
    assert_eq!(spent("other"), 3.0, "names are exact; strangers and unknown users are other");
    assert_eq!(spent("none"), 1.0);
    // A value that is not text is refused, naming the header.
    let response = client
        .get(&url)
        .header(CONSUMER, reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("Sluice-Consumer"), "{body}");
    sluice.shutdown().await;
}

/// Calls of different consumers folded into one bulk call: its cost is shared out by item, each
/// item to its own caller's consumer.
#[tokio::test]
async fn a_bulk_call_is_shared_out_by_item() {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let sluice = TestSluice::start(&format!(
        "consumers: [billing, sync]
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    quotas: [{{ name: daily, limit: 1000, per: 1d, window: fixed }}]
    routes: [{{ match: 'POST /crm/v3/objects/*/batch/create', cost: 10 }}]
    batch:
      - {{ match: 'POST /crm/v3/objects/{{object}}', bulk: 'POST /crm/v3/objects/{{object}}/batch/create', format: hubspot, max_items: 4, max_delay: 2s }}
",
        mock.url()
    ))
    .await;
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut calls = Vec::new();
    for (at, consumer) in ["billing", "billing", "billing", "sync"].into_iter().enumerate() {
        let url = url.clone();
        calls.push(tokio::spawn(async move {
            let body = json!({"properties": {"email": format!("c{at}@example.com")}, "associations": []});
            direct_client().post(&url).header(CONSUMER, consumer).json(&body).send().await.unwrap().status().as_u16()
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 201);
    }
    assert_eq!(bulk.bulk_count(), 1, "one bulk call for the four");
    let metrics = sluice.metrics().await;
    let spent = |consumer: &str| metric_value(&metrics, "sluice_quota_spent_total", &[("consumer", consumer)]);
    assert_eq!(spent("billing"), 7.5, "three items of ten tokens' four: {metrics}");
    assert_eq!(spent("sync"), 2.5);
    assert_eq!(spent("none"), 0.0, "the bulk call is not anyone's but its items' callers'");
    let usage = eventually(Duration::from_secs(3), || {
        let url = sluice.admin_url("/usage");
        async move { (spent_in(&json_of(url).await, "billing") - 7.5).abs() < 1e-9 }
    })
    .await;
    assert!(usage, "{}", json_of(sluice.admin_url("/usage")).await);
    sluice.shutdown().await;
}

fn spent_in(usage: &Value, consumer: &str) -> f64 {
    spent(usage, "daily", "window", consumer)
}

/// A daily-shaped quota (a fixed window whose reset is hours away, a short forecast window)
/// spent at a steady rate: `/quotas` says when it will run out, within 5% of when it does, and
/// the gauge says how long that is; a quota that is not at risk says `+Inf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_spend_forecasts_when_the_quota_runs_out() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    // The daily reset twelve hours from now, so it cannot come during the test.
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let reset = (now_s + 12 * 3600) % 86_400;
    let resets_at = format!("{:02}:{:02} UTC", reset / 3600, (reset % 3600) / 60);
    const LIMIT: u64 = 500;
    const RATE: u64 = 50;
    let yaml = format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    over_limit: reject
    quotas:
      - {{ name: daily, limit: {LIMIT}, per: 1d, window: fixed, resets_at: '{resets_at}', forecast_window: 3s }}
      - {{ name: roomy, limit: 100000000, per: 1d, window: fixed, resets_at: '{resets_at}', forecast_window: 3s }}
",
        redis.url(),
        mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    // Steady calls, each sent on its own tick whatever the others' latency.
    let started = Instant::now();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, u16)>();
    let sender = tokio::spawn({
        let url = url.clone();
        async move {
            let client = direct_client();
            let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            // Bounded: the quota runs out after LIMIT calls; twice that is plenty.
            for _ in 0..2 * LIMIT {
                ticks.tick().await;
                let (client, url, sent_tx) = (client.clone(), url.clone(), sent_tx.clone());
                tokio::spawn(async move {
                    let at = Instant::now();
                    let status = client.get(&url).send().await.map_or(0, |r| r.status().as_u16());
                    let _ = sent_tx.send((at, status));
                });
            }
        }
    });

    // Once the forecast window is spanned, ask when the quota runs out.
    let deadline = Instant::now() + Duration::from_secs(8);
    let (mut quotas, mut forecast) = (Value::Null, false);
    while !forecast && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        quotas = json_of(sluice.admin_url("/quotas")).await;
        forecast = quotas["upstreams"][0]["quotas"][0]["exhausts_at"].is_string()
            && started.elapsed() > Duration::from_secs(4);
    }
    assert!(forecast, "{quotas:#}");
    let asked = Instant::now();
    let asked_wall = SystemTime::now();
    let daily = &quotas["upstreams"][0]["quotas"][0];
    let predicted: jiff::Timestamp = daily["exhausts_at"].as_str().unwrap().parse().unwrap();
    let rate = daily["spend_per_second"].as_f64().unwrap();
    assert!(within(rate, RATE as f64, 0.05), "spend rate {rate} for {RATE}/s: {daily}");
    let roomy = &quotas["upstreams"][0]["quotas"][1];
    assert!(roomy["exhausts_at"].is_null(), "a quota not at risk has no exhaustion time: {roomy}");
    let metrics = sluice.metrics().await;
    let left = metric_value(&metrics, "sluice_quota_exhaustion_seconds", &[("quota", "daily")]);
    assert!(left > 0.0 && left < 20.0, "seconds to exhaustion: {left}");
    assert!(
        metrics.contains("sluice_quota_exhaustion_seconds{quota=\"roomy\",upstream=\"hubspot\"} +Inf"),
        "{metrics}"
    );
    assert_eq!(metric_value(&metrics, "sluice_quota_window_seconds", &[("quota", "daily")]), 86_400.0);

    // When it really ran out: the first call refused.
    let mut first_refused = None;
    let mut answered = 0;
    while first_refused.is_none() {
        let Ok(Some((at, status))) = tokio::time::timeout(Duration::from_secs(20), sent_rx.recv()).await else {
            panic!("no refusal after {answered} calls");
        };
        answered += 1;
        match status {
            200 => {}
            429 => first_refused = Some(at),
            other => panic!("unexpected {other}"),
        }
    }
    sender.abort();
    let refused = first_refused.unwrap();
    // Both ends on the wall clock: the prediction is RFC 3339, the truth a local instant.
    let truth = asked_wall + refused.saturating_duration_since(asked);
    let truth_us = i64::try_from(truth.duration_since(UNIX_EPOCH).unwrap().as_micros()).unwrap();
    let error_s = (predicted.as_microsecond() - truth_us).abs() as f64 / 1e6;
    let horizon_s = refused.saturating_duration_since(asked).as_secs_f64();
    println!(
        "forecast: {rate:.2}/s, predicted {predicted}, ran out {horizon_s:.2}s after asking; error {error_s:.3}s ({:.1}%)",
        100.0 * error_s / horizon_s
    );
    assert!(horizon_s > 1.0, "asked while there was something to forecast: {horizon_s}");
    assert!(error_s <= 0.05 * horizon_s, "error {error_s:.3}s over {horizon_s:.2}s");
    assert!(mock.request_count() <= LIMIT as usize, "the vendor never sees more than the quota");
    sluice.shutdown().await;
}

/// Standard base64 (the tests' own, to build `Proxy-Authorization`).
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (at, byte)| n | u32::from(*byte) << (16 - 8 * at));
        for at in 0..4 {
            if at <= chunk.len() {
                out.push(char::from(TABLE[(n >> (18 - 6 * at) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
