//! Step 5a of the journey, BATCH: CRM quotas count calls, not records. Single-record calls that
//! match a batch rule wait (at most `max_delay`) to be folded into one bulk call, and each caller
//! still gets its own single answer.
//!
//! Calls are grouped by rule, captured path values, query, quota scope and credentials: calls
//! made with different tokens never share a batch. A batch flushes at `max_items` or `max_delay`
//! after its first call; the flush goes down the same stack as any request (retry, breaker,
//! limiter with the bulk route's cost, vendor feedback), so it takes its own quota token. Calls
//! that opt out (`Sluice-Batch: off`), don't parse as the expected JSON, or are too big pass
//! through unbatched. Every queue is bounded; a caller that goes away leaves its mates unharmed.

pub mod codec;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::body::{self, ProxyBody};
use crate::config::policy::{BatchOp, BatchRule};
use crate::config::Upstream;
use crate::controls::RequestControls;
use crate::error::{ErrorKind, ProxyError};
use crate::proxy::route::Routed;
use crate::telemetry::Metrics;
use codec::{Item, Single};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Inner = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;
type Reply = Result<Response<ProxyBody>, ProxyError>;

pub use crate::controls::BATCH_HEADER as OPT_OUT_HEADER;

/// Largest single body that is batched; bigger calls pass through.
const MAX_ITEM_BYTES: u64 = 256 * 1024;

/// Most batches filling at once; past this, calls pass through rather than queue.
const MAX_OPEN_BATCHES: usize = 10_000;

/// Largest bulk answer read for splitting.
const MAX_BULK_ANSWER: usize = 32 * 1024 * 1024;

/// Headers that identify the caller to the vendor: calls differing in any never share a batch.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "x-api-key", "api-key", "cookie", "x-hubspot-api-key"];

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
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let kind = if error.is::<http_body_util::LengthLimitError>() {
                        ErrorKind::BodyTooLarge { limit: MAX_ITEM_BYTES }
                    } else {
                        ErrorKind::Malformed { detail: format!("request body: {error}") }
                    };
                    return Err(ProxyError::new(kind, Some(candidate.upstream.name.clone())));
                }
            };
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
        let path = routed.uri.path();
        let (rule_index, rule, captured) = upstream.batch.iter().enumerate().find_map(|(index, rule)| {
            (rule.method == request.method()).then(|| rule.path.captures(path)).flatten().map(|c| (index, rule, c))
        })?;
        let fits = request.body().size_hint().upper().is_some_and(|upper| upper <= MAX_ITEM_BYTES);
        if !fits {
            return None;
        }
        if rule.op == BatchOp::Read && !read_query_batchable(routed.uri.query()) {
            return None;
        }
        let id = captured.iter().find(|(name, _)| *name == "id").map(|(_, value)| (*value).to_owned());
        let captures = captured
            .iter()
            .filter(|(name, _)| *name != "id")
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Some(Self { upstream: upstream.clone(), rule_index, captures, id })
    }

    fn rule(&self) -> &BatchRule {
        &self.upstream.batch[self.rule_index]
    }

    /// The item body, when the single call carries what the bulk endpoint expects.
    fn parse_body(&self, bytes: &Bytes) -> Option<serde_json::Value> {
        let rule = self.rule();
        match rule.op {
            BatchOp::Read | BatchOp::Archive => {
                bytes.iter().all(u8::is_ascii_whitespace).then_some(serde_json::Value::Null)
            }
            BatchOp::Create | BatchOp::Update => {
                let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
                let map = value.as_object_mut()?;
                if rule.format == crate::config::file_types::BatchFormat::SalesforceCollections {
                    let sobject = self.captures.iter().find(|(name, _)| name == "sobject").map(|(_, v)| v.clone())?;
                    map.insert("attributes".into(), serde_json::json!({ "type": sobject }));
                    if let Some(id) = &self.id {
                        map.insert("id".into(), serde_json::json!(id));
                    }
                }
                Some(value)
            }
        }
    }
}

/// HubSpot batch read takes `properties`, `propertiesWithHistory`, `idProperty`, `archived`;
/// a single read asking for anything else (associations, say) is not batched.
fn read_query_batchable(query: Option<&str>) -> bool {
    query.is_none_or(|query| {
        query.split('&').filter(|pair| !pair.is_empty()).all(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            matches!(name, "properties" | "propertiesWithHistory" | "idProperty" | "archived")
        })
    })
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
    scope: Vec<String>,
    credentials: String,
}

struct Waiter {
    item: Item,
    reply: oneshot::Sender<Reply>,
    span: tracing::Span,
}

struct Open {
    /// Tells the delay timer which batch it was started for.
    serial: u64,
    waiters: Vec<Waiter>,
    /// The first call's request head: the bulk call is made with its headers and extensions.
    template: http::request::Parts,
    inner: Inner,
    /// The rule the batch was opened for (read, update and archive may share one path).
    rule: BatchRule,
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
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let routed_query = parts.extensions.get::<Routed>().and_then(|r| r.uri.query().map(str::to_owned));
        let key = GroupKey {
            upstream: candidate.upstream.name.clone(),
            rule: candidate.rule_index,
            captures: candidate.captures.clone(),
            query: query_pairs(routed_query.as_deref()),
            scope: candidate
                .upstream
                .limits
                .quotas
                .iter()
                .map(|quota| {
                    let peer = parts.extensions.get::<std::net::SocketAddr>().copied();
                    let client =
                        parts.extensions.get::<crate::security::clients::ClientIdentity>().map(|id| id.name.clone());
                    crate::limit::scope::quota_key_for(&quota.scope, &parts.headers, peer, client.as_deref()).0
                })
                .collect(),
            credentials: credentials_of(&parts.headers),
        };
        let serial = self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let trace = format!("sluice-{serial:x}");
        let (reply, receiver) = oneshot::channel();
        let waiter =
            Waiter { item: Item { id: candidate.id.clone(), body, trace }, reply, span: tracing::Span::current() };

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
                    Open { serial, waiters: vec![waiter], template: parts, inner, rule: rule.clone() },
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
        let Open { waiters, template, inner, rule, .. } = batch;
        let Some(routed) = template.extensions.get::<Routed>().cloned() else { return };
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
        let result = match bulk_request(&rule, &routed, template, &items) {
            Ok(request) => {
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
                let split = codec::splittable(rule.format, rule.op, parts.status)
                    .then(|| codec::split(rule.format, rule.op, &bytes, &items));
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
                    // A whole-batch failure reaches every caller as it came.
                    None => {
                        for waiter in waiters {
                            let _ = waiter.reply.send(Ok(copy_response(&parts, &bytes)));
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

fn credentials_of(headers: &http::HeaderMap) -> String {
    let mut material = String::new();
    for name in CREDENTIAL_HEADERS {
        for value in headers.get_all(*name) {
            material.push_str(name);
            material.push('=');
            material.push_str(&String::from_utf8_lossy(value.as_bytes()));
            material.push('\n');
        }
    }
    if material.is_empty() {
        return String::new();
    }
    crate::limit::scope::short_hash(&material)
}

/// The bulk call, made with the first call's head (same credentials, by grouping).
fn bulk_request(
    rule: &BatchRule,
    routed: &Routed,
    mut head: http::request::Parts,
    items: &[Item],
) -> Result<Request<ProxyBody>, ProxyError> {
    let upstream = routed.upstream.clone();
    let captures = rule.path.captures(routed.uri.path()).unwrap_or_default();
    let mut path = rule.bulk_path.clone();
    for (name, value) in &captures {
        path = path.replace(&format!("{{{name}}}"), value);
    }
    let query = query_pairs(routed.uri.query());
    if rule.op == BatchOp::Read {
        if let Some((_, archived)) = query.iter().find(|(name, _)| name == "archived") {
            path.push_str(&format!("?archived={archived}"));
        }
    }
    let mut parts = routed.uri.clone().into_parts();
    parts.path_and_query = Some(path.parse().map_err(|_| {
        ProxyError::new(ErrorKind::Internal { detail: "bad bulk path".into() }, Some(upstream.name.clone()))
    })?);
    let uri = Uri::from_parts(parts).map_err(|error| {
        ProxyError::new(ErrorKind::Internal { detail: error.to_string() }, Some(upstream.name.clone()))
    })?;
    let body = serde_json::to_vec(&codec::wrap(rule.format, rule.op, items, &query)).unwrap_or_default();
    head.method = rule.bulk_method.clone();
    head.headers.remove(CONTENT_LENGTH);
    head.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // The answer must be read to be split: ask for it uncompressed.
    head.headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    head.headers.remove("idempotency-key");
    // The first caller's deadline and wait are its own, not the group's.
    head.extensions.remove::<RequestControls>();
    head.extensions.insert(Routed { upstream, uri });
    Ok(Request::from_parts(head, body::full(Bytes::from(body))))
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
    if bytes.is_none() {
        response.headers_mut().remove(CONTENT_TYPE);
    }
    *response.extensions_mut() = bulk.extensions.clone();
    response
}

fn copy_response(bulk: &http::response::Parts, bytes: &Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(bytes.clone()));
    *response.status_mut() = bulk.status;
    *response.headers_mut() = bulk.headers.clone();
    response.headers_mut().remove(CONTENT_LENGTH);
    *response.extensions_mut() = bulk.extensions.clone();
    if bulk.status == StatusCode::NO_CONTENT {
        *response.body_mut() = body::empty();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_queries() {
        assert!(read_query_batchable(None));
        assert!(read_query_batchable(Some("properties=email,firstname&archived=false")));
        assert!(!read_query_batchable(Some("associations=companies")));
        assert_eq!(decode("email%2Cfirstname"), "email,firstname");
    }
}
