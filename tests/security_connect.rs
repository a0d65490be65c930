#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security review findings at the CONNECT door, through real sockets: a blind tunnel checks the
//! ClientHello's SNI against the CONNECT host (H1) and serves plain HTTP itself, routed by the
//! CONNECT host; a blind tunnel to an upstream with limits is refused unless it opts in (M10),
//! and `sluice check` says why; a CONNECT inside an intercepted tunnel is refused (L3).
mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::process::run_sluice;
use support::raw_http::{RawConn, RawResponse};
use support::sni::{tls_over, SniServer};
use support::{eventually, metric_value, MockCrm, TestSluice};

/// Opens `CONNECT authority` on a fresh connection; the connection and the answer.
async fn connect(sluice: &TestSluice, authority: &str) -> (RawConn, RawResponse) {
    let mut conn = RawConn::connect(sluice.running().proxy_addr).await;
    conn.send(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let response = conn.response("CONNECT").await.unwrap_or_else(|e| panic!("no answer to CONNECT {authority}: {e:?}"));
    (conn, response)
}

/// One `GET /` over a TLS stream; the body.
async fn get_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(tls: &mut S, host: &str) -> String {
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn refused(sluice: &TestSluice, reason: &str) -> f64 {
    metric_value(&sluice.metrics().await, "sluice_tunnels_refused_total", &[("upstream", "vendor"), ("reason", reason)])
}

/// sluice with a blind upstream `api.test` whose target is the shared edge.
async fn blind_to(edge: &SniServer) -> TestSluice {
    TestSluice::start(&format!(
        "upstreams:\n  - {{ name: vendor, hosts: [api.test], target: 'https://127.0.0.1:{}' }}\n",
        edge.addr.port()
    ))
    .await
}

// === H1: SNI ===

#[tokio::test]
async fn a_blind_tunnel_reaches_only_the_site_it_was_opened_for() {
    let edge = SniServer::start(&["api.test", "other.test"]).await;
    let sluice = blind_to(&edge).await;

    // The CONNECT host in SNI: the vendor's site answers.
    let (conn, response) = connect(&sluice, "api.test:443").await;
    assert_eq!(response.status, 200, "{}", response.head);
    let mut tls = tls_over(conn.stream, "api.test", &edge.ca_pem, true).await.expect("handshake with api.test");
    assert!(get_over(&mut tls, "api.test").await.ends_with("site=api.test"));
    drop(tls);

    // Another site of the same edge named in SNI: the tunnel closes before the hello gets there.
    let (conn, response) = connect(&sluice, "api.test:443").await;
    assert_eq!(response.status, 200, "the CONNECT itself is allowed: {}", response.head);
    let Err(error) = tls_over(conn.stream, "other.test", &edge.ca_pem, true).await else {
        panic!("the handshake with other.test must fail");
    };
    assert!(
        matches!(error.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
    assert_eq!(refused(&sluice, "sni_mismatch").await, 1.0, "{}", sluice.metrics().await);
    assert!(
        !edge.handshakes().contains(&Some("other.test".into())),
        "the other site was reached: {:?}",
        edge.handshakes()
    );

    // Case and a trailing dot in the CONNECT host do not matter; no SNI at all passes.
    let (conn, response) = connect(&sluice, "API.Test.:443").await;
    assert_eq!(response.status, 200, "{}", response.head);
    let mut tls = tls_over(conn.stream, "api.test", &edge.ca_pem, true).await.expect("same host, other spelling");
    assert!(get_over(&mut tls, "api.test").await.ends_with("site=api.test"));
    drop(tls);
    let (conn, _) = connect(&sluice, "api.test:443").await;
    let mut tls = tls_over(conn.stream, "api.test", &edge.ca_pem, false).await.expect("no SNI is allowed");
    assert!(get_over(&mut tls, "api.test").await.ends_with("site=api.test"));
    assert_eq!(edge.handshakes(), [Some("api.test".into()), Some("api.test".into()), None]);

    // reqwest and curl through HTTPS_PROXY send the host as SNI, as every client does.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(edge.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    assert_eq!(client.get("https://api.test/").send().await.unwrap().text().await.unwrap(), "site=api.test");
    // curl told to reach other.test by way of a tunnel opened to api.test (the review's attack).
    let ca = sluice.dir.path().join("edge-ca.pem");
    std::fs::write(&ca, &edge.ca_pem).unwrap();
    let out = support::curl::curl(
        &[
            "-p",
            "-x",
            &sluice.proxy_url(),
            "--cacert",
            ca.to_str().unwrap(),
            "--connect-to",
            "other.test:443:api.test:443",
            "https://other.test/",
        ],
        &[],
    )
    .await;
    assert!(!out.stdout.contains("site=other.test"), "curl reached the other site: {out:?}");
    assert_eq!(refused(&sluice, "sni_mismatch").await, 2.0);
    // A blind tunnel lasts until its client closes it.
    drop((tls, client));
    assert!(sluice.shutdown().await);
}

/// A hand-made ClientHello record with `extensions` (`(type, data)`).
fn client_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01, 1, 0]);
    let mut list = Vec::new();
    for (kind, data) in extensions {
        list.extend(kind.to_be_bytes());
        list.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
        list.extend(data);
    }
    body.extend(u16::try_from(list.len()).unwrap().to_be_bytes());
    body.extend(list);
    let mut message = vec![1];
    message.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    message.extend(body);
    let mut record = vec![22, 3, 1];
    record.extend(u16::try_from(message.len()).unwrap().to_be_bytes());
    record.extend(message);
    record
}

fn sni(name: &str) -> (u16, Vec<u8>) {
    let mut entry = vec![0];
    entry.extend(u16::try_from(name.len()).unwrap().to_be_bytes());
    entry.extend(name.as_bytes());
    let mut data = u16::try_from(entry.len()).unwrap().to_be_bytes().to_vec();
    data.extend(entry);
    (0, data)
}

#[tokio::test]
async fn hidden_ambiguous_or_broken_hellos_close_the_tunnel() {
    let edge = SniServer::start(&["api.test", "other.test"]).await;
    let sluice = blind_to(&edge).await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("encrypted_client_hello", client_hello(&[sni("api.test"), (0xfe0d, vec![0; 32])])),
        ("bad_client_hello", client_hello(&[sni("api.test"), sni("api.test")])),
        ("bad_client_hello", vec![22, 3, 1, 0, 5, 2, 0, 0, 1, 0]),
        ("sni_mismatch", {
            // Split into two records, and sent a byte at a time.
            let whole = client_hello(&[sni("other.test")]);
            let message = &whole[5..];
            let mut split = vec![22, 3, 1, 0, 20];
            split.extend(&message[..20]);
            split.extend([22, 3, 1]);
            split.extend(u16::try_from(message.len() - 20).unwrap().to_be_bytes());
            split.extend(&message[20..]);
            split
        }),
    ];
    for (reason, bytes) in cases {
        let before = refused(&sluice, reason).await;
        let (mut conn, response) = connect(&sluice, "api.test:443").await;
        assert_eq!(response.status, 200);
        for byte in &bytes {
            if conn.send(std::slice::from_ref(byte)).await.is_err() {
                break;
            }
        }
        assert!(conn.closed_within(Duration::from_secs(10)).await, "{reason}: the tunnel stayed open");
        assert!(conn.unread().is_empty(), "{reason}: the edge answered: {:?}", conn.unread());
        assert_eq!(refused(&sluice, reason).await, before + 1.0, "{reason}");
    }
    assert!(edge.handshakes().is_empty(), "{:?}", edge.handshakes());
    // A client that opens a tunnel and never says anything is cut after header_read_timeout.
    let sluice = TestSluice::start(&format!(
        "limits: {{ header_read_timeout: 300ms }}\nupstreams:\n  - {{ name: vendor, hosts: [api.test], target: 'https://127.0.0.1:{}' }}\n",
        edge.addr.port()
    ))
    .await;
    let (mut conn, _) = connect(&sluice, "api.test:443").await;
    conn.send(&client_hello(&[sni("api.test")])[..20]).await.unwrap();
    assert!(conn.closed_within(Duration::from_secs(10)).await, "a half-sent ClientHello held the tunnel");
    assert_eq!(refused(&sluice, "client_hello_timeout").await, 1.0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric_value(&sluice.metrics().await, "sluice_tunnels_open", &[("kind", "blind")]) == 0.0
        })
        .await
    );
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn plain_http_in_a_blind_tunnel_is_served_by_sluice_for_the_connect_host() {
    let vendor = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "upstreams:\n  - {{ name: vendor, hosts: [plain.test], connect_ports: [80], target: '{}' }}\n",
        vendor.url()
    ))
    .await;
    let (mut conn, response) = connect(&sluice, "plain.test:80").await;
    assert_eq!(response.status, 200, "{}", response.head);
    // The inner Host, and an absolute-form target, name another site: neither is where it goes.
    conn.send(b"GET /first HTTP/1.1\r\nHost: attacker.example\r\n\r\n").await.unwrap();
    let first = conn.response("GET").await.unwrap();
    assert_eq!(first.status, 200, "{}", first.head);
    assert!(first.header("via").is_some_and(|via| via.contains("sluice")), "sluice served it: {}", first.head);
    conn.send(b"GET http://attacker.example/second HTTP/1.1\r\nHost: attacker.example\r\n\r\n").await.unwrap();
    assert_eq!(conn.response("GET").await.unwrap().status, 200);
    let seen = vendor.requests();
    assert_eq!(seen.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), ["/first", "/second"]);
    for request in &seen {
        assert_eq!(request.header("host"), Some(vendor.addr.to_string().as_str()), "{:?}", request.headers);
    }
    // Bytes that are neither TLS nor HTTP get the HTTP parser's 400, in sluice's JSON.
    let (mut conn, _) = connect(&sluice, "plain.test:80").await;
    conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await.unwrap();
    let answer = conn.response("GET").await.unwrap();
    answer.expect_synthetic(400, "malformed_request", "http_request_error");
    assert_eq!(vendor.request_count(), 2);
    assert!(sluice.shutdown().await);
}

// === M10: limits a blind tunnel would skip ===

const LIMITED: &str = "quotas: [{ name: burst, limit: 1, per: 1m }], over_limit: reject";

#[tokio::test]
async fn a_blind_connect_to_a_limited_upstream_is_refused_unless_it_opts_in() {
    let edge = SniServer::start(&["api.test"]).await;
    let target = format!("https://127.0.0.1:{}", edge.addr.port());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "pat-123\n").unwrap();
    let sluice = TestSluice::start_in(
        dir,
        &format!(
            "upstreams:
  - {{ name: vendor, hosts: [api.test], target: '{target}', {LIMITED} }}
  - {{ name: optin, hosts: [optin.test], target: '{target}', {LIMITED}, blind_tunnel: true }}
  - {{ name: creds, hosts: [creds.test], target: '{target}', credentials: {{ value_file: $DIR/token }} }}
"
        ),
    )
    .await;
    for (host, upstream, skipped) in [("api.test", "vendor", "quotas"), ("creds.test", "creds", "credentials")] {
        let (_conn, response) = connect(&sluice, &format!("{host}:443")).await;
        let body = response.expect_synthetic(403, "blind_tunnel_refused", "http_request_denied");
        assert_eq!(body["upstream"], upstream);
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains(skipped) && detail.contains("intercept: true") && detail.contains("blind_tunnel: true"),
            "{detail}"
        );
    }
    assert!(edge.handshakes().is_empty());
    let metrics = sluice.metrics().await;
    assert_eq!(metric_value(&metrics, "sluice_proxy_errors_total", &[("error", "blind_tunnel_refused")]), 2.0);

    // `blind_tunnel: true` is the operator saying the tunnel may skip them: it opens.
    let (conn, response) = connect(&sluice, "optin.test:443").await;
    assert_eq!(response.status, 200, "{}", response.head);
    let mut tls = tls_over(conn.stream, "api.test", &edge.ca_pem, false).await.unwrap();
    assert!(get_over(&mut tls, "api.test").await.ends_with("site=api.test"));
    drop(tls);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn an_intercepted_tunnel_keeps_the_quota_a_blind_one_would_skip() {
    let vendor = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
upstreams:
  - {{ name: vendor, hosts: [api.test], target: '{}', intercept: true, {LIMITED} }}
",
        vendor.url()
    ))
    .await;
    let client = sluice.proxied_client();
    let mut statuses = Vec::new();
    for at in 0..10 {
        statuses.push(client.get(format!("https://api.test/crm/{at}")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 9, "{statuses:?}");
    assert_eq!(vendor.request_count(), 1);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn check_explains_refused_tunnels_and_rejects_a_contradiction() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(
        &config,
        "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
upstreams:
  - name: open
    hosts: [open.test]
  - name: hubspot
    hosts: [api.hubapi.com]
    quotas: [{ name: burst, limit: 100, per: 10s }]
  - name: optin
    hosts: [optin.test]
    max_concurrency: 4
    blind_tunnel: true
",
    )
    .unwrap();
    let out = run_sluice(&["check", "-c", config.to_str().unwrap()], &[], dir.path(), Duration::from_secs(30));
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("upstreams[1] (line 5): CONNECT to `hubspot`'s hosts will be refused (403 blind_tunnel_refused)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("quotas"), "{}", out.stdout);
    assert!(out.stdout.contains("upstreams[2] (line 8): `blind_tunnel: true`"), "{}", out.stdout);
    assert!(!out.stdout.contains("upstreams[0]"), "an upstream without limits tunnels as before: {}", out.stdout);

    std::fs::write(
        &config,
        "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
intercept: { ca_cert: ca.crt, ca_key: ca.key }
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    intercept: true
    blind_tunnel: true
",
    )
    .unwrap();
    let out = run_sluice(&["check", "-c", config.to_str().unwrap()], &[], dir.path(), Duration::from_secs(30));
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("upstreams[0].blind_tunnel (line 7)"), "{}", out.stderr);
}

// === L3: CONNECT inside a tunnel ===

#[tokio::test]
async fn a_connect_inside_an_intercepted_tunnel_is_refused() {
    let vendor = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
upstreams:
  - {{ name: vendor, hosts: [api.test], target: '{}', intercept: true }}
",
        vendor.url()
    ))
    .await;
    let (conn, response) = connect(&sluice, "api.test:443").await;
    assert_eq!(response.status, 200);
    let ca = String::from_utf8(sluice.ca_pem()).unwrap();
    let mut tls = tls_over(conn.stream, "api.test", &ca, true).await.unwrap();
    tls.write_all(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(read, 1, "closed before answering: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.to_ascii_lowercase().contains("proxy-status: sluice; error=http_request_denied"), "{head}");
    assert_eq!(vendor.request_count(), 0, "the vendor saw {:?}", vendor.requests());
    assert!(sluice.shutdown().await);
}
