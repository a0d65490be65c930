//! hyper answers a request head it cannot parse (400), one too large (431) or a URI too long
//! (414) by itself, before sluice sees a request, with a bare status line. Every response sluice
//! makes itself must say so (`Proxy-Status`, JSON body), so this wrapper around the client
//! connection recognises those heads on their way out and writes sluice's own answer instead.
//!
//! A head is hyper's when it is an HTTP/1 error status carrying neither `via` (which every
//! relayed vendor answer has) nor `proxy-status` (which every sluice answer has). Once the
//! connection becomes a CONNECT tunnel the wrapper stands aside: tunnelled bytes are not ours.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ErrorKind, ProxyError};

pub struct GuardIo<T> {
    inner: T,
    /// Set once the connection carries a tunnel.
    tunnelled: Arc<AtomicBool>,
    /// Our replacement answer still to write, and how many bytes hyper believes it wrote.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> GuardIo<T> {
    pub fn new(inner: T, tunnelled: Arc<AtomicBool>) -> Self {
        Self { inner, tunnelled, pending: None }
    }
}

/// Our answer for one of hyper's own error heads, if `head` is one.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    if head.len() < 12 || !(head.starts_with(b"HTTP/1.1 ") || head.starts_with(b"HTTP/1.0 ")) {
        return None;
    }
    let status = std::str::from_utf8(&head[9..12]).ok()?.parse::<u16>().ok()?;
    if !(400..600).contains(&status) {
        return None;
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let lower = head[..end].to_ascii_lowercase();
    let has = |name: &[u8]| lower.windows(name.len()).any(|w| w == name);
    if has(b"\r\nvia:") || has(b"\r\nproxy-status:") {
        return None;
    }
    let detail = match status {
        431 => "request header fields too large",
        414 => "request URI too long",
        505 => "HTTP version not supported",
        408 => "request head not received in time",
        _ => "the request could not be parsed",
    };
    let error = ProxyError::new(ErrorKind::Malformed { detail: detail.to_owned() }, None);
    let body = serde_json::json!({ "error": error.code(), "upstream": null, "detail": error.kind.to_string() });
    let body = serde_json::to_vec(&body).ok()?;
    let reason = http::StatusCode::from_u16(status).ok()?.canonical_reason().unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n\
         proxy-status: sluice; error=http_request_error; details=\"{}\"\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        error.kind,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> GuardIo<T> {
    /// Writes what is left of our replacement; `Ready(owed)` once it is all out.
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

    fn intercept(&mut self, first: &[u8], total: usize) -> bool {
        if self.tunnelled.load(Ordering::Relaxed) {
            return false;
        }
        match replacement(first) {
            Some(bytes) => {
                self.pending = Some((bytes, 0, total));
                true
            }
            None => false,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_some() || this.intercept(buf, buf.len()) {
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
        let total = bufs.iter().map(|b| b.len()).sum();
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        if this.pending.is_some() || this.intercept(first, total) {
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
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_hypers_own_heads_only() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let ours = replacement(hyper).expect("replaced");
        let text = String::from_utf8(ours).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n") && text.contains("proxy-status: sluice;"), "{text}");
        assert!(text.ends_with("}"));
        assert!(replacement(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n").is_some());
        assert!(replacement(b"HTTP/1.1 404 Not Found\r\nvia: 1.1 sluice\r\n\r\n").is_none(), "a vendor answer");
        assert!(replacement(b"HTTP/1.1 403 Forbidden\r\nproxy-status: sluice\r\n\r\n").is_none(), "ours already");
        assert!(replacement(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(replacement(b"\x16\x03\x01\x02\x00").is_none());
    }
}
