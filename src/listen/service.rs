//! One client connection's hyper service, [`ProxyService`]: it sends CONNECT to
//! `listen::connect` and every other request down the journey (`proxy::stack`), with the
//! connection's facts as request extensions, and keeps what `listen::serve_http` and
//! `listen::guard_io` need to know about the connection (its [`Activity`], its response ledger).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tower::{Service, ServiceExt};

use super::accounting::ClientConn;
use super::guard_io::ResponseLedger;
use super::{connect, Server};
use crate::body::{ConnectionAbort, ProxyBody};
use crate::proxy::stack::HttpStack;

/// Notes what the answer says about the connection, and keeps an HTTP/2 stream counted until
/// its body is done.
fn finish(response: Response<ProxyBody>, activity: &Activity, stream: Option<OpenStream>) -> Response<ProxyBody> {
    if response.status() != StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        activity.authenticated.store(true, Ordering::Release);
    }
    match stream {
        None => response,
        Some(stream) => response.map(|body| crate::body::holding(body, stream)),
    }
}

/// What a connection's requests tell `listen::serve_http`, which decides when the connection
/// has been idle too long, and which closes it when a response was abandoned.
#[derive(Debug)]
pub struct Activity {
    epoch: tokio::time::Instant,
    /// Set when the first request head on this connection has been read.
    started: AtomicBool,
    /// Set when an HTTP/2 request arrived (HTTP/1 idleness is hyper's `header_read_timeout`).
    http2: AtomicBool,
    /// HTTP/2 streams whose response is not finished yet.
    open: AtomicUsize,
    /// Milliseconds since `epoch` when the last stream finished (or the connection opened).
    quiet_since_ms: AtomicU64,
    /// Set once a request got an answer other than `407`: an unauthenticated connection gets
    /// no more idle time than a slow one.
    authenticated: AtomicBool,
    /// Closes the connection at once (an abandoned HTTP/1 response).
    pub abort: ConnectionAbort,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            started: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            quiet_since_ms: AtomicU64::new(0),
            authenticated: AtomicBool::new(false),
            abort: ConnectionAbort::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether any request head has been read on this connection yet.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub fn authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    /// For an HTTP/2 connection with no stream open: how long it has been so. `None` while a
    /// stream is open, and for HTTP/1.
    pub fn quiet_for(&self) -> Option<std::time::Duration> {
        if !self.http2.load(Ordering::Acquire) || self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.quiet_since_ms.load(Ordering::Acquire);
        Some(std::time::Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    fn stream_done(&self) {
        self.quiet_since_ms.store(self.now_ms(), Ordering::Release);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open HTTP/2 stream, counted until its response body is finished or dropped.
struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.stream_done();
    }
}

/// The per-connection hyper service.
#[derive(Clone)]
pub struct ProxyService {
    server: Server,
    conn: Arc<ClientConn>,
    /// This connection's journey. Locked only to call it (HTTP/2 streams share it); see `call`.
    stack: Arc<std::sync::Mutex<HttpStack>>,
    activity: Arc<Activity>,
    /// The responses handed to hyper on this connection, and whether it became a tunnel (a
    /// CONNECT answered 2xx), for `listen::guard_io`.
    ledger: Arc<ResponseLedger>,
}

impl ProxyService {
    /// The service of one connection of `server`, serving `stack`.
    pub fn new(server: Server, conn: ClientConn, stack: HttpStack) -> Self {
        Self {
            server,
            conn: Arc::new(conn),
            stack: Arc::new(std::sync::Mutex::new(stack)),
            activity: Arc::new(Activity::new()),
            ledger: Arc::new(ResponseLedger::default()),
        }
    }

    /// What this connection's service has answered (see `listen::guard_io`).
    pub fn ledger(&self) -> Arc<ResponseLedger> {
        self.ledger.clone()
    }

    /// What the connection's requests are doing, for `listen::serve_http`.
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Tracked;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let activity = self.activity.clone();
        activity.started.store(true, Ordering::Release);
        // HTTP/2 streams are counted until their response ends, for the idle timeout.
        let stream = (request.version() == Version::HTTP_2).then(|| {
            activity.http2.store(true, Ordering::Release);
            activity.open.fetch_add(1, Ordering::AcqRel);
            OpenStream(activity.clone())
        });
        let generation = self.server.shared.current();
        if request.method() == Method::CONNECT && self.conn.via.tunnel_host.is_none() {
            let server = self.server.clone();
            let conn = self.conn.clone();
            let ledger = self.ledger.clone();
            let answered = Box::pin(async move {
                let response = connect::handle(request, generation, server, conn).await;
                if response.status().is_success() {
                    ledger.set_tunnelled();
                }
                Ok(finish(response, &activity, stream))
            });
            return Tracked { answered, ledger: self.ledger.clone() };
        }
        let limits = &generation.config.live.limits;
        let (mut parts, body) = request.into_parts();
        let (body, upload) = crate::body::upload(body, limits.max_body_bytes, limits.body_read_timeout);
        parts.extensions.insert(upload);
        parts.extensions.insert(activity.abort.clone());
        parts.extensions.insert(self.conn.via.clone());
        parts.extensions.insert(self.conn.peer);
        if let Some(identity) = &self.conn.identity {
            parts.extensions.insert(identity.clone());
        }
        parts.extensions.insert(generation);
        let request = Request::from_parts(parts, body);
        // Every layer is ready at once (none holds requests back in `poll_ready`), so the shared
        // stack is called in place: no per-request clone of its services, no `Oneshot`. Should a
        // layer ever not be ready, the request waits on its own clone, as tower intends.
        let mut stack = self.stack.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let answered = match stack.poll_ready(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(())) => stack.call(request),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Box::pin(stack.clone().oneshot(request)),
        };
        // HTTP/1 idleness is hyper's business: its future goes on as it is.
        let answered = match stream {
            None => answered,
            Some(stream) => Box::pin(async move {
                let Ok(response) = answered.await;
                Ok(finish(response, &activity, Some(stream)))
            }),
        };
        Tracked { answered, ledger: self.ledger.clone() }
    }
}

/// A response on its way to hyper, counted in the connection's [`ResponseLedger`] when it is
/// handed over (and as ended when hyper is done with its body).
pub struct Tracked {
    answered: Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>,
    ledger: Arc<ResponseLedger>,
}

impl Future for Tracked {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.answered.as_mut().poll(cx) {
            Poll::Ready(Ok(response)) => Poll::Ready(Ok(self.ledger.track(response))),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Poll::Pending,
        }
    }
}
