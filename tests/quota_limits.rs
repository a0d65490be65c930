#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Quotas through real sockets (issue 3), memory store unless stated: several windows at once,
//! scopes by header, reject-mode headers, queue order and `max_queue_wait`, `Sluice-Max-Wait`,
//! `max_concurrency`, route costs, live reload, `/quotas`, metrics, and memory vs one Redis.
//!
//! Rolling quotas here mostly use `burst: limit`: then the GCRA interval is `per + margin` and
//! exactly `limit` requests go back to back, so counts do not depend on how fast the test runs.
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use support::redis::RedisServer;
use support::{direct_client, metric_value, MockCrm, TestSluice};
use tokio::time::Instant;

/// One upstream `hubspot` at `/hubspot` on `mock`, with `body` (lines indented by four spaces).
fn config(mock: &MockCrm, body: &str) -> String {
    format!("upstreams:\n  - name: hubspot\n    prefix: /hubspot\n    target: '{}'\n{body}", mock.url())
}

/// A parsed `RateLimit` / `RateLimit-Policy` list: per quota name, its integer parameters.
fn fields(value: &str) -> Vec<(String, HashMap<String, i64>)> {
    let list: sfv::List = sfv::Parser::new(value).parse().unwrap_or_else(|e| panic!("{value:?} is not a list: {e}"));
    list.into_iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => {
                let name = item.bare_item.as_string().unwrap_or_else(|| panic!("{value:?}: name not a string"));
                let params = item
                    .params
                    .iter()
                    .map(|(key, value)| {
                        let number = value.as_integer().unwrap_or_else(|| panic!("{key:?} is not an integer"));
                        (key.as_str().to_owned(), i64::from(number))
                    })
                    .collect();
                (name.as_str().to_owned(), params)
            }
            sfv::ListEntry::InnerList(inner) => panic!("unexpected inner list {inner:?} in {value:?}"),
        })
        .collect()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|value| value.to_str().ok())
}

/// `r` of quota `quota` in the `RateLimit` header of `response`.
fn remaining(response: &reqwest::Response, quota: &str) -> i64 {
    let value = header(response, "ratelimit").unwrap_or_else(|| panic!("no RateLimit on {}", response.status()));
    let parsed = fields(value);
    let (_, params) = parsed.iter().find(|(name, _)| name == quota).unwrap_or_else(|| panic!("{quota} not in {value}"));
    params["r"]
}

fn retry_after(response: &reqwest::Response) -> u64 {
    let value = header(response, "retry-after").expect("429 carries Retry-After");
    value.parse().unwrap_or_else(|_| panic!("Retry-After {value:?} is not integer seconds"))
}

/// What a client keeps of a response: status, headers, JSON body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("sluice answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    Answer { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::Null) }
}

async fn get(client: &reqwest::Client, url: &str) -> reqwest::Response {
    client.get(url).send().await.expect("sluice answers")
}

async fn quotas_json(sluice: &TestSluice) -> Value {
    direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().json().await.unwrap()
}

fn decisions(metrics: &str, quota: &str, result: &str) -> f64 {
    metric_value(
        metrics,
        "sluice_quota_decisions_total",
        &[("upstream", "hubspot"), ("quota", quota), ("result", result)],
    )
}

#[tokio::test]
async fn several_windows_at_once_fixed_daily_stops_traffic() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: reject
    quotas:
      - { name: burst, limit: 4, per: 1s, burst: 4 }
      - { name: daily, limit: 6, per: 1d, window: fixed, resets_at: '00:00 America/New_York' }
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    // The burst quota limits first: 4 back to back, then 429 naming `burst`.
    for want_daily in [5, 4, 3, 2] {
        let response = get(&client, &url).await;
        assert_eq!(response.status(), 200);
        assert_eq!(remaining(&response, "daily"), want_daily, "both quotas are charged");
    }
    let response = get(&client, &url).await;
    assert_eq!(response.status(), 429);
    assert_eq!(remaining(&response, "burst"), 0);
    assert_eq!(remaining(&response, "daily"), 2, "a rejection charges no quota");
    let body: Value = response.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("`burst`"), "{body}");

    // As the burst quota refills, the daily one runs out after two more.
    let mut allowed = 4;
    let deadline = Instant::now() + Duration::from_secs(10);
    while allowed < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let response = get(&client, &url).await;
        match response.status().as_u16() {
            200 => allowed += 1,
            429 => {
                let body: Value = response.json().await.unwrap();
                assert!(body["detail"].as_str().unwrap().contains("`burst`"), "daily is not out yet: {body}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(allowed, 6, "the burst quota refilled twice within 10 s");

    // Once the burst quota has a token again, the daily quota alone stops traffic.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        let response = get(&client, &url).await;
        assert_eq!(response.status(), 429);
        assert_eq!(remaining(&response, "daily"), 0);
        let wait = retry_after(&response);
        assert!((1..=25 * 3600).contains(&wait), "Retry-After {wait} points at the next New York midnight");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert!(body["detail"].as_str().unwrap().contains("`daily`"), "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(mock.request_count(), 6, "the vendor saw exactly the daily quota");
    let metrics = sluice.metrics().await;
    assert!(decisions(&metrics, "daily", "rejected") >= 3.0, "{metrics}");
    assert!(decisions(&metrics, "burst", "rejected") >= 1.0, "{metrics}");
    assert_eq!(decisions(&metrics, "daily", "allowed"), 6.0, "{metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn header_scopes_are_independent_and_missing_values_share_the_default_bucket() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: reject
    quotas: [{ name: burst, limit: 3, per: 10s, burst: 3, key: [header:x-tenant-id] }]
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let statuses = |tenant: Option<&'static str>, n: usize| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let mut request = client.get(&url);
                if let Some(tenant) = tenant {
                    request = request.header("x-tenant-id", tenant);
                }
                out.push(request.send().await.unwrap().status().as_u16());
            }
            out
        }
    };
    assert_eq!(statuses(Some("acme"), 5).await, [200, 200, 200, 429, 429]);
    assert_eq!(statuses(Some("beta"), 3).await, [200, 200, 200], "acme's exhaustion does not touch beta");
    assert_eq!(statuses(None, 4).await, [200, 200, 200, 429], "no header: the _default bucket");
    assert_eq!(statuses(Some(""), 1).await, [429], "an empty value is the same _default bucket");
    assert_eq!(statuses(Some("acme"), 1).await, [429]);
    assert_eq!(mock.request_count(), 9);

    let quotas = quotas_json(&sluice).await;
    let scopes = quotas["upstreams"][0]["quotas"][0]["scopes"].as_array().unwrap().clone();
    let by_name: HashMap<&str, &Value> = scopes.iter().map(|s| (s["scope"].as_str().unwrap(), s)).collect();
    for name in ["acme", "beta", "_default"] {
        assert_eq!(by_name[name]["remaining"], 0, "{name}: {quotas}");
    }
    sluice.shutdown().await;
}

#[tokio::test]
async fn reject_mode_answers_with_rate_limit_headers() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: reject
    quotas: [{ name: burst, limit: 2, per: 10s, burst: 2 }]
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    for want in [1, 0] {
        let response = get(&client, &url).await;
        assert_eq!(response.status(), 200);
        assert_eq!(remaining(&response, "burst"), want);
        let limit = fields(header(&response, "ratelimit").unwrap());
        // t: seconds until the bucket is whole again; with burst = limit it refills one per
        // per + margin (10.1 s), so at most 2 x 10.1 s here.
        assert!((1..=21).contains(&limit[0].1["t"]), "t is seconds until the quota is whole: {limit:?}");
        let timing = header(&response, "server-timing").expect("allowed responses carry Server-Timing");
        let dur = timing.strip_prefix("sluice-queue;dur=").unwrap_or_else(|| panic!("Server-Timing {timing:?}"));
        assert!(dur.parse::<f64>().unwrap() >= 0.0, "{timing}");
    }

    let response = get(&client, &url).await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!((1..=11).contains(&wait), "Retry-After {wait}: the next token comes within per + margin");
    let limit = fields(header(&response, "ratelimit").expect("429 carries RateLimit"));
    assert_eq!(limit.len(), 1);
    assert_eq!(limit[0].0, "burst");
    assert_eq!(limit[0].1["r"], 0);
    assert!(limit[0].1.contains_key("t"), "{limit:?}");
    let policy = fields(header(&response, "ratelimit-policy").expect("429 carries RateLimit-Policy"));
    assert_eq!(policy.len(), 1);
    assert_eq!(policy[0].0, "burst");
    assert_eq!(policy[0].1["q"], 2);
    assert_eq!(policy[0].1["w"], 10);
    let proxy_status = header(&response, "proxy-status").expect("429 carries Proxy-Status").to_owned();
    assert!(proxy_status.starts_with("sluice"), "{proxy_status}");
    assert!(proxy_status.contains("error=http_request_denied"), "{proxy_status}");
    assert!(header(&response, "content-type").unwrap().starts_with("application/json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["upstream"], "hubspot");

    assert_eq!(mock.request_count(), 2, "the rejected request never reached the vendor");
    let metrics = sluice.metrics().await;
    assert_eq!(decisions(&metrics, "burst", "allowed"), 2.0, "{metrics}");
    assert_eq!(decisions(&metrics, "burst", "rejected"), 1.0, "{metrics}");
    assert_eq!(decisions(&metrics, "burst", "queued"), 0.0, "{metrics}");
    assert!(
        metric_value(&metrics, "sluice_quota_queue_wait_seconds_count", &[("upstream", "hubspot")]) >= 2.0,
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "sluice_proxy_errors_total", &[("upstream", "hubspot"), ("error", "rate_limited")])
            >= 1.0,
        "{metrics}"
    );
    sluice.shutdown().await;
}

#[tokio::test]
async fn queue_mode_serves_in_order_spaced_by_the_quota_then_429_past_max_queue_wait() {
    let mock = MockCrm::start().await;
    // burst 1: interval T = (2 s + 20 ms) / 3 = 673 ms; slots at 0, T, 2T fit within 1.5 s, 3T not.
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: queue
    max_queue_wait: 1500ms
    quotas: [{ name: burst, limit: 3, per: 2s, burst: 1 }]
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let mut tasks = Vec::new();
    for seq in 0..6 {
        let request = client.get(&url).header("x-seq", seq.to_string());
        tasks.push(tokio::spawn(send(request)));
        // Staggered so the requests reach the limiter in order.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429], "three slots fit in max_queue_wait");

    for answer in &answers[3..] {
        assert_eq!(answer.body["error"], "rate_limited");
        let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3).contains(&wait), "Retry-After {wait}: the next free slot is about 2 s away");
        assert!(answer.header("ratelimit-policy").is_some());
    }
    let queued_ms: Vec<f64> = answers[..3]
        .iter()
        .map(|a| {
            let timing = a.header("server-timing").unwrap();
            timing.strip_prefix("sluice-queue;dur=").unwrap().parse().unwrap()
        })
        .collect();
    assert!(queued_ms[1] >= 400.0 && queued_ms[2] >= 1000.0, "queued time is reported: {queued_ms:?}");

    let seen = mock.requests();
    let order: Vec<&str> = seen.iter().map(|r| r.header("x-seq").unwrap()).collect();
    assert_eq!(order, ["0", "1", "2"], "waiters are served in arrival order");
    for pair in seen.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(550), "sends are spaced by the quota's interval (673 ms): {gap:?}");
    }
    let metrics = sluice.metrics().await;
    assert_eq!(decisions(&metrics, "burst", "allowed"), 1.0, "{metrics}");
    assert_eq!(decisions(&metrics, "burst", "queued"), 2.0, "{metrics}");
    assert_eq!(decisions(&metrics, "burst", "rejected"), 3.0, "{metrics}");
    sluice.shutdown().await;
}

fn max_wait_yaml(mock: &MockCrm) -> String {
    // Interval T = (4 s + 40 ms) / 2 = 2.02 s with burst 1.
    format!(
        "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{url}'
    max_queue_wait: 3s
    quotas: [{{ name: burst, limit: 2, per: 4s, burst: 1 }}]
  - name: short
    prefix: /short
    target: '{url}'
    max_queue_wait: 500ms
    quotas: [{{ name: burst, limit: 2, per: 4s, burst: 1 }}]
",
        url = mock.url()
    )
}

#[tokio::test]
async fn sluice_max_wait_shortens_the_wait_never_lengthens_it() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&max_wait_yaml(&mock)).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());

    let first = client.get(&url).header("sluice-max-wait", "0").send().await.unwrap();
    assert_eq!(first.status(), 200, "a request that needs no wait goes even with max-wait 0");
    for max_wait in ["0", "100ms", "1.5"] {
        let response = client.get(&url).header("sluice-max-wait", max_wait).send().await.unwrap();
        assert_eq!(response.status(), 429, "max-wait {max_wait}: the next slot is ~2 s away, so no queueing");
        let wait = retry_after(&response);
        assert!((1..=3).contains(&wait), "honest Retry-After: {wait}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "rate_limited");
    }
    // Honest: after Retry-After, the same impatient request goes through.
    let response = client.get(&url).header("sluice-max-wait", "0").send().await.unwrap();
    let wait = retry_after(&response);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let response = client.get(&url).header("sluice-max-wait", "0").send().await.unwrap();
    assert_eq!(response.status(), 200, "after Retry-After ({wait} s) the quota takes it without waiting");

    // Never lengthen: 10 s asked, the upstream allows 500 ms, the slot is 2 s away.
    let short = format!("{}/short/crm/v3/objects/contacts", sluice.proxy_url());
    assert_eq!(client.get(&short).header("sluice-max-wait", "10s").send().await.unwrap().status(), 200);
    let response = client.get(&short).header("sluice-max-wait", "10s").send().await.unwrap();
    assert_eq!(response.status(), 429, "Sluice-Max-Wait cannot lengthen max_queue_wait");

    assert_eq!(mock.request_count(), 3);
    let metrics = sluice.metrics().await;
    assert_eq!(decisions(&metrics, "burst", "queued"), 0.0, "nothing queued: {metrics}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn sluice_max_wait_header_never_reaches_the_vendor() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&max_wait_yaml(&mock)).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    for max_wait in ["0", "3s"] {
        assert_eq!(client.get(&url).header("sluice-max-wait", max_wait).send().await.unwrap().status(), 200);
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.header("sluice-max-wait"), None, "Sluice-Max-Wait is for this hop only");
    }
    sluice.shutdown().await;
}

/// An upstream that counts requests in flight: each is held `delay` before its answer.
async fn counting_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (now, max) = (in_flight.clone(), most.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (now, max) = (now.clone(), max.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let (now, max) = (now.clone(), max.clone());
                    async move {
                        let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(current, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, in_flight, most)
}

#[tokio::test]
async fn max_concurrency_caps_requests_in_flight_and_queues_within_max_queue_wait() {
    let mock = MockCrm::start().await;
    let (counted, _, most) = counting_upstream(Duration::from_millis(300)).await;
    let (tight, _, _) = counting_upstream(Duration::from_millis(500)).await;
    let sluice = TestSluice::start(&format!(
        "upstreams:
  - {{ name: hubspot, prefix: /hubspot, target: '{}', max_concurrency: 2, max_queue_wait: 20s }}
  - {{ name: counted, prefix: /counted, target: 'http://{counted}', max_concurrency: 2, max_queue_wait: 20s }}
  - {{ name: tight, prefix: /tight, target: 'http://{tight}', max_concurrency: 2, max_queue_wait: 700ms }}
",
        mock.url()
    ))
    .await;
    let client = direct_client();
    let burst = |path: &'static str, n: usize| {
        let url = format!("{}{path}", sluice.proxy_url());
        let client = client.clone();
        async move {
            let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(send(client.get(&url)))).collect();
            let mut answers = Vec::new();
            for task in tasks {
                answers.push(task.await.unwrap());
            }
            answers
        }
    };

    // The mock's /slow/500: any three consecutive arrivals span at least one 500 ms answer.
    let answers = burst("/hubspot/slow/500", 6).await;
    assert!(answers.iter().all(|a| a.status == 200), "slots queue, they do not fail");
    let mut arrivals: Vec<Instant> = mock.requests().iter().map(|r| r.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 6);
    for trio in arrivals.windows(3) {
        assert!(trio[2] - trio[0] >= Duration::from_millis(500), "a third request overlapped two in flight");
    }

    // A counting upstream: never more than 2 at once, and 2 are used.
    let answers = burst("/counted/x", 8).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(most.load(Ordering::SeqCst), 2, "max_concurrency: 2 means at most (and here exactly) 2 in flight");

    // Slots busy longer than max_queue_wait: 429 concurrency_limited, never an upstream error.
    // Two go at once; the fifth and sixth cannot start before 1 s > 700 ms.
    let answers = burst("/tight/x", 6).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(ok + limited.len(), 6, "{:?}", answers.iter().map(|a| a.status).collect::<Vec<_>>());
    assert!(ok >= 2 && limited.len() >= 2, "ok {ok}, limited {}", limited.len());
    for answer in limited {
        assert_eq!(answer.body["error"], "concurrency_limited");
        assert!(answer.header("retry-after").is_some() && answer.header("proxy-status").is_some());
    }
    sluice.shutdown().await;
}

/// Like [`counting_upstream`], but the answer's head goes at once and its body takes `delay`:
/// a request is in flight at the vendor until its body is sent.
async fn streaming_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    struct Done(Arc<AtomicUsize>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (now, max) = (in_flight, most.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (now, max) = (now.clone(), max.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(current, Ordering::SeqCst);
                    let done = Done(now.clone());
                    let chunks = futures_util::stream::unfold((0u8, Some(done)), move |(step, done)| async move {
                        match step {
                            0 => Some((
                                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"{\"a\":"))),
                                (1, done),
                            )),
                            1 => {
                                tokio::time::sleep(delay).await;
                                drop(done);
                                Some((Ok(hyper::body::Frame::data(Bytes::from_static(b"1}"))), (2, None)))
                            }
                            _ => None,
                        }
                    });
                    async move { Ok::<_, Infallible>(http::Response::new(http_body_util::StreamBody::new(chunks))) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, most)
}

#[tokio::test]
async fn max_concurrency_counts_a_request_until_its_body_is_done() {
    let (streaming, most) = streaming_upstream(Duration::from_millis(300)).await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: bulk, prefix: /bulk, target: 'http://{streaming}', max_concurrency: 2, max_queue_wait: 20s }}\n"
    ))
    .await;
    let url = format!("{}/bulk/export", sluice.proxy_url());
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let response = direct_client().get(&url).send().await.unwrap();
                let status = response.status().as_u16();
                let body = response.bytes().await.unwrap();
                (status, body.len())
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), (200, 7));
    }
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "{} requests were in flight at the vendor at once",
        most.load(Ordering::SeqCst)
    );
    sluice.shutdown().await;
}

#[tokio::test]
async fn reload_of_max_concurrency_never_exceeds_the_cap() {
    let (counted, _, most) = counting_upstream(Duration::from_millis(600)).await;
    let with_max = |max: usize| {
        format!(
            "upstreams:\n  - {{ name: counted, prefix: /counted, target: 'http://{counted}', max_concurrency: {max}, max_queue_wait: 20s }}\n"
        )
    };
    let sluice = TestSluice::start(&with_max(2)).await;
    let url = format!("{}/counted/x", sluice.proxy_url());
    let spawn = |n: usize| {
        (0..n)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { direct_client().get(&url).send().await.unwrap().status().as_u16() })
            })
            .collect::<Vec<_>>()
    };
    let mut tasks = spawn(4);
    tokio::time::sleep(Duration::from_millis(150)).await;
    sluice.write_config(&with_max(1));
    let reload = direct_client().post(sluice.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    tasks.extend(spawn(2));
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} in flight with max_concurrency 2, then 1");
    sluice.shutdown().await;
}

#[tokio::test]
async fn route_cost_takes_several_tokens() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: reject
    quotas: [{ name: burst, limit: 10, per: 10s, burst: 10 }]
    routes:
      - { match: 'POST /crm/v3/objects/{object}/batch/create', cost: 5 }
",
    ))
    .await;
    let client = direct_client();
    let base = format!("{}/hubspot/crm/v3/objects", sluice.proxy_url());
    let batch = || client.post(format!("{base}/contacts/batch/create")).body(r#"{"inputs":[]}"#);
    let single = || client.post(format!("{base}/contacts")).body(r#"{"properties":{}}"#);

    let response = single().send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(remaining(&response, "burst"), 9, "a plain route costs 1");
    let response = batch().send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(remaining(&response, "burst"), 4, "the batch route costs 5");
    let response = batch().send().await.unwrap();
    assert_eq!(response.status(), 429, "4 tokens left, 5 needed");
    assert_eq!(remaining(&response, "burst"), 4, "nothing was taken by the refusal");
    for want in [3, 2, 1, 0] {
        let response = single().send().await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(remaining(&response, "burst"), want);
    }
    assert_eq!(single().send().await.unwrap().status(), 429);
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths.iter().filter(|p| p.ends_with("/batch/create")).count(), 1);
    assert_eq!(paths.len(), 6);
    sluice.shutdown().await;
}

#[tokio::test]
async fn reload_changes_the_limit_live_and_buckets_keep_their_state() {
    let mock = MockCrm::start().await;
    let with_limit = |limit: u32| {
        config(
            &mock,
            &format!(
                "    over_limit: reject
    quotas: [{{ name: burst, limit: {limit}, per: 10s, burst: {limit} }}]
"
            ),
        )
    };
    let sluice = TestSluice::start(&with_limit(10)).await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    let reload = || async {
        let response = direct_client().post(sluice.admin_url("/reload")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    };

    for want in [9, 8, 7, 6] {
        assert_eq!(remaining(&get(&client, &url).await, "burst"), want);
    }
    // Lower: 5 per window with 4 already used leaves exactly one.
    sluice.write_config(&with_limit(5));
    reload().await;
    let response = get(&client, &url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(remaining(&response, "burst"), 0, "the bucket kept its 4 and the new limit is 5");
    let response = get(&client, &url).await;
    assert_eq!(response.status(), 429);
    let policy = fields(header(&response, "ratelimit-policy").unwrap());
    assert_eq!(policy[0].1["q"], 5, "the new limit is announced");

    // Raise: 8 per window with 5 used leaves three.
    sluice.write_config(&with_limit(8));
    reload().await;
    let statuses: Vec<u16> = {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(get(&client, &url).await.status().as_u16());
        }
        out
    };
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(mock.request_count(), 8, "the vendor saw the latest limit in the window, never more");
    sluice.shutdown().await;
}

#[tokio::test]
async fn quotas_endpoint_shows_upstream_quota_and_busiest_scope() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: reject
    quotas:
      - { name: burst, limit: 5, per: 10s, burst: 5, key: [header:x-tenant-id] }
      - { name: daily, limit: 100, per: 1d, window: fixed }
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    for tenant in ["acme", "acme", "acme", "beta"] {
        assert_eq!(client.get(&url).header("x-tenant-id", tenant).send().await.unwrap().status(), 200);
    }
    let quotas = quotas_json(&sluice).await;
    assert_eq!(quotas["store"]["kind"], "memory", "{quotas}");
    assert_eq!(quotas["store"]["mode"], "memory", "{quotas}");
    let upstream = &quotas["upstreams"][0];
    assert_eq!(upstream["name"], "hubspot", "{quotas}");
    let burst = &upstream["quotas"][0];
    assert_eq!(burst["name"], "burst");
    assert_eq!(burst["limit"], 5);
    assert_eq!(burst["window"], "rolling");
    let busiest = &burst["scopes"][0];
    assert_eq!(busiest["scope"], "acme", "busiest scope first: {quotas}");
    assert_eq!(busiest["requests"], 3);
    assert_eq!(busiest["remaining"], 2);
    assert_eq!(busiest["next_free_in_ms"], 0, "acme can still send now");
    assert!(busiest["full_in_ms"].as_i64().unwrap() > 0);
    assert_eq!(burst["scopes"][1]["scope"], "beta");
    assert_eq!(burst["scopes"][1]["remaining"], 4);
    let daily = &upstream["quotas"][1];
    assert_eq!(daily["name"], "daily");
    assert_eq!(daily["window"], "fixed");
    assert_eq!(daily["scopes"][0]["scope"], "_all");
    assert_eq!(daily["scopes"][0]["remaining"], 96, "{quotas}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn proxy_user_and_client_ip_scopes() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{url}'
    over_limit: reject
    quotas: [{{ name: per-user, limit: 2, per: 10s, burst: 2, key: [proxy_user] }}]
  - name: zendesk
    prefix: /zendesk
    target: '{url}'
    over_limit: reject
    quotas: [{{ name: per-ip, limit: 2, per: 10s, burst: 2, key: [client_ip] }}]
",
        url = mock.url()
    ))
    .await;
    let client = direct_client();
    let hubspot = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    // alice:x and bob:x in Basic; a Bearer token is its own (hashed) identity.
    let as_user = |credentials: &'static str| {
        let client = client.clone();
        let url = hubspot.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..3 {
                let response = client.get(&url).header("proxy-authorization", credentials).send().await.unwrap();
                out.push(response.status().as_u16());
            }
            out
        }
    };
    assert_eq!(as_user("Basic YWxpY2U6eA==").await, [200, 200, 429]);
    assert_eq!(as_user("Basic Ym9iOng=").await, [200, 200, 429], "bob has his own bucket");
    assert_eq!(as_user("Bearer s3cret-token").await, [200, 200, 429]);
    for request in mock.requests() {
        assert!(request.header("proxy-authorization").is_none(), "Proxy-Authorization stays in sluice");
    }
    let quotas = quotas_json(&sluice).await;
    let scopes: Vec<String> = quotas["upstreams"][0]["quotas"][0]["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap().to_owned())
        .collect();
    assert!(scopes.contains(&"alice".to_owned()) && scopes.contains(&"bob".to_owned()), "{scopes:?}");
    assert!(!scopes.iter().any(|s| s.contains("s3cret")), "a token never shows as a key: {scopes:?}");

    let zendesk = format!("{}/zendesk/api/v2/tickets", sluice.proxy_url());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(client.get(&zendesk).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429], "every loopback request is 127.0.0.1");
    let quotas = quotas_json(&sluice).await;
    assert_eq!(quotas["upstreams"][1]["quotas"][0]["scopes"][0]["scope"], "127.0.0.1", "{quotas}");
    sluice.shutdown().await;
}

#[tokio::test]
async fn scope_key_cap_counts_evictions() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&config(
        &mock,
        "    over_limit: reject
    quotas: [{ name: burst, limit: 5, per: 10s, burst: 5, key: [header:x-tenant-id], max_keys: 2 }]
",
    ))
    .await;
    let client = direct_client();
    let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
    for tenant in ["t1", "t2", "t3", "t4", "t5"] {
        assert_eq!(client.get(&url).header("x-tenant-id", tenant).send().await.unwrap().status(), 200);
    }
    let metrics = sluice.metrics().await;
    let evictions =
        metric_value(&metrics, "sluice_quota_scope_evictions_total", &[("upstream", "hubspot"), ("quota", "burst")]);
    assert_eq!(evictions, 3.0, "{metrics}");
    let quotas = quotas_json(&sluice).await;
    assert_eq!(quotas["upstreams"][0]["quotas"][0]["scopes"].as_array().unwrap().len(), 2, "{quotas}");
    sluice.shutdown().await;
}

/// A request sequence with scopes, a fixed window and route costs, played against `sluice`;
/// returns each answer's status and remaining tokens per quota.
async fn play(sluice: &TestSluice) -> Vec<(u16, i64, i64)> {
    let client = direct_client();
    let base = format!("{}/hubspot/crm/v3/objects", sluice.proxy_url());
    let mut out = Vec::new();
    for step in 0..40usize {
        let tenant = ["a", "b", "", "a", "c"][step % 5];
        let mut request = if step % 7 == 3 {
            client.post(format!("{base}/contacts/batch/create")).body("{}")
        } else {
            client.get(format!("{base}/contacts"))
        };
        if !tenant.is_empty() {
            request = request.header("x-tenant-id", tenant);
        }
        let response = request.send().await.unwrap();
        out.push((response.status().as_u16(), remaining(&response, "burst"), remaining(&response, "daily")));
    }
    out
}

fn parity_yaml(mock: &MockCrm, store: &str, max_keys: usize) -> String {
    format!(
        "{store}upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{}'
    over_limit: reject
    quotas:
      - {{ name: burst, limit: 10, per: 30s, burst: 4, key: [header:x-tenant-id], max_keys: {max_keys} }}
      - {{ name: daily, limit: 20, per: 1d, window: fixed, resets_at: '00:00 America/New_York' }}
    routes: [{{ match: 'POST /crm/v3/objects/*/batch/create', cost: 3 }}]
",
        mock.url()
    )
}

#[tokio::test]
async fn memory_store_decides_like_one_instance_on_redis() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let memory = TestSluice::start(&parity_yaml(&mock, "", 100)).await;
    let shared = TestSluice::start(&parity_yaml(
        &mock,
        &format!("store: {{ kind: redis, url: '{}', timeout: 1s }}\n", redis.url()),
        100,
    ))
    .await;

    // The simple case of the issue: 20 at once in reject mode against limit 10.
    let burst20 = |sluice: &TestSluice| {
        let url = format!("{}/hubspot/crm/v3/objects/contacts", sluice.proxy_url());
        async move {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        direct_client().get(&url).header("x-tenant-id", "burst20").send().await.unwrap().status()
                    })
                })
                .collect();
            let mut allowed = 0;
            for task in tasks {
                if task.await.unwrap() == 200 {
                    allowed += 1;
                }
            }
            allowed
        }
    };
    assert_eq!(burst20(&memory).await, 4, "memory: the burst allowance");
    assert_eq!(burst20(&shared).await, 4, "redis: the same");

    // A longer sequence with scopes, a missing scope, costs and a fixed daily window.
    let from_memory = play(&memory).await;
    let from_redis = play(&shared).await;
    assert_eq!(from_memory, from_redis, "memory store and Redis decide alike");
    assert!(from_memory.iter().any(|a| a.0 == 429) && from_memory.iter().any(|a| a.0 != 429));
    memory.shutdown().await;
    shared.shutdown().await;
}

#[tokio::test]
async fn memory_store_decides_like_redis_when_scope_values_are_evicted() {
    let redis = RedisServer::start();
    let mock = MockCrm::start().await;
    let memory = TestSluice::start(&parity_yaml(&mock, "", 2)).await;
    let shared = TestSluice::start(&parity_yaml(
        &mock,
        &format!("store: {{ kind: redis, url: '{}', timeout: 1s }}\n", redis.url()),
        2,
    ))
    .await;
    let from_memory = play(&memory).await;
    let from_redis = play(&shared).await;
    let allowed = |answers: &[(u16, i64, i64)]| answers.iter().filter(|a| a.0 != 429).count();
    assert_eq!(
        from_memory,
        from_redis,
        "with max_keys 2 and three tenants: memory allowed {}, redis {}",
        allowed(&from_memory),
        allowed(&from_redis)
    );
    memory.shutdown().await;
    shared.shutdown().await;
}
