//! The egress guard: a client may name a host an upstream serves, but the address that host
//! resolves to must not be loopback, private, link-local (cloud metadata), CGNAT, multicast or
//! unspecified, unless the operator named it as the upstream's `target`. The check and the
//! connect use the same resolved addresses, so DNS rebinding between them changes nothing.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// An address the guard refuses, as the error inside a failed connect.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses sluice may not reach ({address})")]
pub struct BlockedAddress {
    pub host: String,
    pub address: IpAddr,
}

/// A name that did not resolve, as the error inside a failed connect or dial.
#[derive(Debug, thiserror::Error)]
#[error("dns error: {host}: {detail}")]
pub struct DnsFailure {
    pub host: String,
    /// The name does not exist, or has no address (NXDOMAIN, NODATA): a definite answer, not
    /// an outage.
    pub no_such_host: bool,
    detail: String,
}

/// Concurrent lookups at most. Each one holds a blocking-pool thread (getaddrinfo blocks), so
/// a flood of slow lookups for client-chosen names must not take every thread.
const MAX_CONCURRENT_LOOKUPS: usize = 64;
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_LOOKUPS);

/// Resolves `host` with the system resolver (`/etc/hosts`, then DNS), keeping the resolver's
/// verdict as a [`DnsFailure`] when it fails.
pub async fn lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let _permit = LOOKUPS.acquire().await.map_err(io::Error::other)?;
    let name = host.to_owned();
    let resolved = tokio::task::spawn_blocking(move || {
        dns_lookup::lookup_host(&name).map(|addresses| addresses.collect::<Vec<IpAddr>>())
    })
    .await
    .map_err(io::Error::other)?;
    match resolved {
        Ok(addresses) if addresses.is_empty() => Err(io::Error::new(
            io::ErrorKind::NotFound,
            DnsFailure { host: host.to_owned(), no_such_host: true, detail: "no address".into() },
        )),
        Ok(addresses) => Ok(addresses.into_iter().map(|ip| SocketAddr::new(ip, port)).collect()),
        Err(error) => {
            let no_such_host =
                matches!(error.kind(), dns_lookup::LookupErrorKind::NoName | dns_lookup::LookupErrorKind::NoData);
            let detail = io::Error::from(error).to_string();
            Err(io::Error::new(io::ErrorKind::NotFound, DnsFailure { host: host.to_owned(), no_such_host, detail }))
        }
    }
}

/// Whether `ip` is one sluice refuses unless a `target` names it.
pub fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return blocked_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || is_nat64_to_blocked(v6)
        }
    }
}

fn blocked_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254.0.0/16, cloud metadata
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || a >= 240 // reserved
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
}

fn is_nat64_to_blocked(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return blocked_v4(v4);
    }
    false
}

/// Resolves `host` and keeps only addresses the guard allows; an error when none is left.
pub async fn resolve_allowed(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return check_all(host, vec![SocketAddr::new(ip, port)]);
    }
    check_all(host, lookup(host, port).await?)
}

fn check_all(host: &str, addresses: Vec<SocketAddr>) -> io::Result<Vec<SocketAddr>> {
    let first_blocked = addresses.iter().map(SocketAddr::ip).find(|ip| is_blocked(*ip));
    let allowed: Vec<SocketAddr> = addresses.into_iter().filter(|addr| !is_blocked(addr.ip())).collect();
    match (allowed.is_empty(), first_blocked) {
        (true, Some(address)) => {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, BlockedAddress { host: host.to_owned(), address }))
        }
        (true, None) => Err(io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))),
        (false, _) => Ok(allowed),
    }
}

/// A hyper-util DNS resolver that applies the guard (when `guarded`): the connector connects
/// only to the addresses returned here, which are the checked ones. Unguarded, it resolves a
/// `target` the operator configured, which is trusted.
#[derive(Clone, Default)]
pub struct EgressResolver {
    pub guarded: bool,
}

impl tower::Service<Name> for EgressResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guarded = self.guarded;
        Box::pin(async move {
            if guarded {
                resolve_allowed(name.as_str(), 0).await.map(Vec::into_iter)
            } else {
                lookup(name.as_str(), 0).await.map(Vec::into_iter)
            }
        })
    }
}

/// Finds a [`BlockedAddress`] anywhere in an error chain, through `io::Error` wrappers.
pub fn blocked_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BlockedAddress> {
    find_in(error)
}

/// Finds a [`DnsFailure`] anywhere in an error chain, through `io::Error` wrappers.
pub fn dns_failure_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a DnsFailure> {
    find_in(error)
}

fn find_in<'a, T: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    for cause in crate::error::causes(error) {
        let mut current = Some(cause);
        for _ in 0..8 {
            let Some(error) = current else { break };
            if let Some(found) = error.downcast_ref::<T>() {
                return Some(found);
            }
            current = error
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_blocked(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["104.16.0.1", "52.1.2.3", "2606:4700::1", "100.128.0.1", "172.32.0.1"] {
            assert!(!is_blocked(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn resolution_is_checked() {
        let error = resolve_allowed("localhost", 443).await.unwrap_err();
        assert!(blocked_in(&error).is_some(), "{error}");
        assert!(resolve_allowed("169.254.169.254", 80).await.is_err());
    }

    #[tokio::test]
    async fn a_name_that_does_not_exist_is_told_apart() {
        // RFC 6761: `.invalid` never resolves.
        let error = lookup("nx-egress-test.invalid", 443).await.unwrap_err();
        let failure = dns_failure_in(&error).expect("a typed DNS failure");
        assert!(failure.no_such_host, "{error}");
        assert_eq!(failure.host, "nx-egress-test.invalid");
        assert_eq!(lookup("127.0.0.1", 80).await.unwrap(), vec![SocketAddr::from(([127, 0, 0, 1], 80))]);
    }
}
