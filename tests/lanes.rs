#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Priority lanes across replicas (issue 17): a `low` backfill saturating a quota through two
//! replicas leaves room for `high` traffic through a third, takes at most its `max_share` of any
//! window, and the vendor never sees more than the quota; two `normal` consumers, one sending ten
//! times the other, both make progress. Real sockets and a real `redis-server` throughout; the
//! mock vendor records what it was sent, and when.
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use support::redis::RedisServer;
use support::{direct_client, MockCrm, Recorded, TestSluice};

/// What the test tells the mock a call's lane and consumer are (sluice strips its own headers).
const LANE: &str = "x-test-lane";
const WHO: &str = "x-test-consumer";

const LIMIT: usize = 100;
const PER: Duration = Duration::from_secs(2);

fn yaml(redis: &RedisServer, mock: &MockCrm, lanes: &str) -> String {
    format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}
consumers: [backfill, web, heavy, light]
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    max_queue_wait: 10s
    quotas: [{{ name: burst, limit: {LIMIT}, per: 2s, margin: 100ms }}]
{lanes}",
        redis.url(),
        mock.url()
    )
}

/// The most calls the mock saw in any window of `PER`, among those `keep` picks.
fn busiest_window(calls: &[Recorded], keep: impl Fn(&Recorded) -> bool) -> usize {
    let mut times: Vec<Instant> = calls.iter().filter(|call| keep(call)).map(|call| call.at).collect();
    times.sort();
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= PER {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

/// `sluice-queue;dur=12.5` in milliseconds.
fn queued_ms(response: &reqwest::Response) -> f64 {
    let timing = response.headers().get("server-timing").and_then(|v| v.to_str().ok()).unwrap_or("");
    timing.split("dur=").nth(1).and_then(|ms| ms.parse().ok()).unwrap_or(0.0)
}

/// Workers sending back to back through `url` until `stop`, bounded by `max` calls each.
fn workers(
    url: String,
    count: usize,
    headers: &'static [(&'static str, &'static str)],
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..count)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let client = direct_client();
                let mut done = 0;
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut request = client.get(&url);
                    for (name, value) in headers {
                        request = request.header(*name, *value);
                    }
                    if request.send().await.is_ok_and(|r| r.status() == 200) {
                        done += 1;
                    }
                }
                done
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_backfill_leaves_room_for_high_traffic() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let config = yaml(&redis, &mock, "    lanes: { low: { max_share: 0.7 } }\n");
    let replicas =
        [TestSluice::start(&config).await, TestSluice::start(&config).await, TestSluice::start(&config).await];
    let url = |at: usize| format!("{}/hubspot/crm/v3/objects/contacts", replicas[at].proxy_url());

    // The backfill: low, through the first two replicas, as fast as they let it.
    let stop = Arc::new(AtomicBool::new(false));
    const BACKFILL: &[(&str, &str)] = &[("sluice-consumer", "backfill"), ("sluice-priority", "low"), (LANE, "low")];
    let mut backfill = workers(url(0), 8, BACKFILL, stop.clone());
    backfill.extend(workers(url(1), 8, BACKFILL, stop.clone()));
    tokio::time::sleep(PER).await;

    // High traffic at 10% of the quota through the third, while the backfill saturates it.
    let client = direct_client();
    let mut waits = Vec::new();
    let mut ticks = tokio::time::interval(PER / (LIMIT as u32 / 10));
    for _ in 0..30 {
        ticks.tick().await;
        let response = client
            .get(url(2))
            .header("sluice-consumer", "web")
            .header("sluice-priority", "high")
            .header(LANE, "high")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        waits.push(queued_ms(&response));
    }
    // A low call that may not wait is refused while the backfill holds its share, and says its lane.
    let refused = client
        .get(url(2))
        .header("sluice-priority", "low")
        .header("sluice-consumer", "backfill")
        .header("sluice-max-wait", "0")
        .header(LANE, "probe")
        .send()
        .await
        .unwrap();
    let status = refused.status().as_u16();
    let body: Value = refused.json().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut low_done = 0;
    for worker in backfill {
        low_done += worker.await.unwrap();
    }
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["lane"], "low", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("burst (low lane)"), "{body}");

    waits.sort_by(f64::total_cmp);
    let p99 = waits[(waits.len() * 99).div_ceil(100) - 1];
    let interval_ms = PER.as_secs_f64() * 1000.0 / LIMIT as f64;
    let calls = mock.requests();
    let all = busiest_window(&calls, |_| true);
    let low = busiest_window(&calls, |call| call.header(LANE) == Some("low"));
    println!(
        "high p99 queue wait {p99:.1} ms (slot interval {interval_ms} ms); backfill {low_done} calls, at most {low} \
         in a window of {LIMIT}; busiest window {all}"
    );
    assert!(p99 < 2.0 * interval_ms, "high p99 queue wait {p99} ms: {waits:?}");
    assert!(low <= LIMIT * 7 / 10, "the backfill took {low} of a window of {LIMIT}");
    assert!(all <= LIMIT, "the vendor saw {all} in one window");
    assert!(low >= LIMIT * 6 / 10, "the backfill did fill its share: {low}");
    for replica in replicas {
        replica.shutdown().await;
    }
}

/// Without a cap the backfill may take every slot, paced; a high call still goes within two
/// slot intervals, since no low call reserves more than one ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_goes_first_when_the_backfill_takes_it_all() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let config = yaml(&redis, &mock, "");
    let replicas =
        [TestSluice::start(&config).await, TestSluice::start(&config).await, TestSluice::start(&config).await];
    let url = |at: usize| format!("{}/hubspot/crm/v3/objects/contacts", replicas[at].proxy_url());
    let stop = Arc::new(AtomicBool::new(false));
    const BACKFILL: &[(&str, &str)] = &[("sluice-consumer", "backfill"), ("sluice-priority", "low"), (LANE, "low")];
    let mut backfill = workers(url(0), 8, BACKFILL, stop.clone());
    backfill.extend(workers(url(1), 8, BACKFILL, stop.clone()));
    tokio::time::sleep(PER * 2).await;
    let client = direct_client();
    let mut waits = Vec::new();
    let mut ticks = tokio::time::interval(PER / (LIMIT as u32 / 10));
    for _ in 0..30 {
        ticks.tick().await;
        let response = client.get(url(2)).header("sluice-priority", "high").header(LANE, "high").send().await.unwrap();
        assert_eq!(response.status(), 200);
        waits.push(queued_ms(&response));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in backfill {
        worker.await.unwrap();
    }
    waits.sort_by(f64::total_cmp);
    let p99 = waits[(waits.len() * 99).div_ceil(100) - 1];
    let interval_ms = PER.as_secs_f64() * 1000.0 / LIMIT as f64;
    let calls = mock.requests();
    let all = busiest_window(&calls, |_| true);
    println!(
        "uncapped backfill: high p99 queue wait {p99:.1} ms (slot interval {interval_ms} ms); busiest window {all}"
    );
    assert!(all <= LIMIT, "the vendor saw {all} in one window");
    assert!(all >= LIMIT * 9 / 10, "the backfill filled the quota: {all}");
    assert!(p99 < 2.0 * interval_ms, "high p99 queue wait {p99} ms: {waits:?}");
    for replica in replicas {
        replica.shutdown().await;
    }
}

/// Two normal consumers on two replicas, one sending ten times the other, together more than the
/// quota: they take turns, so the light one's calls are all served, and the heavy one still
/// gets the rest of the quota (its oldest calls refused once they waited `max_queue_wait`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_normal_consumers_both_make_progress() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let config = yaml(&redis, &mock, "").replace("max_queue_wait: 10s", "max_queue_wait: 3s");
    let replicas = [TestSluice::start(&config).await, TestSluice::start(&config).await];
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, u16, f64)>();
    // Per replica: heavy at 40 calls/s, light at 4/s; the quota is 100 per 2.1 s, about 48/s.
    let mut senders = Vec::new();
    for replica in &replicas {
        let url = format!("{}/hubspot/crm/v3/objects/contacts", replica.proxy_url());
        for (consumer, per_second) in [("heavy", 40u32), ("light", 4)] {
            let (url, sent_tx) = (url.clone(), sent_tx.clone());
            senders.push(tokio::spawn(async move {
                let client = direct_client();
                let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second);
                for _ in 0..per_second * 6 {
                    ticks.tick().await;
                    let (client, url, sent_tx) = (client.clone(), url.clone(), sent_tx.clone());
                    tokio::spawn(async move {
                        let response =
                            client.get(&url).header("sluice-consumer", consumer).header(WHO, consumer).send().await;
                        let (status, waited) = match response {
                            Ok(response) => (response.status().as_u16(), queued_ms(&response)),
                            Err(_) => (0, 0.0),
                        };
                        let _ = sent_tx.send((consumer, status, waited));
                    });
                }
            }));
        }
    }
    drop(sent_tx);
    for sender in senders {
        sender.await.unwrap();
    }
    let mut outcomes: std::collections::BTreeMap<(&str, u16), usize> = Default::default();
    let mut waits: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    // Bounded: every call is answered within max_queue_wait and the vendor's time.
    while let Ok(Some((consumer, status, waited))) = tokio::time::timeout(Duration::from_secs(10), sent_rx.recv()).await
    {
        *outcomes.entry((consumer, status)).or_default() += 1;
        if status == 200 {
            waits.entry(consumer).or_default().push(waited);
        }
    }
    let count = |consumer: &str, status: u16| outcomes.get(&(consumer, status)).copied().unwrap_or(0);
    let mean = |consumer: &str| {
        let waits = waits.get(consumer).cloned().unwrap_or_default();
        waits.iter().sum::<f64>() / waits.len().max(1) as f64
    };
    println!(
        "heavy: {} served, {} refused, mean wait {:.0} ms; light: {} served, {} refused, mean wait {:.0} ms",
        count("heavy", 200),
        count("heavy", 429),
        mean("heavy"),
        count("light", 200),
        count("light", 429),
        mean("light")
    );
    assert_eq!(count("heavy", 200) + count("heavy", 429), 480, "{outcomes:?}");
    assert_eq!(count("light", 200) + count("light", 429), 48, "{outcomes:?}");
    assert!(count("light", 200) >= 48 * 9 / 10, "the light consumer is served: {outcomes:?}");
    assert!(count("heavy", 200) >= 200, "the heavy one gets the rest of the quota: {outcomes:?}");
    assert!(busiest_window(&mock.requests(), |_| true) <= LIMIT);
    for replica in replicas {
        replica.shutdown().await;
    }
}
