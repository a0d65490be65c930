//! A mock CRM vendor: a hyper server on an ephemeral loopback port (plain HTTP, or TLS with its
//! own CA) that records every request and answers like the vendors document (the shapes in `tests/fixtures/crm/`).
//!
//! Built-in routes (any prefix path works for the echo):
//! - `POST /crm/v3/objects/{type}`: HubSpot single create, 201 `SimplePublicObject` + rate headers;
//! - `GET /status/{code}`: answers that status with a small JSON body;
//! - `GET /slow/{ms}`: answers after `ms` milliseconds;
//! - anything else: 200 echo `{method, path, query, headers, body}`.
//!
//! `set_handler` replaces the behaviour for a test (429s, batch endpoints, outages).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub at: tokio::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub type Handler = Arc<dyn Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync>;

struct Inner {
    recorded: Mutex<Vec<Recorded>>,
    handler: Mutex<Option<Handler>>,
    next_id: AtomicU64,
}

#[derive(Clone)]
pub struct MockCrm {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    _stop: Arc<oneshot::Sender<()>>,
    /// PEM of the CA that signed the mock's certificate, when it serves TLS.
    pub ca_pem: Option<String>,
}

impl MockCrm {
    /// Plain HTTP/1.1 + h2c mock.
    pub async fn start() -> Self {
        Self::start_inner(None).await
    }

    /// TLS mock (h2 + http/1.1 by ALPN) with a certificate for `localhost`, `127.0.0.1` and `hosts`.
    pub async fn start_tls(hosts: &[&str]) -> Self {
        let (config, ca_pem) = localhost_server_config("mock vendor CA", hosts);
        let mut mock = Self::start_inner(Some(Arc::new(config))).await;
        mock.ca_pem = Some(ca_pem);
        mock
    }

    async fn start_inner(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            recorded: Mutex::new(Vec::new()),
            handler: Mutex::new(None),
            next_id: AtomicU64::new(100),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let server_inner = inner.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let inner = server_inner.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(request, &inner).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(config) => {
                            let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self { addr, inner, _stop: Arc::new(stop_tx), ca_pem: None }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.recorded.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.inner.recorded.lock().unwrap().len()
    }

    pub fn clear(&self) {
        self.inner.recorded.lock().unwrap().clear();
    }

    /// Replaces the built-in behaviour (the request is still recorded first).
    pub fn set_handler(&self, handler: impl Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static) {
        *self.inner.handler.lock().unwrap() = Some(Arc::new(handler));
    }

    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

async fn handle(request: Request<Incoming>, inner: &Inner) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        version: parts.version,
        headers: parts.headers,
        body,
        at: tokio::time::Instant::now(),
    };
    inner.recorded.lock().unwrap().push(recorded.clone());
    let handler = inner.handler.lock().unwrap().clone();
    if let Some(handler) = handler {
        return handler(&recorded);
    }
    let segments: Vec<&str> = recorded.path.trim_start_matches('/').split('/').collect();
    match (recorded.method.as_str(), segments.as_slice()) {
        ("GET", ["slow", ms]) => {
            let ms: u64 = ms.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, serde_json::json!({"slept_ms": ms}))
        }
        (_, ["status", code]) => {
            let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::OK);
            json(status, serde_json::json!({"status": status.as_u16()}))
        }
        ("POST", ["crm", "v3", "objects", _object]) => {
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed).to_string();
            let input: serde_json::Value = serde_json::from_slice(&recorded.body).unwrap_or_default();
            let mut properties = input.get("properties").cloned().unwrap_or_else(|| serde_json::json!({}));
            properties["hs_object_id"] = serde_json::Value::String(id.clone());
            let mut response = json(
                StatusCode::CREATED,
                serde_json::json!({
                    "id": id,
                    "properties": properties,
                    "createdAt": "2026-01-15T10:00:00.000Z",
                    "updatedAt": "2026-01-15T10:00:00.000Z",
                    "archived": false
                }),
            );
            hubspot_rate_headers(response.headers_mut(), 190, 189);
            response
        }
        _ => {
            let headers: HashMap<String, String> =
                recorded.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
            let mut response = json(
                StatusCode::OK,
                serde_json::json!({
                    "method": recorded.method,
                    "path": recorded.path,
                    "query": recorded.query,
                    "version": format!("{:?}", recorded.version),
                    "headers": headers,
                    "body": String::from_utf8_lossy(&recorded.body),
                }),
            );
            response
                .headers_mut()
                .insert("x-hubspot-correlation-id", "c033cdaa-2c40-4a64-ae48-b4cec88dad24".parse().unwrap());
            // Hop-by-hop headers a vendor (or its load balancer) might send; sluice must drop them.
            response.headers_mut().insert("connection", "x-vendor-hop".parse().unwrap());
            response.headers_mut().insert("x-vendor-hop", "secret".parse().unwrap());
            response
        }
    }
}

pub fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json;charset=utf-8".parse().unwrap());
    response
}

pub fn hubspot_rate_headers(headers: &mut http::HeaderMap, max: u64, remaining: u64) {
    headers.insert("x-hubspot-ratelimit-interval-milliseconds", "10000".parse().unwrap());
    headers.insert("x-hubspot-ratelimit-max", max.to_string().parse().unwrap());
    headers.insert("x-hubspot-ratelimit-remaining", remaining.to_string().parse().unwrap());
}

/// A TLS server config for `localhost`, `127.0.0.1` and `hosts` under a fresh CA named
/// `ca_name`, ALPN `h2` then `http/1.1`; and the CA's PEM, for the client to trust. Every mock
/// server over TLS uses it.
pub fn localhost_server_config(ca_name: &str, hosts: &[&str]) -> (rustls::ServerConfig, String) {
    sluice::tls::install_crypto_provider();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(hosts.iter().map(|h| h.to_string()));
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key_der)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (config, ca_cert.pem())
}
