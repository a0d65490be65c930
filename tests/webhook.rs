//! `sluice inject`: real AdmissionReview v1 bodies (tests/fixtures/admission/) go through the
//! webhook; the JSON patch it returns is applied to the pod with the `json-patch` crate, and the
//! result is checked the way the kubelet would read it: as a typed `Pod`. The last tests start the
//! HTTPS server in-process on 127.0.0.1:0 and talk to it with reqwest, trusting a test CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;
use sluice::webhook::{review, CaBundle, ConfigKind, Settings, SidecarMode};

const PROXY: &str = "http://127.0.0.1:3128";
const BUNDLE: &str = "/etc/sluice/trust/ca-bundle.pem";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission").join(name)).unwrap()
}

/// What the API server would do with the webhook's answer.
struct Admitted {
    /// The answer as sent on the wire.
    response: Value,
    /// The pod after the patch (the original when there was none).
    pod: Pod,
    patched: bool,
}

fn admit(body: &[u8], settings: &Settings) -> Admitted {
    let request: Value = serde_json::from_slice(body).unwrap();
    let (reviewed, _) = review::review(body, settings).unwrap();
    let wire: Value = serde_json::from_slice(&review::encode(&reviewed).unwrap()).unwrap();
    assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(wire["kind"], "AdmissionReview");
    let response = wire["response"].clone();
    assert_eq!(response["uid"], request["request"]["uid"], "the uid must round-trip");
    assert_eq!(response["allowed"], true, "the webhook never refuses a pod");
    let mut pod = request["request"]["object"].clone();
    let patched = match response.get("patch") {
        Some(encoded) => {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes: k8s_openapi::ByteString = serde_json::from_value(encoded.clone()).unwrap();
            let patch: json_patch::Patch = serde_json::from_slice(&bytes.0).unwrap();
            json_patch::patch(&mut pod, &patch).unwrap();
            true
        }
        None => false,
    };
    Admitted { response, pod: serde_json::from_value(pod).unwrap(), patched }
}

fn admit_fixture(name: &str, settings: &Settings) -> Admitted {
    admit(&fixture(name), settings)
}

fn native() -> Settings {
    Settings { kube_api_host: Some("10.96.0.1".into()), ..Settings::default() }
}

fn container_mode() -> Settings {
    Settings { sidecar_mode: SidecarMode::Container, ..native() }
}

fn warnings(admitted: &Admitted) -> Vec<String> {
    serde_json::from_value(admitted.response.get("warnings").cloned().unwrap_or(Value::Array(vec![]))).unwrap()
}

fn all_containers(pod: &Pod) -> Vec<&Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers.iter().flatten().chain(&spec.containers).collect()
}

fn sidecars(pod: &Pod) -> Vec<&Container> {
    all_containers(pod).into_iter().filter(|c| c.name == "sluice").collect()
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container.env.iter().flatten().find(|var| var.name == name).and_then(|var| var.value.as_deref())
}

fn env_count(container: &Container, name: &str) -> usize {
    container.env.iter().flatten().filter(|var| var.name == name).count()
}

fn mounts(container: &Container) -> Vec<(&str, &str)> {
    container.volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m.mount_path.as_str())).collect()
}

fn volume_names(pod: &Pod) -> Vec<&str> {
    pod.spec.as_ref().unwrap().volumes.iter().flatten().map(|v| v.name.as_str()).collect()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Everything an app container must get, whatever else it has.
fn assert_app_wired(container: &Container) {
    for name in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        assert_eq!(env(container, name), Some(PROXY), "{} {name}", container.name);
    }
    let no_proxy = env(container, "NO_PROXY").unwrap();
    for host in ["localhost", "127.0.0.1", ".svc", ".cluster.local", "kubernetes.default.svc", "10.96.0.1"] {
        assert!(no_proxy.split(',').any(|entry| entry == host), "{} NO_PROXY lacks {host}: {no_proxy}", container.name);
    }
    assert_eq!(env(container, "no_proxy"), Some(no_proxy));
    assert_eq!(env(container, "SSL_CERT_FILE"), Some(BUNDLE));
    assert_eq!(env(container, "REQUESTS_CA_BUNDLE"), Some(BUNDLE));
    assert_eq!(env(container, "NODE_EXTRA_CA_CERTS"), Some("/etc/sluice/trust/ca.crt"));
    assert!(mounts(container).contains(&("sluice-trust", "/etc/sluice/trust")), "{}", container.name);
    // The app never sees the CA key.
    assert!(!mounts(container).iter().any(|(name, _)| *name == "sluice-ca"), "{}", container.name);
}

fn assert_sidecar(sidecar: &Container, settings: &Settings) {
    assert_eq!(sidecar.image.as_deref(), Some(settings.image.as_str()));
    assert_eq!(sidecar.args.as_deref().unwrap(), ["run", "--config", "/etc/sluice/config/sluice.yaml"]);
    let readiness = sidecar.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    assert_eq!(readiness.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9901));
    let liveness = sidecar.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(liveness.path.as_deref(), Some("/healthz"));
    assert!(sidecar.startup_probe.is_some());
    let resources = sidecar.resources.as_ref().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "50m");
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "256Mi");
    let pre_stop = sidecar.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 5);
    assert_eq!(
        mounts(sidecar),
        [("sluice-config", "/etc/sluice/config"), ("sluice-ca", "/etc/sluice/ca")],
        "the config is a directory mount (no subPath), so ConfigMap updates reach it"
    );
    let security = sidecar.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(sidecar.ports.as_ref().unwrap()[0].name.as_deref(), Some("sluice-admin"));
}

// === fixtures ===

#[test]
fn one_container_gets_a_native_sidecar_and_every_setting() {
    let settings = native();
    let admitted = admit_fixture("single-container.json", &settings);
    assert!(admitted.patched);
    assert!(warnings(&admitted).is_empty(), "{:?}", warnings(&admitted));
    let pod = &admitted.pod;
    let spec = pod.spec.as_ref().unwrap();

    let init: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(init, ["sluice-ca-bundle", "sluice"]);
    assert_eq!(sidecars(pod).len(), 1);
    let sidecar = sidecars(pod)[0];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_sidecar(sidecar, &settings);

    assert_eq!(spec.containers.len(), 1);
    assert_app_wired(&spec.containers[0]);
    // The app's own mounts and ports are untouched.
    assert!(mounts(&spec.containers[0])
        .iter()
        .any(|(_, path)| *path == "/var/run/secrets/kubernetes.io/serviceaccount"));
    assert_eq!(spec.containers[0].ports.as_ref().unwrap()[0].container_port, 8080);

    let volumes = volume_names(pod);
    for name in ["sluice-config", "sluice-ca", "sluice-ca-cert", "sluice-trust"] {
        assert_eq!(volumes.iter().filter(|v| **v == name).count(), 1, "{name} in {volumes:?}");
    }
    assert!(volumes[0].starts_with("kube-api-access-"), "existing volumes keep their place");
    let config = spec.volumes.iter().flatten().find(|v| v.name == "sluice-config").unwrap();
    assert_eq!(config.config_map.as_ref().unwrap().name, "sluice-config");
    let ca = spec.volumes.iter().flatten().find(|v| v.name == "sluice-ca").unwrap();
    assert_eq!(ca.secret.as_ref().unwrap().secret_name.as_deref(), Some("sluice-ca"));

    let bundle = &spec.init_containers.as_ref().unwrap()[0];
    assert!(bundle.command.as_ref().unwrap()[2].contains("/etc/sluice/trust/ca-bundle.pem"));
    assert!(!mounts(bundle).iter().any(|(name, _)| *name == "sluice-ca"), "the bundle step never sees the key");

    assert!(annotation(pod, "sluice.io/injected").unwrap().starts_with("native"));
    assert_eq!(annotation(pod, "prometheus.io/scrape"), Some("true"));
    assert_eq!(annotation(pod, "prometheus.io/port"), Some("9901"));
    assert_eq!(annotation(pod, "prometheus.io/path"), Some("/metrics"));
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["sluice.io/injected"], "true");
    assert_eq!(labels["app"], "crm-sync");
}

#[test]
fn a_pod_label_opt_in_with_its_own_config_map() {
    let admitted = admit_fixture("pod-label-opt-in.json", &native());
    assert!(admitted.patched);
    let spec = admitted.pod.spec.as_ref().unwrap();
    let config = spec.volumes.iter().flatten().find(|v| v.name == "sluice-config").unwrap();
    assert_eq!(config.config_map.as_ref().unwrap().name, "sluice-hubspot");
    assert_app_wired(&spec.containers[0]);
}

#[test]
fn every_container_of_a_multi_container_pod_is_wired() {
    let admitted = admit_fixture("multi-container.json", &native());
    let pod = &admitted.pod;
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["api", "worker", "log-shipper"]);
    for container in &spec.containers {
        assert_app_wired(container);
        assert_eq!(env_count(container, "HTTPS_PROXY"), 1);
    }
    // Existing variables stay, first and unchanged.
    let api = &spec.containers[0];
    assert_eq!(api.env.as_ref().unwrap()[0].name, "LOG_LEVEL");
    assert!(api.env.as_ref().unwrap()[1].value_from.is_some());
    assert!(mounts(&spec.containers[2]).contains(&("logs", "/var/log/app")));
    assert_eq!(sidecars(pod).len(), 1);
    // The app scrapes its own port: sluice does not take its annotations over.
    assert_eq!(annotation(pod, "prometheus.io/port"), Some("8080"));
    assert!(warnings(&admitted).iter().any(|w| w.contains("prometheus.io")), "{:?}", warnings(&admitted));
}

#[test]
fn app_init_containers_come_after_the_native_sidecar_and_use_it() {
    let admitted = admit_fixture("init-containers.json", &native());
    let spec = admitted.pod.spec.as_ref().unwrap();
    let init = spec.init_containers.as_ref().unwrap();
    assert_eq!(
        init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["sluice-ca-bundle", "sluice", "migrate", "fetch-schema"]
    );
    assert_app_wired(&init[2]);
    assert_app_wired(&init[3]);
    assert!(mounts(&init[3]).contains(&("schema", "/schema")));
    assert_app_wired(&spec.containers[0]);
}

#[test]
fn in_container_mode_the_sidecar_is_a_regular_first_container() {
    let settings = container_mode();
    let admitted = admit_fixture("init-containers.json", &settings);
    let pod = &admitted.pod;
    let spec = pod.spec.as_ref().unwrap();
    // App init containers run before any regular container, so they are left alone.
    let init = spec.init_containers.as_ref().unwrap();
    assert_eq!(
        init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["sluice-ca-bundle", "migrate", "fetch-schema"]
    );
    assert!(env(&init[1], "HTTPS_PROXY").is_none());
    assert_eq!(spec.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["sluice", "billing-sync"]);
    assert!(spec.containers[0].restart_policy.is_none());
    assert_sidecar(&spec.containers[0], &settings);
    assert_app_wired(&spec.containers[1]);
    assert_eq!(annotation(pod, "kubectl.kubernetes.io/default-container"), Some("billing-sync"));
    assert!(annotation(pod, "sluice.io/injected").unwrap().starts_with("container"));
}

#[test]
fn variables_a_container_sets_are_kept_and_reported() {
    let admitted = admit_fixture("existing-env.json", &native());
    let spec = admitted.pod.spec.as_ref().unwrap();
    let etl = &spec.containers[0];
    assert_eq!(env(etl, "HTTPS_PROXY"), Some("http://corp-proxy.internal:3128"));
    // The proxy group is all or nothing: no half-set lower-case pair next to the corporate proxy.
    for name in ["HTTP_PROXY", "https_proxy", "http_proxy", "no_proxy"] {
        assert_eq!(env_count(etl, name), 0, "{name}");
    }
    assert_eq!(env(etl, "NO_PROXY"), Some("localhost,.internal"));
    assert_eq!(env(etl, "SSL_CERT_FILE"), Some("/etc/corp/ca.pem"));
    assert_eq!(env_count(etl, "SSL_CERT_FILE"), 1);
    assert_eq!(env(etl, "REQUESTS_CA_BUNDLE"), Some(BUNDLE));
    assert_eq!(env(etl, "NODE_EXTRA_CA_CERTS"), Some("/etc/sluice/trust/ca.crt"));
    assert!(etl.env.as_ref().unwrap().iter().any(|var| var.name == "DATABASE_URL" && var.value_from.is_some()));
    // The other container sets nothing, so it gets everything.
    assert_app_wired(&spec.containers[1]);

    let warnings = warnings(&admitted);
    assert_eq!(warnings.len(), 4, "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("etl sets HTTPS_PROXY")));
    assert!(warnings.iter().any(|w| w.contains("etl sets NO_PROXY")));
    assert!(warnings.iter().any(|w| w.contains("etl sets SSL_CERT_FILE")));
    assert!(warnings.iter().any(|w| w.contains("envFrom")));
}

#[test]
fn an_injected_pod_is_not_injected_again() {
    let admitted = admit_fixture("already-injected.json", &native());
    assert!(!admitted.patched);
    assert_eq!(sidecars(&admitted.pod).len(), 1);

    // Feeding a freshly injected pod back (reinvocation) changes nothing either.
    for settings in [native(), container_mode()] {
        let first = admit_fixture("single-container.json", &settings);
        let mut body: Value = serde_json::from_slice(&fixture("single-container.json")).unwrap();
        body["request"]["object"] = serde_json::to_value(&first.pod).unwrap();
        let second = admit(&serde_json::to_vec(&body).unwrap(), &settings);
        assert!(!second.patched);
        assert_eq!(sidecars(&second.pod).len(), 1);
    }
}

#[test]
fn an_opted_out_pod_is_allowed_unchanged() {
    let admitted = admit_fixture("opt-out.json", &native());
    assert!(!admitted.patched);
    assert!(sidecars(&admitted.pod).is_empty());
    assert!(annotation(&admitted.pod, "sluice.io/injected").is_none());
}

#[test]
fn secret_bundle_mode_mounts_the_bundle_from_the_ca_secret() {
    let settings = Settings { ca_bundle: CaBundle::Secret, ..native() };
    let admitted = admit_fixture("single-container.json", &settings);
    let spec = admitted.pod.spec.as_ref().unwrap();
    assert_eq!(spec.init_containers.as_ref().unwrap().len(), 1, "no bundle step");
    let trust = spec.volumes.iter().flatten().find(|v| v.name == "sluice-trust").unwrap();
    let secret = trust.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("sluice-ca"));
    let keys: Vec<&str> = secret.items.iter().flatten().map(|item| item.key.as_str()).collect();
    assert_eq!(keys, ["ca.crt", "ca-bundle.pem"], "only public files reach the apps");
    assert_app_wired(&spec.containers[0]);
}

#[test]
fn a_config_kept_in_a_secret_is_mounted_from_it() {
    let settings = Settings { config_kind: ConfigKind::Secret, ..native() };
    let admitted = admit_fixture("pod-label-opt-in.json", &settings);
    let spec = admitted.pod.spec.as_ref().unwrap();
    let config = spec.volumes.iter().flatten().find(|v| v.name == "sluice-config").unwrap();
    assert!(config.config_map.is_none());
    assert_eq!(config.secret.as_ref().unwrap().secret_name.as_deref(), Some("sluice-hubspot"));
}

/// Also writes each injected pod to `$SLUICE_WEBHOOK_DUMP/` when set: `.ci/helm-check` validates
/// them against the Kubernetes schema.
#[test]
fn every_fixture_yields_a_valid_pod() {
    let dump = std::env::var_os("SLUICE_WEBHOOK_DUMP").map(std::path::PathBuf::from);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission");
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    names.sort();
    assert!(names.len() >= 7);
    for name in names {
        for settings in [native(), container_mode()] {
            let admitted = admit_fixture(name.to_str().unwrap(), &settings);
            assert!(sidecars(&admitted.pod).len() <= 1, "{name:?}");
            let containers = all_containers(&admitted.pod);
            let mut seen: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
            seen.sort();
            let before = seen.len();
            seen.dedup();
            assert_eq!(before, seen.len(), "{name:?}: duplicate container names");
            if let Some(dump) = &dump {
                let mode = format!("{:?}", settings.sidecar_mode).to_lowercase();
                let file = dump.join(format!("{}-{mode}.json", name.to_str().unwrap().trim_end_matches(".json")));
                std::fs::create_dir_all(dump).unwrap();
                // The API server names a generateName pod after admission; do the same here.
                let mut pod = admitted.pod.clone();
                if pod.metadata.name.is_none() {
                    pod.metadata.name = pod.metadata.generate_name.as_ref().map(|prefix| format!("{prefix}x7k2q"));
                }
                std::fs::write(file, serde_json::to_vec_pretty(&pod).unwrap()).unwrap();
            }
        }
    }
}

// === the HTTPS server ===

struct TestCert {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn test_cert(cn: &str) -> TestCert {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "sluice-injector.sluice.svc".to_owned()];
    let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    TestCert { ca_pem: ca_cert.pem(), cert_pem: leaf.pem(), key_pem: leaf_key.serialize_pem() }
}

fn write_cert(dir: &Path, cert: &TestCert) {
    // Write then rename, as a Secret update replaces files rather than editing them.
    for (name, text) in [("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn start(dir: &Path) -> sluice::webhook::Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let files = sluice::webhook::TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    sluice::webhook::start(listener, files, native()).unwrap()
}

#[tokio::test]
async fn the_https_server_answers_reviews_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert("webhook test CA");
    write_cert(dir.path(), &cert);
    let running = start(dir.path()).await;
    let base = format!("https://127.0.0.1:{}", running.addr.port());
    let client = client(&cert.ca_pem);

    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.version(), reqwest::Version::HTTP_11);

    let answer = client
        .post(format!("{base}/mutate"))
        .header("content-type", "application/json")
        .body(fixture("multi-container.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/json");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["uid"], "8a9b0c1d-2e3f-4a5b-8c6d-7e8f9a0b1c2d");
    assert!(body["response"]["patch"].is_string(), "base64 on the wire");

    let opted_out = client.post(format!("{base}/mutate")).body(fixture("opt-out.json")).send().await.unwrap();
    let body: Value = opted_out.json().await.unwrap();
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"].get("patch").is_none());

    let garbage = client.post(format!("{base}/mutate")).body("{not json").send().await.unwrap();
    assert_eq!(garbage.status(), 400);
    assert_eq!(client.get(format!("{base}/mutate")).send().await.unwrap().status(), 405);
    assert_eq!(client.get(format!("{base}/nope")).send().await.unwrap().status(), 404);

    // Plain HTTP is not served.
    let plain = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap();
    assert!(plain.get(format!("http://127.0.0.1:{}/healthz", running.addr.port())).send().await.is_err());

    running.shutdown().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = test_cert("first CA");
    write_cert(dir.path(), &old);
    let running = start(dir.path()).await;
    let url = format!("https://127.0.0.1:{}/healthz", running.addr.port());
    assert!(client(&old.ca_pem).get(&url).send().await.is_ok());

    // A broken pair is refused; the old certificate keeps serving.
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(client(&old.ca_pem).get(&url).send().await.is_ok());

    let new = test_cert("second CA");
    write_cert(dir.path(), &new);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // A fresh client each time: a pooled connection would keep the old handshake.
        if client(&new.ca_pem).get(&url).send().await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(client(&old.ca_pem).get(&url).send().await.is_err(), "the old certificate is gone");
    running.shutdown().await;
}

#[tokio::test]
async fn a_missing_certificate_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let files = sluice::webhook::TlsFiles { cert: dir.path().join("tls.crt"), key: dir.path().join("tls.key") };
    let error = sluice::webhook::start(listener, files, native()).err().unwrap();
    assert!(error.to_string().contains("tls.crt"), "{error}");
}
