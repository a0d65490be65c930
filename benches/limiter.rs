#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Micro-benchmarks (criterion) of the functions every limited request runs: the GCRA decision,
//! the memory store, the quota key, routing, hop-by-hop stripping, reading HubSpot's rate-limit
//! headers, and splitting a HubSpot batch answer.
//!
//! `cargo bench --bench limiter` measures; `cargo test --all-targets` runs each function once
//! (criterion's test mode). The batch split reads the HubSpot fixtures the project carries
//! (`tests/fixtures/crm/hubspot/`).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use serde_json::Value;

use sluice::batch::format::{BatchOp, Item};
use sluice::config::{Config, ScopeKey};
use sluice::limit::decide::{self, Rule, State};
use sluice::limit::memory::MemoryStore;
use sluice::limit::rolling::Admissions;
use sluice::limit::scope;
use sluice::request::Via;
use sluice::route::RouteTable;
use sluice::upstream::headers::strip_hop_by_hop;
use sluice::vendor::{self, ProfileKind, ResetUnit};

const SEC: i64 = 1_000_000;
/// A realistic "now": the limiter works in Unix microseconds.
const NOW: i64 = 1_767_225_600 * SEC;

/// HubSpot's ten-secondly quota (190 per 10 s, 100 ms margin) in both shapes, and a daily
/// budget; all far from exhausted in the states below.
fn burst_rule() -> Rule {
    Rule::rolling(190, 10 * SEC, 100_000)
}

fn smooth_rule() -> Rule {
    Rule::smooth(190, 10 * SEC, 9, 100_000)
}

fn daily_rule() -> Rule {
    Rule::rolling(1_000_000, 86_400 * SEC, 250_000)
}

/// A ten-secondly log holding `n` admissions spread over the last 10 s.
fn busy_log(n: i64) -> State {
    State::Admissions(Admissions {
        width: 1,
        entries: (0..n).map(|i| (NOW - 10 * SEC + i * (10 * SEC / n), 1)).collect(),
    })
}

fn quota_decide(c: &mut Criterion) {
    let one = [(burst_rule(), 1)];
    c.bench_function("decide::decide, rolling log (100 of 190 in the window)", |b| {
        b.iter(|| {
            let mut states = [busy_log(100)];
            decide::decide(black_box(&one), black_box(&mut states), black_box(NOW), 0)
        })
    });
    let smooth = [(smooth_rule(), 1)];
    c.bench_function("decide::decide, smooth (GCRA)", |b| {
        b.iter(|| {
            let mut states = [State::Tat(NOW - SEC)];
            decide::decide(black_box(&smooth), black_box(&mut states), black_box(NOW), 0)
        })
    });
    let two = [(burst_rule(), 1), (daily_rule(), 1)];
    c.bench_function("decide::decide, rolling log + daily counters", |b| {
        b.iter(|| {
            let mut states = [busy_log(100), State::Empty];
            decide::decide(black_box(&two), black_box(&mut states), black_box(NOW), 0)
        })
    });
}

fn memory_store(c: &mut Criterion) {
    let store = MemoryStore::default();
    // Limits no run of this benchmark reaches: the allowed path, over 1,000 scopes.
    let rules = [(Rule::rolling(100_000_000, 10 * SEC, 100_000), 1), (daily_rule(), 1)];
    let keys: Vec<(Vec<String>, String)> = (0..1000)
        .map(|tenant| {
            (
                vec![format!("sluice:{{hubspot}}:burst:t{tenant}"), "sluice:{hubspot}:daily:_all".to_owned()],
                format!("sluice:{{hubspot}}:pause:t{tenant}"),
            )
        })
        .collect();
    let mut now = NOW;
    let mut at = 0usize;
    c.bench_function("MemoryStore::decide, 2 rules, 1000 scopes", |b| {
        b.iter(|| {
            now += 1000;
            at = (at + 1) % keys.len();
            let (keys, pause) = &keys[at];
            store.decide(black_box(keys), black_box(pause), black_box(&rules), black_box(now), 0)
        })
    });
}

fn quota_key(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant-id", HeaderValue::from_static("acme-corp-42"));
    headers.insert("authorization", HeaderValue::from_static("Bearer pat-na1-0000"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let scope = [ScopeKey::Header(HeaderName::from_static("x-tenant-id"))];
    c.bench_function("scope::quota_key, header:x-tenant-id", |b| {
        b.iter(|| scope::quota_key(black_box(&scope), black_box(&headers), None))
    });
    c.bench_function("scope::quota_key, unscoped", |b| b.iter(|| scope::quota_key(black_box(&[]), &headers, None)));
}

fn route(c: &mut Criterion) {
    let config = Config::from_yaml(
        "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    prefix: /hubspot
    target: http://127.0.0.1:8080
  - name: salesforce
    hosts: ['*.my.salesforce.com']
    prefix: /salesforce
    target: https://login.salesforce.com
  - name: zendesk
    hosts: ['*.zendesk.com']
    prefix: /zendesk
    target: https://example.zendesk.com
",
    )
    .unwrap();
    let table = RouteTable::new(&config.live.upstreams);
    let via = Via::default();
    let reverse = Request::get("/hubspot/crm/v3/objects/contacts?limit=1").body(()).unwrap();
    c.bench_function("RouteTable::route, reverse prefix", |b| b.iter(|| table.route(black_box(&reverse), &via)));
    let forward = Request::get("http://api.hubapi.com/crm/v3/objects/contacts?limit=1").body(()).unwrap();
    c.bench_function("RouteTable::route, absolute-form exact host", |b| {
        b.iter(|| table.route(black_box(&forward), &via))
    });
    let wildcard = Request::get("https://acme.my.salesforce.com/services/data/v60.0/sobjects").body(()).unwrap();
    c.bench_function("RouteTable::route, absolute-form wildcard host", |b| {
        b.iter(|| table.route(black_box(&wildcard), &via))
    });
}

/// The whole LIMIT step for one request on the memory store: scope keys, both quotas decided,
/// metrics and the `RateLimit` header. The proxy's per-request cost of having quotas at all.
fn admit(c: &mut Criterion) {
    let config = Config::from_yaml(
        "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: http://127.0.0.1:8080
    over_limit: reject
    quotas:
      - { name: burst, limit: 100000000, per: 10s, key: [header:x-tenant-id] }
      - { name: daily, limit: 1000000000, per: 1d }
",
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let metrics = std::sync::Arc::new(sluice::telemetry::Metrics::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let limiter =
        runtime.block_on(sluice::limit::Limiter::start(config.process.store.resolve().unwrap(), metrics, stop));
    let upstream = config.live.upstreams[0].clone();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant-id", HeaderValue::from_static("acme"));
    let caller = sluice::limit::Caller::from_headers(&headers);
    let method = http::Method::GET;
    c.bench_function("Limiter::admit, memory store, 2 quotas", |b| {
        b.iter(|| {
            runtime.block_on(limiter.admit(&upstream, &method, "/crm/v3/objects/contacts", caller, None)).unwrap()
        })
    });
}

fn hop_by_hop(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:3128"),
        ("user-agent", "hubspot-api-client-nodejs/11.1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("authorization", "Bearer pat-na1-00000000-0000-0000-0000-000000000000"),
        ("x-tenant-id", "acme-corp-42"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("connection", "keep-alive, x-trace-hop"),
        ("x-trace-hop", "1"),
        ("proxy-connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
    ] {
        headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    c.bench_function("headers::strip_hop_by_hop, 11 fields", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut headers| {
                strip_hop_by_hop(&mut headers);
                headers
            },
            BatchSize::SmallInput,
        )
    });
}

fn observe(c: &mut Criterion) {
    // The rate-limit headers of the HubSpot batch-create success fixture.
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json;charset=utf-8"),
        ("x-hubspot-ratelimit-interval-milliseconds", "10000"),
        ("x-hubspot-ratelimit-max", "190"),
        ("x-hubspot-ratelimit-daily", "625000"),
        ("x-hubspot-ratelimit-remaining", "188"),
        ("x-hubspot-ratelimit-daily-remaining", "624998"),
    ] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    let now = SystemTime::now();
    c.bench_function("vendor::observe, hubspot 200", |b| {
        b.iter(|| {
            let response = vendor::Response { status: StatusCode::OK, headers: black_box(&headers), body: None, now };
            vendor::observe(ProfileKind::Hubspot, ResetUnit::Seconds, &response)
        })
    });
}

fn batch_split(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crm/hubspot");
    let read = |name: &str| -> Value {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let (request, response) = (read("batch-create.request.json"), read("batch-create.response.success.json"));
    let items: Vec<Item> = request["request"]["body"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|input| {
            let mut body = input.clone();
            let trace = body.as_object_mut().unwrap().remove("objectWriteTraceId").unwrap();
            Item { id: None, body, trace: trace.as_str().unwrap().to_owned() }
        })
        .collect();
    let body = serde_json::to_vec(&response["response"]["body"]).unwrap();
    let hubspot = sluice::batch::format("hubspot").expect("the hubspot format");
    let name = format!("batch::hubspot split, create success ({} items)", items.len());
    c.bench_function(&name, |b| b.iter(|| hubspot.split(BatchOp::Create, black_box(&body), black_box(&items))));
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = quota_decide, memory_store, quota_key, route, admit, hop_by_hop, observe, batch_split
}
criterion_main!(benches);
