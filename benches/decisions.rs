#![allow(clippy::unwrap_used, clippy::expect_used)]
// Blocking harness code that times child processes from outside: std's clock is the right one.
#![allow(clippy::disallowed_types)]
//! Quota decisions per second against one local Redis, beside `redis-benchmark` of the same
//! script (the ceiling).
//!
//! `cargo bench --bench decisions` starts a `redis-server` on a free port, then:
//!
//! 1. one in-process [`RedisStore`] (`RedisStore::new`, `connect`), and 64 tokio tasks calling
//!    `RedisStore::decide` back to back for 10 s (after a 2 s warm-up) with two rolling quotas:
//!    a scoped ten-secondly one of 1,000 (an exact log, a sorted set per scope), spread over
//!    1,000 scopes, and an upstream-wide daily one of 10^9 (counters per 1/100 of the day), so
//!    every decision runs the whole script and nearly all are allowed;
//! 2. `SCRIPT LOAD` of the same `decide.lua`, then `redis-benchmark -c 64 -n 200000 -r 1000
//!    EVALSHA <sha> 3 <keys> <argv>` with the same keys and arguments, without pipelining (the
//!    64 clients each wait for their answer) and with `-P 16` (the server's own ceiling).
//!
//! CPU time of this process and of redis-server is read from `/proc` around each part.
//! Settings: `SLUICE_BENCH_SECONDS` (10), `SLUICE_BENCH_TASKS` (64), `SLUICE_BENCH_SCOPES` (1000).
//! Needs `redis-server` and `redis-benchmark` (`apt-get install -y redis-server redis-tools`).
//! Without `--bench` (as `cargo test --all-targets` runs it) it does nothing.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::{OnFailure, Store, StoreKind};
use sluice::limit::decide::{Decision, Rule};
use sluice::limit::redis::RedisStore;

const DECIDE_SCRIPT: &str = concat!(include_str!("../src/limit/quota.lua"), include_str!("../src/limit/decide.lua"));
const SEC: i64 = 1_000_000;

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("skipped (run with cargo bench)");
        return;
    }
    for tool in ["redis-server", "redis-benchmark"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
        if !found {
            eprintln!("decisions: `{tool}` is not installed (apt-get install -y redis-server redis-tools)");
            std::process::exit(2);
        }
    }
    let number = |name: &str, default: u64| {
        std::env::var(name).ok().and_then(|value| value.parse().ok()).filter(|v| *v > 0).unwrap_or(default)
    };
    let seconds = number("SLUICE_BENCH_SECONDS", 10);
    let tasks = usize::try_from(number("SLUICE_BENCH_TASKS", 64)).unwrap_or(64);
    let scopes = usize::try_from(number("SLUICE_BENCH_SCOPES", 1000)).unwrap_or(1000);

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let redis = Redis::start(dir.path(), port);
    let ticks = clock_ticks() as f64;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_default();
    println!(
        "machine: {} CPUs, \"{model}\", load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!("redis-server on 127.0.0.1:{port}; {tasks} tasks, {scopes} scopes, {seconds} s");

    // The default shape, as a HubSpot-like config has it: a per-tenant ten-secondly window
    // (an exact log) and an upstream-wide daily budget (counters).
    let rules =
        [(Rule::rolling(1_000, 10 * SEC, 100_000), 1i64), (Rule::rolling(1_000_000_000, 86_400 * SEC, 250_000), 1i64)];
    let keys: Arc<Vec<(Vec<String>, String)>> = Arc::new(
        (0..scopes)
            .map(|scope| {
                (
                    vec![format!("sluice:{{hubspot}}:burst:t{scope}"), "sluice:{hubspot}:daily:_all".to_owned()],
                    format!("sluice:{{hubspot}}:pause:t{scope}"),
                )
            })
            .collect(),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let workers = runtime.metrics().num_workers();
    let sha = runtime.block_on(async {
        let store = RedisStore::new(Store {
            kind: StoreKind::Redis,
            url: Some(format!("redis://127.0.0.1:{port}/0")),
            on_failure: OnFailure::Local,
            timeout: Duration::from_millis(250),
            key_prefix: "sluice".to_owned(),
            heartbeat: Duration::from_secs(1),
            // Every decision is a script call here: this measures the store, not the leases.
            lease_max: 0,
            lease_ttl: Duration::ZERO,
        });
        store.connect().await.expect("connect to redis-server");

        drive(&store, &keys, &rules, tasks, Duration::from_secs(2)).await;
        let (own_before, redis_before) = (self_ticks(), group_ticks(redis.pgid()));
        let started = Instant::now();
        let outcome = drive(&store, &keys, &rules, tasks, Duration::from_secs(seconds)).await;
        let wall = started.elapsed().as_secs_f64();
        let (own, redis_cpu) = (self_ticks() - own_before, group_ticks(redis.pgid()) - redis_before);
        let decisions = outcome.allowed + outcome.rejected;
        let mut latencies = outcome.latencies;
        latencies.sort_unstable();
        let quantile = |q: f64| {
            latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1))).copied()
        };
        println!(
            "\nRedisStore::decide, {tasks} tasks on {workers} tokio workers, 2 quotas over {scopes} scopes:\n  \
             {:.0} decisions/s ({} allowed, {} rejected, {} errors in {wall:.1} s), p50 {} us, p99 {} us\n  \
             CPU per decision: this process {:.1} us, redis-server {:.1} us",
            decisions as f64 / wall,
            outcome.allowed,
            outcome.rejected,
            outcome.errors,
            quantile(0.50).unwrap_or(0),
            quantile(0.99).unwrap_or(0),
            own as f64 / ticks / decisions.max(1) as f64 * 1e6,
            redis_cpu as f64 / ticks / decisions.max(1) as f64 * 1e6,
        );

        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let sha: String =
            redis::cmd("SCRIPT").arg("LOAD").arg(DECIDE_SCRIPT).query_async(&mut connection).await.unwrap();
        sha
    });

    // The same call as RedisStore::decide makes: KEYS = burst, daily, pause; ARGV = max_wait,
    // now (0: Redis TIME), n, then kind, cost, limit, span, width, -, - per quota, then no
    // lease (0 0) and a nonce naming the log's members (random here, as redis-benchmark can).
    let mut argv: Vec<String> = vec![
        "EVALSHA".into(),
        sha.clone(),
        "3".into(),
        "sluice:{hubspot}:burst:t__rand_int__".into(),
        "sluice:{hubspot}:daily:_all".into(),
        "sluice:{hubspot}:pause:t__rand_int__".into(),
        "0".into(),
        "0".into(),
        "2".into(),
    ];
    for (rule, cost) in &rules {
        let Rule::Rolling(window) = rule else { unreachable!("rolling rules only") };
        argv.extend([2, *cost, window.limit, window.span, window.width, 0, 0].map(|n| n.to_string()));
    }
    argv.extend(["0".into(), "0".into(), "n__rand_int__".into()]);
    for pipeline in [1u32, 16] {
        let redis_before = group_ticks(redis.pgid());
        let output = Command::new("redis-benchmark")
            .args(["-p", &port.to_string(), "-c", &tasks.to_string(), "-n", "200000"])
            .args(["-r", &scopes.to_string(), "-P", &pipeline.to_string(), "--csv"])
            .args(&argv)
            .output()
            .unwrap();
        let redis_cpu = group_ticks(redis.pgid()) - redis_before;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
        let row: Vec<String> = text
            .lines()
            .last()
            .unwrap_or_default()
            .split(',')
            .map(|field| field.trim_matches('"').to_owned())
            .collect();
        let field = |at: usize| row.get(at).and_then(|value| value.parse::<f64>().ok()).unwrap_or(f64::NAN);
        println!(
            "\nredis-benchmark -c {tasks} -n 200000 -r {scopes} -P {pipeline} EVALSHA {sha} 3 ...:\n  \
             {:.0} calls/s, p50 {:.0} us, p99 {:.0} us; redis-server CPU per call {:.1} us",
            field(1),
            field(4) * 1000.0,
            field(6) * 1000.0,
            redis_cpu as f64 / ticks / 200_000.0 * 1e6,
        );
        if !output.status.success() || row.len() < 7 {
            println!("  (unexpected output: {text} {})", String::from_utf8_lossy(&output.stderr));
        }
    }
    println!("\nfull command: redis-benchmark -p {port} -c {tasks} -n 200000 -r {scopes} [-P 16] {}", argv.join(" "));
    println!("load average at the end: {}", load_average());
    drop(redis);
}

struct Outcome {
    allowed: u64,
    rejected: u64,
    errors: u64,
    latencies: Vec<u64>,
}

/// `tasks` tasks deciding back to back until `length` is over.
async fn drive(
    store: &Arc<RedisStore>,
    keys: &Arc<Vec<(Vec<String>, String)>>,
    rules: &[(Rule, i64); 2],
    tasks: usize,
    length: Duration,
) -> Outcome {
    let deadline = Instant::now() + length;
    let counter = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (store, keys, counter, rules) = (store.clone(), keys.clone(), counter.clone(), *rules);
            tokio::spawn(async move {
                let mut outcome = Outcome { allowed: 0, rejected: 0, errors: 0, latencies: Vec::new() };
                let mut at = task;
                while Instant::now() < deadline {
                    // Scopes visited in a spread order, different per task.
                    at = (at + 7919 + usize::try_from(counter.fetch_add(1, Ordering::Relaxed) % 13).unwrap_or(0))
                        % keys.len();
                    let (keys, pause) = &keys[at];
                    let sent = Instant::now();
                    match store.decide(keys, pause, &rules, 0, 0).await {
                        Ok(Decision::Allowed { .. }) => outcome.allowed += 1,
                        Ok(_) => outcome.rejected += 1,
                        Err(_) => outcome.errors += 1,
                    }
                    outcome.latencies.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                outcome
            })
        })
        .collect();
    let mut total = Outcome { allowed: 0, rejected: 0, errors: 0, latencies: Vec::new() };
    for handle in handles {
        let outcome = handle.await.unwrap();
        total.allowed += outcome.allowed;
        total.rejected += outcome.rejected;
        total.errors += outcome.errors;
        total.latencies.extend(outcome.latencies);
    }
    total
}

/// redis-server in its own process group, killed on drop.
struct Redis {
    child: Child,
}

impl Redis {
    fn start(dir: &std::path::Path, port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    fn pgid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn self_ticks() -> u64 {
    stat_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()).map_or(0, |(_, ticks)| ticks)
}

/// utime + stime of every process in group `pgid`.
fn group_ticks(pgid: i32) -> u64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            entry.file_name().to_str()?.parse::<u32>().ok()?;
            stat_ticks(&std::fs::read_to_string(entry.path().join("stat")).ok()?)
        })
        .filter(|(group, _)| *group == pgid)
        .map(|(_, ticks)| ticks)
        .sum()
}

/// (process group, utime + stime) from a `/proc/<pid>/stat` line.
fn stat_ticks(stat: &str) -> Option<(i32, u64)> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let pgid = fields.get(2)?.parse().ok()?;
    Some((pgid, fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?))
}

fn clock_ticks() -> u64 {
    let output = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(100)
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
