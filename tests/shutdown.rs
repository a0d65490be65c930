#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Graceful shutdown: stop accepting, let requests and tunnels in flight finish within the grace
//! period, then stop. In-process through `Running::shutdown_within`, and for the real binary
//! through SIGTERM / SIGINT.
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::process::SluiceProcess;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(15);

/// An upstream that holds every request until the test releases it: a request that is in flight
/// for exactly as long as the test wants, with no sleeps involved.
struct HeldUpstream {
    addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
}

impl HeldUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let counter = arrived.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = counter.clone();
                let mut released = released.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    if released.wait_for(|go| *go).await.is_err() {
                        return;
                    }
                    let response = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\nconnection: close\r\n\r\nheld";
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr, arrived, release }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    fn release(&self) {
        let _ = self.release.send(true);
    }
}

async fn connection_refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr).await, Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn slow_count(mock: &MockCrm, path: &str) -> usize {
    mock.requests().iter().filter(|request| request.path == path).count()
}

#[tokio::test]
async fn in_flight_requests_finish_and_new_connections_are_refused() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let proxy_addr = sluice.running().proxy_addr;
    let reverse = format!("{}/hubspot/slow/1000", sluice.proxy_url());
    let mut requests = Vec::new();
    for _ in 0..2 {
        requests.push(tokio::spawn(direct_client().get(&reverse).send()));
    }
    // One absolute-form request, as an HTTP_PROXY user sends it.
    requests.push(tokio::spawn(sluice.proxied_client().get("http://api.hubapi.com/slow/1000").send()));
    assert!(eventually(WAIT, || async { slow_count(&mock, "/slow/1000") == 3 }).await, "requests never arrived");

    let shutdown = tokio::spawn(sluice.shutdown());
    for request in requests {
        let response = request.await.unwrap().expect("an in-flight request is not cut");
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().await.unwrap()["slept_ms"], 1000);
    }
    assert!(shutdown.await.unwrap(), "everything drained within the grace period");
    assert!(connection_refused(proxy_addr).await, "the proxy port is closed after shutdown");
}

#[tokio::test]
async fn in_flight_http2_request_finishes() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let h2c = reqwest::Client::builder().no_proxy().http2_prior_knowledge().timeout(WAIT).build().unwrap();
    let request = tokio::spawn(h2c.get(format!("{}/hubspot/slow/1000", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { slow_count(&mock, "/slow/1000") == 1 }).await);

    let shutdown = tokio::spawn(sluice.shutdown());
    let response = request.await.unwrap().expect("the stream in flight finishes after GOAWAY");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert!(shutdown.await.unwrap());
}

#[tokio::test]
async fn draining_refuses_new_connections_but_keeps_the_admin_api_up() {
    let held = HeldUpstream::start().await;
    let sluice =
        TestSluice::start(&format!("upstreams:\n  - {{ name: held, prefix: /held, target: '{}' }}\n", held.url()))
            .await;
    let proxy_addr = sluice.running().proxy_addr;
    let admin_addr = sluice.running().admin_addr;
    let request = tokio::spawn(direct_client().get(format!("{}/held/x", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { held.arrived() == 1 }).await);

    let shutdown = tokio::spawn(sluice.shutdown());
    assert!(eventually(WAIT, || connection_refused(proxy_addr)).await, "new proxy connections still accepted");
    // While draining, probes and metrics still answer, and say what is going on.
    let readyz = direct_client().get(format!("http://{admin_addr}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    assert_eq!(readyz.json::<Value>().await.unwrap()["status"], "draining");
    let healthz = direct_client().get(format!("http://{admin_addr}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let metrics = direct_client().get(format!("http://{admin_addr}/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert_eq!(metric_value(&metrics, "sluice_requests_in_flight", &[]), 1.0, "{metrics}");
    assert!(!shutdown.is_finished(), "shutdown waits for the held request");

    held.release();
    let response = request.await.unwrap().expect("the held request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "held");
    assert!(shutdown.await.unwrap());
    assert!(connection_refused(admin_addr).await, "the admin API stops once draining is done");
}

#[tokio::test]
async fn shutdown_reports_a_grace_period_that_ran_out() {
    let held = HeldUpstream::start().await;
    let mut sluice =
        TestSluice::start(&format!("upstreams:\n  - {{ name: held, prefix: /held, target: '{}' }}\n", held.url()))
            .await;
    let request = tokio::spawn(direct_client().get(format!("{}/held/x", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { held.arrived() == 1 }).await);
    let running = sluice.running.take().unwrap();
    assert!(!running.shutdown_within(Duration::from_millis(300)).await, "a request still held is not drained");
    held.release();
    request.abort();
}

#[tokio::test]
async fn shutdown_uses_the_grace_period_of_the_current_config() {
    let held = HeldUpstream::start().await;
    let upstreams = format!("upstreams:\n  - {{ name: held, prefix: /held, target: '{}' }}\n", held.url());
    let mut sluice = TestSluice::start(&format!("shutdown_grace: 1h\n{upstreams}")).await;
    sluice.write_config(&format!("shutdown_grace: 300ms\n{upstreams}"));
    let reload = direct_client().post(sluice.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    let request = tokio::spawn(direct_client().get(format!("{}/held/x", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { held.arrived() == 1 }).await);

    let running = sluice.running.take().unwrap();
    let drained = tokio::time::timeout(WAIT, running.shutdown()).await;
    assert_eq!(drained.ok(), Some(false), "the reloaded 300ms grace applies, not the 1h one sluice started with");
    held.release();
    request.abort();
}

#[tokio::test]
async fn blind_tunnel_in_flight_finishes_its_exchange() {
    let vendor = MockCrm::start_tls(&["blind.example.com"]).await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: blind, hosts: [blind.example.com], target: '{}' }}\n",
        vendor.https_url()
    ))
    .await;
    let proxy_addr = sluice.running().proxy_addr;
    // No idle pool: the client closes the tunnel once its response is read.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(vendor.ca_pem.as_ref().unwrap().as_bytes()).unwrap())
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .unwrap();
    let request = tokio::spawn(client.get("https://blind.example.com/slow/1000").send());
    assert!(eventually(WAIT, || async { slow_count(&vendor, "/slow/1000") == 1 }).await);
    let tunnels = sluice.metrics().await;
    assert_eq!(metric_value(&tunnels, "sluice_tunnels_open", &[("kind", "blind")]), 1.0, "{tunnels}");

    let shutdown = tokio::spawn(sluice.shutdown());
    let response = request.await.unwrap().expect("the tunnelled request is not cut");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["slept_ms"], 1000);
    drop(client);
    assert!(shutdown.await.unwrap(), "the tunnel closed by its client lets the drain finish");
    assert!(connection_refused(proxy_addr).await);
}

#[tokio::test]
async fn intercepted_tunnel_in_flight_finishes_its_exchange() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}\nupstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}', intercept: true }}\n",
        mock.url()
    ))
    .await;
    // A pooling client: sluice itself must close the connection inside the tunnel when it drains.
    let client = sluice.proxied_client();
    let request = tokio::spawn(client.get("https://api.hubapi.com/slow/1000").send());
    assert!(eventually(WAIT, || async { slow_count(&mock, "/slow/1000") == 1 }).await);
    let tunnels = sluice.metrics().await;
    assert_eq!(metric_value(&tunnels, "sluice_tunnels_open", &[("kind", "intercept")]), 1.0, "{tunnels}");

    let shutdown = tokio::spawn(sluice.shutdown());
    let response = request.await.unwrap().expect("the intercepted request is not cut");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["slept_ms"], 1000);
    assert!(shutdown.await.unwrap(), "the intercepted connection drains without the client closing it");
    drop(client);
}

#[tokio::test]
async fn idle_connections_do_not_hold_up_shutdown() {
    let mock = MockCrm::start().await;
    let mut sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: '{}' }}\n",
        mock.url()
    ))
    .await;
    let proxy_addr = sluice.running().proxy_addr;
    // A kept-alive HTTP/1.1 connection with no request on it, an HTTP/2 one, and a TCP
    // connection that never sent a byte: none of them is work in flight.
    let h1 = direct_client();
    assert_eq!(h1.get(format!("{}/hubspot/a", sluice.proxy_url())).send().await.unwrap().status(), 200);
    let h2c = reqwest::Client::builder().no_proxy().http2_prior_knowledge().timeout(WAIT).build().unwrap();
    assert_eq!(h2c.get(format!("{}/hubspot/b", sluice.proxy_url())).send().await.unwrap().status(), 200);
    let silent = TcpStream::connect(proxy_addr).await.unwrap();
    let open =
        eventually(WAIT, || async { metric_value(&sluice.metrics().await, "sluice_connections_open", &[]) >= 3.0 })
            .await;
    assert!(open, "{}", sluice.metrics().await);

    let running = sluice.running.take().unwrap();
    assert!(running.shutdown_within(Duration::from_secs(5)).await, "idle connections are closed, not waited for");
    drop((h1, h2c, silent));
}

// === the real binary ===

fn write_config(dir: &std::path::Path, grace: &str, upstreams: &str) -> std::path::PathBuf {
    let path = dir.join("sluice.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nshutdown_grace: {grace}\nupstreams:\n{upstreams}"
        ),
    )
    .unwrap();
    path
}

async fn wait_ready(process: &mut SluiceProcess) -> (SocketAddr, SocketAddr) {
    let (proxy, admin) = process.addresses(WAIT).await;
    let client = direct_client();
    let ready = eventually(WAIT, || async {
        client.get(format!("http://{admin}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "never ready; stderr:\n{}", process.stderr_text());
    (proxy, admin)
}

#[tokio::test]
async fn binary_exits_zero_on_sigterm() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "5s",
        &format!("  - {{ name: hubspot, prefix: /hubspot, target: '{}' }}\n", mock.url()),
    );
    let mut process = SluiceProcess::run(&path, &[]);
    let (proxy, _) = wait_ready(&mut process).await;
    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}; stderr:\n{}", process.stderr_text());
    assert!(process.stderr_text().contains("SIGTERM received"), "{}", process.stderr_text());
    assert!(connection_refused(proxy).await);
}

#[tokio::test]
async fn binary_exits_zero_on_sigint() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "5s",
        &format!("  - {{ name: hubspot, prefix: /hubspot, target: '{}' }}\n", mock.url()),
    );
    let mut process = SluiceProcess::run(&path, &[]);
    wait_ready(&mut process).await;
    process.signal("INT");
    let status = process.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}; stderr:\n{}", process.stderr_text());
}

#[tokio::test]
async fn binary_drains_a_request_in_flight_on_sigterm() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "10s",
        &format!("  - {{ name: hubspot, prefix: /hubspot, target: '{}' }}\n", mock.url()),
    );
    let mut process = SluiceProcess::run(&path, &[]);
    let (proxy, _) = wait_ready(&mut process).await;
    let request = tokio::spawn(direct_client().get(format!("http://{proxy}/hubspot/slow/1000")).send());
    assert!(eventually(WAIT, || async { slow_count(&mock, "/slow/1000") == 1 }).await);

    process.signal("TERM");
    let response = request.await.unwrap().expect("the in-flight request survives SIGTERM");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["slept_ms"], 1000);
    let status = process.wait_exit(Duration::from_secs(25)).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}; stderr:\n{}", process.stderr_text());
    assert!(process.stderr_text().contains("Drained"), "{}", process.stderr_text());
}

#[tokio::test]
async fn binary_exits_zero_when_the_grace_period_runs_out() {
    let held = HeldUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path =
        write_config(dir.path(), "500ms", &format!("  - {{ name: held, prefix: /held, target: '{}' }}\n", held.url()));
    let mut process = SluiceProcess::run(&path, &[]);
    let (proxy, _) = wait_ready(&mut process).await;
    let request = tokio::spawn(direct_client().get(format!("http://{proxy}/held/x")).send());
    assert!(eventually(WAIT, || async { held.arrived() == 1 }).await);

    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}; stderr:\n{}", process.stderr_text());
    assert!(process.stderr_text().contains("Grace period over"), "{}", process.stderr_text());
    // The held request was cut when the process exited.
    assert!(request.await.unwrap().is_err());
    held.release();
}
