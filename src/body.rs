//! The one body type that flows through sluice, in both directions.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A streamed body whose errors are boxed: client bodies, vendor bodies and our own JSON alike.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` (a concurrency slot) until it ends or is dropped.
    pub struct Holding<G> {
        #[pin]
        inner: ProxyBody,
        guard: Option<G>,
    }
}

impl<G> http_body::Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `body`, holding `guard` until the body is done.
pub fn holding<G: Send + Sync + 'static>(body: ProxyBody, guard: G) -> ProxyBody {
    Holding { inner: body, guard: Some(guard) }.boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
