#![allow(clippy::unwrap_used, clippy::expect_used)]
// Blocking harness code that times child processes from outside: std's clock is the right one.
#![allow(clippy::disallowed_types)]
//! Intercepted HTTPS, the path every `HTTPS_PROXY` user takes: sluice next to squid (`ssl_bump`)
//! and mitmproxy (`mitmdump`), in one run.
//!
//! `cargo bench --bench intercept` starts an nginx answering `200 "ok"` over TLS (a leaf from a
//! CA generated here), then each proxy in turn, intercepting CONNECTs to `localhost:<nginx>`
//! with its own CA and trusting nginx's. The load comes from this process: a one-thread tokio
//! client that sends `CONNECT`, does TLS with the minted leaf (the proxy's CA is its only root),
//! and speaks HTTP/1.1 inside. Two phases per proxy:
//!
//! - (a) kept-alive tunnels: `SLUICE_BENCH_CONNECTIONS` (16) tunnels, requests back to back;
//! - (b) a new tunnel and a full handshake per request (client session resumption off), on
//!   `SLUICE_BENCH_CONNECTIONS` concurrent workers: every CONNECT after the first hits the
//!   proxy's leaf cache, so this is the cache-hit path.
//!
//! A floor phase (f) runs this binary as a bare tokio-rustls server (`--tls-floor`) presenting a
//! leaf minted by sluice's own `tls::ca` (the same key type), answering `ok` on a fresh TLS
//! connection per request: the handshake CPU sluice's building blocks cost.
//!
//! Reported per phase: requests/s, the proxy's CPU per request (utime + stime of its process
//! group from `/proc`, helpers included), and for (b) handshakes/s and CPU per handshake (the
//! (b) CPU per request less the (a) one). Settings: `SLUICE_BENCH_SECONDS` (10),
//! `SLUICE_BENCH_WARMUP` (2), `SLUICE_BENCH_CONNECTIONS` (16). Needs `nginx`, `squid`
//! (Debian's `squid-openssl`) and `mitmdump` (PyPI `mitmproxy`); a missing peer is skipped and
//! said so. Without `--bench` (as `cargo test --all-targets` runs it) it does nothing.

#[path = "common/procs.rs"]
mod procs;
#[path = "common/tls.rs"]
mod tls;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use procs::{free_port, on_path, per_unit_us, ticks_of, Service};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tls::{client_config, exchange, leaf_for, open};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--tls-floor") {
        floor(args[at + 1].parse().unwrap(), Path::new(&args[at + 2]));
        return;
    }
    if !args.iter().any(|arg| arg == "--bench") {
        println!("skipped (run with cargo bench)");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    run();
}

struct Settings {
    seconds: u64,
    warmup: u64,
    connections: usize,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name).ok().and_then(|value| value.parse().ok()).filter(|v| *v > 0).unwrap_or(default)
        };
        Self {
            seconds: number("SLUICE_BENCH_SECONDS", 10),
            warmup: number("SLUICE_BENCH_WARMUP", 2),
            connections: usize::try_from(number("SLUICE_BENCH_CONNECTIONS", 16)).unwrap_or(16),
        }
    }
}

/// A proxy under test: where it listens, the CA its leaves chain to, its process group.
struct Proxy {
    name: &'static str,
    port: u16,
    ca_pem: String,
    service: Service,
}

#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    requests: u64,
    failures: u64,
    rps: f64,
    cpu_us: f64,
    p50_us: f64,
}

fn run() {
    let settings = Settings::from_env();
    procs::print_machine();
    println!(
        "settings: {} connections, {} s per phase after a {} s warm-up; client: this process, one tokio thread",
        settings.connections, settings.seconds, settings.warmup
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = procs::clock_ticks();

    // The vendor: nginx over TLS with a leaf from a CA of its own.
    let (upstream_ca_pem, upstream_ca_key) = sluice::tls::ca::generate_ca_pem().unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &upstream_ca_pem).unwrap();
    let (leaf_pem, leaf_key_pem) = leaf_for("localhost", &upstream_ca_pem, &upstream_ca_key);
    let (leaf, leaf_key) = (dir.path().join("upstream.pem"), dir.path().join("upstream.key"));
    std::fs::write(&leaf, leaf_pem).unwrap();
    std::fs::write(&leaf_key, leaf_key_pem).unwrap();
    let upstream_port = free_port();
    let upstream = procs::start_tls_nginx(dir.path(), upstream_port, &leaf, &leaf_key);
    println!("tools: {} | {} | {}", procs::command_line("nginx", &["-v"]), squid_version(), mitm_version());
    println!("leaf key type: ECDSA P-256 (rcgen's default; sluice mints every leaf on one P-256 key)");

    let authority = format!("localhost:{upstream_port}");
    let mut rows: Vec<(String, Measured, Measured)> = Vec::new();
    let mut proxies: Vec<Box<dyn Fn() -> Option<Proxy>>> = Vec::new();
    {
        let (dir, ca) = (dir.path().to_path_buf(), upstream_ca.clone());
        proxies.push(Box::new(move || Some(start_sluice(&dir, upstream_port, &ca))));
    }
    {
        let (dir, ca) = (dir.path().to_path_buf(), upstream_ca.clone());
        proxies.push(Box::new(move || start_squid(&dir, &ca)));
    }
    {
        let dir = dir.path().to_path_buf();
        proxies.push(Box::new(move || start_mitmdump(&dir)));
    }
    for start in proxies {
        let Some(proxy) = start() else { continue };
        let config = client_config(&proxy.ca_pem);
        let target = Target { port: proxy.port, authority: authority.clone(), config, through_proxy: true };
        let kept = measure(&settings, &target, Mode::KeptAlive, proxy.service.pgid(), clock);
        let fresh = measure(&settings, &target, Mode::Fresh, proxy.service.pgid(), clock);
        println!(
            "{:<10} ({} + {} requests) (a) {:>8.0} req/s {:>7.1} µs CPU/req p50 {:>6.0} µs ({} failed) | (b) {:>7.0} handshakes/s {:>8.1} µs CPU/req p50 {:>6.0} µs ({} failed)",
            proxy.name, kept.requests, fresh.requests, kept.rps, kept.cpu_us, kept.p50_us, kept.failures, fresh.rps, fresh.cpu_us, fresh.p50_us, fresh.failures
        );
        if kept.requests == 0 {
            let log = std::fs::read_to_string(dir.path().join("squid/cache.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            println!(
                "{} answered nothing; its log ends:\n{}",
                proxy.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        rows.push((proxy.name.to_owned(), kept, fresh));
        drop(proxy);
    }

    // (f) the bare rustls floor: a fresh TLS connection per request, no proxy logic.
    let floor_port = free_port();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.arg("--tls-floor").arg(floor_port.to_string()).arg(dir.path());
    let mut floor_service = Service::spawn("tls floor", command, dir.path().join("floor.log"));
    floor_service.wait_for_port(floor_port);
    let floor_ca = std::fs::read_to_string(dir.path().join("floor-ca.pem")).unwrap();
    let target = Target {
        port: floor_port,
        authority: authority.clone(),
        config: client_config(&floor_ca),
        through_proxy: false,
    };
    let floor = measure(&settings, &target, Mode::Fresh, floor_service.pgid(), clock);
    println!("{:<10} (f) {:>7.0} handshakes/s {:>8.1} µs CPU/handshake", "rustls", floor.rps, floor.cpu_us);
    drop(floor_service);
    drop(upstream);

    summarize(&rows, &floor);
    println!("load average at the end: {}", procs::load_average());
}

fn summarize(rows: &[(String, Measured, Measured)], floor: &Measured) {
    println!();
    println!("| proxy | (a) req/s | (a) CPU/req | (b) handshakes/s | (b) CPU/req | CPU/handshake |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, kept, fresh) in rows {
        println!(
            "| {name} | {:.0} | {:.1} µs | {:.0} | {:.1} µs | {:.1} µs |",
            kept.rps,
            kept.cpu_us,
            fresh.rps,
            fresh.cpu_us,
            (fresh.cpu_us - kept.cpu_us).max(0.0)
        );
    }
    println!("| bare rustls server (f) | | | {:.0} | {:.1} µs | {:.1} µs |", floor.rps, floor.cpu_us, floor.cpu_us);
    let find = |name: &str| rows.iter().find(|(row, ..)| row == name).map(|(_, a, b)| (*a, *b));
    if let Some((sluice_a, sluice_b)) = find("sluice") {
        // Requests per second per core: req/s divided by the cores the proxy kept busy.
        let per_core = |m: &Measured| if m.cpu_us > 0.0 { 1e6 / m.cpu_us } else { 0.0 };
        if let Some((squid_a, squid_b)) = find("squid") {
            println!(
                "ratios: sluice / squid req/s per core: (a) {:.2}x, (b) {:.2}x (target >= 3x); req/s: (a) {:.2}x, (b) {:.2}x",
                per_core(&sluice_a) / per_core(&squid_a).max(f64::MIN_POSITIVE),
                per_core(&sluice_b) / per_core(&squid_b).max(f64::MIN_POSITIVE),
                sluice_a.rps / squid_a.rps.max(f64::MIN_POSITIVE),
                sluice_b.rps / squid_b.rps.max(f64::MIN_POSITIVE),
            );
        }
        if let Some((mitm_a, mitm_b)) = find("mitmdump") {
            println!(
                "ratios: sluice / mitmdump req/s: (a) {:.2}x, (b) {:.2}x",
                sluice_a.rps / mitm_a.rps.max(f64::MIN_POSITIVE),
                sluice_b.rps / mitm_b.rps.max(f64::MIN_POSITIVE)
            );
        }
        let handshake = (sluice_b.cpu_us - sluice_a.cpu_us).max(0.0);
        println!(
            "ratios: sluice CPU per handshake / bare rustls: {:.2}x (target <= 1.2x)",
            handshake / floor.cpu_us.max(f64::MIN_POSITIVE)
        );
    }
}

// ---- the proxies ----

fn start_sluice(dir: &Path, upstream_port: u16, upstream_ca: &Path) -> Proxy {
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "listen: {{ proxy: '127.0.0.1:{port}', admin: '127.0.0.1:{admin}' }}
runtime: {{ worker_threads: 1 }}
shutdown_grace: 1s
limits: {{ max_connections: 20000, max_connections_per_client: 20000, max_tunnels: 20000, max_tunnels_per_client: 20000 }}
intercept: {{ ca_cert: {dir}/sluice-ca.crt, ca_key: {dir}/sluice-ca.key }}
upstreams:
  - name: vendor
    hosts: [localhost]
    target: 'https://localhost:{upstream_port}'
    intercept: true
    tls: {{ extra_ca: {ca} }}
",
        dir = dir.display(),
        ca = upstream_ca.display()
    );
    let path = dir.join("sluice-intercept.yaml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.arg("run").arg("-c").arg(&path).current_dir(dir).env("SLUICE_LOG", "warn");
    let mut service = Service::spawn("sluice", command, dir.join("sluice-intercept.log"));
    service.wait_for_port(port);
    let ca_pem = std::fs::read_to_string(dir.join("sluice-ca.crt")).unwrap();
    Proxy { name: "sluice", port, ca_pem, service }
}

fn start_squid(dir: &Path, upstream_ca: &Path) -> Option<Proxy> {
    let certgen = ["/usr/lib/squid/security_file_certgen"].into_iter().find(|path| Path::new(path).exists());
    let (true, Some(certgen)) = (on_path("squid") || Path::new("/usr/sbin/squid").exists(), certgen) else {
        println!("squid: not installed (apt-get install -y squid-openssl); skipped");
        return None;
    };
    let home = dir.join("squid");
    std::fs::create_dir_all(&home).unwrap();
    let (ca_pem, ca_key) = sluice::tls::ca::generate_ca_pem().unwrap();
    std::fs::write(home.join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(home.join("ca.key"), &ca_key).unwrap();
    std::fs::copy(upstream_ca, home.join("upstream-ca.pem")).unwrap();
    let db = home.join("ssl_db");
    let status = Command::new(certgen).arg("-c").arg("-s").arg(&db).args(["-M", "16MB"]).output().unwrap();
    assert!(status.status.success(), "security_file_certgen -c: {}", String::from_utf8_lossy(&status.stderr));
    let port = free_port();
    let h = home.display();
    let conf = format!(
        "http_port 127.0.0.1:{port} ssl-bump tls-cert={h}/ca.pem tls-key={h}/ca.key generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program {certgen} -s {h}/ssl_db -M 16MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={h}/upstream-ca.pem
http_access allow all
workers 1
cache deny all
access_log none
cache_store_log none
cache_log {h}/cache.log
pid_filename {h}/squid.pid
coredump_dir {h}
cache_effective_user proxy
shutdown_lifetime 1 seconds
max_filedescriptors 20000
"
    );
    std::fs::write(home.join("squid.conf"), conf).unwrap();
    // squid drops to `proxy`, which must own what it writes.
    let _ = Command::new("chown").arg("-R").arg("proxy:proxy").arg(&home).status();
    let _ = Command::new("chmod").arg("a+rx").arg(dir).status();
    let mut command = Command::new("squid");
    command.arg("-N").arg("-f").arg(home.join("squid.conf"));
    let mut service = Service::spawn("squid", command, dir.join("squid.out"));
    service.wait_for_port(port);
    Some(Proxy { name: "squid", port, ca_pem, service })
}

fn start_mitmdump(dir: &Path) -> Option<Proxy> {
    if !on_path("mitmdump") {
        println!("mitmdump: not installed (pip install mitmproxy); skipped");
        return None;
    }
    let confdir = dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir).unwrap();
    let port = free_port();
    let mut command = Command::new("mitmdump");
    command
        .args(["--listen-host", "127.0.0.1", "--listen-port", &port.to_string(), "--ssl-insecure", "-q"])
        .args(["--set", &format!("confdir={}", confdir.display())])
        .args(["--set", "termlog_verbosity=error", "--set", "flow_detail=0"]);
    let mut service = Service::spawn("mitmdump", command, dir.join("mitmdump.out"));
    service.wait_for_port(port);
    let ca = confdir.join("mitmproxy-ca-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ca.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ca_pem = std::fs::read_to_string(&ca).ok()?;
    Some(Proxy { name: "mitmdump", port, ca_pem, service })
}

fn squid_version() -> String {
    procs::command_line("squid", &["-v"]).lines().next().unwrap_or("squid: not installed").to_owned()
}

fn mitm_version() -> String {
    procs::command_line("mitmdump", &["--version"]).lines().next().unwrap_or("mitmdump: not installed").to_owned()
}

// ---- the load ----

struct Target {
    port: u16,
    /// What CONNECT names (also the TLS server name's host).
    authority: String,
    config: Arc<rustls::ClientConfig>,
    /// CONNECT first (a proxy), or TLS straight away (the floor).
    through_proxy: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    KeptAlive,
    Fresh,
}

fn measure(settings: &Settings, target: &Target, mode: Mode, pgid: i32, clock: u64) -> Measured {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Warm-up: leaves minted, pools filled.
        let _ = drive(settings.connections, Duration::from_secs(settings.warmup), target, mode).await;
        let ticks = ticks_of(pgid);
        let started = Instant::now();
        let (requests, failures, mut latencies) =
            drive(settings.connections, Duration::from_secs(settings.seconds), target, mode).await;
        let seconds = started.elapsed().as_secs_f64();
        let used = ticks_of(pgid).saturating_sub(ticks);
        latencies.sort_unstable();
        let p50_us = latencies.get(latencies.len() / 2).copied().unwrap_or(0) as f64;
        Measured {
            requests,
            failures,
            rps: requests as f64 / seconds,
            cpu_us: per_unit_us(used, clock, requests),
            p50_us,
        }
    })
}

/// `workers` tasks sending requests until `length` has passed: (answered, failed, latencies µs).
async fn drive(workers: usize, length: Duration, target: &Target, mode: Mode) -> (u64, u64, Vec<u32>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (port, authority, config, through) =
            (target.port, target.authority.clone(), target.config.clone(), target.through_proxy);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut stream = None;
            // Bounded by `stop`, set after `length`; a failed exchange backs off 10 ms.
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if stream.is_none() || mode == Mode::Fresh {
                    stream = open(port, &authority, &config, through).await;
                }
                let answered = match stream.as_mut() {
                    Some(tls) => exchange(tls, &authority).await,
                    None => false,
                };
                if answered {
                    ok.fetch_add(1, Ordering::Relaxed);
                    latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    stream = None;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        if let Ok(Ok(mut some)) = tokio::time::timeout(Duration::from_secs(10), task).await {
            latencies.append(&mut some);
        }
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), latencies)
}

// ---- the floor: a bare rustls server ----

/// Serves `ok` over TLS on `port`, one thread, with a leaf minted by sluice's own CA code for
/// `localhost`; writes the CA to `dir/floor-ca.pem` for the client.
fn floor(port: u16, dir: &Path) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca_pem, ca_key) = sluice::tls::ca::generate_ca_pem().unwrap();
    let (leaf_pem, leaf_key) = leaf_for("localhost", &ca_pem, &ca_key);
    std::fs::write(dir.join("floor-ca.pem"), &ca_pem).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf_pem.as_bytes()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(leaf_key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buffer = [0u8; 4096];
                let mut seen = Vec::new();
                // One request per connection, as (b) sends; bounded by the client closing.
                while let Ok(read) = tls.read(&mut buffer).await {
                    if read == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buffer[..read]);
                    if seen.windows(4).any(|window| window == b"\r\n\r\n") {
                        seen.clear();
                        let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                }
            });
        }
    });
}
