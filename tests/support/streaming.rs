//! Bodies in planned pieces, both ways, through each of sluice's doors.
//!
//! [`StreamingVendor`] plays a vendor that answers with a planned body, written piece by piece
//! with a pause before each piece (so each piece reaches sluice, and leaves it, as a write of
//! its own), and records every request body it received. It serves plain HTTP/1.1 and h2c, or
//! TLS with ALPN `h2` and `http/1.1`.
//!
//! [`DoorClient`] reaches it through sluice: reverse mode (`/<prefix>/...`), absolute-form
//! (`http://<host>/...`) or an intercepted CONNECT (`<host>:443`, TLS to sluice's leaf), over
//! HTTP/1.1 or HTTP/2, sending its own body in planned pieces. Every wait is bounded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest any exchange may take before the helper gives up.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Header naming the case a request belongs to (the vendor's key for plans and recordings).
pub const CASE_HEADER: &str = "x-case";

type Body = BoxBody<Bytes, Infallible>;

/// A body as written: pieces, each after its pause, and whether `Content-Length` announces it
/// (otherwise HTTP/1.1 chunks it).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub pieces: Vec<(Duration, Bytes)>,
    pub content_length: bool,
}

impl Plan {
    pub fn bytes(&self) -> Vec<u8> {
        self.pieces.iter().flat_map(|(_, piece)| piece.iter().copied()).collect()
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(|(_, piece)| piece.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body, fed piece by piece by a task that sleeps each pause first.
    fn body(&self) -> Body {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let pieces = self.pieces.clone();
        tokio::spawn(async move {
            for (pause, piece) in pieces {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                if tx.send(Ok(Frame::data(piece))).await.is_err() {
                    return;
                }
            }
        });
        StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))).boxed()
    }

    fn content_length(&self) -> Option<http::HeaderValue> {
        self.content_length.then(|| http::HeaderValue::from(self.len()))
    }
}

/// What the vendor received for one case.
#[derive(Debug, Clone)]
pub struct Received {
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct State {
    plans: Mutex<HashMap<String, Plan>>,
    received: Mutex<HashMap<String, Received>>,
}

pub struct StreamingVendor {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the vendor's certificate, when it serves TLS.
    pub ca_pem: Option<String>,
    state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl StreamingVendor {
    /// Plain HTTP/1.1 + h2c.
    pub async fn start() -> Self {
        Self::start_inner(None, None).await
    }

    /// TLS for `localhost` and `127.0.0.1`, ALPN `h2` then `http/1.1`.
    pub async fn start_tls() -> Self {
        let (config, ca_pem) = super::mock_crm::localhost_server_config("streaming vendor CA", &[]);
        Self::start_inner(Some(Arc::new(config)), Some(ca_pem)).await
    }

    async fn start_inner(tls: Option<Arc<rustls::ServerConfig>>, ca_pem: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server_state = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let _ = stream.set_nodelay(true);
                let state = server_state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(request, &state).await) }
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
        Self { addr, ca_pem, state, _stop: stop_tx }
    }

    /// `http://127.0.0.1:port` or `https://localhost:port`.
    pub fn url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// The answer for requests of `case`.
    pub fn plan(&self, case: &str, plan: Plan) {
        self.state.plans.lock().unwrap().insert(case.to_owned(), plan);
    }

    pub fn received(&self, case: &str) -> Option<Received> {
        self.state.received.lock().unwrap().get(case).cloned()
    }
}

async fn answer(request: Request<Incoming>, state: &State) -> Response<Body> {
    let case = request.headers().get(CASE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let version = request.version();
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(EXCHANGE_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes().to_vec(),
        _ => {
            let mut response = Response::new(http_body_util::Full::new(Bytes::from_static(b"body lost")).boxed());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    state.received.lock().unwrap().insert(case.clone(), Received { version, headers: parts.headers, body });
    let plan =
        state.plans.lock().unwrap().get(&case).cloned().unwrap_or_else(|| Plan {
            pieces: vec![(Duration::ZERO, Bytes::from_static(b"pong"))],
            content_length: true,
        });
    let mut response = Response::new(plan.body());
    if let Some(length) = plan.content_length() {
        response.headers_mut().insert(http::header::CONTENT_LENGTH, length);
    }
    response
}

/// How a client reaches the vendor through sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `http://<sluice>/<prefix>/...`
    Reverse,
    /// `http://<host>/...` through sluice as HTTP_PROXY.
    Absolute,
    /// `CONNECT <host>:443`, intercepted: TLS to sluice's leaf, then requests inside.
    Intercept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Body>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

/// One client connection to sluice through one door.
pub struct DoorClient {
    sender: Sender,
    door: Door,
    proto: Proto,
    sluice: SocketAddr,
    host: String,
    prefix: String,
}

/// An answer as the client got it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl DoorClient {
    /// Connects to sluice at `sluice`; `host` is the upstream's host (absolute-form and
    /// CONNECT), `prefix` its reverse prefix, `ca_pem` sluice's interception CA.
    pub async fn connect(
        sluice: SocketAddr,
        door: Door,
        proto: Proto,
        host: &str,
        prefix: &str,
        ca_pem: &[u8],
    ) -> Result<Self, String> {
        let stream = TcpStream::connect(sluice).await.map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let io: Box<dyn Io> = match door {
            Door::Reverse | Door::Absolute => Box::new(stream),
            Door::Intercept => Box::new(tunnel(stream, host, proto, ca_pem).await?),
        };
        let sender = match proto {
            Proto::Http1 => {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("h1: {e}"))?;
                tokio::spawn(conn);
                Sender::Http1(sender)
            }
            Proto::Http2 => {
                let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                tokio::spawn(conn);
                Sender::Http2(sender)
            }
        };
        Ok(Self { sender, door, proto, sluice, host: host.to_owned(), prefix: prefix.to_owned() })
    }

    fn uri(&self, path: &str) -> String {
        match (self.door, self.proto) {
            (Door::Reverse, Proto::Http1) => format!("{}{path}", self.prefix),
            (Door::Reverse, Proto::Http2) => format!("http://{}{}{path}", self.sluice, self.prefix),
            (Door::Absolute, _) => format!("http://{}{path}", self.host),
            (Door::Intercept, Proto::Http1) => path.to_owned(),
            (Door::Intercept, Proto::Http2) => format!("https://{}{path}", self.host),
        }
    }

    fn host_header(&self) -> String {
        match self.door {
            Door::Reverse => self.sluice.to_string(),
            Door::Absolute | Door::Intercept => self.host.clone(),
        }
    }

    /// Sends `POST path` of `case` with `body`, and reads the whole answer.
    pub async fn send(&mut self, case: &str, path: &str, body: &Plan) -> Result<Answer, String> {
        self.request("POST", case, path, body, &[]).await
    }

    /// Any request, with extra headers.
    pub async fn request(
        &mut self,
        method: &str,
        case: &str,
        path: &str,
        body: &Plan,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut request = Request::builder().method(method).uri(self.uri(path)).header(CASE_HEADER, case);
        if self.proto == Proto::Http1 {
            request = request.header(http::header::HOST, self.host_header());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(length) = body.content_length() {
            request = request.header(http::header::CONTENT_LENGTH, length);
        }
        let request = request.body(body.body()).map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            let response = match &mut self.sender {
                Sender::Http1(sender) => {
                    sender.ready().await.map_err(|e| format!("h1 not ready: {e}"))?;
                    sender.send_request(request).await
                }
                Sender::Http2(sender) => {
                    sender.ready().await.map_err(|e| format!("h2 not ready: {e}"))?;
                    sender.send_request(request).await
                }
            }
            .map_err(|e| format!("send: {e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| format!("response body: {e:?}"))?.to_bytes().to_vec();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.map_err(|_| "exchange timed out".to_string())?
    }
}

/// `CONNECT host:443`, then TLS to sluice's leaf for `host`, offering only `proto` by ALPN.
async fn tunnel(
    mut stream: TcpStream,
    host: &str,
    proto: Proto,
    ca_pem: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    use rustls_pki_types::pem::PemObject;
    let connect = format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n");
    stream.write_all(connect.as_bytes()).await.map_err(|e| format!("CONNECT: {e}"))?;
    // Byte by byte up to the blank line: nothing past the 200 may be read here.
    let mut head = Vec::new();
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            let byte = stream.read_u8().await.map_err(|e| format!("CONNECT answer: {e}"))?;
            head.push(byte);
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, read_head).await.map_err(|_| "CONNECT timed out".to_string())??;
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)));
    }
    sluice::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| format!("CA: {e}"))?).map_err(|e| format!("CA: {e}"))?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = match proto {
        Proto::Http1 => vec![b"http/1.1".to_vec()],
        Proto::Http2 => vec![b"h2".to_vec()],
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| format!("name: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS to sluice: {e}"))
}
