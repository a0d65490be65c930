//! The proxy's request handling: one [`ProxyService`] per client connection, which sends CONNECT
//! to `listen::connect` and every other request down the journey in `stack`.

pub mod forward;
pub mod headers;
pub mod route;
pub mod stack;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::body::ProxyBody;
use crate::listen::connect;
use crate::state::Shared;
use route::Via;
use stack::HttpStack;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// Set when the connection is the decrypted inside of an intercepted CONNECT.
    pub via: Via,
}

/// The per-connection hyper service.
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
    conn: Arc<ClientConn>,
    stack: HttpStack,
}

impl ProxyService {
    pub fn new(shared: Arc<Shared>, conn: ClientConn) -> Self {
        let stack = stack::http_stack(shared.stack_parts());
        Self { shared, conn: Arc::new(conn), stack }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let generation = self.shared.current();
        if request.method() == Method::CONNECT && self.conn.via.tunnel_host.is_none() {
            let shared = self.shared.clone();
            let conn = self.conn.clone();
            return Box::pin(async move { Ok(connect::handle(request, generation, shared, conn).await) });
        }
        let limit = usize::try_from(generation.config.limits.max_body_bytes).unwrap_or(usize::MAX);
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(self.conn.via.clone());
        parts.extensions.insert(self.conn.peer);
        parts.extensions.insert(generation);
        let body = Limited::new(body, limit).boxed();
        let stack = self.stack.clone();
        Box::pin(stack.oneshot(Request::from_parts(parts, body)))
    }
}
