//! Shared test support: a mock CRM vendor, a sluice started in-process on ephemeral ports, a test
//! CA, and a real `redis-server` on a free port. Everything runs over real loopback sockets.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod bulk;
pub mod cluster;
pub mod curl;
pub mod dialects;
pub mod mock_crm;
pub mod mtls;
pub mod oauth;
pub mod process;
pub mod raw_http;
pub mod redis;
pub mod relay;
pub mod security;
pub mod sni;
pub mod streaming;
pub mod vendor;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice::app::Running;

pub use mock_crm::{MockCrm, Recorded};

/// A sluice running in this process, with its config file and scratch directory.
pub struct TestSluice {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestSluice {
    /// Starts sluice on `yaml`; `listen` is filled in with port 0 unless the YAML sets it.
    pub async fn start(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, yaml).await
    }

    pub async fn start_in(dir: tempfile::TempDir, yaml: &str) -> Self {
        let yaml = yaml.replace("$DIR", dir.path().to_str().unwrap());
        let text = if yaml.contains("listen:") {
            yaml
        } else {
            format!("listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{yaml}")
        };
        let config_path = dir.path().join("sluice.yaml");
        std::fs::write(&config_path, text).unwrap();
        let running = sluice::app::start(&config_path).await.expect("sluice starts");
        Self { running: Some(running), dir, config_path }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.running().proxy_addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running().admin_addr)
    }

    /// The interception CA sluice created in its directory (configs use `$DIR/ca.crt`).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.crt")).unwrap()
    }

    /// A reqwest client that sends everything through this sluice and trusts its CA.
    pub fn proxied_client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.proxy_url()).unwrap())
            .timeout(Duration::from_secs(20));
        if let Ok(pem) = std::fs::read(self.dir.path().join("ca.crt")) {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        builder.build().unwrap()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics")).await.unwrap().text().await.unwrap()
    }

    /// Rewrites the config file in place (same inode), as an editor would.
    pub fn write_config(&self, yaml: &str) {
        let yaml = yaml.replace("$DIR", self.dir.path().to_str().unwrap());
        let text = if yaml.contains("listen:") {
            yaml
        } else {
            format!("listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{yaml}")
        };
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub async fn shutdown(mut self) -> bool {
        self.running.take().unwrap().shutdown_within(Duration::from_secs(10)).await
    }
}

/// A plain client (no proxy) with a timeout.
pub fn direct_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(20)).build().unwrap()
}

/// Sum of a Prometheus counter/gauge over the series whose labels contain every `labels` pair.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|(key, value)| line.contains(&format!("{key}=\"{value}\""))))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 50 ms until it holds or `within` passes; bounded in time and count.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a fresh CA pair into `dir` (as `ca.crt` / `ca.key`) and returns the cert PEM.
pub fn write_test_ca(dir: &Path) -> String {
    let (cert, key) = sluice::tls::ca::generate_ca_pem().unwrap();
    sluice::tls::ca::write_ca_files(&dir.join("ca.crt"), &dir.join("ca.key"), &cert, &key).unwrap();
    cert
}

/// A TCP port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
