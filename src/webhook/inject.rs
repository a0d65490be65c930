//! The injection policy: a pod and the injector's [`Settings`] in, a JSON patch out. Pure: no I/O,
//! no clock, no randomness, so every rule below is a table test away.
//!
//! # Who gets a sidecar
//! The API server only calls the webhook for pods the MutatingWebhookConfiguration selects: a
//! namespace or a pod labelled `sluice.io/inject: enabled`. Here, a pod is still left alone when
//! - its annotation or label `sluice.io/inject` is `disabled` (the opt-out);
//! - it is already injected: annotation `sluice.io/injected`, or a container named `sluice`
//!   (so a second call, e.g. through `reinvocationPolicy: IfNeeded`, changes nothing);
//! - it runs with `hostNetwork: true`, where the sidecar's 127.0.0.1 listeners would be the node's;
//! - its `sluice.io/config` annotation is not a valid object name.
//!
//! # What the patch adds
//! - the `sluice` container: a native sidecar (the first init container, `restartPolicy: Always`)
//!   or a regular container placed first, with the config and CA mounted, probes on the admin port,
//!   resources, a preStop pause so calls still in flight can finish, and a non-root security context;
//!   and `SLUICE_CONSUMER` from the pod's service account (or a label, see [`ConsumerSource`]), so
//!   the pod's quota spend is attributed to it without the app sending `Sluice-Consumer`;
//! - in `init` CA-bundle mode, an init container that writes system roots + sluice's CA into an
//!   `emptyDir`; in `secret` mode the CA Secret carries that bundle as `ca-bundle.pem`;
//! - volumes for the config, the CA (key included, sidecar only), and the trust files apps read;
//! - in every app container (and, with native sidecars, every app init container): the proxy and
//!   CA variables and a read-only mount of the trust files;
//! - the `sluice.io/injected` annotation and label, and Prometheus scrape annotations.
//!
//! # Variables a container already sets
//! A container's own `env` always wins; the injector never overwrites it and returns a warning
//! instead. Variables that only make sense together are handled as a group: if a container sets
//! any of `HTTPS_PROXY`, `HTTP_PROXY`, `https_proxy`, `http_proxy`, none of the four is added (a
//! half-set pair would let clients disagree about the proxy); the same for `NO_PROXY`/`no_proxy`.
//! The CA variables are independent. Values from `envFrom` cannot be seen here; Kubernetes lets
//! `env` override `envFrom`, so a container using `envFrom` gets a warning saying so.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ResourceRequirements,
    SecretVolumeSource, SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

/// Label and annotation: `enabled` opts a pod in (label), `disabled` opts it out.
pub const INJECT_KEY: &str = "sluice.io/inject";
/// Annotation naming the config object (ConfigMap, or Secret with `--config-kind secret`) in the
/// pod's namespace to run the sidecar with.
pub const CONFIG_ANNOTATION: &str = "sluice.io/config";
/// Annotation and label the injector sets; their presence means "already injected".
pub const INJECTED_KEY: &str = "sluice.io/injected";
/// The sidecar's container name; a pod that has it is already injected.
pub const SIDECAR_NAME: &str = "sluice";
/// The init container that builds the CA bundle in `init` mode.
pub const BUNDLE_INIT_NAME: &str = "sluice-ca-bundle";
/// Name of the sidecar's admin port, which the chart's PodMonitor scrapes.
pub const ADMIN_PORT_NAME: &str = "sluice-admin";

/// Volume names; the `sluice-` prefix keeps them apart from the app's.
pub const CONFIG_VOLUME: &str = "sluice-config";
pub const CA_VOLUME: &str = "sluice-ca";
pub const CA_CERT_VOLUME: &str = "sluice-ca-cert";
pub const TRUST_VOLUME: &str = "sluice-trust";

/// Where the sidecar finds its config directory (watched for ConfigMap updates) and its CA.
pub const CONFIG_DIR: &str = "/etc/sluice/config";
pub const CA_DIR: &str = "/etc/sluice/ca";
/// Where app containers find sluice's CA (`ca.crt`) and the bundle of system roots plus it.
pub const TRUST_DIR: &str = "/etc/sluice/trust";
/// Keys of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
pub const CA_BUNDLE_KEY: &str = "ca-bundle.pem";

/// Secret volume modes. The CA directory holds the key: readable by owner and group (root, see
/// `Settings::run_as_user`), never by others. Trust files are public certificates.
const CA_MODE: i32 = 0o440;
const TRUST_MODE: i32 = 0o444;

/// How the sidecar runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): it is up before app
    /// containers start, and stops only after they have exited.
    Native,
    /// A regular container, placed first. For clusters without native sidecars.
    Container,
}

/// Where the bundle of system roots plus sluice's CA (for `SSL_CERT_FILE`) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaBundle {
    /// An init container concatenates its image's system roots and the CA into an `emptyDir`.
    Init,
    /// The CA Secret already holds `ca-bundle.pem`.
    Secret,
}

/// What kind of object holds sluice's config in the pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigKind {
    /// A ConfigMap: what SREs edit to tune quotas.
    #[value(name = "configmap")]
    ConfigMap,
    /// A Secret, for configs that carry credentials (a Redis URL with a password).
    Secret,
}

/// Where the sidecar's own consumer (`SLUICE_CONSUMER`, see `consumer`) comes from: the pod's
/// service account name, one of its labels (read by the downward API), or nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerSource {
    ServiceAccount,
    Label(String),
    None,
}

impl std::str::FromStr for ConsumerSource {
    type Err = String;

    /// `service-account`, `label:<key>` (e.g. `label:app.kubernetes.io/name`) or `none`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "service-account" => Ok(ConsumerSource::ServiceAccount),
            "none" => Ok(ConsumerSource::None),
            other => match other.strip_prefix("label:") {
                Some(key)
                    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)) =>
                {
                    Ok(ConsumerSource::Label(key.to_owned()))
                }
                _ => Err(format!("`{other}`: expected service-account, label:<key> or none")),
            },
        }
    }
}

/// Resource requests and limits of the sidecar, as Kubernetes quantities; `None` leaves one unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// Everything the injector decides with, besides the pod. Built from `sluice inject` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub image: String,
    pub image_pull_policy: String,
    pub sidecar_mode: SidecarMode,
    /// Default config object (in the pod's namespace); `sluice.io/config` overrides it per pod.
    pub config_name: String,
    pub config_kind: ConfigKind,
    /// The key of the config object that holds sluice's YAML.
    pub config_key: String,
    /// Secret (in the pod's namespace) with `ca.crt`, `ca.key` and, in `secret` mode, `ca-bundle.pem`.
    pub ca_secret: String,
    pub ca_bundle: CaBundle,
    /// Image of the `init` bundle step: needs `sh`, `cat` and a system CA bundle.
    pub bundle_image: String,
    /// The system CA bundle inside `bundle_image`.
    pub system_roots: String,
    /// The proxy port sluice listens on at 127.0.0.1 (must match the ConfigMap's `listen.proxy`).
    pub proxy_port: u16,
    /// The admin port (must match `listen.admin`, which must not be loopback so probes reach it).
    pub admin_port: u16,
    pub cluster_domain: String,
    /// The API server's address as pods see it (`KUBERNETES_SERVICE_HOST`), kept off the proxy.
    pub kube_api_host: Option<String>,
    /// Extra `NO_PROXY` entries: short service names, pod/service CIDRs, metadata endpoints.
    pub no_proxy: Vec<String>,
    pub resources: Resources,
    /// preStop pause of the sidecar, so the app's last calls still find the proxy; 0 for none.
    pub drain_seconds: u32,
    /// Add `prometheus.io/scrape|port|path` when the pod has no `prometheus.io/scrape` of its own.
    pub scrape_annotations: bool,
    /// The sidecar's UID. Its GID is 0 so it can read the CA key, which Kubernetes mounts
    /// `root:root` (mode 0440) in pods without `fsGroup`.
    pub run_as_user: i64,
    /// Where the sidecar's `SLUICE_CONSUMER` comes from.
    pub consumer_from: ConsumerSource,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: concat!("sluice:", env!("CARGO_PKG_VERSION")).to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
            sidecar_mode: SidecarMode::Native,
            config_name: "sluice-config".to_owned(),
            config_kind: ConfigKind::ConfigMap,
            config_key: "sluice.yaml".to_owned(),
            ca_secret: "sluice-ca".to_owned(),
            ca_bundle: CaBundle::Init,
            bundle_image: "docker.io/library/alpine:3.20".to_owned(),
            system_roots: "/etc/ssl/certs/ca-certificates.crt".to_owned(),
            proxy_port: 3128,
            admin_port: 9901,
            cluster_domain: "cluster.local".to_owned(),
            kube_api_host: None,
            no_proxy: Vec::new(),
            resources: Resources {
                cpu_request: Some("50m".to_owned()),
                memory_request: Some("64Mi".to_owned()),
                cpu_limit: None,
                memory_limit: Some("256Mi".to_owned()),
            },
            drain_seconds: 5,
            scrape_annotations: true,
            run_as_user: 65532,
            consumer_from: ConsumerSource::ServiceAccount,
        }
    }
}

/// What to do with a pod.
#[derive(Debug)]
pub enum Decision {
    /// Leave the pod as it is.
    Skip(Skip),
    /// Apply `patch`; `warnings` go back to whoever created the pod.
    Inject { patch: Patch, warnings: Vec<String> },
}

/// Why a pod is left alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("opted out by sluice.io/inject: disabled")]
    OptedOut,
    #[error("already injected")]
    AlreadyInjected,
    #[error("hostNetwork pods share the node's loopback; not injected")]
    HostNetwork,
    #[error("sluice.io/config {0:?} is not a valid object name; not injected")]
    InvalidConfigName(String),
}

/// The patch could not be built (a Kubernetes type that does not serialise: a bug).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the injection patch: {0}")]
pub struct InjectError(#[from] serde_json::Error);

/// Decides whether and how to inject `pod`.
pub fn inject(pod: &Pod, settings: &Settings) -> Result<Decision, InjectError> {
    let annotations = pod.metadata.annotations.as_ref();
    let labels = pod.metadata.labels.as_ref();
    let says_disabled = |map: Option<&BTreeMap<String, String>>| {
        map.and_then(|map| map.get(INJECT_KEY)).is_some_and(|value| matches!(value.as_str(), "disabled" | "false"))
    };
    if says_disabled(annotations) || says_disabled(labels) {
        return Ok(Decision::Skip(Skip::OptedOut));
    }
    let spec = pod.spec.as_ref();
    let init_containers = spec.and_then(|spec| spec.init_containers.as_deref()).unwrap_or_default();
    let containers = spec.map(|spec| spec.containers.as_slice()).unwrap_or_default();
    let has_sidecar = containers.iter().chain(init_containers).any(|container| container.name == SIDECAR_NAME);
    if has_sidecar || annotations.is_some_and(|map| map.contains_key(INJECTED_KEY)) {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }
    if spec.and_then(|spec| spec.host_network).unwrap_or(false) {
        return Ok(Decision::Skip(Skip::HostNetwork));
    }
    let config_name = match annotations.and_then(|map| map.get(CONFIG_ANNOTATION)) {
        Some(name) if !is_dns_subdomain(name) => return Ok(Decision::Skip(Skip::InvalidConfigName(name.clone()))),
        Some(name) => name.clone(),
        None => settings.config_name.clone(),
    };

    let mut builder = PatchBuilder::default();
    let mut warnings = Vec::new();
    let env = app_env(settings);

    // App containers first, at their current indices: the sidecar insertions below shift them.
    for (index, container) in containers.iter().enumerate() {
        add_app_settings(&mut builder, &mut warnings, "containers", index, container, &env)?;
    }
    if settings.sidecar_mode == SidecarMode::Native {
        // With a native sidecar the proxy is up before app init containers run, so they use it too.
        for (index, container) in init_containers.iter().enumerate() {
            add_app_settings(&mut builder, &mut warnings, "initContainers", index, container, &env)?;
        }
    }

    let sidecar = to_value(&sidecar_container(settings))?;
    let bundle_init = match settings.ca_bundle {
        CaBundle::Init => Some(to_value(&bundle_init_container(settings))?),
        CaBundle::Secret => None,
    };
    // Final init container order: the bundle step, the native sidecar, then the app's own.
    let mut new_init: Vec<Value> = bundle_init.into_iter().collect();
    match settings.sidecar_mode {
        SidecarMode::Native => new_init.push(sidecar),
        SidecarMode::Container => builder.insert_first(&["spec", "containers"], containers.is_empty(), sidecar),
    }
    for value in new_init.into_iter().rev() {
        builder.insert_first(&["spec", "initContainers"], init_containers.is_empty(), value);
    }

    let has_volumes = spec.and_then(|spec| spec.volumes.as_ref()).is_some();
    for volume in volumes(settings, &config_name) {
        builder.append(&["spec", "volumes"], !has_volumes, to_value(&volume)?);
    }

    let mut new_annotations = vec![(INJECTED_KEY.to_owned(), injected_value(settings))];
    let has_own_scrape = annotations.is_some_and(|map| map.contains_key("prometheus.io/scrape"));
    if settings.scrape_annotations && !has_own_scrape {
        new_annotations.push(("prometheus.io/scrape".to_owned(), "true".to_owned()));
        new_annotations.push(("prometheus.io/port".to_owned(), settings.admin_port.to_string()));
        new_annotations.push(("prometheus.io/path".to_owned(), "/metrics".to_owned()));
    } else if settings.scrape_annotations {
        warnings
            .push("sluice: the pod has its own prometheus.io annotations; scrape sluice with the PodMonitor".into());
    }
    let default_container_key = "kubectl.kubernetes.io/default-container";
    if settings.sidecar_mode == SidecarMode::Container
        && !annotations.is_some_and(|m| m.contains_key(default_container_key))
    {
        // The sidecar goes first; keep `kubectl logs/exec` pointing at the app.
        if let Some(first) = containers.first() {
            new_annotations.push((default_container_key.to_owned(), first.name.clone()));
        }
    }
    builder.set_keys(&["metadata", "annotations"], annotations.is_some(), new_annotations);
    builder.set_keys(&["metadata", "labels"], labels.is_some(), vec![(INJECTED_KEY.to_owned(), "true".to_owned())]);

    Ok(Decision::Inject { patch: builder.finish(), warnings })
}

// === the sidecar ===

fn sidecar_container(settings: &Settings) -> Container {
    let admin = IntOrString::Int(i32::from(settings.admin_port));
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: admin.clone(),
        scheme: Some("HTTP".to_owned()),
        ..HTTPGetAction::default()
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(http_get(path)),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let lifecycle = (settings.drain_seconds > 0).then(|| Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction { seconds: i64::from(settings.drain_seconds) }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    });
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        args: Some(vec!["run".to_owned(), "--config".to_owned(), format!("{CONFIG_DIR}/{}", settings.config_key)]),
        env: Some(sidecar_env(settings)),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_owned()),
            container_port: i32::from(settings.admin_port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        restart_policy: (settings.sidecar_mode == SidecarMode::Native).then(|| "Always".to_owned()),
        // Up to a minute to load the config and bind; with a native sidecar the app starts after this.
        startup_probe: Some(probe("/readyz", 1, 60)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: Some(resources(&settings.resources)),
        lifecycle,
        security_context: Some(security_context(settings.run_as_user)),
        volume_mounts: Some(vec![mount(CONFIG_VOLUME, CONFIG_DIR), mount(CA_VOLUME, CA_DIR)]),
        ..Container::default()
    }
}

/// The sidecar's variables: JSON logs, and its own consumer from the pod (the downward API).
fn sidecar_env(settings: &Settings) -> Vec<EnvVar> {
    let mut env = vec![env_var("SLUICE_LOG_FORMAT", "json")];
    let field = match &settings.consumer_from {
        ConsumerSource::ServiceAccount => Some("spec.serviceAccountName".to_owned()),
        ConsumerSource::Label(key) => Some(format!("metadata.labels['{key}']")),
        ConsumerSource::None => None,
    };
    if let Some(field_path) = field {
        env.push(EnvVar {
            name: "SLUICE_CONSUMER".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path, api_version: None }),
                ..EnvVarSource::default()
            }),
        });
    }
    env
}

/// `init` mode: system roots + sluice's CA into the shared `emptyDir`, and the CA beside it.
fn bundle_init_container(settings: &Settings) -> Container {
    let script = format!(
        "set -e; cat \"$SYSTEM_ROOTS\" {CA_DIR}/{CA_CERT_KEY} > {TRUST_DIR}/{CA_BUNDLE_KEY}; \
         cp {CA_DIR}/{CA_CERT_KEY} {TRUST_DIR}/{CA_CERT_KEY}"
    );
    Container {
        name: BUNDLE_INIT_NAME.to_owned(),
        image: Some(settings.bundle_image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), script]),
        env: Some(vec![env_var("SYSTEM_ROOTS", &settings.system_roots)]),
        resources: Some(resources(&Resources {
            cpu_request: Some("10m".to_owned()),
            memory_request: Some("16Mi".to_owned()),
            cpu_limit: None,
            memory_limit: Some("64Mi".to_owned()),
        })),
        security_context: Some(security_context(settings.run_as_user)),
        // Only the certificate is mounted here, never the key.
        volume_mounts: Some(vec![
            mount(CA_CERT_VOLUME, CA_DIR),
            VolumeMount { read_only: None, ..mount(TRUST_VOLUME, TRUST_DIR) },
        ]),
        ..Container::default()
    }
}

fn security_context(uid: i64) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(0),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Capabilities::default() }),
        ..SecurityContext::default()
    }
}

fn resources(wanted: &Resources) -> ResourceRequirements {
    let pairs = |cpu: &Option<String>, memory: &Option<String>| {
        let map: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(name, value)| value.as_ref().map(|value| (name.to_owned(), Quantity(value.clone()))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    ResourceRequirements {
        requests: pairs(&wanted.cpu_request, &wanted.memory_request),
        limits: pairs(&wanted.cpu_limit, &wanted.memory_limit),
        ..ResourceRequirements::default()
    }
}

fn volumes(settings: &Settings, config_name: &str) -> Vec<Volume> {
    let secret = |items: Option<Vec<KeyToPath>>, mode: i32| SecretVolumeSource {
        secret_name: Some(settings.ca_secret.clone()),
        items,
        default_mode: Some(mode),
        ..SecretVolumeSource::default()
    };
    let item = |key: &str| KeyToPath { key: key.to_owned(), path: key.to_owned(), mode: None };
    let mut volumes = vec![
        // A whole-directory mount (no subPath): the `..data` swap of an update reaches sluice.
        match settings.config_kind {
            ConfigKind::ConfigMap => Volume {
                name: CONFIG_VOLUME.to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_name.to_owned(),
                    default_mode: Some(TRUST_MODE),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            ConfigKind::Secret => Volume {
                name: CONFIG_VOLUME.to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(config_name.to_owned()),
                    default_mode: Some(CA_MODE),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
        },
        Volume { name: CA_VOLUME.to_owned(), secret: Some(secret(None, CA_MODE)), ..Volume::default() },
    ];
    match settings.ca_bundle {
        CaBundle::Init => {
            volumes.push(Volume {
                name: CA_CERT_VOLUME.to_owned(),
                secret: Some(secret(Some(vec![item(CA_CERT_KEY)]), TRUST_MODE)),
                ..Volume::default()
            });
            volumes.push(Volume {
                name: TRUST_VOLUME.to_owned(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("4Mi".to_owned())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
        CaBundle::Secret => volumes.push(Volume {
            name: TRUST_VOLUME.to_owned(),
            secret: Some(secret(Some(vec![item(CA_CERT_KEY), item(CA_BUNDLE_KEY)]), TRUST_MODE)),
            ..Volume::default()
        }),
    }
    volumes
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.to_owned()), value_from: None }
}

/// `sluice.io/injected`: what the pod got, for `kubectl describe` and support questions.
fn injected_value(settings: &Settings) -> String {
    let mode = match settings.sidecar_mode {
        SidecarMode::Native => "native",
        SidecarMode::Container => "container",
    };
    format!("{mode}; sluice {}", env!("CARGO_PKG_VERSION"))
}

// === app containers ===

/// Variables for app containers, in groups that are added all together or not at all.
fn app_env(settings: &Settings) -> Vec<Vec<EnvVar>> {
    let proxy = format!("http://127.0.0.1:{}", settings.proxy_port);
    let no_proxy = no_proxy(settings).join(",");
    let bundle = format!("{TRUST_DIR}/{CA_BUNDLE_KEY}");
    let ca = format!("{TRUST_DIR}/{CA_CERT_KEY}");
    vec![
        ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"].map(|name| env_var(name, &proxy)).to_vec(),
        ["NO_PROXY", "no_proxy"].map(|name| env_var(name, &no_proxy)).to_vec(),
        // These replace the default roots, hence the bundle with the system roots in it.
        vec![env_var("SSL_CERT_FILE", &bundle)],
        vec![env_var("REQUESTS_CA_BUNDLE", &bundle)],
        vec![env_var("CURL_CA_BUNDLE", &bundle)],
        // Node adds these to its built-in roots: sluice's CA alone is enough.
        vec![env_var("NODE_EXTRA_CA_CERTS", &ca)],
    ]
}

/// Loopback, the cluster's own names, the API server, then the configured extras.
pub fn no_proxy(settings: &Settings) -> Vec<String> {
    let domain = settings.cluster_domain.trim_matches('.');
    let mut hosts: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        ".svc".into(),
        format!(".svc.{domain}"),
        format!(".{domain}"),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
    ];
    hosts.extend(settings.kube_api_host.iter().cloned());
    hosts.extend(settings.no_proxy.iter().map(|host| host.trim().to_owned()).filter(|host| !host.is_empty()));
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|host| seen.insert(host.clone()));
    hosts
}

fn add_app_settings(
    builder: &mut PatchBuilder,
    warnings: &mut Vec<String>,
    list: &str,
    index: usize,
    container: &Container,
    env: &[Vec<EnvVar>],
) -> Result<(), InjectError> {
    let index = index.to_string();
    let own: Vec<&str> = container.env.iter().flatten().map(|var| var.name.as_str()).collect();
    let mut added = Vec::new();
    for group in env {
        let kept: Vec<&str> = group.iter().map(|var| var.name.as_str()).filter(|name| own.contains(name)).collect();
        if kept.is_empty() {
            added.extend(group.iter().cloned());
        } else {
            let group_names: Vec<&str> = group.iter().map(|var| var.name.as_str()).collect();
            warnings.push(format!(
                "sluice: container {} sets {}; kept, so sluice did not set {}",
                container.name,
                kept.join(","),
                group_names.join(",")
            ));
        }
    }
    if container.env_from.as_ref().is_some_and(|from| !from.is_empty()) {
        warnings.push(format!("sluice: container {} uses envFrom; sluice's proxy/CA env overrides it", container.name));
    }
    let has_env = container.env.is_some();
    for var in added {
        builder.append(&["spec", list, &index, "env"], !has_env, to_value(&var)?);
    }
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    if mounts.iter().any(|mount| mount.mount_path.trim_end_matches('/') == TRUST_DIR) {
        warnings.push(format!("sluice: container {} already mounts {TRUST_DIR}; left as is", container.name));
    } else {
        let value = to_value(&mount(TRUST_VOLUME, TRUST_DIR))?;
        builder.append(&["spec", list, &index, "volumeMounts"], container.volume_mounts.is_none(), value);
    }
    Ok(())
}

// === patch building ===

/// Collects `add` operations, creating a missing list or map once with the first value.
#[derive(Default)]
struct PatchBuilder {
    operations: Vec<PatchOperation>,
    /// Lists and maps this patch already created, so later values are appended instead.
    created: std::collections::HashSet<Vec<String>>,
}

impl PatchBuilder {
    /// Appends `value` to the list at `path`; `missing` says the list does not exist in the pod.
    fn append(&mut self, path: &[&str], missing: bool, value: Value) {
        self.add_to_list(path, missing, "-", value);
    }

    /// Inserts `value` at the front of the list at `path`.
    fn insert_first(&mut self, path: &[&str], missing: bool, value: Value) {
        self.add_to_list(path, missing, "0", value);
    }

    fn add_to_list(&mut self, path: &[&str], missing: bool, position: &str, value: Value) {
        let key: Vec<String> = path.iter().map(|token| (*token).to_owned()).collect();
        if missing && self.created.insert(key) {
            self.add(path.iter().copied(), Value::Array(vec![value]));
        } else {
            self.add(path.iter().copied().chain([position]), value);
        }
    }

    /// Sets keys of the map at `path` (annotations, labels), creating it when `exists` is false.
    fn set_keys(&mut self, path: &[&str], exists: bool, entries: Vec<(String, String)>) {
        if !exists {
            let map = entries.into_iter().map(|(key, value)| (key, Value::String(value))).collect();
            self.add(path.iter().copied(), Value::Object(map));
            return;
        }
        for (key, value) in entries {
            self.add(path.iter().copied().chain([key.as_str()]), Value::String(value));
        }
    }

    fn add<'a>(&mut self, tokens: impl IntoIterator<Item = &'a str>, value: Value) {
        // `from_tokens` escapes `/` and `~`, as in `sluice.io~1injected`.
        let path = PointerBuf::from_tokens(tokens);
        self.operations.push(PatchOperation::Add(AddOperation { path, value }));
    }

    fn finish(self) -> Patch {
        Patch(self.operations)
    }
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, InjectError> {
    Ok(serde_json::to_value(value)?)
}

/// RFC 1123 subdomain, the rule for ConfigMap and Secret names.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn app_pod() -> Value {
        serde_json::json!({
            "metadata": {"name": "app", "namespace": "crm"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        })
    }

    fn patched(pod_json: Value, settings: &Settings) -> (Value, Vec<String>) {
        let Decision::Inject { patch, warnings } = inject(&pod(pod_json.clone()), settings).unwrap() else {
            panic!("expected a patch");
        };
        let mut doc = pod_json;
        json_patch::patch(&mut doc, &patch).unwrap();
        (doc, warnings)
    }

    fn skip(pod_json: Value) -> Skip {
        match inject(&pod(pod_json), &Settings::default()).unwrap() {
            Decision::Skip(reason) => reason,
            Decision::Inject { .. } => panic!("expected a skip"),
        }
    }

    #[test]
    fn opt_out_already_injected_and_host_network_are_skipped() {
        let cases = [
            (serde_json::json!({"metadata": {"annotations": {INJECT_KEY: "disabled"}}}), Skip::OptedOut),
            (serde_json::json!({"metadata": {"labels": {INJECT_KEY: "disabled"}}}), Skip::OptedOut),
            (serde_json::json!({"metadata": {"annotations": {INJECTED_KEY: "native"}}}), Skip::AlreadyInjected),
            (serde_json::json!({"spec": {"initContainers": [{"name": "sluice"}]}}), Skip::AlreadyInjected),
            (serde_json::json!({"spec": {"containers": [{"name": "sluice"}]}}), Skip::AlreadyInjected),
            (serde_json::json!({"spec": {"hostNetwork": true}}), Skip::HostNetwork),
            (
                serde_json::json!({"metadata": {"annotations": {CONFIG_ANNOTATION: "Bad_Name"}}}),
                Skip::InvalidConfigName("Bad_Name".into()),
            ),
        ];
        for (overlay, expected) in cases {
            let mut value = app_pod();
            merge(&mut value, overlay);
            assert_eq!(skip(value), expected);
        }
    }

    #[test]
    fn a_pod_without_env_mounts_annotations_or_labels_gets_them_created() {
        let (pod, warnings) = patched(app_pod(), &Settings::default());
        assert!(warnings.is_empty(), "{warnings:?}");
        let init = pod["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(), [BUNDLE_INIT_NAME, "sluice"]);
        assert_eq!(init[1]["restartPolicy"], "Always");
        let app = &pod["spec"]["containers"][0];
        assert_eq!(app["env"].as_array().unwrap().len(), 10);
        assert_eq!(app["volumeMounts"][0]["mountPath"], TRUST_DIR);
        assert_eq!(pod["metadata"]["labels"][INJECTED_KEY], "true");
        assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9901");
    }

    #[test]
    fn the_sidecar_names_its_consumer_from_the_pod() {
        let sidecar_env = |settings: &Settings| {
            let (pod, _) = patched(app_pod(), settings);
            pod["spec"]["initContainers"][1]["env"].clone()
        };
        let env = sidecar_env(&Settings::default());
        assert_eq!(env[1]["name"], "SLUICE_CONSUMER");
        assert_eq!(env[1]["valueFrom"]["fieldRef"]["fieldPath"], "spec.serviceAccountName");
        let by_label =
            Settings { consumer_from: "label:app.kubernetes.io/name".parse().unwrap(), ..Settings::default() };
        assert_eq!(
            sidecar_env(&by_label)[1]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.labels['app.kubernetes.io/name']"
        );
        let none = Settings { consumer_from: ConsumerSource::None, ..Settings::default() };
        assert_eq!(sidecar_env(&none).as_array().unwrap().len(), 1);
        assert!("label:".parse::<ConsumerSource>().is_err());
        assert!("label:a'b".parse::<ConsumerSource>().is_err(), "no quote can break out of the field path");
    }

    #[test]
    fn container_mode_puts_the_sidecar_first_and_keeps_kubectl_on_the_app() {
        let settings = Settings { sidecar_mode: SidecarMode::Container, ..Settings::default() };
        let (pod, _) = patched(app_pod(), &settings);
        assert_eq!(pod["spec"]["containers"][0]["name"], "sluice");
        assert!(pod["spec"]["containers"][0].get("restartPolicy").is_none());
        assert_eq!(pod["spec"]["containers"][1]["name"], "app");
        assert!(pod["spec"]["containers"][1]["env"].is_array());
        assert_eq!(pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], "app");
    }

    #[test]
    fn a_set_proxy_variable_keeps_its_whole_group_out() {
        let mut value = app_pod();
        value["spec"]["containers"][0]["env"] =
            serde_json::json!([{"name": "https_proxy", "value": "http://corp:8080"}]);
        let (pod, warnings) = patched(value, &Settings::default());
        let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
        let names: Vec<&str> = env.iter().map(|var| var["name"].as_str().unwrap()).collect();
        assert_eq!(env[0]["value"], "http://corp:8080");
        assert!(!names.contains(&"HTTPS_PROXY") && !names.contains(&"HTTP_PROXY"));
        assert!(names.contains(&"NO_PROXY") && names.contains(&"SSL_CERT_FILE"));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("https_proxy"), "{warnings:?}");
    }

    #[test]
    fn no_proxy_covers_the_cluster_the_api_server_and_extras_once() {
        let settings = Settings {
            kube_api_host: Some("10.96.0.1".into()),
            no_proxy: vec!["redis".into(), " ".into(), "localhost".into(), "10.0.0.0/8".into()],
            cluster_domain: "corp.local.".into(),
            ..Settings::default()
        };
        assert_eq!(
            no_proxy(&settings),
            [
                "localhost",
                "127.0.0.1",
                "::1",
                ".svc",
                ".svc.corp.local",
                ".corp.local",
                "kubernetes.default",
                "kubernetes.default.svc",
                "10.96.0.1",
                "redis",
                "10.0.0.0/8"
            ]
        );
    }

    #[test]
    fn secret_bundle_mode_has_no_init_step() {
        let settings = Settings { ca_bundle: CaBundle::Secret, ..Settings::default() };
        let (pod, _) = patched(app_pod(), &settings);
        assert_eq!(pod["spec"]["initContainers"].as_array().unwrap().len(), 1);
        let trust = pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == TRUST_VOLUME).unwrap();
        assert_eq!(trust["secret"]["items"][1]["key"], CA_BUNDLE_KEY);
    }

    #[test]
    fn configmap_names_follow_rfc_1123() {
        for good in ["sluice", "sluice-hubspot", "a.b-c", "0abc"] {
            assert!(is_dns_subdomain(good), "{good}");
        }
        for bad in ["", "Sluice", "-a", "a-", "a..b", "a_b", &"a".repeat(254)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }

    fn merge(base: &mut Value, overlay: Value) {
        match (base, overlay) {
            (Value::Object(base), Value::Object(overlay)) => {
                for (key, value) in overlay {
                    merge(base.entry(key).or_insert(Value::Null), value);
                }
            }
            (base, overlay) => *base = overlay,
        }
    }
}
