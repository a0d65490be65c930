//! ACCEPT, the first step: the proxy listener's accept loop, the serving of one client
//! connection (its hyper service, `service`; its clocks, here; hyper's own error heads,
//! `guard_io`; who it is and the caps it counts against, `accounting`) and CONNECT (`connect`).
//! [`serve_http`] serves the stack it is given, so a second listener with a stack of its own is
//! a small change.
//!
//! It stands above `proxy::stack` (each connection gets a stack from [`Server::stack`]) and
//! `state`, and below `app`, which binds the listener and spawns [`serve_proxy`].
//!
//! The listener is bound by the caller and handed in (tests bind port 0). A semaphore caps open
//! connections: past the cap, accept waits and the kernel backlog absorbs the burst instead of
//! sluice running out of file descriptors. Every connection is a tracked task that drains
//! gracefully (HTTP/1 finishes its response, HTTP/2 sends GOAWAY) when shutdown starts.

pub mod accounting;
pub mod connect;
pub mod guard_io;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::proxy::stack::{http_stack, HttpStack, StackParts};
use crate::request::Via;
use crate::state::Shared;
use accounting::{ClientConn, ClientCounts, ConnectionSlot};
use connect::TunnelShares;
use service::ProxyService;

/// A listener's connections: what they run on, and their accounting (which outlives each of
/// them): `limits.max_tunnels` (sized at start), the tunnels each client holds, and the
/// connections each client address holds. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    pub shared: Arc<Shared>,
    pub conns: Arc<Conns>,
}

pub struct Conns {
    pub tunnel_slots: Arc<Semaphore>,
    pub tunnel_shares: Arc<TunnelShares>,
    pub per_client: Arc<ClientCounts>,
}

impl Server {
    pub fn new(shared: Arc<Shared>) -> Self {
        let max_tunnels = shared.current().config.process.max_tunnels;
        let conns = Conns {
            tunnel_slots: Arc::new(Semaphore::new(max_tunnels)),
            tunnel_shares: Arc::default(),
            per_client: Arc::default(),
        };
        Self { shared, conns: Arc::new(conns) }
    }

    /// A fresh journey for one connection (its layers share what outlives reloads).
    pub fn stack(&self) -> HttpStack {
        http_stack(StackParts::of(&self.shared))
    }
}

/// Accept errors (EMFILE and the like) are retried after this pause instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Runs the proxy listener until shutdown starts.
pub async fn serve_proxy(listener: TcpListener, shared: Arc<Shared>) {
    let server = Server::new(shared.clone());
    let max_connections = shared.current().config.process.max_connections;
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit { Ok(permit) => permit, Err(_) => return },
            () = shared.shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Accept failed; retrying.");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = shared.shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let per_client_cap = shared.current().config.live.limits.max_connections_per_client;
        if !server.conns.per_client.try_take(peer.ip(), per_client_cap) {
            shared.metrics.connections_refused.with_label_values(&["per_client"]).inc();
            tracing::info!(%peer, cap = per_client_cap, "Connection refused: client at its connection cap.");
            drop(stream);
            continue;
        }
        let slot = Arc::new(
            ConnectionSlot::new(permit, shared.metrics.connections_open.clone())
                .for_client(server.conns.per_client.clone(), peer.ip()),
        );
        let conn = ClientConn { peer, via: Via::default(), slot: Some(slot), identity: None };
        let (server, stack) = (server.clone(), server.stack());
        shared.tasks.spawn(async move {
            serve_http(stream, conn, server, stack).await;
        });
    }
}

/// The HTTP/1.1 + HTTP/2 server settings for client connections, from the current limits.
pub fn server_builder(shared: &Shared) -> auto::Builder<TokioExecutor> {
    let limits = shared.current().config.live.limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true)
        // One buffer per write: CRM answers are small, and a copy is cheaper than building iovecs.
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(64)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// After `limits.max_connection_age`, a connection's requests in flight get this long to finish
/// before the connection is cut.
pub const AGE_DRAIN: Duration = Duration::from_secs(30);

/// Serves HTTP on one connection (plain, or the inside of an intercepted tunnel) until it
/// closes, draining gracefully if shutdown starts first.
///
/// Besides hyper's own limits, this loop holds the connection's clocks: the first request must
/// come within `header_read_timeout`; an HTTP/2 connection with no stream open is closed after
/// `http2_idle_timeout` (after `header_read_timeout` while nothing on it got past
/// authentication); every connection is closed gracefully at `max_connection_age` and cut
/// [`AGE_DRAIN`] later; and a response abandoned by its client closes its HTTP/1 connection.
pub async fn serve_http<IO>(io: IO, conn: ClientConn, server: Server, stack: HttpStack)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer: SocketAddr = conn.peer;
    let shared = server.shared.clone();
    let builder = server_builder(&shared);
    let limits = shared.current().config.live.limits.clone();
    let service = ProxyService::new(server, conn, stack);
    let activity = service.activity();
    let io = guard_io::GuardIo::new(io, service.ledger(), limits.max_header_bytes);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let opened = tokio::time::Instant::now();
    // hyper's header_read_timeout starts only once hyper-util's auto builder has told HTTP/1
    // from HTTP/2, which it reads with no deadline; this one covers a client that sends
    // nothing, or part of the h2 preface, or an h2 preface and no request.
    let first_request_deadline = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(first_request_deadline);
    let mut deadline_passed = false;
    let idle_check = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(idle_check);
    let age_deadline = tokio::time::sleep_until(opened + limits.max_connection_age);
    tokio::pin!(age_deadline);
    let mut draining = false;
    let mut aged = false;
    let abort = activity.abort.0.clone();
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = &mut first_request_deadline, if !deadline_passed => {
                deadline_passed = true;
                if !activity.started() {
                    tracing::debug!(%peer, "No request within header_read_timeout; closing.");
                    return;
                }
            }
            () = &mut idle_check, if !draining => {
                let limit = if activity.authenticated() { limits.http2_idle_timeout } else { limits.header_read_timeout };
                match activity.quiet_for() {
                    Some(quiet) if quiet >= limit => {
                        tracing::debug!(%peer, idle_ms = quiet.as_millis() as u64, "HTTP/2 connection idle; sending GOAWAY.");
                        shared.metrics.connections_closed.with_label_values(&["http2_idle"]).inc();
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    Some(quiet) => idle_check.as_mut().reset(tokio::time::Instant::now() + (limit - quiet)),
                    None => idle_check.as_mut().reset(tokio::time::Instant::now() + limit),
                }
            }
            () = &mut age_deadline => {
                if aged {
                    tracing::debug!(%peer, "Connection still open after its age drain; cutting it.");
                    return;
                }
                aged = true;
                if !draining {
                    tracing::debug!(%peer, "Connection reached max_connection_age; closing gracefully.");
                    shared.metrics.connections_closed.with_label_values(&["max_age"]).inc();
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                age_deadline.as_mut().reset(tokio::time::Instant::now() + AGE_DRAIN);
            }
            () = abort.cancelled() => {
                tracing::debug!(%peer, "Closing the connection: its client stopped reading a response.");
                return;
            }
            () = shared.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, error = %error, "Client connection ended with an error.");
    }
}
