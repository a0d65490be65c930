#![allow(clippy::unwrap_used, clippy::expect_used)]
//! No `panic` in sluice's log, whatever clients and vendors send: the sluice binary runs as a
//! process, goes through hostile inputs (the headers that panicked it before, malformed,
//! oversized and pipelined heads, body bytes that look like heads, h2 and TLS garbage, broken
//! vendors with absurd `Retry-After`s), must answer or close each, and its whole log must not
//! mention a panic. It must also still serve afterwards and exit 0 on SIGTERM.
//!
//! Which binary: by default the one cargo built for these tests (`CARGO_BIN_EXE_sluice`, the
//! debug profile). For panics it is the stricter of the two: the same code, plus overflow
//! checks and `debug_assert!`s that the release profile compiles out, and both unwind. With
//! `SLUICE_HOSTILE_BINARY=release` the test runs `cargo build --release --bin sluice` first
//! (a no-op when the release binary is fresh; cargo decides) and runs that one instead; any
//! other value is taken as the path of a binary to run.
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::process::{SluiceProcess, SLUICE_BIN};
use support::raw_http::{RawConn, RawError};
use support::streaming::{Door, DoorClient, Plan, Proto, StreamingVendor};
use support::MockCrm;

/// The binary under test (see the module doc).
fn binary() -> PathBuf {
    match std::env::var("SLUICE_HOSTILE_BINARY").as_deref() {
        Ok("release") => build_release(),
        Ok(path) if !path.is_empty() && path != "debug" => PathBuf::from(path),
        _ => PathBuf::from(SLUICE_BIN),
    }
}

/// `cargo build --release --bin sluice` in this crate, into the same target directory as the
/// test build (`CARGO_TARGET_DIR` is inherited); returns the release binary's path.
fn build_release() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--bin", "sluice"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --release failed");
    let debug = Path::new(SLUICE_BIN);
    let target = debug.parent().and_then(Path::parent).expect("target dir");
    target.join("release").join("sluice")
}

/// A vendor that breaks HTTP: garbage heads, short bodies, absurd `Retry-After`s, by path.
async fn broken_vendor() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..10_000 {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
                        Ok(Ok(1)) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let answer: &[u8] = if text.contains("/garbage") {
                    b"SPDY/9 ??? nonsense\r\n\r\n"
                } else if text.contains("/short") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a little"
                } else if text.contains("/retry-after") {
                    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 99999999999999999999\r\ncontent-length: 0\r\n\r\n"
                } else if text.contains("/retry-date") {
                    b"HTTP/1.1 429 Too Many Requests\r\nretry-after: Fri, 31 Dec 9999 23:59:59 GMT\r\ncontent-length: 0\r\n\r\n"
                } else if text.contains("/bad-chunks") {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnope\r\n"
                } else if text.contains("/huge-head") {
                    b"HTTP/1.1 200 OK\r\nx-big: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 200 OK\r\nratelimit: \"q\";r=-99999999999999999999;t=18446744073709551616\r\nx-ratelimit-remaining: -1e308\r\nx-ratelimit-reset: 99999999999999999999999\r\ncontent-length: 2\r\n\r\nok"
                };
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `bytes` on a fresh connection and reads one answer or the close, whichever comes.
async fn poke(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<u16, String> {
    let mut conn = RawConn::connect(addr).await;
    let _ = conn.send(bytes).await;
    match conn.response("GET").await {
        Ok(response) => Ok(response.status),
        Err(RawError::Closed { .. }) => Ok(0),
        Err(error) => Err(format!("{:?}: {error:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)]))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_panic_in_the_log_whatever_arrives() {
    let binary = binary();
    let mock = MockCrm::start().await;
    let files = StreamingVendor::start().await;
    let broken = broken_vendor().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}
intercept: {{ ca_cert: {dir}/ca.crt, ca_key: {dir}/ca.key }}
limits: {{ max_header_bytes: 8192, header_read_timeout: 1s }}
upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{mock}', intercept: true, retry: {{}} }}
  - {{ name: files, hosts: [files.test], prefix: /files, target: '{files}', intercept: true }}
  - name: broken
    hosts: [broken.test]
    prefix: /broken
    target: 'http://{broken}'
    retry: {{ attempts: 3, backoff: 10ms, max_backoff: 50ms }}
    timeouts: {{ request: 3s }}
    limit_headers: ietf
    over_limit: queue
    max_queue_wait: 1s
    quotas: [{{ name: q, limit: 1000, per: 1s }}]
",
            dir = dir.path().display(),
            mock = mock.url(),
            files = files.url(),
        ),
    )
    .unwrap();
    let mut sluice = SluiceProcess::spawn_binary(
        &binary,
        &["run", "-c", config.to_str().unwrap()],
        &[("SLUICE_LOG", "info")],
        dir.path(),
    );
    let (proxy, _admin) = sluice.addresses(Duration::from_secs(30)).await;
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let mut failures: Vec<String> = Vec::new();

    // 1. The caller controls that panicked the connection task (M2), through every door.
    let controls = [
        ("Sluice-Deadline", "18446744073709551615s"),
        ("Sluice-Deadline", "1e308"),
        ("Sluice-Max-Wait", "1e20"),
        ("Sluice-Max-Wait", "1e308"),
        ("Sluice-Max-Wait", "18446744073709551615s"),
        ("Sluice-Deadline", "-1"),
        ("Sluice-Max-Wait", "NaN"),
        ("Sluice-Batch", "perhaps"),
    ];
    for door in [Door::Reverse, Door::Absolute, Door::Intercept] {
        for proto in [Proto::Http1, Proto::Http2] {
            let client = DoorClient::connect(proxy, door, proto, "api.hubapi.com", "/hubspot", &ca).await;
            let mut client = match client {
                Ok(client) => client,
                Err(error) => {
                    failures.push(format!("{door:?}/{proto:?}: {error}"));
                    continue;
                }
            };
            for (header, value) in controls {
                let answer = client
                    .request("GET", "controls", "/crm/v3/objects/contacts", &Plan::default(), &[(header, value)])
                    .await;
                match answer {
                    Ok(answer) if answer.status == 200 || answer.status == 400 => {}
                    Ok(answer) => failures.push(format!("{door:?}/{proto:?} {header}: {value}: {}", answer.status)),
                    Err(error) => failures.push(format!("{door:?}/{proto:?} {header}: {value}: {error}")),
                }
            }
        }
    }

    // 2. Body bytes that look like heads and frames, in writes of their own (M1), every door.
    let hostile_body = Plan {
        pieces: vec![
            (Duration::ZERO, Bytes::from_static(b"hello")),
            (Duration::from_millis(40), Bytes::from_static(b"HTTP/1.1 500 X\r\n\r\nAAAAAAAAAAAAAAAAAAAAAAAA")),
            (
                Duration::from_millis(40),
                Bytes::from_static(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n"),
            ),
            (Duration::from_millis(40), Bytes::from_static(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")),
        ],
        content_length: true,
    };
    for door in [Door::Reverse, Door::Absolute, Door::Intercept] {
        for proto in [Proto::Http1, Proto::Http2] {
            for content_length in [true, false] {
                let case = format!("heads-{door:?}-{proto:?}-{content_length}");
                let plan = Plan { content_length, ..hostile_body.clone() };
                files.plan(&case, plan.clone());
                let result = async {
                    let mut client = DoorClient::connect(proxy, door, proto, "files.test", "/files", &ca).await?;
                    let answer = client.send(&case, "/download", &plan).await?;
                    let next = client.send(&format!("{case}-next"), "/ping", &Plan::default()).await?;
                    Ok::<_, String>((answer, next))
                }
                .await;
                match result {
                    Ok((answer, next)) if answer.body == plan.bytes() && next.body == b"pong" => {}
                    Ok((answer, _)) => {
                        failures.push(format!("{case}: body changed: {:?}", String::from_utf8_lossy(&answer.body)))
                    }
                    Err(error) => failures.push(format!("{case}: {error}")),
                }
            }
        }
    }

    // 3. Malformed, oversized, pipelined and truncated heads, and CONNECT garbage.
    let mut big = b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let mut long_uri = b"GET /hubspot/".to_vec();
    long_uri.extend(std::iter::repeat_n(b'u', 70 * 1024));
    long_uri.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut many = b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let heads: Vec<Vec<u8>> = vec![
        b"G(T /hubspot/x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1 trailing\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\nNo Colon Here\r\n\r\n".to_vec(),
        b"GET /hubspot/\x01x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n".to_vec(),
        b"POST /hubspot/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
        b"POST /hubspot/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
        b"POST /hubspot/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n".to_vec(),
        b"POST /hubspot/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n b\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\nHost: x\n\n".to_vec(),
        b"GET /hubspot/x HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET http://api.hubapi.com:99999/x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\n\r\nG(T / HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /hubspot/x HTTP/1.1\r\nHost: x\r\nSluice-Deadline: 18446744073709551615s\r\n\r\nGET /hubspot/y HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x06\x04\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\x00\x00\x01\x01\x05\x00\x00\x00\x01\xff".to_vec(),
        b"PRI * HTTP/2.0\r\n".to_vec(),
        b"CONNECT nohost HTTP/1.1\r\nHost: nohost\r\n\r\n".to_vec(),
        b"CONNECT api.hubapi.com:0 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"CONNECT user@api.hubapi.com:443 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"CONNECT api.hubapi.com:443 HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01\x00\x05garbage-not-tls".to_vec(),
        big,
        long_uri,
        many,
        Vec::new(),
    ];
    for head in &heads {
        if let Err(error) = poke(proxy, head).await {
            failures.push(error);
        }
    }
    // A parse error after a good answer on the same keep-alive connection.
    let mut conn = RawConn::connect(proxy).await;
    conn.send(b"GET /hubspot/ok HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    match conn.response("GET").await {
        Ok(response) if response.status == 200 => {
            let _ = conn.send(b"G(T / HTTP/1.1\r\n\r\n").await;
            match conn.response("GET").await {
                Ok(response) if response.status == 400 && response.header("proxy-status").is_some() => {}
                other => failures.push(format!("keep-alive parse error: {other:?}")),
            }
        }
        other => failures.push(format!("keep-alive first answer: {other:?}")),
    }

    // 4. Vendors that break HTTP or send absurd numbers.
    for path in ["/garbage", "/short", "/retry-after", "/retry-date", "/bad-chunks", "/huge-head", "/numbers"] {
        let request = format!("GET /broken{path} HTTP/1.1\r\nHost: x\r\nSluice-Max-Wait: 1e308\r\n\r\n");
        if let Err(error) = poke(proxy, request.as_bytes()).await {
            failures.push(error);
        }
    }

    // Still serving after all that.
    let mut client =
        DoorClient::connect(proxy, Door::Reverse, Proto::Http1, "api.hubapi.com", "/hubspot", &ca).await.unwrap();
    let answer = client.request("GET", "after", "/crm/v3/after", &Plan::default(), &[]).await.unwrap();
    assert_eq!(answer.status, 200, "sluice stopped serving");

    sluice.signal("TERM");
    let status = sluice.wait_exit(Duration::from_secs(30)).await;
    let log = sluice.stderr_text();
    assert!(
        failures.is_empty(),
        "{} hostile exchanges went wrong:\n{}\n--- log ---\n{log}",
        failures.len(),
        failures.join("\n")
    );
    let panics: Vec<&str> = log.lines().filter(|line| line.to_ascii_lowercase().contains("panic")).collect();
    assert!(
        panics.is_empty(),
        "sluice ({}) logged a panic:\n{}\n--- log ---\n{log}",
        binary.display(),
        panics.join("\n")
    );
    assert!(status.is_some_and(|status| status.success()), "exit {status:?} on SIGTERM; log:\n{log}");
}
