#![allow(clippy::unwrap_used, clippy::expect_used)]
// Blocking harness code that times child processes from outside: std's clock is the right one.
#![allow(clippy::disallowed_types)]
//! Proxy throughput, latency and CPU per request, sluice next to nginx, in one run.
//!
//! `cargo bench --bench load` starts, as child processes in their own process groups:
//!
//! - an upstream: an nginx (`worker_processes 1`) answering `200 "ok"` on every path;
//! - nginx as a reverse proxy (`worker_processes 1`, upstream keepalive, `access_log off`);
//! - the release `sluice` binary three times, with `runtime.worker_threads: 1` and
//!   `SLUICE_LOG=warn`: no quotas (reverse prefix and forward-proxy absolute-form requests),
//!   quotas that are never reached on the memory store, and the same on a `redis-server`
//!   started here on a free port.
//!
//! Each phase is `wrk -t1 -c32 -d10s --latency` after a 2 s warm-up; the phases run in turn, and
//! the whole set three times (medians reported). Around each measured phase the CPU time
//! (utime + stime from `/proc/<pid>/stat`, every process of the child's group, so nginx's worker
//! counts) of the proxy, the upstream and Redis is read, giving CPU seconds per request.
//! sluice's idle RSS is read from `/proc/<pid>/status` after start and one request.
//!
//! Two more phases measure the floor that sluice's building blocks set, with none of sluice's
//! code: this bench binary re-runs itself as a minimal hyper reverse proxy (`--floor-proxy`, one
//! thread, mimalloc, the same hyper settings as sluice). (g) forwards through hyper-util's
//! pooled client, as sluice does; (h) gives each client connection its own upstream connection
//! (`hyper::client::conn::http1`), the cheapest hyper can do.
//!
//! Settings (environment): `SLUICE_BENCH_SECONDS` (10), `SLUICE_BENCH_WARMUP` (2),
//! `SLUICE_BENCH_CONNECTIONS` (32), `SLUICE_BENCH_ROUNDS` (3), and `SLUICE_BENCH_BASELINE`: the
//! path of another sluice binary (an earlier build), run as phase (c0) next to (c) so a change
//! is measured against what it replaced in the same run, on the same machine.
//!
//! Needs Linux `/proc`, `nginx`, `wrk` and `redis-server` on PATH
//! (`apt-get install -y nginx wrk redis-server`). Without `--bench` (as `cargo test --all-targets`
//! runs it) it does nothing and needs none of them.

#[path = "common/procs.rs"]
mod procs;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The request every phase sends (the upstream answers any path).
use procs::{clock_ticks, command_line, free_port, group_ticks, load_average, on_path, vm_status_kib, Service};

const PATH: &str = "/crm/v3/objects/contacts?limit=1";
/// The vendor host forward-proxy requests name.
const VENDOR_HOST: &str = "api.hubapi.com";

/// The floor proxies run on the same allocator as the sluice binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--floor-proxy") {
        let mode = args[at + 1].clone();
        let (listen, upstream) = (args[at + 2].parse().unwrap(), args[at + 3].parse().unwrap());
        floor::run(&mode, listen, upstream);
        return;
    }
    if !args.iter().any(|arg| arg == "--bench") {
        println!("skipped (run with cargo bench)");
        return;
    }
    let settings = Settings::from_env();
    for tool in ["nginx", "wrk", "redis-server", "getconf"] {
        if !on_path(tool) {
            eprintln!("load: `{tool}` is not installed (apt-get install -y nginx wrk redis-server)");
            std::process::exit(2);
        }
    }
    run(&settings);
}

struct Settings {
    seconds: u64,
    warmup: u64,
    connections: u64,
    rounds: usize,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name).ok().and_then(|value| value.parse().ok()).filter(|v| *v > 0).unwrap_or(default)
        };
        Self {
            seconds: number("SLUICE_BENCH_SECONDS", 10),
            warmup: number("SLUICE_BENCH_WARMUP", 2),
            connections: number("SLUICE_BENCH_CONNECTIONS", 32),
            rounds: usize::try_from(number("SLUICE_BENCH_ROUNDS", 3)).unwrap_or(3),
        }
    }
}

/// What one phase sends load to, and whose CPU it charges.
struct Phase {
    key: &'static str,
    title: &'static str,
    url: String,
    script: PathBuf,
    /// Process group of the proxy under test (none for the direct phase).
    proxy: Option<i32>,
    /// Process group of redis-server, when the phase uses it.
    redis: Option<i32>,
    /// redis-server's port, when the phase uses it (to count its commands).
    redis_port: Option<u16>,
}

/// One measured phase of one round.
#[derive(Debug, Clone, Default)]
struct Sample {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    seconds: f64,
    proxy_cpu: f64,
    upstream_cpu: f64,
    redis_cpu: f64,
    /// Commands redis-server ran during the phase (`INFO commandstats`, scripts' calls included).
    redis_commands: u64,
    failures: u64,
}

fn run(settings: &Settings) {
    let dir = tempfile::tempdir().unwrap();
    let ticks = clock_ticks();
    print_machine(settings);

    // The upstream, then everything in front of it.
    let upstream_port = free_port();
    let upstream = start_nginx(dir.path(), "upstream", &upstream_nginx_conf(upstream_port), upstream_port);
    let nginx_port = free_port();
    let nginx = start_nginx(dir.path(), "proxy", &proxy_nginx_conf(nginx_port, upstream_port), nginx_port);
    let redis_port = free_port();
    let redis = start_redis(dir.path(), redis_port);

    let plain = start_sluice(dir.path(), "plain", upstream_port, Limiter::Off);
    let idle_rss = vm_status_kib(plain.service.pid(), "VmRSS:");
    let memory = start_sluice(dir.path(), "memory", upstream_port, Limiter::Memory);
    let shared = start_sluice(dir.path(), "redis", upstream_port, Limiter::Redis(redis_port));
    let unleased = start_sluice(dir.path(), "redis-no-lease", upstream_port, Limiter::RedisNoLease(redis_port));
    let baseline = std::env::var_os("SLUICE_BENCH_BASELINE")
        .map(|binary| start_sluice_binary(dir.path(), "baseline", upstream_port, Limiter::Off, Path::new(&binary)));
    let floor_pooled = start_floor(dir.path(), "pooled", upstream_port);
    let floor_direct = start_floor(dir.path(), "per-connection", upstream_port);
    println!(
        "sluice idle RSS after start and one request: {:.1} MiB (pid {})",
        idle_rss as f64 / 1024.0,
        plain.service.pid()
    );

    let headers = dir.path().join("headers.lua");
    std::fs::write(&headers, "wrk.headers[\"x-tenant-id\"] = \"acme\"\n").unwrap();
    let forward = dir.path().join("forward.lua");
    std::fs::write(
        &forward,
        format!(
            "wrk.path = \"http://{VENDOR_HOST}{PATH}\"\nwrk.headers[\"Host\"] = \"{VENDOR_HOST}\"\n\
             wrk.headers[\"x-tenant-id\"] = \"acme\"\n"
        ),
    )
    .unwrap();

    let mut phases = vec![
        Phase {
            key: "direct",
            title: "(a) direct to the upstream",
            url: format!("http://127.0.0.1:{upstream_port}{PATH}"),
            script: headers.clone(),
            proxy: None,
            redis: None,
            redis_port: None,
        },
        Phase {
            key: "nginx",
            title: "(b) nginx reverse proxy, 1 worker",
            url: format!("http://127.0.0.1:{nginx_port}/hubspot{PATH}"),
            script: headers.clone(),
            proxy: Some(nginx.pgid()),
            redis: None,
            redis_port: None,
        },
        Phase {
            key: "sluice-reverse",
            title: "(c) sluice reverse (prefix), 1 worker thread",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", plain.port),
            script: headers.clone(),
            proxy: Some(plain.service.pgid()),
            redis: None,
            redis_port: None,
        },
        Phase {
            key: "sluice-forward",
            title: "(d) sluice forward proxy (absolute-form)",
            url: format!("http://127.0.0.1:{}/", plain.port),
            script: forward.clone(),
            proxy: Some(plain.service.pgid()),
            redis: None,
            redis_port: None,
        },
        Phase {
            key: "sluice-quota-memory",
            title: "(e) sluice reverse, quotas on (memory store)",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", memory.port),
            script: headers.clone(),
            proxy: Some(memory.service.pgid()),
            redis: None,
            redis_port: None,
        },
        Phase {
            key: "sluice-quota-redis",
            title: "(f) sluice reverse, quotas on (Redis store)",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", shared.port),
            script: headers.clone(),
            proxy: Some(shared.service.pgid()),
            redis: Some(redis.pgid()),
            redis_port: Some(redis_port),
        },
        Phase {
            key: "sluice-quota-redis-no-lease",
            title: "(f2) sluice reverse, quotas on (Redis, leases off)",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", unleased.port),
            script: headers.clone(),
            proxy: Some(unleased.service.pgid()),
            redis: Some(redis.pgid()),
            redis_port: Some(redis_port),
        },
        Phase {
            key: "floor-pooled",
            title: "(g) hyper floor: pooled client, no sluice code",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", floor_pooled.1),
            script: headers.clone(),
            proxy: Some(floor_pooled.0.pgid()),
            redis: None,
            redis_port: None,
        },
        Phase {
            key: "floor-direct",
            title: "(h) hyper floor: one upstream conn per client conn",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", floor_direct.1),
            script: headers.clone(),
            proxy: Some(floor_direct.0.pgid()),
            redis: None,
            redis_port: None,
        },
    ];
    if let Some(baseline) = &baseline {
        let phase = Phase {
            key: "baseline-reverse",
            title: "(c0) baseline binary, reverse (prefix)",
            url: format!("http://127.0.0.1:{}/hubspot{PATH}", baseline.port),
            script: headers.clone(),
            proxy: Some(baseline.service.pgid()),
            redis: None,
            redis_port: None,
        };
        phases.insert(2, phase);
    }

    // Every front door answers before any load: a broken setup fails here, not as 0 req/s.
    for phase in &phases {
        let status = if phase.key == "sluice-forward" {
            let target = format!("http://{VENDOR_HOST}{PATH}");
            http_get(plain.port, &target, VENDOR_HOST).0
        } else {
            let url = phase.url.strip_prefix("http://").unwrap();
            let (authority, path) = url.split_at(url.find('/').unwrap());
            let port: u16 = authority.rsplit(':').next().unwrap().parse().unwrap();
            http_get(port, path, authority).0
        };
        assert_eq!(status, 200, "{}: the first request must get 200", phase.title);
    }

    let mut samples: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        println!("\n--- round {round}/{} (load average: {}) ---", settings.rounds, load_average());
        for phase in &phases {
            wrk(&phase.url, &phase.script, settings.warmup, settings.connections);
            let before = cpu_of(phase, upstream.pgid());
            let commands_before = phase.redis_port.map_or(0, redis_commands);
            let started = Instant::now();
            let result = wrk(&phase.url, &phase.script, settings.seconds, settings.connections);
            let seconds = started.elapsed().as_secs_f64();
            let after = cpu_of(phase, upstream.pgid());
            let commands = phase.redis_port.map_or(0, redis_commands).saturating_sub(commands_before);
            let per_second = ticks as f64;
            let sample = Sample {
                requests: result.requests,
                rps: result.rps,
                p50_us: result.p50_us,
                p99_us: result.p99_us,
                seconds,
                proxy_cpu: (after.0 - before.0) as f64 / per_second,
                upstream_cpu: (after.1 - before.1) as f64 / per_second,
                redis_cpu: (after.2 - before.2) as f64 / per_second,
                redis_commands: commands,
                failures: result.failures,
            };
            println!(
                "{:<48} {:>9.0} req/s  p50 {:>8.1} us  p99 {:>8.1} us  proxy {:>6.1} us/req ({:.2} cores)  \
                 upstream {:>5.1} us/req  redis {:>5.1} us/req  failures {}",
                phase.title,
                sample.rps,
                sample.p50_us,
                sample.p99_us,
                per_request_us(sample.proxy_cpu, sample.requests),
                sample.proxy_cpu / seconds,
                per_request_us(sample.upstream_cpu, sample.requests),
                per_request_us(sample.redis_cpu, sample.requests),
                sample.failures,
            );
            if result.failures > 0 {
                println!("    wrk reported failures:\n{}", indent(&result.raw));
            }
            samples.entry(phase.key).or_default().push(sample);
        }
        // The Redis phase only counts if its decisions were really shared ones.
        let (_, readyz) = http_get(shared.admin, "/readyz", "127.0.0.1");
        let (_, metrics) = http_get(shared.admin, "/metrics", "127.0.0.1");
        let store_errors: u64 = metrics
            .lines()
            .filter(|line| line.starts_with("sluice_store_errors_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|value| value as u64)
            .sum();
        println!("redis-store sluice after round {round}: readyz {} | store errors {store_errors}", readyz.trim());
    }

    let rss_after = |service: &Service| {
        (vm_status_kib(service.pid(), "VmRSS:") as f64 / 1024.0, vm_status_kib(service.pid(), "VmHWM:") as f64 / 1024.0)
    };
    let (plain_rss, plain_hwm) = rss_after(&plain.service);
    let (memory_rss, _) = rss_after(&memory.service);
    let (redis_rss, _) = rss_after(&shared.service);
    println!(
        "\nsluice RSS after the load: {plain_rss:.1} MiB (peak {plain_hwm:.1} MiB) without quotas, \
         {memory_rss:.1} MiB memory store, {redis_rss:.1} MiB Redis store"
    );
    for instance in [&plain, &memory, &shared, &unleased] {
        let log = std::fs::read_to_string(&instance.service.log).unwrap_or_default();
        if !log.trim().is_empty() {
            println!("sluice ({}) logged at warn or above:\n{}", instance.name, indent(&tail(&log, 20)));
        }
    }

    summarize(&phases, &samples, idle_rss as f64 / 1024.0, settings);
    println!("\nload average at the end: {}", load_average());
    drop((plain, memory, shared, unleased, baseline, floor_pooled, floor_direct, nginx, upstream, redis));
}

fn summarize(phases: &[Phase], samples: &BTreeMap<&'static str, Vec<Sample>>, idle_rss_mib: f64, settings: &Settings) {
    let median = |key: &str, pick: &dyn Fn(&Sample) -> f64| -> f64 {
        let mut values: Vec<f64> = samples.get(key).map(|all| all.iter().map(pick).collect()).unwrap_or_default();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let cpu_per_request = |key: &str, cpu: &dyn Fn(&Sample) -> f64| {
        median(key, &|s: &Sample| if s.requests == 0 { f64::NAN } else { cpu(s) / s.requests as f64 * 1e6 })
    };
    println!(
        "\n## Summary: medians of {} rounds, wrk -t1 -c{} -d{}s --latency\n",
        settings.rounds, settings.connections, settings.seconds
    );
    println!(
        "| phase | req/s | p50 | p99 | proxy CPU/req | proxy CPU (cores busy) | upstream CPU/req | redis CPU/req | \
         failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for phase in phases {
        let key = phase.key;
        let failures: u64 = samples.get(key).map(|all| all.iter().map(|s| s.failures).sum()).unwrap_or(0);
        let proxy = if phase.proxy.is_some() {
            format!("{:.1} us", cpu_per_request(key, &|s| s.proxy_cpu))
        } else {
            "-".to_owned()
        };
        let busy = if phase.proxy.is_some() {
            format!("{:.2}", median(key, &|s| s.proxy_cpu / s.seconds))
        } else {
            "-".into()
        };
        let redis = if phase.redis.is_some() {
            format!("{:.1} us", cpu_per_request(key, &|s| s.redis_cpu))
        } else {
            "-".to_owned()
        };
        println!(
            "| {} | {:.0} | {:.0} us | {:.0} us | {proxy} | {busy} | {:.1} us | {redis} | {failures} |",
            phase.title,
            median(key, &|s| s.rps),
            median(key, &|s| s.p50_us),
            median(key, &|s| s.p99_us),
            cpu_per_request(key, &|s| s.upstream_cpu),
        );
    }
    let rps = |key: &str| median(key, &|s| s.rps);
    let cpu = |key: &str| cpu_per_request(key, &|s| s.proxy_cpu);
    let p50 = |key: &str| median(key, &|s| s.p50_us);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\n## Targets\n");
    println!("| target | measured | |");
    println!("|---|---:|---|");
    let ratio = rps("sluice-reverse") / rps("nginx");
    println!("| sluice reverse / nginx req/s >= 1.0 | {ratio:.2} | {} |", verdict(ratio >= 1.0));
    let (ours, theirs) = (cpu("sluice-reverse"), cpu("nginx"));
    println!(
        "| sluice CPU/req <= nginx's | {ours:.1} us vs {theirs:.1} us ({:.2}x) | {} |",
        ours / theirs,
        verdict(ours <= theirs)
    );
    let (ours, theirs) = (p50("sluice-reverse"), p50("nginx"));
    println!("| sluice p50 <= nginx's | {ours:.0} us vs {theirs:.0} us | {} |", verdict(ours <= theirs));
    let ratio = rps("sluice-forward") / rps("sluice-reverse");
    println!("| forward within 10% of reverse (req/s) | {ratio:.2} | {} |", verdict(ratio >= 0.9));
    println!("| idle RSS < 20 MiB | {idle_rss_mib:.1} MiB | {} |", verdict(idle_rss_mib < 20.0));
    let ratio = rps("sluice-quota-memory") / rps("sluice-reverse");
    println!("| limiter on (memory) / off >= 0.8 | {ratio:.2} | {} |", verdict(ratio >= 0.8));
    let ratio = rps("sluice-quota-redis") / rps("sluice-reverse");
    println!("| limiter on (Redis) / off >= 0.9 | {ratio:.2} | {} |", verdict(ratio >= 0.9));
    let commands = |key: &str| {
        let total: u64 = samples.get(key).map(|all| all.iter().map(|s| s.redis_commands).sum()).unwrap_or(0);
        let requests: u64 = samples.get(key).map(|all| all.iter().map(|s| s.requests).sum()).unwrap_or(0);
        total as f64 / requests.max(1) as f64
    };
    println!(
        "
Redis commands per request (INFO commandstats, scripts' own calls included): {:.3} with leases, \
         {:.3} without ({:.0} vs {:.0} req/s)",
        commands("sluice-quota-redis"),
        commands("sluice-quota-redis-no-lease"),
        rps("sluice-quota-redis"),
        rps("sluice-quota-redis-no-lease")
    );
    if samples.contains_key("baseline-reverse") {
        println!(
            "\nsluice reverse against the baseline binary: req/s {:.2}x, CPU/req {:.1} us vs {:.1} us ({:.2}x)",
            rps("sluice-reverse") / rps("baseline-reverse"),
            cpu("sluice-reverse"),
            cpu("baseline-reverse"),
            cpu("sluice-reverse") / cpu("baseline-reverse")
        );
    }
    println!("\nThe floor (no sluice code), against nginx:\n");
    for key in ["floor-pooled", "floor-direct"] {
        println!(
            "  {key}: req/s {:.2}x nginx, CPU/req {:.1} us ({:.2}x nginx's); sluice reverse adds {:.1} us/req to it",
            rps(key) / rps("nginx"),
            cpu(key),
            cpu(key) / cpu("nginx"),
            cpu("sluice-reverse") - cpu(key)
        );
    }

    println!("\nraw rounds (req/s):");
    for phase in phases {
        let all: Vec<String> = samples.get(phase.key).into_iter().flatten().map(|s| format!("{:.0}", s.rps)).collect();
        println!("  {:<48} {}", phase.title, all.join(", "));
    }
}

/// Commands redis-server has run so far: the sum of `calls=` in `INFO commandstats` (commands a
/// script runs count too), over one plain RESP exchange.
fn redis_commands(port: u16) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"INFO commandstats\r\n").is_err() {
        return 0;
    }
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // A bulk string: "$<len>\r\n<body>\r\n"; read until the announced length has arrived.
    for _ in 0..64 {
        let Ok(n) = stream.read(&mut chunk) else { break };
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&reply);
        let announced = text.strip_prefix('$').and_then(|rest| rest.split("\r\n").next()?.parse::<usize>().ok());
        if announced.is_some_and(|len| reply.len() >= len) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&reply);
    text.lines()
        .filter(|line| line.starts_with("cmdstat_") && !line.starts_with("cmdstat_info:"))
        .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

fn per_request_us(cpu_seconds: f64, requests: u64) -> f64 {
    if requests == 0 {
        return f64::NAN;
    }
    cpu_seconds / requests as f64 * 1e6
}

// ---- the processes ----

fn start_nginx(dir: &Path, name: &str, conf: &str, port: u16) -> Service {
    let prefix = dir.join(format!("nginx-{name}"));
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = conf.replace("@PREFIX@", prefix.to_str().unwrap());
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut command = Command::new("nginx");
    command.arg("-p").arg(&prefix).arg("-c").arg(&conf_path).arg("-e").arg(prefix.join("logs/error.log"));
    let mut service = Service::spawn(&format!("nginx ({name})"), command, prefix.join("logs/stdout.log"));
    service.wait_for_port(port);
    service
}

/// Settings both nginx instances share: one worker, no logging, long-lived keep-alive.
const NGINX_COMMON: &str = "
daemon off;
master_process on;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/logs/error.log warn;
events { worker_connections 4096; }
";

const NGINX_HTTP_COMMON: &str = "
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
";

fn upstream_nginx_conf(port: u16) -> String {
    format!(
        "{NGINX_COMMON}
http {{
{NGINX_HTTP_COMMON}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 \"ok\"; }}
    }}
}}
"
    )
}

fn proxy_nginx_conf(port: u16, upstream: u16) -> String {
    format!(
        "{NGINX_COMMON}
http {{
{NGINX_HTTP_COMMON}
    upstream crm {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /hubspot/ {{
            proxy_pass http://crm/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering on;
        }}
    }}
}}
"
    )
}

fn start_redis(dir: &Path, port: u16) -> Service {
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).unwrap();
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&data);
    let mut service = Service::spawn("redis-server", command, dir.join("redis.log"));
    service.wait_for_port(port);
    service
}

enum Limiter {
    Off,
    Memory,
    Redis(u16),
    /// Redis with `lease_max: 0`: every decision is a script call.
    RedisNoLease(u16),
}

struct Sluice {
    name: &'static str,
    service: Service,
    port: u16,
    admin: u16,
}

fn start_sluice(dir: &Path, name: &'static str, upstream: u16, limiter: Limiter) -> Sluice {
    start_sluice_binary(dir, name, upstream, limiter, Path::new(env!("CARGO_BIN_EXE_sluice")))
}

fn start_sluice_binary(dir: &Path, name: &'static str, upstream: u16, limiter: Limiter, binary: &Path) -> Sluice {
    let (port, admin) = (free_port(), free_port());
    let store = match limiter {
        Limiter::Redis(redis) => {
            // 250 ms rather than the 50 ms example: a 2-core box under load must not fall back
            // to local decisions halfway through the phase (checked after each round anyway).
            format!("store: {{ kind: redis, url: 'redis://127.0.0.1:{redis}/0', on_failure: local, timeout: 250ms }}\n")
        }
        Limiter::RedisNoLease(redis) => format!(
            "store: {{ kind: redis, url: 'redis://127.0.0.1:{redis}/0', on_failure: local, timeout: 250ms, lease_max: 0 }}\n"
        ),
        _ => String::new(),
    };
    // Limits far above anything this machine can send: the limiter decides every request, and
    // allows it. `reject` turns a quota that is reached after all into visible non-2xx answers.
    let quotas = match limiter {
        Limiter::Off => String::new(),
        Limiter::Memory | Limiter::Redis(_) | Limiter::RedisNoLease(_) => "    quotas:
      - { name: burst, limit: 100000000, per: 10s, key: [header:x-tenant-id] }
      - { name: daily, limit: 1000000000, per: 1d }
    over_limit: reject
"
        .to_owned(),
    };
    let config = format!(
        "listen: {{ proxy: '127.0.0.1:{port}', admin: '127.0.0.1:{admin}' }}
runtime: {{ worker_threads: 1 }}
shutdown_grace: 1s
{store}upstreams:
  - name: hubspot
    hosts: [{VENDOR_HOST}]
    prefix: /hubspot
    target: 'http://127.0.0.1:{upstream}'
{quotas}"
    );
    let path = dir.join(format!("sluice-{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(binary);
    command.arg("run").arg("-c").arg(&path).current_dir(dir).env("SLUICE_LOG", "warn");
    let mut service = Service::spawn(&format!("sluice ({name})"), command, dir.join(format!("sluice-{name}.log")));
    service.wait_for_port(port);
    let (status, body) = http_get(port, &format!("/hubspot{PATH}"), "127.0.0.1");
    assert_eq!(status, 200, "sluice ({name}) first request: {body}");
    Sluice { name, service, port, admin }
}

/// Starts this binary as a floor proxy (`--floor-proxy MODE LISTEN UPSTREAM`).
fn start_floor(dir: &Path, mode: &str, upstream: u16) -> (Service, u16) {
    let port = free_port();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--floor-proxy", mode, &port.to_string(), &upstream.to_string()]);
    let mut service = Service::spawn(&format!("floor proxy ({mode})"), command, dir.join(format!("floor-{mode}.log")));
    service.wait_for_port(port);
    (service, port)
}

/// The minimal hyper reverse proxies behind phases (g) and (h): what sluice's building blocks
/// cost with nothing of sluice (no routing table, layers, metrics or header hygiene). Each strips
/// the `/hubspot` prefix and relays the answer; errors end the connection.
mod floor {
    use std::sync::Arc;

    use bytes::Bytes;
    use std::convert::Infallible;

    use http::{HeaderValue, Request, Response, Uri};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tokio::net::{TcpListener, TcpStream};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    type Body = BoxBody<Bytes, BoxError>;

    fn boxed(body: Incoming) -> Body {
        body.map_err(|error| Box::new(error) as BoxError).boxed()
    }

    /// A failed exchange ends as a bare 502 (the bench counts non-2xx answers).
    fn answer(result: Result<Response<Incoming>, String>) -> Result<Response<Body>, Infallible> {
        Ok(match result {
            Ok(response) => response.map(boxed),
            Err(error) => {
                let mut response = Response::new(Full::new(Bytes::from(error)).map_err(|never| match never {}).boxed());
                *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                response
            }
        })
    }

    fn path_of(request: &Request<Incoming>) -> String {
        let path = request.uri().path_and_query().map_or("/", |path| path.as_str());
        let rest = path.strip_prefix("/hubspot").unwrap_or(path);
        if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        }
    }

    pub fn run(mode: &str, listen: u16, upstream: u16) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let pooled = mode == "pooled";
        runtime.block_on(async move {
            let listener = TcpListener::bind(("127.0.0.1", listen)).await.unwrap();
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .http1_writev(false)
                .build(connector);
            let authority: Arc<str> = format!("127.0.0.1:{upstream}").into();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let (client, authority) = (client.clone(), authority.clone());
                tokio::spawn(async move {
                    let mut server = hyper::server::conn::http1::Builder::new();
                    server.timer(TokioTimer::new()).writev(false);
                    if pooled {
                        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                            let client = client.clone();
                            let uri: Result<Uri, _> = format!("http://{authority}{}", path_of(&request)).parse();
                            async move {
                                let (mut parts, body) = request.into_parts();
                                parts.uri = match uri {
                                    Ok(uri) => uri,
                                    Err(error) => return answer(Err(error.to_string())),
                                };
                                let sent = client.request(Request::from_parts(parts, boxed(body))).await;
                                answer(sent.map_err(|error| error.to_string()))
                            }
                        });
                        let _ = server.serve_connection(TokioIo::new(stream), service).await;
                        return;
                    }
                    let Ok(upstream) = TcpStream::connect(&*authority).await else { return };
                    let _ = upstream.set_nodelay(true);
                    let handshake =
                        hyper::client::conn::http1::Builder::new().writev(false).handshake(TokioIo::new(upstream));
                    let Ok((sender, connection)) = handshake.await else { return };
                    tokio::spawn(connection);
                    // HTTP/1 serves one request at a time per client connection: the lock never waits.
                    let sender = Arc::new(tokio::sync::Mutex::new(sender));
                    let host = HeaderValue::from_str(&authority).unwrap();
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (sender, host) = (sender.clone(), host.clone());
                        let uri: Result<Uri, _> = path_of(&request).parse();
                        async move {
                            let (mut parts, body) = request.into_parts();
                            parts.uri = match uri {
                                Ok(uri) => uri,
                                Err(error) => return answer(Err(error.to_string())),
                            };
                            parts.headers.insert(http::header::HOST, host);
                            let mut sender = sender.lock().await;
                            if let Err(error) = sender.ready().await {
                                return answer(Err(error.to_string()));
                            }
                            let sent = sender.send_request(Request::from_parts(parts, boxed(body))).await;
                            answer(sent.map_err(|error| error.to_string()))
                        }
                    });
                    let _ = server.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
    }
}

// ---- measuring ----

struct WrkResult {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Non-2xx/3xx answers plus socket errors.
    failures: u64,
    raw: String,
}

fn wrk(url: &str, script: &Path, seconds: u64, connections: u64) -> WrkResult {
    let output = Command::new("wrk")
        .arg("-t1")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "wrk failed: {raw}");
    parse_wrk(&raw)
}

fn parse_wrk(raw: &str) -> WrkResult {
    let mut result =
        WrkResult { requests: 0, rps: 0.0, p50_us: f64::NAN, p99_us: f64::NAN, failures: 0, raw: raw.to_owned() };
    for line in raw.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(value)) => result.p50_us = duration_us(value),
            (Some("99%"), Some(value)) => result.p99_us = duration_us(value),
            (Some("Requests/sec:"), Some(value)) => result.rps = value.parse().unwrap_or(0.0),
            (Some(count), Some("requests")) => result.requests = count.parse().unwrap_or(0),
            _ => {}
        }
        if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.failures += count.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            result.failures +=
                errors.split(',').filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
        }
    }
    result
}

/// wrk's "612.00us" / "1.02ms" / "1.00s" in microseconds.
fn duration_us(text: &str) -> f64 {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * scale)
}

/// CPU clock ticks of (proxy, upstream, redis) groups.
fn cpu_of(phase: &Phase, upstream: i32) -> (u64, u64, u64) {
    let groups = group_ticks();
    let of = |pgid: Option<i32>| pgid.and_then(|pgid| groups.get(&pgid).copied()).unwrap_or(0);
    (of(phase.proxy), of(Some(upstream)), of(phase.redis))
}

/// One request on a fresh connection: (status, body).
fn http_get(port: u16, target: &str, host: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {target} HTTP/1.1\r\nHost: {host}\r\nx-tenant-id: acme\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

// ---- the machine ----

fn print_machine(settings: &Settings) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    let nproc = command_line("nproc", &[]);
    println!("machine: nproc {nproc}, CPU \"{model}\", kernel {}", command_line("uname", &["-r"]));
    println!("load average at the start: {}", load_average());
    println!(
        "tools: {} | {} | {}",
        command_line("nginx", &["-v"]),
        command_line("wrk", &["-v"]).lines().next().unwrap_or_default(),
        command_line("redis-server", &["--version"])
    );
    println!(
        "settings: wrk -t1 -c{} -d{}s --latency after a {} s warm-up, {} rounds",
        settings.connections, settings.seconds, settings.warmup, settings.rounds,
    );
    // Another build may replace the binary between compiling this harness and running it.
    let binary = env!("CARGO_BIN_EXE_sluice");
    let built = std::fs::metadata(binary)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(|| "?".to_owned(), |since| command_line("date", &["-u", "-d", &format!("@{}", since.as_secs())]));
    let repo = env!("CARGO_MANIFEST_DIR");
    let dirty = command_line("git", &["-C", repo, "status", "--porcelain", "--", "src"]).lines().count();
    println!(
        "sluice: {binary}, built {built}; repository at {} with {dirty} changed file(s) under src/",
        command_line("git", &["-C", repo, "rev-parse", "--short", "HEAD"])
    );
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
