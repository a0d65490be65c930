//! Helpers the `security_*` tests share: proxy credentials (`Proxy-Authorization: Basic`, the
//! SHA-256 a `clients[]` secret is stored as), raw requests and CONNECTs through sluice, requests
//! from a chosen local source address (the sidecar's loopback rule), the files and environment
//! variables a test writes, and the intercepting sluice the hostile-input tests throw bytes at.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::raw_http::{exchange, RawConn, RawResponse, IO_TIMEOUT};
use super::{direct_client, MockCrm, TestSluice};

/// Hex SHA-256, as `clients[].secret_sha256` wants it.
pub fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding, for `Proxy-Authorization: Basic`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// An environment variable name no other test (or process) uses.
pub fn unique_env(name: &str) -> String {
    format!("SLUICE_SECURITY_TEST_{}_{name}", std::process::id())
}

pub fn write_file(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The `authorization` (or other) header the mock saw on its last request.
pub fn last_seen(mock: &MockCrm, header: &str) -> Option<String> {
    mock.requests().last().and_then(|r| r.header(header).map(str::to_string))
}

/// A normal reverse-mode request on a fresh connection still reaches the vendor.
pub async fn still_serves(sluice: &TestSluice, mock: &MockCrm) {
    let path = format!("/crm/v3/still-ok/{}", mock.next_id());
    let response = direct_client().get(format!("{}/hubspot{path}", sluice.proxy_url())).send().await.unwrap();
    assert_eq!(response.status(), 200, "sluice stopped serving: {response:?}");
    assert_eq!(mock.requests().iter().filter(|r| r.path == path).count(), 1);
}

/// Sends `request` (absolute-form, with `Connection: close`) and reads one response.
pub async fn raw(sluice: &TestSluice, request: &str) -> RawResponse {
    exchange(sluice.running().proxy_addr, request.as_bytes())
        .await
        .unwrap_or_else(|error| panic!("no answer to {request:?}: {error:?}"))
}

/// `GET http://{host}{path}` through the proxy with optional `Proxy-Authorization`.
pub async fn proxied_get(sluice: &TestSluice, host: &str, path: &str, auth: Option<&str>) -> RawResponse {
    let auth = auth.map(|value| format!("Proxy-Authorization: {value}\r\n")).unwrap_or_default();
    raw(sluice, &format!("GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")).await
}

/// Opens a CONNECT tunnel (or fails to) and returns the connection with the response.
pub async fn connect(addr: SocketAddr, authority: &str, auth: Option<&str>) -> (RawConn, RawResponse) {
    let auth = auth.map(|value| format!("Proxy-Authorization: {value}\r\n")).unwrap_or_default();
    let mut conn = RawConn::connect(addr).await;
    conn.send(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let response = conn.response("CONNECT").await.unwrap_or_else(|e| panic!("no answer to CONNECT {authority}: {e:?}"));
    (conn, response)
}

/// Through an open blind tunnel to a plain-HTTP mock: one GET, its status.
pub async fn get_through_tunnel(conn: &mut RawConn, path: &str) -> u16 {
    conn.send(format!("GET {path} HTTP/1.1\r\nHost: vendor\r\n\r\n").as_bytes()).await.unwrap();
    conn.response("GET").await.unwrap().status
}

/// A local IPv4 address that is not loopback (e.g. the container's eth0 address), if any,
/// read from the kernel's table of local addresses.
pub fn local_non_loopback_v4() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let lines: Vec<&str> = table.lines().collect();
    lines.windows(2).find_map(|pair| {
        if !pair[1].trim_start().starts_with("/32 host LOCAL") {
            return None;
        }
        let ip: Ipv4Addr = pair[0].rsplit(' ').next()?.trim().parse().ok()?;
        let usable = !ip.is_loopback() && !ip.is_unspecified() && std::net::TcpListener::bind((ip, 0)).is_ok();
        usable.then_some(ip)
    })
}

/// Connects to `to` from the local address `source` (bound before connect).
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = if source.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    tokio::time::timeout(IO_TIMEOUT, socket.connect(to)).await.expect("connect in time").expect("connect")
}

/// Sends one request (it should say `Connection: close`) from `source` and reads until EOF:
/// the status code and the whole response text.
pub async fn request_from(source: IpAddr, to: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = connect_from(source, to).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut bytes)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A sluice that intercepts `api.hubapi.com` (its CA in the scratch directory), serves `/hubspot`
/// in reverse mode, and gives a request head 1 s: the target of the hostile-input tests.
pub async fn hostile_sluice(mock: &MockCrm) -> TestSluice {
    TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}
limits: {{ header_read_timeout: 1s }}
upstreams:
  - {{ name: hubspot, hosts: [api.hubapi.com], prefix: /hubspot, target: '{mock}', intercept: true }}
",
        mock = mock.url()
    ))
    .await
}
