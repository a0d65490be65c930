//! `sluice inject`: the mutating admission webhook that adds the sluice sidecar to pods.
//!
//! | endpoint | what |
//! |---|---|
//! | `POST /mutate` | an `AdmissionReview` v1 for a pod; the answer carries the JSON patch ([`review`]) |
//! | `GET /healthz` | 200 while the process serves (liveness and readiness) |
//!
//! HTTPS only (the API server requires it), HTTP/1.1, with the certificate and key read from
//! files. The files are watched: when cert-manager or the chart's Secret rotates them, new
//! connections get the new certificate without a restart, and a broken pair is refused with a
//! log line while the old one keeps serving. The policy itself lives in [`inject`], a pure
//! function of the pod and the [`Settings`], which come from the command line:
//!
//! ```text
//! sluice inject --cert /tls/tls.crt --key /tls/tls.key --listen 0.0.0.0:8443 \
//!     --image ghcr.io/sluice-proxy/sluice:0.1.0 --sidecar-mode native \
//!     --config-name sluice-config --ca-secret sluice-ca --ca-bundle init --no-proxy 169.254.169.254
//! ```
//!
//! Every flag also reads an environment variable, `SLUICE_INJECT_<FLAG>` (e.g.
//! `SLUICE_INJECT_SIDECAR_MODE`); `sluice inject --help` lists them with their defaults.
//!
//! A server of its own, beside the proxy: it shares `body`, `respond`'s JSON answers, `tls` and
//! `telemetry`, and the stop signal (`kit::wait_for_stop_signal`); only `main` names it.

pub mod inject;
pub mod review;

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use notify::{RecursiveMode, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{self, ProxyBody};
use crate::respond::json_response;
pub use inject::{CaBundle, ConfigKind, ConsumerSource, Resources, Settings, SidecarMode};

/// The largest review accepted. Pods are capped by etcd at about 1.5 MiB; this leaves room.
const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;
/// A client must finish its TLS handshake and send its request head within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Secret updates swap a symlink in several steps; wait this long for them to settle.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Files are also re-read this often, in case a filesystem event was missed.
const RECHECK: Duration = Duration::from_secs(60);

/// `sluice inject` flags. Defaults match the Helm chart's.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// PEM certificate chain the webhook serves (re-read when it changes).
    #[arg(long, env = "SLUICE_INJECT_CERT")]
    pub cert: PathBuf,
    /// PEM private key of that certificate (re-read when it changes).
    #[arg(long, env = "SLUICE_INJECT_KEY")]
    pub key: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, env = "SLUICE_INJECT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// After SIGTERM, keep answering this long (so the Service stops routing here), then stop.
    #[arg(long, env = "SLUICE_INJECT_SHUTDOWN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// The sidecar's image.
    #[arg(long, env = "SLUICE_INJECT_IMAGE")]
    pub image: String,
    #[arg(long, env = "SLUICE_INJECT_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// `native`: init container with `restartPolicy: Always` (Kubernetes 1.29+); `container`: a
    /// regular container, for older clusters.
    #[arg(long, env = "SLUICE_INJECT_SIDECAR_MODE", value_enum, default_value = "native")]
    pub sidecar_mode: SidecarMode,
    /// Name of the object with sluice's config, in each injected pod's namespace (the pod
    /// annotation `sluice.io/config` overrides it).
    #[arg(long, env = "SLUICE_INJECT_CONFIG_NAME", default_value = "sluice-config")]
    pub config_name: String,
    /// `configmap`, or `secret` for configs that carry credentials.
    #[arg(long, env = "SLUICE_INJECT_CONFIG_KIND", value_enum, default_value = "configmap")]
    pub config_kind: ConfigKind,
    /// Key of the config object holding the YAML.
    #[arg(long, env = "SLUICE_INJECT_CONFIG_KEY", default_value = "sluice.yaml")]
    pub config_key: String,
    /// Secret with the interception CA (`ca.crt`, `ca.key`), in each injected pod's namespace.
    #[arg(long, env = "SLUICE_INJECT_CA_SECRET", default_value = "sluice-ca")]
    pub ca_secret: String,
    /// `init`: an init container builds system roots + CA; `secret`: the CA Secret has `ca-bundle.pem`.
    #[arg(long, env = "SLUICE_INJECT_CA_BUNDLE", value_enum, default_value = "init")]
    pub ca_bundle: CaBundle,
    /// Image of the `init` bundle step (needs `sh`, `cat` and a system CA bundle).
    #[arg(long, env = "SLUICE_INJECT_BUNDLE_IMAGE", default_value = "docker.io/library/alpine:3.20")]
    pub bundle_image: String,
    /// Path of the system CA bundle inside the bundle image.
    #[arg(long, env = "SLUICE_INJECT_SYSTEM_ROOTS", default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub system_roots: String,
    /// The port of sluice's proxy listener on 127.0.0.1 (the ConfigMap's `listen.proxy`).
    #[arg(long, env = "SLUICE_INJECT_PROXY_PORT", default_value_t = 3128)]
    pub proxy_port: u16,
    /// The port of sluice's admin listener (the ConfigMap's `listen.admin`): probes and metrics.
    #[arg(long, env = "SLUICE_INJECT_ADMIN_PORT", default_value_t = 9901)]
    pub admin_port: u16,
    #[arg(long, env = "SLUICE_INJECT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The API server address pods use, kept off the proxy. Kubernetes sets this variable.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub kube_api_host: Option<String>,
    /// Extra `NO_PROXY` entries, comma-separated (hosts, `.suffixes`, CIDRs).
    #[arg(long, env = "SLUICE_INJECT_NO_PROXY", value_delimiter = ',')]
    pub no_proxy: Vec<String>,
    /// Sidecar CPU request ("" for none).
    #[arg(long, env = "SLUICE_INJECT_CPU_REQUEST", default_value = "50m")]
    pub cpu_request: String,
    /// Sidecar memory request ("" for none).
    #[arg(long, env = "SLUICE_INJECT_MEMORY_REQUEST", default_value = "64Mi")]
    pub memory_request: String,
    /// Sidecar CPU limit ("" for none).
    #[arg(long, env = "SLUICE_INJECT_CPU_LIMIT", default_value = "")]
    pub cpu_limit: String,
    /// Sidecar memory limit ("" for none).
    #[arg(long, env = "SLUICE_INJECT_MEMORY_LIMIT", default_value = "256Mi")]
    pub memory_limit: String,
    /// The sidecar's preStop pause in seconds, so the app's last calls find the proxy (0: none).
    /// Uses the `sleep` lifecycle action (Kubernetes 1.30+).
    #[arg(long, env = "SLUICE_INJECT_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u32,
    /// Add `prometheus.io/scrape|port|path` annotations to pods that have none.
    #[arg(long, env = "SLUICE_INJECT_SCRAPE_ANNOTATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub scrape_annotations: bool,
    /// UID of the sidecar (its GID is 0, to read the CA key Kubernetes mounts as root:root 0440).
    #[arg(long, env = "SLUICE_INJECT_RUN_AS_USER", default_value_t = 65532)]
    pub run_as_user: i64,
    /// Where each sidecar's own consumer (`SLUICE_CONSUMER`, what its pod's quota spend is
    /// attributed to when the app names none) comes from: `service-account`, `label:<key>` or `none`.
    #[arg(long, env = "SLUICE_INJECT_CONSUMER_FROM", default_value = "service-account")]
    pub consumer_from: ConsumerSource,
}

impl InjectArgs {
    pub fn settings(&self) -> Settings {
        let quantity = |value: &str| Some(value.trim().to_owned()).filter(|value| !value.is_empty());
        Settings {
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            sidecar_mode: self.sidecar_mode,
            config_name: self.config_name.clone(),
            config_kind: self.config_kind,
            config_key: self.config_key.clone(),
            ca_secret: self.ca_secret.clone(),
            ca_bundle: self.ca_bundle,
            bundle_image: self.bundle_image.clone(),
            system_roots: self.system_roots.clone(),
            proxy_port: self.proxy_port,
            admin_port: self.admin_port,
            cluster_domain: self.cluster_domain.clone(),
            kube_api_host: self.kube_api_host.clone().filter(|host| !host.is_empty()),
            no_proxy: self.no_proxy.clone(),
            resources: Resources {
                cpu_request: quantity(&self.cpu_request),
                memory_request: quantity(&self.memory_request),
                cpu_limit: quantity(&self.cpu_limit),
                memory_limit: quantity(&self.memory_limit),
            },
            drain_seconds: self.drain_seconds,
            scrape_annotations: self.scrape_annotations,
            run_as_user: self.run_as_user,
            consumer_from: self.consumer_from.clone(),
        }
    }
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot load the webhook certificate: {0}")]
    Tls(String),
}

/// `sluice inject`: serve until SIGTERM or SIGINT.
pub fn main(args: InjectArgs) -> ExitCode {
    crate::telemetry::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("sluice-inject")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Cannot start the injector.");
            eprintln!("{error}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: InjectArgs) -> Result<(), WebhookError> {
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| WebhookError::Bind { addr: args.listen, source })?;
    let tls = TlsFiles { cert: args.cert.clone(), key: args.key.clone() };
    let running = start(listener, tls, args.settings())?;
    crate::kit::wait_for_stop_signal().await;
    tracing::info!(delay = %humantime::format_duration(args.shutdown_delay), "Stopping after the shutdown delay.");
    tokio::time::sleep(args.shutdown_delay).await;
    running.shutdown().await;
    Ok(())
}

/// The certificate and key files the webhook serves.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running webhook: its address, and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Starts serving on an already bound listener (port 0 in tests). Fails if the certificate
/// cannot be loaded; later reload failures only log.
pub fn start(listener: TcpListener, tls: TlsFiles, settings: Settings) -> Result<Running, WebhookError> {
    crate::tls::install_crypto_provider();
    let addr = listener.local_addr().map_err(|source| WebhookError::Bind { addr: ([0, 0, 0, 0], 0).into(), source })?;
    let certs = Arc::new(CertStore::load(tls)?);
    let mut server = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(certs.clone());
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(certs.watch(stop.clone()));
    tasks.spawn(serve(listener, acceptor, Arc::new(settings), stop.clone(), tasks.clone()));
    tracing::info!(%addr, "Injector is serving.");
    Ok(Running { addr, stop, tasks })
}

impl Running {
    /// Stops accepting and lets reviews in flight finish (they are short; at most 10 s).
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await.is_err() {
            tracing::warn!("Reviews still in flight at shutdown were cut.");
        }
    }
}

// === serving ===

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    settings: Arc<Settings>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (acceptor, settings, stop) = (acceptor.clone(), settings.clone(), stop.clone());
        tasks.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed.");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out.");
                    return;
                }
            };
            let service = service_fn(move |request| {
                let settings = settings.clone();
                async move { Ok::<_, Infallible>(route(request, &settings).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

async fn route(request: Request<Incoming>, settings: &Settings) -> Response<ProxyBody> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    return json_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &json!({"error": "unreadable_body", "detail": error.to_string()}),
                    )
                }
            };
            mutate(&body, settings)
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (_, "/mutate" | "/healthz") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed", "detail": "POST /mutate, GET /healthz"}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "detail": "endpoints: /mutate /healthz"}),
        ),
    }
}

fn mutate(body: &Bytes, settings: &Settings) -> Response<ProxyBody> {
    match review::review(body, settings) {
        Ok((review, _outcome)) => match review::encode(&review) {
            Ok(json) => {
                let mut response = Response::new(body::full(json));
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                response
            }
            // The API server treats this like an unreachable webhook: failurePolicy decides.
            Err(error) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal_error", "detail": error.to_string()}),
            ),
        },
        Err(error) => {
            tracing::warn!(%error, "Unanswerable review.");
            json_response(StatusCode::BAD_REQUEST, &json!({"error": "bad_review", "detail": error.to_string()}))
        }
    }
}

// === certificate reload ===

/// The serving certificate, swapped whole when its files change.
#[derive(Debug)]
struct CertStore {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// Hash of the files last loaded, so a no-op event or recheck does not log a reload. Only
    /// the watch task writes it.
    loaded: AtomicU64,
}

impl CertStore {
    fn load(files: TlsFiles) -> Result<Self, WebhookError> {
        let (key, hash) = read_pair(&files)?;
        Ok(Self { files, current: ArcSwap::from_pointee(key), loaded: AtomicU64::new(hash) })
    }

    /// Re-reads the files; keeps the current pair when the new one is unreadable or mismatched.
    fn reload(&self) {
        match read_pair(&self.files) {
            Ok((key, hash)) => {
                if self.loaded.swap(hash, Ordering::Relaxed) != hash {
                    self.current.store(Arc::new(key));
                    tracing::info!(cert = %self.files.cert.display(), "Webhook certificate reloaded.");
                }
            }
            Err(error) => {
                tracing::error!(%error, "Webhook certificate reload refused; the previous one keeps serving.")
            }
        }
    }

    /// Watches the directories of both files (a Secret update swaps a symlink there), and
    /// re-reads them every [`RECHECK`] as well, until `stop`.
    async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let (events_tx, mut events) = mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_))) {
                let _ = events_tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "Cannot watch the certificate files; re-reading them every minute.");
                None
            }
        };
        let mut dirs = vec![parent_dir(&self.files.cert), parent_dir(&self.files.key)];
        dirs.dedup();
        for dir in &dirs {
            if let Some(Err(error)) = watcher.as_mut().map(|watcher| watcher.watch(dir, RecursiveMode::NonRecursive)) {
                tracing::warn!(%error, dir = %dir.display(), "Cannot watch a certificate directory.");
            }
        }
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => {
                    if event.is_none() { return }
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                }
                _ = recheck.tick() => {}
                () = stop.cancelled() => return,
            }
            self.reload();
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(files: &TlsFiles) -> Result<(CertifiedKey, u64), WebhookError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| WebhookError::Tls(format!("cannot read {}: {error}", path.display())))
    };
    let (cert_pem, key_pem) = (read(&files.cert)?, read(&files.key)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| WebhookError::Tls(format!("{}: {error}", files.cert.display())))?;
    if chain.is_empty() {
        return Err(WebhookError::Tls(format!("{} holds no PEM certificate", files.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|error| WebhookError::Tls(format!("{}: {error}", files.key.display())))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| WebhookError::Tls(format!("{}: {error}", files.key.display())))?;
    let certified = CertifiedKey::new(chain, signing_key);
    // A key that does not match the certificate would fail every handshake: refuse it here.
    certified.keys_match().map_err(|error| WebhookError::Tls(format!("certificate and key: {error}")))?;
    let mut hasher = DefaultHasher::new();
    (cert_pem, key_pem).hash(&mut hasher);
    Ok((certified, hasher.finish()))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
