//! ROUTE, the first step that knows where a request goes: who is asking, which upstream the
//! request belongs to, and whether the caller may send it there. The room owns the route table
//! (`table`: exact hosts, wildcards, prefixes longest first) and the Route layer, which:
//!
//! - refuses a message with both framings (the smuggling backstop) and methods sluice never
//!   forwards (`TRACE`, a `CONNECT` inside a tunnel);
//! - identifies the proxy client (`clients:`) and checks its upstream list;
//! - resolves the upstream and the outgoing URI into [`Routed`];
//! - injects the upstream's static credential (never in clear text to a destination the client
//!   chose), first, so batching and quota scopes see what the vendor will see (a brokered OAuth
//!   token is set below Batch by the `oauth` layer: it is the same for every call);
//! - parses the caller's `Sluice-*` controls once, into [`RequestControls`];
//! - attributes the request to its [`Consumer`] (the client, else `Sluice-Consumer`, else the
//!   proxy user; bounded by the known set, see `consumer`) and its [`Lane`] (`Sluice-Priority`,
//!   else the consumer's own, else `normal`);
//! - refuses a declared body over `limits.max_body_bytes`.
//!
//! The layer reads the generation a request runs on through [`RouteContext`], so this room needs
//! nothing from the rooms above it.

pub mod table;

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

pub use table::RouteTable;

use crate::body::ProxyBody;
use crate::config::Lane;
use crate::consumer::{Consumer, Known};
use crate::error::{ErrorKind, ProxyError};
use crate::request::{RequestControls, Routed, Via};
use crate::security::clients::{ClientIdentity, Clients};
use crate::security::credentials::Credential;

use crate::kit::BoxFuture;

/// What Route needs of the generation a request runs on (`state::Generation` provides it).
pub trait RouteContext: Send + Sync + 'static {
    fn routes(&self) -> &RouteTable;
    /// The proxy clients allowed to use sluice, or loopback-only sidecar mode.
    fn proxy_clients(&self) -> &Clients;
    /// The credential injected into requests to `upstream`, if any.
    fn credential(&self, upstream: &str) -> Option<&Credential>;
    /// `limits.max_body_bytes`.
    fn max_body_bytes(&self) -> u64;
    /// The consumers spend may be attributed to.
    fn consumers(&self) -> &Known;
}

pub struct RouteLayer<G> {
    _generation: PhantomData<fn() -> G>,
}

impl<G> RouteLayer<G> {
    pub fn new() -> Self {
        Self { _generation: PhantomData }
    }
}

impl<G> Default for RouteLayer<G> {
    fn default() -> Self {
        Self::new()
    }
}

impl<G> Clone for RouteLayer<G> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S, G> Layer<S> for RouteLayer<G> {
    type Service = Route<S, G>;
    fn layer(&self, inner: S) -> Route<S, G> {
        Route { inner, _generation: PhantomData }
    }
}

pub struct Route<S, G> {
    inner: S,
    _generation: PhantomData<fn() -> G>,
}

impl<S: Clone, G> Clone for Route<S, G> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), _generation: PhantomData }
    }
}

impl<S, G> Service<Request<ProxyBody>> for Route<S, G>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Send + 'static,
    S::Future: Send + 'static,
    G: RouteContext,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        match route::<G>(&mut request) {
            Ok(routed) => {
                request.extensions_mut().insert(routed);
                Box::pin(self.inner.call(request))
            }
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }
}

/// Who is asking, where to, and whether they may (see the module doc).
fn route<G: RouteContext>(request: &mut Request<ProxyBody>) -> Result<Routed, ProxyError> {
    let generation = request.extensions().get::<Arc<G>>().cloned().ok_or_else(|| internal("no generation"))?;
    // A message with both framings is a smuggling attempt (RFC 9112 §6.3). hyper already drops
    // Content-Length when Transfer-Encoding is present and closes the connection after the
    // exchange; this is the backstop should any path ever hand both through.
    if request.headers().contains_key(http::header::TRANSFER_ENCODING) && request.headers().contains_key(CONTENT_LENGTH)
    {
        return Err(ProxyError::new(
            ErrorKind::Malformed { detail: "both Content-Length and Transfer-Encoding".into() },
            None,
        ));
    }
    if request.extensions().get::<ClientIdentity>().is_none() {
        let peer = request.extensions().get::<std::net::SocketAddr>().copied().unwrap_or(([127, 0, 0, 1], 0).into());
        if let Some(identity) = generation.proxy_clients().identify(request.headers(), peer)? {
            request.extensions_mut().insert(identity);
        }
    }
    let via = request.extensions().get::<Via>().cloned().unwrap_or_default();
    let routed = generation.routes().route(request, &via)?;
    if let Some(identity) = request.extensions().get::<ClientIdentity>() {
        if !identity.may_use(&routed.upstream.name) {
            return Err(ProxyError::new(
                ErrorKind::ClientNotAllowed { detail: format!("client `{}` may not use this upstream", identity.name) },
                Some(routed.upstream.name.clone()),
            ));
        }
    }
    if let Some(detail) = refused_method(request.method()) {
        return Err(ProxyError::new(
            ErrorKind::MethodNotAllowed { method: request.method().to_string(), detail: detail.into() },
            Some(routed.upstream.name.clone()),
        ));
    }
    if routed.upstream.credentials.is_some() {
        // The secret (static here, or the brokered token the oauth layer sets) never travels in
        // clear text to a destination the client chose.
        if routed.upstream.target.is_none() && routed.uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(ProxyError::new(
                ErrorKind::EgressDenied { host: "plain-http destination (credentials go over https only)".into() },
                Some(routed.upstream.name.clone()),
            ));
        }
    }
    if let Some(credential) = generation.credential(&routed.upstream.name) {
        credential.apply(request.headers_mut());
    }
    let controls = RequestControls::parse(request.headers(), Instant::now()).map_err(|error| {
        ProxyError::new(ErrorKind::Malformed { detail: error.to_string() }, Some(routed.upstream.name.clone()))
    })?;
    let client = request.extensions().get::<ClientIdentity>().map(|identity| identity.name.clone());
    let consumer: Consumer = generation.consumers().attribute(client.as_deref(), controls.consumer.as_deref(), || {
        crate::limit::scope::proxy_user(request.headers())
    });
    // The lane: what the caller asked for, else its consumer's own, else `normal`.
    let lane: Lane = controls.priority.unwrap_or_else(|| generation.consumers().lane_of(&consumer));
    request.extensions_mut().insert(lane);
    request.extensions_mut().insert(consumer);
    request.extensions_mut().insert(controls);
    let limit = generation.max_body_bytes();
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|value: &HeaderValue| value.to_str().ok());
    if let Some(declared) = declared {
        match declared.trim().parse::<u64>() {
            Ok(length) if length > limit => {
                return Err(ProxyError::new(ErrorKind::BodyTooLarge { limit }, Some(routed.upstream.name.clone())))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(ProxyError::new(
                    ErrorKind::Malformed { detail: "invalid Content-Length".into() },
                    Some(routed.upstream.name.clone()),
                ))
            }
        }
    }
    Ok(routed)
}

/// Methods sluice never forwards, and why. `TRACE` (and IIS's `TRACK`) echo the request back,
/// injected credential included. A `CONNECT` reaches the stack only inside a tunnel, where it
/// would ask the vendor to open another tunnel, with the credential, to a host of its choosing.
fn refused_method(method: &http::Method) -> Option<&'static str> {
    match method.as_str() {
        "TRACE" | "TRACK" => Some("it would echo the request, credentials included"),
        "CONNECT" => Some("a CONNECT inside a tunnel is not forwarded"),
        _ => None,
    }
}

fn internal(detail: &str) -> ProxyError {
    ProxyError::new(ErrorKind::Internal { detail: detail.to_owned() }, None)
}
