//! HTTP/1.1 spoken by hand over a plain `TcpStream`, for what well-behaved clients never send:
//! malformed request lines, oversized or stalled heads, exact hop-by-hop headers, CONNECT by
//! hand. Every read and write is bounded by [`IO_TIMEOUT`]; every loop by time and count.
//!
//! Also the checks every synthetic sluice response must pass (`Proxy-Status` + JSON body).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single read, write or connect may take before the helper gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response the helper will buffer.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// One response as read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and header lines, as received.
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// First value of `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// Every value of `name` (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str()).collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Asserts this is a response sluice made itself (see [`check_synthetic`]) and returns its body.
    pub fn expect_synthetic(&self, status: u16, error: &str, proxy_error: &str) -> serde_json::Value {
        assert_eq!(self.status, status, "unexpected status; head:\n{}", self.head);
        check_synthetic(
            self.header("proxy-status"),
            self.header("content-type"),
            &self.body,
            error,
            proxy_error,
            &self.head,
        )
    }
}

/// Why no response could be read.
#[derive(Debug)]
pub enum RawError {
    /// The peer closed (EOF or reset) before a whole response arrived; `partial` is what came.
    Closed {
        partial: Vec<u8>,
    },
    /// Nothing conclusive within [`IO_TIMEOUT`].
    TimedOut,
    Io(std::io::Error),
}

/// A raw client connection, keeping bytes read past one response for the next.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect within the timeout")
            .expect("connect to sluice");
        let _ = stream.set_nodelay(true);
        Self { stream, buf: Vec::new() }
    }

    /// Writes `bytes`; a peer that already hung up shows as an error, not a panic.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(IO_TIMEOUT, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out")),
        }
    }

    /// Reads one response to a request with `method` (CONNECT 2xx and HEAD have no body).
    pub async fn response(&mut self, method: &str) -> Result<RawResponse, RawError> {
        match tokio::time::timeout(IO_TIMEOUT, self.read_response(method)).await {
            Ok(result) => result,
            Err(_) => Err(RawError::TimedOut),
        }
    }

    async fn fill(&mut self) -> Result<usize, RawError> {
        if self.buf.len() > MAX_RESPONSE_BYTES {
            return Err(RawError::Io(std::io::Error::other("response too large for the test helper")));
        }
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Ok(0),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(error) if is_reset(&error) => Ok(0),
            Err(error) => Err(RawError::Io(error)),
        }
    }

    async fn read_response(&mut self, method: &str) -> Result<RawResponse, RawError> {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at;
            }
            if self.fill().await? == 0 {
                return Err(RawError::Closed { partial: std::mem::take(&mut self.buf) });
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
            .collect();
        let mut response = RawResponse { status, head: head.clone(), headers, body: Vec::new() };
        let bodiless = method.eq_ignore_ascii_case("HEAD")
            || (method.eq_ignore_ascii_case("CONNECT") && (200..300).contains(&status))
            || (100..200).contains(&status)
            || status == 204
            || status == 304;
        if bodiless {
            return Ok(response);
        }
        let chunked =
            response.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            response.body = self.read_chunked().await?;
        } else if let Some(length) = response.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while self.buf.len() < length {
                if self.fill().await? == 0 {
                    return Err(RawError::Closed { partial: std::mem::take(&mut self.buf) });
                }
            }
            response.body = self.buf.drain(..length).collect();
        } else {
            while self.fill().await? != 0 {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, RawError> {
        let mut body = Vec::new();
        for _ in 0..100_000 {
            let line_end = loop {
                if let Some(at) = find(&self.buf, b"\r\n") {
                    break at;
                }
                if self.fill().await? == 0 {
                    return Err(RawError::Closed { partial: body });
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| RawError::Io(std::io::Error::other(format!("bad chunk size {size_text:?}"))))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    if let Some(at) = find(&self.buf, b"\r\n") {
                        let empty = at == 0;
                        self.buf.drain(..at + 2);
                        if empty {
                            return Ok(body);
                        }
                        continue;
                    }
                    if self.fill().await? == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err(RawError::Closed { partial: body });
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
        Err(RawError::Io(std::io::Error::other("too many chunks")))
    }

    /// Reads (and discards) until the peer closes; true if it closed (EOF or reset) within
    /// `within`, false if the connection was still open then.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 4096];
        for _ in 0..100_000 {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => return true,
            }
        }
        false
    }

    /// Bytes received and not yet consumed as a response (e.g. by `closed_within`).
    pub fn unread(&self) -> &[u8] {
        &self.buf
    }
}

/// Connects, writes `request`, and reads one response to it.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, RawError> {
    let mut conn = RawConn::connect(addr).await;
    let method = String::from_utf8_lossy(request).split(' ').next().unwrap_or_default().to_string();
    // A write error (the peer hung up early) still leaves its answer, if any, to be read.
    let _ = conn.send(request).await;
    conn.response(&method).await
}

fn is_reset(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::BrokenPipe
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// The checks every response sluice makes itself must pass: `Proxy-Status` naming sluice and
/// `proxy_error` (RFC 9209), and a JSON body `{"error": error, "upstream": .., "detail": ..}`.
/// An empty `error` or `proxy_error` accepts any value there. Returns the body.
pub fn check_synthetic(
    proxy_status: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    error: &str,
    proxy_error: &str,
    context: &str,
) -> serde_json::Value {
    let proxy_status = proxy_status.unwrap_or_else(|| panic!("no Proxy-Status header; response:\n{context}"));
    assert!(proxy_status.starts_with("sluice; error="), "Proxy-Status {proxy_status:?} does not name sluice");
    if !proxy_error.is_empty() {
        assert!(
            proxy_status.starts_with(&format!("sluice; error={proxy_error};"))
                || proxy_status == format!("sluice; error={proxy_error}"),
            "Proxy-Status {proxy_status:?}, want error={proxy_error}"
        );
    }
    assert!(
        content_type.is_some_and(|ct| ct.starts_with("application/json")),
        "content-type {content_type:?} is not JSON"
    );
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    let object = json.as_object().unwrap_or_else(|| panic!("body is not a JSON object: {json}"));
    for key in ["error", "upstream", "detail"] {
        assert!(object.contains_key(key), "body lacks `{key}`: {json}");
    }
    assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "error must be a non-empty string: {json}");
    if !error.is_empty() {
        assert_eq!(json["error"], error, "body: {json}");
    }
    assert!(json["upstream"].is_string() || json["upstream"].is_null(), "upstream must be a string or null: {json}");
    assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()), "detail must be a non-empty string: {json}");
    json
}

/// [`check_synthetic`] for a reqwest response; consumes it and returns the JSON body.
pub async fn expect_synthetic(
    response: reqwest::Response,
    status: u16,
    error: &str,
    proxy_error: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "unexpected status: {response:?}");
    let context = format!("{response:?}");
    let proxy_status = response.headers().get("proxy-status").and_then(|v| v.to_str().ok()).map(str::to_string);
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = response.bytes().await.expect("read the body");
    check_synthetic(proxy_status.as_deref(), content_type.as_deref(), &body, error, proxy_error, &context)
}
