#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Live reload, through real sockets: by file change (in place, editor-style rename, and a
//! Kubernetes ConfigMap `..data` symlink swap), by `POST /reload`, and by SIGHUP to the binary.
//! Invalid files are refused whole and the old config keeps serving; requests in flight finish
//! on the config they started with.
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::process::SluiceProcess;
use support::{direct_client, eventually, metric_value, MockCrm, TestSluice};

const WAIT: Duration = Duration::from_secs(15);

/// One reverse-mode upstream: `/hubspot/...` goes to `target`. With the `listen` line that
/// `TestSluice` prepends, `name` is line 3, `prefix` line 4 and `target` line 5.
fn reverse(target: &str) -> String {
    format!("upstreams:\n  - name: hubspot\n    prefix: /hubspot\n    target: '{target}'\n")
}

fn with_listen(yaml: &str) -> String {
    format!("listen: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{yaml}")
}

/// GET `path` on the proxy listener (reverse mode); the status and the JSON body.
async fn get(sluice: &TestSluice, path: &str) -> (u16, Value) {
    let response = direct_client().get(format!("{}{path}", sluice.proxy_url())).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post_reload(sluice: &TestSluice) -> (u16, Value) {
    let response = direct_client().post(sluice.admin_url("/reload")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn admin_json(sluice: &TestSluice, path: &str) -> Value {
    direct_client().get(sluice.admin_url(path)).send().await.unwrap().json().await.unwrap()
}

fn saw(mock: &MockCrm, path: &str) -> bool {
    mock.requests().iter().any(|request| request.path == path)
}

/// Sends `/hubspot<path>` until `mock` receives it: true once the new config routes there.
async fn eventually_routed_to(sluice: &TestSluice, mock: &MockCrm, path: &str) -> bool {
    eventually(WAIT, || async move {
        let (status, _) = get(sluice, &format!("/hubspot{path}")).await;
        status == 200 && saw(mock, path)
    })
    .await
}

fn reload_count(metrics: &str, result: &str) -> f64 {
    metric_value(metrics, "sluice_config_reloads_total", &[("result", result)])
}

#[tokio::test]
async fn file_change_in_place_retargets_an_upstream() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let (status, body) = get(&sluice, "/hubspot/before").await;
    assert_eq!(status, 200);
    assert_eq!(body["path"], "/before");
    assert!(saw(&old, "/before"));

    sluice.write_config(&reverse(&new.url()));
    assert!(eventually_routed_to(&sluice, &new, "/after").await, "the new target was never used");
    let (status, _) = get(&sluice, "/hubspot/later").await;
    assert_eq!(status, 200);
    assert!(saw(&new, "/later") && !saw(&old, "/later"), "after the reload nothing goes to the old target");

    let config = admin_json(&sluice, "/config").await;
    assert!(config["generation"].as_u64().unwrap() >= 2);
    assert_eq!(config["config"]["upstreams"][0]["target"], new.url());
    let metrics = sluice.metrics().await;
    assert!(reload_count(&metrics, "success") >= 2.0, "{metrics}");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn file_change_adds_a_new_upstream_and_prefix() {
    let (hubspot, pipedrive) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&hubspot.url())).await;
    let (status, body) = get(&sluice, "/pipedrive/v1/deals").await;
    assert_eq!(status, 404, "no upstream has /pipedrive yet: {body}");

    sluice.write_config(&format!(
        "{}  - {{ name: pipedrive, prefix: /pipedrive, target: '{}' }}\n",
        reverse(&hubspot.url()),
        pipedrive.url()
    ));
    let added = eventually(WAIT, || async {
        let (status, body) = get(&sluice, "/pipedrive/v1/deals").await;
        status == 200 && body["path"] == "/v1/deals"
    })
    .await;
    assert!(added, "the added upstream never served");
    assert!(saw(&pipedrive, "/v1/deals"));
    let (status, _) = get(&sluice, "/hubspot/still").await;
    assert_eq!(status, 200, "the unchanged upstream keeps serving");
    assert!(saw(&hubspot, "/still"));
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn editor_style_write_and_rename_is_seen() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    // vim, sed -i and most config tools write a new file and rename it over the old one.
    let temp = sluice.dir.path().join(".sluice.yaml.swp");
    std::fs::write(&temp, with_listen(&reverse(&new.url()))).unwrap();
    std::fs::rename(&temp, &sluice.config_path).unwrap();
    assert!(eventually_routed_to(&sluice, &new, "/renamed").await);
    assert!(sluice.shutdown().await);
}

/// Lays out a ConfigMap version directory and points `..data` at it atomically, as kubelet does.
fn configmap_swap(root: &Path, version: &str, yaml: &str) {
    std::fs::create_dir(root.join(version)).unwrap();
    std::fs::write(root.join(version).join("sluice.yaml"), yaml).unwrap();
    let temp = root.join("..data_tmp");
    std::os::unix::fs::symlink(version, &temp).unwrap();
    std::fs::rename(&temp, root.join("..data")).unwrap();
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_applied() {
    let (first, second, third) = (MockCrm::start().await, MockCrm::start().await, MockCrm::start().await);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("..2026_a")).unwrap();
    std::fs::write(root.join("..2026_a/sluice.yaml"), with_listen(&reverse(&first.url()))).unwrap();
    std::os::unix::fs::symlink("..2026_a", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sluice.yaml", root.join("sluice.yaml")).unwrap();
    let config_path = root.join("sluice.yaml");
    let running = sluice::app::start(&config_path).await.expect("sluice starts on the symlinked file");
    let sluice = TestSluice { running: Some(running), dir, config_path };
    let (status, _) = get(&sluice, "/hubspot/one").await;
    assert_eq!(status, 200);
    assert!(saw(&first, "/one"));

    configmap_swap(&root, "..2026_b", &with_listen(&reverse(&second.url())));
    std::fs::remove_dir_all(root.join("..2026_a")).unwrap(); // kubelet removes the old version
    assert!(eventually_routed_to(&sluice, &second, "/two").await, "the first swap was not applied");

    // The watch survives the swap: a second update is seen too.
    configmap_swap(&root, "..2026_c", &with_listen(&reverse(&third.url())));
    std::fs::remove_dir_all(root.join("..2026_b")).unwrap();
    assert!(eventually_routed_to(&sluice, &third, "/three").await, "the second swap was not applied");
    let (status, _) = get(&sluice, "/hubspot/last").await;
    assert_eq!(status, 200);
    assert!(saw(&third, "/last") && !saw(&first, "/last") && !saw(&second, "/last"));
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn post_reload_applies_the_file_before_answering() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    sluice.write_config(&reverse(&new.url()));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "reloaded");
    let generation = body["generation"].as_u64().expect("the generation is a number");
    assert!(generation >= 2, "{body}");

    // The 200 means the swap is done: the very next request already follows the new file.
    let (status, body) = get(&sluice, "/hubspot/next").await;
    assert_eq!(status, 200, "{body}");
    assert!(saw(&new, "/next") && !saw(&old, "/next"));

    let config = admin_json(&sluice, "/config").await;
    assert!(config["generation"].as_u64().unwrap() >= generation);
    assert_eq!(config["config"]["upstreams"][0]["name"], "hubspot");
    assert_eq!(config["config"]["upstreams"][0]["target"], new.url());
    let readyz = admin_json(&sluice, "/readyz").await;
    assert!(readyz["generation"].as_u64().unwrap() >= generation);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn post_reload_of_an_unchanged_file_still_answers_200() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&mock.url())).await;
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["generation"].as_u64().is_some());
    let (status, _) = get(&sluice, "/hubspot/same").await;
    assert_eq!(status, 200);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn unknown_key_is_refused_and_the_old_config_keeps_serving() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let before = sluice.metrics().await;
    let (failures_before, successes_before) = (reload_count(&before, "failure"), reload_count(&before, "success"));
    let stamp_before = metric_value(&before, "sluice_config_last_reload_success_timestamp_seconds", &[]);

    // Line 6: a key sluice does not know. It must never be silently ignored.
    sluice.write_config(&format!("{}    retry_budget: 3\n", reverse(&new.url())));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "config_invalid");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("retry_budget"), "the detail names the key: {detail}");
    assert!(detail.contains("line 6"), "the detail names the line: {detail}");
    assert_eq!(body["generation"], 1, "nothing was applied: {body}");

    let (status, _) = get(&sluice, "/hubspot/still-old").await;
    assert_eq!(status, 200);
    assert!(saw(&old, "/still-old") && !saw(&new, "/still-old"), "the old config keeps serving");
    let config = admin_json(&sluice, "/config").await;
    assert_eq!(config["config"]["upstreams"][0]["target"], old.url());
    let after = sluice.metrics().await;
    assert!(reload_count(&after, "failure") >= failures_before + 1.0, "{after}");
    assert_eq!(reload_count(&after, "success"), successes_before, "{after}");
    assert_eq!(metric_value(&after, "sluice_config_last_reload_success_timestamp_seconds", &[]), stamp_before);

    // Fixing the file is enough: the next reload applies it.
    sluice.write_config(&reverse(&new.url()));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(&sluice, "/hubspot/fixed").await;
    assert_eq!(status, 200);
    assert!(saw(&new, "/fixed"));
    let fixed = sluice.metrics().await;
    assert!(reload_count(&fixed, "success") > successes_before, "{fixed}");
    assert!(metric_value(&fixed, "sluice_config_last_reload_success_timestamp_seconds", &[]) >= stamp_before);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn semantic_error_is_refused_naming_the_key_and_line() {
    let old = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let failures_before = reload_count(&sluice.metrics().await, "failure");

    sluice.write_config(&reverse("ftp://not-a-target"));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 422, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("upstreams[0].target"), "{detail}");
    assert!(detail.contains("line 5"), "{detail}");
    assert!(detail.contains("ftp://not-a-target"), "{detail}");

    let (status, _) = get(&sluice, "/hubspot/kept").await;
    assert_eq!(status, 200);
    assert!(saw(&old, "/kept"));
    assert!(reload_count(&sluice.metrics().await, "failure") >= failures_before + 1.0);

    // Every problem is reported at once, so an SRE fixes the file in one pass.
    sluice.write_config(
        "upstreams:\n  - name: hubspot\n    prefix: nope\n    target: 'ftp://x'\n  - name: Bad Name\n    prefix: /b\n    target: http://127.0.0.1:1\n",
    );
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 422, "{body}");
    let detail = body["detail"].as_str().unwrap();
    for key in ["upstreams[0].prefix", "upstreams[0].target", "upstreams[1].name"] {
        assert!(detail.contains(key), "{key} missing from: {detail}");
    }
    let (status, _) = get(&sluice, "/hubspot/kept-again").await;
    assert_eq!(status, 200);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn invalid_file_change_is_refused_by_the_watcher_then_a_valid_one_applies() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let failures_before = reload_count(&sluice.metrics().await, "failure");

    sluice.write_config(&format!("{}    retry_budget: 3\n", reverse(&new.url())));
    let refused =
        eventually(WAIT, || async { reload_count(&sluice.metrics().await, "failure") >= failures_before + 1.0 }).await;
    assert!(refused, "the watcher never counted the refused file");
    let (status, _) = get(&sluice, "/hubspot/old").await;
    assert_eq!(status, 200);
    assert!(saw(&old, "/old") && !saw(&new, "/old"));
    assert_eq!(admin_json(&sluice, "/config").await["generation"], 1);

    sluice.write_config(&reverse(&new.url()));
    assert!(eventually_routed_to(&sluice, &new, "/new").await, "the valid file was never applied");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn deleted_config_file_keeps_the_old_config() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    std::fs::remove_file(&sluice.config_path).unwrap();
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("sluice.yaml"), "{body}");
    let (status, _) = get(&sluice, "/hubspot/kept").await;
    assert_eq!(status, 200);
    assert!(saw(&old, "/kept"));

    sluice.write_config(&reverse(&new.url()));
    assert!(eventually_routed_to(&sluice, &new, "/back").await);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn request_in_flight_during_reload_completes_on_the_old_config() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let slow = tokio::spawn(direct_client().get(format!("{}/hubspot/slow/1500", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { saw(&old, "/slow/1500") }).await, "the slow request never arrived");

    sluice.write_config(&reverse(&new.url()));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(&sluice, "/hubspot/after").await;
    assert_eq!(status, 200);
    assert!(saw(&new, "/after"), "new requests use the new config");

    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200);
    let body: Value = slow.json().await.unwrap();
    assert_eq!(body["slept_ms"], 1500);
    assert_eq!(old.requests().iter().filter(|r| r.path == "/slow/1500").count(), 1);
    assert!(!saw(&new, "/slow/1500"), "the in-flight request was not replayed on the new config");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn request_in_flight_survives_its_upstream_being_removed() {
    let (old, other) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let slow = tokio::spawn(direct_client().get(format!("{}/hubspot/slow/1500", sluice.proxy_url())).send());
    assert!(eventually(WAIT, || async { saw(&old, "/slow/1500") }).await);

    sluice.write_config(&format!("upstreams:\n  - {{ name: other, prefix: /other, target: '{}' }}\n", other.url()));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&sluice, "/hubspot/gone").await;
    assert_eq!(status, 404, "the removed prefix is gone for new requests: {body}");

    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200, "the request that started on the old config finishes on it");
    assert_eq!(slow.json::<Value>().await.unwrap()["slept_ms"], 1500);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn changed_listen_addresses_are_not_applied_until_restart() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    let (other_proxy, other_admin) = (support::closed_port(), support::closed_port());
    sluice.write_config(&format!(
        "listen: {{ proxy: 127.0.0.1:{other_proxy}, admin: 127.0.0.1:{other_admin} }}\n{}",
        reverse(&new.url())
    ));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "the rest of the file applies: {body}");
    // The listeners stay where they were bound; the rest of the config is live.
    let (status, _) = get(&sluice, "/hubspot/same-listener").await;
    assert_eq!(status, 200);
    assert!(saw(&new, "/same-listener"));
    let healthz = direct_client().get(sluice.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn config_endpoint_keeps_showing_the_listeners_in_effect() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&mock.url())).await;
    let before = admin_json(&sluice, "/config").await["config"]["listen"].clone();
    let (other_proxy, other_admin) = (support::closed_port(), support::closed_port());
    sluice.write_config(&format!(
        "listen: {{ proxy: 127.0.0.1:{other_proxy}, admin: 127.0.0.1:{other_admin} }}\n{}",
        reverse(&mock.url())
    ));
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    let after = admin_json(&sluice, "/config").await["config"]["listen"].clone();
    assert_eq!(after, before, "GET /config is the effective config, and the listeners did not move");
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn rotated_ca_files_are_picked_up_by_post_reload() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&format!(
        "intercept: {{ ca_cert: $DIR/ca.crt, ca_key: $DIR/ca.key }}\nupstreams:\n  - {{ name: hubspot, hosts: [api.hubapi.com], target: '{}', intercept: true }}\n",
        mock.url()
    ))
    .await;
    let trusting = |pem: &[u8]| {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(sluice.proxy_url()).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap())
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(0)
            .timeout(WAIT)
            .build()
            .unwrap()
    };
    let first_ca = sluice.ca_pem();
    let response = trusting(&first_ca).get("https://api.hubapi.com/one").send().await.unwrap();
    assert_eq!(response.status(), 200);

    // A renewed Secret: a new pair at the same paths, the YAML unchanged.
    std::fs::remove_file(sluice.dir.path().join("ca.crt")).unwrap();
    std::fs::remove_file(sluice.dir.path().join("ca.key")).unwrap();
    let second_ca = support::write_test_ca(sluice.dir.path());
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    let response = trusting(second_ca.as_bytes()).get("https://api.hubapi.com/two").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(saw(&mock, "/two"));
    assert!(
        trusting(&first_ca).get("https://api.hubapi.com/three").send().await.is_err(),
        "leaves are minted by the new CA, not the old one"
    );

    // A broken pair is refused, and the working CA keeps serving.
    std::fs::write(sluice.dir.path().join("ca.crt"), "not a certificate\n").unwrap();
    let (status, body) = post_reload(&sluice).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("intercept.ca_"), "{body}");
    let response = trusting(second_ca.as_bytes()).get("https://api.hubapi.com/four").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn binary_with_a_relative_config_path_sees_file_changes() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sluice.yaml"), with_listen(&reverse(&old.url()))).unwrap();
    // `-c sluice.yaml`: the watched directory is the working directory.
    let mut process = SluiceProcess::spawn(&["run", "-c", "sluice.yaml"], &[("SLUICE_LOG", "info")], dir.path());
    let (proxy, _) = process.addresses(WAIT).await;
    let client = direct_client();
    let response = client.get(format!("http://{proxy}/hubspot/before")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(saw(&old, "/before"));

    std::fs::write(dir.path().join("sluice.yaml"), with_listen(&reverse(&new.url()))).unwrap();
    let reloaded = eventually(WAIT, || async {
        let response = client.get(format!("http://{proxy}/hubspot/after")).send().await;
        response.is_ok_and(|r| r.status() == 200) && saw(&new, "/after")
    })
    .await;
    assert!(reloaded, "the change was not seen; stderr:\n{}", process.stderr_text());
    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(40)).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}; stderr:\n{}", process.stderr_text());
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    // The watched directory holds only a symlink to a file elsewhere, so editing that file in
    // place makes no event there: only the SIGHUP can cause the reload seen below.
    let real = tempfile::tempdir().unwrap();
    let linked = tempfile::tempdir().unwrap();
    let real_path = real.path().join("real.yaml");
    std::fs::write(&real_path, with_listen(&reverse(&old.url()))).unwrap();
    let config_path = linked.path().join("sluice.yaml");
    std::os::unix::fs::symlink(&real_path, &config_path).unwrap();

    let mut process = SluiceProcess::run(&config_path, &[]);
    let (proxy, admin) = process.addresses(WAIT).await;
    let client = direct_client();
    let ready = eventually(WAIT, || async {
        client.get(format!("http://{admin}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "never ready; stderr:\n{}", process.stderr_text());
    let response = client.get(format!("http://{proxy}/hubspot/before")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(saw(&old, "/before"));

    std::fs::write(&real_path, with_listen(&reverse(&new.url()))).unwrap();
    process.signal("HUP");
    let reloaded = eventually(WAIT, || async {
        let response = client.get(format!("http://{proxy}/hubspot/after")).send().await;
        response.is_ok_and(|r| r.status() == 200) && saw(&new, "/after")
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload; stderr:\n{}", process.stderr_text());
    let logged = process.wait_for_line(WAIT, |line| line.contains("Config reloaded") && line.contains("sighup")).await;
    assert!(logged.is_some(), "no reload log line; stderr:\n{}", process.stderr_text());

    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(40)).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}; stderr:\n{}", process.stderr_text());
}

#[tokio::test]
async fn reading_the_config_does_not_retrigger_the_watcher() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use notify::Watcher;
    let (old, new) = (MockCrm::start().await, MockCrm::start().await);
    let sluice = TestSluice::start(&reverse(&old.url())).await;
    sluice.write_config(&reverse(&new.url()));
    assert!(eventually_routed_to(&sluice, &new, "/after").await);

    // Watch the directory as sluice does, and count every time the config file is opened.
    let opens = Arc::new(AtomicUsize::new(0));
    let counter = opens.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let open = matches!(event.kind, notify::EventKind::Access(notify::event::AccessKind::Open(_)));
            if open && event.paths.iter().any(|path| path.ends_with("sluice.yaml")) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    watcher.watch(sluice.dir.path(), notify::RecursiveMode::NonRecursive).unwrap();
    // Once the reload has settled nobody touches the file, so a quiet second must come.
    let quiet = eventually(WAIT, || async {
        let before = opens.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        opens.load(Ordering::SeqCst) == before
    })
    .await;
    assert!(quiet, "sluice keeps re-reading its config file: {} opens", opens.load(Ordering::SeqCst));
    drop(watcher);
    assert!(sluice.shutdown().await);
}

#[tokio::test]
async fn an_invalid_file_is_refused_once_not_in_a_loop() {
    let mock = MockCrm::start().await;
    let sluice = TestSluice::start(&reverse(&mock.url())).await;
    sluice.write_config(&format!("{}    retry_budget: 3\n", reverse(&mock.url())));
    let failures = || async { reload_count(&sluice.metrics().await, "failure") };
    assert!(eventually(WAIT, || async { failures().await >= 1.0 }).await, "the bad file was never refused");
    // Nothing changes on disk any more, so the failure count must settle.
    let settled = eventually(WAIT, || async {
        let before = failures().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        failures().await == before
    })
    .await;
    assert!(settled, "the same bad file keeps being refused: {} failures", failures().await);
    assert!(sluice.shutdown().await);
}
