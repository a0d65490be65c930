//! The one body type that flows through sluice, in both directions, and the two clocks that
//! keep a slow client from passing its slowness on to the vendor or to other tenants.
//!
//! - [`Upload`] wraps a client's request body. It knows when sluice is waiting on the client
//!   (and for how long in all), so `upstream::client` times the vendor without the client's
//!   upload, and it ends a body that stalls past `limits.body_read_timeout` with a typed
//!   [`UploadError`]: the client's fault, a 408, never a breaker failure.
//! - [`delivering`] wraps a vendor's response body that holds a concurrency slot. The slot goes
//!   back as soon as the vendor's last byte is handed on, and a response the client stops taking
//!   is abandoned after `limits.response_idle_timeout`: slot released, vendor body dropped, the
//!   client's HTTP/1 connection closed.
//! - [`collect_upload`] is the one bounded collect of a client's body (Retry and Batch buffer
//!   with it).
//!
//! Low in the module graph: it names only `error` (an upload failure is an `ErrorKind`), so
//! every layer, the listener and the admin API can share the body type.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A streamed body whose errors are boxed: client bodies, vendor bodies and our own JSON alike.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` until it ends or is dropped.
    pub struct Holding<G> {
        #[pin]
        inner: ProxyBody,
        guard: Option<G>,
    }
}

impl<G> Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `body`, holding `guard` until the body is done.
pub fn holding<G: Send + Sync + 'static>(body: ProxyBody, guard: G) -> ProxyBody {
    Holding { inner: body, guard: Some(guard) }.boxed()
}

// === request bodies ===

/// Why a client's request body ended before it was complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UploadError {
    #[error("the client sent no body bytes for {}", humantime::format_duration(*after))]
    Stalled { after: Duration },
    #[error("the request body ended early: {detail}")]
    Broken { detail: String },
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: u64 },
}

/// What the rest of the request path can ask about a client's upload: shared with the
/// [`Upload`] body, and left in the request's extensions.
#[derive(Debug)]
pub struct UploadWatch {
    epoch: Instant,
    /// Microseconds spent waiting on the client, waits in progress excluded.
    waited_us: AtomicU64,
    /// Microseconds since `epoch` at which the current wait began, plus one; 0: not waiting.
    waiting_since: AtomicU64,
    failure: Mutex<Option<UploadError>>,
}

impl UploadWatch {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            waited_us: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            failure: Mutex::new(None),
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    fn start_waiting(&self, now: Instant) {
        let _ = self.waiting_since.compare_exchange(
            0,
            self.micros(now).saturating_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn stop_waiting(&self, now: Instant) {
        let since = self.waiting_since.swap(0, Ordering::AcqRel);
        if since != 0 {
            let waited = self.micros(now).saturating_sub(since - 1);
            self.waited_us.fetch_add(waited, Ordering::AcqRel);
        }
    }

    /// Time spent, up to `now`, waiting for the client to send body bytes.
    pub fn client_time(&self, now: Instant) -> Duration {
        let mut total = self.waited_us.load(Ordering::Acquire);
        let since = self.waiting_since.load(Ordering::Acquire);
        if since != 0 {
            total = total.saturating_add(self.micros(now).saturating_sub(since - 1));
        }
        Duration::from_micros(total)
    }

    /// How the upload failed, if it did.
    pub fn failure(&self) -> Option<UploadError> {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn fail(&self, error: UploadError) {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(error);
    }
}

pin_project_lite::pin_project! {
    /// A client's request body, timed while sluice waits on it.
    pub struct Upload<B> {
        #[pin]
        inner: http_body_util::Limited<B>,
        idle: Duration,
        limit: u64,
        stall: Option<Pin<Box<Sleep>>>,
        watch: Arc<UploadWatch>,
    }
}

/// Wraps a client's request body, cut at `max_bytes`; the returned watch goes into the
/// request's extensions.
pub fn upload<B>(body: B, max_bytes: u64, idle: Duration) -> (ProxyBody, Arc<UploadWatch>)
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let limited = http_body_util::Limited::new(body, usize::try_from(max_bytes).unwrap_or(usize::MAX));
    let watch = Arc::new(UploadWatch::new());
    let body = Upload { inner: limited, idle, limit: max_bytes, stall: None, watch: watch.clone() };
    (body.boxed(), watch)
}

impl<B> Body for Upload<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(ready) => {
                this.watch.stop_waiting(Instant::now());
                *this.stall = None;
                if let Some(Err(error)) = &ready {
                    let failure = if error.is::<http_body_util::LengthLimitError>() {
                        UploadError::TooLarge { limit: *this.limit }
                    } else {
                        UploadError::Broken { detail: crate::error::describe(error.as_ref()) }
                    };
                    this.watch.fail(failure);
                }
                Poll::Ready(ready)
            }
            Poll::Pending => {
                let now = Instant::now();
                this.watch.start_waiting(now);
                let stall = this.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + *this.idle)));
                if std::future::Future::poll(stall.as_mut(), cx).is_pending() {
                    return Poll::Pending;
                }
                this.watch.stop_waiting(now);
                let error = UploadError::Stalled { after: *this.idle };
                this.watch.fail(error.clone());
                Poll::Ready(Some(Err(Box::new(error))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a request's body is known to fit a replay buffer of `max` bytes (its size hint, or
/// its `Content-Length`): what Retry and the OAuth layer buffer, to send it again.
pub fn fits_replay(request: &http::Request<ProxyBody>, max: u64) -> bool {
    request.body().size_hint().upper().is_some_and(|upper| upper <= max)
        || request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|length| length <= max)
}

/// Reads a whole request body, for a layer that must hold one (Retry replays it, Batch parses
/// it). A failed read is typed as [`request_body_error`] says.
pub async fn collect_upload(body: ProxyBody, limit: u64) -> Result<Bytes, crate::error::ErrorKind> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(request_body_error(&error, limit)),
    }
}

/// What a failed read of a client's request body is, for a layer that buffers one: a stall is
/// a 408, a body over `limit` a 413, anything else a malformed request.
pub fn request_body_error(error: &BoxError, limit: u64) -> crate::error::ErrorKind {
    use crate::error::ErrorKind;
    match upload_error_in(error.as_ref()) {
        Some(UploadError::Stalled { after }) => ErrorKind::RequestBodyTimeout { after: *after },
        Some(UploadError::TooLarge { .. }) => ErrorKind::BodyTooLarge { limit },
        _ if error.is::<http_body_util::LengthLimitError>() => ErrorKind::BodyTooLarge { limit },
        _ => ErrorKind::Malformed { detail: format!("request body: {error}") },
    }
}

/// The typed upload failure in an error chain (a body error, as the Retry or Batch layer sees
/// it when buffering).
pub fn upload_error_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a UploadError> {
    crate::error::causes(error).find_map(|cause| cause.downcast_ref::<UploadError>())
}

// === response bodies ===

/// Where an abandoned response's client connection is told to close (HTTP/1 only: one stuck
/// response is the whole connection; on HTTP/2 only its stream is stuck).
#[derive(Clone, Debug, Default)]
pub struct ConnectionAbort(pub tokio_util::sync::CancellationToken);

struct Delivery<G> {
    inner: Mutex<Option<ProxyBody>>,
    guard: Mutex<Option<G>>,
    epoch: Instant,
    /// Milliseconds since `epoch` when sluice last handed a frame on (or started), and whether
    /// it is waiting for the client to ask for the next one.
    handed_at: AtomicU64,
    awaiting_client: AtomicBool,
    abandoned: AtomicBool,
    finished: tokio::sync::Notify,
}

impl<G> Delivery<G> {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn release(&self) {
        self.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        self.finished.notify_one();
    }
}

/// A vendor response body holding a concurrency slot (see the module doc).
struct Delivering<G> {
    shared: Arc<Delivery<G>>,
}

impl<G: Send + 'static> Body for Delivering<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let shared = &self.shared;
        shared.awaiting_client.store(false, Ordering::Release);
        if shared.abandoned.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err("the client stopped reading the response".into())));
        }
        let mut inner = shared.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(body) = inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) if !inner.as_ref().is_some_and(Body::is_end_stream) => {
                shared.handed_at.store(shared.now_ms(), Ordering::Release);
                shared.awaiting_client.store(true, Ordering::Release);
            }
            // The vendor's last byte is handed on (or it failed): the slot is free now, however
            // far behind the client is.
            Poll::Ready(_) => {
                drop(inner);
                shared.release();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let inner = self.shared.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.shared.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

impl<G> Drop for Delivering<G> {
    fn drop(&mut self) {
        self.shared.release();
    }
}

/// What happens to a response the client stopped reading.
pub struct Abandon {
    /// How long the client may take no bytes.
    pub idle: Duration,
    /// Closes the client's connection (HTTP/1).
    pub connection: Option<ConnectionAbort>,
    /// Called once, when the response is abandoned (a metric, a log line).
    pub on_abandon: Box<dyn FnOnce() + Send>,
}

/// `body`, holding `guard` (a concurrency slot) until the vendor's last byte is handed on, the
/// body is dropped, or the client takes no bytes for `abandon.idle`.
pub fn delivering<G: Send + Sync + 'static>(body: ProxyBody, guard: G, abandon: Abandon) -> ProxyBody {
    if body.is_end_stream() {
        return body;
    }
    let shared = Arc::new(Delivery {
        inner: Mutex::new(Some(body)),
        guard: Mutex::new(Some(guard)),
        epoch: Instant::now(),
        handed_at: AtomicU64::new(0),
        // Until hyper first asks, the client has not taken the head either.
        awaiting_client: AtomicBool::new(true),
        abandoned: AtomicBool::new(false),
        finished: tokio::sync::Notify::new(),
    });
    tokio::spawn(watch_delivery(shared.clone(), abandon));
    Delivering { shared }.boxed()
}

/// Wakes when the client has been idle for `idle`; gives up the slot and the vendor body then.
async fn watch_delivery<G>(shared: Arc<Delivery<G>>, abandon: Abandon) {
    let Abandon { idle, connection, on_abandon } = abandon;
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
    loop {
        // While the client waits on the vendor, nothing can be the client's fault for a while.
        let wait_ms = if shared.awaiting_client.load(Ordering::Acquire) {
            shared.handed_at.load(Ordering::Acquire).saturating_add(idle_ms).saturating_sub(shared.now_ms())
        } else {
            idle_ms
        };
        tokio::select! {
            () = shared.finished.notified() => return,
            () = tokio::time::sleep(Duration::from_millis(wait_ms.max(1))) => {}
        }
        if shared.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none() {
            return;
        }
        let quiet = shared.now_ms().saturating_sub(shared.handed_at.load(Ordering::Acquire));
        if shared.awaiting_client.load(Ordering::Acquire) && quiet >= idle_ms {
            shared.abandoned.store(true, Ordering::Release);
            // Dropping the vendor's body closes (or resets) its connection: the vendor stops
            // counting the request, as sluice's slot does.
            drop(shared.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
            shared.release();
            if let Some(connection) = connection {
                connection.0.cancel();
            }
            on_abandon();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slot(Arc<AtomicBool>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    fn abandon(idle: Duration) -> Abandon {
        Abandon { idle, connection: None, on_abandon: Box::new(|| {}) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_upload_fails_typed_and_is_timed_as_the_clients() {
        let (_sender, pending) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let inner = http_body_util::StreamBody::new(tokio_stream_from(pending));
        let (mut body, watch) = upload(inner, 1024, Duration::from_secs(2));
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(upload_error_in(error.as_ref()), Some(UploadError::Stalled { .. })), "{error}");
        assert!(matches!(watch.failure(), Some(UploadError::Stalled { .. })));
        assert_eq!(watch.client_time(Instant::now()), Duration::from_secs(2));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_is_released_at_the_last_frame_or_when_the_client_stops_reading() {
        // Fully handed on: released before the client polls the end.
        let released = Arc::new(AtomicBool::new(false));
        let mut body = delivering(full("done"), Slot(released.clone()), abandon(Duration::from_secs(5)));
        assert!(body.frame().await.unwrap().is_ok());
        assert!(released.load(Ordering::Acquire), "released with the last frame, before the end is polled");

        let released = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        sender.send(Ok(Frame::data(Bytes::from_static(b"part")))).await.unwrap();
        let inner = http_body_util::StreamBody::new(tokio_stream_from(receiver)).boxed();
        let mut body = delivering(inner, Slot(released.clone()), abandon(Duration::from_secs(5)));
        assert!(body.frame().await.unwrap().is_ok());
        // The client reads nothing more: after the idle time the slot is back.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!released.load(Ordering::Acquire));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(released.load(Ordering::Acquire), "released after the client went idle");
        assert!(body.frame().await.unwrap().is_err(), "the abandoned body ends with an error");
        drop(sender);
    }

    /// A stream over an mpsc receiver (tokio-stream is not a dependency).
    fn tokio_stream_from(
        mut receiver: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }
}
