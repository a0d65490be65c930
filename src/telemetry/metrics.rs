//! Every metric sluice exports, registered once, with bounded labels.
//!
//! Names follow `sluice_<noun>_<unit>[_total]`. Label values come from config (upstream names)
//! or small fixed sets (method, status class, result), never from request data, so the series
//! count stays bounded whatever clients send. The list is documented in `config/README.md`.

#![allow(clippy::expect_used)] // Metric definitions are static: a bad one fails every test, never a request.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    /// Connections or tunnels refused by a cap, by reason (`per_client`, `max_tunnels`,
    /// `tunnels_per_client`, `admin_max_connections`).
    pub connections_refused: IntCounterVec,
    /// Client connections sluice closed on its own, by reason (`http2_idle`, `max_age`,
    /// `abandoned_response`).
    pub connections_closed: IntCounterVec,
    /// Responses abandoned because the client stopped reading them, by upstream.
    pub responses_abandoned: IntCounterVec,
    /// Blind tunnels closed for what the client's handshake said, by upstream and reason
    /// (`sni_mismatch`, `encrypted_client_hello`, `bad_client_hello`, `client_hello_timeout`).
    pub tunnels_refused: IntCounterVec,
    /// Responses sluice made itself, by error (`egress_denied`, `upstream_timeout`, ...).
    pub proxy_errors: IntCounterVec,
    /// Leaf certificates minted for interception.
    pub leaf_certs_minted: IntCounterVec,
    /// Quota decisions by upstream, quota and result (`allowed`, `queued`, `rejected`).
    pub quota_decisions: IntCounterVec,
    /// Time requests spent queued for quota or a concurrency slot, by upstream.
    pub quota_queue_wait: HistogramVec,
    /// Tokens spent, by upstream, quota and consumer (a bounded set: see `consumer`).
    pub quota_spent: CounterVec,
    /// Seconds until the quota's scope closest to running out does, at its current spend rate
    /// (`+Inf` when none is at risk), by upstream and quota.
    pub quota_exhaustion: GaugeVec,
    /// Each quota's window (`per`) in seconds, by upstream and quota: lets an alert tell daily
    /// quotas from short ones.
    pub quota_window: GaugeVec,
    /// Latency of quota store (Redis) decisions.
    pub store_latency: prometheus::Histogram,
    /// Quota store errors by kind (`timeout`, `redis_error`, `not_connected`, ...).
    pub store_errors: IntCounterVec,
    /// 1 while Redis is unreachable and `on_failure` applies.
    pub store_degraded: IntGauge,
    /// Connections to the quota store built: the first, then one per healing.
    pub store_connections: IntCounter,
    /// Live sluice replicas sharing the quota store.
    pub replicas: IntGauge,
    /// Scope values evicted from a quota's bounded key table.
    pub scope_evictions: IntCounterVec,
    pub lease_tokens: IntCounterVec,
    /// Vendor pauses recorded, by upstream and reason (`retry_after`, `profile`, `backoff`, `remaining`).
    pub vendor_pauses: IntCounterVec,
    /// Limit in force where the vendor announced a lower one, by upstream and quota.
    pub effective_limit: IntGaugeVec,
    /// Requests left in a vendor window, as the vendor last reported, by upstream and window.
    pub vendor_remaining: IntGaugeVec,
    /// Times the vendor reported fewer left than sluice believed and its figure was adopted.
    pub vendor_adopted: IntCounterVec,
    /// Vendor rate-limit headers present but unparseable, by upstream.
    pub vendor_header_errors: IntCounterVec,
    /// Vendor refusals for quota reasons, by upstream and class.
    pub vendor_throttles: IntCounterVec,
    /// Retries sent, by upstream and reason.
    pub retries: IntCounterVec,
    /// Retries not sent because the budget was spent, by upstream.
    pub retry_budget_exhausted: IntCounterVec,
    /// Breaker state by upstream: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// Breaker transitions by upstream, from and to.
    pub breaker_transitions: IntCounterVec,
    /// Requests answered by an open breaker without an upstream call.
    pub breaker_short_circuits: IntCounterVec,
    /// Calls per bulk call, by upstream.
    pub batch_size: HistogramVec,
    /// Bulk calls by upstream and reason (`size`, `delay`).
    pub batch_flushes: IntCounterVec,
    /// Upstream calls saved by batching (items - 1 per bulk call), by upstream.
    pub batch_calls_saved: IntCounterVec,
    /// Batched calls whose own answer was an error, by upstream.
    pub batch_item_errors: IntCounterVec,
    /// OAuth 2.0 token refreshes by upstream and result: `success` and `failure` (this replica
    /// asked the token endpoint), `shared` (it took the token another replica had just obtained).
    pub oauth_refreshes: IntCounterVec,
    /// Unix time the OAuth 2.0 access token in use expires, by upstream.
    pub oauth_token_expiry: GaugeVec,
    /// Vendor 401s to a request carrying the brokered token, by upstream and outcome
    /// (`retried` with a refreshed token, `relayed` to the client).
    pub oauth_unauthorized: IntCounterVec,
    /// Handles to the per-request series, by upstream name (see [`UpstreamSeries`]).
    series: Arc<RwLock<HashMap<Arc<str>, Arc<UpstreamSeries>>>>,
}

/// At most this many upstream names keep cached handles; names come from config, so only a
/// long run of reloads renaming upstreams could reach it, and then lookups go by label again.
const MAX_CACHED_UPSTREAMS: usize = 1024;

/// How many methods `sluice_requests_total` tells apart (see `method_label`), and status classes.
const METHOD_LABELS: usize = 10;
const STATUS_CLASSES: usize = 5;

/// One upstream's per-request series, created on first use.
///
/// Why: `with_label_values` hashes every label value and takes the vector's lock, three times a
/// request (count, request time, upstream time). One lookup by upstream name here replaces
/// them, and a series still appears in `/metrics` only once it has been used.
#[derive(Default)]
pub struct UpstreamSeries {
    requests: [[OnceLock<IntCounter>; STATUS_CLASSES]; METHOD_LABELS],
    request_duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            series: Arc::default(),
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
            connections_refused: IntCounterVec::new(
                Opts::new("sluice_connections_refused_total", "Connections or tunnels refused by a cap, by reason."),
                &["reason"],
            )
            .expect("static metric definition"),
            connections_closed: IntCounterVec::new(
                Opts::new("sluice_connections_closed_total", "Client connections sluice closed on its own, by reason."),
                &["reason"],
            )
            .expect("static metric definition"),
            responses_abandoned: IntCounterVec::new(
                Opts::new(
                    "sluice_responses_abandoned_total",
                    "Responses abandoned because the client stopped reading them, by upstream.",
                ),
                &["upstream"],
            )
            .expect("static metric definition"),
            tunnels_refused: IntCounterVec::new(
                Opts::new(
                    "sluice_tunnels_refused_total",
                    "Blind tunnels closed for what the client's TLS handshake said, by upstream and reason.",
                ),
                &["upstream", "reason"],
            )
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
            quota_spent: CounterVec::new(
                Opts::new("sluice_quota_spent_total", "Quota tokens spent, by upstream, quota and consumer."),
                &["upstream", "quota", "consumer"],
            )
            .expect("static metric definition"),
            quota_exhaustion: GaugeVec::new(
                Opts::new(
                    "sluice_quota_exhaustion_seconds",
                    "Seconds until the quota runs out at its current spend rate (+Inf when not at risk).",
                ),
                &["upstream", "quota"],
            )
            .expect("static metric definition"),
            quota_window: GaugeVec::new(
                Opts::new("sluice_quota_window_seconds", "The quota's window (per), in seconds."),
                &["upstream", "quota"],
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
            store_connections: IntCounter::new(
                "sluice_store_connections_total",
                "Connections to the quota store built: the first, then one each time a silent or failed one is replaced.",
            )
            .expect("static metric definition"),
            replicas: IntGauge::new("sluice_replicas", "Live sluice replicas sharing the quota store.")
                .expect("static metric definition"),
            scope_evictions: IntCounterVec::new(
                Opts::new("sluice_quota_scope_evictions_total", "Scope values evicted from a quota's key table."),
                &["upstream", "quota"],
            )
            .expect("static metric definition"),
            lease_tokens: IntCounterVec::new(
                Opts::new(
                    "sluice_quota_lease_tokens_total",
                    "Tokens leased from the shared store ahead of requests, and leased tokens dropped unspent.",
                ),
                &["upstream", "outcome"],
            )
            .expect("static metric definition"),
            vendor_pauses: IntCounterVec::new(
                Opts::new("sluice_vendor_pauses_total", "Vendor pauses recorded, by upstream and reason."),
                &["upstream", "reason"],
            )
            .expect("static metric definition"),
            effective_limit: IntGaugeVec::new(
                Opts::new("sluice_quota_effective_limit", "Quota limit in force after the vendor's announcements."),
                &["upstream", "quota"],
            )
            .expect("static metric definition"),
            vendor_remaining: IntGaugeVec::new(
                Opts::new("sluice_vendor_remaining", "Requests left in a vendor window, as last reported."),
                &["upstream", "window"],
            )
            .expect("static metric definition"),
            vendor_adopted: IntCounterVec::new(
                Opts::new(
                    "sluice_vendor_remaining_adopted_total",
                    "Vendor reports of fewer requests left than sluice believed, adopted for the rest of the window.",
                ),
                &["upstream", "quota"],
            )
            .expect("static metric definition"),
            vendor_header_errors: IntCounterVec::new(
                Opts::new("sluice_vendor_header_errors_total", "Vendor rate-limit headers that could not be parsed."),
                &["upstream"],
            )
            .expect("static metric definition"),
            vendor_throttles: IntCounterVec::new(
                Opts::new("sluice_vendor_throttles_total", "Vendor refusals for quota reasons, by class."),
                &["upstream", "class"],
            )
            .expect("static metric definition"),
            retries: IntCounterVec::new(
                Opts::new("sluice_retries_total", "Retries sent, by upstream and reason."),
                &["upstream", "reason"],
            )
            .expect("static metric definition"),
            retry_budget_exhausted: IntCounterVec::new(
                Opts::new("sluice_retry_budget_exhausted_total", "Retries not sent: budget spent."),
                &["upstream"],
            )
            .expect("static metric definition"),
            breaker_state: IntGaugeVec::new(
                Opts::new("sluice_breaker_state", "Breaker state: 0 closed, 1 half-open, 2 open."),
                &["upstream"],
            )
            .expect("static metric definition"),
            breaker_transitions: IntCounterVec::new(
                Opts::new("sluice_breaker_transitions_total", "Breaker transitions by from and to."),
                &["upstream", "from", "to"],
            )
            .expect("static metric definition"),
            breaker_short_circuits: IntCounterVec::new(
                Opts::new("sluice_breaker_short_circuited_total", "Requests refused by an open breaker."),
                &["upstream"],
            )
            .expect("static metric definition"),
            batch_size: HistogramVec::new(
                HistogramOpts::new("sluice_batch_size", "Calls per bulk call.")
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0]),
                &["upstream"],
            )
            .expect("static metric definition"),
            batch_flushes: IntCounterVec::new(
                Opts::new("sluice_batch_flushes_total", "Bulk calls by reason (size, delay)."),
                &["upstream", "reason"],
            )
            .expect("static metric definition"),
            batch_calls_saved: IntCounterVec::new(
                Opts::new("sluice_batch_calls_saved_total", "Upstream calls saved by batching."),
                &["upstream"],
            )
            .expect("static metric definition"),
            batch_item_errors: IntCounterVec::new(
                Opts::new("sluice_batch_item_errors_total", "Batched calls answered with an error."),
                &["upstream"],
            )
            .expect("static metric definition"),
            oauth_refreshes: IntCounterVec::new(
                Opts::new("sluice_oauth_refresh_total", "OAuth 2.0 token refreshes by result (success, failure, shared)."),
                &["upstream", "result"],
            )
            .expect("static metric definition"),
            oauth_token_expiry: GaugeVec::new(
                Opts::new(
                    "sluice_oauth_token_expiry_timestamp_seconds",
                    "Unix time the OAuth 2.0 access token in use expires.",
                ),
                &["upstream"],
            )
            .expect("static metric definition"),
            oauth_unauthorized: IntCounterVec::new(
                Opts::new(
                    "sluice_oauth_unauthorized_total",
                    "Vendor 401s to the brokered token, by outcome (retried, relayed).",
                ),
                &["upstream", "outcome"],
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
            Box::new(self.connections_refused.clone()),
            Box::new(self.connections_closed.clone()),
            Box::new(self.responses_abandoned.clone()),
            Box::new(self.tunnels_refused.clone()),
            Box::new(self.proxy_errors.clone()),
            Box::new(self.leaf_certs_minted.clone()),
            Box::new(self.quota_decisions.clone()),
            Box::new(self.quota_queue_wait.clone()),
            Box::new(self.quota_spent.clone()),
            Box::new(self.quota_exhaustion.clone()),
            Box::new(self.quota_window.clone()),
            Box::new(self.store_latency.clone()),
            Box::new(self.store_errors.clone()),
            Box::new(self.store_degraded.clone()),
            Box::new(self.store_connections.clone()),
            Box::new(self.replicas.clone()),
            Box::new(self.scope_evictions.clone()),
            Box::new(self.lease_tokens.clone()),
            Box::new(self.vendor_pauses.clone()),
            Box::new(self.effective_limit.clone()),
            Box::new(self.vendor_remaining.clone()),
            Box::new(self.vendor_adopted.clone()),
            Box::new(self.vendor_header_errors.clone()),
            Box::new(self.vendor_throttles.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.retry_budget_exhausted.clone()),
            Box::new(self.breaker_state.clone()),
            Box::new(self.breaker_transitions.clone()),
            Box::new(self.breaker_short_circuits.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.batch_flushes.clone()),
            Box::new(self.batch_calls_saved.clone()),
            Box::new(self.batch_item_errors.clone()),
            Box::new(self.oauth_refreshes.clone()),
            Box::new(self.oauth_token_expiry.clone()),
            Box::new(self.oauth_unauthorized.clone()),
        ];
        for collector in collectors {
            self.registry.register(collector).expect("each metric is registered once");
        }
    }

    /// Counts one answered request and its duration as the client saw it.
    pub fn observe_request(&self, upstream: &str, method: &http::Method, status: u16, seconds: f64) {
        let Some(series) = self.series_of(upstream) else {
            self.requests.with_label_values(&[upstream, method_label(method), status_class(status)]).inc();
            self.request_duration.with_label_values(&[upstream]).observe(seconds);
            return;
        };
        let (method_at, class_at) = (method_index(method), status_class_index(status));
        let counter = series.requests.get(method_at).and_then(|classes| classes.get(class_at)).map(|slot| {
            slot.get_or_init(|| {
                self.requests.with_label_values(&[upstream, method_label(method), status_class(status)])
            })
        });
        match counter {
            Some(counter) => counter.inc(),
            None => self.requests.with_label_values(&[upstream, method_label(method), status_class(status)]).inc(),
        }
        series.request_duration.get_or_init(|| self.request_duration.with_label_values(&[upstream])).observe(seconds);
    }

    /// Records the time from sending upstream to the response head.
    pub fn observe_upstream(&self, upstream: &str, seconds: f64) {
        match self.series_of(upstream) {
            Some(series) => series
                .upstream_duration
                .get_or_init(|| self.upstream_duration.with_label_values(&[upstream]))
                .observe(seconds),
            None => self.upstream_duration.with_label_values(&[upstream]).observe(seconds),
        }
    }

    fn series_of(&self, upstream: &str) -> Option<Arc<UpstreamSeries>> {
        {
            let cached = self.series.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(series) = cached.get(upstream) {
                return Some(series.clone());
            }
        }
        let mut cached = self.series.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.len() >= MAX_CACHED_UPSTREAMS {
            return None;
        }
        Some(cached.entry(Arc::from(upstream)).or_default().clone())
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
        infinities_as_the_format_spells_them(out)
    }
}

/// The text format spells infinite sample values `+Inf` and `-Inf`; the encoder writes Rust's
/// `inf` (a gauge that is `+Inf` when nothing is at risk, `sluice_quota_exhaustion_seconds`, is
/// the only such value). Only whole sample values at the end of a line are rewritten.
fn infinities_as_the_format_spells_them(text: Vec<u8>) -> Vec<u8> {
    if !text.windows(5).any(|window| window == b" inf\n" || window == b"-inf\n") {
        return text;
    }
    let text = String::from_utf8_lossy(&text);
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        match (body.strip_suffix(" inf"), body.strip_suffix(" -inf")) {
            (_, Some(series)) if !body.starts_with('#') => {
                out.push_str(series);
                out.push_str(" -Inf\n");
            }
            (Some(series), _) if !body.starts_with('#') => {
                out.push_str(series);
                out.push_str(" +Inf\n");
            }
            _ => out.push_str(line),
        }
    }
    out.into_bytes()
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

fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Where `method_label(method)` sits in [`METHOD_LABELS`].
fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::PATCH => 3,
        http::Method::DELETE => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        http::Method::CONNECT => 7,
        http::Method::TRACE => 8,
        _ => 9,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_series_count_like_labelled_lookups() {
        let metrics = Metrics::new();
        metrics.observe_request("hubspot", &http::Method::GET, 200, 0.01);
        metrics.observe_request("hubspot", &http::Method::GET, 204, 0.02);
        metrics.observe_request("hubspot", &http::Method::from_bytes(b"PROPFIND").unwrap(), 503, 0.03);
        metrics.observe_upstream("hubspot", 0.005);
        assert_eq!(metrics.requests.with_label_values(&["hubspot", "GET", "2xx"]).get(), 2);
        assert_eq!(metrics.requests.with_label_values(&["hubspot", "other", "5xx"]).get(), 1);
        assert_eq!(metrics.request_duration.with_label_values(&["hubspot"]).get_sample_count(), 3);
        assert_eq!(metrics.upstream_duration.with_label_values(&["hubspot"]).get_sample_count(), 1);
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(!text.contains("method=\"POST\""), "unused series stay out of /metrics: {text}");
    }

    #[test]
    fn infinite_gauges_are_spelt_as_the_text_format_says() {
        let metrics = Metrics::new();
        metrics.quota_exhaustion.with_label_values(&["hubspot", "daily"]).set(f64::INFINITY);
        metrics.quota_exhaustion.with_label_values(&["hubspot", "burst"]).set(12.5);
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains("sluice_quota_exhaustion_seconds{quota=\"daily\",upstream=\"hubspot\"} +Inf\n"),
            "{text}"
        );
        assert!(text.contains("sluice_quota_exhaustion_seconds{quota=\"burst\",upstream=\"hubspot\"} 12.5\n"));
        assert!(text.contains("le=\"+Inf\""), "histogram buckets untouched");
        assert_eq!(infinities_as_the_format_spells_them(b"x -inf\n# HELP y inf\n".to_vec()), b"x -Inf\n# HELP y inf\n");
    }

    #[test]
    fn method_index_matches_method_label() {
        let labels = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE"];
        for (at, label) in labels.iter().enumerate() {
            let method = http::Method::from_bytes(label.as_bytes()).unwrap();
            assert_eq!((method_index(&method), method_label(&method)), (at, *label));
        }
        let other = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!((method_index(&other), method_label(&other)), (METHOD_LABELS - 1, "other"));
    }
}
