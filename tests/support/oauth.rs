//! A mock OAuth 2.0 token endpoint (RFC 6749 §4.4 and §6) over real TLS, and a vendor that
//! accepts only the access tokens it currently considers valid.
//!
//! The endpoint counts its calls (and the most it served at once), issues tokens with a short
//! `expires_in`, can rotate refresh tokens (each is then good for one use), can be told to fail,
//! to answer slowly, to name an `instance_url`, and can revoke every token it issued. It records
//! every form it was sent, and the client authentication used.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::mock_crm::{json, MockCrm, Recorded};

pub const CLIENT_ID: &str = "client-id-4f1c";
pub const CLIENT_SECRET: &str = "client-secret-9d2e7a";

/// One call to the token endpoint as it was received.
#[derive(Debug, Clone)]
pub struct TokenCall {
    pub form: HashMap<String, String>,
    /// `Authorization` (HTTP Basic), if the client sent one.
    pub authorization: Option<String>,
    pub at: Instant,
}

struct State {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    most_at_once: AtomicUsize,
    next: AtomicU64,
    lifetime: Mutex<Duration>,
    delay: Mutex<Duration>,
    failure: Mutex<Option<(StatusCode, serde_json::Value)>>,
    rotate: Mutex<bool>,
    instance_url: Mutex<Option<String>>,
    /// Access token -> when it stops being valid.
    access: Mutex<HashMap<String, Instant>>,
    /// Refresh tokens the endpoint takes now.
    refresh: Mutex<HashSet<String>>,
    issued_refresh: Mutex<Vec<String>>,
    recorded: Mutex<Vec<TokenCall>>,
}

#[derive(Clone)]
pub struct TokenServer {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the endpoint's certificate.
    pub ca_pem: String,
    state: Arc<State>,
    _stop: Arc<oneshot::Sender<()>>,
}

impl TokenServer {
    /// Starts the endpoint (TLS, for `127.0.0.1`) issuing tokens valid for `lifetime`, taking
    /// `refresh_token` as the first valid refresh token.
    pub async fn start(lifetime: Duration, refresh_token: &str) -> Self {
        sluice::tls::install_crypto_provider();
        let (config, ca_pem) = super::mock_crm::localhost_server_config("mock token endpoint CA", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
            next: AtomicU64::new(1),
            lifetime: Mutex::new(lifetime),
            delay: Mutex::new(Duration::ZERO),
            failure: Mutex::new(None),
            rotate: Mutex::new(false),
            instance_url: Mutex::new(None),
            access: Mutex::new(HashMap::new()),
            refresh: Mutex::new(HashSet::from([refresh_token.to_owned()])),
            issued_refresh: Mutex::new(Vec::new()),
            recorded: Mutex::new(Vec::new()),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let server_state = state.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let state = server_state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(request, &state).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, ca_pem, state, _stop: Arc::new(stop_tx) }
    }

    pub fn url(&self) -> String {
        format!("https://{}/oauth/v1/token", self.addr)
    }

    /// Calls to the endpoint so far (failed ones included).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The most calls it was serving at one moment.
    pub fn most_at_once(&self) -> usize {
        self.state.most_at_once.load(Ordering::SeqCst)
    }

    pub fn recorded(&self) -> Vec<TokenCall> {
        self.state.recorded.lock().unwrap().clone()
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Each refresh token is good for one refresh, which answers with a new one.
    pub fn rotate_refresh_tokens(&self) {
        *self.state.rotate.lock().unwrap() = true;
    }

    pub fn set_instance_url(&self, url: &str) {
        *self.state.instance_url.lock().unwrap() = Some(url.to_owned());
    }

    /// Every call fails with `status` and an RFC 6749 §5.2 body naming `error`.
    pub fn fail_with(&self, status: StatusCode, error: &str) {
        *self.state.failure.lock().unwrap() =
            Some((status, serde_json::json!({"error": error, "error_description": "told to fail"})));
    }

    pub fn heal(&self) {
        *self.state.failure.lock().unwrap() = None;
    }

    /// Every access token issued so far stops being valid (a revocation, a password change).
    pub fn revoke_access_tokens(&self) {
        self.state.access.lock().unwrap().clear();
    }

    /// Whether `token` is an access token the endpoint issued and is still valid now.
    pub fn is_valid(&self, token: &str) -> bool {
        self.state.access.lock().unwrap().get(token).is_some_and(|until| Instant::now() < *until)
    }

    /// Every access token issued so far.
    pub fn issued_access_tokens(&self) -> usize {
        self.state.next.load(Ordering::SeqCst) as usize - 1
    }

    /// The refresh tokens it handed out (rotations), oldest first.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.state.issued_refresh.lock().unwrap().clone()
    }

    /// The last access token issued and when it stops being valid.
    pub fn newest_expiry(&self) -> Option<Instant> {
        self.state.access.lock().unwrap().values().max().copied()
    }
}

async fn answer(request: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    state.calls.fetch_add(1, Ordering::SeqCst);
    let now_serving = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.most_at_once.fetch_max(now_serving, Ordering::SeqCst);
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = decide(&parts, &body, state);
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

fn decide(parts: &http::request::Parts, body: &[u8], state: &State) -> Response<Full<Bytes>> {
    let form = parse_form(body);
    let authorization = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    state.recorded.lock().unwrap().push(TokenCall {
        form: form.clone(),
        authorization: authorization.clone(),
        at: Instant::now(),
    });
    if let Some((status, body)) = state.failure.lock().unwrap().clone() {
        return json(status, body);
    }
    let refused = |error: &str| json(StatusCode::BAD_REQUEST, serde_json::json!({"error": error}));
    if parts.method != http::Method::POST
        || parts.headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-www-form-urlencoded")
    {
        return refused("invalid_request");
    }
    // Client authentication: in the body, or HTTP Basic (RFC 6749 §2.3.1).
    let (id, secret) = match authorization.as_deref().and_then(|value| value.strip_prefix("Basic ")) {
        Some(encoded) => {
            let decoded = sluice::security::clients::decode_base64(encoded).unwrap_or_default();
            let text = String::from_utf8(decoded).unwrap_or_default();
            let (id, secret) = text.split_once(':').unwrap_or_default();
            (percent_decode(id), Some(percent_decode(secret)))
        }
        None => (form.get("client_id").cloned().unwrap_or_default(), form.get("client_secret").cloned()),
    };
    if id != CLIENT_ID || secret.as_deref().is_some_and(|secret| secret != CLIENT_SECRET) {
        return json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": "invalid_client"}));
    }
    let n = state.next.fetch_add(1, Ordering::SeqCst);
    let mut answer = serde_json::json!({
        "access_token": format!("at-{n}-{:08x}", rand::random::<u32>()),
        "token_type": "bearer",
        "expires_in": state.lifetime.lock().unwrap().as_secs(),
    });
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            if secret.is_none() {
                return json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": "invalid_client"}));
            }
        }
        Some("refresh_token") => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            let mut valid = state.refresh.lock().unwrap();
            if !valid.contains(&presented) {
                state.next.fetch_sub(1, Ordering::SeqCst);
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "invalid_grant", "error_description": "unknown refresh token"}),
                );
            }
            if *state.rotate.lock().unwrap() {
                valid.remove(&presented);
                let fresh = format!("rt-{n}-{:08x}", rand::random::<u32>());
                valid.insert(fresh.clone());
                state.issued_refresh.lock().unwrap().push(fresh.clone());
                answer["refresh_token"] = fresh.into();
            }
        }
        _ => {
            state.next.fetch_sub(1, Ordering::SeqCst);
            return refused("unsupported_grant_type");
        }
    }
    if let Some(url) = state.instance_url.lock().unwrap().clone() {
        answer["instance_url"] = url.into();
    }
    let lifetime = *state.lifetime.lock().unwrap();
    let token = answer["access_token"].as_str().unwrap().to_owned();
    state.access.lock().unwrap().insert(token, Instant::now() + lifetime);
    json(StatusCode::OK, answer)
}

/// Makes `mock` a vendor that serves only requests carrying an access token `tokens` holds valid
/// now (`Authorization: Bearer <token>`), echoing method, path, body and the token; anything
/// else is a HubSpot-shaped 401. Returns the count of those 401s.
pub fn accept_only_valid_tokens(mock: &MockCrm, tokens: &TokenServer) -> Arc<AtomicUsize> {
    let tokens = tokens.clone();
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    mock.set_handler(move |recorded: &Recorded| {
        let token = recorded.header("authorization").and_then(|value| value.strip_prefix("Bearer ")).unwrap_or("");
        if !tokens.is_valid(token) {
            counter.fetch_add(1, Ordering::SeqCst);
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"status": "error", "category": "EXPIRED_AUTHENTICATION"}),
            );
        }
        json(
            StatusCode::OK,
            serde_json::json!({
                "method": recorded.method,
                "path": recorded.path,
                "body": String::from_utf8_lossy(&recorded.body),
                "token": token,
            }),
        )
    });
    refused
}

/// The bearer token a recorded request carried.
pub fn bearer_of(recorded: &Recorded) -> Option<String> {
    recorded.header("authorization").and_then(|value| value.strip_prefix("Bearer ")).map(str::to_owned)
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' => out.push(b' '),
            b'%' if at + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[at + 1..at + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(byte) => {
                        out.push(byte);
                        at += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
