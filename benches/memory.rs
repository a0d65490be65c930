#![allow(clippy::unwrap_used, clippy::expect_used)]
// Blocking harness code that times child processes from outside: std's clock is the right one.
#![allow(clippy::disallowed_types)]
//! Memory at scale: sluice's resident set idle, with 10,000 idle client connections, with 1,000
//! open intercepted tunnels, and with 100,000 live scope keys, each read twice (10 s apart) to
//! show it is bounded, not growing with time.
//!
//! `cargo bench --bench memory` starts an nginx answering `200 "ok"` over TLS and the release
//! sluice binary (`runtime.worker_threads: 1`, memory store), with a reverse upstream whose
//! quota is scoped by `x-tenant-id` (`max_keys: 200000`, limits never reached) and an
//! intercepted one. The clients are this process (one tokio thread):
//!
//! 1. idle: RSS after start and one request;
//! 2. 10,000 client connections, each sends one request and stays open (keep-alive);
//! 3. a fresh process: 1,000 CONNECT tunnels, each intercepted (TLS with the minted leaf), one
//!    request inside, then held open;
//! 4. a fresh process: 100,000 requests, each with its own `x-tenant-id`, over 32 connections.
//!
//! Each scenario after the first starts a new sluice, because the allocator hands freed pages
//! back lazily: what one scenario freed would hide inside the next one's rise.
//!
//! RSS is `VmRSS` from `/proc/<pid>/status`. Per connection and per tunnel are the rise over
//! the figure before, divided by the count. `SLUICE_BENCH_CLIENTS` (10000),
//! `SLUICE_BENCH_TUNNELS` (1000) and `SLUICE_BENCH_KEYS` (100000) change the counts;
//! `SLUICE_BENCH_BINARY` runs another sluice binary (a release build, from a dev-built harness). Needs
//! `nginx`. Without `--bench` (as `cargo test --all-targets` runs it) it does nothing.

#[path = "common/procs.rs"]
mod procs;
#[path = "common/tls.rs"]
mod tls;

use std::process::Command;
use std::time::Duration;

use procs::{free_port, vm_status_kib, Service};
use tokio::net::TcpStream;

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("skipped (run with cargo bench)");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    run();
}

fn count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).filter(|v| *v > 0).unwrap_or(default)
}

fn run() {
    let (clients, tunnels, keys) = (
        count("SLUICE_BENCH_CLIENTS", 10_000),
        count("SLUICE_BENCH_TUNNELS", 1_000),
        count("SLUICE_BENCH_KEYS", 100_000),
    );
    procs::print_machine();
    let dir = tempfile::tempdir().unwrap();

    let (ca_pem, ca_key) = sluice::tls::ca::generate_ca_pem().unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &ca_pem).unwrap();
    let (leaf_pem, leaf_key_pem) = tls::leaf_for("localhost", &ca_pem, &ca_key);
    let (leaf, leaf_key) = (dir.path().join("upstream.pem"), dir.path().join("upstream.key"));
    std::fs::write(&leaf, leaf_pem).unwrap();
    std::fs::write(&leaf_key, leaf_key_pem).unwrap();
    let upstream_port = free_port();
    let _upstream = procs::start_tls_nginx(dir.path(), upstream_port, &leaf, &leaf_key);

    let (port, admin) = (free_port(), free_port());
    let d = dir.path().display();
    let ca = upstream_ca.display();
    let config = format!(
        "listen: {{ proxy: '127.0.0.1:{port}', admin: '127.0.0.1:{admin}' }}
runtime: {{ worker_threads: 1 }}
shutdown_grace: 1s
limits:
  max_connections: 30000
  max_connections_per_client: 30000
  max_tunnels: 5000
  max_tunnels_per_client: 5000
  header_read_timeout: 600s
  tunnel_idle_timeout: 600s
intercept: {{ ca_cert: {d}/sluice-ca.crt, ca_key: {d}/sluice-ca.key }}
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    prefix: /hubspot
    target: 'https://localhost:{upstream_port}'
    tls: {{ extra_ca: {ca} }}
    quotas:
      - {{ name: tenants, limit: 1000000000, per: 1h, key: [header:x-tenant-id], max_keys: 200000 }}
  - name: vendor
    hosts: [localhost]
    target: 'https://localhost:{upstream_port}'
    intercept: true
    tls: {{ extra_ca: {ca} }}
"
    );
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    // `SLUICE_BENCH_BINARY` measures another build (a release binary from a dev-built harness).
    let binary = std::env::var_os("SLUICE_BENCH_BINARY").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into());
    println!("sluice: {}", std::path::Path::new(&binary).display());
    // Each scenario starts from a fresh process: the allocator gives freed pages back lazily, so
    // what one scenario freed would otherwise hide inside the next one's figure.
    let start = || {
        let mut command = Command::new(&binary);
        command.arg("run").arg("-c").arg(&path).current_dir(dir.path()).env("SLUICE_LOG", "warn");
        let mut sluice = Service::spawn("sluice", command, dir.path().join("sluice.log"));
        sluice.wait_for_port(port);
        sluice
    };
    let mut sluice = start();
    let mut pid = sluice.pid();
    let rss = |pid: u32| vm_status_kib(pid, "VmRSS:");
    let mib = |kib: u64| kib as f64 / 1024.0;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let report = runtime.block_on(async {
        let mut rows = Vec::new();
        let mut one = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert!(tls::exchange_on(&mut one, &request("first")).await, "sluice's first request failed");
        drop(one);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss(pid);
        tokio::time::sleep(Duration::from_secs(10)).await;
        rows.push(format!(
            "| idle, after one request | {:.1} MiB | {:.1} MiB 10 s later | target <= 12 MiB |",
            mib(idle),
            mib(rss(pid))
        ));

        // 10,000 idle client connections, each after one request.
        let base = settled(pid).await;
        let mut held = Vec::with_capacity(clients);
        for batch in 0..clients.div_ceil(250) {
            let mut opening = Vec::new();
            for at in 0..250.min(clients - batch * 250) {
                let tenant = format!("c{}", batch * 250 + at);
                opening.push(tokio::spawn(async move {
                    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                    tls::exchange_on(&mut tcp, &request(&tenant)).await.then_some(tcp)
                }));
            }
            for task in opening {
                if let Ok(Some(tcp)) = task.await {
                    held.push(tcp);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with_clients = rss(pid);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let later = rss(pid);
        let per = (with_clients.saturating_sub(base)) as f64 / held.len().max(1) as f64;
        rows.push(format!(
            "| {} idle client connections | {:.1} MiB ({per:.1} KiB each) | {:.1} MiB 10 s later | target <= 16 KiB each |",
            held.len(),
            mib(with_clients),
            mib(later)
        ));
        drop(held);
        drop(sluice);
        sluice = start();
        pid = sluice.pid();

        // 1,000 intercepted tunnels, one request inside each, held open.
        let sluice_ca = std::fs::read_to_string(dir.path().join("sluice-ca.crt")).unwrap();
        let config = tls::client_config(&sluice_ca);
        let authority = format!("localhost:{upstream_port}");
        // One tunnel first, closed: the leaf is minted and cached before the base is read.
        if let Some(mut tunnel) = tls::open(port, &authority, &config, true).await {
            tls::exchange(&mut tunnel, &authority).await;
        }
        let base = settled(pid).await;
        let mut open_tunnels = Vec::with_capacity(tunnels);
        for batch in 0..tunnels.div_ceil(50) {
            let mut opening = Vec::new();
            for _ in 0..50.min(tunnels - batch * 50) {
                let (config, authority) = (config.clone(), authority.clone());
                opening.push(tokio::spawn(async move {
                    let mut tunnel = tls::open(port, &authority, &config, true).await?;
                    tls::exchange(&mut tunnel, &authority).await.then_some(tunnel)
                }));
            }
            for task in opening {
                if let Ok(Some(tunnel)) = task.await {
                    open_tunnels.push(tunnel);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with_tunnels = rss(pid);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let later = rss(pid);
        let per = (with_tunnels.saturating_sub(base)) as f64 / open_tunnels.len().max(1) as f64;
        rows.push(format!(
            "| {} open intercepted tunnels | {:.1} MiB ({per:.1} KiB each) | {:.1} MiB 10 s later | target <= 64 KiB each |",
            open_tunnels.len(),
            mib(with_tunnels),
            mib(later)
        ));
        drop(open_tunnels);
        drop(sluice);
        sluice = start();
        pid = sluice.pid();
        let mut one = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert!(tls::exchange_on(&mut one, &request("first")).await, "sluice's first request failed");
        drop(one);

        // 100,000 live scope keys.
        let base = settled(pid).await;
        let mut senders = Vec::new();
        for worker in 0..32 {
            senders.push(tokio::spawn(async move {
                let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                let mut sent = 0usize;
                let mut key = worker;
                while key < keys {
                    if !tls::exchange_on(&mut tcp, &request(&format!("t{key}"))).await {
                        tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                    } else {
                        sent += 1;
                    }
                    key += 32;
                }
                Some(sent)
            }));
        }
        let mut sent = 0;
        for task in senders {
            sent += task.await.ok().flatten().unwrap_or(0);
        }
        let with_keys = rss(pid);
        let buckets = buckets_in_memory(admin).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let later = rss(pid);
        let per = (with_keys.saturating_sub(base)) as f64 * 1024.0 / sent.max(1) as f64;
        rows.push(format!(
            "| {sent} live scope keys ({buckets}) | {:.1} MiB ({per:.0} B each) | {:.1} MiB 10 s later | bounded by max_keys |",
            mib(with_keys),
            mib(later)
        ));
        rows
    });
    println!();
    println!("| state | RSS | again | target |");
    println!("|---|---:|---:|---|");
    for row in report {
        println!("{row}");
    }
    println!("load average at the end: {}", procs::load_average());
}

/// RSS once it stops moving: the allocator hands freed pages back over a few seconds, so a
/// figure taken right after closing connections is not the base for the next step. Sampled
/// every second until two samples are within 256 KiB, for at most 30 s.
async fn settled(pid: u32) -> u64 {
    let mut last = vm_status_kib(pid, "VmRSS:");
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = vm_status_kib(pid, "VmRSS:");
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
    last
}

fn request(tenant: &str) -> Vec<u8> {
    format!("GET /hubspot/crm/v3/objects/contacts?limit=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nx-tenant-id: {tenant}\r\n\r\n")
        .into_bytes()
}

/// What `/quotas` says about the buckets in memory, as text for the table.
async fn buckets_in_memory(admin: u16) -> String {
    let mut tcp = match TcpStream::connect(("127.0.0.1", admin)).await {
        Ok(tcp) => tcp,
        Err(_) => return "admin unreachable".into(),
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.write_all(b"GET /quotas HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut body)).await;
    let text = String::from_utf8_lossy(&body);
    let json = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|value| value.pointer("/store/buckets_in_memory").cloned())
        .map_or_else(|| "buckets: n/a".into(), |count| format!("{count} buckets in memory"))
}
