//! A Redis Cluster of three masters on loopback ports, for the tests that need one.
//!
//! Needs `redis-server` and `redis-cli` (CI installs redis-server / redis-tools); without them
//! the tests fail loudly rather than skipping.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::closed_port;
use super::redis::RedisServer;

/// Runs `redis-cli args`, killed if it takes longer than `within`.
pub fn redis_cli(args: &[&str], within: Duration) -> Output {
    let mut child = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli must be installed for the cluster test (apt-get install redis-tools)");
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "redis-cli {args:?} did not finish within {within:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three cluster-enabled masters with all 16384 slots assigned; the servers die on drop.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The bus port is chosen too: port + 10000 may be taken, or above 65535.
                let bus = closed_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let cluster = Self { nodes };
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = redis_cli(&args, Duration::from_secs(60));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &cluster.nodes {
            loop {
                let info = redis_cli(&["-p", &node.port.to_string(), "cluster", "info"], Duration::from_secs(5));
                let text = String::from_utf8_lossy(&info.stdout).to_string();
                if text.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "node {} never reported cluster_state:ok: {text}", node.port);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Keys per node (`DBSIZE`).
    pub fn key_counts(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|node| {
                let output = redis_cli(&["-p", &node.port.to_string(), "dbsize"], Duration::from_secs(5));
                String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0)
            })
            .collect()
    }
}
