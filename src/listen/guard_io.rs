//! hyper answers a request head it cannot parse (400), one too large (431) or a URI too long
//! (414) by itself, before sluice sees a request, with a bare head and no body. Every response
//! sluice makes itself must say so (`Proxy-Status`, JSON body), so this wrapper around the
//! client connection writes sluice's own answer (`respond::render_http1`) in place of that head.
//!
//! Relayed bytes are never rewritten: a vendor's body can hold anything, a status line included
//! (a CRM serves file contents). So the wrapper only ever considers a write that can be nobody's
//! but hyper's, and only when it is exactly the head hyper makes for those errors:
//!
//! - hyper (1.x, `Conn::on_parse_error`) writes its error head only while no response is in
//!   progress, and then closes the connection. The connection's service counts the responses it
//!   hands to hyper and the bodies hyper has finished with, in a [`ResponseLedger`] shared with
//!   the wrapper. hyper flushes the IO only once its write buffer is empty, so a flush seen
//!   while every response has ended means every byte of theirs has been written; until the next
//!   response begins, a write is hyper's own.
//! - even then the write must be the whole of hyper's head: its status line for 400, 414 or 431
//!   and nothing but `connection: close`, `content-length: 0` and `date`, then the blank line,
//!   and no byte more. Anything else goes out as it is.
//! - HTTP/2 connections (recognised by the client preface, which hyper-util also reads, with or
//!   without ALPN) are never inspected: frames are not heads, and h2 errors are frames.
//! - a connection that has become a tunnel is never inspected: tunnelled bytes are not ours.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{self, ProxyBody};
use crate::error::{ErrorKind, ProxyError};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's error heads are about 100 bytes; a longer write is not one.
const MAX_HYPER_HEAD: usize = 256;

/// What a connection's service has answered so far, shared with the [`GuardIo`] around the
/// connection's IO.
#[derive(Debug, Default)]
pub struct ResponseLedger {
    /// Responses the service handed to hyper.
    begun: AtomicU64,
    /// Of those, the ones whose body hyper has finished with (ended, failed or dropped).
    ended: AtomicU64,
    /// Set once the connection carries a tunnel.
    tunnelled: AtomicBool,
}

impl ResponseLedger {
    /// Counts `response` as begun, and as ended when hyper is done with its body.
    pub fn track(self: &Arc<Self>, response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        let in_flight = InFlight(self.clone());
        response.map(|body| body::holding(body, in_flight))
    }

    /// From now on the connection's bytes are a tunnel's.
    pub fn set_tunnelled(&self) {
        self.tunnelled.store(true, Ordering::SeqCst);
    }

    /// The count of ended responses, when no response is in progress.
    fn settled(&self) -> Option<u64> {
        // `ended` first: a response that ends between the two loads then reads as in progress.
        let ended = self.ended.load(Ordering::SeqCst);
        let begun = self.begun.load(Ordering::SeqCst);
        (begun == ended && !self.tunnelled.load(Ordering::SeqCst)).then_some(ended)
    }
}

/// One response in progress; dropping it (with the body) counts it as ended.
struct InFlight(Arc<ResponseLedger>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the client speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the h2 preface read so far.
    Undecided(usize),
    Http1,
    Http2,
}

pub struct GuardIo<T> {
    inner: T,
    ledger: Arc<ResponseLedger>,
    protocol: Protocol,
    /// `ended` when hyper last flushed with no response in progress (its buffer was empty then).
    quiet_at: Option<u64>,
    /// `limits.max_header_bytes`, for the 431's detail.
    head_limit: usize,
    /// Our answer still to write, how much of it is out, and how many bytes hyper believes it
    /// wrote (its head's length).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> GuardIo<T> {
    pub fn new(inner: T, ledger: Arc<ResponseLedger>, head_limit: usize) -> Self {
        Self { inner, ledger, protocol: Protocol::Undecided(0), quiet_at: Some(0), head_limit, pending: None }
    }

    /// Whether a write now can only be hyper's own (see the module doc).
    fn hypers_turn(&self) -> bool {
        self.protocol == Protocol::Http1 && self.quiet_at.is_some() && self.ledger.settled() == self.quiet_at
    }

    fn saw(&mut self, read: &[u8]) {
        let Protocol::Undecided(matched) = self.protocol else { return };
        let wanted = &H2_PREFACE[matched..];
        let n = read.len().min(wanted.len());
        self.protocol = if read[..n] != wanted[..n] {
            Protocol::Http1
        } else if matched + n == H2_PREFACE.len() {
            Protocol::Http2
        } else {
            Protocol::Undecided(matched + n)
        };
    }

    /// Our answer in place of `written`, if it is hyper's error head and hyper may be writing.
    fn intercept(&mut self, written: &[u8]) -> bool {
        if self.pending.is_some() || !self.hypers_turn() {
            return false;
        }
        let Some(kind) = hyper_error(written, self.head_limit) else { return false };
        let error = ProxyError::new(kind, None);
        tracing::info!(error = %error, "Request head refused by the HTTP/1 parser.");
        self.pending = Some((crate::respond::render_http1(&error), 0, written.len()));
        true
    }
}

/// The error hyper's head stands for, if `written` is exactly one (`Server::on_error` in
/// hyper's `proto/h1/role.rs`: 400, 414 or 431, `content-length: 0`; the connection closes).
fn hyper_error(written: &[u8], head_limit: usize) -> Option<ErrorKind> {
    if written.len() > MAX_HYPER_HEAD {
        return None;
    }
    let head = std::str::from_utf8(written).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let kind = match lines.next()? {
        "HTTP/1.1 400 Bad Request" => ErrorKind::Malformed { detail: "the request head could not be parsed".into() },
        "HTTP/1.1 414 URI Too Long" => ErrorKind::UriTooLong,
        "HTTP/1.1 431 Request Header Fields Too Large" => ErrorKind::HeadTooLarge { limit: head_limit },
        _ => return None,
    };
    let (mut connection, mut length, mut date) = (false, false, false);
    for line in lines {
        match line {
            "connection: close" if !connection => connection = true,
            "content-length: 0" if !length => length = true,
            _ if !date && line.strip_prefix("date: ").is_some_and(|at| httpdate::parse_http_date(at).is_ok()) => {
                date = true
            }
            _ => return None,
        }
    }
    length.then_some(kind)
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(self.protocol, Protocol::Undecided(_)) && buf.filled().len() > before {
            self.saw(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> GuardIo<T> {
    /// Writes what is left of our answer; `Ready(owed)` once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, written, owed)) = &mut self.pending {
            if *written == bytes.len() {
                let owed = *owed;
                self.pending = None;
                return Poll::Ready(Ok(owed));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(0))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_some() || this.intercept(buf) {
            return this.drain(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() && this.hypers_turn() {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            if total <= MAX_HYPER_HEAD {
                let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                this.intercept(&whole);
            }
        }
        if this.pending.is_some() {
            return this.drain(cx);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_some() {
            match self.drain(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // hyper flushes the IO only once its write buffer is empty (`Buffered::poll_flush`).
        if let Some(ended) = self.ledger.settled() {
            self.quiet_at = Some(ended);
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DATE: &str = "date: Tue, 01 Dec 2026 10:00:00 GMT";

    #[test]
    fn recognises_exactly_hypers_heads() {
        let head = |lines: &[&str]| format!("{}\r\n\r\n", lines.join("\r\n")).into_bytes();
        let bad = head(&["HTTP/1.1 400 Bad Request", "connection: close", "content-length: 0", DATE]);
        assert!(matches!(hyper_error(&bad, 1), Some(ErrorKind::Malformed { .. })));
        let large = head(&["HTTP/1.1 431 Request Header Fields Too Large", "content-length: 0", DATE]);
        assert!(matches!(hyper_error(&large, 8192), Some(ErrorKind::HeadTooLarge { limit: 8192 })));
        let long = head(&["HTTP/1.1 414 URI Too Long", "content-length: 0"]);
        assert!(matches!(hyper_error(&long, 1), Some(ErrorKind::UriTooLong)));

        let not = [
            head(&["HTTP/1.1 500 X"]),
            head(&["HTTP/1.1 400 Bad Request"]),
            head(&["HTTP/1.1 400 Bad Request", "content-length: 0", "via: 1.1 sluice"]),
            head(&["HTTP/1.1 400 Bad Request", "content-length: 0", "content-length: 0"]),
            head(&["HTTP/1.1 400 Bad Request", "content-length: 5"]),
            head(&["HTTP/1.1 400 Bad Request", "content-length: 0", "date: yesterday"]),
            head(&["HTTP/1.0 400 Bad Request", "content-length: 0"]),
            head(&["HTTP/1.1 404 Not Found", "content-length: 0"]),
            head(&["HTTP/1.1 200 OK", "content-length: 0"]),
            head(&["HTTP/1.1 100 Continue"]),
        ];
        for bytes in not {
            assert!(hyper_error(&bytes, 1).is_none(), "{}", String::from_utf8_lossy(&bytes));
        }
        let mut trailing = bad.clone();
        trailing.extend_from_slice(b"x");
        assert!(hyper_error(&trailing, 1).is_none(), "a byte past the head");
        assert!(hyper_error(&bad[..bad.len() - 2], 1).is_none(), "a head cut short");
        assert!(hyper_error(b"\x16\x03\x01\x02\x00", 1).is_none());
    }

    /// A service like `ProxyService`: every response goes through the ledger; `/head` answers
    /// with a body that is hyper's own 400 head, byte for byte, in two parts with a pause.
    fn serve(io: tokio::io::DuplexStream, chunked: bool) -> tokio::task::JoinHandle<Result<(), hyper::Error>> {
        let ledger = Arc::new(ResponseLedger::default());
        let io = GuardIo::new(io, ledger.clone(), 8192);
        let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let ledger = ledger.clone();
            async move {
                let body = hyper_head_bytes();
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, crate::body::BoxError>>(4);
                let mut response = Response::new(http_body_util::StreamBody::new(tokio_stream_of(rx)).boxed());
                if !chunked {
                    response.headers_mut().insert(http::header::CONTENT_LENGTH, (body.len() + 5).into());
                }
                let _ = request;
                tokio::spawn(async move {
                    let _ = tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"hello")))).await;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let _ = tx.send(Ok(http_body::Frame::data(Bytes::from(body)))).await;
                });
                Ok::<_, Infallible>(ledger.track(response))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.writev(false).max_buf_size(8192);
        tokio::spawn(builder.serve_connection(hyper_util::rt::TokioIo::new(io), service))
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    /// What hyper writes for a garbage request line: its exact bytes, taken from hyper itself.
    fn hyper_head_bytes() -> Vec<u8> {
        format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n").into_bytes()
    }

    async fn read_all(client: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn hypers_own_heads_become_sluices_answers() {
        for (request, status) in [
            (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "400 Bad Request"),
            ([b"GET / HTTP/1.1\r\nX: ".to_vec(), vec![b'a'; 9000], b"\r\n\r\n".to_vec()].concat(), "431 Request"),
        ] {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let served = serve(server, false);
            client.write_all(&request).await.unwrap();
            let text = String::from_utf8(read_all(&mut client).await).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
            assert!(text.contains("\r\nproxy-status: sluice; error=http_request_error; details="), "{text}");
            assert!(text.contains("\r\ncontent-type: application/json\r\n"), "{text}");
            assert!(text.ends_with('}') && text.contains("\"error\":\"malformed_request\""), "{text}");
            let _ = served.await;
        }
    }

    /// The shape the wrapper matches is the one hyper really writes.
    #[tokio::test]
    async fn hyper_writes_the_shape_matched() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|_request: http::Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(Response::new(crate::body::empty()))
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.writev(false).max_buf_size(8192);
        let served = tokio::spawn(builder.serve_connection(hyper_util::rt::TokioIo::new(server), service));
        client.write_all(b"G(T / HTTP/1.1\r\n\r\n").await.unwrap();
        let bytes = read_all(&mut client).await;
        assert!(
            matches!(hyper_error(&bytes, 1), Some(ErrorKind::Malformed { .. })),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let _ = served.await;
    }

    /// Security review M1: a body that holds hyper's error head, byte for byte, in a write of its
    /// own, is relayed as it is, and the connection stays in step for the next request.
    #[tokio::test]
    async fn body_bytes_shaped_like_hypers_head_are_relayed_exactly() {
        for chunked in [false, true] {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let served = serve(server, chunked);
            let mut raw = Vec::new();
            for _ in 0..2 {
                client.write_all(b"GET /head HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
                let body = [b"hello".as_slice(), &hyper_head_bytes()].concat();
                let wanted_tail: &[u8] = if chunked { b"0\r\n\r\n" } else { &body };
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let mut chunk = [0u8; 4096];
                while !raw.ends_with(wanted_tail) && tokio::time::Instant::now() < deadline {
                    match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&raw).into_owned();
                assert!(!text.contains("proxy-status"), "body rewritten (chunked {chunked}): {text}");
                let head_end = text.find("\r\n\r\n").unwrap() + 4;
                let got = if chunked { dechunk(&raw[head_end..]) } else { raw[head_end..].to_vec() };
                assert_eq!(got, body, "chunked {chunked}: {text}");
                raw.clear();
            }
            // And then a garbage head on the same connection is still answered as sluice.
            client.write_all(b"G(T / HTTP/1.1\r\n\r\n").await.unwrap();
            let text = String::from_utf8(read_all(&mut client).await).unwrap();
            assert!(
                text.starts_with("HTTP/1.1 400 Bad Request\r\n") && text.contains("proxy-status: sluice"),
                "{text}"
            );
            let _ = served.await;
        }
    }

    fn dechunk(mut raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = raw.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&raw[..line]).unwrap(), 16).unwrap();
            raw = &raw[line + 2..];
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&raw[..size]);
            raw = &raw[size + 2..];
        }
    }

    #[test]
    fn h2_preface_is_recognised_in_pieces() {
        let ledger = Arc::new(ResponseLedger::default());
        let mut io = GuardIo::new((), ledger.clone(), 1);
        io.saw(&H2_PREFACE[..5]);
        assert_eq!(io.protocol, Protocol::Undecided(5));
        io.saw(&H2_PREFACE[5..]);
        assert_eq!(io.protocol, Protocol::Http2);
        assert!(!io.hypers_turn(), "h2 is never inspected");
        let mut io = GuardIo::new((), ledger.clone(), 1);
        io.saw(b"PRI * HTTP/1.1\r\n");
        assert_eq!(io.protocol, Protocol::Http1);
        assert!(io.hypers_turn());
        let mut io = GuardIo::new((), ledger, 1);
        io.saw(b"G");
        assert_eq!(io.protocol, Protocol::Http1);
    }

    #[test]
    fn a_response_in_progress_or_unflushed_is_not_hypers_turn() {
        let ledger = Arc::new(ResponseLedger::default());
        let mut io = GuardIo::new((), ledger.clone(), 1);
        io.saw(b"GET");
        assert!(io.hypers_turn());
        let response = ledger.track(Response::new(crate::body::empty()));
        assert!(!io.hypers_turn(), "a response is in progress");
        drop(response);
        assert!(!io.hypers_turn(), "ended, but hyper has not flushed since");
        io.quiet_at = ledger.settled();
        assert!(io.hypers_turn());
        ledger.set_tunnelled();
        assert!(!io.hypers_turn(), "a tunnel");
    }
}
