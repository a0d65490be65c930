#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The quota's two promises, measured the way an SRE would: three sluice replicas, a vendor that
//! enforces the same rolling limit for real and sends HubSpot's rate-limit headers, six clients
//! offering three times the quota for 30 s.
//!
//! - The vendor never sees more than the limit in any rolling window, and never answers 429.
//! - Callers get the whole quota: at least 95% of `limit × duration / per` is delivered.
//!
//! Once on one Redis (50 per 10 s), once on a three-master Redis Cluster with a per-tenant window
//! (20 per 10 s for each of two tenants) next to a rolling daily budget, leases enabled. The
//! observed numbers are printed for BENCHMARKS.md (`cargo test --test quota_exactness -- --nocapture`).
//! The two runs take turns: each is a 30 s measurement on a shared two-core machine.
mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::cluster::Cluster;
use support::redis::RedisServer;
use support::vendor::{Announce, Arrival, LimitedVendor};
use support::{direct_client, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

const PER: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(30);
const REPLICAS: usize = 3;
const CLIENTS_PER_REPLICA: usize = 2;

/// One measurement at a time (see the module doc).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Most arrivals in any half-open window `[t, t + per)`.
fn busiest_window(arrivals: &[Arrival], per: Duration) -> usize {
    let mut sorted: Vec<Instant> = arrivals.iter().filter(|arrival| arrival.accepted).map(|a| a.at).collect();
    sorted.sort();
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

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    limited: usize,
    other: Vec<String>,
}

/// The vendor: one rolling-window limit per tenant (`x-tenant-id`), announced in HubSpot's headers.
#[derive(Clone)]
struct Vendor {
    tenants: HashMap<String, LimitedVendor>,
}

impl Vendor {
    fn new(limit: usize, tenants: &[&str]) -> Self {
        let tenants = tenants
            .iter()
            .map(|tenant| (tenant.to_string(), LimitedVendor::new(limit, PER, Announce::Hubspot)))
            .collect();
        Self { tenants }
    }

    fn install(&self, mock: &MockCrm) {
        let vendor = self.clone();
        mock.set_handler(move |recorded| {
            let tenant = recorded.header("x-tenant-id").unwrap_or("none").to_owned();
            match vendor.tenants.get(&tenant) {
                Some(limited) => limited.answer(recorded),
                None => support::mock_crm::json(http::StatusCode::BAD_REQUEST, serde_json::json!({"tenant": tenant})),
            }
        });
    }
}

/// Six open-loop clients (each sends every `every`, whatever the answers) for `RUN`, spread over
/// the replicas and `tenants`; returns their tallies and the run's end.
async fn offer(replicas: &[TestSluice], tenants: &[&str], every: Duration) -> (Vec<Tally>, Instant) {
    let clients_total = REPLICAS * CLIENTS_PER_REPLICA;
    let per_client = (RUN.as_millis() / every.as_millis()) as u32;
    let started = Instant::now();
    let mut clients = Vec::new();
    for (index, sluice) in replicas.iter().enumerate() {
        for client_no in 0..CLIENTS_PER_REPLICA {
            let number = index * CLIENTS_PER_REPLICA + client_no;
            let phase = every * number as u32 / clients_total as u32;
            let tenant = tenants[number % tenants.len()].to_owned();
            let url = format!("{}/hubspot/crm/v3/objects/contacts?client={number}", sluice.proxy_url());
            clients.push(tokio::spawn(async move {
                let client = direct_client();
                let mut sent = Vec::new();
                for n in 0..per_client {
                    tokio::time::sleep_until(started + phase + every * n).await;
                    let request = client.get(&url).header("x-tenant-id", &tenant).send();
                    sent.push(tokio::spawn(async move { request.await.map(|response| response.status().as_u16()) }));
                }
                let mut tally = Tally::default();
                for answer in sent {
                    match answer.await.unwrap() {
                        Ok(200) => tally.ok += 1,
                        Ok(429) => tally.limited += 1,
                        Ok(status) => tally.other.push(format!("status {status}")),
                        Err(error) => tally.other.push(format!("client error {error}")),
                    }
                }
                tally
            }));
        }
    }
    let mut tallies = Vec::new();
    for client in clients {
        tallies.push(client.await.unwrap());
    }
    (tallies, started + RUN)
}

/// Runs the measurement and checks both promises for every tenant of `vendor`.
async fn measure(label: &str, replicas: &[TestSluice], vendor: &Vendor, limit: usize, every: Duration) {
    let tenants: Vec<&str> = {
        let mut names: Vec<&str> = vendor.tenants.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    };
    let (tallies, end) = offer(replicas, &tenants, every).await;
    let ok: usize = tallies.iter().map(|t| t.ok).sum();
    let limited: usize = tallies.iter().map(|t| t.limited).sum();
    let mut store_errors = 0.0;
    let mut adopted = 0.0;
    for sluice in replicas {
        let metrics = sluice.metrics().await;
        store_errors += metric_value(&metrics, "sluice_store_errors_total", &[]);
        adopted += metric_value(&metrics, "sluice_vendor_remaining_adopted_total", &[]);
    }
    println!(
        "{label}: {REPLICAS} replicas x {CLIENTS_PER_REPLICA} clients, {limit} per {PER:?} per tenant, run {RUN:?}"
    );
    println!("{label}: client answers 200 {ok}, 429 {limited}; store errors {store_errors}; vendor figures adopted {adopted}");
    for tally in &tallies {
        assert!(tally.other.is_empty(), "{label}: only 200 and 429 are expected: {:?}", tally.other);
    }
    let mut accepted_total = 0;
    for tenant in &tenants {
        let limited_vendor = &vendor.tenants[*tenant];
        let arrivals = limited_vendor.arrivals();
        let in_run = arrivals.iter().filter(|arrival| arrival.accepted && arrival.at <= end).count();
        accepted_total += arrivals.iter().filter(|arrival| arrival.accepted).count();
        let quota_over_run = limit as f64 * RUN.as_secs_f64() / PER.as_secs_f64();
        let ratio = in_run as f64 / quota_over_run;
        let most = busiest_window(&arrivals, PER);
        println!(
            "{label}: tenant {tenant}: vendor accepted {in_run} within the run ({ratio:.3} of {quota_over_run:.0}), \
             refused {}, max {most} in any rolling {PER:?}",
            limited_vendor.refused()
        );
        assert_eq!(limited_vendor.refused(), 0, "{label}/{tenant}: the vendor never had to say 429");
        assert!(most <= limit, "{label}/{tenant}: {most} arrivals in one rolling {PER:?} window; the limit is {limit}");
        assert!(
            ratio >= 0.95,
            "{label}/{tenant}: {in_run} delivered in {RUN:?}: {ratio:.3} of the quota (at least 0.95)"
        );
    }
    assert_eq!(ok, accepted_total, "{label}: every 200 is one vendor arrival, every 429 none");
    assert!(limited > 0, "{label}: the offered load exceeded the quota");
    assert_eq!(store_errors, 0.0, "{label}: the shared store answered throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_deliver_the_whole_rolling_window_and_never_exceed_it() {
    let _turn = TURN.lock().await;
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let vendor = Vendor::new(50, &["acme"]);
    vendor.install(&mock);
    // A store timeout well above loopback latency on a busy 2-core box: this test is about the
    // shared record, not about degrading (which `quota_redis` covers).
    let yaml = format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    limit_headers: hubspot
    quotas: [{{ name: ten-secondly, limit: 50, per: 10s }}]
    max_queue_wait: 2s
",
        redis.url(),
        mock.url()
    );
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(TestSluice::start(&yaml).await);
    }
    // Six clients every 400 ms offer 15 per second: three times 50 per 10 s.
    measure("one redis", &replicas, &vendor, 50, Duration::from_millis(400)).await;
    for sluice in replicas {
        sluice.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_with_tenant_and_daily_windows_delivers_each_tenants_quota() {
    let _turn = TURN.lock().await;
    let cluster = Cluster::start();
    let mock = MockCrm::start().await;
    let vendor = Vendor::new(20, &["acme", "globex"]);
    vendor.install(&mock);
    // Salesforce's ordinary shape next to HubSpot's: a rolling daily budget (a budget, not a
    // pace) over the per-tenant ten-secondly window; leases on (they lease only for busy scopes).
    let yaml = format!(
        "store: {{ kind: redis, url: '{}', timeout: 1s, heartbeat: 500ms, lease_max: 64, lease_ttl: 50ms }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    limit_headers: hubspot
    quotas:
      - {{ name: ten-secondly, limit: 20, per: 10s, key: [header:x-tenant-id] }}
      - {{ name: daily, limit: 1000, per: 1d }}
    max_queue_wait: 2s
",
        cluster.url(),
        mock.url()
    );
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(TestSluice::start(&yaml).await);
    }
    // Three clients per tenant every 500 ms offer 6 per second per tenant: three times 20 per 10 s.
    measure("redis cluster", &replicas, &vendor, 20, Duration::from_millis(500)).await;
    for sluice in replicas {
        sluice.shutdown().await;
    }
}
