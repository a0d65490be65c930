//! One probe request, sent the way `run` sends a request to this upstream: routed by the same
//! route table (so its egress checks apply), with the upstream's injected credential, over the
//! upstream's own pooled client (its trust roots, client certificate, timeouts and the egress
//! guard in its resolver). Only what the probe needs of the answer is kept ([`Answer`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, ACCEPT, USER_AGENT};
use http::{Method, Request};
use http_body_util::BodyExt;

use super::sample::{Answer, MAX_KEPT_BODY};
use super::ProbeError;
use crate::body::{self, ProxyBody};
use crate::config::{HostPattern, Loaded, Upstream};
use crate::error::ProxyError;
use crate::request::{Routed, Via};
use crate::route::RouteTable;
use crate::security::credentials::Credential;
use crate::upstream::UpstreamClient;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Sends one probe request and returns the vendor's answer.
pub trait Transport: Send + Sync + 'static {
    fn send(&self) -> BoxFuture<Result<Answer, ProxyError>>;
}

/// Most of a successful answer's body read (and dropped) so the connection can be reused.
const MAX_DRAINED_BODY: usize = 1024 * 1024;

/// The probe's way to one upstream.
pub struct UpstreamTransport {
    client: UpstreamClient,
    routed: Routed,
    method: Method,
    credential: Option<Arc<Credential>>,
    max_body_bytes: u64,
    /// How long a body may take to arrive once the head has (the upstream's request timeout).
    body_timeout: Duration,
}

impl UpstreamTransport {
    /// Builds the client, credential and route of upstream `index` of `loaded`, for `path`.
    pub fn new(loaded: &Loaded, index: usize, path: &str, method: Method) -> Result<Self, ProbeError> {
        let upstream = loaded.config.live.upstreams.get(index).cloned().ok_or(ProbeError::Internal("no upstream"))?;
        crate::tls::install_crypto_provider();
        let client = UpstreamClient::new(&upstream, &format!("upstreams[{index}].tls"))
            .map_err(|error| ProbeError::Config(loaded.locate(error)))?;
        let credential = match &upstream.credentials {
            None => None,
            Some(settings) => Some(Arc::new(
                Credential::load(upstream.name.clone(), settings, &format!("upstreams[{index}].credentials"))
                    .map_err(|error| ProbeError::Config(loaded.locate(error)))?,
            )),
        };
        let routed = route(&upstream, path, &method)?;
        // As Route does: the secret never travels in clear text to a destination not configured.
        if credential.is_some() && upstream.target.is_none() && routed.uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(ProbeError::Unreachable(ProxyError::new(
                crate::error::ErrorKind::EgressDenied {
                    host: "plain-http destination (credentials go over https only)".into(),
                },
                Some(upstream.name.clone()),
            )));
        }
        Ok(Self {
            client,
            routed,
            method,
            credential,
            max_body_bytes: loaded.config.live.limits.max_body_bytes,
            body_timeout: upstream.request_timeout,
        })
    }

    /// The URL requests go to (no credentials in it: they travel in a header).
    pub fn url(&self) -> String {
        self.routed.uri.to_string()
    }

    /// The header the credential travels in, if the upstream injects one.
    pub fn credential_header(&self) -> Option<&str> {
        self.credential.as_ref().map(|credential| credential.header.as_str())
    }
}

/// Routes a request for `path` to `upstream` through a route table holding only it, as `run`
/// would route a reverse-mode (prefix) or forward-proxy (host) request: the same URI, the same
/// refusal of a private address the operator never named as a target.
fn route(upstream: &Arc<Upstream>, path: &str, method: &Method) -> Result<Routed, ProbeError> {
    let table = RouteTable::new(std::slice::from_ref(upstream));
    let exact_host = upstream.hosts.iter().find_map(|host| match host {
        HostPattern::Exact(name) => Some(name.clone()),
        HostPattern::Subdomains(_) => None,
    });
    let uri = match (&upstream.prefix, exact_host, &upstream.target) {
        (Some(prefix), _, _) => format!("{prefix}{path}"),
        (None, Some(host), _) => format!("https://{host}{path}"),
        (None, None, Some(target)) => {
            // Only wildcard hosts: the target is where every request goes.
            let uri = format!("{}://{}{path}", target.scheme.as_str(), target.authority);
            let uri =
                uri.parse().map_err(|_| ProbeError::BadPath { path: path.to_owned(), reason: "not a URI".into() })?;
            return Ok(Routed { upstream: upstream.clone(), uri });
        }
        (None, None, None) => return Err(ProbeError::NoAddress { upstream: upstream.name.to_string() }),
    };
    let request = Request::builder()
        .method(method.clone())
        .uri(uri.as_str())
        .body(())
        .map_err(|error| ProbeError::BadPath { path: path.to_owned(), reason: error.to_string() })?;
    table.route(&request, &Via::default()).map_err(ProbeError::Unreachable)
}

impl Transport for UpstreamTransport {
    fn send(&self) -> BoxFuture<Result<Answer, ProxyError>> {
        let client = self.client.clone();
        let routed = self.routed.clone();
        let method = self.method.clone();
        let credential = self.credential.clone();
        let (max_body_bytes, body_timeout) = (self.max_body_bytes, self.body_timeout);
        Box::pin(async move {
            let mut request = Request::new(body::empty());
            *request.method_mut() = method;
            *request.uri_mut() = routed.uri.clone();
            let headers = request.headers_mut();
            headers.insert(USER_AGENT, HeaderValue::from_static(concat!("sluice-probe/", env!("CARGO_PKG_VERSION"))));
            headers.insert(ACCEPT, HeaderValue::from_static("application/json, */*;q=0.5"));
            if let Some(credential) = &credential {
                credential.apply(headers);
            }
            let response = client.forward(request, routed, max_body_bytes).await?;
            let (parts, body) = response.into_parts();
            let success = parts.status.is_success() || parts.status.is_redirection();
            // A body that does not arrive in time is given up on: its head is what counts.
            let kept = if success {
                let _ = tokio::time::timeout(body_timeout, read_prefix(body, MAX_DRAINED_BODY, false)).await;
                None
            } else {
                let read = tokio::time::timeout(body_timeout, read_prefix(body, MAX_KEPT_BODY, true)).await;
                Some(read.unwrap_or_default())
            };
            Ok(Answer::new(parts.status, &parts.headers, kept))
        })
    }
}

/// Reads up to `cap` bytes of `body`, keeping them if `keep` (a successful answer's body is read
/// only so its connection can be reused, and dropped); the rest, or a broken body, is dropped.
async fn read_prefix(mut body: ProxyBody, cap: usize, keep: bool) -> Bytes {
    let mut bytes = BytesMut::new();
    let mut read = 0;
    // Bounded: every frame adds bytes or ends the body, and the caller bounds the time.
    while read < cap {
        match body.frame().await {
            None | Some(Err(_)) => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let take = data.len().min(cap - read);
                    read += take;
                    if keep {
                        bytes.extend_from_slice(&data[..take]);
                    }
                }
            }
        }
    }
    bytes.freeze()
}
