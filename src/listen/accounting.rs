//! The connection's accounting: who is on the other end ([`ClientConn`]), its place under
//! `limits.max_connections` ([`ConnectionSlot`]) and the per-client caps ([`ClientCounts`]).
//! A leaf, so the hyper service and the CONNECT handler both name it without naming each other.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::request::Via;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// Set when the connection is the decrypted inside of an intercepted CONNECT.
    pub via: Via,
    /// The connection's place under `limits.max_connections`; tunnels hold it until they close.
    pub slot: Option<Arc<ConnectionSlot>>,
    /// Inside an intercepted tunnel: the client the CONNECT authenticated.
    pub identity: Option<crate::security::clients::ClientIdentity>,
}

/// One of `limits.max_connections`, counted in `sluice_connections_open` while held.
pub struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
    client: Option<(Arc<ClientCounts>, std::net::IpAddr)>,
}

impl ConnectionSlot {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self { _permit: permit, gauge, client: None }
    }

    /// Also counts against the client's own cap (see [`ClientCounts::try_take`]).
    pub fn for_client(mut self, counts: Arc<ClientCounts>, ip: std::net::IpAddr) -> Self {
        self.client = Some((counts, ip));
        self
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Some((counts, ip)) = &self.client {
            counts.release(*ip);
        }
    }
}

/// Open connections per client address.
#[derive(Debug, Default)]
pub struct ClientCounts {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl ClientCounts {
    /// Counts one more connection from `ip`, unless it already holds `max`.
    pub fn try_take(&self, ip: std::net::IpAddr, max: usize) -> bool {
        let mut open = crate::kit::lock(&self.open);
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, ip: std::net::IpAddr) {
        let mut open = crate::kit::lock(&self.open);
        if let Some(count) = open.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionSlot")
    }
}
