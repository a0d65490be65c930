#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Connection and slot limits that one client cannot push onto others (security review M7, M8,
//! M9), through real sockets and a real HTTP/2 client (the `h2` crate, which answers PINGs
//! like a live peer would):
//!
//! - an HTTP/2 connection with no stream open gets GOAWAY after `limits.http2_idle_timeout`,
//!   and after only `header_read_timeout` when nothing on it got past authentication (407);
//! - every connection is closed at `limits.max_connection_age`, however busy;
//! - a client holds at most `limits.max_tunnels_per_client` tunnels; others still get theirs;
//! - a response its client stops reading gives its `max_concurrency` slot back after
//!   `limits.response_idle_timeout`, so other clients are served;
//! - the admin listener closes connections past `admin.max_connections` at once, and those
//!   that send nothing within `admin.header_read_timeout`;
//! - `/quotas` shows scope values hashed unless the admin token is given.
//!
//! No latency is asserted: every bound is generous and only says "did not stay open forever".
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use support::raw_http::RawConn;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

/// An HTTP/2 (prior knowledge) connection driven in the background; resolves when it closes.
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    closed: tokio::task::JoinHandle<()>,
}

impl H2 {
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let closed = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self { send, closed }
    }

    /// Sends `GET path` and reads the whole answer; `None` once the server refuses new streams.
    async fn get(&mut self, path: &str, auth: Option<&str>) -> Option<u16> {
        let mut builder = http::Request::builder().method("GET").uri(format!("http://sluice{path}"));
        if let Some(auth) = auth {
            builder = builder.header("proxy-authorization", auth);
        }
        let send = self.send.clone().ready().await.ok()?;
        let mut send = send;
        let (response, _) = send.send_request(builder.body(()).unwrap(), true).ok()?;
        let response = tokio::time::timeout(WAIT, response).await.ok()?.ok()?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.ok()? {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        Some(status)
    }

    /// Whether the server closed the connection within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.closed).await.is_ok()
    }
}

fn reverse(mock: &MockCrm, limits: &str) -> String {
    format!(
        "limits: {{ {limits} }}
upstreams:
  - {{ name: hubspot, prefix: /hubspot, target: '{mock}' }}
",
        mock = mock.url()
    )
}

async fn connections_open(sluice: &TestSluice) -> f64 {
    metric_value(&sluice.metrics().await, "sluice_connections_open", &[])
}

// === M7: HTTP/2 idle and age ===

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&mock, "http2_idle_timeout: 1s")).await;
    let mut h2 = H2::connect(sluice.running().proxy_addr).await;
    assert_eq!(h2.get("/hubspot/crm/one", None).await, Some(200));
    // The client answers PINGs but sends nothing else.
    assert!(h2.closed_within(WAIT).await, "an idle HTTP/2 connection stays open forever");
    assert!(eventually(WAIT, || async { connections_open(&sluice).await == 0.0 }).await);
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_connections_closed_total", &[("reason", "http2_idle")]), 1.0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_busy_http2_connection_is_not_idle() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&mock, "http2_idle_timeout: 1s")).await;
    let mut h2 = H2::connect(sluice.running().proxy_addr).await;
    // One request at a time, each shorter than the idle timeout apart; a 1.5 s vendor answer
    // in the middle is an open stream, not idleness.
    for path in ["/hubspot/a", "/hubspot/slow/1500", "/hubspot/b", "/hubspot/c"] {
        assert_eq!(h2.get(path, None).await, Some(200), "{path}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(h2.closed_within(WAIT).await, "and closes once it is idle");
    sluice.shutdown().await;
}

#[tokio::test]
async fn an_unauthenticated_http2_connection_gets_no_idle_time() {
    let mock = MockCrm::start().await;
    let yaml = format!(
        "limits: {{ header_read_timeout: 1s, http2_idle_timeout: 1h }}
clients:
  - {{ name: app, secret_sha256: '{hash}', upstreams: ['*'] }}
upstreams:
  - {{ name: hubspot, prefix: /hubspot, target: '{mock}' }}
",
        hash = "0".repeat(64),
        mock = mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let mut h2 = H2::connect(sluice.running().proxy_addr).await;
    assert_eq!(h2.get("/hubspot/crm/x", None).await, Some(407));
    assert!(h2.closed_within(WAIT).await, "after a 407 the connection gets header_read_timeout, not an hour");
    sluice.shutdown().await;
}

#[tokio::test]
async fn connections_are_closed_at_their_maximum_age() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&mock, "max_connection_age: 2s, http2_idle_timeout: 1h")).await;
    let mut h2 = H2::connect(sluice.running().proxy_addr).await;
    let mut answered = 0;
    for _ in 0..100 {
        match h2.get("/hubspot/busy", None).await {
            Some(200) => answered += 1,
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 1);
    assert!(h2.closed_within(WAIT).await, "a busy connection still ends at its maximum age");
    // HTTP/1 keep-alive too: the first answer after the age closes the connection.
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(b"GET /hubspot/one HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(conn.response("GET").await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(conn.closed_within(WAIT).await, "an idle HTTP/1 keep-alive past its age is closed");
    let metrics = sluice.metrics().await;
    assert!(metric_value(&metrics, "sluice_connections_closed_total", &[("reason", "max_age")]) >= 2.0, "{metrics}");
    sluice.shutdown().await;
}

// === M7: tunnel shares ===

async fn connect_tunnel(addr: SocketAddr, auth: &str) -> (RawConn, u16, serde_json::Value) {
    let mut conn = RawConn::connect(addr).await;
    let request = format!(
        "CONNECT vendor.example:443 HTTP/1.1\r\nHost: vendor.example:443\r\nProxy-Authorization: {auth}\r\n\r\n"
    );
    conn.send(request.as_bytes()).await.unwrap();
    let response = conn.response("CONNECT").await.unwrap();
    let body = response.json();
    (conn, response.status, body)
}

fn basic(user: &str, password: &str) -> String {
    use std::io::Write;
    let mut raw = Vec::new();
    write!(raw, "{user}:{password}").unwrap();
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn one_client_cannot_take_every_tunnel() {
    let mock = MockCrm::start().await;
    let yaml = format!(
        "limits: {{ max_tunnels: 4, max_tunnels_per_client: 2 }}
clients:
  - {{ name: greedy, secret_sha256: '{a}', upstreams: ['*'] }}
  - {{ name: polite, secret_sha256: '{b}', upstreams: ['*'] }}
upstreams:
  - {{ name: vendor, hosts: [vendor.example], target: '{mock}' }}
",
        a = sha256_hex("pw-greedy"),
        b = sha256_hex("pw-polite"),
        mock = mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let addr = sluice.running().proxy_addr;
    let greedy = basic("greedy", "pw-greedy");
    let (_one, status, _) = connect_tunnel(addr, &greedy).await;
    assert_eq!(status, 200);
    let (_two, status, _) = connect_tunnel(addr, &greedy).await;
    assert_eq!(status, 200);
    let (_three, status, body) = connect_tunnel(addr, &greedy).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("too_many_tunnels")), "{body}");
    // Another client still gets its tunnels: the greedy one did not take the global slots.
    let polite = basic("polite", "pw-polite");
    let (_four, status, _) = connect_tunnel(addr, &polite).await;
    assert_eq!(status, 200, "another client is not refused");
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_connections_refused_total", &[("reason", "tunnels_per_client")]), 1.0);
    sluice.shutdown().await;
}

// === M8: a client that stops reading ===

#[tokio::test]
async fn a_response_nobody_reads_gives_its_slot_back() {
    let mock = MockCrm::start().await;
    let big = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
    mock.set_handler(move |recorded| {
        if recorded.path.starts_with("/big") {
            http::Response::new(http_body_util::Full::new(big.clone()))
        } else {
            support::mock_crm::json(http::StatusCode::OK, serde_json::json!({"ok": true}))
        }
    });
    let yaml = format!(
        "limits: {{ response_idle_timeout: 1s }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{mock}'
    max_concurrency: 2
    max_queue_wait: 10s
",
        mock = mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let addr = sluice.running().proxy_addr;
    // Two clients ask for 8 MiB each and never read a byte.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let mut conn = RawConn::connect(addr).await;
        conn.send(b"GET /hubspot/big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        stuck.push(conn);
    }
    assert!(eventually(WAIT, || async { mock.requests().iter().filter(|r| r.path == "/big").count() == 2 }).await);
    // A third client is served: the stuck responses gave their slots back.
    let third = direct_client().get(format!("{}/hubspot/small", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(third.status(), 200, "{third:?}");
    let both = eventually(WAIT, || async {
        let metrics = sluice.metrics().await;
        metric_value(&metrics, "sluice_responses_abandoned_total", &[("upstream", "hubspot")]) == 2.0
    })
    .await;
    assert!(both, "both unread responses are abandoned: {}", sluice.metrics().await);
    // The abandoned HTTP/1 connections are closed, not left holding their places.
    for mut conn in stuck {
        assert!(conn.closed_within(WAIT).await, "an abandoned connection is closed");
    }
    assert!(eventually(WAIT, || async { connections_open(&sluice).await == 0.0 }).await);
    sluice.shutdown().await;
}

#[tokio::test]
async fn a_slot_is_free_once_the_vendor_has_sent_everything() {
    let mock = MockCrm::start().await;
    let yaml = format!(
        "upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{mock}'
    max_concurrency: 1
    max_queue_wait: 0s
",
        mock = mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    // A small answer, read only later: its last byte is handed on at once, so the slot is free.
    let mut lazy = RawConn::connect(sluice.running().proxy_addr).await;
    lazy.send(b"GET /hubspot/first HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(eventually(WAIT, || async { mock.requests().iter().any(|r| r.path == "/first") }).await);
    let next = eventually(WAIT, || async {
        let response = direct_client().get(format!("{}/hubspot/second", sluice.proxy_url())).send().await.unwrap();
        response.status() == 200
    })
    .await;
    assert!(next, "the slot of a fully received answer is free before its client reads it");
    assert_eq!(lazy.response("GET").await.unwrap().status, 200);
    sluice.shutdown().await;
}

// === M9: the admin listener ===

#[tokio::test]
async fn the_admin_listener_caps_connections_and_closes_silent_ones() {
    let mock = MockCrm::start().await;
    let yaml = format!(
        "admin: {{ max_connections: 4, header_read_timeout: 1s }}
upstreams:
  - {{ name: hubspot, prefix: /hubspot, target: '{mock}' }}
",
        mock = mock.url()
    );
    let sluice = TestSluice::start(&yaml).await;
    let admin = sluice.running().admin_addr;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(RawConn::connect(admin).await);
    }
    // Past the cap: closed at once, not left in the backlog.
    let mut over = RawConn::connect(admin).await;
    assert!(over.closed_within(WAIT).await, "a connection past admin.max_connections is closed");
    // Silent connections are closed after the first-byte deadline.
    for conn in &mut silent {
        assert!(conn.closed_within(WAIT).await, "a silent admin connection stays open");
    }
    // Then the admin listener serves again.
    let health = direct_client().get(sluice.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = sluice.metrics().await;
    assert!(metric_value(&metrics, "sluice_connections_refused_total", &[("reason", "admin_max_connections")]) >= 1.0);
    sluice.shutdown().await;
}

#[tokio::test]
async fn quotas_show_scope_values_hashed_without_the_admin_token() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "admin-t0ken\n").unwrap();
    let yaml = format!(
        "admin: {{ token_file: $DIR/admin.token }}
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: '{mock}'
    quotas: [{{ name: per-key, limit: 100, per: 10s, key: ['header:x-api-key'] }}]
",
        mock = mock.url()
    );
    let sluice = TestSluice::start_in(dir, &yaml).await;
    let sent = direct_client()
        .get(format!("{}/hubspot/crm/v3/objects", sluice.proxy_url()))
        .header("x-api-key", "pat-na1-abc")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let open = direct_client().get(sluice.admin_url("/quotas")).send().await.unwrap().text().await.unwrap();
    assert!(!open.contains("pat-na1-abc"), "/quotas shows a token without the admin token: {open}");
    let open: serde_json::Value = serde_json::from_str(&open).unwrap();
    let scope = open["upstreams"][0]["quotas"][0]["scopes"][0]["scope"].as_str().unwrap().to_owned();
    assert!(scope.starts_with("h-"), "{open}");
    let wrong = direct_client().get(sluice.admin_url("/quotas")).bearer_auth("nope").send().await.unwrap();
    assert!(!wrong.text().await.unwrap().contains("pat-na1-abc"));
    let with_token: serde_json::Value = direct_client()
        .get(sluice.admin_url("/quotas"))
        .bearer_auth("admin-t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(with_token["upstreams"][0]["quotas"][0]["scopes"][0]["scope"], "pat-na1-abc");
    sluice.shutdown().await;
}

// === the new keys are checked ===

#[test]
fn bad_limit_values_are_named_with_key_and_line() {
    let yaml = "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
limits:
  max_tunnels: 8
  max_tunnels_per_client: 9
  body_read_timeout: 0s
  response_idle_timeout: 0s
  http2_idle_timeout: 0s
  max_connection_age: 0s
admin:
  max_connections: 0
upstreams:
  - name: wild
    hosts: ['*.example.com']
    breaker: { max_hosts: 0 }
";
    let error = sluice::config::Config::from_yaml(yaml).unwrap_err().to_string();
    for expected in [
        "limits.max_tunnels_per_client (line 4)",
        "limits.body_read_timeout (line 5)",
        "limits.response_idle_timeout (line 6)",
        "limits.http2_idle_timeout (line 7)",
        "limits.max_connection_age (line 8)",
        "admin.max_connections (line 10)",
        "upstreams[0].breaker.max_hosts (line 14)",
    ] {
        assert!(error.contains(expected), "{expected} in:\n{error}");
    }
}
