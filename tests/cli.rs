#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `sluice` binary: `check`, `ca init`, and `run`'s start-up failures and log format.
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::{run_sluice, Finished, SluiceProcess};
use support::{direct_client, eventually, MockCrm, TestSluice};

const WAIT: Duration = Duration::from_secs(30);

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn sluice(args: &[&str]) -> Finished {
    run_sluice(args, &[], crate_root(), WAIT)
}

fn sluice_env(args: &[&str], envs: &[(&str, &str)]) -> Finished {
    run_sluice(args, envs, crate_root(), WAIT)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn describe(finished: &Finished) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", finished.status, finished.stdout, finished.stderr)
}

// === check ===

#[test]
fn check_accepts_the_example_config() {
    let dev_ca = crate_root().join("config/dev-ca");
    let dev_ca_existed = dev_ca.exists();
    let finished = sluice(&["check", "-c", "config/sluice.example.yaml"]);
    assert!(finished.success(), "{}", describe(&finished));
    assert!(finished.stdout.contains("OK"), "{}", describe(&finished));
    assert!(finished.stdout.contains("hubspot, salesforce, zendesk"), "{}", describe(&finished));
    assert_eq!(dev_ca.exists(), dev_ca_existed, "check writes nothing, not even the CA");
}

#[test]
fn check_accepts_every_shipped_example() {
    let mut checked = 0;
    for entry in std::fs::read_dir(crate_root().join("config/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
            let relative = path.strip_prefix(crate_root()).unwrap().to_str().unwrap().to_owned();
            let finished = sluice(&["check", "-c", &relative]);
            assert!(finished.success(), "{relative}: {}", describe(&finished));
            checked += 1;
        }
    }
    assert!(checked >= 2, "the examples directory holds the example configs");
}

#[test]
fn check_names_an_unknown_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         upstreams:\n\
         \x20 - name: hubspot\n\
         \x20   prefix: /hubspot\n\
         \x20   target: https://api.hubapi.com\n\
         \x20   retry_budget: 3\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("retry_budget"), "{}", describe(&finished));
    assert!(finished.stderr.contains("line 6"), "{}", describe(&finished));
    assert!(finished.stderr.contains("bad.yaml"), "the error names the file: {}", describe(&finished));
}

#[test]
fn check_names_an_unknown_top_level_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\nshutdown_grase: 10s\nupstreams: []\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("shutdown_grase"), "{}", describe(&finished));
    assert!(finished.stderr.contains("line 2"), "{}", describe(&finished));
}

#[test]
fn check_names_a_semantic_error_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "# prefix on line 6\n\
         listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         upstreams:\n\
         \x20 - name: hubspot\n\
         \x20   target: https://api.hubapi.com\n\
         \x20   prefix: nope\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("upstreams[0].prefix"), "{}", describe(&finished));
    assert!(finished.stderr.contains("line 6"), "{}", describe(&finished));
}

#[test]
fn check_names_bad_lease_settings_and_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         store:\n\
         \x20 kind: redis\n\
         \x20 url: redis://127.0.0.1:6379/0\n\
         \x20 lease_max: 20000\n\
         \x20 lease_ttl: 5s\n\
         upstreams:\n\
         \x20 - name: hubspot\n\
         \x20   prefix: /hubspot\n\
         \x20   target: https://api.hubapi.com\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    for expected in ["store.lease_max", "line 5", "store.lease_ttl", "line 6"] {
        assert!(finished.stderr.contains(expected), "{expected}: {}", describe(&finished));
    }
}

#[test]
fn check_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         upstreams:\n\
         \x20 - name: hubspot\n\
         \x20   prefix: /hubspot\n\
         \x20   target: https://api.hubapi.com\n\
         \x20 - name: hubspot\n\
         \x20   hosts: [api.hubapi.com]\n\
         \x20 - name: pipedrive\n\
         \x20   prefix: /pipedrive\n\
         \x20   target: ftp://nope\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    for expected in ["upstreams[1].name", "line 6", "upstreams[2].target", "line 10"] {
        assert!(finished.stderr.contains(expected), "{expected}: {}", describe(&finished));
    }
}

#[test]
fn check_names_a_bad_value_type_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\nshutdown_grace: soon\nupstreams: []\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("shutdown_grace"), "{}", describe(&finished));
    assert!(finished.stderr.contains("line 2"), "{}", describe(&finished));
}

#[test]
fn check_fails_clearly_on_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.yaml");
    let finished = sluice(&["check", "-c", missing.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("nowhere.yaml"), "{}", describe(&finished));
    assert!(finished.stderr.contains("cannot read"), "{}", describe(&finished));
}

#[test]
fn check_refuses_an_unusable_ca() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ca.crt", "not a certificate\n");
    write(dir.path(), "ca.key", "not a key\n");
    let path = write(
        dir.path(),
        "sluice.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         intercept: { ca_cert: ca.crt, ca_key: ca.key }\n\
         upstreams:\n\
         \x20 - { name: hubspot, hosts: [api.hubapi.com], intercept: true }\n",
    );
    let finished = run_sluice(&["check", "-c", path.to_str().unwrap()], &[], dir.path(), WAIT);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("intercept.ca_"), "{}", describe(&finished));
}

#[test]
fn sluice_config_env_is_the_default_for_check() {
    let finished = sluice_env(&["check"], &[("SLUICE_CONFIG", "config/sluice.example.yaml")]);
    assert!(finished.success(), "{}", describe(&finished));
    assert!(finished.stdout.contains("sluice.example.yaml: OK"), "{}", describe(&finished));

    // An explicit -c wins over the environment.
    let finished =
        sluice_env(&["check", "-c", "config/examples/minimal.yaml"], &[("SLUICE_CONFIG", "/nonexistent/sluice.yaml")]);
    assert!(finished.success(), "{}", describe(&finished));
    assert!(finished.stdout.contains("minimal.yaml: OK"), "{}", describe(&finished));

    let finished = sluice_env(&["check"], &[("SLUICE_CONFIG", "/nonexistent/sluice.yaml")]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("/nonexistent/sluice.yaml"), "{}", describe(&finished));
}

#[test]
fn check_without_a_config_is_a_usage_error() {
    let finished = sluice(&["check"]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("--config"), "{}", describe(&finished));
}

#[test]
fn check_names_the_line_of_a_bad_item_in_a_flow_list() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         upstreams:\n\
         \x20 - name: hubspot\n\
         \x20   hosts: [api.hubapi.com, \"bad host\"]\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("upstreams[0].hosts[1]"), "{}", describe(&finished));
    assert!(finished.stderr.contains("line 4"), "{}", describe(&finished));
}

#[test]
fn check_names_the_line_of_an_upstream_missing_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         upstreams:\n\
         \x20 - name: hubspot\n\
         \x20   prefix: /hubspot\n\
         \x20   target: https://api.hubapi.com\n\
         \x20 - name: zendesk\n\
         \x20   target: https://acme.zendesk.com\n",
    );
    let finished = sluice(&["check", "-c", path.to_str().unwrap()]);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("upstreams[1].hosts"), "{}", describe(&finished));
    assert!(finished.stderr.contains("line 6"), "the upstream that lacks the key: {}", describe(&finished));
}

#[test]
fn check_names_the_file_and_line_of_a_ca_problem() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ca.crt", "not a certificate\n");
    write(dir.path(), "ca.key", "not a key\n");
    let path = write(
        dir.path(),
        "sluice.yaml",
        "listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }\n\
         intercept:\n\
         \x20 ca_cert: ca.crt\n\
         \x20 ca_key: ca.key\n\
         upstreams:\n\
         \x20 - { name: hubspot, hosts: [api.hubapi.com], intercept: true }\n",
    );
    let finished = run_sluice(&["check", "-c", path.to_str().unwrap()], &[], dir.path(), WAIT);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("sluice.yaml"), "the file: {}", describe(&finished));
    let named = (finished.stderr.contains("intercept.ca_key") && finished.stderr.contains("line 4"))
        || (finished.stderr.contains("intercept.ca_cert") && finished.stderr.contains("line 3"));
    assert!(named, "the key and its line: {}", describe(&finished));
}

// === ca init ===

#[test]
fn ca_init_writes_a_pem_pair_with_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/ca");
    let finished = sluice(&["ca", "init", "--out", out.to_str().unwrap()]);
    assert!(finished.success(), "{}", describe(&finished));
    let cert = std::fs::read_to_string(out.join("ca.crt")).unwrap();
    let key = std::fs::read_to_string(out.join("ca.key")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----") && cert.trim_end().ends_with("-----END CERTIFICATE-----"));
    assert!(key.starts_with("-----BEGIN ") && key.contains("PRIVATE KEY-----"), "{key}");
    let mode = std::fs::metadata(out.join("ca.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is readable by its owner only: {mode:o}");
    let cert_mode = std::fs::metadata(out.join("ca.crt")).unwrap().permissions().mode() & 0o077;
    assert_eq!(cert_mode & 0o022, 0, "nobody else may write the certificate");
}

#[test]
fn ca_init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    assert!(sluice(&["ca", "init", "--out", out]).success());
    let (cert, key) =
        (std::fs::read(dir.path().join("ca.crt")).unwrap(), std::fs::read(dir.path().join("ca.key")).unwrap());

    let refused = sluice(&["ca", "init", "--out", out]);
    assert!(!refused.success(), "{}", describe(&refused));
    assert!(refused.stderr.contains("--force"), "{}", describe(&refused));
    assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), cert, "the certificate is untouched");
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key, "the key is untouched");

    // Half a pair is refused too: the surviving file may be the one clients trust.
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let refused = sluice(&["ca", "init", "--out", out]);
    assert!(!refused.success(), "{}", describe(&refused));
    assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), cert);

    let forced = sluice(&["ca", "init", "--out", out, "--force"]);
    assert!(forced.success(), "{}", describe(&forced));
    assert_ne!(std::fs::read(dir.path().join("ca.crt")).unwrap(), cert, "--force writes a new CA");
    let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn ca_from_ca_init_intercepts_for_clients_that_trust_it() {
    let dir = tempfile::tempdir().unwrap();
    let finished = run_sluice(&["ca", "init", "--out", dir.path().to_str().unwrap()], &[], crate_root(), WAIT);
    assert!(finished.success(), "{}", describe(&finished));
    let ca_pem = std::fs::read(dir.path().join("ca.crt")).unwrap();

    let mock = MockCrm::start().await;
    let yaml = format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}\nupstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}', intercept: true }}\n",
        mock.url()
    );
    let sluice = TestSluice::start_in(dir, &yaml).await;
    assert_eq!(sluice.ca_pem(), ca_pem, "sluice uses the CA it was given, not a new one");
    let checked = run_sluice(&["check", "-c", sluice.config_path.to_str().unwrap()], &[], crate_root(), WAIT);
    assert!(checked.success(), "check loads the existing CA: {}", describe(&checked));

    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .tls_built_in_root_certs(false)
        .timeout(WAIT)
        .build()
        .unwrap();
    let response = client.get("https://api.hubapi.com/crm/v3/objects/contacts").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.requests()[0].path, "/crm/v3/objects/contacts");
    assert!(sluice.shutdown().await);
}

// === run ===

#[test]
fn run_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "sluice.yaml",
        "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }\nupstreams:\n  - { name: hubspot, prefix: /hubspot, target: 'nope' }\n",
    );
    let finished = run_sluice(&["run", "-c", path.to_str().unwrap()], &[], dir.path(), WAIT);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("upstreams[0].target"), "{}", describe(&finished));

    let finished = run_sluice(&["run", "-c", "missing.yaml"], &[], dir.path(), WAIT);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains("missing.yaml"), "{}", describe(&finished));
}

#[test]
fn run_fails_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "sluice.yaml",
        &format!("listen: {{ proxy: 127.0.0.1:{port}, admin: 127.0.0.1:0 }}\nupstreams: []\n"),
    );
    let finished = run_sluice(&["run", "-c", path.to_str().unwrap()], &[], dir.path(), WAIT);
    assert!(!finished.success(), "{}", describe(&finished));
    assert!(finished.stderr.contains(&format!("127.0.0.1:{port}")), "{}", describe(&finished));
    assert!(finished.stderr.contains("proxy"), "it names which listener: {}", describe(&finished));
    drop(taken);
}

/// A config on ephemeral ports with one reverse-mode upstream (`/hubspot`) at `target`, plus
/// `extra` top-level lines.
fn write_reverse_config(dir: &Path, target: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{extra}\
         upstreams:\n  - {{ name: hubspot, prefix: /hubspot, target: '{target}' }}\n"
    );
    write(dir, "sluice.yaml", &yaml)
}

/// The started process's proxy and admin addresses, once `/readyz` answers 200.
async fn serving(process: &mut SluiceProcess) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (proxy, admin) = process.addresses(WAIT).await;
    let client = direct_client();
    let ready = eventually(WAIT, || async {
        client.get(format!("http://{admin}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "{}", process.stderr_text());
    (proxy, admin)
}

#[tokio::test]
async fn run_takes_its_config_from_sluice_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "sluice.yaml", "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }\nupstreams: []\n");
    let mut process = SluiceProcess::spawn(
        &["run"],
        &[("SLUICE_CONFIG", path.to_str().unwrap()), ("SLUICE_LOG", "info")],
        dir.path(),
    );
    serving(&mut process).await;
    process.signal("TERM");
    let status = process.wait_exit(WAIT).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", process.stderr_text());
}

#[tokio::test]
async fn json_log_format_writes_one_json_object_per_line() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_reverse_config(dir.path(), &mock.url(), "");
    let mut process = SluiceProcess::run(&path, &[("SLUICE_LOG_FORMAT", "json")]);
    let (proxy, _) = serving(&mut process).await;
    let client = direct_client();
    assert_eq!(client.get(format!("http://{proxy}/hubspot/logged")).send().await.unwrap().status(), 200);
    process.signal("TERM");
    let status = process.wait_exit(WAIT).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", process.stderr_text());

    let lines = process.stderr_lines();
    assert!(!lines.is_empty());
    let mut serving = false;
    for line in lines.iter().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(value.is_object(), "{line}");
        assert!(value.get("level").is_some() && value.get("timestamp").is_some(), "{line}");
        if value["message"] == "sluice is serving." {
            serving = true;
            assert_eq!(value["proxy"], proxy.to_string(), "fields are JSON fields: {line}");
        }
    }
    assert!(serving, "the start-up line is among them: {lines:?}");
}

/// `worker_threads: 1` runs tokio's single-threaded scheduler: proxying, reload (file reads)
/// and a graceful SIGTERM must all work on it.
#[tokio::test]
async fn one_worker_thread_proxies_reloads_and_exits_cleanly() {
    let mock = MockCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_reverse_config(dir.path(), &mock.url(), "runtime: { worker_threads: 1 }\n");
    let mut process = SluiceProcess::run(&path, &[]);
    let (proxy, admin) = serving(&mut process).await;
    let client = direct_client();
    for _ in 0..20 {
        assert_eq!(client.get(format!("http://{proxy}/hubspot/one-thread")).send().await.unwrap().status(), 200);
    }
    let reload = client.post(format!("http://{admin}/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200, "{}", process.stderr_text());
    assert_eq!(client.get(format!("http://{proxy}/hubspot/after-reload")).send().await.unwrap().status(), 200);
    process.signal("TERM");
    let status = process.wait_exit(WAIT).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", process.stderr_text());
}

/// The chart deploys the image of this release by default (its `appVersion`, the tag the image
/// is built and pushed under), and the Dockerfile's runtime user is the one the chart runs as.
#[test]
fn the_chart_and_the_image_follow_the_crate() {
    let version = env!("CARGO_PKG_VERSION");
    let chart = std::fs::read_to_string(crate_root().join("charts/sluice/Chart.yaml")).unwrap();
    let app_version =
        chart.lines().find_map(|line| line.strip_prefix("appVersion:")).map(|v| v.trim().trim_matches('"'));
    assert_eq!(app_version, Some(version), "charts/sluice/Chart.yaml appVersion follows Cargo.toml's version");
    let values = std::fs::read_to_string(crate_root().join("charts/sluice/values.yaml")).unwrap();
    let tag =
        values.lines().skip_while(|line| !line.starts_with("image:")).find_map(|line| line.trim().strip_prefix("tag:"));
    assert!(
        matches!(tag.map(str::trim), Some("\"\"") | Some("''"))
            || tag.map(|t| t.trim().trim_matches('"')) == Some(version),
        "image.tag is empty (the appVersion) or the crate version: {tag:?}"
    );
    let dockerfile = std::fs::read_to_string(crate_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("\nUSER 65532:65532\n") && dockerfile.contains("\nENTRYPOINT [\"sluice\"]\n"));
    assert!(values.contains("runAsUser: 65532"), "the chart runs the image's user");
}

#[test]
fn version_and_help() {
    let version = sluice(&["--version"]);
    assert!(version.success(), "{}", describe(&version));
    assert!(version.stdout.contains(env!("CARGO_PKG_VERSION")), "{}", describe(&version));
    let help = sluice(&["--help"]);
    assert!(help.success());
    for command in ["run", "check", "ca"] {
        assert!(help.stdout.contains(command), "{}", describe(&help));
    }
}
