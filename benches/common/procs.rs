//! What the process-level benches (`load`, `intercept`, `memory`) share: child processes in
//! their own process groups (reaped on drop), CPU ticks and RSS read from `/proc`, and the
//! machine facts every table in BENCHMARKS.md is printed with.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process in its own process group; SIGTERM (then SIGKILL) to the group on drop.
pub struct Service {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        command.process_group(0).stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        let child = command.spawn().unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Self { name: name.to_owned(), child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process group (the child leads its own).
    pub fn pgid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn wait_for_port(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("{} exited ({status}) before listening on {port}:\n{log}", self.name);
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "{} did not listen on {port} within 30 s", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let pgid = self.pgid();
        signal_group(pgid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Workers and helpers outlive a master that died hard: end whatever is left of the group.
        if group_alive(pgid) {
            signal_group(pgid, "KILL");
        }
    }
}

pub fn signal_group(pgid: i32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// utime + stime of every process, summed by process group.
pub fn group_ticks() -> BTreeMap<i32, u64> {
    let mut groups = BTreeMap::new();
    for (pgid, ticks) in processes() {
        *groups.entry(pgid).or_insert(0) += ticks;
    }
    groups
}

/// utime + stime of one process group.
pub fn ticks_of(pgid: i32) -> u64 {
    group_ticks().get(&pgid).copied().unwrap_or(0)
}

pub fn group_alive(pgid: i32) -> bool {
    processes().any(|(group, _)| group == pgid)
}

/// (process group, utime + stime) of every process in /proc.
pub fn processes() -> impl Iterator<Item = (i32, u64)> {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|entry| {
        entry.file_name().to_str()?.parse::<u32>().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // Fields after "pid (comm)": state ppid pgrp ... utime (14th) stime (15th).
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let pgid = fields.get(2)?.parse().ok()?;
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((pgid, ticks))
    })
}

/// Sum of a `/proc/<pid>/status` field (KiB) over every process of a group: squid and nginx
/// keep helpers and workers beside their master.
pub fn group_status_kib(pgid: i32, field: &str) -> u64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
            let group: i32 = fields.get(2)?.parse().ok()?;
            (group == pgid).then(|| vm_status_kib(pid, field))
        })
        .sum()
}

pub fn vm_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|line| line.strip_prefix(field)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

pub fn clock_ticks() -> u64 {
    let output = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(100)
}

/// CPU microseconds per unit of work, from clock ticks.
pub fn per_unit_us(ticks: u64, clock_ticks: u64, units: u64) -> f64 {
    if units == 0 {
        return 0.0;
    }
    ticks as f64 / clock_ticks as f64 * 1e6 / units as f64
}

pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            text.trim().to_owned()
        })
        .unwrap_or_default()
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The machine line every bench prints first.
pub fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    println!(
        "machine: nproc {}, CPU \"{model}\", kernel {}",
        command_line("nproc", &[]),
        command_line("uname", &["-r"])
    );
    println!("load average at the start: {}", load_average());
}

/// nginx answering `200 "ok"` on every path over TLS (`cert`, `key`), one worker, no logs.
pub fn start_tls_nginx(dir: &std::path::Path, port: u16, cert: &std::path::Path, key: &std::path::Path) -> Service {
    let prefix = dir.join("nginx-tls");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let p = prefix.to_str().unwrap();
    let conf = format!(
        "daemon off;
master_process on;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:SSL:1m;
        location / {{ return 200 \"ok\"; }}
    }}
}}
",
        cert = cert.display(),
        key = key.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut command = Command::new("nginx");
    command.arg("-p").arg(&prefix).arg("-c").arg(&conf_path).arg("-e").arg(prefix.join("logs/error.log"));
    let mut service = Service::spawn("nginx (tls upstream)", command, prefix.join("logs/stdout.log"));
    service.wait_for_port(port);
    service
}
