#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Batching under load (issue 6): a bulk-capable mock vendor (`tests/support/bulk.rs`) and sluice,
//! both in-process on loopback. 1,000 single HubSpot contact creates are sent paced at ~1,000/s
//! (each on its own task, so they overlap), once with batching off (`Sluice-Batch: off`) and once
//! per `max_delay` with batching on (`max_items: 100`). Printed per scenario: upstream calls per
//! 1,000 creates and the reduction, per-caller latency p50 / p99 / max, and the latency batching
//! adds over the unbatched run (targets: >= 50x fewer calls, added p99 <= max_delay + 5 ms).
//!
//! At a steady rate `r` a batch holds about `min(max_items, r * max_delay)` calls, so the call
//! reduction at 1,000/s is 25x for 25 ms, 50x for 50 ms and 100x for 100 ms.
//!
//! `cargo bench --bench batch_load` runs the full load. Run without `--bench` (as
//! `cargo test --all-targets` does) it sends a few requests per scenario and exits.

#[allow(dead_code)]
#[path = "../tests/support/mock_crm.rs"]
mod mock_crm;

#[allow(dead_code)]
#[path = "../tests/support/bulk.rs"]
mod bulk;

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use bulk::BulkCrm;
use mock_crm::MockCrm;

const FULL_CREATES: usize = 1_000;
const SMOKE_CREATES: usize = 20;
const RATE_PER_SECOND: u64 = 1_000;
const MAX_ITEMS: usize = 100;
/// `max_delay` of each batched scenario, in milliseconds; each gets its own upstream prefix.
const DELAYS_MS: [u64; 3] = [25, 50, 100];

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(run(full));
}

struct Outcome {
    upstream_calls: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Outcome {
    fn percentile(&self, percent: usize) -> Duration {
        let at = (self.latencies.len() * percent / 100).min(self.latencies.len() - 1);
        self.latencies[at]
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn run(full: bool) {
    let mock = MockCrm::start().await;
    let bulk = BulkCrm::install(&mock);
    let dir = tempfile::tempdir().unwrap();
    let mut config = String::from("listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }\nupstreams:\n");
    for delay in DELAYS_MS {
        config.push_str(&format!(
            "  - name: hubspot-{delay}ms
    prefix: /hubspot-{delay}ms
    target: '{}'
    batch:
      - {{ match: 'POST /crm/v3/objects/{{object}}', bulk: 'POST /crm/v3/objects/{{object}}/batch/create', format: hubspot, max_items: {MAX_ITEMS}, max_delay: {delay}ms }}
",
            mock.url()
        ));
    }
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    let running = sluice::app::start(&path).await.expect("sluice starts");
    let base = format!("http://{}", running.proxy_addr);
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();

    let creates = if full { FULL_CREATES } else { SMOKE_CREATES };
    // Warm-up: open enough pooled connections for the in-flight peak (rate x longest delay).
    let unbatched_url = format!("{base}/hubspot-{}ms/crm/v3/objects/contacts", DELAYS_MS[0]);
    let warm = if full { 250 } else { 5 };
    let warmed = send_paced(&client, &mock, &unbatched_url, warm, true, None).await;
    assert_eq!(warmed.latencies.len(), warm);

    let unbatched = send_paced(&client, &mock, &unbatched_url, creates, true, Some(RATE_PER_SECOND)).await;
    let mut batched = Vec::new();
    for delay in DELAYS_MS {
        let url = format!("{base}/hubspot-{delay}ms/crm/v3/objects/contacts");
        batched.push((delay, send_paced(&client, &mock, &url, creates, false, Some(RATE_PER_SECOND)).await));
    }
    assert!(bulk.bulk_count() > 0, "batching reached the bulk endpoint");

    println!(
        "batch_load: {creates} single HubSpot creates per scenario, paced at {RATE_PER_SECOND}/s, max_items {MAX_ITEMS}{}",
        if full { "" } else { " (smoke run; `cargo bench --bench batch_load` for the real one)" }
    );
    println!(
        "{:<24} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>9}",
        "scenario", "upstream", "per 1000", "fewer", "p50 ms", "p99 ms", "max ms", "sent in"
    );
    let per_thousand = |outcome: &Outcome| outcome.upstream_calls as f64 * 1000.0 / creates as f64;
    let row = |name: &str, outcome: &Outcome| {
        println!(
            "{:<24} {:>9} {:>9.1} {:>6.1}x {:>8.2} {:>8.2} {:>8.2} {:>7.0}ms",
            name,
            outcome.upstream_calls,
            per_thousand(outcome),
            per_thousand(&unbatched) / per_thousand(outcome),
            ms(outcome.percentile(50)),
            ms(outcome.percentile(99)),
            ms(*outcome.latencies.last().unwrap()),
            ms(outcome.elapsed),
        );
    };
    row("unbatched (opt-out)", &unbatched);
    for (delay, outcome) in &batched {
        row(&format!("batched max_delay {delay}ms"), outcome);
    }
    println!("added latency per caller (batched - unbatched):");
    for (delay, outcome) in &batched {
        let added_p50 = ms(outcome.percentile(50)) - ms(unbatched.percentile(50));
        let added_p99 = ms(outcome.percentile(99)) - ms(unbatched.percentile(99));
        let reduction = per_thousand(&unbatched) / per_thousand(outcome);
        let budget = *delay as f64 + 5.0;
        println!(
            "  max_delay {delay:>3}ms: p50 {added_p50:+.2} ms, p99 {added_p99:+.2} ms (target <= {budget:.0} ms: {}); \
             calls {reduction:.1}x fewer (target >= 50x: {})",
            if added_p99 <= budget { "met" } else { "MISSED" },
            if reduction >= 50.0 { "met" } else { "MISSED" },
        );
    }
    running.shutdown_within(Duration::from_secs(10)).await;
}

/// Sends `count` creates to `url`, one task each, started `rate` per second (all at once when
/// `None`); returns the upstream calls they caused and each caller's latency, sorted.
async fn send_paced(
    client: &reqwest::Client,
    mock: &MockCrm,
    url: &str,
    count: usize,
    opt_out: bool,
    rate: Option<u64>,
) -> Outcome {
    let before = mock.request_count();
    let mut ticker = rate.map(|rate| {
        let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        ticker
    });
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for at in 0..count {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        let body = serde_json::json!({
            "properties": {"email": format!("load-{at}-{}@example.com", started.elapsed().as_nanos()), "lastname": "Load"},
            "associations": []
        });
        let mut request = client.post(url).json(&body);
        if opt_out {
            request = request.header("sluice-batch", "off");
        }
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap();
            let latency = sent.elapsed();
            assert_eq!(status, 201, "{body}");
            latency
        }));
    }
    let elapsed = started.elapsed();
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    latencies.sort();
    Outcome { upstream_calls: mock.request_count() - before, latencies, elapsed }
}
