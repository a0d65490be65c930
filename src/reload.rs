//! Live reload: SIGHUP, `POST /reload` and file changes all end in [`Reloader::reload`], which
//! validates the new file whole, builds a new generation and swaps it in atomically. Requests in
//! flight keep the generation they started on; a bad file is refused, logged and counted, and the
//! old config keeps serving.
//!
//! The watcher watches the config file's directory, not the file: a Kubernetes ConfigMap update
//! swaps the `..data` symlink, which replaces the file without ever writing to it.
//!
//! It stands above `config` and `state` (it builds a `Generation` and publishes it into
//! `Shared`), and below `admin` (`POST /reload`) and `app` (the watchers).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, Mutex};

use crate::config::{Config, ConfigError};
use crate::state::{Generation, Shared};

/// Editors and ConfigMap swaps write in several steps; wait this long for them to settle.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What asked for a reload, for logs and for skipping no-op file events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Admin,
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::Admin => "admin",
            Trigger::FileChange => "file_change",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied {
        generation: u64,
    },
    /// A file event, but the content is what is already running.
    Unchanged {
        generation: u64,
    },
}

pub struct Reloader {
    path: PathBuf,
    shared: Arc<Shared>,
    /// Serialises reloads and remembers the hash of the text last applied.
    last_applied: Mutex<u64>,
}

impl Reloader {
    pub fn new(path: PathBuf, shared: Arc<Shared>, initial_text: &str) -> Arc<Self> {
        Arc::new(Self { path, shared, last_applied: Mutex::new(hash(initial_text)) })
    }

    pub async fn reload(&self, trigger: Trigger) -> Result<Outcome, ConfigError> {
        let mut last_applied = self.last_applied.lock().await;
        let result = self.try_reload(trigger, &mut last_applied).await;
        let metrics = &self.shared.metrics;
        match &result {
            Ok(Outcome::Applied { generation }) => {
                metrics.reloads.with_label_values(&["success"]).inc();
                metrics.reload_last_success.set(unix_now());
                tracing::info!(trigger = trigger.as_str(), generation, "Config reloaded.");
            }
            Ok(Outcome::Unchanged { .. }) => {}
            Err(error) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                tracing::error!(
                    trigger = trigger.as_str(),
                    error = %error,
                    "Config reload refused; the previous config keeps serving."
                );
            }
        }
        result
    }

    async fn try_reload(&self, trigger: Trigger, last_applied: &mut u64) -> Result<Outcome, ConfigError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| ConfigError::Read { path: self.path.clone(), source })?;
        let current = self.shared.current();
        let text_hash = hash(&text);
        if trigger == Trigger::FileChange && text_hash == *last_applied {
            return Ok(Outcome::Unchanged { generation: current.id });
        }
        let mut config = Config::from_yaml(&text).map_err(|error| match error {
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid { path: Some(self.path.clone()), problems },
            other => other,
        })?;
        keep_process_settings(&current.config, &mut config);
        let generation = Generation::build(config, Some(&current)).map_err(|error| error.located(&self.path, &text))?;
        audit_diff(&current.config, &generation.config, trigger);
        let id = generation.id;
        self.shared.breakers.retain(&generation.config.live.upstreams, &self.shared.metrics);
        self.shared.publish(generation);
        *last_applied = text_hash;
        Ok(Outcome::Applied { generation: id })
    }

    /// Reloads on SIGHUP and on changes in the config file's directory, until shutdown.
    pub fn spawn_watchers(self: &Arc<Self>) {
        let reloader = self.clone();
        // Registered before sluice reports ready, so an early SIGHUP reloads instead of killing.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        tokio::spawn(async move {
            let Ok(mut hangups) = hangups else {
                tracing::warn!("Cannot listen for SIGHUP; reload by file change or POST /reload.");
                return;
            };
            loop {
                tokio::select! {
                    received = hangups.recv() => if received.is_none() { return },
                    () = reloader.shared.shutdown.cancelled() => return,
                }
                let _ = reloader.reload(Trigger::Signal).await;
            }
        });

        let reloader = self.clone();
        let (events_tx, mut events) = mpsc::channel::<()>(1);
        let watched_dir = watch_dir(&self.path);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading the file (ours included) is an access event: only changes count, or every
            // reload would trigger the next one.
            let changed = event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_)));
            if changed {
                // A full channel already holds a pending reload: coalesce.
                let _ = events_tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "Cannot watch the config directory; reload by SIGHUP or POST /reload.");
                return;
            }
        };
        if let Err(error) = watcher.watch(&watched_dir, RecursiveMode::NonRecursive) {
            tracing::warn!(%error, dir = %watched_dir.display(), "Cannot watch the config directory.");
            return;
        }
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                tokio::select! {
                    event = events.recv() => if event.is_none() { return },
                    () = reloader.shared.shutdown.cancelled() => return,
                }
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
                let _ = reloader.reload(Trigger::FileChange).await;
            }
        });
    }
}

fn watch_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

fn unix_now() -> f64 {
    crate::kit::unix_seconds_f64(SystemTime::now())
}

/// Process settings (listeners, store, runtime, connection caps) are fixed at start: a reload
/// keeps them as they run, so `GET /config` shows what is in effect, and says so instead of
/// ignoring the file (the warning repeats on every reload until the process is restarted).
fn keep_process_settings(running: &Config, new: &mut Config) {
    if new.process != running.process {
        let keys = new.process.changed_keys(&running.process);
        tracing::warn!(?keys, "Process settings changed; they take effect only after a restart.");
        new.process = running.process.clone();
    }
}

/// One structured audit line: which upstreams a reload added, removed or changed.
fn audit_diff(old: &Config, new: &Config, trigger: Trigger) {
    let names = |config: &Config| config.live.upstreams.iter().map(|u| u.name.to_string()).collect::<Vec<_>>();
    let (old_names, new_names) = (names(old), names(new));
    let added: Vec<_> = new_names.iter().filter(|name| !old_names.contains(name)).cloned().collect();
    let removed: Vec<_> = old_names.iter().filter(|name| !new_names.contains(name)).cloned().collect();
    let changed: Vec<_> = new
        .live
        .upstreams
        .iter()
        .filter(|upstream| old.upstream(&upstream.name).is_some_and(|before| before != *upstream))
        .map(|upstream| upstream.name.to_string())
        .collect();
    let quotas_changed = quota_changes(old, new);
    tracing::info!(
        target: "sluice::audit",
        event = "config_reload",
        trigger = trigger.as_str(),
        upstreams_added = ?added,
        upstreams_removed = ?removed,
        upstreams_changed = ?changed,
        quotas_changed = ?quotas_changed,
        "Config change applied."
    );
}

/// `hubspot/burst: 190/10s -> 150/10s`, `hubspot/daily: added`, ... for the audit line.
fn quota_changes(old: &Config, new: &Config) -> Vec<String> {
    let describe = |quota: &crate::config::Quota| format!("{}/{}", quota.limit, humantime::format_duration(quota.per));
    let mut changes = Vec::new();
    for upstream in &new.live.upstreams {
        let before = old.upstream(&upstream.name).map(|u| u.limits.quotas.as_slice()).unwrap_or(&[]);
        for quota in &upstream.limits.quotas {
            match before.iter().find(|q| q.name == quota.name) {
                None => changes.push(format!("{}/{}: added {}", upstream.name, quota.name, describe(quota))),
                Some(previous) if previous != quota => changes.push(format!(
                    "{}/{}: {} -> {}",
                    upstream.name,
                    quota.name,
                    describe(previous),
                    describe(quota)
                )),
                Some(_) => {}
            }
        }
        for quota in before.iter().filter(|q| !upstream.limits.quotas.iter().any(|n| n.name == q.name)) {
            changes.push(format!("{}/{}: removed", upstream.name, quota.name));
        }
    }
    changes
}
