//! The TLS client side the intercept and memory benches share: CONNECT, a handshake that
//! trusts only the proxy's CA, and one HTTP/1.1 exchange at a time on the tunnel.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// CONNECT (through a proxy), then a TLS handshake for the authority's host.
pub async fn open(port: u16, authority: &str, config: &Arc<rustls::ClientConfig>, through_proxy: bool) -> Option<Tls> {
    let mut tcp =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(("127.0.0.1", port))).await.ok()?.ok()?;
    tcp.set_nodelay(true).ok()?;
    if through_proxy {
        let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        tcp.write_all(connect.as_bytes()).await.ok()?;
        let head = read_head(&mut tcp).await?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!("CONNECT refused: {head}");
            }
            return None;
        }
    }
    let host = authority.split(':').next().unwrap_or("localhost").to_owned();
    let name = ServerName::try_from(host).ok()?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.ok()? {
        Ok(tls) => Some(tls),
        Err(error) => {
            // Said once per process: a proxy whose leaves the client refuses fails every request.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!("TLS handshake with the proxy's leaf failed: {error}");
            }
            None
        }
    }
}

/// Reads a response head byte by byte (CONNECT's answer: nothing may be read past it).
pub async fn read_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return None;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte)).await.ok()?.ok()?;
        if read == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

/// One `GET /` and its whole answer on a kept-alive connection; true on a 200.
/// `GET` inside a tunnel to `authority` (the Host names the port too: squid matches it against
/// the CONNECT's).
pub async fn exchange(tls: &mut Tls, authority: &str) -> bool {
    let request = format!("GET /crm/v3/objects/contacts?limit=1 HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    exchange_on(tls, request.as_bytes()).await
}

/// Sends `request` and reads its whole answer; true on a 200. Works on any stream.
pub async fn exchange_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(tls: &mut S, request: &[u8]) -> bool {
    if tls.write_all(request).await.is_err() {
        return false;
    }
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Bounded: 64 KiB of answer at most, 5 s per read.
    loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize =
                head.lines().find_map(|line| line.strip_prefix("content-length:")?.trim().parse().ok()).unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let ok = head.starts_with("http/1.1 200");
                static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !ok && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("a non-200 answer: {}", String::from_utf8_lossy(&buffer[..buffer.len().min(600)]));
                }
                return ok;
            }
        }
        if buffer.len() > 64 * 1024 {
            return false;
        }
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => buffer.extend_from_slice(&chunk[..read]),
            _ => return false,
        }
    }
}

pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    // Every new tunnel is a full handshake: what a fresh client process does.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A leaf for `host` signed by the CA given as PEM: (cert PEM, key PEM).
pub fn leaf_for(host: &str, ca_pem: &str, ca_key_pem: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![host.to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}
