//! Logs and metrics. Logs go through `tracing` (filter from `SLUICE_LOG`, format from
//! `SLUICE_LOG_FORMAT`); metrics are registered once in [`Metrics`] and passed down by `Arc`.
//!
//! A leaf: it imports nothing from sluice, so every room can count and log.

pub mod metrics;

pub use metrics::Metrics;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing), which
/// lets tests start several proxies in one process.
pub fn init_logging() {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format = std::env::var("SLUICE_LOG_FORMAT").unwrap_or_default().to_ascii_lowercase();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format.as_str() {
        "json" => builder.json().flatten_event(true).with_current_span(true).try_init(),
        "pretty" => builder.pretty().try_init(),
        _ => builder.try_init(),
    };
}
