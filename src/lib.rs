//! sluice: a rate-limit-aware egress proxy sidecar for CRM vendor APIs.
//!
//! # Layout
//! Modules are listed in the order a request meets them (see `ARCHITECTURE.md` for the map):
//!
//! - [`listen`]: 1. ACCEPT. The proxy listener, CONNECT tunnels and TLS interception.
//! - [`proxy`]: the per-connection service and the journey in `proxy::stack`:
//!   observe -> respond -> route -> forward.
//! - [`controls`]: the caller's `Sluice-*` request controls, parsed once in the Route step.
//! - [`limit`]: 3. LIMIT. Quotas (GCRA, memory or Redis), queueing, concurrency caps.
//! - [`respond`] and [`error`]: how failures become responses, in one place.
//! - [`config`]: the YAML file, validation and live reload.
//! - [`state`]: the current config generation, swapped atomically on reload.
//! - [`tls`]: the interception CA and the upstream TLS client config.
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`admin`]: metrics, health, config and reload endpoints.
//! - [`app`]: wiring, start-up and graceful shutdown.

pub mod admin;
pub mod app;
pub mod batch;
pub mod body;
pub mod breaker;
pub mod config;
pub mod controls;
pub mod error;
pub mod limit;
pub mod listen;
pub mod proxy;
pub mod respond;
pub mod retry;
pub mod security;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod vendor;
pub mod webhook;
