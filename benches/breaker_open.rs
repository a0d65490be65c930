#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Latency of a short-circuited request: sluice in-process, its only upstream pointing at a closed
//! port with the breaker tripped, so every request is answered 503 `circuit_open` by sluice.
//! A hyper HTTP/1.1 client sends over keep-alive, first on one connection, then on 16 at once,
//! and prints p50 / p99 / p99.9 / max and requests per second.
//!
//! `cargo bench --bench breaker_open` runs 20,000 requests per scenario (after a warm-up). Run
//! without `--bench` (as `cargo test --all-targets` does) it only sends a few requests and exits.
//! With `SLUICE_LOG` set, sluice's logging is installed too (e.g. `SLUICE_LOG=info`, stderr
//! redirected), to see what per-request log lines cost; by default nothing is logged.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

const FULL_REQUESTS: usize = 20_000;
const SMOKE_REQUESTS: usize = 50;
const CONNECTIONS: usize = 16;

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    if std::env::var_os("SLUICE_LOG").is_some() {
        sluice::telemetry::init_logging();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(run(full));
}

async fn run(full: bool) {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = format!(
        "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: 'http://127.0.0.1:{closed}'
    breaker: {{ consecutive_failures: 1, min_requests: 100, open_for: 1h, max_open_for: 1h }}
"
    );
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    let running = sluice::app::start(&path).await.expect("sluice starts");
    let addr = running.proxy_addr;

    // Trip the breaker: the one call to the closed port fails and opens it.
    let mut connection = Connection::open(addr).await;
    let status = connection.get().await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "the first call meets the closed port");
    assert_eq!(connection.get().await, StatusCode::SERVICE_UNAVAILABLE, "the breaker is open");

    let requests = if full { FULL_REQUESTS } else { SMOKE_REQUESTS };
    if full {
        // Warm-up: allocator, metric label lookups, branch predictors.
        for _ in 0..2_000 {
            connection.get().await;
        }
    }

    let started = Instant::now();
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let sent = Instant::now();
        let status = connection.get().await;
        latencies.push(sent.elapsed());
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    report("1 connection", &mut latencies, started.elapsed());

    let started = Instant::now();
    let per_connection = requests.div_ceil(CONNECTIONS);
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            tokio::spawn(async move {
                let mut connection = Connection::open(addr).await;
                let mut latencies = Vec::with_capacity(per_connection);
                for _ in 0..per_connection {
                    let sent = Instant::now();
                    let status = connection.get().await;
                    latencies.push(sent.elapsed());
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(per_connection * CONNECTIONS);
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    report(&format!("{CONNECTIONS} connections"), &mut latencies, started.elapsed());

    let metrics = String::from_utf8_lossy(&running.shared.metrics.render()).into_owned();
    let short_circuited = metrics
        .lines()
        .find(|line| line.starts_with("sluice_breaker_short_circuited_total{"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!("short-circuited by sluice (metric): {short_circuited}");
    drop(connection);
    running.shutdown_within(Duration::from_secs(5)).await;
}

/// One keep-alive HTTP/1.1 connection to sluice's proxy listener.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: String,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Self { sender, host: addr.to_string() }
    }

    /// One GET through the open breaker; reads the whole answer so the connection is reused.
    async fn get(&mut self) -> StatusCode {
        self.sender.ready().await.unwrap();
        let request = Request::get("/hubspot/crm/v3/objects/contacts")
            .header(http::header::HOST, &self.host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    }
}

fn report(scenario: &str, latencies: &mut [Duration], wall: Duration) {
    latencies.sort_unstable();
    let at = |quantile: f64| {
        let rank = ((quantile * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1]
    };
    let micros = |duration: Duration| duration.as_secs_f64() * 1e6;
    println!(
        "breaker_open, {scenario}: {} requests, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us, {:.0} requests/s",
        latencies.len(),
        micros(at(0.50)),
        micros(at(0.99)),
        micros(at(0.999)),
        micros(latencies[latencies.len() - 1]),
        latencies.len() as f64 / wall.as_secs_f64(),
    );
}
