//! BATCH: CRM quotas count calls, not records. Single-record calls that
//! match a batch rule wait (at most `max_delay`) to be folded into one bulk call, and each caller
//! still gets its own single answer.
//!
//! Calls are grouped by rule, captured path values, query, client, and every header that would
//! travel on the bulk call (credentials, tenant and scope headers, vendor options), compared by
//! a full SHA-256: calls made with different tokens never share a batch. The bulk call is made
//! from the rule and those shared headers only, so no caller's own controls (`Sluice-*`,
//! `Connection`, `Accept`, deadlines) decide it for the others; and a bulk answer that cannot be
//! split gives each caller an error of its own, never the vendor's body, which may quote the
//! other callers' inputs. A batch flushes at `max_items` or `max_delay` after its first call;
//! the flush goes down the same stack as any request (retry, breaker, limiter with the bulk
//! route's cost, vendor feedback), so it takes its own quota token. Calls that opt out
//! (`Sluice-Batch: off`), carry a precondition (`If-Match`, ...), don't parse as the expected
//! JSON, or are too big pass through unbatched. Every queue is bounded; a caller that goes away
//! leaves its mates unharmed. Calls of different consumers may share a batch (the consumer is
//! not a header the vendor sees); the bulk call carries each item's consumer, so the limiter
//! shares its tokens out among the items' callers.
//!
//! What a vendor's bulk endpoint looks like is not known here: each format is a [`BulkFormat`]
//! in its own file, listed in [`FORMATS`], so a new format is that file and its line there.
//!
//! The room stands above `upstream` (the hop-by-hop list), `security` (the caller's identity) and
//! `vendor` (a bulk throttle's `Retry-After`); `state` asks [`check`] about the rules when it
//! builds a generation.

pub mod format;
pub mod hubspot;
pub mod salesforce;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::body::{self, ProxyBody};
use crate::config::{BatchRule, Lane, ScopeKey, Upstream};
use crate::consumer::{Consumer, ItemConsumers};
use crate::controls::RequestControls;
use crate::error::{ErrorKind, ProxyError};
use crate::request::Routed;
use crate::telemetry::Metrics;
pub use format::{check, BulkFormat};
use format::{BatchOp, Item, Single};

/// Every bulk format a batch rule may name. A new format is a file beside `hubspot.rs` and
/// `salesforce.rs` implementing [`BulkFormat`], and one line here.
pub static FORMATS: &[&dyn BulkFormat] = &[&hubspot::Hubspot, &salesforce::Collections];

/// The format a rule's `format:` names.
pub fn format(name: &str) -> Option<&'static dyn BulkFormat> {
    FORMATS.iter().copied().find(|format| format.name() == name)
}

use crate::kit::BoxFuture;
type Inner = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;
type Reply = Result<Response<ProxyBody>, ProxyError>;

pub use crate::controls::BATCH_HEADER as OPT_OUT_HEADER;

/// Largest single body that is batched; bigger calls pass through.
const MAX_ITEM_BYTES: u64 = 256 * 1024;

/// Most batches filling at once; past this, calls pass through rather than queue.
const MAX_OPEN_BATCHES: usize = 10_000;

/// Largest bulk answer read for splitting.
const MAX_BULK_ANSWER: usize = 32 * 1024 * 1024;

/// Headers that belong to one call, not to what the vendor is asked: each caller's own request
/// controls, framing, content negotiation and tracing. They are left off the bulk call (which
/// sets its own) and play no part in grouping. Every other header (credentials such as
/// `Authorization`, `X-Api-Key` or `Cookie`, tenant headers, vendor options) travels on the
/// bulk call, so calls share a batch only when all of those are equal. Hop-by-hop headers,
/// those `Connection` names, and `Sluice-*` are per call too.
const PER_CALL_HEADERS: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "b3",
    "baggage",
    "cache-control",
    "content-encoding",
    "content-length",
    "content-type",
    "date",
    "expect",
    "forwarded",
    "host",
    "idempotency-key",
    "pragma",
    "traceparent",
    "tracestate",
    "user-agent",
    "via",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-spanid",
    "x-b3-traceid",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];

/// Preconditions hold for one record's single call; a bulk call cannot carry them, so a call
/// with one goes alone.
const PRECONDITION_HEADERS: &[&str] =
    &["if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range"];

#[derive(Clone)]
pub struct BatchLayer {
    pub batcher: Arc<Batcher>,
}

impl<S> Layer<S> for BatchLayer {
    type Service = Batch<S>;
    fn layer(&self, inner: S) -> Batch<S> {
        Batch { inner, batcher: self.batcher.clone() }
    }
}

#[derive(Clone)]
pub struct Batch<S> {
    inner: S,
    batcher: Arc<Batcher>,
}

impl<S> Service<Request<ProxyBody>> for Batch<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Reply>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let Some(candidate) = Candidate::of(&request) else {
            // Not batchable: straight to the inner service, which our caller made ready.
            return Box::pin(self.inner.call(request));
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let batcher = self.batcher.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = crate::body::collect_upload(body, MAX_ITEM_BYTES)
                .await
                .map_err(|kind| ProxyError::new(kind, Some(candidate.upstream.name.clone())))?;
            let Some(item_body) = candidate.parse_body(&bytes) else {
                // Not the JSON the bulk endpoint expects: the vendor answers it as a single call.
                let request = Request::from_parts(parts, body::full(bytes));
                let response: BoxFuture<_> = Box::pin(inner.oneshot(request));
                return response.await;
            };
            let waiter = batcher.enqueue(candidate, parts, item_body, BoxCloneSyncService::new(inner.clone()));
            match waiter {
                Ok(receiver) => receiver.await,
                Err(parts) => {
                    let request = Request::from_parts(*parts, body::full(bytes));
                    let response: BoxFuture<_> = Box::pin(inner.oneshot(request));
                    response.await
                }
            }
        })
    }
}

/// A request that matches a batch rule, before its body is read.
struct Candidate {
    upstream: Arc<Upstream>,
    rule_index: usize,
    format: &'static dyn BulkFormat,
    op: BatchOp,
    captures: Vec<(String, String)>,
    id: Option<String>,
}

impl Candidate {
    fn of(request: &Request<ProxyBody>) -> Option<Self> {
        let routed = request.extensions().get::<Routed>()?;
        let upstream = &routed.upstream;
        if upstream.batch.is_empty() {
            return None;
        }
        let opted_out = request.extensions().get::<RequestControls>().is_some_and(|controls| !controls.batch);
        if opted_out {
            return None;
        }
        if PRECONDITION_HEADERS.iter().any(|name| request.headers().contains_key(*name)) {
            return None;
        }
        let path = routed.uri.path();
        let (rule_index, rule, captured) = upstream.batch.iter().enumerate().find_map(|(index, rule)| {
            (rule.method == request.method()).then(|| rule.path.captures(path)).flatten().map(|c| (index, rule, c))
        })?;
        let fits = request.body().size_hint().upper().is_some_and(|upper| upper <= MAX_ITEM_BYTES);
        if !fits {
            return None;
        }
        let (format, op) = format::plan(rule)?;
        if !format.accepts_query(op, routed.uri.query()) {
            return None;
        }
        let id = captured.iter().find(|(name, _)| *name == "id").map(|(_, value)| (*value).to_owned());
        let captures = captured
            .iter()
            .filter(|(name, _)| *name != "id")
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Some(Self { upstream: upstream.clone(), rule_index, format, op, captures, id })
    }

    fn rule(&self) -> &BatchRule {
        &self.upstream.batch[self.rule_index]
    }

    /// The item body, when the single call carries what the bulk endpoint expects.
    fn parse_body(&self, bytes: &Bytes) -> Option<serde_json::Value> {
        self.format.item_body(self.op, bytes, &self.captures, self.id.as_deref())
    }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (decode(name), decode(value)),
            None => (decode(pair), String::new()),
        })
        .collect();
    pairs.sort();
    pairs
}

/// Percent-decoding for query values (`%2C` in property lists).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' if at + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[at + 1..at + 3]).unwrap_or("zz"), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        at += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        at += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which calls may share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    upstream: Arc<str>,
    rule: usize,
    captures: Vec<(String, String)>,
    query: Vec<(String, String)>,
    /// The authenticated client: one client's calls never wait on, or fail with, another's.
    client: Option<Arc<str>>,
    /// The caller's address, when a quota is scoped by it.
    peer: Option<std::net::IpAddr>,
    /// SHA-256 of the headers the bulk call carries ([`SharedHead`]).
    head: [u8; 32],
}

/// The headers every call of a batch sends alike (equal by the group key's hash) and the bulk
/// call carries, and the request facts the layers below read. Nothing else of any caller's head.
struct SharedHead {
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

impl SharedHead {
    /// The part of a call's head that goes on the bulk call; see [`PER_CALL_HEADERS`].
    fn of(parts: &http::request::Parts, upstream: &Upstream) -> Self {
        let named_by_connection: Vec<String> = parts
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .collect();
        // What the vendor must see for the bulk call to be counted and authorised as each call
        // would be, whatever the lists above say.
        let kept = kept_headers(upstream);
        let mut headers = http::HeaderMap::new();
        for (name, value) in &parts.headers {
            let name_text = name.as_str();
            let per_call = PER_CALL_HEADERS.contains(&name_text)
                || name_text.starts_with("sluice-")
                || crate::upstream::headers::is_hop_by_hop(name)
                || named_by_connection.iter().any(|named| named == name_text);
            if !per_call || kept.contains(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        // The bulk call runs on the caller's generation, connection facts and identity, but
        // nothing that is this one call's own: its controls, its upload, its connection's abort
        // switch, an upgrade, or its destination (the bulk call gets its own).
        let mut extensions = parts.extensions.clone();
        extensions.remove::<crate::request::RequestControls>();
        // Each item spends for its own caller (`ItemConsumers`, set when the batch is sent).
        extensions.remove::<Consumer>();
        extensions.remove::<Arc<crate::body::UploadWatch>>();
        extensions.remove::<crate::body::ConnectionAbort>();
        extensions.remove::<hyper::upgrade::OnUpgrade>();
        extensions.remove::<Routed>();
        Self { headers, extensions }
    }

    /// SHA-256 over the headers, by name, each value in the order sent.
    fn digest(&self) -> [u8; 32] {
        let mut names: Vec<&http::HeaderName> = self.headers.keys().collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for name in names {
            for value in self.headers.get_all(name) {
                // Names and values never hold NUL or LF, so this framing is unambiguous.
                context.update(name.as_str().as_bytes());
                context.update(b"\0");
                context.update(value.as_bytes());
                context.update(b"\n");
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        out
    }
}

/// Headers kept on the bulk call even when they are per call by the rules above: the injected
/// credential's header, and the headers quota scopes read (so the bulk call is charged to the
/// callers' bucket).
fn kept_headers(upstream: &Upstream) -> Vec<http::HeaderName> {
    let mut kept = Vec::new();
    if let Some(credentials) = &upstream.credentials {
        kept.push(credentials.header.clone());
    }
    // Forward strips `Proxy-Authorization` before the vendor either way.
    kept.extend(upstream.limits.quotas.iter().flat_map(|quota| &quota.scope).filter_map(ScopeKey::header));
    kept
}

struct Waiter {
    item: Item,
    /// Who this call spends for: the bulk call's tokens are shared out by item.
    consumer: Option<Arc<str>>,
    /// This call's lane: the bulk call takes the most urgent of its items'.
    lane: Lane,
    reply: oneshot::Sender<Reply>,
    span: tracing::Span,
}

struct Open {
    /// Tells the delay timer which batch it was started for.
    serial: u64,
    waiters: Vec<Waiter>,
    /// What every call of the batch shares: the bulk call is made from it and the rule.
    head: SharedHead,
    /// Where the batch goes (the first call's route: the same upstream and rule for all).
    routed: Routed,
    inner: Inner,
    /// The rule the batch was opened for (read, update and archive may share one path).
    rule: BatchRule,
    format: &'static dyn BulkFormat,
    op: BatchOp,
}

/// All batches currently filling, shared by every connection.
pub struct Batcher {
    open: Mutex<HashMap<GroupKey, Open>>,
    next_serial: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Copy)]
enum FlushReason {
    Size,
    Delay,
}

impl FlushReason {
    fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Delay => "delay",
        }
    }
}

impl Batcher {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { open: Mutex::new(HashMap::new()), next_serial: 0.into(), metrics })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Open>> {
        crate::kit::lock(&self.open)
    }

    /// Queues a call; its answer arrives on the receiver. Gives the head back when the call
    /// cannot be queued (too many open batches), so it goes through unbatched.
    fn enqueue(
        self: &Arc<Self>,
        candidate: Candidate,
        parts: http::request::Parts,
        body: serde_json::Value,
        inner: Inner,
    ) -> Result<BoxFuture<Reply>, Box<http::request::Parts>> {
        let rule = candidate.rule().clone();
        let Some(routed) = parts.extensions.get::<Routed>().cloned() else {
            return Err(Box::new(parts));
        };
        let head = SharedHead::of(&parts, &candidate.upstream);
        let by_peer = candidate.upstream.limits.quotas.iter().any(|quota| quota.scope.iter().any(ScopeKey::reads_peer));
        let key = GroupKey {
            upstream: candidate.upstream.name.clone(),
            rule: candidate.rule_index,
            captures: candidate.captures.clone(),
            query: query_pairs(routed.uri.query()),
            client: parts.extensions.get::<crate::security::clients::ClientIdentity>().map(|id| id.name.clone()),
            peer: parts.extensions.get::<std::net::SocketAddr>().map(|peer| peer.ip()).filter(|_| by_peer),
            head: head.digest(),
        };
        let serial = self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let trace = format!("sluice-{serial:x}");
        let (reply, receiver) = oneshot::channel();
        let waiter = Waiter {
            item: Item { id: candidate.id.clone(), body, trace },
            consumer: parts.extensions.get::<Consumer>().map(|consumer| consumer.0.clone()),
            lane: parts.extensions.get::<Lane>().copied().unwrap_or_default(),
            reply,
            span: tracing::Span::current(),
        };

        let mut open = self.lock();
        let full = match open.get_mut(&key) {
            Some(batch) => {
                // The same record twice in one bulk call has no defined answer: it goes alone.
                if waiter.item.id.is_some() && batch.waiters.iter().any(|queued| queued.item.id == waiter.item.id) {
                    return Err(Box::new(parts));
                }
                batch.waiters.push(waiter);
                batch.waiters.len() >= rule.max_items
            }
            None => {
                if open.len() >= MAX_OPEN_BATCHES {
                    return Err(Box::new(parts));
                }
                open.insert(
                    key.clone(),
                    Open {
                        serial,
                        waiters: vec![waiter],
                        head,
                        routed,
                        inner,
                        rule: rule.clone(),
                        format: candidate.format,
                        op: candidate.op,
                    },
                );
                let batcher = self.clone();
                let timer_key = key.clone();
                let delay = rule.max_delay;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    batcher.flush_if(&timer_key, Some(serial), FlushReason::Delay);
                });
                false
            }
        };
        // A full batch leaves the map under the same lock that filled it: no call can join it
        // after it is full, and a new batch for the key starts empty.
        let flushed = if full { open.remove(&key) } else { None };
        drop(open);
        if let Some(batch) = flushed {
            let batcher = self.clone();
            tokio::spawn(async move { batcher.send(batch, FlushReason::Size).await });
        }
        // A backstop only: a flush answers every waiter, even when the bulk call fails.
        let upstream = candidate.upstream.clone();
        let patience = rule.max_delay
            + upstream.request_timeout.saturating_mul(upstream.retry.map_or(1, |r| r.attempts))
            + upstream.limits.max_queue_wait
            + Duration::from_secs(5);
        Ok(Box::pin(async move {
            match tokio::time::timeout(patience, receiver).await {
                Ok(Ok(reply)) => reply,
                _ => Err(ProxyError::new(ErrorKind::ResponseTimeout { after: patience }, Some(upstream.name.clone()))),
            }
        }))
    }

    /// Takes the batch at `key` out (only the one with `serial`, when given) and sends it.
    fn flush_if(self: &Arc<Self>, key: &GroupKey, serial: Option<u64>, reason: FlushReason) {
        let batch = {
            let mut open = self.lock();
            match open.get(key) {
                Some(batch) if serial.is_none_or(|serial| batch.serial == serial) => open.remove(key),
                _ => None,
            }
        };
        let Some(batch) = batch else { return };
        let batcher = self.clone();
        tokio::spawn(async move { batcher.send(batch, reason).await });
    }

    async fn send(&self, batch: Open, reason: FlushReason) {
        let Open { waiters, head, routed, inner, rule, format, op, .. } = batch;
        let upstream = routed.upstream.clone();
        let name: &str = &upstream.name;
        self.metrics.batch_size.with_label_values(&[name]).observe(waiters.len() as f64);
        self.metrics.batch_flushes.with_label_values(&[name, reason.as_str()]).inc();
        self.metrics.batch_calls_saved.with_label_values(&[name]).inc_by(waiters.len().saturating_sub(1) as u64);

        let span = tracing::info_span!("batch_flush", upstream = name, size = waiters.len(), reason = reason.as_str());
        for waiter in &waiters {
            waiter.span.follows_from(&span);
        }
        let items: Vec<Item> = waiters.iter().map(|waiter| waiter.item.clone()).collect();
        let consumers = ItemConsumers(
            waiters
                .iter()
                .map(|waiter| waiter.consumer.clone().unwrap_or_else(|| Arc::from(crate::consumer::NONE)))
                .collect(),
        );
        let lane = waiters.iter().map(|waiter| waiter.lane).min().unwrap_or_default();
        let result = match bulk_request(&rule, format, op, &routed, head, &items) {
            Ok(mut request) => {
                request.extensions_mut().insert(consumers);
                request.extensions_mut().insert(lane);
                let exchange: BoxFuture<Result<(http::response::Parts, Bytes), ProxyError>> =
                    Box::pin(exchange(inner, request, upstream.name.clone()));
                exchange.instrument(span).await
            }
            Err(error) => Err(error),
        };

        match result {
            Err(error) => {
                for waiter in waiters {
                    let _ = waiter.reply.send(Err(ProxyError::new((*error.kind).clone(), error.upstream.clone())));
                }
            }
            Ok((parts, bytes)) => {
                let split = format.splittable(op, parts.status).then(|| format.split(op, &bytes, &items));
                match split {
                    Some(Ok(singles)) => {
                        for (waiter, single) in waiters.into_iter().zip(singles) {
                            let reply = match single {
                                Some(single) => {
                                    if !single.status.is_success() {
                                        self.metrics.batch_item_errors.with_label_values(&[name]).inc();
                                    }
                                    Ok(single_response(&parts, single))
                                }
                                None => Err(ProxyError::new(
                                    ErrorKind::UpstreamProtocol {
                                        detail: "the bulk answer says nothing of this call".into(),
                                    },
                                    Some(upstream.name.clone()),
                                )),
                            };
                            let _ = waiter.reply.send(reply);
                        }
                    }
                    // A 2xx that can't be split would tell every caller it succeeded: it is a 502.
                    Some(Err(error)) => {
                        for waiter in waiters {
                            let _ = waiter.reply.send(Err(ProxyError::new(
                                ErrorKind::UpstreamProtocol { detail: format!("bulk answer: {error}") },
                                Some(upstream.name.clone()),
                            )));
                        }
                    }
                    // A whole-batch failure: its body may quote any caller's input (a vendor's
                    // validation error names the bad email), so each caller gets its own error.
                    None => {
                        for waiter in waiters {
                            let _ = waiter.reply.send(Err(whole_batch_failure(&parts, upstream.name.clone())));
                        }
                    }
                }
            }
        }
    }
}

/// Sends the bulk call and reads its whole (bounded) answer.
async fn exchange(
    inner: Inner,
    request: Request<ProxyBody>,
    upstream: Arc<str>,
) -> Result<(http::response::Parts, Bytes), ProxyError> {
    let response: BoxFuture<Reply> = Box::pin(inner.oneshot(request));
    let (parts, body) = response.await?.into_parts();
    let collected: BoxFuture<Result<http_body_util::Collected<Bytes>, crate::body::BoxError>> =
        Box::pin(http_body_util::Limited::new(body, MAX_BULK_ANSWER).collect());
    let bytes = collected.await.map_err(|error| {
        ProxyError::new(ErrorKind::UpstreamProtocol { detail: format!("bulk answer: {error}") }, Some(upstream))
    })?;
    Ok((parts, bytes.to_bytes()))
}

/// What each caller gets when the vendor answered the bulk call as a whole, with a status the
/// format does not split: a throttle stays a throttle (`429`, the vendor's `Retry-After`), and
/// anything else is a `502` naming the status. The vendor's body is never passed on.
fn whole_batch_failure(bulk: &http::response::Parts, upstream: Arc<str>) -> ProxyError {
    if bulk.status == StatusCode::TOO_MANY_REQUESTS {
        let mut malformed = 0;
        let retry_after = crate::vendor::retry_after(&bulk.headers, std::time::SystemTime::now(), &mut malformed)
            .unwrap_or(Duration::from_secs(1));
        return ProxyError::new(
            ErrorKind::RateLimited { quota: "vendor".into(), retry_after, rate_limit: None, policy: None },
            Some(upstream),
        );
    }
    ProxyError::new(
        ErrorKind::UpstreamProtocol {
            detail: format!(
                "the vendor answered the bulk call with {} and no per-call results; send this call with \
                 `Sluice-Batch: off` for its own answer",
                bulk.status
            ),
        },
        Some(upstream),
    )
}

/// The bulk call: the rule's method and path, the headers all its calls share, and a fresh
/// body, accept and encoding of its own.
fn bulk_request(
    rule: &BatchRule,
    format: &dyn BulkFormat,
    op: BatchOp,
    routed: &Routed,
    head: SharedHead,
    items: &[Item],
) -> Result<Request<ProxyBody>, ProxyError> {
    let upstream = routed.upstream.clone();
    let captures = rule.path.captures(routed.uri.path()).unwrap_or_default();
    let mut path = rule.bulk_path.clone();
    for (name, value) in &captures {
        path = path.replace(&format!("{{{name}}}"), value);
    }
    let query = query_pairs(routed.uri.query());
    if let Some(bulk_query) = format.bulk_query(op, &query) {
        path.push('?');
        path.push_str(&bulk_query);
    }
    let mut parts = routed.uri.clone().into_parts();
    parts.path_and_query = Some(path.parse().map_err(|_| {
        ProxyError::new(ErrorKind::Internal { detail: "bad bulk path".into() }, Some(upstream.name.clone()))
    })?);
    let uri = Uri::from_parts(parts).map_err(|error| {
        ProxyError::new(ErrorKind::Internal { detail: error.to_string() }, Some(upstream.name.clone()))
    })?;
    let body = serde_json::to_vec(&format.wrap(op, items, &query)).unwrap_or_default();
    let mut request = Request::new(body::full(Bytes::from(body)));
    *request.method_mut() = rule.bulk_method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = head.headers;
    *request.extensions_mut() = head.extensions;
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    // The answer must be read to be split: ask for it uncompressed.
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    // The first caller's deadline and wait are its own, not the group's.
    request.extensions_mut().remove::<RequestControls>();
    request.extensions_mut().insert(Routed { upstream, uri });
    Ok(request)
}

/// One caller's answer, with the bulk answer's headers (rate-limit state, vendor ids).
fn single_response(bulk: &http::response::Parts, single: Single) -> Response<ProxyBody> {
    let bytes = single.body.map(|body| serde_json::to_vec(&body).unwrap_or_default());
    let mut response = Response::new(match &bytes {
        Some(bytes) => body::full(Bytes::from(bytes.clone())),
        None => body::empty(),
    });
    *response.status_mut() = single.status;
    *response.headers_mut() = bulk.headers.clone();
    response.headers_mut().remove(CONTENT_LENGTH);
    // These would name one record of the batch, not necessarily this caller's.
    response.headers_mut().remove(http::header::LOCATION);
    response.headers_mut().remove(http::header::CONTENT_LOCATION);
    if bytes.is_none() {
        response.headers_mut().remove(CONTENT_TYPE);
    }
    *response.extensions_mut() = bulk.extensions.clone();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Arc<Upstream> {
        let config = crate::config::Config::from_yaml(
            "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }
upstreams:
  - name: hubspot
    prefix: /hubspot
    target: 'https://api.hubapi.com'
    credentials: { header: x-token, value_env: SLUICE_BATCH_UNIT_TOKEN, mode: if_absent }
    quotas: [{ name: q, limit: 10, per: 1s, key: ['header:user-agent', proxy_user] }]
",
        )
        .unwrap();
        config.live.upstreams[0].clone()
    }

    fn head(headers: &[(&str, &str)]) -> SharedHead {
        let mut request = Request::post("/hubspot/crm/v3/objects/contacts");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        SharedHead::of(&parts, &upstream())
    }

    #[test]
    fn the_bulk_head_carries_only_what_every_call_shares() {
        let head = head(&[
            ("authorization", "Bearer a"),
            ("x-token", "t"),
            ("x-tenant", "acme"),
            ("user-agent", "sdk/1"),
            ("proxy-authorization", "Basic eDp5"),
            ("sluice-deadline", "0.001"),
            ("sluice-max-wait", "0"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "hop"),
            ("accept", "application/xml"),
            ("idempotency-key", "k1"),
            ("x-request-id", "r1"),
            ("content-length", "10"),
        ]);
        let names: Vec<&str> = head.headers.keys().map(http::HeaderName::as_str).collect();
        // Credentials, tenant and the scope headers (user-agent, proxy-authorization for proxy_user).
        assert_eq!(names, ["authorization", "x-token", "x-tenant", "user-agent", "proxy-authorization"]);
    }

    #[test]
    fn any_difference_in_shared_headers_is_another_batch() {
        let a = head(&[("authorization", "Bearer a"), ("x-request-id", "1"), ("accept", "*/*")]).digest();
        let same = head(&[("x-request-id", "2"), ("authorization", "Bearer a"), ("sluice-deadline", "1")]).digest();
        assert_eq!(a, same, "per-call headers do not split a batch");
        for other in [
            head(&[("authorization", "Bearer b")]),
            head(&[("authorization", "Bearer a"), ("x-token", "t")]),
            head(&[("authorization", "Bearer a"), ("cookie", "s=1")]),
            head(&[("authorization", "Bearer a"), ("x-zendesk-token", "z")]),
            head(&[("authorization", "Bearer a"), ("connection", "authorization")]),
        ] {
            assert_ne!(a, other.digest(), "{:?}", other.headers);
        }
    }

    #[test]
    fn queries_are_decoded() {
        assert_eq!(decode("email%2Cfirstname"), "email,firstname");
    }
}
