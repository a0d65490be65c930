//! Every metric sluice exports, registered once, with bounded labels.
//!
//! Names follow `sluice_<noun>_<unit>[_total]`. Label values come from config (upstream names)
//! or small fixed sets (method, status class, result), never from request data, so the series
//! count stays bounded whatever clients send. The list is documented in `config/README.md`.

#![allow(clippy::expect_used)] // Metric definitions are static: a bad one fails every test, never a request.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Label for requests that matched no upstream.
pub const NO_UPSTREAM: &str = "none";

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by upstream, method and status class (`2xx`..`5xx`).
    pub requests: IntCounterVec,
    /// Whole request time as the client sees it, by upstream.
    pub request_duration: HistogramVec,
    /// Time from sending upstream to the response head, by upstream.
    pub upstream_duration: HistogramVec,
    /// Requests being handled now.
    pub in_flight: IntGauge,
    /// Config reloads by result (`success`, `failure`).
    pub reloads: IntCounterVec,
    /// Unix time of the last successful config load.
    pub reload_last_success: Gauge,
    /// CONNECT tunnels open now, by kind (`blind`, `intercept`).
    pub tunnels_open: IntGaugeVec,
    /// Client connections open now on the proxy listener.
    pub connections_open: IntGauge,
    /// Responses sluice made itself, by error (`egress_denied`, `upstream_timeout`, ...).
    pub proxy_errors: IntCounterVec,
    /// Leaf certificates minted for interception.
    pub leaf_certs_minted: IntCounterVec,
    /// Quota decisions by upstream, quota and result (`allowed`, `queued`, `rejected`).
    pub quota_decisions: IntCounterVec,
    /// Time requests spent queued for quota or a concurrency slot, by upstream.
    pub quota_queue_wait: HistogramVec,
    /// Latency of quota store (Redis) decisions.
    pub store_latency: prometheus::Histogram,
    /// Quota store errors by kind (`timeout`, `redis_error`, `not_connected`, ...).
    pub store_errors: IntCounterVec,
    /// 1 while Redis is unreachable and `on_failure` applies.
    pub store_degraded: IntGauge,
    /// Live sluice replicas sharing the quota store.
    pub replicas: IntGauge,
    /// Scope values evicted from a quota's bounded key table.
    pub scope_evictions: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new("sluice_requests_total", "Requests answered, by upstream, method and status class."),
                &["upstream", "method", "status_class"],
            )
            .expect("static metric definition"),
            request_duration: HistogramVec::new(
                HistogramOpts::new("sluice_request_duration_seconds", "Request time as the client sees it.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["upstream"],
            )
            .expect("static metric definition"),
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "sluice_upstream_duration_seconds",
                    "Time from sending upstream to the response head.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["upstream"],
            )
            .expect("static metric definition"),
            in_flight: IntGauge::new("sluice_requests_in_flight", "Requests being handled now.")
                .expect("static metric definition"),
            reloads: IntCounterVec::new(
                Opts::new("sluice_config_reloads_total", "Config reloads, by result."),
                &["result"],
            )
            .expect("static metric definition"),
            reload_last_success: Gauge::new(
                "sluice_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful config load.",
            )
            .expect("static metric definition"),
            tunnels_open: IntGaugeVec::new(
                Opts::new("sluice_tunnels_open", "CONNECT tunnels open now, by kind."),
                &["kind"],
            )
            .expect("static metric definition"),
            connections_open: IntGauge::new("sluice_connections_open", "Client connections open now.")
                .expect("static metric definition"),
            proxy_errors: IntCounterVec::new(
                Opts::new("sluice_proxy_errors_total", "Responses sluice made itself, by upstream and error."),
                &["upstream", "error"],
            )
            .expect("static metric definition"),
            leaf_certs_minted: IntCounterVec::new(
                Opts::new("sluice_leaf_certificates_minted_total", "Leaf certificates minted for interception."),
                &["result"],
            )
            .expect("static metric definition"),
            quota_decisions: IntCounterVec::new(
                Opts::new("sluice_quota_decisions_total", "Quota decisions by upstream, quota and result."),
                &["upstream", "quota", "result"],
            )
            .expect("static metric definition"),
            quota_queue_wait: HistogramVec::new(
                HistogramOpts::new("sluice_quota_queue_wait_seconds", "Time queued for quota or a concurrency slot.")
                    .buckets(vec![0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["upstream"],
            )
            .expect("static metric definition"),
            store_latency: prometheus::Histogram::with_opts(
                HistogramOpts::new("sluice_store_latency_seconds", "Latency of quota store decisions.")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
            )
            .expect("static metric definition"),
            store_errors: IntCounterVec::new(
                Opts::new("sluice_store_errors_total", "Quota store errors by kind."),
                &["kind"],
            )
            .expect("static metric definition"),
            store_degraded: IntGauge::new("sluice_store_degraded", "1 while the quota store is unreachable.")
                .expect("static metric definition"),
            replicas: IntGauge::new("sluice_replicas", "Live sluice replicas sharing the quota store.")
                .expect("static metric definition"),
            scope_evictions: IntCounterVec::new(
                Opts::new("sluice_quota_scope_evictions_total", "Scope values evicted from a quota's key table."),
                &["upstream", "quota"],
            )
            .expect("static metric definition"),
            registry,
        };
        metrics.register_all();
        metrics.tunnels_open.with_label_values(&["blind"]).set(0);
        metrics.tunnels_open.with_label_values(&["intercept"]).set(0);
        metrics.reloads.with_label_values(&["success"]);
        metrics.reloads.with_label_values(&["failure"]);
        metrics.replicas.set(1);
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.reloads.clone()),
            Box::new(self.reload_last_success.clone()),
            Box::new(self.tunnels_open.clone()),
            Box::new(self.connections_open.clone()),
            Box::new(self.proxy_errors.clone()),
            Box::new(self.leaf_certs_minted.clone()),
            Box::new(self.quota_decisions.clone()),
            Box::new(self.quota_queue_wait.clone()),
            Box::new(self.store_latency.clone()),
            Box::new(self.store_errors.clone()),
            Box::new(self.store_degraded.clone()),
            Box::new(self.replicas.clone()),
            Box::new(self.scope_evictions.clone()),
        ];
        for collector in collectors {
            self.registry.register(collector).expect("each metric is registered once");
        }
    }

    /// The registry, for later features that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Text exposition format for `GET /metrics`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `2xx`-style class of a status, a bounded label.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Method as a bounded label: the standard ones by name, anything else `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "other",
    }
}
