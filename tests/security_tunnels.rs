#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security at the tunnel door, through real sockets: `limits.max_tunnels` refuses the tunnel
//! past the cap and frees a slot when one closes; a CONNECT to a malformed target is a 400;
//! garbage where an intercepted tunnel expects TLS closes it; and sluice refuses to start with
//! an interception CA key every user can read, naming the file.
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::run_sluice;
use support::raw_http::RawConn;
use support::security::{chmod, connect, get_through_tunnel, hostile_sluice, still_serves, write_file};
use support::{eventually, metric_value, MockCrm, TestSluice};

// === tunnel cap ===

#[tokio::test]
async fn tunnel_cap_refuses_the_third_tunnel() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "limits: {{ max_tunnels: 2 }}
upstreams:
  - {{ name: vendor, hosts: [vendor.example], target: '{mock}' }}
  - {{ name: hubspot, prefix: /hubspot, target: '{mock}' }}
",
        mock = mock.url()
    ))
    .await;
    let addr = sluice.running().proxy_addr;
    let (mut first, response) = connect(addr, "vendor.example:443", None).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let (mut second, response) = connect(addr, "vendor.example:443", None).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let (_third, response) = connect(addr, "vendor.example:443", None).await;
    let body = response.expect_synthetic(503, "too_many_tunnels", "");
    assert_eq!(body["upstream"], "vendor");
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sluice_connections_refused_total", &[("reason", "max_tunnels")]),
        1.0,
        "{metrics}"
    );
    // The open tunnels work, and ordinary requests are not tunnels.
    assert_eq!(get_through_tunnel(&mut first, "/one").await, 200);
    assert_eq!(get_through_tunnel(&mut second, "/two").await, 200);
    still_serves(&sluice, &mock).await;
    // Closing one frees its slot.
    drop(first);
    let reopened = eventually(Duration::from_secs(10), || async {
        let (_conn, response) = connect(addr, "vendor.example:443", None).await;
        response.status == 200
    })
    .await;
    assert!(reopened, "a closed tunnel's slot was not freed");
    drop(second);
    sluice.shutdown().await;
}

// === hostile CONNECT targets and TLS ===

#[tokio::test]
async fn connect_to_odd_targets_is_400() {
    let mock = MockCrm::start().await;
    let sluice = hostile_sluice(&mock).await;
    for target in [
        ":443",
        "[::1",
        "[::1]",
        "api.hubapi.com:99999",
        "api.hubapi.com:0",
        "api.hubapi.com:",
        "api.hubapi.com:-1",
        "api.hubapi.com:443:443",
        "user@api.hubapi.com:443",
        "user:pass@api.hubapi.com:443",
        "http://api.hubapi.com:443",
        "api.hubapi.com:443/path",
        "/api.hubapi.com:443",
        "*",
    ] {
        let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
        conn.send(format!("CONNECT {target} HTTP/1.1\r\nHost: api.hubapi.com:443\r\n\r\n").as_bytes()).await.unwrap();
        match conn.response("CONNECT").await {
            Ok(response) => assert_eq!(response.status, 400, "CONNECT {target} ->\n{}", response.head),
            Err(error) => panic!("no answer to CONNECT {target}: {error:?}"),
        }
    }
    assert_eq!(mock.request_count(), 0);
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_tunnels_open", &[]), 0.0, "{metrics}");
    still_serves(&sluice, &mock).await;
    sluice.shutdown().await;
}

#[tokio::test]
async fn tls_garbage_on_the_intercept_path_closes_the_connection() {
    let mock = MockCrm::start().await;
    let sluice = hostile_sluice(&mock).await;
    let addr = sluice.running().proxy_addr;
    let mut seed: u32 = 0xdead_beef;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (seed >> 16) as u8
            })
            .collect()
    };
    let mut inputs = vec![
        random(512),
        // A TLS record header announcing a handshake, then junk.
        [&b"\x16\x03\x01\x00\xff\x01\x00\x00\xfb\x03\x03"[..], &random(300)].concat(),
        // Plain HTTP where TLS is expected.
        b"GET / HTTP/1.1\r\nHost: api.hubapi.com\r\n\r\n".to_vec(),
        // A record far over the TLS maximum.
        b"\x16\x03\x03\xff\xff".to_vec(),
    ];
    inputs.push(random(64 * 1024));
    for (at, input) in inputs.iter().enumerate() {
        let (mut conn, response) = connect(addr, "api.hubapi.com:443", None).await;
        assert_eq!(response.status, 200, "{}", response.head);
        let _ = conn.send(input).await;
        assert!(conn.closed_within(Duration::from_secs(5)).await, "input {at}: the tunnel stayed open after garbage");
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric_value(&sluice.metrics().await, "sluice_tunnels_open", &[("kind", "intercept")]) == 0.0
        })
        .await
    );
    assert_eq!(mock.request_count(), 0);
    // Interception itself still works, and so does reverse mode.
    let response = sluice.proxied_client().get("https://api.hubapi.com/after-garbage").send().await.unwrap();
    assert_eq!(response.status(), 200);
    still_serves(&sluice, &mock).await;
    sluice.shutdown().await;
}

// === interception CA key permissions ===

fn intercept_config(dir: &Path) -> PathBuf {
    let config = dir.join("sluice.yaml");
    write_file(
        &config,
        &format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}
intercept: {{ ca_cert: {dir}/ca.crt, ca_key: {dir}/ca.key }}
upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], target: 'http://127.0.0.1:9', intercept: true }}
",
            dir = dir.display()
        ),
    );
    config
}

#[tokio::test]
async fn world_readable_ca_key_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    support::write_test_ca(dir.path());
    let key = dir.path().join("ca.key");
    let config = intercept_config(dir.path());
    let config_arg = config.to_str().unwrap();
    chmod(&key, 0o644);

    let check = run_sluice(&["check", "-c", config_arg], &[], dir.path(), Duration::from_secs(30));
    assert!(!check.success(), "check accepted a world-readable CA key: {check:?}");
    assert!(check.stderr.contains(key.to_str().unwrap()), "the key file is not named: {}", check.stderr);
    assert!(check.stderr.contains("intercept.ca_key"), "{}", check.stderr);
    let run = run_sluice(&["run", "-c", config_arg], &[], dir.path(), Duration::from_secs(30));
    assert!(!run.success(), "run started with a world-readable CA key: {run:?}");
    assert!(run.stderr.contains(key.to_str().unwrap()), "the key file is not named: {}", run.stderr);
    let error = sluice::app::start(&config).await.err().expect("start refuses").to_string();
    assert!(error.contains(key.to_str().unwrap()), "{error}");

    for mode in [0o600, 0o640, 0o400] {
        chmod(&key, mode);
        let check = run_sluice(&["check", "-c", config_arg], &[], dir.path(), Duration::from_secs(30));
        assert!(check.success(), "mode {mode:o} refused: {check:?}");
    }
    chmod(&key, 0o600);
    let running = sluice::app::start(&config).await.expect("0600 starts");
    assert!(running.shutdown_within(Duration::from_secs(5)).await);
}
