//! CONNECT: the door HTTPS_PROXY users come through.
//!
//! A host no upstream serves gets 403 before any byte moves. For an upstream with
//! `intercept: true`, sluice answers 200, terminates the client's TLS with a leaf minted for the
//! host, and serves the requests inside through the normal journey (so quotas, metrics and logs
//! see them). Any other allowed host gets a blind byte tunnel, connected before the 200 so a
//! dead destination is an honest 502/504 rather than a tunnel that closes at once.
//!
//! A blind tunnel is allowed by the CONNECT host, but what crosses it could name another site on
//! the same address. So sluice reads what the client sends first: a TLS ClientHello must name
//! the CONNECT host or nothing (`tls::client_hello` follows the handshake until it is
//! encrypted), and anything that is not TLS is served as plain HTTP by sluice itself, each
//! request routed by the CONNECT host like inside an intercepted tunnel. And because sluice sees
//! nothing inside a blind TLS tunnel, an upstream whose quotas, concurrency cap, credentials or
//! batch rules a tunnel would skip gets none unless it says `blind_tunnel: true`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::accounting::ClientConn;
use super::Server;
use crate::body::{self, ProxyBody};
use crate::config::Upstream;
use crate::error::{ErrorKind, ProxyError};
use crate::request::Via;
use crate::respond::synthesize;
use crate::state::{Generation, Shared};
use crate::telemetry::metrics::{status_class, NO_UPSTREAM};
use crate::tls::client_hello::{self, HandshakeWatcher, Refusal, MAX_CLIENT_HELLO};

/// Answers one CONNECT request; the tunnel itself runs in a tracked task.
pub async fn handle(
    request: Request<Incoming>,
    generation: Arc<Generation>,
    server: Server,
    conn: Arc<ClientConn>,
) -> Response<ProxyBody> {
    let shared = &server.shared;
    let (response, upstream) = match open(request, &generation, &server, &conn).await {
        Ok((response, upstream)) => (response, Some(upstream)),
        Err(error) => {
            let upstream = error.upstream.clone();
            (synthesize(&error, &shared.metrics), upstream)
        }
    };
    let label = upstream.as_deref().unwrap_or(NO_UPSTREAM);
    shared.metrics.requests.with_label_values(&[label, "CONNECT", status_class(response.status().as_u16())]).inc();
    response
}

async fn open(
    request: Request<Incoming>,
    generation: &Generation,
    server: &Server,
    conn: &ClientConn,
) -> Result<(Response<ProxyBody>, Arc<str>), ProxyError> {
    let shared = &server.shared;
    let (host, port) = parse_authority(request.uri())?;
    let identity = generation.proxy_clients.identify(request.headers(), conn.peer)?;
    let upstream = generation
        .routes
        .by_host(&host)
        .ok_or_else(|| ProxyError::new(ErrorKind::EgressDenied { host: host.clone() }, None))?
        .clone();
    let name = upstream.name.clone();
    if !upstream.allows_port(port) {
        return Err(ProxyError::new(ErrorKind::EgressDenied { host: format!("{host}:{port}") }, Some(name)));
    }
    if let Some(identity) = &identity {
        if !identity.may_use(&name) {
            let detail = format!("client `{}` may not use this upstream", identity.name);
            return Err(ProxyError::new(ErrorKind::ClientNotAllowed { detail }, Some(name)));
        }
    }
    if let Some(detail) = upstream.blind_tunnel_refusal() {
        return Err(ProxyError::new(ErrorKind::BlindTunnelRefused { detail }, Some(name)));
    }
    // A tunnel holds a slot and its client's share until it closes; past either cap, new
    // tunnels are refused at once (a slot taken for a client over its share goes straight back).
    let tunnel_slot = server.conns.tunnel_slots.clone().try_acquire_owned().map_err(|_| {
        shared.metrics.connections_refused.with_label_values(&["max_tunnels"]).inc();
        ProxyError::new(ErrorKind::TooManyTunnels { max: generation.config.process.max_tunnels }, Some(name.clone()))
    })?;
    let share = tunnel_share(generation);
    let owner = TunnelOwner::of(identity.as_ref(), conn.peer.ip());
    let tunnel_share = TunnelShares::try_take(&server.conns.tunnel_shares, owner, share).ok_or_else(|| {
        shared.metrics.connections_refused.with_label_values(&["tunnels_per_client"]).inc();
        ProxyError::new(ErrorKind::TunnelShareExceeded { max: share }, Some(name.clone()))
    })?;
    let tunnel_slot = (tunnel_slot, tunnel_share);
    if upstream.intercept {
        let ca = generation.ca.clone().ok_or_else(|| {
            ProxyError::new(ErrorKind::Internal { detail: "interception CA not loaded".into() }, Some(name.clone()))
        })?;
        let (server_config, minted) = ca.server_config(&host).map_err(|error| {
            shared.metrics.leaf_certs_minted.with_label_values(&["error"]).inc();
            ProxyError::new(ErrorKind::Internal { detail: error.to_string() }, Some(name.clone()))
        })?;
        if minted {
            shared.metrics.leaf_certs_minted.with_label_values(&["ok"]).inc();
        }
        let handshake_timeout = generation.config.live.limits.header_read_timeout;
        let inner = ClientConn {
            peer: conn.peer,
            via: Via { tunnel_host: Some(Arc::from(host.as_str())), tunnel_port: port, plaintext: false },
            slot: conn.slot.clone(),
            identity,
        };
        let task_server = server.clone();
        let task_shared = shared.clone();
        shared.tasks.spawn(async move {
            let _tunnel_slot = tunnel_slot;
            let Ok(upgraded) = hyper::upgrade::on(request).await else { return };
            let gauge = task_shared.metrics.tunnels_open.with_label_values(&["intercept"]);
            gauge.inc();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(TokioIo::new(upgraded))).await {
                Ok(Ok(tls)) => {
                    let stack = task_server.stack();
                    crate::listen::serve_http(tls, inner, task_server, stack).await
                }
                Ok(Err(error)) => tracing::info!(%host, %error, "Client TLS handshake failed in intercepted tunnel."),
                Err(_) => tracing::info!(%host, "Client TLS handshake timed out in intercepted tunnel."),
            }
            gauge.dec();
        });
        return Ok((established(), name));
    }

    // A target is the operator's word and is trusted; a host the client named is resolved and
    // checked by the egress guard, and the connect goes to the checked addresses.
    let stream = match &upstream.target {
        Some(target) => dial(&upstream, &target.host, target.port, false).await?,
        None => dial(&upstream, &host, port, true).await?,
    };
    let tunnel = BlindTunnel {
        upstream: name.clone(),
        idle: generation.config.live.limits.tunnel_idle_timeout,
        hello_within: generation.config.live.limits.header_read_timeout,
        // Should the client speak plain HTTP, sluice serves it as this connection.
        plain: ClientConn {
            peer: conn.peer,
            via: Via { tunnel_host: Some(Arc::from(host.as_str())), tunnel_port: port, plaintext: true },
            slot: conn.slot.clone(),
            identity,
        },
        host,
    };
    let task_shared = shared.clone();
    let task_server = server.clone();
    // The tunnel outlives the HTTP connection it came from; it keeps that connection's slot.
    let slot = conn.slot.clone();
    shared.tasks.spawn(async move {
        let _slot = slot;
        let _tunnel_slot = tunnel_slot;
        let Ok(upgraded) = hyper::upgrade::on(request).await else { return };
        let gauge = task_shared.metrics.tunnels_open.with_label_values(&["blind"]);
        gauge.inc();
        tunnel.run(TokioIo::new(upgraded), stream, &task_server).await;
        gauge.dec();
    });
    Ok((established(), name))
}

/// Most bytes read from a blind tunnel's client before its first ClientHello is complete: one
/// hello at its largest, split into the smallest records.
const MAX_FIRST_FLIGHT: usize = 6 * MAX_CLIENT_HELLO;

/// A blind tunnel after its 200: what it was opened for, and how long its client has.
struct BlindTunnel {
    host: String,
    upstream: Arc<str>,
    idle: Duration,
    /// The client's first ClientHello must be complete within this (`limits.header_read_timeout`).
    hello_within: Duration,
    plain: ClientConn,
}

impl BlindTunnel {
    /// Reads the client's first bytes, then pumps TLS (checking its ClientHellos), serves plain
    /// HTTP itself, or closes the tunnel.
    async fn run<C>(self, mut client: C, mut destination: TcpStream, server: &Server)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = &server.shared;
        let deadline = Instant::now() + self.hello_within;
        let mut first = Vec::with_capacity(4096);
        match tokio::time::timeout_at(deadline, client.read_buf(&mut first)).await {
            Ok(Ok(read)) if read > 0 => {}
            Ok(_) => return,
            Err(_) => return self.refuse(shared, "client_hello_timeout", "the client sent nothing"),
        }
        if !client_hello::starts_tls(first[0]) {
            // Not TLS: plain HTTP, served like the inside of an intercepted tunnel (routed by the
            // CONNECT host whatever the inner `Host`), or a 400 from the HTTP parser.
            drop(destination);
            tracing::debug!(host = %self.host, "Plain HTTP in a blind tunnel; serving it.");
            return crate::listen::serve_http(Prefixed::new(first, client), self.plain, server.clone(), server.stack())
                .await;
        }
        let mut watcher = HandshakeWatcher::new(&self.host);
        let mut fed = 0;
        while watcher.hellos_checked() == 0 {
            if let Err(refusal) = watcher.feed(&first[fed..]) {
                return self.refuse(shared, refusal.as_str(), refusal.describe());
            }
            fed = first.len();
            if watcher.hellos_checked() > 0 {
                break;
            }
            if first.len() >= MAX_FIRST_FLIGHT {
                return self.refuse(shared, Refusal::Oversized.as_str(), Refusal::Oversized.describe());
            }
            match tokio::time::timeout_at(deadline, client.read_buf(&mut first)).await {
                Ok(Ok(read)) if read > 0 => {}
                Ok(_) => return,
                Err(_) => return self.refuse(shared, "client_hello_timeout", "no complete ClientHello in time"),
            }
        }
        match tokio::time::timeout(self.idle, destination.write_all(&first)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        let mut guarded = HelloGuard { inner: client, watcher, refused: None };
        let (up, down) = pump(&mut guarded, destination, self.idle).await;
        if let Some(refusal) = guarded.refused {
            return self.refuse(shared, refusal.as_str(), refusal.describe());
        }
        tracing::debug!(host = %self.host, bytes_up = up, bytes_down = down, "Tunnel closed.");
    }

    /// Closes the tunnel (by returning), counting and logging why.
    fn refuse(&self, shared: &Shared, reason: &str, detail: &str) {
        shared.metrics.tunnels_refused.with_label_values(&[&self.upstream, reason]).inc();
        tracing::info!(host = %self.host, upstream = &*self.upstream, reason, detail, "Blind tunnel closed: refused handshake.");
    }
}

fn established() -> Response<ProxyBody> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// `host:port` of a CONNECT request target (RFC 9110 §9.3.6: authority-form, port required).
pub fn parse_authority(uri: &Uri) -> Result<(String, u16), ProxyError> {
    let malformed = |detail: &str| ProxyError::new(ErrorKind::Malformed { detail: detail.to_owned() }, None);
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|path| !path.as_str().is_empty() && path != "/") {
        return Err(malformed("CONNECT needs host:port"));
    }
    let authority = uri.authority().ok_or_else(|| malformed("CONNECT needs host:port"))?;
    if authority.as_str().contains('@') {
        return Err(malformed("CONNECT target must not carry credentials"));
    }
    let port = authority.port_u16().ok_or_else(|| malformed("CONNECT target needs a port"))?;
    if port == 0 {
        return Err(malformed("CONNECT to port 0"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if host.is_empty() {
        return Err(malformed("CONNECT target needs a host"));
    }
    Ok((host, port))
}

async fn dial(upstream: &Upstream, host: &str, port: u16, guarded: bool) -> Result<TcpStream, ProxyError> {
    use crate::error::Unreachable;
    let name = Some(upstream.name.clone());
    let connect = async {
        let addresses = if guarded {
            crate::security::egress::resolve_allowed(host, port).await?
        } else {
            crate::security::egress::lookup(host, port).await?
        };
        TcpStream::connect(&addresses[..]).await
    };
    match tokio::time::timeout(upstream.connect_timeout, connect).await {
        Ok(Err(error)) if crate::security::egress::blocked_in(&error).is_some() => {
            Err(ProxyError::new(ErrorKind::EgressDenied { host: format!("{host} (private address)") }, name))
        }
        Err(_) => Err(ProxyError::new(ErrorKind::ConnectTimeout { after: upstream.connect_timeout }, name)),
        Ok(Err(error)) => {
            if let Some(dns) = crate::security::egress::dns_failure_in(&error) {
                if dns.no_such_host && guarded && crate::upstream::client::client_named(upstream, host) {
                    return Err(ProxyError::new(ErrorKind::UnknownHost { host: host.to_owned() }, name));
                }
                let detail = format!("{host}:{port}: {error}");
                return Err(ProxyError::new(ErrorKind::Unreachable { detail, cause: Unreachable::Dns }, name));
            }
            let (detail, cause) = if error.kind() == std::io::ErrorKind::ConnectionRefused {
                (format!("{host}:{port}: connection refused"), Unreachable::Refused)
            } else {
                (format!("{host}:{port}: {error}"), Unreachable::Other)
            };
            Err(ProxyError::new(ErrorKind::Unreachable { detail, cause }, name))
        }
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// `limits.max_tunnels_per_client`, or its default: every tunnel in sidecar mode (one client,
/// the pod), a quarter of them when sluice serves several clients.
fn tunnel_share(generation: &Generation) -> usize {
    let config = &generation.config;
    let max_tunnels = config.process.max_tunnels;
    let several_clients = !config.live.clients.is_empty() || config.process.listen.allow_remote_clients;
    let default = if several_clients { (max_tunnels / 4).max(1) } else { max_tunnels };
    config.live.limits.max_tunnels_per_client.unwrap_or(default).min(max_tunnels).max(1)
}

/// Who a tunnel counts against: the authenticated client, or else its address (an IPv6
/// address by its /64, which one host usually holds whole).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TunnelOwner {
    Client(Arc<str>),
    Address(std::net::IpAddr),
}

impl TunnelOwner {
    fn of(identity: Option<&crate::security::clients::ClientIdentity>, ip: std::net::IpAddr) -> Self {
        match (identity, ip) {
            (Some(identity), _) => TunnelOwner::Client(identity.name.clone()),
            (None, std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                TunnelOwner::Address(std::net::IpAddr::V6(prefix.into()))
            }
            (None, ip) => TunnelOwner::Address(ip.to_canonical()),
        }
    }
}

/// Open tunnels per owner. An owner is in the map only while it holds a tunnel, so the map
/// never holds more entries than `limits.max_tunnels`.
#[derive(Debug, Default)]
pub struct TunnelShares {
    open: std::sync::Mutex<std::collections::HashMap<TunnelOwner, usize>>,
}

/// One tunnel's place in its owner's share, given back on drop.
pub struct TunnelShare {
    shares: Arc<TunnelShares>,
    owner: TunnelOwner,
}

impl TunnelShares {
    fn try_take(shares: &Arc<Self>, owner: TunnelOwner, max: usize) -> Option<TunnelShare> {
        let mut open = shares.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(owner.clone()).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&owner);
            }
            return None;
        }
        *count += 1;
        Some(TunnelShare { shares: shares.clone(), owner })
    }

    /// Tunnels `owner` holds now.
    pub fn held_by(&self, owner: &TunnelOwner) -> usize {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(owner).copied().unwrap_or(0)
    }
}

impl Drop for TunnelShare {
    fn drop(&mut self) {
        let mut open = self.shares.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.owner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.owner);
            }
        }
    }
}

/// Copies both ways until either side closes or no byte has moved for `idle`.
/// Returns the bytes copied client->upstream and upstream->client.
async fn pump<A, B>(client: A, upstream: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Watched { inner: client, last: last.clone(), epoch };
    let mut upstream = Watched { inner: upstream, last: last.clone(), epoch };
    let check_every = (idle / 4).max(Duration::from_millis(50));
    let watchdog = async {
        loop {
            tokio::time::sleep(check_every).await;
            let quiet = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => copied.unwrap_or((0, 0)),
        () = watchdog => (0, 0),
    }
}

/// The client side of a blind TLS tunnel: every read is shown to the [`HandshakeWatcher`] before
/// it is passed on, until the client's encrypted traffic begins. A refused ClientHello ends the
/// read with an error, so its last byte never reaches the destination.
struct HelloGuard<T> {
    inner: T,
    watcher: HandshakeWatcher,
    refused: Option<Refusal>,
}

impl<T: AsyncRead + Unpin> AsyncRead for HelloGuard<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.watcher.done() {
            if let Err(refusal) = this.watcher.feed(&buf.filled()[before..]) {
                this.refused = Some(refusal);
                buf.set_filled(before);
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, refusal.describe())));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HelloGuard<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self { prefix, at: 0, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let take = (self.prefix.len() - self.at).min(buf.remaining());
            let start = self.at;
            buf.put_slice(&self.prefix[start..start + take]);
            self.at += take;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that records when it last read a byte, for the tunnel idle timeout.
struct Watched<T> {
    inner: T,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_form_only() {
        let ok = |s: &str| parse_authority(&s.parse().unwrap());
        assert_eq!(ok("api.hubapi.com:443").unwrap(), ("api.hubapi.com".into(), 443));
        assert_eq!(ok("[::1]:8443").unwrap(), ("::1".into(), 8443));
        assert!(ok("api.hubapi.com").is_err());
        assert!(ok("http://api.hubapi.com:443/").is_err());
        assert!(ok("user@host:443").is_err());
        assert!(ok("host:0").is_err());
    }

    #[test]
    fn tunnel_shares_are_per_owner_and_bounded() {
        let shares = Arc::new(TunnelShares::default());
        let a = TunnelOwner::of(None, "10.0.0.1".parse().unwrap());
        let first = TunnelShares::try_take(&shares, a.clone(), 2).unwrap();
        let _second = TunnelShares::try_take(&shares, a.clone(), 2).unwrap();
        assert!(TunnelShares::try_take(&shares, a.clone(), 2).is_none(), "a third is over the share");
        let b = TunnelOwner::of(None, "10.0.0.2".parse().unwrap());
        assert!(TunnelShares::try_take(&shares, b.clone(), 2).is_some(), "another client has its own share");
        drop(first);
        assert_eq!(shares.held_by(&a), 1);
        assert!(TunnelShares::try_take(&shares, a, 2).is_some());
        assert_eq!(shares.held_by(&b), 0, "an owner without tunnels leaves the map");
        // One IPv6 /64 is one owner.
        assert_eq!(
            TunnelOwner::of(None, "2001:db8::1".parse().unwrap()),
            TunnelOwner::of(None, "2001:db8::ffff:1".parse().unwrap())
        );
    }
}
